"""Build a non-delivery notification as an RFC 3464 multipart/report.

Parts (RFC 3462/6522 multipart/report; report-type=delivery-status):
1. a human-readable explanation (Postfix's wording of the bounce template),
2. message/delivery-status with per-message and per-recipient fields (RFC 3464 2.2, 2.3),
3. text/rfc822-headers of the original message (headers only: bounded size).
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

from postwell.delivery.base import iter_lines


@dataclass
class FailedRecipient:
    address: str
    orig: str | None
    dsn: str          # "5.1.1"
    reason: str       # the text as logged
    action: str = "failed"
    remote_mta: str | None = None


def build_bounce(*, config, queue_id: str, sender: str, arrival_time: float,
                 recipients: list[FailedRecipient], original_content, notice_id: str = "",
                 now: float | None = None, max_header_bytes: int = 65536) -> bytes:
    """Return the notice as bytes with LF line ends, ready for the queue."""
    now = time.time() if now is None else now
    hostname = config.get("myhostname")
    mail_name = config.get("mail_name") or "Postfix"
    boundary = f"{queue_id}.{int(now)}/{hostname}"
    date = email.utils.formatdate(now, localtime=True)
    lines = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        "Subject: Undelivered Mail Returned to Sender",
        f"To: {sender}",
        "Auto-Submitted: auto-replied",  # RFC 3834 5: never auto-reply to this
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
        f"Date: {date}",
        f"Message-Id: <{int(now)}.{notice_id or queue_id}@{hostname}>",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {hostname}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
        f"                   The {mail_name} program",
        "",
    ]
    for r in recipients:
        lines.append(f"<{r.address}>: {r.reason}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        # RFC 3464 2.2: per-message fields
        f"Reporting-MTA: dns; {hostname}",
        f"X-Postfix-Queue-ID: {queue_id}",
        f"X-Postfix-Sender: rfc822; {sender}",
        f"Arrival-Date: {email.utils.formatdate(arrival_time, localtime=True)}",
    ]
    for r in recipients:
        # RFC 3464 2.3: per-recipient fields, each block preceded by a blank line
        lines.append("")
        if r.orig and r.orig.lower() != r.address.lower():
            lines.append(f"Original-Recipient: rfc822; {r.orig}")
        lines += [
            f"Final-Recipient: rfc822; {r.address}",
            f"Action: {r.action}",
            f"Status: {r.dsn}",
        ]
        if r.remote_mta:
            lines.append(f"Remote-MTA: dns; {r.remote_mta}")
        lines.append(f"Diagnostic-Code: X-Postfix; {r.reason}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "Content-Transfer-Encoding: 8bit",
        "",
    ]
    head = "\n".join(lines) + "\n"
    out = bytearray(head.encode("utf-8", "surrogateescape"))
    used = 0
    for line in iter_lines(original_content()):
        if line in (b"\n", b"\r\n"):
            break  # end of the original's header section
        if used + len(line) > max_header_bytes:
            break
        out += line if line.endswith(b"\n") else line + b"\n"
        used += len(line)
    out += f"\n--{boundary}--\n".encode()
    return bytes(out)
