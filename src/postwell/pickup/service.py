"""pickup(8): move complete maildrop files through cleanup into the queue, and
queue files that ``postsuper -r`` put into maildrop/ (Postfix's requeue: a new
queue id, through cleanup again)."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import select
import signal
import stat
import time
from typing import Callable

from ..cleanup import Cleanup
from ..cleanup.addresses import ADDRESS_HEADERS, rewrite_header
from ..cleanup.headers import ContentProcessor, ContentStop, MessageChecks
from ..cleanup.service import _quote_local, mail_date
from ..cleanup.virtual import AliasExpansionError, AliasLookupError
# Postfix's mail_date() (day padded with a space) for pickup's own Received: line.
from ..dsn.notice import mail_date as received_date
from ..dsn.notice import FAILURE, DsnRecipient, render_notice
from ..dsn.orcpt import implied_orcpt
from ..dsn.submit import is_double_bounce, post_mail_received, wants
from ..fdutil import drain
from ..policy.restrictions import log_address
from ..qmgr.logfmt import format_delay
from ..queue import QueueStore, fsync_dir, is_queue_id
from .acl import submit_denied  # noqa: F401 (pickup.submit_denied, as before)
from .maildrop import (
    MAX_ENVELOPE, NAME_RE, TMP_PREFIX, MaildropEnvelope, MaildropFile, MaildropFormatError,
    read_maildrop,
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


class _ReplayChecks(MessageChecks):
    """header_checks as cleanup applied them to a message it then refused: the
    same actions up to the REJECT, after which nothing more is checked and the
    rejected header itself stays as written (Postfix cleanup_act turns its
    filters off and goes on writing).  Logs nothing: cleanup logged already."""

    def _act(self, v, raw, out, header_map):
        if v.action in ("reject", "discard"):
            self.filtering = False
            return raw
        return super()._act(v, raw, out, header_map)

    def body_scanner(self, *args, **kwargs):
        return None


# Envelope attributes a requeued message does not keep: cleanup works them out
# again (size, content_filter, HOLD, REDIRECT come from this pass's checks).
_NOT_REQUEUED = frozenset({"postwell_size", "postwell_filter", "postwell_hold", "postwell_redirect",
                           "postwell_smtputf8", "postwell_fullname"})


class _RequeuedFile:
    """A requeued queue file seen as a maildrop file (what _bounce reads)."""

    def __init__(self, qm, envelope: MaildropEnvelope):
        self.qm = qm
        self.envelope = envelope

    def iter_content(self):
        return self.qm.iter_content()


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
            if not NAME_RE.match(name) and is_queue_id(name):
                # A queue file that postsuper -r handed back (Postfix's requeue).
                if self.process_requeued(name) == DONE:
                    queued += 1
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

    # -- a requeued queue file (postsuper -r) ------------------------------------------
    def process_requeued(self, name: str) -> str:
        """Send a queue file that ``postsuper -r`` moved into maildrop/ through
        cleanup again, as Postfix's pickup does: a new queue id, logged as
        ``NEWID: uid=UID from=<sender> orig_id=OLDID``; address rewriting, virtual
        alias expansion, header/body checks and content_filter as for new local
        mail; the message keeps its arrival time, client attributes and original
        recipients; recipients already done are not sent again.  Only a file of
        the mail owner (or of this process) that others cannot read qualifies:
        a user who drops a look-alike file into the world-writable maildrop/ gets
        it set aside, never queued under the mail system's identity."""
        path = os.path.join(self.maildrop, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return KEEP
        except OSError as exc:
            self.log.warning(f"open input file maildrop/{name}: {exc.strerror}")
            return KEEP
        trusted = st.st_uid in (self.owner_uid, os.geteuid())
        if (not stat.S_ISREG(st.st_mode) or not trusted or st.st_mode & stat.S_IROTH
                or st.st_nlink != 1):
            self.log.warning(f"maildrop/{name}: unexpected file name")
            self._move_aside(name)
            return CORRUPT
        try:
            qm = self.store.open(name, "maildrop", writable=False)
        except FileNotFoundError:
            return KEEP
        except Exception as exc:   # noqa: BLE001 - damaged: kept for the postmaster
            return self._corrupt(name, st.st_uid, f"malformed queue file: {exc}")
        try:
            return self._requeue(name, st, qm)
        finally:
            qm.close()

    def _requeue(self, name: str, st, qm) -> str:
        attrs = dict(qm.attributes)
        pending = [r for r in qm.recipients if not r.done]
        env = MaildropEnvelope(
            sender=qm.sender, recipients=[r.address for r in pending],
            rcpt_notify={i: r.notify for i, r in enumerate(pending) if r.notify},
            rcpt_orcpt={i: r.orcpt for i, r in enumerate(pending) if r.orcpt},
            ret=qm.ret, envid=qm.envid, body=qm.body_type,
            rewrite="remote" if attrs.get("rewrite_context") == "remote" else "local")
        source = _RequeuedFile(qm, env)
        if not pending:
            # Nothing left to deliver: the file has done its job.
            self._remove(name, name)
            return DONE
        now = self.clock()
        when = min(st.st_mtime, now)    # a deferred file's mtime is its next retry time

        def fill(cs, qid: str) -> None:
            self.log.info(f"{qid}: uid={st.st_uid} from=<{log_address(qm.sender)}> orig_id={name}")
            cs.set_sender(qm.sender, ret=qm.ret, envid=qm.envid, smtputf8=qm.smtputf8,
                          body_type=qm.body_type)
            self._set_arrival(cs, qm.arrival_time)
            for key, value in attrs.items():
                if key not in _NOT_REQUEUED:
                    cs.set_attribute(key, value)
            cs.set_fullname(attrs.get("postwell_fullname"))
            for r in pending:
                # A file written before every recipient got its ORCPT record means
                # "rfc822;" + the original recipient by a missing one; cleanup would
                # derive one from the final address instead.
                cs.add_recipient(r.address, orig=r.orig, orcpt=implied_orcpt(r.orcpt, r.orig),
                                 notify=r.notify)
            self._received(cs, qid, st.st_uid, when)
            for chunk in qm.iter_content():
                cs.write(chunk)

        return self._through_cleanup(
            name, st.st_uid, env.rewrite, fill,
            lambda cs, reply: self._bounce(name, st.st_uid, source, cs, reply, qm.arrival_time,
                                           received_at=when))

    def _through_cleanup(self, name: str, uid: int, rewrite: str,
                         fill: Callable[[object, str], None],
                         bounce: Callable[[object, object], str]) -> str:
        """One pass through cleanup: ``fill(cs, qid)`` sends the envelope and the
        content, a refusal goes to ``bounce(cs, reply)``, and the maildrop file
        is removed only once cleanup's commit is durable."""
        try:
            cs = self.cleanup.open(rewrite_local=rewrite == "local", content_checks=True)
            cs.autodetect_utf8 = self.cleanup.autodetect_sendmail
        except Exception as exc:   # queue file create error: disk full, permissions
            self.log.warning(f"maildrop/{name}: cannot create queue file: {exc}")
            return KEEP
        qid = cs.queue_id
        try:
            fill(cs, qid)
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
                return bounce(cs, reply)
            self.log.warning(f"maildrop/{name}: {reply.text} -- will try again later")
            return KEEP
        # Only now is the message safe in the queue (cleanup's durable commit); the
        # commit has already woken the qmgr (public/qmgr).
        self._remove(name, qid)
        return DONE

    def _received(self, cs, qid: str, uid: int, when: float) -> None:
        # For tracing, the file's owner but not the login name (as Postfix).
        cs.prepend_header(f"Received: by {self.myhostname} ({self.mail_name}, from userid {uid})\n"
                          f"\tid {qid}; {received_date(when)}")

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
        # A file over message_size_limit (the limit was lowered after the drop) is
        # not set aside: as in Postfix, cleanup stops storing it at the limit and
        # refuses it, and the sender gets a non-delivery notice (5.3.4).
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

        def fill(cs, qid: str) -> None:
            if uid == self.owner_uid and (os.fstat(md.fd).st_mode & stat.S_IROTH) == 0:
                # Postfix's "postsuper -r" trace (mail_owner files that others cannot read).
                self.log.info(f"{qid}: uid={uid} from=<{log_address(env.sender)}> orig_id={name}")
            else:
                # The sender in external form, as Postfix 3.7 logs it (from=<"a b"@x>).
                self.log.info(f"{qid}: uid={uid} from=<{log_address(env.sender)}>")
            cs.set_sender(env.sender, ret=env.ret, envid=env.envid, body_type=env.body)
            cs.set_fullname(env.fullname)     # Postfix keeps it in the queue file (its size)
            self._set_arrival(cs, mtime)
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
            if env.verify == "user":
                # sendmail -bv: delivery agents report, the sender gets a status report.
                cs.set_attribute("postwell_verify", "user")
            if env.trace == "record":
                # sendmail -v: delivered as usual, then a report to the sender
                # (postwell.qmgr.notices TRACE_ATTRIBUTE)
                cs.set_attribute("postwell_trace", "1")
            # Recipients before the content, as Postfix's pickup sends them: the
            # checks' log lines name the latest one.
            for i, rcpt in enumerate(env.recipients):
                # A sendmail -bs recipient comes with its ORCPT as Postfix's smtpd
                # makes it, "rfc822;" + the address as typed being left out of the
                # file; given here, cleanup does not derive one from the rewritten
                # address instead.
                orcpt = env.rcpt_orcpt.get(i)
                if env.protocol:
                    cs.add_recipient(rcpt, orig=rcpt, orcpt=implied_orcpt(orcpt, rcpt),
                                     notify=env.rcpt_notify.get(i, env.notify))
                else:
                    cs.add_recipient(rcpt, orcpt=orcpt, notify=env.rcpt_notify.get(i, env.notify))
            self._received(cs, qid, uid, mtime)
            self._copy_content(md, cs, env)

        return self._through_cleanup(
            name, uid, env.rewrite, fill,
            lambda cs, reply: self._bounce(name, uid, md, cs, reply, mtime))

    # -- refused by cleanup: return to sender (Postfix's cleanup_bounce) ------------
    def _bounce(self, name: str, uid: int, md: MaildropFile, cs, reply, mtime: float,
                received_at: float | None = None) -> str:
        env = md.envelope
        qid = cs.queue_id
        clog = self.cleanup.log
        dsn, reason = bounce_reason(reply)
        try:
            headers, message_id = self._returned_headers(
                md, env, uid, qid, mtime if received_at is None else received_at, cs)
        except MaildropFormatError as exc:
            return self._corrupt(name, uid, f"malformed maildrop file: {exc.reason}")
        except OSError as exc:
            self.log.warning(f"maildrop/{name}: read error: {exc.strerror}")
            return KEEP
        if message_id and not getattr(cs, "_id_logged", False):
            # Postfix's cleanup reads the rest of the header after a REJECT when it
            # must bounce, so the message-id line follows the reject line.
            clog.info(f"{qid}: message-id={message_id}")
        try:
            targets = self._bounced_recipients(env)
        except (AliasExpansionError, AliasLookupError) as exc:
            # As cleanup does for new mail: a table that cannot answer now is no
            # reason to lose or misreport the message.
            clog.warning(f"{qid}: {exc} -- message not accepted, try again later")
            return KEEP
        now = self.clock()
        delay = format_delay(now - mtime)
        returned: list[DsnRecipient] = []
        for addr, given, notify, orcpt in targets:
            # Addresses logged in external form (info_log_address_format); the
            # original is shown when it differs other than in case (Postfix's rule).
            orig = f", orig_to=<{log_address(given)}>" if given.lower() != addr.lower() else ""
            clog.info(f"{qid}: to=<{log_address(addr)}>{orig}, relay=none, delay={delay}, "
                      f"delays={delay}/0/0/0, dsn={dsn}, status=bounced ({reason})")
            if wants(notify, "FAILURE"):   # RFC 3461 4.1
                returned.append(DsnRecipient(addr, dsn, reason, orig=given, orcpt=orcpt))
        sender = cs.sender
        if returned and sender and not is_double_bounce(self.config, sender):
            data = render_notice(self.config, kind=FAILURE, queue_id=qid, sender=sender,
                                 arrival_time=mtime, recipients=returned,
                                 original=lambda: [headers], content_size=len(headers),
                                 ret=env.ret, envid=env.envid, full=False, now=now,
                                 warn=self.bounce_log.warning)
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

    def _bounced_recipients(self, env) -> list[tuple[str, str, str | None, str]]:
        """(final address, address as given, NOTIFY, ORCPT) per recipient of a
        refused message, as cleanup had recorded them when it refused it: each
        one qualified and virtual-alias expanded, duplicates dropped by cleanup's
        key (final address, NOTIFY, the client's ORCPT).  Without an ORCPT from
        the submitter the notice's Original-Recipient is the qualified address
        before expansion (Postfix 3.7 side by side)."""
        expander = self.cleanup.expander()
        out = []
        seen: set = set()
        for i, given in enumerate(env.recipients):
            addr = self.cleanup.qualify(given or self.cleanup.empty_address_recipient)
            notify = env.rcpt_notify.get(i, env.notify)
            client_orcpt = env.rcpt_orcpt.get(i)
            finals = expander.expand(addr) if expander is not None else [addr]
            key_orcpt = client_orcpt or ""
            if len(finals) > 1 and not key_orcpt:
                key_orcpt = f"rfc822;{given}"
            for final in finals:
                key = (final, notify or "", key_orcpt)
                if key in seen:
                    continue    # cleanup's duplicate filter: one line, one report
                seen.add(key)
                out.append((final, given, notify, client_orcpt or f"rfc822;{addr}"))
        return out

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
            # As every notice Postfix's bounce daemon posts: post_mail()'s own
            # "Received: by" header first.
            ns.prepend_header(post_mail_received(self.config, ns.queue_id, data))
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
            # The message would be queued twice on the next scan: warn loudly.
            self.log.warning(f"{qid}: remove maildrop/{name}: {exc.strerror}")

    def _returned_headers(self, md: MaildropFile, env, uid: int, qid: str, mtime: float,
                          cs) -> tuple[bytes, str | None]:
        """The header block a notice returns, as cleanup had stored it when it
        refused the message (Postfix's cleanup keeps writing a rejected message and
        bounces from its queue file): Return-Path, our Received:, the message's
        headers through the same processing (address rewriting, header_size_limit,
        header_checks PREPEND/REPLACE/IGNORE up to the header that was rejected;
        none after it) and the headers cleanup adds when missing.  Replayed here
        from the maildrop file, headers only: memory stays within
        header_size_limit plus one input line."""
        c = self.cleanup
        out = bytearray()
        ids: list[str] = []
        live = getattr(cs, "checks", None)
        checks = None
        if live is not None and getattr(live, "checks", None) is not None:
            checks = _ReplayChecks(live.checks, lambda verdict: None, lambda text: None)
            checks.queue_id = qid
        sender = cs.sender
        missing = self._replay_missing(cs, qid, env, ids)
        if self._wants_fullname(env):
            missing = self._with_fullname(env, sender, missing)
        proc = ContentProcessor(out.extend, header_size_limit=c.header_size_limit,
                                hopcount_limit=c.hopcount_limit,
                                line_length_limit=c.line_length_limit,
                                on_header_end=missing,
                                on_message_id=lambda value, resent: ids.append(value),
                                header_rewriter=(lambda raw, n: rewrite_header(raw, n, c.myorigin))
                                if env.rewrite == "local" else None,
                                rewrite_names=ADDRESS_HEADERS, checks=checks)
        received = (f"Received: by {self.myhostname} ({self.mail_name}, from userid {uid})\n"
                    f"\tid {qid}; {received_date(mtime)}\n").encode("utf-8", "surrogateescape")
        try:
            proc.prepend_received(received)
            proc.begin_client_data()
            for chunk in md.iter_content():
                pos, n = 0, len(chunk)
                # Line by line, so nothing past the header block is processed.
                while pos < n and proc.in_header:
                    nl = chunk.find(b"\n", pos)
                    end = n if nl < 0 else nl + 1
                    proc.feed(chunk[pos:end])
                    pos = end
                if not proc.in_header:
                    break
            else:
                proc.finish()
        except ContentStop:
            pass        # a table failure: return what was processed
        cut = out.find(b"\n\n")
        block = bytes(out[:cut + 1]) if cut >= 0 else bytes(out)
        if block and not block.endswith(b"\n"):
            block += b"\n"
        top = f"Return-Path: <{sender}>\n".encode("utf-8", "surrogateescape")
        return top + block, (ids[0] if ids else None)

    def _replay_missing(self, cs, qid: str, env, ids: list):
        """cleanup's missing-header rule (Message-Id, Date, From, the
        undisclosed-recipients header) for the replayed header block, with the
        values cleanup gives them for this queue file."""
        c = self.cleanup

        def missing(proc) -> list[bytes]:
            if not (env.rewrite == "local" or getattr(c, "always_add_missing_headers", False)) \
                    or proc.too_many_hops:
                return []
            pre = "Resent-" if proc.resent else ""
            extra = []
            if not proc.seen(pre + "message-id"):
                stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(cs.arrival_time))
                mid = f"<{stamp}.{qid}@{c.myhostname}>"
                ids.append(mid)
                extra.append(f"{pre}Message-Id: {mid}".encode())
            if not proc.seen(pre + "date"):
                extra.append(f"{pre}Date: {mail_date(cs.arrival_time)}".encode())
            if not proc.seen(pre + "from"):
                extra.append(f"{pre}From: {_quote_local(cs.sender or 'MAILER-DAEMON')}"
                             .encode("utf-8", "surrogateescape"))
            undisclosed = getattr(c, "undisclosed_recipients_header", "")
            if undisclosed and not proc.has_destination(proc.resent):
                extra.append(undisclosed.encode("utf-8", "surrogateescape"))
            return extra
        return missing

    @staticmethod
    def _set_arrival(cs, when: float) -> None:
        """The message arrived when it was dropped: Postfix's pickup hands cleanup
        the maildrop file's time, which becomes the queue file's arrival time
        (qmgr delay=, expiry, Arrival-Date) and the Date: cleanup adds (3.7 side
        by side: a message that waited in maildrop/ is dated by its drop)."""
        msg = getattr(cs, "msg", None)
        if msg is not None and hasattr(msg, "arrival_time") and hasattr(cs, "arrival_time"):
            msg.arrival_time = when
            cs.arrival_time = when

    def _wants_fullname(self, env) -> bool:
        return bool(env.fullname and env.sender and env.rewrite == "local")

    def _with_fullname(self, env, sender: str, missing):
        """Wrap a ContentProcessor's on_header_end so the From: (or Resent-From:)
        added for a message without one carries the submitter's full name.
        Postfix's cleanup adds it there too, after Message-Id and Date (3.7 side by
        side), and only when the message has none."""
        obsolete = (self.config.get("header_from_format") or "standard").strip().lower() == "obsolete"
        named = dataclasses.replace(env, sender=sender)

        def on_header_end(proc) -> list[bytes]:
            extra = list(missing(proc)) if missing is not None else []
            for i, line in enumerate(extra):
                low = line[:12].lower()
                if low.startswith(b"from:") or low.startswith(b"resent-from:"):
                    seen = {b"resent-x"} if low.startswith(b"resent-") else set()
                    extra[i] = self._from_header(seen, named, obsolete).rstrip(b"\n")
            return extra
        return on_header_end

    def _copy_content(self, md: MaildropFile, cs, env) -> None:
        inserter = None
        proc = getattr(cs, "proc", None)
        if self._wants_fullname(env):
            if proc is not None and hasattr(proc, "on_header_end"):
                proc.on_header_end = self._with_fullname(env, cs.sender, proc.on_header_end)
            else:
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


