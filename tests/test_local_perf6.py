"""local(8) delivery throughput, session 6 (issue 8): the qmgr lets the next
request to a destination leave before the finished message's bookkeeping
(done mark, removal, log lines).  With local(8)'s two deliveries per
recipient in flight, that bookkeeping sat between one delivery's end and the
next one's start.

(A helper that served each qmgr connection in a process of its own, instead
of a thread, was measured here and left out: no gain in deliveries per second
or context switches per delivery, 4-5 MiB more PSS per connection.)"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_qmgr_perf import make_env, queue, run  # noqa: E402

# ---------------------------------------------------------------- qmgr

def _recording_env(tmp_path, limit, fail=False):
    from postwell.delivery.base import DeliveryAgent, RecipientResult
    from postwell.log import NullLog

    events = []

    class Agent(DeliveryAgent):
        def __init__(self):
            pass

        async def deliver(self, req):
            events.append(("deliver", req.queue_id))
            await asyncio.sleep(0)
            if fail:
                raise RuntimeError("agent trouble")
            return [RecipientResult.sent(r, "delivered to maildir", "okay") for r in req.recipients]

    class Log(NullLog):
        def _emit(self, priority, text, label=""):
            events.append(("log", text))
            super()._emit(priority, text, label)

    env = make_env(tmp_path, agent=Agent())
    env.qm.config.params["default_destination_concurrency_limit"] = str(limit)
    env.logs["qmgr"] = env.qm.log = Log("qmgr")
    return env, events


@pytest.mark.parametrize("limit", [1, 2])
def test_next_request_to_a_destination_leaves_before_bookkeeping(tmp_path, limit):
    env, events = _recording_env(tmp_path, limit)
    ids = [queue(env.store, "s@x.test", ["a@ok.test"]) for _ in range(6)]

    async def go():
        env.qm.scan_incoming()
        await env.qm.drain()
    run(go())
    order = [q for kind, q in events if kind == "deliver"]
    assert sorted(order) == sorted(ids)
    # The delivery that took over a finished one's slot started before that
    # message was marked done and removed (its "removed" line is the last step).
    for first, second in zip(order, order[limit:]):
        start_next = events.index(("deliver", second))
        removed = events.index(("log", f"{first}: removed"))
        assert start_next < removed, events
    assert all(env.store.find(q) is None for q in ids)
    assert len([e for e in events if e[0] == "log" and e[1].endswith(": removed")]) == len(ids)


def test_a_failing_agent_still_hands_over_and_loses_nothing(tmp_path):
    env, events = _recording_env(tmp_path, 1, fail=True)
    ids = [queue(env.store, "s@x.test", ["a@ok.test"]) for _ in range(3)]

    async def go():
        env.qm.scan_incoming()
        await env.qm.drain()
    run(go())
    assert sorted(q for kind, q in events if kind == "deliver") == sorted(ids)
    # Every message is kept for a retry, none is removed.
    assert all(env.store.find(q) is not None for q in ids)
    assert not any(e[0] == "log" and e[1].endswith(": removed") for e in events)


def test_next_request_waiting_for_a_process_slot_leaves_before_bookkeeping(tmp_path):
    # Every message to another destination, one delivery process for the transport
    # (master.cf maxproc): the wait is for the process slot, not the destination's.
    env, events = _recording_env(tmp_path, 20)
    env.qm.config.params["default_process_limit"] = "1"
    ids = [queue(env.store, "s@x.test", [f"a@d{i}.test"]) for i in range(4)]

    async def go():
        env.qm.scan_incoming()
        await env.qm.drain()
    run(go())
    order = [q for kind, q in events if kind == "deliver"]
    assert sorted(order) == sorted(ids)
    for first, second in zip(order, order[1:]):
        assert events.index(("deliver", second)) < events.index(("log", f"{first}: removed")), events
    assert all(env.store.find(q) is None for q in ids)


def test_a_stop_during_the_hand_over_still_settles_the_delivery(tmp_path):
    """The message whose delivery just ended is cancelled while it lets the
    next request go (the qmgr stopping): its result is recorded all the same,
    so it is not delivered again after the restart."""
    env, events = _recording_env(tmp_path, 1)
    ids = [queue(env.store, "s@x.test", ["a@ok.test"]) for _ in range(2)]
    cancelled = []
    deliver = type(env.agent).deliver

    async def cancelling(self, req):
        if events and any(kind == "deliver" for kind, _ in events):
            # The first message is suspended in its hand-over turn right now.
            for t in list(env.qm._tasks):
                if t is not asyncio.current_task() and not t.done():
                    t.cancel()
                    cancelled.append(t)
        return await deliver(self, req)
    type(env.agent).deliver = cancelling

    async def go():
        env.qm.scan_incoming()
        await env.qm.drain()
    run(go())
    assert cancelled
    first = [q for kind, q in events if kind == "deliver"][0]
    assert ("log", f"{first}: removed") in events
    assert env.store.find(first) is None
