"""`postwell demo`: the generated config is valid and the demo delivers mail."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from postwell.demo import write_demo

sys.path.insert(0, os.path.dirname(__file__))
from test_master import RUNNER, STUBS, free_port, smtp_banner, wait_for  # noqa: E402


@pytest.fixture
def demo_dir():
    d = tempfile.mkdtemp(prefix="pw-demo-")
    os.chmod(d, 0o755)
    yield os.path.join(d, "demo")
    shutil.rmtree(d, ignore_errors=True)


def test_write_demo_files_and_keeps_edits(demo_dir):
    paths = write_demo(demo_dir)
    main_cf = open(os.path.join(paths["etc"], "main.cf")).read()
    for needle in (f"queue_directory = {paths['dir']}/queue", "myhostname = mx.demo.test",
                   "virtual_mailbox_domains = demo.test", f"virtual_mailbox_base = {paths['mail']}",
                   "mynetworks = 127.0.0.0/8 [::1]/128", "virtual_uid_maps = static:"):
        assert needle in main_cf
    master_cf = open(os.path.join(paths["etc"], "master.cf")).read()
    assert "127.0.0.1:2525 inet n - n - - smtpd" in master_cf
    assert "127.0.0.1:2587 inet n - n - - smtpd" in master_cf
    with open(os.path.join(paths["etc"], "main.cf"), "a") as f:
        f.write("# my edit\n")
    write_demo(demo_dir)
    assert open(os.path.join(paths["etc"], "main.cf")).read().endswith("# my edit\n")
    from postwell.tables import open_table
    assert open_table(f"texthash:{paths['etc']}/vmailbox").lookup("alice@demo.test") == "demo.test/alice/"


def test_demo_runs_in_foreground_and_delivers(demo_dir):
    paths = write_demo(demo_dir)
    port = free_port()
    # Free ports instead of 2525/2587: other test runs may hold those.
    with open(os.path.join(paths["etc"], "master.cf"), "w") as f:
        f.write(f"127.0.0.1:{port} inet n - n - 1 smtpd\nqmgr unix n - n 300 1 qmgr\n")
    stubdir = os.path.join(os.path.dirname(demo_dir), "stubs")
    os.makedirs(stubdir, exist_ok=True)
    with open(os.path.join(stubdir, "pw_test_stubs.py"), "w") as f:
        f.write(STUBS)
    env = dict(os.environ, PYTHONPATH=stubdir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, "demo", demo_dir], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _up(port), 20)
        from postwell.queue import QueueStore, notify_qmgr
        qdir = os.path.join(paths["dir"], "queue")
        msg = QueueStore(qdir).create()
        msg.set_sender("someone@remote.test")
        msg.add_recipient("bob@demo.test")
        msg.write(b"Subject: demo\n\nhi bob\n")
        msg.commit()
        if os.geteuid() == 0:
            st = os.stat(paths["mail"])
            os.chown(os.path.join(qdir, "incoming", msg.queue_id), st.st_uid, st.st_gid)
        notify_qmgr(qdir)
        new = os.path.join(paths["mail"], "demo.test", "bob", "new")
        assert wait_for(lambda: os.path.isdir(new) and os.listdir(new), 20), open(paths["maillog"]).read()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "lands in" in err and "demo.test/alice/new" in err


def _up(port):
    try:
        return smtp_banner(port, 2).startswith(b"220")
    except OSError:
        return False


def test_demo_submission_needs_starttls_and_auth(demo_dir):
    """The README's demo: port 2587 is the recipe's submission service (STARTTLS, then AUTH
    with the built-in password file, then relaying); port 2525 takes mail for demo.test."""
    import smtplib
    import ssl

    paths = write_demo(demo_dir)
    mx, sub = free_port(), free_port()
    master_cf = os.path.join(paths["etc"], "master.cf")
    text = open(master_cf).read().replace("127.0.0.1:2525", f"127.0.0.1:{mx}")
    with open(master_cf, "w") as f:
        f.write(text.replace("127.0.0.1:2587", f"127.0.0.1:{sub}"))
    proc = subprocess.Popen([sys.executable, "-m", "postwell.cli.postfix", "demo", demo_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _up(sub) and _up(mx), 30), proc.stderr
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", sub, timeout=20) as s:
            s.ehlo("client.example")
            assert "auth" not in s.esmtp_features          # smtpd_tls_auth_only
            code, text = s.mail("alice@demo.test")
            assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        with smtplib.SMTP("127.0.0.1", sub, timeout=20) as s:
            s.starttls(context=ctx)
            s.ehlo("client.example")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice@demo.test", "wrong")
        with smtplib.SMTP("127.0.0.1", sub, timeout=20) as s:
            s.starttls(context=ctx)
            s.ehlo("client.example")
            code, text = s.login("alice@demo.test", "demo")
            assert (code, text) == (235, b"2.7.0 Authentication successful")
            s.sendmail("alice@demo.test", ["bob@demo.test"], b"Subject: via submission\r\n\r\nhi\r\n")
        new = os.path.join(paths["mail"], "demo.test", "bob", "new")
        assert wait_for(lambda: os.path.isdir(new) and os.listdir(new), 20), open(paths["maillog"]).read()
        log = open(paths["maillog"]).read()
        assert "sasl_method=PLAIN, sasl_username=alice@demo.test" in log
        assert "postfix/submission/smtpd[" in log
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
