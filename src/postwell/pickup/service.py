"""pickup(8): move complete maildrop files through cleanup into the queue."""

from __future__ import annotations

import dataclasses
import errno
import os
import pwd
import re
import select
import signal
import stat
import time
from typing import Callable

from ..cleanup import Cleanup
from ..cleanup.addresses import ADDRESS_HEADERS, rewrite_header
from ..cleanup.service import REPLY_TOO_BIG, _quote_local, mail_date
from ..dsn.notice import FAILURE, DsnRecipient, render_notice
from ..dsn.submit import is_double_bounce, wants
from ..fdutil import drain
from ..qmgr.logfmt import format_delay
from ..queue import QueueStore, fsync_dir
from .maildrop import (
    MAX_ENVELOPE, NAME_RE, TMP_PREFIX, MaildropFile, MaildropFormatError, read_maildrop,
)

WAKEUP_DEFAULT = 60.0        # master.cf's "pickup ... 60 1 pickup" wakeup field
STALE_TMP_AGE = 86400.0      # a sendmail temporary this old belongs to a dead sendmail
FUTURE_SLACK = 2 * 3600      # as Postfix: allow some clock drift before warning
DAY = 86400

_HEADER_RE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
_SCAN_LINE_LIMIT = 4096      # header name detection never needs more than this per line

KEEP = "keep"                # try again at the next scan (temporary trouble)
DONE = "done"                # queued: the maildrop file has been removed
CORRUPT = "corrupt"          # moved aside to corrupt/
BOUNCED = "bounced"          # refused by cleanup: returned to the sender, file removed


class _FromInserter:
    """Passes content through and, where the header block ends, inserts
    ``From: Full Name <sender>`` when the message has no From: (what
    Postfix's cleanup does for sendmail -F).  Follows cleanup's rules: an
    empty line, a line that is not a header, or a first line starting with
    white space ends the header block.  Holds back at most one line of
    ``_SCAN_LINE_LIMIT`` bytes; longer header lines stream through.
    """

    def __init__(self, make_header: Callable[[set], bytes]) -> None:
        self.make_header = make_header
        self.done = False
        self.first = True
        self.seen: set[bytes] = set()
        self._pending = bytearray()
        self._in_long_line = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        out = bytearray()
        pend = self._pending
        pend += data
        while True:
            nl = pend.find(b"\n")
            if self._in_long_line:
                cut = len(pend) if nl < 0 else nl + 1
                out += pend[:cut]
                del pend[:cut]
                if nl < 0:
                    break
                self._in_long_line = False
                continue
            if nl < 0:
                if len(pend) <= _SCAN_LINE_LIMIT:
                    break
                if self._ends_headers(bytes(pend[:_SCAN_LINE_LIMIT])):
                    return self._insert(out)
                self._in_long_line = True
                continue
            if self._ends_headers(bytes(pend[:nl])):
                return self._insert(out)
            out += pend[:nl + 1]
            del pend[:nl + 1]
        return bytes(out)

    def _insert(self, out: bytearray) -> bytes:
        self.done = True
        out += self.make_header(self.seen)
        out += self._pending
        self._pending.clear()
        return bytes(out)

    def finish(self) -> bytes:
        """End of content inside the header block (a message of headers only)."""
        if self.done:
            return b""
        self.done = True
        pend = bytes(self._pending)
        self._pending.clear()
        if pend and self._ends_headers(pend.rstrip(b"\n")):
            return self.make_header(self.seen) + pend
        if pend and not pend.endswith(b"\n"):
            pend += b"\n"
        return pend + self.make_header(self.seen)

    def _ends_headers(self, body: bytes) -> bool:
        first, self.first = self.first, False
        if body == b"":
            return True
        if body[:1] in (b" ", b"\t"):
            return first
        m = _HEADER_RE.match(body)
        if not m:
            return True
        self.seen.add(body[:m.end()].rstrip(b": \t").lower())
        return False


