"""postqueue(1) and mailq(1): list the queue, flush it, schedule one message.

Usage: postqueue [-v] [-c config_dir] -p | -j | -f | -i queue_id | -s site

The listing reads the queue directory directly (Postfix asks its showq
daemon, which postwell runs as library code); the output matches Postfix's
``postqueue -p`` and ``-j`` byte for byte in shape.
"""

from __future__ import annotations

import getopt
import json
import os
import sys
import time

from postwell.queue import QMGR_FLUSH, CorruptQueueFile, QueueFileNotFound, QueueStore, notify_qmgr

PROG = "postqueue"
# showq lists the queues in this order.
SHOW_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
STATUS_CHAR = {"active": "*", "hold": "!"}
HEADER = "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"


def _fatal(text: str, code: int = 1) -> int:
    sys.stderr.write(f"{PROG}: fatal: {text}\n")
    return code


def collect(store: QueueStore):
    """Yield one dict per queued message (the fields of ``postqueue -j``)."""
    for qname in SHOW_QUEUES:
        if qname == "maildrop":
            continue   # postwell has no pickup yet: nothing is ever left in maildrop
        for qid in store.scan(qname):
            try:
                qm = store.open(qid, qname, writable=False)
            except (QueueFileNotFound, FileNotFoundError):
                continue   # delivered or moved while we looked
            except (CorruptQueueFile, OSError):
                continue
            with qm:
                reasons: dict[str, str] = {}
                for e in store.read_defer_log(qid):
                    reasons[e.get("recipient", "")] = e.get("reason", "")
                rcpts = []
                for r in qm.pending_recipients:
                    item = {"address": r.address}
                    if r.address in reasons:
                        item["delay_reason"] = reasons[r.address]
                    rcpts.append(item)
                yield {
                    "queue_name": qname,
                    "queue_id": qid,
                    "arrival_time": int(qm.arrival_time),
                    "message_size": qm.content_size,
                    "forced_expire": False,
                    "sender": qm.sender or "MAILER-DAEMON",
                    "recipients": rcpts,
                }


def format_listing(messages) -> str:
    out: list[str] = []
    count = 0
    total = 0
    for m in messages:
        if not count:
            out.append(HEADER)
        count += 1
        total += m["message_size"]
        stamp = time.strftime("%a %b %d %H:%M:%S", time.localtime(m["arrival_time"]))
        status = STATUS_CHAR.get(m["queue_name"], " ")
        out.append(f"{m['queue_id']:<11}{status}{m['message_size']:>7} {stamp:<20} {m['sender']}")
        # Recipients grouped under their delay reason, reason-less ones first.
        rcpts = sorted(m["recipients"], key=lambda r: r.get("delay_reason", ""))
        last = None
        for r in rcpts:
            reason = r.get("delay_reason")
            if reason is not None and reason != last:
                out.append(f"{'(' + reason + ')':>78}")
            last = reason
            out.append(f"{'':41}{r['address']}")
        out.append("")
    if not count:
        return "Mail queue is empty\n"
    out.append(f"-- {total // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}.")
    return "\n".join(out) + "\n"


def format_json(messages) -> str:
    return "".join(json.dumps(m) + "\n" for m in messages)


def schedule(store: QueueStore, queue_id: str) -> bool:
    """postqueue -i: make a deferred message eligible for delivery now.

    The file goes back to incoming/, which the qmgr scans on every wake-up.
    """
    if store.find(queue_id) != "deferred":
        return False
    try:
        store.move(queue_id, "deferred", "incoming")
    except FileNotFoundError:
        return False
    return True


def _load_store(config_dir):
    from postwell.config import load_config
    cfg = load_config(config_dir)
    return cfg, QueueStore(cfg.get("queue_directory"))


def main(argv: list[str] | None = None, *, mailq: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "c:fi:jps:v")
    except getopt.GetoptError as exc:
        return _fatal(f"usage: {PROG} -[fjpv] [-c config_dir] [-i queue_id] [-s site] ({exc.msg})")
    config_dir = os.environ.get("MAIL_CONFIG")
    mode = "p" if mailq else None
    arg = None
    for o, v in opts:
        if o == "-c":
            config_dir = v
        elif o in ("-p", "-j", "-f"):
            mode = o[1]
        elif o in ("-i", "-s"):
            mode, arg = o[1], v
    if args or mode is None:
        return _fatal(f"usage: {PROG} -[fjpv] [-c config_dir] [-i queue_id] [-s site]")
    try:
        cfg, store = _load_store(config_dir)
    except Exception as exc:
        return _fatal(str(exc))
    if not os.path.isdir(store.queue_directory):
        return _fatal(f"chdir {store.queue_directory}: No such file or directory")
    if mode == "p":
        sys.stdout.write(format_listing(collect(store)))
    elif mode == "j":
        sys.stdout.write(format_json(collect(store)))
    elif mode == "f":
        notify_qmgr(store.queue_directory, QMGR_FLUSH)
    elif mode == "i":
        # Unknown ids are silently ignored, as in Postfix.
        if schedule(store, arg):
            notify_qmgr(store.queue_directory)
    elif mode == "s":
        # Per-site flush needs fast_flush_domains' logs, which postwell does not keep;
        # a whole-queue flush delivers that site's mail too.
        notify_qmgr(store.queue_directory, QMGR_FLUSH)
    sys.stdout.flush()
    return 0


def mailq_main(argv: list[str] | None = None) -> int:
    return main(argv, mailq=True)


if __name__ == "__main__":
    sys.exit(main())
