"""postqueue(1) and mailq(1): list the queue, flush it, schedule one message.

Usage: postqueue [-v] [-c config_dir] -p | -j | -f | -i queue_id | -s site

The listing: root and $mail_owner (anyone who can read the queue
directories) read the queue directly; any other user asks the showq service
(postwell.showq, a master child running as $mail_owner on
``public/showq``), as Postfix's postqueue does.  When showq cannot be reached
the user gets Postfix's "Queue report unavailable - mail system is down"
(exit 69).  The output matches Postfix 3.7's ``postqueue -p`` and ``-j``
(checked side by side in tests/test_issue3_reference.py) and is written in
chunks of ``CHUNK`` messages, so a long queue never sits in memory.  Messages
still in the maildrop are listed under their file name, which ``postcat -q``
accepts.

``-i`` and ``-s`` do what Postfix's flush(8) does for them: the deferred
file's retry time becomes now, it moves back to incoming/ and the qmgr is
woken.  ``-s`` honours fast_flush_domains and finds the site's messages by
scanning deferred/ (Postfix keeps per-site logs instead).
"""

from __future__ import annotations

import errno
import getopt
import os
import sys
import time

# postwell.pickup (and through it cleanup, dsn, qmgr) loads only for -f: the
# listing must not pay for the submission machinery.
from postwell.queue import QMGR_FLUSH, CorruptQueueFile, QueueFileNotFound, QueueStore, notify_qmgr
# The queue scan is shared with the showq service (which runs it as $mail_owner).
from postwell.showq import SHOW_QUEUES, collect, collect_maildrop  # noqa: F401 (re-exported)


PROG = "postqueue"
STATUS_CHAR = {"active": "*", "hold": "!"}
HEADER = "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"


# Postfix's postqueue exits EX_UNAVAILABLE on every fatal error, usage included.
EX_UNAVAILABLE = 69
USAGE = "usage: postqueue -f | postqueue -i queueid | postqueue -j | postqueue -p | postqueue -s site"


def _fatal(text: str, code: int = EX_UNAVAILABLE) -> int:
    sys.stderr.write(f"{PROG}: fatal: {text}\n")
    return code


