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
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import dialogue, free_port, wait_for  # noqa: E402
from test_issue3_local_e2e import LocalSite, e2e_users, reset_homes  # noqa: E402,F401
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
        # Without a pickup service Postfix's postdrop warns about the missing trigger.
        assert rc == 0 and err in (b"", b"postdrop: warning: unable to look up public/pickup: "
                                        b"No such file or directory\n")
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
        cp = inst.run("postsuper", "-d", "NOTANID!")
        results.append((cp.returncode, cp.stderr))
        cp = inst.run("postsuper", "-d", "ALL", "hold")
        results.append((cp.returncode, cp.stderr))
        # What is left: the deferred message (the maildrop one is not in the default queues).
        cp = inst.run("postsuper", "-r", "ALL")
        results.append((cp.returncode, cp.stderr))
    half = len(results) // 2
    assert results[:half] == results[half:], results


# ------------------------------------------------------------------ local(8) side by side

HOST = "mx.example.test"
SHARED_DIR = Path("/tmp/pwe-shared")       # same path for both MTAs: the log lines name it
LOCAL_ALIASES = ("postmaster: root\nroot: pwe2\n"
                 "ghost: nosuchpwe\n"
                 "team: pwe1, far@far.test\n"
                 'runit: "|/bin/true"\n'
                 f"incl: :include:{SHARED_DIR}/members\n"
                 f"tofile: {SHARED_DIR}/drop/file.mbox\n")
# (recipient, extra header lines): each goes in as its own message.
SCENARIOS = [
    (f"pwe1+tag@{HOST}", []),
    (f"PWE1@{HOST}", []),
    (f"pwe1@{HOST}", [f"Delivered-To: pwe1@{HOST}"]),       # a mail loop
    (f"ghost@{HOST}", []),                                  # alias to an unknown user
    (f"team@{HOST}", []),                                   # local + remote members
    (f"root@{HOST}", []),
    (f"runit@{HOST}", []),
    (f"pwe3@{HOST}", []),                                   # .forward: pwe2, \pwe3
    (f"incl@{HOST}", []),
    (f"tofile@{HOST}", []),
]
LOCAL_LINE = re.compile(r"postfix/local\[\d+\]: (?P<qid>\w+): (?P<rest>to=<.*)$")


def _local_params(spool, aliases, relay: int) -> dict:
    return {"myorigin": "$myhostname", "mydestination": "$myhostname, localhost",
            "local_transport": "local", "alias_maps": f"hash:{aliases}", "alias_database": f"hash:{aliases}",
            "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
            "mail_spool_directory": str(spool), "recipient_delimiter": "+",
            "relayhost": f"[127.0.0.1]:{relay}", "minimal_backoff_time": "1h", "queue_run_delay": "1h"}


def _local_results(inst, qids: set[str]) -> list[str]:
    """Local delivery outcomes of the given messages (and of messages they were forwarded as)."""
    out = []
    lines = inst.log_text().splitlines()
    changed = True
    while changed:                     # follow "forwarded as NEWID"
        changed = False
        for ln in lines:
            m = LOCAL_LINE.search(ln)
            if m and m.group("qid") in qids:
                f = re.search(r"forwarded as (\w+)\)", ln)
                if f and f.group(1) not in qids:
                    qids.add(f.group(1))
                    changed = True
    for ln in lines:
        m = LOCAL_LINE.search(ln)
        if m and m.group("qid") in qids:
            rest = re.sub(r"delay=[\d.]+, delays=[\d./]+, ", "", m.group("rest"))
            rest = rest.replace(str(inst.root), "INSTANCE")
            out.append(re.sub(r"forwarded as \w+\)", "forwarded as ID)", rest))
    return sorted(out)


