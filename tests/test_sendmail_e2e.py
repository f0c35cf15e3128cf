"""sendmail -> maildrop -> pickup (started by the master) -> qmgr -> mailbox, end to end."""

from __future__ import annotations

import os
import pwd
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from test_sendmail import run, submit_user  # noqa: E402

PICKUP_LINE = "pickup    unix  n       -       n       60      1       pickup\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: master drops to mail_owner, sendmail runs as a user")
def test_local_submission_is_delivered(postwell_factory):
    inst = postwell_factory()
    (inst.config_dir / "master.cf").write_text(inst.default_master_cf() + PICKUP_LINE)
    inst.start()
    user = submit_user()
    uid = pwd.getpwnam(user).pw_uid
    rc, _, err = run(["-C", str(inst.config_dir), "-F", "Sub Mitter", f"alice@{harness.VIRTUAL_DOMAIN}"],
                     b"Subject: local submission\n\nhello from sendmail\n", user=user)
    assert (rc, err) == (0, b"")
    [path] = inst.wait_maildir("alice", 1, timeout=30)
    text = path.read_bytes()
    assert b"hello from sendmail" in text
    assert f"(postwell, from userid {uid})".encode() in text
    assert f"From: Sub Mitter <{user}@{harness.DOMAIN}>".encode() in text
    m = inst.wait_log(rf"postfix/pickup\[\d+\]: ([0-9A-F]+): uid={uid} from=<{user}>")
    qid = m.group(1)
    inst.wait_log(rf"{qid}: to=<alice@{re.escape(harness.VIRTUAL_DOMAIN)}>.*status=sent")
    assert os.listdir(inst.queue_dir / "maildrop") == []
