"""Delivery agents.  ``agent_class(command)`` maps a master.cf command name
to the agent class; the qmgr runs agents in-process.

Each agent is listed in ``AGENTS`` by command name as "module:Class"
(imported lazily, so a broken optional agent never stops the qmgr from
delivering to the others).  A module registers the parameters it honours
when it is imported; the master imports them all before its start-up
warnings.
"""

from __future__ import annotations

import importlib

from .base import DeliveryAgent, DeliveryRequest, Recipient, RecipientResult  # noqa: F401

AGENTS: dict[str, str] = {
    "virtual": "postwell.delivery.virtual:VirtualAgent",
    "error": "postwell.delivery.simple:ErrorAgent",
    "retry": "postwell.delivery.simple:RetryAgent",
    "discard": "postwell.delivery.simple:DiscardAgent",
    "smtp": "postwell.delivery.smtp:SmtpDeliveryAgent",
    "relay": "postwell.delivery.smtp:SmtpDeliveryAgent",
    "lmtp": "postwell.delivery.lmtp:LmtpDeliveryAgent",
    "local": "postwell.delivery.local:LocalAgent",
    "pipe": "postwell.delivery.pipe:PipeAgent",
}


def agent_class(command: str):
    """The DeliveryAgent subclass for a master.cf command name, or None."""
    target = AGENTS.get(command)
    if not target:
        return None
    module, _, cls = target.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None