def _run_scenario(inst, rcpt: str, headers: list[str]) -> list[str]:
    lines = ["EHLO client.test", "MAIL FROM:<sender@remote.test>", f"RCPT TO:<{rcpt}>", "DATA",
             *headers, "Subject: side by side", "", "hello", ".", "QUIT"]
    replies = dialogue(inst.port, lines, timeout=30)
    m = re.search(r"queued as (\w+)", str(replies[-2]))
    assert m, (inst.kind, rcpt, replies)
    qid = m.group(1)
    try:
        wait_for(lambda: re.search(rf"{qid}: removed", inst.log_text()) and
                 not inst.queue_files(("incoming", "active")), 30, 0.1, f"{rcpt} done")
    except TimeoutError:
        raise AssertionError(f"{inst.kind}: {rcpt} not finished:\n{inst.log_text()[-3000:]}") from None
    return _local_results(inst, {qid})


def _start_pair(postwell_factory, reference_factory, e2e_users, extra: dict, relay: int):
    """postwell and the reference Postfix with the same main.cf settings and aliases."""
    ours = LocalSite(postwell_factory, e2e_users, aliases=LOCAL_ALIASES,
                     params=dict({"relayhost": f"[127.0.0.1]:{relay}", "minimal_backoff_time": "1h",
                                  "queue_run_delay": "1h"}, **extra))
    ref = reference_factory()
    spool = ref.root / "spool"
    spool.mkdir()
    os.chown(spool, 0, 8)
    os.chmod(spool, 0o2775)
    aliases = ref.config_dir / "aliases"
    aliases.write_text(LOCAL_ALIASES)
    ref.main_cf_extra = dict(_local_params(spool, aliases, relay), **extra)
    ref.write_config()
    cp = subprocess.run(["/usr/sbin/postalias", str(aliases)], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    ref.start()
    return ours.inst, ref


def _compare(ours, ref, scenarios) -> None:
    for rcpt, headers in scenarios:
        theirs = _run_scenario(ref, rcpt, headers)
        mine = _run_scenario(ours, rcpt, headers)
        assert theirs, rcpt
        assert mine == theirs, f"{rcpt}:\npostwell: {mine}\nPostfix:  {theirs}"


@pytest.mark.parametrize("home_mailbox", ["", "Maildir/"])
def test_local_delivery_outcomes_match_postfix(postwell_factory, reference_factory, e2e_users, home_mailbox):
    reset_homes(e2e_users)
    pw3 = e2e_users["pwe3"]
    fwd = Path(pw3.pw_dir) / ".forward"
    fwd.write_text("pwe2, \\pwe3\n")
    os.chown(fwd, pw3.pw_uid, pw3.pw_gid)
    shutil.rmtree(SHARED_DIR, ignore_errors=True)
    (SHARED_DIR / "drop").mkdir(parents=True)
    os.chmod(SHARED_DIR, 0o755)
    os.chmod(SHARED_DIR / "drop", 0o1777)      # files from aliases are written as default_privs
    (SHARED_DIR / "members").write_text("pwe1\npwe2\n")
    try:
        ours, ref = _start_pair(postwell_factory, reference_factory, e2e_users,
                                {"home_mailbox": home_mailbox}, free_port())
        _compare(ours, ref, SCENARIOS)
        # both appended to the same file, each as default_privs
        assert (SHARED_DIR / "drop" / "file.mbox").read_bytes().count(b"\nSubject: side by side\n") == 2
        assert os.stat(SHARED_DIR / "drop" / "file.mbox").st_uid == pwd.getpwnam("nobody").pw_uid
    finally:
        reset_homes(e2e_users)
        shutil.rmtree(SHARED_DIR, ignore_errors=True)


VARIANTS = {
    # the second message would take the mailbox past the limit
    # (messages of ~5000 bytes: one fits, two do not, and the bounce with the
    # returned message stays under message_size_limit, which may not exceed
    # mailbox_size_limit)
    "mailbox_size_limit": ({"message_size_limit": "9000", "mailbox_size_limit": "9000"},
                           [(f"pwe1@{HOST}", [f"X-Filler-{i}: " + "x" * 1150 for i in range(4)])] * 2),
    "luser_relay": ({"luser_relay": "pwe2", "local_recipient_maps": ""},
                    [(f"nosuchpwe@{HOST}", []), (f"pwe1@{HOST}", [])]),
    "mailbox_command": ({"mailbox_command": "/bin/sh -c 'id -u > \"$HOME/uid.txt\"; cat >/dev/null'"},
                        [(f"pwe3@{HOST}", [])]),
    # root without an alias: its own mailbox (Postfix delivers that one as root)
    "root_mailbox": ({"alias_maps": "", "alias_database": "",
                      "local_recipient_maps": "proxy:unix:passwd.byname"},
                     [(f"root@{HOST}", [])]),
    "no_commands": ({"allow_mail_to_commands": "", "allow_mail_to_files": ""},
                    [(f"runit@{HOST}", []), (f"tofile@{HOST}", [])]),
    # a spool directory users cannot write to (root:root 0755)
    "closed_spool": ({}, [(f"pwe1@{HOST}", [])]),
}


def _closed_spool(inst) -> None:
    os.chown(inst.root / "spool", 0, 0)
    os.chmod(inst.root / "spool", 0o755)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_local_settings_match_postfix(postwell_factory, reference_factory, e2e_users, variant):
    params, scenarios = VARIANTS[variant]
    reset_homes(e2e_users)
    try:
        ours, ref = _start_pair(postwell_factory, reference_factory, e2e_users, params, free_port())
        if variant == "closed_spool":
            _closed_spool(ours)
            _closed_spool(ref)
        _compare(ours, ref, scenarios)
        if variant == "mailbox_command":
            pw = e2e_users["pwe3"]
            uid_file = Path(pw.pw_dir) / "uid.txt"
            assert uid_file.read_text().strip() == str(pw.pw_uid)     # run as the user, by both
            assert os.stat(uid_file).st_uid == pw.pw_uid
        if variant == "root_mailbox":
            for inst in (ours, ref):
                st = os.stat(inst.root / "spool" / "root")
                assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600), inst.kind
    finally:
        reset_homes(e2e_users)


