"""postsuper(1): queue maintenance (delete, expire, hold, release, requeue,
purge, structure check).

Usage: postsuper [-psSv] [-c config_dir] [-d queue_id] [-e queue_id] [-f queue_id]
                 [-h queue_id] [-H queue_id] [-r queue_id] [queue...]

``queue_id`` may be ``ALL`` or ``-`` (ids read from standard input, one per
line).  Messages and log lines are worded as Postfix's; per-message lines
are printed only for ids named explicitly, the totals always.

``-e`` / ``-f`` (forced expiry, Postfix 3.5+) set the expiry mark described
in postwell/qmgr/expire.py (the queue file's group-execute bit, as Postfix)
and log ``ID: expired``; a message already marked is not counted again.  A
deferred message is moved to incoming/ at once (postwell's difference: Postfix
leaves it for the next deferred-queue run) so the qmgr returns it to the
sender now; ``-f`` also releases a held message the same way
(``ID: released from hold``), while ``-e`` leaves it held.  Totals:
``Force-expired: N messages`` (and ``Released from hold: N messages`` for -f).

``-r`` moves the queue file into maildrop/ and pokes pickup, which sends it
through cleanup again under a new queue id (``NEWID: uid=... orig_id=OLDID``),
as Postfix's requeue does: current rewriting, virtual aliases, header/body
checks and content_filter apply.
"""

from __future__ import annotations

import getopt
import os
import sys

import time

from postwell.queue import QueueStore, is_queue_id, notify_qmgr

PROG = "postsuper"
USAGE = ("usage: postsuper [-c config_dir] [-d queue_id (delete)] [-e queue_id (expire)] "
         "[-f queue_id (expire and/or un-hold)] [-h queue_id (hold)] [-H queue_id (un-hold)] "
         "[-p (purge temporary files)] [-r queue_id (requeue)] [-s (structure fix)] "
         "[-S (redundant structure fix)][-v (verbose)] [queue...]")

# Postfix's default queues per operation.
DEFAULT_QUEUES = {
    "d": ("hold", "incoming", "active", "deferred"),
    "e": ("hold", "incoming", "active", "deferred"),
    "f": ("hold", "incoming", "active", "deferred"),
    "h": ("incoming", "active", "deferred"),
    "H": ("hold",),
    "r": ("hold", "incoming", "active", "deferred"),
}
# The order operations run in, and the words of their per-message and total lines.
# Postfix 3.7 (checked with "-r A -e B -h C -H D"): requeue, expire, hold,
# release, and the totals in that order too.
OPERATIONS = (
    ("d", "removed", "Deleted"),
    ("r", "requeued", "Requeued"),
    ("e", "expired", "Force-expired"),
    ("f", "expired", "Force-expired"),
    ("h", "placed on hold", "Placed on hold"),
    ("H", "released from hold", "Released from hold"),
)
SUMMARY_ORDER = ("d", "r", "e", "h", "H")


class Reporter:
    def __init__(self, log):
        self.log = log

    def say(self, text: str) -> None:
        sys.stderr.write(f"{PROG}: {text}\n")
        if self.log is not None:
            self.log.info(text)

    def warn(self, text: str) -> None:
        sys.stderr.write(f"{PROG}: warning: {text}\n")
        if self.log is not None:
            self.log.warning(text)


def _plural(n: int) -> str:
    return f"{n} message{'' if n == 1 else 's'}"


def _apply(store: QueueStore, op: str, qid: str, src: str) -> bool:
    """One operation on one message in queue ``src``; False when it was not there."""
    try:
        if op == "d":
            return store.remove(qid, src)
        if op == "h":
            if src == "hold":
                return False
            store.move(qid, src, "hold")
            return True
        if op == "H":
            # Released mail goes to deferred, where the qmgr finds it at once
            # (its retry time is not moved into the future).
            _unmark_hold(store, qid, "hold")
            store.move(qid, "hold", "deferred")
            return True
        if op == "r":
            # Postfix's requeue: the queue file goes to maildrop/, where pickup sends
            # it through cleanup again (a new queue id; rewriting, virtual aliases,
            # header/body checks and content_filter as they are configured now).
            # The file keeps its owner (the mail owner) and mode, which is how
            # pickup tells it from a user's submission.  Its defer log stays, as
            # Postfix's does (checked against 3.7): mailq shows the delay reasons
            # while the file waits in maildrop/.
            store.move(qid, src, "maildrop")
            return True
    except FileNotFoundError:
        return False
    return False


def _requeue_time(store: QueueStore, qid: str) -> None:
    """Postfix's requeue_one() dates a file requeued by name now (pickup's
    Received: line shows it); "-r ALL" leaves the time stamps alone."""
    try:
        os.utime(store.path("maildrop", qid))
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):    # pickup may have taken it already
            sys.stderr.write(f"{PROG}: warning: {store.path('maildrop', qid)}: "
                             f"reset time stamps: {exc.strerror}\n")


