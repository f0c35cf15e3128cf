"""error(8), retry and discard(8) (delivery/simple.py): results and log
texts as Postfix 3.7 produces them for the same transport table entries."""

from __future__ import annotations

import asyncio

import pytest

from postwell.delivery import agent_class
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.simple import DiscardAgent, ErrorAgent, RetryAgent, split_dsn
from postwell.log import NullLog


def deliver(cls, nexthop, rcpts=("u@dom.test",)):
    log = NullLog(cls.name)
    agent = cls(None, log=log)
    req = DeliveryRequest(queue_id="4ABC12345", sender="s@x.test",
                          recipients=[Recipient(r) for r in rcpts], transport=cls.name,
                          nexthop=nexthop, arrival_time=0.0, open_content=lambda: iter([b""]))
    res = asyncio.run(agent.deliver(req))
    return [(r.status, r.dsn, r.reason, r.relay) for r in res], log.lines


@pytest.mark.parametrize("nexthop, want", [
    ("", ("bounced", "5.0.0", "Address is undeliverable", "none")),
    ("5.1.1 User unknown", ("bounced", "5.1.1", "User unknown", "none")),
    ("5.1.1", ("bounced", "5.1.1", "?", "none")),
    ("  5.2.2   spaced   text", ("bounced", "5.2.2", "spaced   text", "none")),
    ("5.1.1x not a code", ("bounced", "5.0.0", "5.1.1x not a code", "none")),
])
def test_error(nexthop, want):
    res, lines = deliver(ErrorAgent, nexthop)
    assert res == [want] and lines == []


def test_error_ignores_soft_code_with_postfix_warning():
    res, lines = deliver(ErrorAgent, "4.7.1 try later")
    assert res == [("bounced", "5.0.0", "try later", "none")]
    assert lines == ['warning: bounce_append: ignoring dsn code "4.7.1"']
    res, lines = deliver(ErrorAgent, "2.0.0 weird")
    assert res == [("bounced", "5.0.0", "weird", "none")]


def test_retry():
    assert deliver(RetryAgent, "")[0] == [("deferred", "4.0.0", "Address is undeliverable", "none")]
    res, lines = deliver(RetryAgent, "5.1.1 bad")
    assert res == [("deferred", "4.0.0", "bad", "none")]
    assert lines == ['warning: defer_append: ignoring dsn code "5.1.1"']


def test_discard():
    assert deliver(DiscardAgent, "")[0] == [("sent", "2.0.0", "dom.test", "none")]
    assert deliver(DiscardAgent, "2.5.5 custom text")[0] == [("sent", "2.5.5", "custom text", "none")]
    res, lines = deliver(DiscardAgent, "4.1.1 odd")
    assert res == [("sent", "2.0.0", "odd", "none")]
    assert lines == ['warning: sent: ignoring dsn code "4.1.1"']


def test_every_recipient_gets_a_result():
    res, _ = deliver(ErrorAgent, "5.1.1 gone", rcpts=("a@x", "b@y", "c@z"))
    assert [r[0] for r in res] == ["bounced"] * 3


def test_registry():
    assert agent_class("error") is ErrorAgent and agent_class("retry") is RetryAgent
    assert agent_class("discard") is DiscardAgent
    assert agent_class("nonexistent") is None


def test_split_dsn():
    assert split_dsn("4.7.1\ttext", "5.0.0") == ("4.7.1", "text")
    assert split_dsn("6.1.1 text", "5.0.0") == ("5.0.0", "6.1.1 text")
    assert split_dsn("5.1234.1 text", "5.0.0") == ("5.0.0", "5.1234.1 text")
