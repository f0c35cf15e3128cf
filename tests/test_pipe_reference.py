"""pipe(8) side by side: the same master.cf pipe services and commands under
the reference Postfix and under postwell must log the same dsn, status and
reason for every outcome."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile

import pytest

import harness

pytestmark = pytest.mark.skipif(harness.reference_available() is not None,
                                reason=str(harness.reference_available()))

SCRIPTS = {
    "okout": "cat >/dev/null; echo hello world; exit 0",
    "perm": "cat >/dev/null; echo no way; exit 77",
    "temp": "cat >/dev/null; exit 75",
    "dsn": "cat >/dev/null; echo 4.2.2 mailbox full; exit 1",
    "st3": "cat >/dev/null; exit 3",
    "sig": "cat >/dev/null; kill -9 $$",
}


def services(bindir: str) -> str:
    out = "".join(f"p{n} unix - n n - - pipe flags=R user=nobody argv={bindir}/{n}.sh "
                  "${recipient}\n" for n in SCRIPTS)
    out += f"pmissing unix - n n - - pipe user=nobody argv={bindir}/nonexistent ${{recipient}}\n"
    out += f"pbig unix - n n - - pipe flags=D user=nobody argv={bindir}/okout.sh ${{recipient}}\n"
    out += f"psize unix - n n - - pipe size=10 user=nobody argv={bindir}/okout.sh\n"
    return out


DOMAINS = list(SCRIPTS) + ["missing", "big", "size"]


def outcomes(log: str) -> dict:
    found = {}
    for m in re.finditer(r"to=<([^>]+)>, relay=(\S+), .*?dsn=([\d.]+), status=(\w+) \((.*)\)$",
                         log, re.M):
        if m.group(1).split("@")[-1][:-5] in DOMAINS:    # not the sender's bounce notices
            found.setdefault(m.group(1), (m.group(2), m.group(3), m.group(4), m.group(5)))
    return found


def send_all(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        for d in DOMAINS:
            rcpts = [f"a@{d}.test", f"b@{d}.test"] if d == "big" else [f"u@{d}.test"]
            s.sendmail("sender@example.test", rcpts, f"Subject: {d}\r\n\r\nbody\r\n")


def run_instance(inst, expected: int) -> dict:
    send_all(inst.port)
    harness.wait_for(lambda: len(outcomes(inst.log_text())) >= expected, 40, 0.1,
                     f"{expected} delivery outcomes")
    return outcomes(inst.log_text())


def test_same_outcomes_as_postfix(tmp_path):
    bindir = tempfile.mkdtemp(prefix="pwpiperef-", dir="/tmp")
    os.chmod(bindir, 0o755)
    try:
        for name, body in SCRIPTS.items():
            path = os.path.join(bindir, f"{name}.sh")
            with open(path, "w") as f:
                f.write(f"#!/bin/sh\n{body}\n")
            os.chmod(path, 0o755)
        table = "inline:{" + ", ".join(f"{d}.test=p{d}:" for d in DOMAINS) + "}"
        limits = {f"p{d}_destination_recipient_limit": "1" for d in DOMAINS if d != "big"}
        main = {"transport_maps": table, **limits}
        expected = len(DOMAINS) + 1
        ref = harness.ReferencePostfix(tmp_path / "ref", main_cf_extra=main,
                                       master_cf_extra=services(bindir))
        with ref:
            want = run_instance(ref, expected)
        pw = harness.PostwellInstance(tmp_path / "pw", main_cf=main)
        pw.master_cf = pw.default_master_cf() + services(bindir)
        pw.write_config()
        with pw:
            got = run_instance(pw, expected)
        assert sorted(want) == sorted(got)
        for rcpt in want:
            assert got[rcpt] == want[rcpt], rcpt
    finally:
        shutil.rmtree(bindir, ignore_errors=True)


DUMP = """#!/bin/sh
# Writes its arguments and standard input where the test can compare them.
name=$1; shift
for a in "$@"; do printf 'ARG[%s]\\n' "$a"; done > "$(dirname "$0")/out-$name.args"
cat > "$(dirname "$0")/out-$name.msg"
"""

COPY_SERVICES = """\
pq unix - n n - - pipe flags=FRDOq.>B eol=\\r\\n null_sender= user=nobody
  argv={bin}/dump.sh q ${{sender}} ${{recipient}} ${{original_recipient}} ${{user}} ${{extension}}
  ${{mailbox}} ${{domain}} ${{nexthop}} $${{literal}} x${{client_address}}y