class Pickup:
    """One pickup instance (one per process); ``run_once`` is one scan."""

    def __init__(self, config, log, *, store: QueueStore | None = None, cleanup: Cleanup | None = None,
                 clock: Callable[[], float] = time.time, cleanup_log=None, bounce_log=None):
        self.config = config
        self.log = log
        self.store = store or QueueStore.from_config(config)
        self.cleanup = cleanup or Cleanup(config, self.store, cleanup_log or log)
        # Postfix's bounce daemon logs "ID: sender non-delivery notification: NEWID".
        self.bounce_log = bounce_log or log
        self.clock = clock
        self.maildrop = self.store.path("maildrop")
        self.message_size_limit = _int(config, "message_size_limit", 10240000)
        self.myhostname = config.get("myhostname") or "localhost"
        self.mail_name = config.get("mail_name") or "postwell"
        self.owner_uid = _owner_uid(config)

    # -- one scan ------------------------------------------------------------------
    def run_once(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Process every complete maildrop file; return how many were queued."""
        queued = 0
        try:
            names = sorted(os.listdir(self.maildrop))
        except OSError as exc:
            self.log.warning(f"open directory {self.maildrop}: {exc.strerror}")
            return 0
        for name in names:
            if should_stop():
                break
            if name.startswith("."):
                self._purge_stale_tmp(name)
                continue
            if not NAME_RE.match(name):
                self.log.warning(f"maildrop/{name}: unexpected file name")
                self._move_aside(name)
                continue
            result = self.process(name)
            if result == DONE:
                queued += 1
        return queued

    def _purge_stale_tmp(self, name: str) -> None:
        if not name.startswith(TMP_PREFIX):
            return
        path = os.path.join(self.maildrop, name)
        try:
            st = os.lstat(path)
            if self.clock() - st.st_mtime > STALE_TMP_AGE:
                os.unlink(path)
                self.log.warning(f"maildrop/{name}: removed stale temporary file (uid={st.st_uid})")
        except OSError:
            pass

    def _move_aside(self, name: str) -> None:
        """Keep a bad file for the postmaster (never lost, never retried)."""
        src = os.path.join(self.maildrop, name)
        dst = self.store.path("corrupt", "maildrop." + name)
        try:
            os.rename(src, dst)
            fsync_dir(self.store.path("corrupt"))
            fsync_dir(self.maildrop)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self.log.warning(f"maildrop/{name}: cannot move to corrupt/: {exc.strerror}")

    # -- one file -------------------------------------------------------------------
    def process(self, name: str) -> str:
        path = os.path.join(self.maildrop, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return KEEP
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self.log.warning(f"maildrop/{name}: symbolic link -- moved to corrupt/")
                self._move_aside(name)
                return CORRUPT
            self.log.warning(f"open input file maildrop/{name}: {exc.strerror}")
            return KEEP
        try:
            return self._process_fd(name, fd)
        finally:
            os.close(fd)

    def _corrupt(self, name: str, uid, reason: str) -> str:
        self.log.warning(f"maildrop/{name}: uid={uid}: {reason} -- moved to corrupt/")
        self._move_aside(name)
        return CORRUPT

    def _process_fd(self, name: str, fd: int) -> str:
        st = os.fstat(fd)
        uid = st.st_uid
        if not stat.S_ISREG(st.st_mode):
            return self._corrupt(name, uid, "not a regular file")
        if st.st_nlink != 1:
            # A hard link could make someone else's file look like a submission of theirs.
            return self._corrupt(name, uid, f"unexpected link count {st.st_nlink}")
        try:
            md = read_maildrop(fd, st.st_size, max_envelope=max(MAX_ENVELOPE, self.message_size_limit))
        except MaildropFormatError as exc:
            return self._corrupt(name, uid, f"malformed maildrop file: {exc.reason}")
        except OSError as exc:
            self.log.warning(f"maildrop/{name}: read error: {exc.strerror}")
            return KEEP
        env = md.envelope
        denied = submit_denied(self.config, uid)
        if denied:
            # authorized_submit_users is enforced here, on the file owner: a
            # user who bypasses sendmail still cannot get mail queued.
            return self._corrupt(name, uid, f"User {denied}({uid}) is not allowed to submit mail")
        if not env.recipients:
            return self._corrupt(name, uid, "no recipients")
        if self.message_size_limit and md.content_size > self.message_size_limit:
            return self._corrupt(name, uid, "message file too big")
        mtime = st.st_mtime
        now = self.clock()
        if mtime > now + FUTURE_SLACK:
            self.log.warning(f"maildrop/{name}: message dated {int(mtime - now)} seconds into the future")
            mtime = now
        elif mtime < now - DAY:
            self.log.warning(f"maildrop/{name}: message has been queued for {int((now - mtime) // DAY)} days")
        return self._queue(name, uid, md, mtime)

    def _queue(self, name: str, uid: int, md: MaildropFile, mtime: float) -> str:
        env = md.envelope
        try:
            cs = self.cleanup.open(rewrite_local=env.rewrite == "local", content_checks=True)
        except Exception as exc:   # queue file create error: disk full, permissions
            self.log.warning(f"maildrop/{name}: cannot create queue file: {exc}")
            return KEEP
        qid = cs.queue_id
        try:
            if uid == self.owner_uid and (os.fstat(md.fd).st_mode & stat.S_IROTH) == 0:
                # Postfix's "postsuper -r" trace (mail_owner files that others cannot read).
                self.log.info(f"{qid}: uid={uid} from=<{env.sender}> orig_id={name}")
            else:
                self.log.info(f"{qid}: uid={uid} from=<{env.sender}>")
            cs.set_sender(env.sender, ret=env.ret, envid=env.envid, body_type=env.body)
            cs.set_attribute("rewrite_context", env.rewrite)
            cs.set_attribute("log_ident", qid)
            # Postfix's pickup names the origin "local" (header/body checks log lines).
            cs.set_attribute("log_message_origin", "local")
            if env.protocol:
                cs.set_attribute("protocol_name", env.protocol)
                cs.set_attribute("client_name", "localhost")
                cs.set_attribute("client_address", "127.0.0.1")
                if env.helo:
                    cs.set_attribute("helo_name", env.helo)
            # Recipients before the content, as Postfix's pickup sends them: the
            # checks' log lines name the latest one.
            for i, rcpt in enumerate(env.recipients):
                cs.add_recipient(rcpt, orcpt=env.rcpt_orcpt.get(i),
                                 notify=env.rcpt_notify.get(i, env.notify))
            # For tracing, the file's owner but not the login name (as Postfix).
            cs.prepend_header(f"Received: by {self.myhostname} ({self.mail_name}, from userid {uid})\n"
                              f"\tid {qid}; {mail_date(mtime)}")
            self._copy_content(md, cs, env)
            reply = cs.finish_sync()
        except MaildropFormatError as exc:
            cs.abort()
            return self._corrupt(name, uid, f"malformed maildrop file: {exc.reason}")
        except OSError as exc:
            cs.abort()
            self.log.warning(f"maildrop/{name}: read error: {exc.strerror}")
            return KEEP
        except Exception as exc:   # never let one file take the service down
            cs.abort()
            self.log.warning(f"maildrop/{name}: {exc!r} -- will try again later")
            return KEEP
        if reply.code != 250:
            if reply.code >= 500:
                # Postfix's pickup asks cleanup with CLEANUP_FLAG_BOUNCE: a refused
                # message goes back to its sender instead of to the postmaster.
                return self._bounce(name, uid, md, cs, reply, mtime)
            self.log.warning(f"maildrop/{name}: {reply.text} -- will try again later")
            return KEEP
        # Only now is the message safe in the queue (cleanup's durable commit).
        try:
            os.unlink(os.path.join(self.maildrop, name))
            fsync_dir(self.maildrop)
        except OSError as exc:
            # The message would be queued twice on the next scan: warn loudly.
            self.log.warning(f"{qid}: remove maildrop/{name}: {exc.strerror}")
        # cleanup's commit has already woken the qmgr (public/qmgr).
        return DONE

    # -- refused by cleanup: return to sender (Postfix's cleanup_bounce) ------------
    def _bounce(self, name: str, uid: int, md: MaildropFile, cs, reply, mtime: float) -> str:
        env = md.envelope
        qid = cs.queue_id
        clog = self.cleanup.log
        dsn, reason = bounce_reason(reply)
        if reply.code == REPLY_TOO_BIG.code and dsn == REPLY_TOO_BIG.enhanced:
            clog.warning(f"{qid}: queue file size limit exceeded")
        try:
            headers, message_id = self._returned_headers(md, env, uid, qid, mtime, cs)
        except MaildropFormatError as exc:
            return self._corrupt(name, uid, f"malformed maildrop file: {exc.reason}")
        except OSError as exc:
            self.log.warning(f"maildrop/{name}: read error: {exc.strerror}")
            return KEEP
        if message_id and not getattr(cs, "_id_logged", False):
            # Postfix's cleanup reads the rest of the header after a REJECT when it
            # must bounce, so the message-id line follows the reject line.
            clog.info(f"{qid}: message-id={message_id}")
        now = self.clock()
        delay = format_delay(now - mtime)
        returned: list[DsnRecipient] = []
        seen: set = set()
        for i, given in enumerate(env.recipients):
            addr = self.cleanup.qualify(given)
            notify = env.rcpt_notify.get(i, env.notify)
            orcpt = env.rcpt_orcpt.get(i)
            key = (addr, notify or "", orcpt or "")
            if key in seen:
                continue    # cleanup's duplicate filter: one line, one report
            seen.add(key)
            orig = f", orig_to=<{given}>" if given != addr else ""
            clog.info(f"{qid}: to=<{addr}>{orig}, relay=none, delay={delay}, "
                      f"delays={delay}/0/0/0, dsn={dsn}, status=bounced ({reason})")
            if wants(notify, "FAILURE"):   # RFC 3461 4.1
                # Postfix's cleanup records the rewritten address as the ORCPT.
                returned.append(DsnRecipient(addr, dsn, reason, orig=given,
                                             orcpt=orcpt or f"rfc822;{addr}"))
        sender = cs.sender
        if returned and sender and not is_double_bounce(self.config, sender):
            data = render_notice(self.config, kind=FAILURE, queue_id=qid, sender=sender,
                                 arrival_time=mtime, recipients=returned,
                                 original=lambda: [headers], content_size=len(headers),
                                 ret=env.ret, envid=env.envid, full=False, now=now)
            result = self._post_notice(qid, sender, data)
            if result == KEEP:
                return KEEP
            if result == CORRUPT:
                self._move_aside(name)
                return CORRUPT
        # A null sender (or NOTIFY=NEVER) gets no notice: the message is dropped,
        # its to= lines being the record (as Postfix).  The maildrop file goes only
        # now, after the notice's durable commit.
        self._remove(name, qid)
        return BOUNCED

    def _post_notice(self, qid: str, sender: str, data: bytes) -> str:
        """Queue the notice from the null sender; DONE once it is durable."""
        try:
            ns = self.cleanup.open(rewrite_local=True)
        except Exception as exc:
            self.log.warning(f"{qid}: cannot queue sender non-delivery notification: {exc}")
            return KEEP
        try:
            ns.set_sender("")
            ns.add_recipient(sender)
            ns.write(data)
            answer = ns.finish_sync()
        except Exception as exc:
            ns.abort()
            self.log.warning(f"{qid}: cannot queue sender non-delivery notification: {exc!r}")
            return KEEP
        if answer.code == 250:
            self.bounce_log.info(f"{qid}: sender non-delivery notification: {ns.queue_id}")
            return DONE
        if answer.code < 500:
            self.log.warning(f"{qid}: bounce message failure: {answer.text} -- will try again later")
            return KEEP
        # Postfix retries such a file forever; keep it for the postmaster instead.
        self.log.warning(f"{qid}: bounce message failure: {answer.text} -- moved to corrupt/")
        return CORRUPT

    def _remove(self, name: str, qid: str) -> None:
        try:
            os.unlink(os.path.join(self.maildrop, name))
            fsync_dir(self.maildrop)
        except OSError as exc:
            self.log.warning(f"{qid}: remove maildrop/{name}: {exc.strerror}")

    def _returned_headers(self, md: MaildropFile, env, uid: int, qid: str, mtime: float,
                          cs) -> tuple[bytes, str | None]:
        """The header block a notice returns, as cleanup would have stored it:
        Return-Path, our Received:, the message's own headers (at most
        header_size_limit bytes) and the headers cleanup adds when missing."""
        limit = self.cleanup.header_size_limit
        fields: list[list] = []       # [name (lower), length of name as written, bytes]
        size = 0
        names: set[bytes] = set()
        message_id = None
        pend = bytearray()
        first = True
        ended = False

        def take(line: bytes) -> bool:
            nonlocal first, size
            was_first, first = first, False
            if line == b"" or (line[:1] in (b" ", b"\t") and was_first):
                return False
            if line[:1] in (b" ", b"\t"):
                if size + len(line) < limit:
                    fields[-1][2] += b"\n" + line
                    size += len(line) + 1
                return True
            m = _HEADER_RE.match(line)
            if not m:
                return False
            hname = line[:m.end()].rstrip(b": \t").lower()
            names.add(hname)
            if size + len(line) < limit:
                fields.append([hname, len(line[:m.end()].rstrip(b": \t")), bytearray(line)])
                size += len(line) + 1
            return True

        for chunk in md.iter_content():
            pend += chunk
            while not ended:
                nl = pend.find(b"\n")
                if nl < 0:
                    if len(pend) > limit:    # one endless line: cleanup cuts it too
                        ended = not take(bytes(pend[:_SCAN_LINE_LIMIT]).rstrip(b"\r"))
                        pend.clear()
                    break
                line = bytes(pend[:nl]).rstrip(b"\r")
                del pend[:nl + 1]
                ended = not take(line)
            if ended:
                break
        if not ended and pend:
            take(bytes(pend).rstrip(b"\r"))
        block = bytearray()
        for hname, name_len, raw in fields:
            raw = bytes(raw)
            if hname == b"message-id" and message_id is None:
                value = raw[raw.index(b":") + 1:].replace(b"\n", b"").strip()
                message_id = value.decode("utf-8", "replace") or None
            if env.rewrite == "local" and hname.decode("ascii", "replace") in ADDRESS_HEADERS:
                raw = rewrite_header(raw, name_len, self.cleanup.myorigin) or raw
            block += raw + b"\n"
        resent = any(n.startswith(b"resent-") for n in names)
        pre = "Resent-" if resent else ""
        extra = []
        if pre.lower().encode() + b"message-id" not in names:
            stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(cs.arrival_time))
            message_id = f"<{stamp}.{qid}@{self.cleanup.myhostname}>"
            extra.append(f"{pre}Message-Id: {message_id}\n".encode())
        if pre.lower().encode() + b"date" not in names:
            extra.append(f"{pre}Date: {mail_date(mtime)}\n".encode())
        if env.fullname and env.sender and env.rewrite == "local":
            extra.append(self._from_header(names, dataclasses.replace(env, sender=cs.sender),
                                           (self.config.get("header_from_format") or
                                            "standard").strip().lower() == "obsolete"))
        elif pre.lower().encode() + b"from" not in names:
            extra.append(f"{pre}From: {_quote_local(cs.sender or 'MAILER-DAEMON')}\n"
                         .encode("utf-8", "surrogateescape"))
        top = (f"Return-Path: <{cs.sender}>\n"
               f"Received: by {self.myhostname} ({self.mail_name}, from userid {uid})\n"
               f"\tid {qid}; {mail_date(mtime)}\n").encode("utf-8", "surrogateescape")
        return top + bytes(block) + b"".join(extra), message_id

    def _copy_content(self, md: MaildropFile, cs, env) -> None:
        inserter = None
        if env.fullname and env.sender and env.rewrite == "local":
            obsolete = (self.config.get("header_from_format") or "standard").strip().lower() == "obsolete"
            inserter = _FromInserter(lambda seen: self._from_header(seen, env, obsolete))
        for chunk in md.iter_content():
            cs.write(inserter.feed(chunk) if inserter is not None else chunk)
        if inserter is not None:
            tail = inserter.finish()
            if tail:
                cs.write(tail)

    @staticmethod
    def _from_header(seen: set, env, obsolete: bool = False) -> bytes:
        resent = any(h.startswith(b"resent-") for h in seen)
        name = b"resent-from" if resent else b"from"
        if name in seen:
            return b""
        label = "Resent-From" if resent else "From"
        if obsolete:
            # header_from_format = obsolete: "address (Full Name)".
            comment = env.fullname.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            comment = comment.replace("\n", " ").replace("\r", " ")
            return f"{label}: {env.sender} ({comment})\n".encode("utf-8", "surrogateescape")
        # header_from_format = standard: "Full Name <address>" (RFC 5322 3.4).
        return f"{label}: {_phrase(env.fullname)} <{env.sender}>\n".encode("utf-8", "surrogateescape")


def bounce_reason(reply) -> tuple[str, str]:
    """The dsn and text of a cleanup refusal as the bounce logs them: the reply
    without smtpd's "Error: " wording ("message file too big")."""
    text = str(getattr(reply, "text", "") or "").strip()
    if text.startswith("Error: "):
        text = text[len("Error: "):]
    dsn = getattr(reply, "enhanced", None) or "5.0.0"
    return dsn, text or "message content rejected"


