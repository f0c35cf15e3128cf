"""Posting a notice as new mail, and who gets which notice.

A notice enters the queue through cleanup like any local submission (new
queue id, virtual alias expansion of its recipient, the missing Message-Id
added and logged as ``NEWID: message-id=<...>``), from the null sender (or
from $double_bounce_sender for postmaster notices), as Postfix's bounce
daemon posts it through its cleanup service, headed by post_mail()'s
``Received: by`` header.
"""

from __future__ import annotations

import time

from .notice import mail_date


class NoticeError(Exception):
    """The notice could not be queued now; the caller keeps its logs and retries."""


def notify_classes(config) -> set[str]:
    return {c.lower() for c in config.get_list("notify_classes")}


def double_bounce_address(config) -> str:
    """$double_bounce_sender@$myhostname, as Postfix's mail_addr_double_bounce()."""
    name = config.get("double_bounce_sender") or "double-bounce"
    return name if "@" in name else f"{name}@{config.get('myhostname')}"


def is_double_bounce(config, address: str) -> bool:
    low = (address or "").lower()
    name = (config.get("double_bounce_sender") or "double-bounce").lower()
    return bool(low) and (low == double_bounce_address(config).lower() or low == name
                          or low.startswith(name + "@"))


def wants(notify: str | None, what: str) -> bool:
    """RFC 3461 4.1: without NOTIFY the MTA behaves as for FAILURE,DELAY;
    NEVER suppresses everything."""
    items = {x.strip().upper() for x in (notify or "").split(",") if x.strip()}
    if not items:
        return what in ("FAILURE", "DELAY")
    if "NEVER" in items:
        return False
    return what in items


def post_mail_received(config, queue_id: str, data: bytes = b"",
                       now: float | None = None) -> str:
    """The header Postfix's post_mail() starts all mail it makes itself with
    (bounce/delay/success notices): "Received: by HOST (MAIL_NAME)" and
    "id QID; DATE" on a continuation line, QID being the notice's own queue
    id.  DATE is the notice's Date: header when it has one (both are stamped
    in the same second), otherwise now."""
    date = _date_header(data)
    if date is None:
        date = mail_date(time.time() if now is None else now)
    name = config.get("mail_name") or "postwell"
    return f"Received: by {config.get('myhostname')} ({name})\n\tid {queue_id}; {date}"


def _date_header(data: bytes) -> str | None:
    # Only the header block's first lines are looked at: a notice starts with Date:.
    for line in data[:4096].split(b"\n", 8)[:8]:
        if not line.strip():
            return None
        if line[:5].lower() == b"date:":
            text = line[5:].strip().decode("utf-8", "replace")
            return text or None
    return None


async def post_notice(config, store, *, sender: str, recipient: str, data: bytes,
                      cleanup_log=None, cleanup=None) -> str:
    """Queue ``data`` from ``sender`` to ``recipient``; return the new queue id.

    Raises NoticeError on a temporary failure (queue write error, table
    lookup failure); a permanent cleanup refusal is returned as ``""`` so the
    caller drops the notice instead of retrying it forever.
    """
    from postwell.cleanup import Cleanup
    if cleanup is None:
        from postwell.log import NullLog
        cleanup = Cleanup(config, store, cleanup_log or NullLog("cleanup", keep=False))
    try:
        cs = cleanup.open(rewrite_local=True)
    except Exception as exc:
        raise NoticeError(f"cannot create queue file: {exc}") from exc
    try:
        cs.set_sender(sender)
        cs.add_recipient(recipient)
        if not getattr(cs, "size", 0) and hasattr(cs, "prepend_header"):
            # A caller whose cleanup already began the message with its own
            # post_mail() header (the smtpd's transcript notice) keeps that one.
            cs.prepend_header(post_mail_received(config, getattr(cs, "queue_id", ""), data))
        cs.write(data)
        reply = await cs.finish()
    except Exception as exc:
        cs.abort()
        raise NoticeError(str(exc)) from exc
    code = getattr(reply, "code", 451)
    if 200 <= code < 300:
        return cs.queue_id
    if 400 <= code < 500:
        raise NoticeError(str(reply))
    return ""