def _unmark_hold(store: QueueStore, qid: str, src: str) -> None:
    """A message leaving hold/ loses cleanup's hold mark (else the qmgr would hold
    it again when it meets it in incoming/)."""
    try:
        qm = store.open(qid, src)
    except Exception:  # noqa: BLE001 - gone or unreadable: the move reports it
        return
    try:
        qm.release_hold_mark()
    except OSError:
        pass
    finally:
        qm.close()


def _to_incoming(store: QueueStore, qid: str, src: str) -> None:
    """Hand an expired message to the qmgr now (its next incoming/ scan)."""
    if src == "hold":
        _unmark_hold(store, qid, src)
    if src in ("deferred", "hold"):
        try:
            store.set_next_attempt(qid, time.time(), src)
        except OSError:
            pass
        store.move(qid, src, "incoming")


def _expire(store: QueueStore, op: str, qid: str, src: str, say) -> tuple[int, int]:
    """-e / -f on one message: (newly expired, released from hold) counts."""
    from postwell.qmgr.expire import mark_expired, path_expired
    path = store.path(src, qid)
    expired = released = 0
    try:
        if not path_expired(path):
            mark_expired(path)
            expired = 1
            say(f"{qid}: expired")
        if src == "deferred":
            _to_incoming(store, qid, src)
        elif src == "hold" and op == "f":
            _to_incoming(store, qid, src)
            released = 1
            say(f"{qid}: released from hold")
    except FileNotFoundError:
        pass   # left that queue meanwhile (delivered, or the qmgr took it)
    except OSError as exc:
        say(f"warning: expire file {src}/{qid}: cannot set permission: {exc.strerror or exc}")
    return expired, released


def run_operation(store: QueueStore, op: str, ids: list[str], queues, report: Reporter,
                  extra: dict | None = None) -> int:
    """Apply ``op`` to ``ids``; returns the count for its total line.  For
    -f, messages released from hold are added to ``extra["H"]``."""
    done = 0
    verb = next(v for o, v, _ in OPERATIONS if o == op)
    expiring = op in ("e", "f")

    def one(t, q, say):
        nonlocal done
        if expiring:
            e, r = _expire(store, op, t, q, say)
            done += e
            if extra is not None:
                extra["H"] = extra.get("H", 0) + r
            return True   # found: never look for the id in the next queue too
        if _apply(store, op, t, q):
            done += 1
            if op == "r" and say is loud:
                _requeue_time(store, t)
            say(f"{t}: {verb}")
            return True
        return False

    def quiet(text):
        # ALL: only the totals (and warnings) are printed.
        if text.startswith("warning: "):
            report.warn(text[len("warning: "):])

    def loud(text):
        if text.startswith("warning: "):
            report.warn(text[len("warning: "):])
        else:
            report.say(text)

    for qid in ids:
        if qid == "ALL":
            for q in queues:
                for t in store.scan(q):
                    one(t, q, quiet)
            continue
        if not _queue_id_ok(qid):
            # Postfix's printable(): anything unprintable shows as "?".
            shown = "".join(c if " " <= c <= "~" else "?" for c in qid)
            report.warn(f"invalid mail queue id: {shown}")
            continue
        for q in queues:
            if os.path.lexists(store.path(q, qid)) and one(qid, q, loud):
                break
    return done


def purge_temporary(store: QueueStore, report: Reporter) -> int:
    removed = store.purge_stale()
    if removed:
        report.say(f"Deleted: {len(removed)} file{'' if len(removed) == 1 else 's'}")
    return len(removed)


def structure_check(store: QueueStore, report: Reporter, uid=None, gid=None) -> None:
    """-s: create missing queue directories; move misplaced or misnamed files aside."""
    store.ensure_layout(uid, gid)
    for q in ("incoming", "active", "deferred", "hold"):
        try:
            names = os.listdir(store.path(q))
        except FileNotFoundError:
            continue
        for name in names:
            if is_queue_id(name) or name.startswith("tmp."):
                continue
            path = store.path(q, name)
            if os.path.isfile(path):
                report.warn(f"{q}/{name}: not a queue file name; moved to corrupt")
                try:
                    os.rename(path, store.path("corrupt", name))
                except OSError:
                    pass


