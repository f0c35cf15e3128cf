"""local(8) behind the real qmgr (in-process, as root): the agent_class()
mapping, the resolver's local transport and the qmgr's log line."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from postwell.log import NullLog
from postwell.policy.resolve import AddressResolver
from postwell.qmgr.manager import QueueManager
from test_local import HOST, env_factory, users  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")


def test_qmgr_runs_local_agent(env_factory, users):
    env = env_factory(aliases="fwd: far@remote.test\n")
    qid1 = env.queue_message([f"pwtl1@{HOST}"])
    qid2 = env.queue_message([f"fwd@{HOST}"])
    for qid in (qid1, qid2):
        env.store.move(qid, "incoming", "active")
    logs = {}

    def agent_log(name):
        return logs.setdefault(name, NullLog(name))
    qm_log = NullLog("qmgr")
    qmgr = QueueManager(env.cfg, env.store, log=qm_log, resolver=AddressResolver(env.cfg),
                        agent_logs=agent_log, bounce_log=NullLog("bounce"))

    async def go():
        for qid in (qid1, qid2):
            await qmgr.process(qid)
    asyncio.run(asyncio.wait_for(go(), 60))
    lines = logs["local"].lines
    assert any(re.fullmatch(rf"{qid1}: to=<pwtl1@mx\.example\.test>, relay=local, delay=[\d.]+, "
                            r"delays=[\d./]+, dsn=2\.0\.0, status=sent \(delivered to mailbox\)", l)
               for l in lines), lines
    fwd = [l for l in lines if l.startswith(f"{qid2}: to=<fwd@mx.example.test>")]
    assert fwd and re.search(r"status=sent \(forwarded as \w+\)$", fwd[0]), lines
    assert os.stat(env.spool / "pwtl1").st_uid == users["pwtl1"].pw_uid
