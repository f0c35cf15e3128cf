"""A fifth side-by-side sweep against Postfix 3.7: the delivery side.

Two MTA pairs (postwell and a reference Postfix with the same main.cf), each
started once for the module:

* a local(8) pair delivering to real users (pwf1..pwf3, shared with the issue 3
  tests under their machine lock): aliases to users, files, commands and
  :include: files, .forward files (with ``\\user``), forward and alias loops,
  owner- aliases, unknown users, mailbox limits, Maildir and mbox, and
  mailbox_command, in phases switched by ``postfix reload``;
* an smtp(8) pair relaying to scripted loopback peers: time-outs at each stage,
  TLS required but not offered, SASL failures, multi-line and partial
  rejections, SIZE and DSN handling, relayhost versus a host name looked up, a
  discard next hop; then postqueue -p/-j, postsuper and mailq on what was left.

Per scenario every log line of the message and of the messages it caused
(forwarded copies, notices) must be the same once queue ids, pids, dates, delays,
sizes and ports are normalised; some notices are compared field by field; the
queue tools then list what is left.  Differences not fixed are strict xfails
naming the cause.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import harness
from harness import HOSTNAME as HOST
from test_issue3_local_e2e import LOCAL_SERVICE, PICKUP_SERVICE, SMTP_SERVICE, reset_homes
from test_parity_sweep import _quiesce

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(harness.reference_available() is not None,
                       reason=str(harness.reference_available())),
    pytest.mark.skipif(not shutil.which("useradd"), reason="needs useradd for the local users"),
]

# Own users and lock (not issue 3's pwe1..3), so this module runs beside those tests.
USERS5 = ("pwf1", "pwf2", "pwf3")
SHARED = Path("/tmp/pwf-shared")        # same path for both MTAs: the log lines name it
TIMEOUT = 30

# ------------------------------------------------------------------ log normalising

_PREFIX = re.compile(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ postfix/([\w-]+)\[\d+\]: (.*)$")
_QID = re.compile(r"\b[0-9A-F]{10,12}\b")
_CHILD = re.compile(r"(?:forwarded as|notification:) ([0-9A-F]{10,12})\b")


def _norm_line(text: str, inst) -> str:
    text = text.replace(str(inst.root), "INSTANCE")
    text = re.sub(r"delay=[\d.]+, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+", "delay=D, delays=D", text)
    text = re.sub(r"size=\d+", "size=N", text)
    text = re.sub(r"\]:\d+", "]:PORT", text)
    text = re.sub(r"<\d{14}\.", "<STAMP.", text)
    return text


def _entries(inst, before: int) -> list[tuple[str, str]]:
    with open(inst.maillog, "rb") as f:
        f.seek(before)
        text = f.read().decode("utf-8", "replace")
    out = []
    for line in text.splitlines():
        m = _PREFIX.match(line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def _chain(entries, first: str) -> dict[str, str]:
    """Queue ids of the message and of the messages it caused (forwarded copies,
    notices), labelled by how they were made so both MTAs' labels line up."""
    labels = {first: "Q"}
    todo = [first]
    while todo:
        qid = todo.pop(0)
        made = []
        for _, text in entries:
            if not text.startswith(qid + ":"):
                continue
            for m in _CHILD.finditer(text):
                child = m.group(1)
                if child not in labels:
                    key = re.sub(r"delay=[\d.]+, delays=[\d./]+", "", text.replace(child, "?"))
                    made.append((key, child))
        for i, (_, child) in enumerate(sorted(made)):
            labels[child] = f"{labels[qid]}.{i}"
            todo.append(child)
    return labels


def _own_size(text: str, sizes: dict[str, str]) -> str:
    """"message size N" (smtp's SIZE check) names the qmgr's size= of the message:
    checked here, then normalised like size= (the two MTAs' mail_name differ)."""
    def one(m):
        if sizes.get(m.group(1)) != m.group(2):
            return m.group(0)           # left as it is: the comparison shows the number
        return m.group(0).replace(f"size {m.group(2)}", "size SIZE")
    return re.sub(r"^(\w+): .*?message size (\d+) exceeds", one, text)


def _trail(inst, before: int, first: str) -> list[str]:
    entries = _entries(inst, before)
    labels = _chain(entries, first)
    sizes = {m.group(1): m.group(2) for _, t in entries
             if (m := re.match(r"(\w+): from=<.*>, size=(\d+), nrcpt", t))}
    inst.sizes = set(sizes.values())
    out = []
    for prog, text in entries:
        ids = set(_QID.findall(text))
        if not ids & set(labels):
            continue
        text = _norm_line(_own_size(text, sizes), inst)
        # Longest first, so that no id is a prefix of another's replacement.
        for qid in sorted(labels, key=len, reverse=True):
            text = text.replace(qid, labels[qid])
        out.append(f"{prog}: {_QID.sub('QID', text)}")
    # Lines of different processes race (qmgr's "removed" and bounce's notice line),
    # and so do those of different messages and of parallel deliveries: compared
    # in order are one program's lines about one message, but for the delivery agents.
    def key(item):
        i, ln = item
        prog, label = ln.split(": ", 2)[:2]
        return (prog, label, ln if prog in ("local", "smtp", "virtual", "error", "discard") else i)
    return [ln for _, ln in sorted(enumerate(out), key=key)]


def _settled(inst, before: int, first: str) -> bool:
    """Every message of the chain is removed or waits in deferred/, nothing active."""
    entries = _entries(inst, before)
    labels = _chain(entries, first)
    deferred = {p.name for p in inst.queue_files(("deferred",))}
    if inst.queue_files(("incoming", "active")):
        return False
    for qid in labels:
        if qid in deferred:
            continue
        if not any(t == f"{qid}: removed" for _, t in entries):
            return False
    return True