def serve(config, *, log=None, wakeup: float | None = None, fifo_fd: int | None = None,
          max_idle: float | None = None) -> None:
    """The pickup service: call in a child of the master, already running as
    mail_owner.  Scans at start, on every byte written into public/pickup and
    every ``wakeup`` seconds (master.cf's wakeup field, 60 by default).
    Returns after SIGTERM, once the file in progress is queued.

    With ``fifo_fd`` the service runs on demand: the master keeps
    public/pickup open, watches it while no pickup runs and forks this child
    when sendmail pokes it (or when its own periodic look finds files in
    maildrop/); the child returns once neither a poke nor a queued file has
    come for ``max_idle`` seconds.  A poke that arrives as it leaves stays in
    the FIFO for the master to see."""
    extra = {}
    if log is None:
        from ..log import MailLog
        log = MailLog.from_config(config, "pickup")
        # cleanup's and the bounce daemon's lines under their own names, as in Postfix.
        extra = {"cleanup_log": MailLog.from_config(config, "cleanup"),
                 "bounce_log": MailLog.from_config(config, "bounce")}
    interval = wakeup if wakeup is not None else _wakeup_interval(config)
    pickup = Pickup(config, log, **extra)
    if fifo_fd is None:
        fifo = prepare_public(pickup.store.queue_directory, log)
        # O_RDWR: the FIFO never reports EOF while no sendmail has it open (Linux).
        ffd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    else:
        # The master's FIFO (it made it and keeps it open): not to be replaced here.
        ffd = fifo_fd
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
    last = time.monotonic()    # the last poke or queued message
    if fifo_fd is not None:
        # Started for the poke now in the FIFO: the first scan below answers
        # it, so it must not cause a second one.
        drain(ffd)
    try:
        while not stopping:
            try:
                if pickup.run_once(should_stop=lambda: bool(stopping)):
                    last = time.monotonic()
            except Exception as exc:   # one bad pass must not kill the service
                log.warning(f"pickup scan failed: {exc!r}")
            while not stopping:
                timeout = interval
                if fifo_fd is not None and max_idle is not None:
                    left = last + max_idle - time.monotonic()
                    if left <= 0:
                        # Idle: no last scan needed, the master looks into
                        # maildrop/ when we have exited and keeps the FIFO.
                        return
                    timeout = min(timeout, left)
                try:
                    events = poller.poll(timeout * 1000)
                except InterruptedError:
                    events = []
                for fd, _ev in events:
                    drain(fd)
                    if fd == ffd:
                        last = time.monotonic()
                if events or timeout >= interval:
                    break      # a poke, a signal, or the periodic wakeup: scan
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        for fd in (ffd, wake_r, wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