def _warn(text: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {text}\n")


def _errno_text(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _showq_probe(path: str) -> OSError | None:
    """None when the showq service answers a connect, else why not (Postfix's %m)."""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
    except OSError as exc:
        return exc
    finally:
        s.close()
    return None


def _trigger(store: QueueStore, service: str, request: bytes) -> bool:
    """Postfix's mail_trigger(): False (after its warning) when nobody listens."""
    rel = f"public/{service}"
    path = os.path.join(store.queue_directory, "public", service)
    try:
        os.stat(path)
    except OSError as exc:
        _warn(f"unable to look up {rel}: {_errno_text(exc)}")
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except PermissionError:
        # A user who may not write the trigger (postwell has no set-gid
        # postqueue): the system is up; the qmgr's own queue scan follows.
        return True
    except OSError:
        return False          # ENXIO: a FIFO without a reader - the service is down
    try:
        os.write(fd, request)
    except BlockingIOError:
        pass                  # FIFO full: the reader is awake anyway
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _flush_service_up(store: QueueStore) -> bool:
    """postwell has no flush(8) daemon: -i/-s work when the qmgr listens.

    When it does not, say what Postfix's postqueue says when it cannot reach
    its flush service.
    """
    path = os.path.join(store.queue_directory, "public", "qmgr")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.EACCES:
            return True       # there, but not for this user: the access check below says so
        if exc.errno == errno.ENXIO:
            exc = ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        _warn(f"connect to public/flush: {_errno_text(exc)}")
        return False
    os.close(fd)
    return True


# The listing is handed to the writer in chunks of about this many messages:
# big writes, and never more than a chunk in memory.
CHUNK = 512
_STAMP_CACHE = 4096   # arrival seconds remembered (messages often share one)


def _reason_line(reason: str) -> str:
    # Right-aligned to column 78, padded by the reason's length in bytes
    # (Postfix's strlen()), never cut.
    width = len(reason.encode("utf-8", "surrogateescape"))
    return " " * max(0, 76 - width) + "(" + reason + ")\n"


def format_listing(messages) -> str:
    return "".join(iter_listing(messages))


def iter_listing(messages, chunk: int = CHUNK):
    """``postqueue -p`` text, a chunk of messages at a time."""
    count = 0
    total = 0
    buf: list[str] = []
    add = buf.append
    stamps: dict[int, str] = {}
    strftime, localtime = time.strftime, time.localtime
    for m in messages:
        if not count:
            add(HEADER + "\n")
        count += 1
        size = m["message_size"]
        total += size
        t = m["arrival_time"]
        stamp = stamps.get(t)
        if stamp is None:
            if len(stamps) >= _STAMP_CACHE:
                stamps.clear()
            stamp = stamps[t] = f"{strftime('%a %b %d %H:%M:%S', localtime(t)):<20}"
        # Postfix 3.7 glues the status mark to the id and pads the pair to 11
        # columns (checked against its postqueue): "ID!     306", "ID      306".
        # A force-expired message (postsuper -e) gets a "#" after that mark.
        id_mark = m["queue_id"] + STATUS_CHAR.get(m["queue_name"], "") + ("#" if m.get("forced_expire") else "")
        add(f"{id_mark:<11}{size:>8} {stamp} {m['sender']}\n")
        # Postfix's showq_compat.c: the recipients in showq's order; a
        # "(reason)" line whenever a recipient's delay reason differs from the
        # one before it, "(reason unavailable)" for a recipient without one
        # after one with a reason.
        shown = ""
        for r in m["recipients"]:
            reason = r.get("delay_reason") or ""
            if reason != shown:
                shown = reason
                add(_reason_line(reason or "reason unavailable"))
            add(f"{'':41}{r['address']}\n")
        add("\n")
        if count % chunk == 0:
            yield "".join(buf)
            buf.clear()
    if not count:
        yield "Mail queue is empty\n"
    else:
        add(f"-- {total // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}.\n")
        yield "".join(buf)


def format_json(messages) -> str:
    return "".join(iter_json(messages))


def iter_json(messages, chunk: int = CHUNK):
    import json
    buf: list[str] = []
    dumps = json.dumps
    for m in messages:
        buf.append(dumps(m) + "\n")
        if len(buf) >= chunk:
            yield "".join(buf)
            buf.clear()
    if buf:
        yield "".join(buf)


def can_read_queue(cfg, store: QueueStore) -> bool:
    """Root, $mail_owner, or whoever can read the queue directories (the
    master run by an ordinary user for a demo) reads the queue itself."""
    euid = os.geteuid()
    if euid == 0:
        return True
    try:
        import pwd
        if pwd.getpwnam(cfg.get("mail_owner")).pw_uid == euid:
            return True
    except KeyError:
        pass
    return all(os.access(store.path(q), os.R_OK | os.X_OK)
               for q in ("incoming", "active", "deferred", "hold"))


def show_queue(cfg, store: QueueStore, mode: str, out=None) -> int:
    """postqueue -p / -j: write the listing; 0, or 69 when it is unavailable."""
    out = out or sys.stdout
    render = iter_listing if mode == "p" else iter_json
    if can_read_queue(cfg, store):
        if os.geteuid() == 0:
            # Postfix's root postqueue asks showq first and warns when it has
            # to read the queue itself because the mail system is down.
            from postwell import showq
            path = showq.socket_path(cfg)
            why = _showq_probe(path)
            if why is not None:
                _warn("Mail system is down -- accessing queue directly (Connect to the "
                      f"{cfg.get('mail_name') or 'Postfix'} {os.path.basename(path)} "
                      f"service: {_errno_text(why)})")
        messages = collect(store)
    else:
        from postwell import showq
        path = showq.socket_path(cfg)
        messages = showq.query(store.queue_directory, path=path)
        try:
            first = next(messages, None)
        except showq.ShowqUnavailable as exc:
            # Postfix's words and exit status (EX_UNAVAILABLE).
            return _fatal("Queue report unavailable - mail system is down "
                          f"(Connect to the {cfg.get('mail_name') or 'Postfix'} "
                          f"{os.path.basename(path)} service: {exc})", 69)
        except showq.ShowqRefused as exc:
            if exc.denied:
                return _fatal(str(exc), 77)   # EX_NOPERM
            return _fatal(f"Queue report unavailable - {exc}", 69)

        def chained(first=first, rest=messages):
            if first is not None:
                yield first
                yield from rest
        messages = chained()
    try:
        for chunk in render(messages):
            out.write(chunk)
    except PermissionError as exc:
        return _fatal(f"Queue report unavailable - cannot read {exc.filename or store.queue_directory}: "
                      "Permission denied", 69)
    except Exception as exc:
        from postwell import showq
        if isinstance(exc, (showq.ShowqRefused, showq.ShowqUnavailable)):
            out.flush()
            return _fatal(f"Queue report unavailable - {exc}", 69)
        raise
    return 0


def schedule(store: QueueStore, queue_id: str, now: float | None = None) -> bool:
    """postqueue -i: make a deferred message eligible for delivery now.

    As Postfix's flush(8) does: the retry time becomes now and the file goes
    back to incoming/, which the qmgr scans on every wake-up.
    """
    if store.find(queue_id) != "deferred":
        return False
    try:
        store.set_next_attempt(queue_id, time.time() if now is None else now)
        store.move(queue_id, "deferred", "incoming")
    except FileNotFoundError:
        return False
    return True


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


def site_matches(domain: str, site: str) -> bool:
    """A recipient domain belongs to ``site`` (a domain; its subdomains too)."""
    site = site.lower().rstrip(".")
    return bool(domain) and (domain == site or domain.endswith("." + site))


def flush_site(store: QueueStore, site: str) -> list[str]:
    """postqueue -s: schedule every deferred message with a pending recipient at ``site``.

    Postfix keeps per-site logs of deferred ids for this (fast flush); postwell
    scans the deferred queue instead, which finds the same messages.
    """
    scheduled = []
    for qid in store.scan("deferred"):
        try:
            with store.open(qid, "deferred", writable=False) as qm:
                wanted = any(site_matches(_domain(r.address), site) for r in qm.pending_recipients)
        except (QueueFileNotFound, CorruptQueueFile, OSError):
            continue
        if wanted and schedule(store, qid):
            scheduled.append(qid)
    return scheduled


def flush_allowed(cfg, site: str) -> bool:
    """fast_flush_domains (default $relay_domains) says which sites may be flushed."""
    from postwell.policy.matchlist import DomainList
    try:
        return DomainList("fast_flush_domains", cfg.get("fast_flush_domains"), cfg).match(site)
    except Exception:
        return False


def _load_store(config_dir):
    from postwell.config import load_config
    # Postfix's postqueue reads main.cf only: a broken master.cf does not stop it.
    cfg = load_config(config_dir, read_master=False)
    return cfg, QueueStore(cfg.get("queue_directory"))


def _getopt_error(exc: getopt.GetoptError) -> int:
    # glibc getopt's words, then Postfix's usage line.
    if "requires argument" in exc.msg:
        sys.stderr.write(f"{PROG}: option requires an argument -- '{exc.opt}'\n")
    else:
        sys.stderr.write(f"{PROG}: invalid option -- '{exc.opt}'\n")
    return _fatal(USAGE)


def _valid_site(site: str) -> bool:
    # Postfix's flush_send_site() wants a domain name or an address literal.
    from postwell.policy.resolve import valid_hostliteral, valid_hostname
    return valid_hostname(site) or valid_hostliteral(site)


def _valid_queue_id(qid: str) -> bool:
    # Postfix's mail_queue_id_ok(): letters, digits and "_", at most 255.
    return 0 < len(qid) <= 255 and qid.isascii() and all(c.isalnum() or c == "_" for c in qid)


def _shorten(text: str) -> tuple[str, str]:
    return (text[:100], "..." if len(text) > 100 else "")


def main(argv: list[str] | None = None, *, mailq: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "c:fi:jps:v")
    except getopt.GetoptError as exc:
        return _getopt_error(exc)
    config_dir = os.environ.get("MAIL_CONFIG")
    mode = "p" if mailq else None
    arg = None
    for o, v in opts:
        if o == "-c":
            config_dir = v
        elif o in ("-p", "-j", "-f", "-i", "-s"):
            # Postfix: exactly one mode option.
            if mode is not None and not mailq:
                return _fatal(USAGE)
            mode, arg = o[1], (v if o in ("-i", "-s") else None)
    if args or mode is None:
        return _fatal(USAGE)
    try:
        cfg, store = _load_store(config_dir)
    except Exception as exc:
        return _fatal(str(exc))
    if not os.path.isdir(store.queue_directory):
        return _fatal(f"chdir {store.queue_directory}: No such file or directory")
    if mode in ("p", "j"):
        code = show_queue(cfg, store, mode)
        if code:
            return code
    elif mode == "f":
        # Postfix's mail_flush_deferred() then mail_flush_maildrop().
        if not _trigger(store, "qmgr", QMGR_FLUSH):
            return _fatal("Cannot flush mail queue - mail system is down")
        # The pickup wake-up is best effort: with the qmgr up the system is
        # up, and pickup also scans the maildrop on its own timer.
        from postwell.pickup import poke_pickup
        poke_pickup(store.queue_directory)
    elif mode == "s" and not _valid_site(arg):
        return _fatal('Cannot flush mail queue - invalid destination: "%s%s"' % _shorten(arg))
    elif mode == "i" and not _valid_queue_id(arg):
        return _fatal('Cannot flush queue ID - invalid name: "%s%s"' % _shorten(arg))
    elif mode == "s" and not flush_allowed(cfg, arg):
        # Postfix's flush client refuses before it connects.
        return _fatal(f'Flush service is not configured for destination "{arg}"')
    elif not _flush_service_up(store):
        return _fatal("Cannot flush mail queue - mail system is down")
    elif not os.access(store.path("deferred"), os.R_OK | os.W_OK | os.X_OK):
        # Scheduling moves queue files: only root and $mail_owner can (no flush daemon).
        return _fatal(f"Cannot flush mail queue - cannot access {store.path('deferred')}: "
                      "Permission denied (run as root or $mail_owner)")
    elif mode == "i":
        # Unknown ids are silently ignored, as in Postfix.
        if schedule(store, arg):
            notify_qmgr(store.queue_directory)
    elif mode == "s":
        if flush_site(store, arg):
            notify_qmgr(store.queue_directory)
    sys.stdout.flush()
    return 0


def mailq_main(argv: list[str] | None = None) -> int:
    """The mailq command is Postfix's sendmail under another name (sendmail
    options, -C config; "mailq: fatal: ..." words); called with an explicit
    argv it is the postqueue -p listing, as the in-process callers expect."""
    if argv is None:
        from postwell.cli import sendmail
        return sendmail.main(prog="mailq")
    return main(argv, mailq=True)


if __name__ == "__main__":
    sys.exit(main())
