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
        assert want.keys() == got.keys()
        for rcpt in want:
            assert got[rcpt] == want[rcpt], rcpt
    finally:
        shutil.rmtree(bindir, ignore_errors=True)
