"""The trivial agents: error(8) / retry, and discard(8).

The nexthop carries the text ("error:User unknown" -> nexthop "User unknown"),
optionally led by an enhanced status code, as in Postfix.
"""

from __future__ import annotations

import re

from .base import DeliveryAgent, DeliveryRequest, RecipientResult

_DSN = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+")


def _split(nexthop: str, default_dsn: str) -> tuple[str, str]:
    m = _DSN.match(nexthop or "")
    if m:
        return m.group(0).strip(), nexthop[m.end():]
    return default_dsn, nexthop


class ErrorAgent(DeliveryAgent):
    name = "error"
    status = "bounced"
    default_dsn = "5.0.0"

    async def deliver(self, request: DeliveryRequest) -> list[RecipientResult]:
        dsn, text = _split(request.nexthop, self.default_dsn)
        status = self.status
        if self.status == "bounced" and dsn.startswith("4"):
            status = "deferred"
        return [RecipientResult(r, status, dsn, text or "delivery failed", "none")
                for r in request.recipients]


class RetryAgent(ErrorAgent):
    name = "retry"
    status = "deferred"
    default_dsn = "4.0.0"


class DiscardAgent(DeliveryAgent):
    name = "discard"

    async def deliver(self, request: DeliveryRequest) -> list[RecipientResult]:
        # discard(8) logs "status=sent (<nexthop>)", or "discarded" without one.
        _, text = _split(request.nexthop, "2.0.0")
        return [RecipientResult(r, "sent", "2.0.0", text or "discarded", "none")
                for r in request.recipients]
