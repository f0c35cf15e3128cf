"""Issue 3: the queue tools side by side with Debian's Postfix 3.7.

The same traffic goes into a running postwell and a running reference
Postfix: one message deferred for two recipients, one bounce-like message
(null sender) deferred then held, one message left in the maildrop (no pickup
service).  ``postqueue -p`` must print the same lines (queue ids, sizes and
times aside) and ``postqueue -j`` the same fields.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import dialogue, free_port, wait_for  # noqa: E402
from test_sendmail import run as run_sendmail  # noqa: E402

pytestmark = [pytest.mark.postfix,
              pytest.mark.skipif(os.geteuid() != 0, reason="the reference Postfix needs root")]

MSG_LINE = re.compile(r"^(?P<id>[0-9A-Za-z]+)(?P<st>[ *!])\s*(?P<size>\d+) "
                      r"(?P<when>\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d)  (?P<sender>.*)$")
SMTP_SERVICE = "smtp      unix  -       -       n       -       -       smtp\n"


def send(inst, sender: str, rcpts: list[str]) -> str:
    lines = ["EHLO client.test", f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{r}>" for r in rcpts]
    lines += ["DATA", "Subject: queue tools", "", "hello", ".", "QUIT"]
    replies = dialogue(inst.port, lines, timeout=30)
    m = re.search(r"queued as (\w+)", str(replies[-2]))
    assert m, replies
    qid = m.group(1)
    for r in rcpts:
        wait_for(lambda: re.search(rf"{qid}: to=<{re.escape(r)}>.*status=deferred", inst.log_text()), 30,
                 what=f"{qid} deferred")
    return qid


def normalise(listing: str) -> list[str]:
    """Message lines reduced to status and sender (ids, sizes and times differ)."""
    out = []
    for line in listing.split("\n"):
        m = MSG_LINE.match(line)
        if m:
            # Postfix's layout: the id with its status mark glued on, padded to 11
            # columns, then the size right-aligned in 8, the time, two spaces, the sender.
            mark = m.group("st").strip()
            assert line == (f"{m.group('id') + mark:<11}{m.group('size'):>8} {m.group('when')}  "
                            f"{m.group('sender')}"), line
            out.append(f"MESSAGE{m.group('st')} {m.group('sender')}")
        else:
            out.append(line)
    return out


def traffic(inst, submit) -> None:
    send(inst, "s1@remote.test", ["a@far.test", "b@far.test"])
    held = send(inst, "", ["c@other.test"])
    cp = inst.run("postsuper", "-h", held)
    assert cp.returncode == 0, cp.stderr
    submit(["-f", "me@example.test", "x@far.test", "y@far.test"], b"Subject: md\n\nhello\n")


@pytest.fixture
def pair(postwell_factory, reference_factory):
    relay = free_port()
    params = {"relayhost": f"[127.0.0.1]:{relay}", "minimal_backoff_time": "1h",
              "maximal_backoff_time": "2h", "queue_run_delay": "1h"}
    ref = reference_factory(params)
    master = ref.config_dir / "master.cf"
    # No pickup: submitted mail stays in the maildrop, where mailq shows it.
    master.write_text("".join(ln for ln in master.read_text().splitlines(True) if not ln.startswith("pickup")))
    ref.start()
    ours = postwell_factory(params)
    ours.master_cf = ours.default_master_cf() + SMTP_SERVICE
    ours.write_config()
    ours.start(timeout=60)

    def submit_ref(args, data):
        cp = subprocess.run(["/usr/sbin/sendmail", "-C", str(ref.config_dir), *args], input=data,
                            capture_output=True, timeout=30)
        assert cp.returncode == 0, cp.stderr

    def submit_ours(args, data):
        rc, _, err = run_sendmail(["-C", str(ours.config_dir), *args], data)
        assert (rc, err) == (0, b"")
    traffic(ref, submit_ref)
    traffic(ours, submit_ours)
    return ours, ref


def test_postqueue_p_matches_postfix(pair):
    ours, ref = pair
    theirs = ref.run("postqueue", "-p").stdout
    mine = ours.run("postqueue", "-p", check=True).stdout
    assert normalise(mine) == normalise(theirs), f"postwell:\n{mine}\nPostfix:\n{theirs}"


def test_postqueue_j_matches_postfix(pair):
    ours, ref = pair

    def objects(text):
        objs = [json.loads(x) for x in text.splitlines()]
        for o in objs:
            assert isinstance(o["arrival_time"], int) and isinstance(o["message_size"], int)
            del o["queue_id"], o["arrival_time"], o["message_size"]
        return objs
    theirs = objects(ref.run("postqueue", "-j").stdout)
    mine = objects(ours.run("postqueue", "-j", check=True).stdout)
    assert mine == theirs


def test_postsuper_output_matches_postfix(pair):
    ours, ref = pair
    results = []
    for inst in (ours, ref):
        ids = [json.loads(x)["queue_id"] for x in inst.run("postqueue", "-j").stdout.splitlines()
               if json.loads(x)["queue_name"] == "hold"]
        cp = inst.run("postsuper", "-H", "ALL")
        results.append((cp.returncode, cp.stderr))
        cp = inst.run("postsuper", "-h", ids[0])
        results.append((cp.returncode, cp.stderr.replace(ids[0], "ID")))
        cp = inst.run("postsuper", "-r", ids[0])
        results.append((cp.returncode, cp.stderr.replace(ids[0], "ID")))
        cp = inst.run("postsuper", "-d", "NOTANID!")
        results.append((cp.returncode, cp.stderr))
        cp = inst.run("postsuper", "-d", "ALL", "hold")
        results.append((cp.returncode, cp.stderr))
        cp = inst.run("postsuper", "-d", "ALL", "deferred")
        results.append((cp.returncode, cp.stderr))
    assert results[:6] == results[6:], results