def test_active_message_marked_like_postfix(postwell_factory, reference_factory):
    """A message being delivered (a relay that never greets) is listed with '*'."""
    import socket
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)          # connections complete in the backlog; nobody ever answers
    try:
        port = silent.getsockname()[1]
        params = {"relayhost": f"[127.0.0.1]:{port}", "smtp_helo_timeout": "120s",
                  "minimal_backoff_time": "1h", "queue_run_delay": "1h"}
        ref = reference_factory(params).start()
        ours = postwell_factory(params)
        ours.master_cf = ours.default_master_cf() + SMTP_SERVICE
        ours.write_config()
        ours.start(timeout=60)
        listings = []
        for inst in (ours, ref):
            replies = dialogue(inst.port, ["EHLO client.test", "MAIL FROM:<s@remote.test>",
                                           "RCPT TO:<a@far.test>", "RCPT TO:<b@far.test>", "DATA",
                                           "Subject: slow", "", "hello", ".", "QUIT"], timeout=30)
            qid = re.search(r"queued as (\w+)", str(replies[-2])).group(1)
            wait_for(lambda: (inst.queue_dir / "active").exists() and
                     any(p.name == qid for p in (inst.queue_dir / "active").rglob("*")), 30, 0.05,
                     f"{inst.kind}: {qid} in active/")
            cp = inst.run("postqueue", "-p")
            assert cp.returncode == 0, cp.stderr
            listings.append(cp.stdout)
        mine, theirs = listings
        assert normalise(mine) == normalise(theirs), f"postwell:\n{mine}\nPostfix:\n{theirs}"
        assert normalise(mine)[1] == "MESSAGE* s@remote.test"
    finally:
        silent.close()         # resets the waiting connections: both defer and stop quickly
