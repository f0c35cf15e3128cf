"""The command-line tools load only what the operation asked for needs.

Every test run starts postconf, postmap, postqueue, postsuper, postcat and
sendmail in fresh interpreters many times, as admins' scripts do: a tool that
drags in the submission machinery (pickup, cleanup, dsn, qmgr), the daemons,
asyncio or the interface scan behind the machine-dependent defaults pays for
it on every start.  Each case runs one tool in a subprocess and lists the
modules it imported, less those a bare interpreter has at start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Runs the tool as `python -m postwell.cli.TOOL` would, then records sys.modules.
DRIVER = r"""
import runpy, sys
out, mod = sys.argv[1], sys.argv[2]
sys.argv = [mod] + sys.argv[3:]
code = 0
if mod:
    try:
        runpy.run_module("postwell.cli." + mod, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
mods = sorted(sys.modules)
import json
with open(out, "w") as f:
    json.dump({"code": code, "modules": mods}, f)
"""

SUBMISSION = ("postwell.pickup", "postwell.cleanup", "postwell.dsn", "postwell.qmgr")
DAEMONS = ("postwell.smtpd", "postwell.delivery", "postwell.master", "email")
# What reading main.cf may not cost: the interface scan (ctypes, getifaddrs)
# behind the machine-dependent defaults, and the queue with its asyncio.
CONFIG_ONLY = SUBMISSION + DAEMONS + ("asyncio", "ssl", "json", "ctypes", "postwell.queue",
                                      "postwell.config.machine")
TABLES_ONLY = SUBMISSION + DAEMONS + ("asyncio", "ssl", "json", "postwell.queue")
QUEUE_READER = SUBMISSION + DAEMONS + ("json", "postwell.tables")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("startup8")

    def instance(name):
        etc, queue = base / name / "etc", base / name / "queue"
        etc.mkdir(parents=True)
        (etc / "main.cf").write_text(
            f"queue_directory = {queue}\n"
            f"maillog_file = {base / name / 'maillog'}\n"
            "myhostname = mx.example.test\n"
            "mydomain = example.test\n"
            # Set, so that -n lists it: showing it must not compute the default.
            "mynetworks = 127.0.0.0/8\n"
            f"alias_maps = hash:{etc}/aliases\n"
            f"alias_database = hash:{etc}/aliases\n")
        (etc / "master.cf").write_text(
            "smtp      inet  n       -       n       -       -       smtpd\n")
        (etc / "aliases").write_text("postmaster: root\n")
        (etc / "map").write_text("a@example.com x\n")
        from postwell.queue import QueueStore
        store = QueueStore(str(queue))
        store.ensure_layout()
        return str(etc), store

    etc, store = instance("a")
    from postwell.cli import postmap
    assert postmap.run(["-c", etc, f"hash:{etc}/map"], "postmap") == 0
    m = store.create()
    m.set_sender("s@example.com")
    m.add_recipient("r@example.net")
    m.write(b"Subject: t\n\nhi\n")
    m.commit()
    store.move(m.queue_id, "incoming", "deferred")
    # postsuper -d ALL gets a queue of its own: the cases run side by side.
    etc2, _ = instance("b")
    return base, etc, etc2, m.queue_id


def _launch(base, name, tool, args, config):
    out = base / f"{name}.json"
    env = dict(os.environ, MAIL_CONFIG=config)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(out), tool, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    return proc, out


def test_tools_import_only_what_they_need(site):
    base, etc, etc2, qid = site
    cases = {
        "postconf -d NAME": ("postconf", ["-c", etc, "-d", "mail_version"], etc, CONFIG_ONLY),
        "postconf NAME": ("postconf", ["-c", etc, "mynetworks"], etc, CONFIG_ONLY),
        "postconf -n": ("postconf", ["-c", etc, "-n"], etc, CONFIG_ONLY),
        "postmap -q": ("postmap", ["-c", etc, "-q", "a@example.com", f"hash:{etc}/map"], etc,
                       TABLES_ONLY),
        "postalias": ("postalias", ["-c", etc, f"hash:{etc}/aliases"], etc, TABLES_ONLY),
        "newaliases": ("sendmail", ["-C", etc, "-bi"], etc, TABLES_ONLY),
        "postqueue -p": ("postqueue", ["-c", etc, "-p"], etc, QUEUE_READER),
        "postcat -q": ("postcat", ["-c", etc, "-q", qid], etc, QUEUE_READER),
        "postsuper -d ALL": ("postsuper", ["-c", etc2, "-d", "ALL"], etc2, QUEUE_READER),
        "bare interpreter": ("", [], etc, ()),
    }
    running = {name: _launch(base, name.replace(" ", "_"), tool, args, config)
               for name, (tool, args, config, _) in cases.items()}
    results = {}
    for name, (proc, out) in running.items():
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode == 0, (name, err)
        results[name] = json.loads(out.read_text())
    baseline = set(results["bare interpreter"]["modules"])
    bad = {}
    for name, (_, _, _, forbidden) in cases.items():
        assert results[name]["code"] in (0, None), (name, results[name]["code"])
        loaded = set(results[name]["modules"]) - baseline
        found = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))
        if found:
            bad[name] = found
    assert not bad, "\n".join(f"{name}: {', '.join(mods)}" for name, mods in bad.items())


def test_machine_defaults_are_computed_on_first_use():
    """DEFAULTS lists the machine-dependent names from the start; their values
    (an interface scan) come when one of them, or the whole table, is read."""
    code = (
        "import sys\n"
        "from postwell.config.defaults import DEFAULTS\n"
        "assert 'mynetworks' in DEFAULTS and 'myhostname' in list(DEFAULTS)\n"
        "assert DEFAULTS.get('mail_name') == 'postwell'\n"
        "assert 'postwell.config.machine' not in sys.modules\n"
        "copy = dict(DEFAULTS)\n"
        "assert 'postwell.config.machine' in sys.modules\n"
        "assert copy['mynetworks'] and copy['myhostname'] and copy == DEFAULTS\n"
        "assert copy['process_id'] == str(__import__('os').getpid())\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr


def test_machine_defaults_match_the_machine_module():
    from postwell.config import machine
    from postwell.config.defaults import DEFAULTS, MACHINE_DEPENDENT
    static = machine.static_machine_defaults()
    for name in MACHINE_DEPENDENT:
        if name != "process_id":
            assert DEFAULTS[name] == static[name]
    assert list(DEFAULTS)[-len(MACHINE_DEPENDENT):] == list(MACHINE_DEPENDENT)


# ------------------------------------------- postqueue -p: Postfix's recipient order
# showq lists a message's defer log in log order, then the queue recipients the log
# did not name; postqueue prints a "(reason)" line at each change of reason,
# "(reason unavailable)" for a recipient without one after one with a reason, and a
# log entry without a reason has "(description unavailable)".  Expected lines as
# Postfix 3.7 printed them for the same queue file and defer log.

def _reason(text, pad):
    return " " * pad + f"({text})"


def _rcpt(address):
    return " " * 41 + address


UNAVAILABLE = _reason("reason unavailable", 58)
NO_DESCRIPTION = _reason("(description unavailable)", 51)

LISTINGS = {
    "subset, out of queue order": (
        [("c@r.test", "R1"), ("a@r.test", "R1")],
        [_reason("R1", 74), _rcpt("c@r.test"), _rcpt("a@r.test"), UNAVAILABLE,
         _rcpt("b@r.test"), _rcpt("d@r.test")]),
    "alternating reasons": (
        [("a@r.test", "R1"), ("b@r.test", "R2"), ("c@r.test", "R1"), ("d@r.test", "R2")],
        [_reason("R1", 74), _rcpt("a@r.test"), _reason("R2", 74), _rcpt("b@r.test"),
         _reason("R1", 74), _rcpt("c@r.test"), _reason("R2", 74), _rcpt("d@r.test")]),
    "76 and 77 bytes": (
        [("a@r.test", "y" * 76), ("b@r.test", "y" * 77)],
        [_reason("y" * 76, 0), _rcpt("a@r.test"), _reason("y" * 77, 0), _rcpt("b@r.test"),
         UNAVAILABLE, _rcpt("c@r.test"), _rcpt("d@r.test")]),
    "padding counts bytes": (
        [("a@r.test", "d\u00e9faut temporaire"), ("b@r.test", "plain")],
        [_reason("d\u00e9faut temporaire", 58), _rcpt("a@r.test"), _reason("plain", 71),
         _rcpt("b@r.test"), UNAVAILABLE, _rcpt("c@r.test"), _rcpt("d@r.test")]),
    "entries without a reason": (
        [("a@r.test", "R1"), ("b@r.test", "  "), ("c@r.test", None)],
        [_reason("R1", 74), _rcpt("a@r.test"), NO_DESCRIPTION, _rcpt("b@r.test"),
         _rcpt("c@r.test"), UNAVAILABLE, _rcpt("d@r.test")]),
    "blanks trimmed": (
        [("a@r.test", "busy now "), ("b@r.test", "busy now")],
        [_reason("busy now", 68), _rcpt("a@r.test"), _rcpt("b@r.test"), UNAVAILABLE,
         _rcpt("c@r.test"), _rcpt("d@r.test")]),
    "an address the queue file does not hold": (
        [("x@elsewhere.test", "R9"), ("b@r.test", "R1")],
        [_reason("R9", 74), _rcpt("x@elsewhere.test"), _reason("R1", 74), _rcpt("b@r.test"),
         UNAVAILABLE, _rcpt("a@r.test"), _rcpt("c@r.test"), _rcpt("d@r.test")]),
}


@pytest.fixture(scope="module")
def deferred_message(tmp_path_factory):
    from postwell.queue import QueueStore
    base = tmp_path_factory.mktemp("listing8")
    etc, queue = base / "etc", base / "queue"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {queue}\n"
                                 f"maillog_file = {base / 'maillog'}\n")
    store = QueueStore(str(queue))
    store.ensure_layout()
    m = store.create()
    m.set_sender("s@example.org")
    for r in ("a@r.test", "b@r.test", "c@r.test", "d@r.test"):
        m.add_recipient(r)
    m.write(b"Subject: t\n\nhi\n")
    m.commit()
    store.move(m.queue_id, "incoming", "deferred")
    return str(etc), store, m.queue_id


@pytest.mark.parametrize("case", list(LISTINGS))
def test_postqueue_lists_recipients_as_postfix(deferred_message, case, capsys):
    from postwell.cli import postqueue
    from postwell.queue import format as qf
    etc, store, qid = deferred_message
    entries, want = LISTINGS[case]
    log = b"".join(qf.pack_log_entry({k: v for k, v in (("recipient", a), ("status", "4.4.1"),
                                                        ("action", "delayed"), ("reason", why))
                                      if v is not None}) for a, why in entries)
    with open(store.path("defer", qid), "wb") as f:
        f.write(log)
    assert postqueue.main(["-c", etc, "-p"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[1].startswith(qid) and lines[1].endswith(" s@example.org")
    assert lines[2:-3] == want
    assert lines[-3:] == ["", "-- 0 Kbytes in 1 Request.", ""]
