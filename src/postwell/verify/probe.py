"""Probes on the delivery side: what the qmgr does with a message carrying the
verify flag, and the local/virtual agents' "would deliver" answers.

An agent in probe mode reports, never delivers (Postfix's DEL_REQ_TRACE_ONLY):
smtp(8) stops after the RCPT replies (RSET), local(8) and virtual(8) say where the
mail would go or that the user is unknown.  The qmgr logs each answer as
``status=deliverable``/``undeliverable``, tells the verify service, and removes the
probe: no bounce, no deferral, no retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
from functools import partial

from postwell.delivery.base import RecipientResult

from . import (STATUS_BOUNCE, STATUS_DEFER, STATUS_OK, USER_PROBE, VERIFY_ATTRIBUTE,
               status_name)


# Agents that know the probe flag or have nothing to do anyway.
PROBE_AGENTS = frozenset({"smtp", "relay", "lmtp", "local", "virtual", "error", "retry", "discard"})

# Routing of verify(8) probes (trivial-rewrite's RESOLVE_VERIFY context, which the
# qmgr asks for DEL_REQ_FLAG_MTA_VRFY messages only): each override, by default
# the parameter it overrides, stands in for it.  The sender-dependent default
# transport has no override here: postwell routes no mail by it.
PROBE_ROUTING = (
    ("address_verify_relayhost", "relayhost"),
    ("address_verify_transport_maps", "transport_maps"),
    ("address_verify_default_transport", "default_transport"),
    ("address_verify_local_transport", "local_transport"),
    ("address_verify_virtual_transport", "virtual_transport"),
    ("address_verify_relay_transport", "relay_transport"),
    ("address_verify_sender_dependent_relayhost_maps", "sender_dependent_relayhost_maps"),
)


def probe_routing(config) -> dict[str, str]:
    """The routing parameters a probe sees differently from mail, as raw values
    for ``config.override`` (``$`` doubled: the override's value is final)."""
    out = {}
    for override, regular in PROBE_ROUTING:
        value = config.get(override)
        if value != config.get(regular):
            out[regular] = value.replace("$", "$$")
    return out


def recipient_status(res) -> int:
    if res.status == "sent":
        return STATUS_OK
    return STATUS_DEFER if res.status == "deferred" else STATUS_BOUNCE


async def run_probe(qmgr, qid, qm, sender, arrival, active_time, groups, early, attributes,
                    client=None) -> None:
    """The qmgr's whole pass over a probe message (see QueueManager._process)."""
    if client is None:
        client = getattr(qmgr, "verify_client", None)
        if client is None:
            from .client import VerifyClient
            client = qmgr.verify_client = VerifyClient.from_config(qmgr.config)
    outcomes = [(r, active_time, res, "qmgr") for r, res in early]

    async def run_group(transport, nexthop, items):
        if qmgr._command(transport) not in PROBE_AGENTS:
            # pipe(8) and the like would run a command: answer for them.
            for r, rc in items:
                outcomes.append((r, qmgr.clock(), RecipientResult.sent(
                    rc, f"delivers to command: {transport}", transport), transport))
            return
        limit = max(1, qmgr._limit(transport, "recipient"))
        for i in range(0, len(items), limit):
            chunk = items[i:i + limit]
            results = await qmgr._deliver_chunk(qid, qm, sender, arrival, active_time,
                                                transport, nexthop, chunk, attributes)
            outcomes.extend((r, handoff, res, transport)
                            for (r, _), (handoff, res) in zip(chunk, results))

    # Every transport at once, as for mail (sendmail -bv lists several).
    await asyncio.gather(*(run_group(t, n, items) for (t, n), items in groups.items()))
    user = attributes.get(VERIFY_ATTRIBUTE) == USER_PROBE
    report = []
    for r, handoff, res, service in outcomes:
        for part in getattr(res, "expanded", None) or [res]:
            status = recipient_status(part)
            shown = dataclasses.replace(part, status=status_name(status))
            for attr in ("conn_use",):
                if hasattr(part, attr):
                    setattr(shown, attr, getattr(part, attr))
            qmgr._log_result(qid, shown, arrival, active_time, handoff, service)
            if user:
                report.append((r, part, status))
                continue
            rc = part.recipient
            names = [a for a in (rc.orig, rc.address) if a]
            if part is not res:
                top = res.recipient
                names[:0] = [a for a in (top.orig, top.address) if a]
            seen = set()
            for address in names:
                if address.lower() in seen:
                    continue
                seen.add(address.lower())
                try:
                    await client.update(address, status, part.reason)
                except Exception:   # noqa: BLE001 - the next query probes again
                    qmgr.log.warning(f"{qid}: verify service failure")
                    break
    if user and report:
        await _mail_report(qmgr, qid, qm, sender, arrival, report)
    # A probe is finished whatever the answers were: a crash before the removal
    # only runs it once more.
    await qmgr._blocking(partial(qmgr.store.remove, qid, sync=False))
    log_ids = getattr(qmgr, "_log_ids", None)
    if log_ids is not None:
        log_ids.discard(qid)
    qmgr.log.info(f"{qid}: removed")


async def _mail_report(qmgr, qid, qm, sender, arrival, report) -> None:
    """sendmail -bv: the "Mail Delivery Status Report" to the sender (Postfix's
    bounce daemon, verify_template), one block per recipient in the order the
    answers came, message headers only."""
    from postwell.dsn import DsnRecipient, NoticeError
    from postwell.dsn.notice import VERIFY, diagnostic
    if not sender:
        return
    rcpts = []
    for r, part, status in report:
        rc = part.recipient
        text = f"delivery via {part.relay}: {part.reason}"
        # A remote server's refusal is "smtp; 550 ..." (its own reply), anything
        # else is read from the whole text, as Postfix's trace entries are.
        remote, code = diagnostic(part.reason)
        dtype = dtext = None
        if code is not None and code.startswith("smtp; "):
            dtype, dtext = "smtp", code[len("smtp; "):]
        else:
            remote = None
        rcpts.append(DsnRecipient(
            rc.address, part.dsn, text, "deliverable" if status == STATUS_OK else "undeliverable",
            rc.orig or getattr(r, "orig", None) or rc.address, rc.orcpt or None,
            remote_mta=remote, diag_type=dtype, diag_text=dtext))
    data = qmgr._render(VERIFY, qid, qm, sender, arrival, rcpts, sender, full=False)
    try:
        await qmgr._post(qid, "sender delivery status", "", sender, data, critical=False)
    except NoticeError:   # pragma: no cover - _post warns and returns False
        pass


# -- local(8) and virtual(8) probe answers ------------------------------------

def local_probe(agent, request) -> list[RecipientResult]:
    """local(8)'s answers to a probe (LocalAgent.probe, delivery/local.py
    TraceExpansion): for verify(8) an alias is "aliased to VALUE", a user's
    forward_path file "forward via file: PATH", else "delivers to mailbox" /
    "delivers to maildir" / "delivers to command: X" (mailbox_command_maps
    first), luser_relay "forwards to ADDR" (expanded), a missing postmaster or
    mailer-daemon alias "discarded", anything else "unknown user"; sendmail -bv
    expands aliases and .forward files and answers for each destination."""
    return agent.probe(request)


def virtual_probe(agent, request) -> list[RecipientResult]:
    out = []
    for rc in request.recipients:
        plan = agent.plan(request, rc)
        if isinstance(plan, RecipientResult):
            out.append(plan)
            continue
        reason = "delivers to maildir" if plan.maildir else "delivers to mailbox"
        out.append(RecipientResult.sent(rc, reason, "virtual"))
    return out


__all__ = ["run_probe", "local_probe", "virtual_probe", "recipient_status"]