_ATOM_OK = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ \x80-\U0010ffff]*$")


def _phrase(text: str) -> str:
    """A display name, quoted when it holds specials (RFC 5322 3.2.5)."""
    text = text.replace("\n", " ").replace("\r", " ").strip()
    if _ATOM_OK.match(text) and "  " not in text:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _int(config, name: str, default: int) -> int:
    try:
        return config.get_int(name) if config.raw(name) is not None else default
    except ValueError:
        return default


def _owner_uid(config) -> int | None:
    import pwd
    try:
        return pwd.getpwnam(config.get("mail_owner") or "postfix").pw_uid
    except KeyError:
        return None


def submit_denied(config, uid: int) -> str | None:
    """authorized_submit_users: None when uid may submit, else its login name
    (or the uid as text).  Supports static:anyone, user names, !name and
    lookup tables (a table hit means allowed, as in Postfix's check_user_acl)."""
    spec = config.get("authorized_submit_users") if config.raw("authorized_submit_users") is not None \
        else "static:anyone"
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    items = [x for x in re.split(r"[,\s]+", spec or "") if x]
    if not items:
        return name
    for item in items:
        neg = item.startswith("!")
        if neg:
            item = item[1:]
        if item == "static:anyone":
            return name if neg else None
        if ":" in item and not item.startswith("/"):
            try:
                from postwell.tables import open_table
                hit = open_table(item, config).lookup(name) is not None
            except Exception:
                hit = False
        else:
            hit = item == name
        if hit:
            return name if neg else None
    return name