def _send(inst, sender: str, rcpts: list[str], body: list[str]) -> tuple[int, str]:
    _quiesce(inst)
    before = os.path.getsize(inst.maillog)

    def rcpt(r: str) -> str:
        addr, _, params = r.partition(" ")
        return f"RCPT TO:<{addr}>" + (f" {params}" if params else "")
    addr, _, mparams = sender.partition(" ")
    mail = f"MAIL FROM:<{addr}>" + (f" {mparams}" if mparams else "")
    lines = ["EHLO client.test", mail, *[rcpt(r) for r in rcpts],
             "DATA", *body, ".", "QUIT"]
    replies = harness.dialogue(inst.port, lines, timeout=TIMEOUT)
    m = harness.QUEUED_RE.search(str(replies[-2])) if len(replies) >= 2 else None
    assert m, (inst.kind, [str(r) for r in replies])
    qid = m.group(1)
    prev = None
    deadline = time.monotonic() + 40
    # Settled twice in a row (0.2 s apart) with the same chain: a notice or a forwarded
    # copy made at the last moment is not missed.
    while time.monotonic() < deadline:
        if _settled(inst, before, qid):
            now = _trail(inst, before, qid)
            if now == prev:
                return before, qid
            prev = now
        time.sleep(0.2)
    raise AssertionError(f"{inst.kind}: {rcpts} not settled:\n" +
                         "\n".join(inst.log_text().splitlines()[-40:]))


def _diff(want: list[str], got: list[str]) -> str:
    rows = []
    for x, y in zip(want + [None] * len(got), got + [None] * len(want)):
        if x is None and y is None:
            continue
        rows.append(f"   {x}" if x == y else f"!! postfix  {x}\n   postwell {y}")
    return "\n".join(rows)