pu unix - n n - - pipe flags=hu user=nobody
  argv={bin}/dump.sh u ${{recipient}} ${{user}} ${{extension}} ${{domain}} ${{nexthop}} ${{sender}}
  ${{client_protocol}} ${{client_hostname}} ${{client_helo}} ${{sasl_method}}
pm unix - n n - - pipe flags=R user=nobody argv={bin}/dump.sh m -x${{recipient}}y ${{user}}
"""
COPY_ROUTES = "inline:{q.test=pq:NH.q, u.test=pu:Next.Hop, m.test=pm:}"
COPY_LIMITS = {"pq_destination_recipient_limit": "1", "pu_destination_recipient_limit": "1",
               "recipient_delimiter": "+"}


def _send_copies(port: int) -> None:
    body = "Subject: copy\r\nDelivered-To: other@x.test\r\n\r\nFrom me\r\n.dot\r\nlast\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.sendmail("", ['"a b"@q.test'], body)
        s.sendmail("Snd+x@Ex.test", ["User+Ext@U.TEST"], body)
        s.sendmail("s@x.test", ["a@m.test", "b+q@m.test"], body)


def _collect(bindir: str) -> dict:
    out = {}
    for name in ("q", "u", "m"):
        args = open(os.path.join(bindir, f"out-{name}.args"), "rb").read()
        msg = open(os.path.join(bindir, f"out-{name}.msg"), "rb").read()
        # What the MTA adds itself (Received, Message-ID, Date, queue ids) differs;
        # compare the delivery headers pipe(8) prepends and the body.
        head, _, body = msg.partition(b"Received: ")
        head = re.sub(rb"^(From \S+  )\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", rb"\1DATE", head)
        body = body.split(b"\r\n\r\n", 1)[-1] if name == "q" else body.split(b"\n\n", 1)[-1]
        out[name] = (args, head, body)
        os.unlink(os.path.join(bindir, f"out-{name}.args"))
        os.unlink(os.path.join(bindir, f"out-{name}.msg"))
    return out


def test_same_argv_and_message_copy_as_postfix(tmp_path):
    bindir = tempfile.mkdtemp(prefix="pwpipecopy-", dir="/tmp")
    os.chmod(bindir, 0o777)
    try:
        with open(os.path.join(bindir, "dump.sh"), "w") as f:
            f.write(DUMP)
        os.chmod(os.path.join(bindir, "dump.sh"), 0o755)
        main = {"transport_maps": COPY_ROUTES, **COPY_LIMITS}
        services = COPY_SERVICES.format(bin=bindir)
        done = lambda: all(os.path.exists(os.path.join(bindir, f"out-{n}.msg"))  # noqa: E731
                           for n in ("q", "u", "m"))
        ref = harness.ReferencePostfix(tmp_path / "ref", main_cf_extra=main,
                                       master_cf_extra=services)
        with ref:
            _send_copies(ref.port)
            harness.wait_for(done, 40, 0.1, "three pipe deliveries by Postfix")
            harness.wait_for(lambda: ref.log_text().count("status=sent (delivered via") >= 4, 20,
                             0.1, "Postfix's log lines")
        want = _collect(bindir)
        pw = harness.PostwellInstance(tmp_path / "pw", main_cf=main)
        pw.master_cf = pw.default_master_cf() + services
        pw.write_config()
        with pw:
            _send_copies(pw.port)
            harness.wait_for(done, 40, 0.1, "three pipe deliveries by postwell")
            harness.wait_for(lambda: pw.log_text().count("status=sent (delivered via") >= 4, 20,
                             0.1, "postwell's log lines")
        got = _collect(bindir)
        # The comparison is not vacuous: Postfix's own copy has what we expect.
        assert b'ARG["a b"@q.test]' in want["q"][0] and b"ARG[NH.q]" in want["q"][0]
        assert want["q"][1].startswith(b"From MAILER-DAEMON  DATE\r\nReturn-Path: <>\r\n")
        assert want["q"][2] == b">From me\r\n..dot\r\nlast\r\n\r\n"
        assert b"ARG[-xb+q@m.testy]" in want["m"][0]
        for name in want:
            assert got[name][0] == want[name][0], (name, "argv")
            assert got[name][1] == want[name][1], (name, "prepended headers")
            assert got[name][2] == want[name][2], (name, "body")
    finally:
        shutil.rmtree(bindir, ignore_errors=True)
