"""local(8) split: the root helper (local_helper.serve) does the user work,
the unprivileged side (LocalAgent with helper_socket) re-injects forwards."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.local import LocalAgent
from test_local import HOST, Env, env_factory, users  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")

SERVE = """
import json, sys
from postwell.config.main import Config
from postwell.delivery import local_helper
root, params = sys.argv[1], json.loads(sys.argv[2])
local_helper.serve(Config(root, params, {}, []))
"""


def test_helper_delivers_and_agent_forwards(env_factory, users):
    env = env_factory(aliases="both: pwtl1, far@remote.test\n")
    params = dict(env.cfg.params) if hasattr(env.cfg, "params") else None
    if params is None:
        pytest.skip("Config does not expose its parameters")
    params["maillog_file"] = str(env.root / "maillog")
    sock = os.path.join(str(env.queue), "private", "local")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(env.root), json.dumps(params)])
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert proc.poll() is None, "helper exited"
            assert time.monotonic() < deadline, "helper socket did not appear"
            time.sleep(0.05)
        qid = env.queue_message([f"both@{HOST}"])
        env.store.move(qid, "incoming", "active")
        agent = LocalAgent(env.cfg, env.log, store=env.store, helper_socket=sock)
        qm = env.store.open(qid, "active")
        try:
            req = DeliveryRequest(queue_id=qid, sender=qm.sender, recipients=[Recipient(f"both@{HOST}")],
                                  transport="local", nexthop=HOST, arrival_time=qm.arrival_time,
                                  open_content=lambda: qm.iter_content(), content_size=qm.content_size)
            [res] = asyncio.run(asyncio.wait_for(agent.deliver(req), 30))
        finally:
            qm.close()
        got = [(p.recipient.address, p.status, p.reason) for p in res.expanded]
        assert got[0] == (f"pwtl1@{HOST}", "sent", "delivered to mailbox")
        assert got[1][0] == f"both@{HOST}" and got[1][2].startswith("forwarded as ")
        assert os.stat(env.spool / "pwtl1").st_uid == users["pwtl1"].pw_uid
        new_id = got[1][2].split()[-1]
        assert new_id in env.store.scan("incoming")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_unprivileged_agent_without_helper_defers_other_users(env_factory, users, monkeypatch):
    """Not root and no helper: delivery as another uid is deferred, with a reason."""
    env = env_factory()
    import postwell.delivery.local_exec as lx
    monkeypatch.setattr(lx.os, "geteuid", lambda: 12345)
    qid = env.queue_message([f"pwtl1@{HOST}"])
    qm = env.store.open(qid)
    try:
        req = DeliveryRequest(queue_id=qid, sender=qm.sender, recipients=[Recipient(f"pwtl1@{HOST}")],
                              transport="local", nexthop=HOST, arrival_time=qm.arrival_time,
                              open_content=lambda: qm.iter_content(), content_size=qm.content_size)
        res = env.agent.expand_request(req)
    finally:
        qm.close()
    [[leaf]] = res
    assert (leaf.status, leaf.dsn) == ("deferred", "4.3.0")
    assert "requires root privileges" in leaf.reason