# ---------------------------------------------------------------------------- service

def pickup_once(config, log, **kw) -> int:
    """One scan of the maildrop; returns the number of messages queued."""
    return Pickup(config, log, **kw).run_once()


def prepare_public(queue_directory: str, log=None) -> str:
    """Create the pickup FIFO (mode 0622: any user may poke it) and open up
    maildrop/ (1733) and public/ (search for all) when this process owns them.
    Returns the FIFO path."""
    me = os.geteuid()
    for sub, mode in (("maildrop", 0o1733), ("public", 0o711)):
        path = os.path.join(queue_directory, sub)
        try:
            os.makedirs(path, exist_ok=True)
            st = os.stat(path)
            if (st.st_uid == me or me == 0) and stat.S_IMODE(st.st_mode) | mode != stat.S_IMODE(st.st_mode):
                os.chmod(path, stat.S_IMODE(st.st_mode) | mode)
        except OSError as exc:
            if log is not None:
                log.warning(f"{path}: {exc.strerror}")
    fifo = os.path.join(queue_directory, "public", "pickup")
    try:
        st = os.lstat(fifo)
        if not stat.S_ISFIFO(st.st_mode) or (me != 0 and st.st_uid != me):
            # Not a FIFO, or one left by another user (e.g. an earlier run as
            # root) that we could not open for reading: make our own.
            os.unlink(fifo)
            raise FileNotFoundError
    except FileNotFoundError:
        try:
            os.mkfifo(fifo, 0o622)
        except FileExistsError:
            pass
    try:
        os.chmod(fifo, 0o622)   # mkfifo's mode went through the umask
    except OSError:
        pass
    return fifo


