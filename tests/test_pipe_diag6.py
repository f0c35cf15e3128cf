"""pipe(8) command diagnostics, side by side with Postfix 3.7.

A failed command's result carries Postfix's dsb_unix() diagnostic: the
notice says "Diagnostic-Code: x-unix; TEXT", TEXT being the command's output,
else the sysexits text or "unknown mail system error N" ("internal software
error" for a signal or the time limit).  An enhanced status code opening the
output (RFC 3463) decides the status and is the whole reason; a 2.x code
there is a failure, 5.0.0 (Postfix's bounce_append() logs that it ignores
it).  The unit part runs pipe.run_command() and the agent; the side-by-side
part runs the same master.cf pipe services under a reference Postfix and
postwell and compares the log outcomes and the notices' status blocks.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import shutil
import smtplib
import tempfile
from types import SimpleNamespace

import pytest

import harness
from postwell.config.main import Config
from postwell.config.master import parse_master_cf
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.pipe import Outcome, PipeAgent, parse_attributes, run_command
from postwell.log import NullLog

# name -> (script after "cat >/dev/null; ", status, dsn, reason, x-unix text) as
# Postfix 3.7's pipe(8) gave them (reason without the command for the
# "Command died" texts: the argv differs between the unit and side-by-side runs).
CASES = {
    "dsn": ("echo 5.1.1 no such user; exit 67", "bounced", "5.1.1", "no such user ",
            "no such user "),
    "success": ("echo 2.0.0 fine; exit 1", "bounced", "5.0.0", "fine ", "fine "),
    "nouser": ("exit 67", "bounced", "5.1.1", "user unknown", "user unknown"),
    "output": ("echo hi there; exit 67", "bounced", "5.1.1", "user unknown. Command output: hi there ",
               "hi there "),
    "empty": ("echo 5.1.1; exit 67", "bounced", "5.1.1", "", ""),
    "software": ("exit 70", "bounced", "5.3.0", "internal software error", "internal software error"),
    "quiet": ("exit 1", "bounced", "5.3.0", 'Command died with status 1: "CMD"',
              "unknown mail system error 1"),
    "later": ("echo 4.2.2 box full; exit 1", "deferred", "4.2.2", "box full ", "box full "),
    "sig": ("kill -9 $$", "deferred", "4.3.0", 'Command died with signal 9: "CMD"',
            "internal software error"),
}


# ------------------------------------------------------------------ run_command()

def _sh(script: str, time_limit: float = 20.0) -> Outcome:
    return run_command(["/bin/sh", "-c", script], iter([b"Subject: t\n\nbody\n"]), uid=None, gid=None,
                       env={"PATH": "/usr/bin:/bin"}, cwd=None, chroot=None, time_limit=time_limit)


@pytest.mark.parametrize("name", list(CASES))
def test_run_command_types_the_diagnostic(name):
    script, status, dsn, reason, text = CASES[name]
    got = _sh("cat >/dev/null; " + script)
    assert got[:3] == (status, dsn, reason.replace("CMD", "/bin/sh"))
    assert (got.diag_type, got.diag_text) == ("x-unix", text)


def test_run_command_success_and_time_limit():
    got = _sh("cat >/dev/null; echo ok")
    assert got[:3] == ("sent", "2.0.0", "") and got.diag_type is None
    got = _sh("sleep 5", time_limit=0.3)
    assert got[:3] == ("bounced", "5.3.0", 'Command time limit exceeded: "/bin/sh"')
    assert (got.diag_type, got.diag_text) == ("x-unix", "internal software error")
    got = _sh("echo partial; sleep 5", time_limit=0.3)
    assert got.diag_text == "partial "


def test_missing_command_diagnostic_is_its_output():
    got = run_command(["/nonexistent/cmd"], iter([b"x\n"]), uid=None, gid=None, env={}, cwd=None,
                      chroot=None, time_limit=5)
    assert got[:2] == ("deferred", "4.3.0")
    assert got.diag_text == "pipe: fatal: pipe_command: execvp /nonexistent/cmd: No such file or directory "


def test_success_code_logs_that_it_is_ignored():
    notes = []
    got = run_command(["/bin/sh", "-c", "cat >/dev/null; echo 2.1.5 fine; exit 0"], iter([b"x\n"]),
                      uid=None, gid=None, env={}, cwd=None, chroot=None, time_limit=5,
                      note=lambda level, text: notes.append((level, text)))
    assert got[:3] == ("sent", "2.0.0", "") and notes == []     # exit 0: the output is no status
    got = run_command(["/bin/sh", "-c", "cat >/dev/null; echo 2.1.5 fine; exit 1"], iter([b"x\n"]),
                      uid=None, gid=None, env={}, cwd=None, chroot=None, time_limit=5,
                      note=lambda level, text: notes.append((level, text)))
    assert got[:3] == ("bounced", "5.0.0", "fine ")
    assert notes == [("warning", 'bounce_append: ignoring dsn code "2.1.5"')]


# ------------------------------------------------------------------ the agent

def _request(transport: str, rcpts=("a@b.test",)) -> DeliveryRequest:
    return DeliveryRequest(queue_id="ABC", sender="s@x.test", recipients=[Recipient(r) for r in rcpts],
                           transport=transport, nexthop="b.test", arrival_time=0.0,
                           open_content=lambda: iter([b"Subject: t\n\nbody\n"]))


class _Pw:
    pw_uid = pw_gid = 4321


def _agent(tmp_path, script: str) -> PipeAgent:
    qdir = tmp_path / "queue"
    qdir.mkdir(exist_ok=True)
    master = f"p unix - n n - - pipe user=me argv=/bin/sh -c {script}\n"
    cfg = Config(str(tmp_path), {"queue_directory": str(qdir)}, {}, parse_master_cf(master))
    # A non-root agent (euid faked) whose user= is itself runs the command directly.
    agent = PipeAgent(cfg, log=NullLog("pipe"), helper_socket="", euid=lambda: 4321)
    agent._attrs["p"] = parse_attributes(cfg.services[0].args, getpwnam=lambda n: _Pw())
    return agent


def test_agent_results_carry_the_diagnostic(tmp_path):
    agent = _agent(tmp_path, "{ cat >/dev/null; echo 5.2.2 full; exit 1 }")
    res = asyncio.run(asyncio.wait_for(agent.deliver(_request("p", ["a@b.test", "c@b.test"])), 20))
    assert [(r.status, r.dsn, r.reason, r.diag_type, r.diag_text) for r in res] == \
        [("bounced", "5.2.2", "full ", "x-unix", "full ")] * 2


def test_agent_success_has_no_diagnostic(tmp_path):
    agent = _agent(tmp_path, "{ cat >/dev/null }")
    [res] = asyncio.run(asyncio.wait_for(agent.deliver(_request("p")), 20))
    assert (res.status, res.reason) == ("sent", "delivered via p service")
    assert getattr(res, "diag_type", None) is None


class _Helper:
    def __init__(self, rows):
        self.rows, self.path = rows, "h"

    async def deliver(self, request):
        return self.rows


@pytest.mark.parametrize("row, want", [
    (["bounced", "5.1.1", "no such user ", "x-unix", "no such user "], ("x-unix", "no such user ")),
    # A helper that sends three items: the qmgr reads the reason (as before).
    (["bounced", "5.1.1", "no such user "], (None, None)),
    (["bounced", "5.1.1", "x", None, None], (None, None)),
])
def test_helper_rows_with_and_without_diagnostic(tmp_path, row, want):
    agent = PipeAgent(Config(str(tmp_path), {}, {}, []), log=NullLog("pipe"), helper_socket="h")
    agent._helper = _Helper([row])
    [res] = asyncio.run(agent._via_helper("h", _request("p")))
    assert (res.status, res.dsn, res.reason) == tuple(row[:3])
    assert (getattr(res, "diag_type", None), getattr(res, "diag_text", None)) == want


# ------------------------------------------------------------------ side by side

SENDER = f"alice@{harness.VIRTUAL_DOMAIN}"
# Side by side only: a command killed at its time limit (output so far) and one
# that cannot be run (pipe(8)'s child reports execvp() on its output).
SIDE = {**{n: c[0] for n, c in CASES.items()}, "timeout": "echo partial; sleep 10", "missing": None}


def _services(bindir: str) -> str:
    return "".join(f"p{n} unix - n n - - pipe user=nobody argv={bindir}/{n}.sh ${{recipient}}\n"
                   for n in SIDE)


def _outcomes(log: str) -> dict:
    found = {}
    for m in re.finditer(r"to=<u@(\w+)\.test>, relay=(\S+), .*?dsn=([\d.]+), status=(\w+) \((.*)\)$",
                         log, re.M):
        found.setdefault(m.group(1), (m.group(2), m.group(3), m.group(4), m.group(5)))
    return found


def _warnings(log: str) -> list[str]:
    return sorted(set(re.findall(r"/pipe\[\d+\]: (warning: .*)$", log, re.M)))


def _notices(inst, count: int) -> dict:
    got = {}
    for p in inst.wait_maildir("alice", count, timeout=60):
        msg = email.message_from_bytes(p.read_bytes(), policy=email.policy.compat32)
        [block] = msg.get_payload()[1].get_payload()[1:]
        name = block["Final-Recipient"].split("; ")[1].split("@")[1].split(".")[0]
        got[name] = {k: "DATE" if k == "Will-Retry-Until" else v for k, v in block.items()}
    return got


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    if harness.reference_available() is not None:
        pytest.skip(str(harness.reference_available()))
    base = tmp_path_factory.mktemp("pipediag6")
    bindir = tempfile.mkdtemp(prefix="pwpipediag-", dir="/tmp")
    os.chmod(bindir, 0o755)
    for name, script in SIDE.items():
        if script is None:
            continue
        path = os.path.join(bindir, f"{name}.sh")
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\ncat >/dev/null; {script}\n")
        os.chmod(path, 0o755)
    table = "inline:{" + ", ".join(f"{n}.test=p{n}:" for n in SIDE) + "}"
    # One delay notice soon for the deferred cases.
    main = {"transport_maps": table, "delay_warning_time": "2s", "ptimeout_time_limit": "1s",
            **{f"p{n}_destination_recipient_limit": "1" for n in SIDE}}
    ref = harness.ReferencePostfix(base, dict(main), name="pf-pipediag6", master_cf_extra=_services(bindir))
    pw = harness.PostwellInstance(base, dict(main), name="pw-pipediag6")
    pw.master_cf = pw.default_master_cf() + _services(bindir)
    pw.write_config()
    out = {}
    try:
        harness.start_side_by_side(ref, pw)
        for inst in (ref, pw):
            with smtplib.SMTP("127.0.0.1", inst.port, timeout=15) as s:
                for n in SIDE:
                    s.sendmail(SENDER, [f"u@{n}.test"], f"Subject: {n}\r\n\r\nbody\r\n")
        for inst in (ref, pw):
            notices = _notices(inst, len(SIDE))
            log = inst.log_text()
            out[inst.kind] = SimpleNamespace(outcomes=_outcomes(log), warnings=_warnings(log),
                                            notices=notices)
    finally:
        harness.stop_side_by_side([ref, pw])
        shutil.rmtree(bindir, ignore_errors=True)
    return out


def _ref(name, xfail: str | None = None):
    marks = [pytest.mark.postfix]
    if xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=xfail))
    return pytest.param(name, id=name, marks=marks)




@pytest.mark.parametrize("name", [_ref(n) for n in SIDE])
def test_log_outcome_matches_reference(pair, name):
    assert pair["postwell"].outcomes[name] == pair["postfix"].outcomes[name]


@pytest.mark.parametrize("name", [_ref(n) for n in SIDE])
def test_notice_status_block_matches_reference(pair, name):
    assert pair["postwell"].notices[name] == pair["postfix"].notices[name]


@pytest.mark.postfix
def test_pipe_warnings_match_reference(pair):
    assert pair["postwell"].warnings == pair["postfix"].warnings


@pytest.mark.postfix
def test_reference_logs_the_ignored_success_code(pair):
    assert 'warning: bounce_append: ignoring dsn code "2.0.0"' in pair["postfix"].warnings
