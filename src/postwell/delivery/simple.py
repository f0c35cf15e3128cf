"""The trivial agents: error(8) / retry, and discard(8).

The nexthop carries the text ("error:5.1.1 User unknown" -> nexthop
"5.1.1 User unknown"), optionally led by an RFC 3463 enhanced status code,
as in Postfix.  A code of the wrong class is ignored with Postfix's warning
("bounce_append: ignoring dsn code "4.7.1"") and the default used instead:
error(8) always bounces, retry always defers, discard(8) always reports
success.  Texts checked against Postfix 3.7's logs.
"""

from __future__ import annotations

import re

from .base import DeliveryAgent, DeliveryRequest, RecipientResult

# RFC 3463 2.0 status-code syntax as Postfix's dsn_valid(): class 2/4/5,
# then 1-3 and 1-3 digits, ending at white space or the end of the text.
_DSN = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?=\s|$)")
_SPACE = " \t\r\n\v\f"

# trivial-rewrite's text for error/retry destinations without one.
UNDELIVERABLE = "Address is undeliverable"


def split_dsn(text: str, default_dsn: str) -> tuple[str, str]:
    """(status code, free text), Postfix's dsn_split()."""
    rest = (text or "").lstrip(_SPACE)
    m = _DSN.match(rest)
    if not m:
        return default_dsn, rest
    return m.group(1), rest[m.end() + 1:].lstrip(_SPACE)


class ErrorAgent(DeliveryAgent):
    name = "error"
    status = "bounced"
    default_dsn = "5.0.0"
    append = "bounce_append"      # the Postfix routine named in the warning

    async def deliver(self, request: DeliveryRequest) -> list[RecipientResult]:
        if not (request.nexthop or "").strip():
            dsn, text = self.default_dsn, UNDELIVERABLE
        else:
            dsn, text = split_dsn(request.nexthop, self.default_dsn)
        if dsn[0] != self.default_dsn[0]:
            if self.log is not None:
                self.log.warning(f"{self.append}: ignoring dsn code \"{dsn}\"")
            dsn = self.default_dsn
        return [RecipientResult(r, self.status, dsn, text or "?", "none")
                for r in request.recipients]


class RetryAgent(ErrorAgent):
    name = "retry"
    status = "deferred"
    default_dsn = "4.0.0"
    append = "defer_append"


class DiscardAgent(DeliveryAgent):
    name = "discard"

    async def deliver(self, request: DeliveryRequest) -> list[RecipientResult]:
        # discard(8) logs "status=sent (<nexthop text>)"; without a nexthop the
        # resolver's default, the recipient domain, is the text.
        dsn, text = split_dsn(request.nexthop, "2.0.0")
        if dsn[0] != "2":
            if self.log is not None:
                self.log.warning(f"sent: ignoring dsn code \"{dsn}\"")
            dsn = "2.0.0"
        out = []
        for r in request.recipients:
            reason = text or r.address.rpartition("@")[2] or "discarded"
            out.append(RecipientResult(r, "sent", dsn, reason, "none"))
        return out