def _notice(raw: bytes, inst):
    """(headers, human text, delivery-status blocks) of a notice, normalised.  Both
    instances' directories have names of the same length: the text wraps alike."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    parts = msg.get_payload()
    human = parts[0].get_payload(decode=True).decode("utf-8", "replace")
    human = _QID.sub("QID", human).replace(str(inst.root), "INSTANCE")

    def sized(text: str) -> str:
        return re.sub(r"message size (\d+) exceeds", lambda m: "message size SIZE exceeds"
                      if m.group(1) in inst.sizes else m.group(0), text)
    human = sized(human)
    blocks = []
    for b in parts[1].get_payload():
        blocks.append({k: sized(re.sub(r"\s+", " ", v).replace(str(inst.root), "INSTANCE"))
                       for k, v in b.items()
                       if k not in ("Arrival-Date", "X-Postfix-Queue-ID")})
    head = {k: msg[k] for k in ("Subject", "From", "To", "Auto-Submitted")}
    head["parts"] = [p.get_content_type() for p in parts]
    return head, re.sub(r"\]:\d+", "]:PORT", human), blocks


def _same_notice(got, want, name: str) -> None:
    if want is None:
        assert got is None
        return
    assert got[0] == want[0], f"notice headers differ in {name!r}"
    assert got[1] == want[1], f"notice text differs in {name!r}:\n{want[1]}\n--- postwell:\n{got[1]}"
    assert got[2] == want[2], f"delivery status differs in {name!r}:\n{want[2]}\n--- postwell:\n{got[2]}"


# ------------------------------------------------------------------ local(8) pair

ALIASES = (
    "postmaster: pwf3\n"
    "team: pwf1, pwf2\n"
    f"tofile: {SHARED}/drop/file5.mbox\n"
    f"incl: :include:{SHARED}/members5\n"
    'cmdfail: "|echo oops from the command; exit 1"\n'
    'cmdtemp: "|echo busy now >&2; exit 75"\n'
    'cmdnouser: "|exit 67"\n'
    'cmdok: "|cat >/dev/null"\n'
    'cmdquiet: "|exit 1"\n'
    "list: pwf1, nosuchpwf\n"
    "owner-list: pwf2\n"
    "loopa: loopb\n"
    "loopb: loopa\n"
    "selfloop: selfloop, pwf1\n"
    "remote: far@far.test\n"
    f"nofile: {SHARED}/missing/file5.mbox\n"
)
LSENDER = f"pwf3@{HOST}"        # notices come back to a local mailbox
LBODY = ["Subject: local sweep", "Message-ID: <local5@client.test>", "", "hello"]
BIG = [f"X-Filler-{i}: " + "x" * 1150 for i in range(4)]


def _forward_files(users) -> None:
    # Extension forward files (forward_path's $home/.forward+ext): the plain
    # deliveries of other scenarios stay unforwarded.
    files = {"pwf1": {".forward+loop": "pwf2+loop\n", ".forward+cmd": '"|cat >/dev/null"\n',
                      ".forward+file": f"{SHARED}/drop/pwf1-file5\n"},
             "pwf2": {".forward+loop": "pwf1+loop\n", ".forward+ext": "pwf1\n"},
             "pwf3": {".forward+self": "pwf2, \\pwf3\n"}}
    for user, found in files.items():
        pw = users[user]
        for name, text in found.items():
            p = Path(pw.pw_dir) / name
            p.write_text(text)
            os.chown(p, pw.pw_uid, pw.pw_gid)


def _filled_spool(user: str, size: int):
    """The user's mbox already holds ``size`` bytes (the same on both sides)."""
    def run(inst, users):
        p = inst.root / "spool" / user
        p.write_bytes(b"From filler@example.test  Sun Nov 29 00:00:00 2026\n\n" +
                      (b"x" * 70 + b"\n") * ((size - 60) // 71) + b"\n")
        pw = users[user]
        os.chown(p, pw.pw_uid, 8)
        os.chmod(p, 0o600)
        # The notice goes to pwf3, whose mailbox must have room for it.
        (inst.root / "spool" / "pwf3").write_bytes(b"")
    return run


# name -> (phase, recipients, body, mailbox of the notice to compare or None, setup(inst) or None)
LOCAL_CASES = {
    "alias_several_users": ("mbox", ["team"], LBODY, None, None),
    "alias_to_remote": ("mbox", ["remote"], LBODY, None, None),
    "alias_to_missing_file": ("mbox", ["nofile"], LBODY, "pwf3", None),
    "forward_to_command": ("mbox", ["pwf1+cmd"], LBODY, None, None),
    "forward_to_file": ("mbox", ["pwf1+file"], LBODY, None, None),
    "unknown_user_notify_never": ("mbox", ["nosuchpwf NOTIFY=NEVER"], LBODY, None, None),
    "unknown_user_ret_hdrs": ("mbox", ["nosuchpwf ORCPT=rfc822;Someone@elsewhere.test"], LBODY,
                              "pwf3", None),
    "postmaster_mixed_case": ("mbox", ["PostMaster"], LBODY, None, None),
    "duplicate_recipients": ("mbox", ["pwf1", "PWF1", "team"], LBODY, None, None),
    "alias_notify_success": ("mbox", ["team NOTIFY=SUCCESS"], LBODY, "pwf3", None),
    "mailbox_notify_success": ("mbox", ["pwf2 NOTIFY=SUCCESS,FAILURE"], LBODY, "pwf3", None),
    "list_notify_success": ("mbox", ["list NOTIFY=SUCCESS"], LBODY, "pwf3", None),
    "unknown_user_null_sender": ("mbox", ["nosuchpwf"], LBODY, None, None),
    "alias_to_file": ("mbox", ["tofile"], LBODY, None, None),
    "alias_command_ok": ("mbox", ["cmdok"], LBODY, None, None),
    "alias_command_fails": ("mbox", ["cmdfail"], LBODY, "pwf3", None),
    "alias_command_quiet_failure": ("mbox", ["cmdquiet"], LBODY, "pwf3", None),
    "alias_command_tempfail": ("mbox", ["cmdtemp"], LBODY, None, None),
    "alias_command_ex_nouser": ("mbox", ["cmdnouser"], LBODY, "pwf3", None),
    "include_file": ("mbox", ["incl"], LBODY, None, None),
    "forward_backslash_self": ("mbox", ["pwf3+self"], LBODY, None, None),
    "forward_extension_file": ("mbox", ["pwf2+ext"], LBODY, None, None),
    "forward_loop": ("mbox", ["pwf1+loop"], LBODY, "pwf3", None),
    "unknown_user": ("mbox", ["nosuchpwf"], LBODY, "pwf3", None),
    "unknown_and_known": ("mbox", ["nosuchpwf", "pwf1"], LBODY, "pwf3", None),
    "delimiter_unknown_ext": ("mbox", ["pwf1+nofile"], LBODY, None, None),
    "owner_alias_sender": ("mbox", ["list"], LBODY, "pwf2", None),
    "alias_loop": ("mbox", ["loopa"], LBODY, "pwf3", None),
    "alias_self_reference": ("mbox", ["selfloop"], LBODY, None, None),
    "delivered_to_loop": ("mbox", ["pwf2"], [f"Delivered-To: pwf2@{HOST}", *LBODY], "pwf3", None),
    "mailbox_size_limit": ("limit", ["pwf1"], [*BIG, *LBODY], "pwf3", _filled_spool("pwf1", 5000)),
    "maildir_user": ("maildir", ["pwf1"], LBODY, None, None),
    "maildir_alias_users": ("maildir", ["team", "pwf2+x"], LBODY, None, None),
    "maildir_unknown": ("maildir", ["nosuchpwf"], LBODY, "pwf3", None),
    "postmaster_copy_of_bounce": ("maildir", ["nosuchpwf"], LBODY, "pwf3", None),
    "double_bounce_to_postmaster": ("maildir", ["nosuchpwf"], LBODY, None, None),
    "mailbox_command_ok": ("command", ["pwf1"], LBODY, None, None),
    "mailbox_command_tempfail": ("command", ["pwf1+fail"], LBODY, None, None),
    "mailbox_command_bounce": ("command", ["pwf1+bounce"], LBODY, "pwf3", None),
    "mailbox_command_luser_relay": ("command", ["nosuchpwf"], LBODY, None, None),
}
LOCAL_SENDERS = {"unknown_user_ret_hdrs": f"{LSENDER} RET=HDRS ENVID=local5-env"}
PHASES = {
    "mbox": {},
    # one message of ~5000 bytes fits, two do not; the returned bounce still fits
    "limit": {"message_size_limit": "9000", "mailbox_size_limit": "9000"},
    # with postmaster copies of bounces and of undeliverable bounces (notify_classes)
    "maildir": {"home_mailbox": "Maildir/", "notify_classes": "bounce, 2bounce, resource, software",
                "bounce_notice_recipient": "pwf2", "2bounce_notice_recipient": "pwf2"},
    "command": {"mailbox_command": "/bin/sh -c 'cat >\"$HOME/cmd5.$$\"; case \"$EXTENSION\" in "
                                   "fail) exit 75;; bounce) echo no such box; exit 67;; esac'",
                "luser_relay": "pwf2"},
}
LOCAL_XFAIL: dict[str, str] = {}
LOCAL_NOTICE_XFAIL: dict[str, str] = {}


def _local_params(inst, relay: int) -> dict:
    spool = inst.root / "spool"
    aliases = inst.config_dir / "aliases"
    return {"myorigin": "$myhostname", "mydestination": "$myhostname, localhost",
            "local_transport": "local", "alias_maps": f"hash:{aliases}",
            "alias_database": f"hash:{aliases}", "local_recipient_maps": "",
            "mail_spool_directory": str(spool), "recipient_delimiter": "+",
            "relayhost": f"[127.0.0.1]:{relay}", "minimal_backoff_time": "1h",
            "maximal_backoff_time": "2h", "queue_run_delay": "1h"}


class LocalPair:
    def __init__(self, base: Path, users) -> None:
        self.users = users
        self.relay = harness.free_port()      # nothing listens: remote copies stay deferred
        self.ref = harness.ReferencePostfix(base, name="pf-local")
        self.pw = harness.PostwellInstance(base, name="pw-local")
        self.pw.master_cf = (self.pw.default_master_cf() + LOCAL_SERVICE + SMTP_SERVICE
                             + PICKUP_SERVICE)
        self.phase = None
        self.results: dict[str, dict] = {}
        for inst in (self.ref, self.pw):
            spool = inst.root / "spool"
            spool.mkdir()
            os.chown(spool, 0, 8)              # Debian's /var/mail: root:mail 2775
            os.chmod(spool, 0o2775)
            inst.config_dir.mkdir(parents=True, exist_ok=True)
            (inst.config_dir / "aliases").write_text(ALIASES)
        self._configure("mbox")
        for inst in (self.ref, self.pw):
            cp = subprocess.run(["/usr/sbin/postalias", str(inst.config_dir / "aliases")],
                                capture_output=True, text=True, timeout=30)
            assert cp.returncode == 0, cp.stderr
        harness.start_side_by_side(self.ref, self.pw)
        self.phase = "mbox"

    def _configure(self, phase: str) -> None:
        for inst in (self.ref, self.pw):
            params = dict(_local_params(inst, self.relay), **PHASES[phase])
            if inst is self.ref:
                inst.main_cf_extra = params
            else:
                inst.main_cf = params
            inst.write_config()

    def enter(self, phase: str) -> None:
        if phase == self.phase:
            return
        self._configure(phase)
        for inst in (self.ref, self.pw):
            before = inst.log_text().count("reload")
            inst.reload()
            harness.wait_for(lambda: inst.log_text().count("reload") > before, 15, 0.05,
                             f"{inst.kind} reload")
        # Postwell starts the new qmgr once the old one has gone; give both a moment.
        for inst in (self.ref, self.pw):
            harness.wait_banner(inst.port, 15)
        time.sleep(1.0)
        self.phase = phase


@pytest.fixture(scope="module")
def e2e_users():
    """pwf1..pwf3 as test_issue3_local_e2e makes them, under the same machine lock, held
    longer: the issue 3 modules that share the users may run on another worker."""
    with harness.real_users(USERS5, "users-pwf", "pwf-homes-", lock_timeout=1200) as made:
        yield made


@pytest.fixture(scope="module")
def local_pair(tmp_path_factory, e2e_users):
    reset_homes(e2e_users)
    shutil.rmtree(SHARED, ignore_errors=True)
    (SHARED / "drop").mkdir(parents=True)
    os.chmod(SHARED, 0o755)
    os.chmod(SHARED / "drop", 0o1777)      # files from aliases are written as default_privs
    (SHARED / "members5").write_text("pwf1\npwf2\n")
    _forward_files(e2e_users)
    pair = None
    try:
        pair = LocalPair(tmp_path_factory.mktemp("delivery5-local"), e2e_users)
        yield pair
    finally:
        if pair is not None:
            harness.stop_side_by_side([pair.ref, pair.pw])
        reset_homes(e2e_users)
        for pw in e2e_users.values():
            for f in Path(pw.pw_dir).glob("cmd5.*"):
                f.unlink()
        shutil.rmtree(SHARED, ignore_errors=True)


def _notices(inst, users, phase: str, user: str) -> list[bytes]:
    """The notices in the user's mailbox, oldest first.  Maildir and the
    mailbox_command's files are in the home both MTAs share; mbox in each one's spool."""
    if phase == "mbox" or phase == "limit":
        p = inst.root / "spool" / user
        data = p.read_bytes() if p.exists() else b""
        msgs = re.split(rb"^From [^\n]*\n", data, flags=re.M)
    else:
        home = Path(users[user].pw_dir)
        maildir = phase == "maildir"
        files = (home / "Maildir" / "new").glob("*") if maildir else home.glob("cmd5.*")
        msgs = [f.read_bytes() for f in sorted(files, key=lambda f: f.stat().st_mtime_ns)]
    return [m for m in msgs if b"\nContent-Type: multipart/report" in m]


def _addresses(rcpts: list[str], domain: str) -> list[str]:
    """"user" or "user NOTIFY=..." with the domain put after the user."""
    return [r.replace(" ", f"@{domain} ", 1) if " " in r else f"{r}@{domain}" for r in rcpts]


def _keep(pair, name: str, got: dict) -> dict:
    pair.results[name] = got
    if os.environ.get("PARITY_DUMP"):
        print(f"\n== {name}\n" + _diff(got["postfix"][0], got["postwell"][0]))
    return got


def _same_log(got: dict, name: str) -> None:
    want_log, got_log = got["postfix"][0], got["postwell"][0]
    assert got_log == want_log, f"log trail differs in {name!r}:\n{_diff(want_log, got_log)}"


def _queue_json(inst, ports: bool = False) -> list[str]:
    """postqueue -j without what differs from run to run (ids, times, sizes, ports)."""
    objs = [json.loads(x) for x in inst.run("postqueue", "-j").stdout.splitlines()]
    for o in objs:
        del o["queue_id"], o["arrival_time"], o["message_size"]
    dumps = (json.dumps(o, sort_keys=True) for o in objs)
    return sorted(re.sub(r"\]:\d+", "]:PORT", d) if ports else d for d in dumps)


def _case_params(cases: dict, xfail: dict) -> list:
    out = []
    for name in cases:
        marks = []
        if name in xfail:
            marks.append(pytest.mark.xfail(reason=xfail[name], strict=True))
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def _run_local_case(pair, name: str) -> dict:
    """Run a scenario on both MTAs once (the log and notice tests share the run)."""
    if name in pair.results:
        return pair.results[name]
    phase, rcpts, body, notice, setup = LOCAL_CASES[name]
    pair.enter(phase)
    rcpts = _addresses(rcpts, HOST)
    got = {}
    for inst in (pair.ref, pair.pw):
        if setup:
            setup(inst, pair.users)
        sender = ("" if name.endswith("null_sender") or name.startswith("double_bounce")
                  else LOCAL_SENDERS.get(name, LSENDER))
        had = len(_notices(inst, pair.users, phase, notice)) if notice else 0
        before, qid = _send(inst, sender, rcpts, body)
        raw = None
        if notice:
            found = harness.wait_for(lambda: (n := _notices(inst, pair.users, phase, notice))
                                     and len(n) > had and n, TIMEOUT, 0.1, f"{inst.kind}: notice")
            assert len(found) == had + 1, (inst.kind, name, "more than one new notice")
            raw = found[-1]
        got[inst.kind] = (_trail(inst, before, qid), _notice(raw, inst) if raw else None)
    return _keep(pair, name, got)


@pytest.mark.parametrize("name", _case_params(LOCAL_CASES, LOCAL_XFAIL))
def test_local_log_trail_matches_reference(local_pair, name):
    _same_log(_run_local_case(local_pair, name), name)


@pytest.mark.parametrize("name", _case_params({n: c for n, c in LOCAL_CASES.items() if c[3]},
                                              LOCAL_NOTICE_XFAIL))
def test_local_notice_matches_reference(local_pair, name):
    got = _run_local_case(local_pair, name)
    _same_notice(got["postwell"][1], got["postfix"][1], name)


# showq lists a reason as bounce_log_read() gives it back (split_nameval() trims the
# value): a command's output ending in a blank is listed "(busy now)".
def test_local_queue_listing_matches_reference(local_pair):
    """What the local scenarios left deferred (a command's exit 75, remote copies)."""
    for name in LOCAL_CASES:
        _run_local_case(local_pair, name)
    out = {}
    for inst in (local_pair.ref, local_pair.pw):
        text = inst.run("postqueue", "-p").stdout
        out[inst.kind] = _listing(text)
    assert out["postwell"] == out["postfix"], \
        f"postwell:\n{chr(10).join(out['postwell'])}\npostfix:\n{chr(10).join(out['postfix'])}"


def test_local_queue_json_matches_reference(local_pair):
    for name in LOCAL_CASES:
        _run_local_case(local_pair, name)
    out = {inst.kind: _queue_json(inst) for inst in (local_pair.ref, local_pair.pw)}
    assert out["postwell"] == out["postfix"]


def _listing(text: str) -> list[str]:
    text = re.sub(r"^[0-9A-F]{10,12}([*! ]?)\s+\d+ \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d",
                  r"QID\1 SIZE DATE", text, flags=re.M)
    text = re.sub(r"\]:\d+", "]:PORT", text)
    text = re.sub(r"-- \d+ Kbytes in (\d+) Requests?", r"-- N Kbytes in \1 Requests", text)
    # Messages are listed in queue-directory order: compare them as a set of blocks.
    head, _, rest = text.partition("\n")
    return [head] + sorted(b.strip() for b in rest.split("\n\n"))


# ------------------------------------------------------------------ smtp(8) pair

class ScriptedPeer:
    """A loopback SMTP server that misbehaves on cue (one per scenario).

    ``stall``: the command (CONNECT, MAIL, RCPT, DATA, DOT) after which it goes
    silent; ``auth``: the reply to AUTH (offered as PLAIN LOGIN when set);
    ``rcpt``: local part -> reply to RCPT TO; ``dot``: the reply after the data.
    Sessions are threads; the listening socket and every session end at stop().
    """

    def __init__(self, stall: str | None = None, auth: str | None = None,
                 rcpt: dict | None = None, dot: str = "250 2.0.0 Ok: queued as PEER1",
                 starttls: str | None = None, dsn: bool = True, mail: str = "250 2.1.0 Ok",
                 data: str = "354 End data with <CR><LF>.<CR><LF>",
                 greeting: str = "220 peer.test ESMTP", size: int | None = None) -> None:
        self.stall, self.auth, self.rcpt, self.dot = stall, auth, rcpt or {}, dot
        self.starttls, self.dsn, self.mail, self.data = starttls, dsn, mail, data
        self.greeting, self.size = greeting, size
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _silent(self, conn) -> None:
        # Hold the connection open without a word until the client gives up.
        self.stopped.wait(60)

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        f = conn.makefile("rb")
        try:
            if self.stall == "CONNECT":
                return self._silent(conn)
            conn.sendall(self.greeting.replace("\n", "\r\n").encode() + b"\r\n")
            if not self.greeting.startswith("220"):
                # RFC 5321 3.1: after a 554 greeting the server waits for QUIT
                line = f.readline(4096)
                if line:
                    conn.sendall(b"221 2.0.0 Bye\r\n" if line.upper().startswith(b"QUIT")
                                 else b"503 5.5.1 Error: no service\r\n")
                return
            in_data = False
            while True:
                line = f.readline(4096)
                if not line:
                    return
                if in_data:
                    if self.stall == "BODY":
                        return      # hang up in the middle of the message
                    if line.rstrip(b"\r\n") == b".":
                        in_data = False
                        if self.stall == "DOT":
                            return self._silent(conn)
                        conn.sendall(self.dot.encode() + b"\r\n")
                    continue
                cmd = line.decode("latin-1").strip()
                verb = cmd.split(" ", 1)[0].split(":", 1)[0].upper()
                if verb == self.stall:
                    return self._silent(conn)
                if verb == "EHLO":
                    kw = ["peer.test", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
                    if self.dsn:
                        kw.append("DSN")
                    if self.size:
                        kw.insert(1, f"SIZE {self.size}")
                    if self.auth:
                        kw.insert(1, "AUTH PLAIN LOGIN")
                    if self.starttls:
                        kw.insert(1, "STARTTLS")
                    conn.sendall("".join(f"250{'-' if i < len(kw) - 1 else ' '}{k}\r\n"
                                         for i, k in enumerate(kw)).encode())
                elif verb == "HELO":
                    conn.sendall(b"250 peer.test\r\n")
                elif verb == "STARTTLS" and self.starttls:
                    conn.sendall(self.starttls.encode() + b"\r\n")
                elif verb == "AUTH":
                    conn.sendall((self.auth or "503 5.5.1 no AUTH here").encode() + b"\r\n")
                elif verb == "MAIL":
                    conn.sendall(self.mail.encode() + b"\r\n")
                elif verb == "RCPT":
                    local = re.search(r"<([^@>]*)", cmd).group(1)
                    reply = self.rcpt.get(local, "250 2.1.5 Ok")
                    conn.sendall(reply.replace("\n", "\r\n").encode() + b"\r\n")
                elif verb == "DATA":
                    conn.sendall(self.data.encode() + b"\r\n")
                    in_data = self.data.startswith("354")
                elif verb == "RSET":
                    conn.sendall(b"250 2.0.0 Ok\r\n")
                elif verb == "QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    conn.sendall(b"502 5.5.2 Error: command not recognized\r\n")
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()


AUTH_FAIL = "535 5.7.8 Error: authentication failed: bad credentials"
# name -> (peer options or None (nothing listens), transport, next hop form, recipients, notice?)
# The next hop: "[]" is [127.0.0.1]:PORT, "name" is localhost:PORT (looked up, as an MX
# would be, with disable_dns_lookups: the host table).
SMTP_CASES = {
    "greeting_timeout": ({"stall": "CONNECT"}, "smtp", "[]", ["u"], False),
    "mail_timeout": ({"stall": "MAIL"}, "smtp", "[]", ["u"], False),
    "rcpt_timeout": ({"stall": "RCPT"}, "smtp", "[]", ["u"], False),
    "data_timeout": ({"stall": "DATA"}, "smtp", "[]", ["u"], False),
    "end_of_data_timeout": ({"stall": "DOT"}, "smtp", "[]", ["u"], False),
    "tls_required_not_offered": ({}, "smtptls", "[]", ["u"], False),
    "sasl_rejected": ({"auth": AUTH_FAIL}, "smtpauth", "[]", ["u"], False),
    "sasl_no_plaintext_mechanism": ({"auth": AUTH_FAIL}, "smtpauthnp", "[]", ["u"], False),
    "sasl_not_offered": ({}, "smtpauth", "[]", ["u"], False),
    "multiline_rcpt_reject": ({"rcpt": {"u": "550-5.1.1 first line\n550 5.1.1 <u>: no such user"}},
                              "smtp", "[]", ["u"], True),
    "partial_rcpt_failure": ({"rcpt": {"b": "550 5.1.1 <b>: Recipient address rejected",
                                       "c": "452 4.5.3 Too many recipients"}},
                             "smtp", "[]", ["a", "b", "c"], True),
    "end_of_data_reject": ({"dot": "552 5.3.4 Message size exceeds fixed limit"}, "smtp", "[]",
                           ["u", "v"], True),
    "lost_in_message_body": ({"stall": "BODY"}, "smtp", "[]", ["u"], False),
    "tls_required_starttls_refused": ({"starttls": "454 4.7.0 TLS not available due to local problem"},
                                      "smtptls", "[]", ["u"], False),
    "long_deferral_reason": ({"rcpt": {"u": "450 4.2.0 <u>: Recipient address rejected: " +
                                       "greylisted, please come back later " * 4}},
                             "smtp", "[]", ["u"], False),
    "notify_never_reject": ({"rcpt": {"u": "550 5.1.1 <u>: unknown"}}, "smtp", "[]",
                            ["u NOTIFY=NEVER"], False),
    "notify_success_passed_on": ({}, "smtp", "[]", ["u NOTIFY=SUCCESS"], False),
    # a next hop without DSN: the "relayed" notice comes from us (RFC 3461 5.2.2.1)
    "notify_success_relayed": ({"dsn": False}, "smtp", "[]",
                               ["u NOTIFY=SUCCESS,DELAY ORCPT=rfc822;first@remote.test"], True),
    "notify_delay_fail_mixed": ({"rcpt": {"u": "550 5.1.1 <u>: unknown"}}, "smtp", "[]",
                                ["u NOTIFY=FAILURE ORCPT=rfc822;orig-u@remote.test",
                                 "v NOTIFY=SUCCESS"], True),
    "mail_reject_ret_hdrs": ({"mail": "553 5.7.1 <alice@virtual.test>: Sender address rejected"},
                             "smtp", "[]", ["u"], True),
    "null_sender_rejected": ({"rcpt": {"u": "550 5.1.1 <u>: unknown"}}, "smtp", "[]", ["u"], False),
    "data_reject_envid": ({"data": "554 5.5.1 Error: no valid recipients"}, "smtp", "[]", ["u"], True),
    "data_tempfail": ({"data": "451 4.3.0 Error: queue file write error"}, "smtp", "[]", ["u"], False),
    "greeting_554_multiline": ({"greeting": "554-peer.test no service\n554 5.3.2 go away"},
                               "smtp", "[]", ["u"], False),
    "greeting_421": ({"greeting": "421 4.3.2 peer.test Service not available"},
                     "smtp", "[]", ["u"], False),
    "mail_tempfail": ({"mail": "452 4.3.1 Insufficient system storage"}, "smtp", "[]", ["u"], False),
    "size_over_peer_limit": ({"size": 200}, "smtp", "[]", ["u"], True),
    "relay_by_host_name": ({}, "smtp", "name", ["u"], False),
    "host_name_refused": (None, "smtp", "name", ["u"], False),
    "literal_refused": (None, "smtp", "[]", ["u"], False),
    # a discard(8) next hop from transport_maps (error: and retry: ones are refused by
    # smtpd at RCPT already, in both MTAs)
    "discard_transport": (None, "discard", "thrown away", ["u", "v"], False),
    # No transport_maps entry: relayhost (a peer rejecting u's with 554)
    "via_relayhost": (None, None, None, ["u"], True),
    "unresolvable_host": (None, "smtp", "nosuchhost.invalid", ["u"], False),
}
# Scenarios whose MAIL FROM differs from SSENDER (parameters, null sender).
SMTP_SENDERS = {
    "mail_reject_ret_hdrs": "alice@virtual.test RET=HDRS ENVID=env5-1",
    "null_sender_rejected": "",
    "data_reject_envid": "alice@virtual.test RET=FULL ENVID=env5+2Bplus",
}
SMTP_XFAIL: dict[str, str] = {}
SMTP_NOTICE_XFAIL: dict[str, str] = {}
SSENDER = "alice@virtual.test"
SMTP_SERVICES = (
    "smtptls   unix  -       -       n       -       -       smtp\n"
    "  -o smtp_tls_security_level=encrypt\n"
    "smtpauth  unix  -       -       n       -       -       smtp\n"
    "  -o smtp_sasl_auth_enable=yes -o smtp_sasl_security_options=noanonymous\n"
    "smtpauthnp unix -       -       n       -       -       smtp\n"
    "  -o smtp_sasl_auth_enable=yes\n")
SMTP_PARAMS = {
    "transport_maps": "texthash:$config_directory/transport",
    "smtp_sasl_password_maps": "texthash:$config_directory/sasl_passwd",
    "smtp_connection_cache_on_demand": "no",
    # short, but not so short that a loaded machine's slow answer looks like a stall
    "smtp_helo_timeout": "2s", "smtp_mail_timeout": "2s", "smtp_rcpt_timeout": "2s",
    "smtp_data_init_timeout": "2s", "smtp_data_done_timeout": "2s",
    "queue_run_delay": "1h", "minimal_backoff_time": "1h", "maximal_backoff_time": "2h",
}


_FIXED_HOPS = (None, "discard")     # no peer: the next hop is as written


class SmtpPair:
    def __init__(self, base: Path) -> None:
        self.peers: dict[str, ScriptedPeer] = {}
        self.ports: dict[str, int] = {}
        self.relayhost = ScriptedPeer(rcpt={"u": "554 5.7.1 <u>: Relay access denied"})
        for name, (opts, transport, *_rest) in SMTP_CASES.items():
            if transport in _FIXED_HOPS or "." in SMTP_CASES[name][2]:
                continue
            if opts is None:
                self.ports[name] = harness.free_port()
            else:
                self.peers[name] = ScriptedPeer(**opts)
                self.ports[name] = self.peers[name].port
        table, passwd = [], []
        for name, (_o, transport, form, _r, _n) in SMTP_CASES.items():
            if transport is None:
                continue
            if transport in _FIXED_HOPS or "." in form:
                table.append(f"{name.replace('_', '-')}.test {transport}:{form}\n")
                continue
            port = self.ports[name]
            hop = f"[127.0.0.1]:{port}" if form == "[]" else f"localhost:{port}"
            table.append(f"{name.replace('_', '-')}.test {transport}:{hop}\n")
            passwd.append(f"{hop} user5:secret5\n")
        params = dict(SMTP_PARAMS, relayhost=f"[127.0.0.1]:{self.relayhost.port}")
        self.ref = harness.ReferencePostfix(base, params, name="pf-smtp",
                                            master_cf_extra=SMTP_SERVICES)
        self.pw = harness.PostwellInstance(base, params, name="pw-smtp")
        self.pw.master_cf = self.pw.default_master_cf() + SMTP_SERVICE + SMTP_SERVICES
        self.pw.write_config()
        for inst in (self.ref, self.pw):
            (inst.config_dir / "transport").write_text("".join(table))
            (inst.config_dir / "sasl_passwd").write_text("".join(passwd))
        self.results: dict[str, dict] = {}
        harness.start_side_by_side(self.ref, self.pw)

    def stop(self) -> None:
        harness.stop_side_by_side([self.ref, self.pw])
        for p in [*self.peers.values(), self.relayhost]:
            p.stop()


@pytest.fixture(scope="module")
def smtp_pair(tmp_path_factory):
    pair = None
    try:
        pair = SmtpPair(tmp_path_factory.mktemp("delivery5-smtp"))
        yield pair
    finally:
        if pair is not None:
            pair.stop()


def _run_smtp_case(pair, name: str) -> dict:
    if name in pair.results:
        return pair.results[name]
    _o, _t, _f, rcpts, notice = SMTP_CASES[name]
    domain = name.replace("_", "-") + ".test"
    body = ["Subject: smtp sweep", "Message-ID: <smtp5@client.test>", "", "hello"]
    got = {}
    for inst in (pair.ref, pair.pw):
        seen = set(inst.maildir_messages("alice"))
        addrs = _addresses(rcpts, domain)
        before, qid = _send(inst, SMTP_SENDERS.get(name, SSENDER), addrs, body)
        raw = None
        if notice:
            # The new file, not the last by name: names made in one second sort by
            # inode, and an earlier case's notice may arrive late.
            new = [f for f in inst.wait_maildir("alice", len(seen) + 1, TIMEOUT)
                   if f not in seen]
            ours = [f for f in new if domain.encode() in f.read_bytes()]
            raw = (ours or new)[-1].read_bytes()
        got[inst.kind] = (_trail(inst, before, qid), _notice(raw, inst) if raw else None)
    return _keep(pair, name, got)


@pytest.mark.parametrize("name", _case_params(SMTP_CASES, SMTP_XFAIL))
def test_smtp_log_trail_matches_reference(smtp_pair, name):
    _same_log(_run_smtp_case(smtp_pair, name), name)


@pytest.mark.parametrize("name", _case_params({n: c for n, c in SMTP_CASES.items() if c[4]},
                                              SMTP_NOTICE_XFAIL))
def test_smtp_notice_matches_reference(smtp_pair, name):
    got = _run_smtp_case(smtp_pair, name)
    _same_notice(got["postwell"][1], got["postfix"][1], name)


# ------------------------------------------------------------------ queue tools after those

def _all_smtp_cases(pair) -> None:
    for name in SMTP_CASES:
        _run_smtp_case(pair, name)


def test_smtp_deferred_listing_matches_reference(smtp_pair):
    """postqueue -p: the deferral reasons of every scenario (time-outs, TLS, SASL, lost
    connections, a long reply, a refused connection, a partial failure)."""
    _all_smtp_cases(smtp_pair)
    out = {inst.kind: _listing(inst.run("postqueue", "-p").stdout)
           for inst in (smtp_pair.ref, smtp_pair.pw)}
    assert len(out["postfix"]) > 10
    assert out["postwell"] == out["postfix"], \
        "\n".join(_diff(out["postfix"], out["postwell"]).splitlines())


def test_smtp_deferred_json_matches_reference(smtp_pair):
    _all_smtp_cases(smtp_pair)
    out = {inst.kind: _queue_json(inst, ports=True) for inst in (smtp_pair.ref, smtp_pair.pw)}
    assert out["postwell"] == out["postfix"], _diff(out["postfix"], out["postwell"])


def _deferred_ids(inst) -> list[str]:
    return sorted(json.loads(x)["queue_id"] for x in inst.run("postqueue", "-j").stdout.splitlines()
                  if json.loads(x)["queue_name"] == "deferred")


def test_postsuper_and_mailq_after_deferrals_match_reference(smtp_pair):
    """Hold one, hold the rest, list, release, delete one by id, delete the rest,
    and the empty queue: the tools' messages and exit codes, ids normalised."""
    _all_smtp_cases(smtp_pair)
    got = {}
    for inst in (smtp_pair.ref, smtp_pair.pw):
        steps = []

        def step(tool, *args):
            if tool == "sendmail" and inst is smtp_pair.ref:   # names its config with -C
                cp = subprocess.run(["/usr/sbin/sendmail", "-C", str(inst.config_dir), *args],
                                    capture_output=True, text=True, timeout=60,
                                    stdin=subprocess.DEVNULL)
            else:
                cp = inst.run(tool, *args)
            text = _QID.sub("QID", cp.stdout + "|" + cp.stderr)
            steps.append((tool, *[_QID.sub("QID", a) for a in args], cp.returncode, text))
            return cp
        ids = _deferred_ids(inst)
        assert len(ids) > 5, inst.kind
        step("postsuper", "-h", ids[0])
        step("postsuper", "-h", ids[0])           # already held: nothing to say
        step("postsuper", "-h", "ALL", "deferred")
        cp = step("postqueue", "-p")
        steps[-1] = ("postqueue -p", _listing(cp.stdout))
        step("postsuper", "-H", "ALL")
        step("postsuper", "-d", ids[0], "hold")   # released: not in hold any more
        step("postsuper", "-d", ids[1])
        step("postsuper", "-d", ids[1])           # gone already
        step("postsuper", "-d", "ALL", "deferred")
        step("postqueue", "-p")
        step("sendmail", "-bp")                   # mailq
        step("postqueue", "-j")
        got[inst.kind] = steps
    assert got["postwell"] == got["postfix"], _diff([repr(x) for x in got["postfix"]],
                                                    [repr(x) for x in got["postwell"]])
