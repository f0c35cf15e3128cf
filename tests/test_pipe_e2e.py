"""pipe(8) through the whole system: master (root) -> qmgr (mail_owner) ->
root pipe helper -> command as the service's user=."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import tempfile

import pytest

import harness

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def shared_dir():
    d = tempfile.mkdtemp(prefix="pwpipe-", dir="/tmp")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_pipe_service_runs_as_user_and_reports(tmp_path, shared_dir):
    nobody = pwd.getpwnam("nobody")
    inst = harness.PostwellInstance(tmp_path, main_cf={
        "transport_maps": "inline:{pipe.test=maildrop:, fail.test=pfail:}",
        "maildrop_destination_recipient_limit": "1",
    })
    inst.master_cf = inst.default_master_cf() + (
        "maildrop unix - n n - - pipe flags=DRhu user=nobody argv=/bin/sh -c "
        f"{{ id -u > {shared_dir}/uid.$$1; cat > {shared_dir}/msg.$$1 }} sh ${{user}}\n"
        "pfail unix - n n - - pipe user=nobody argv=/bin/sh -c { echo no way; exit 77 }\n")
    inst.write_config()
    with inst:
        log = inst.log_text()
        assert "pipe(8)" not in log and "service maildrop" not in log
        with smtplib.SMTP("127.0.0.1", inst.port, timeout=10) as s:
            s.sendmail("sender@remote.test", ["Joe@pipe.test", "ann@pipe.test"],
                       "Subject: piped\r\n\r\nhello\r\n")
            s.sendmail("sender@remote.test", ["x@fail.test"], "Subject: fail\r\n\r\nhello\r\n")
        inst.wait_log(r"to=<Joe@pipe\.test>, relay=maildrop, .*dsn=2\.0\.0, status=sent "
                      r"\(delivered via maildrop service\)", timeout=30)
        inst.wait_log(r"to=<ann@pipe\.test>, relay=maildrop, .*status=sent", timeout=30)
        inst.wait_log(r"to=<x@fail\.test>, relay=pfail, .*dsn=5\.7\.0, status=bounced "
                      r"\(permission denied\. Command output: no way \)", timeout=30)
        for user in ("joe", "ann"):
            assert open(f"{shared_dir}/uid.{user}").read().strip() == str(nobody.pw_uid)
            data = open(f"{shared_dir}/msg.{user}", "rb").read()
            assert data.startswith(b"Return-Path: <sender@remote.test>\nDelivered-To: ")
            assert data.endswith(b"\nhello\n")
            assert os.stat(f"{shared_dir}/msg.{user}").st_uid == nobody.pw_uid
