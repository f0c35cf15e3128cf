"""sendmail -v's delivery report (Postfix's DEL_REQ_FLAG_RECORD).

pickup turns the maildrop record ``trace record`` into the queue-file
attribute ``postwell_trace`` = ``1`` (postcat shows Postfix's
``trace_flags=1024``).  During the first delivery pass the qmgr keeps an
entry for every result in bounce/ID (deliveries as for NOTIFY=SUCCESS,
failures as always, deferrals "delayed"), and at the end of that pass mails
the sender one "Mail Delivery Status Report" (verify_template, message
headers only, logged as ``sender delivery status notification``): the
report Postfix's bounce(8) sends from its trace log.  Then the mark's value
byte becomes ``0`` in place, as Postfix's qmgr kills the record, so later
passes over a deferred message report nothing.  Failed recipients also get
their usual non-delivery notice.
"""

from __future__ import annotations

import errno
import os

from postwell.dsn.submit import wants

TRACE_ATTRIBUTE = "postwell_trace"
TRACE_RECORD = "1"


def records(qm) -> bool:
    """Does this queued message still ask for sendmail -v's report?"""
    attrs = getattr(qm, "attributes", None)
    return bool(attrs) and attrs.get(TRACE_ATTRIBUTE) == TRACE_RECORD


def wants_trace(qm, recipient) -> bool:
    """A delivery of this recipient must be recorded for a notice (its done
    mark waits until the entry is durable): NOTIFY=SUCCESS, or sendmail -v."""
    return wants(getattr(recipient, "notify", None), "SUCCESS") or records(qm)


async def record_deferrals(qmgr, qid, deferred) -> None:
    """A first pass's deferrals join the report ("delayed", worded as the
    trace log words them); bounce/ID goes once the report is queued."""
    from postwell.qmgr.manager import _final_identity
    store = qmgr.store
    note = getattr(qmgr, "_note_log", None)
    if note is not None:
        note(qid)

    def append():
        for r, res in deferred:
            entry = store._log_entry(_final_identity(r, res), res.dsn, res.reason, "delayed")
            entry["trace_relay"] = res.relay
            store._append_log("bounce", qid, entry, False)
    await qmgr._blocking(append)


def kill_record(qm) -> None:
    """Postfix's qmgr_message_kill_record(): the mark's value byte becomes
    "0" in place, so only the first pass is reported."""
    from postwell.queue import format as qf
    fd = getattr(qm, "_fd", None)
    h = getattr(qm, "header", None)
    if fd is None or h is None:
        return
    data = os.pread(fd, h.envelope_size, h.envelope_offset)
    at = qf.attribute_value_offset(data, TRACE_ATTRIBUTE, TRACE_RECORD)
    if at is None:
        return
    if os.pwrite(fd, b"0", h.envelope_offset + at) != 1:
        raise OSError(errno.EIO, "short write")
    os.fdatasync(fd)
    qm.attributes[TRACE_ATTRIBUTE] = "0"


async def send_record_report(qmgr, qid, qm, sender, arrival, entries) -> bool:
    """Mail the sender the report of a sendmail -v message's first pass (every
    entry of bounce/ID, in its order); False when the message did not ask for
    one, so the caller goes on with its NOTIFY=SUCCESS notice."""
    if not records(qm):
        return False
    from postwell.dsn.notice import VERIFY
    from postwell.dsn.submit import is_double_bounce
    # Postfix's trace log words every result "delivery via RELAY: text"; the
    # bounce log keeps a failure's bare text for the non-delivery notice.
    # Postfix's trace_append(): "delivery via RELAY: " unless the relay is
    # "none" (a deferral before any connection, the qmgr's own error).
    rcpts = []
    for e in entries:
        relay = e.get("trace_relay")
        if relay and relay != "none" and e.get("action", "failed") in ("failed", "delayed"):
            e = dict(e, reason=f"delivery via {relay}: {e.get('reason', '')}")
        elif e.get("action") not in ("failed", "delayed") and \
                e.get("reason", "").startswith("delivery via none: "):
            e = dict(e, reason=e["reason"][len("delivery via none: "):])
        # One at a time: the report keeps bounce/ID's order (the order the
        # results came in, as Postfix's trace log), not the notices' sorted one.
        rcpts += qmgr._dsn_recipients(qm, [e])
    # No report about a notice (RFC 3461 6.2), as for a success notice.
    if rcpts and sender and not is_double_bounce(qmgr.config, sender):
        data = qmgr._render(VERIFY, qid, qm, sender, arrival, rcpts, sender, full=False)
        await qmgr._post(qid, "sender delivery status", "", sender, data, critical=False)
    await qmgr._blocking(kill_record, qm)
    return True