def _delete_maildrop(store: QueueStore, ids: list[str], report: Reporter) -> int:
    """postsuper -d ... maildrop: remove submitted files pickup has not taken yet."""
    drop = store.path("maildrop")
    done = 0
    for qid in ids:
        if qid == "ALL":
            try:
                names = sorted(n for n in os.listdir(drop) if _queue_id_ok(n))
            except OSError:
                names = []
            for name in names:
                try:
                    os.unlink(os.path.join(drop, name))
                    done += 1
                except FileNotFoundError:
                    pass          # pickup took it meanwhile
            continue
        if not _queue_id_ok(qid):
            continue          # warned about by run_operation already
        from postwell.pickup.maildrop import names_for_id
        for name in names_for_id(drop, qid):    # the file name, or the id mailq lists
            try:
                os.unlink(os.path.join(drop, name))
            except FileNotFoundError:
                continue
            done += 1
            report.say(f"{qid}: removed")
    return done


def _queue_id_ok(qid: str) -> bool:
    """Postfix's mail_queue_id_ok(): letters, digits and "_", at most 255.

    Anything else is warned about; a well-formed id that names no message
    is skipped silently, as in Postfix.  Never a path separator or a dot.
    """
    return 0 < len(qid) <= 255 and qid.isascii() and all(c.isalnum() or c == "_" for c in qid)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, queues = getopt.getopt(argv, "c:d:e:f:h:H:pr:sSv")
    except getopt.GetoptError as exc:
        # glibc getopt's two messages.
        if "requires argument" in exc.msg:
            sys.stderr.write(f"{PROG}: option requires an argument -- '{exc.opt}'\n")
        else:
            sys.stderr.write(f"{PROG}: invalid option -- '{exc.opt}'\n")
        sys.stderr.write(f"{PROG}: fatal: {USAGE}\n")
        return 1
    config_dir = os.environ.get("MAIL_CONFIG")
    wanted: dict[str, list[str]] = {}
    purge = fix = False
    for o, v in opts:
        if o == "-c":
            config_dir = v
        elif o in ("-d", "-e", "-f", "-h", "-H", "-r"):
            wanted.setdefault(o[1], []).append(v)
        elif o == "-p":
            purge = True
        elif o in ("-s", "-S"):
            fix = True
    if config_dir and not os.path.isabs(config_dir):
        sys.stderr.write(f"{PROG}: fatal: -c requires absolute pathname\n")
        return 1
    from postwell.config import load_config
    try:
        cfg = load_config(config_dir, read_master=False)     # main.cf only, as Postfix
    except Exception as exc:
        sys.stderr.write(f"{PROG}: fatal: {exc}\n")
        return 1
    store = QueueStore(cfg.get("queue_directory"))
    if not os.path.isdir(store.queue_directory):
        sys.stderr.write(f"{PROG}: fatal: chdir {store.queue_directory}: No such file or directory\n")
        return 1
    for q in queues:
        if q not in ("hold", "incoming", "active", "deferred", "maildrop"):
            sys.stderr.write(f"{PROG}: fatal: invalid directory name: {q}\n")
            return 1
    log = None
    try:
        from postwell.log import MailLog
        log = MailLog.from_config(cfg, "postsuper")
    except Exception:
        log = None
    report = Reporter(log)
    if not wanted and not purge and not fix:
        purge = fix = True      # postsuper without options: structure check and purge
    if fix:
        structure_check(store, report)
    if purge:
        purge_temporary(store, report)
    counts: dict[str, int] = {}
    released: dict[str, int] = {}
    for op, _verb, _total in OPERATIONS:
        if op not in wanted:
            continue
        ids: list[str] = []
        for v in wanted[op]:
            if v == "-":
                # Postfix takes each line as it is (only the newline goes):
                # blanks and spaces make an id it warns about.
                ids.extend(line[:-1] if line.endswith("\n") else line for line in sys.stdin)
            else:
                ids.append(v)
        qs = [q for q in (queues or DEFAULT_QUEUES[op]) if q != "maildrop"]
        n = run_operation(store, op, ids, qs, report, released)
        if op == "d" and (not queues or "maildrop" in queues):
            # Postfix's default queue list for -d starts with maildrop (its
            # man page says otherwise): "-d ALL" and "-d ID" both reach
            # submitted files pickup has not taken yet; the other operations
            # do not apply to them.
            n += _delete_maildrop(store, ids, report)
        if op == "f":
            # -f counts under -e's total; its releases under -H's.
            counts["e"] = counts.get("e", 0) + n
            counts["H"] = counts.get("H", 0) + released.pop("H", 0)
        else:
            counts[op] = counts.get(op, 0) + n
    for op in SUMMARY_ORDER:
        if op in counts:
            total = next(t for o, _v, t in OPERATIONS if o == op)
            report.say(f"{total}: {_plural(counts[op])}")
    if counts.get("H") or "e" in counts:
        notify_qmgr(store.queue_directory)
    if counts.get("r"):
        # Requeued mail moves now rather than at pickup's next periodic scan.
        from postwell.pickup import poke_pickup
        poke_pickup(store.queue_directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
