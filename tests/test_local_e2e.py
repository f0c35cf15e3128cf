"""local(8) end to end: SMTP in, qmgr, local delivery into a real user's mbox.

Needs the master to run the root local helper (delivery.local_helper) next
to the unprivileged qmgr; skipped until the master does.
"""

from __future__ import annotations

import inspect
import os

import pytest

from harness import PostwellInstance, dialogue, wait_for
from postwell.tables.aliases import build_aliases
from test_local import HOST, users  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")


def master_runs_local_helper() -> bool:
    try:
        from postwell.master import daemon
        return "local_helper" in inspect.getsource(daemon)
    except Exception:
        return False


@pytest.mark.skipif(not master_runs_local_helper(), reason="master does not start the local helper yet")
def test_smtp_to_local_mailbox_and_alias(tmp_path, users):
    inst = PostwellInstance(tmp_path, master_cf=None)
    spool = inst.root / "spool"
    spool.mkdir()
    os.chown(spool, 0, 8)
    os.chmod(spool, 0o2775)
    aliases = inst.config_dir / "aliases"
    aliases.write_text("root: pwtl1\n")
    build_aliases("hash", str(aliases))
    inst.main_cf = {"alias_maps": f"hash:{aliases}", "mail_spool_directory": str(spool),
                    "mydestination": "$myhostname, localhost.$mydomain, localhost, $mydomain"}
    inst.master_cf = inst.default_master_cf() + "local     unix  -       n       n       -       -       local\n"
    inst.write_config()
    with inst:   # starts it
        for rcpt in (f"pwtl1@{HOST}", f"root@{HOST}"):
            replies = dialogue(inst.port, ["EHLO client.test", "MAIL FROM:<s@remote.test>",
                                           f"RCPT TO:<{rcpt}>", "DATA",
                                           "Subject: e2e\r\n\r\nhello\r\n.", "QUIT"])
            assert replies[-2].code == 250, replies
        mbox = spool / "pwtl1"
        try:
            wait_for(lambda: mbox.exists() and mbox.read_bytes().count(b"\nReturn-Path: ") == 2, 30,
                     what="two messages in the mbox")
        except TimeoutError:
            raise AssertionError("\n".join(line for line in inst.log_text().splitlines()
                                           if "not implemented" not in line)[-3000:]) from None
        assert os.stat(mbox).st_uid == users["pwtl1"].pw_uid
        # The mbox is written before the qmgr logs the delivery: wait for the line.
        inst.wait_log(r"postfix/local\[\d+\]: \w+: to=<pwtl1@mx\.example\.test>, relay=local, .*"
                      r"status=sent \(delivered to mailbox\)", timeout=15)