def _wakeup_interval(config) -> float:
    for svc in getattr(config, "services", None) or []:
        if getattr(svc, "name", None) == "pickup":
            w = getattr(svc, "wakeup", None)
            try:
                w = float(str(w).rstrip("?"))
            except (TypeError, ValueError):
                continue
            if w > 0:
                return w
    return WAKEUP_DEFAULT


def serve(config, *, log=None, wakeup: float | None = None) -> None:
    """The pickup service: call in a child of the master, already running as
    mail_owner.  Scans at start, on every byte written into public/pickup and
    every ``wakeup`` seconds (master.cf's wakeup field, 60 by default).
    Returns after SIGTERM, once the file in progress is queued."""
    extra = {}
    if log is None:
        from ..log import MailLog
        log = MailLog.from_config(config, "pickup")
        # cleanup's and the bounce daemon's lines under their own names, as in Postfix.
        extra = {"cleanup_log": MailLog.from_config(config, "cleanup"),
                 "bounce_log": MailLog.from_config(config, "bounce")}
    interval = wakeup if wakeup is not None else _wakeup_interval(config)
    pickup = Pickup(config, log, **extra)
    fifo = prepare_public(pickup.store.queue_directory, log)
    # O_RDWR: the FIFO never reports EOF while no sendmail has it open (Linux).
    ffd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stopping = []

    def on_term(signum, frame):
        stopping.append(signum)

    old_term = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, on_term)
    old_fd = signal.set_wakeup_fd(wake_w)
    poller = select.poll()
    poller.register(ffd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    try:
        while not stopping:
            try:
                pickup.run_once(should_stop=lambda: bool(stopping))
            except Exception as exc:   # one bad pass must not kill the service
                log.warning(f"pickup scan failed: {exc!r}")
            if stopping:
                break
            try:
                events = poller.poll(interval * 1000)
            except InterruptedError:
                events = []
            for fd, _ev in events:
                drain(fd)
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        for fd in (ffd, wake_r, wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
