"""postcat(1): queue files and maildrop files shown as Postfix 3.7's postcat shows them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import dialogue, free_port, wait_for  # noqa: E402

from postwell.cli import postcat  # noqa: E402
from postwell.pickup import maildrop as md  # noqa: E402
from postwell.queue import QueueStore  # noqa: E402

ARRIVAL = 1_795_933_440.25
CONTENT = b"Subject: hi\nX-Test: yes\n\nbody line\nFrom here\n"


@pytest.fixture
def env(tmp_path):
    qdir = tmp_path / "queue"
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {qdir}\n")
    store = QueueStore(str(qdir), clock=lambda: ARRIVAL)
    store.ensure_layout()
    return store, str(etc)


def put(store, queue="hold", done=False):
    m = store.create()
    m.set_sender("s@remote.test", ret="HDRS", envid="env-1")
    m.set_attribute("client_name", "unknown")
    m.set_attribute("protocol_name", "ESMTP")
    m.add_recipient("a@far.test", orig="A@far.test", orcpt="rfc822;A@far.test", notify="SUCCESS,FAILURE")
    m.add_recipient("b@far.test")
    m.write(CONTENT)
    m.commit()
    if done:
        with store.open(m.queue_id) as qm:
            qm.mark_done(["b@far.test"])
    store.move(m.queue_id, "incoming", queue)
    return m.queue_id


def cat(capsys, *args) -> tuple[int, str, str]:
    rc = postcat.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_full_output(env, capsys):
    store, etc = env
    qid = put(store)
    rc, out, err = cat(capsys, "-c", etc, "-q", qid)
    stamp = time.asctime(time.localtime(ARRIVAL))
    sizes = " ".join(f"{n:>15}" for n in (len(CONTENT), 64, 2, 0, len(CONTENT), 0))
    assert (rc, err) == (0, "")
    assert out == (
        f"*** ENVELOPE RECORDS hold/{qid} ***\n"
        f"message_size: {sizes}\n"
        f"message_arrival_time: {stamp}\n"
        f"create_time: {stamp}\n"
        "named_attribute: client_name=unknown\n"
        "named_attribute: protocol_name=ESMTP\n"
        "named_attribute: envelope_id=env-1\n"
        "named_attribute: ret_flags=2\n"
        "sender: s@remote.test\n"
        "named_attribute: notify_flags=6\n"
        "named_attribute: dsn_orig_rcpt=rfc822;A@far.test\n"
        "original_recipient: A@far.test\n"
        "recipient: a@far.test\n"
        "original_recipient: b@far.test\n"
        "recipient: b@far.test\n"
        f"*** MESSAGE CONTENTS hold/{qid} ***\n"
        "Subject: hi\nX-Test: yes\n\nbody line\nFrom here\n"
        f"*** HEADER EXTRACTED hold/{qid} ***\n"
        f"*** MESSAGE FILE END hold/{qid} ***\n")


def test_sections(env, capsys):
    store, etc = env
    qid = put(store, "deferred")
    _, out, _ = cat(capsys, "-c", etc, "-h", "-q", qid)
    assert out == "Subject: hi\nX-Test: yes\n"        # no markers without -e
    _, out, _ = cat(capsys, "-c", etc, "-b", "-q", qid)
    assert out == "\nbody line\nFrom here\n"          # the empty line belongs to the body
    _, out, _ = cat(capsys, "-c", etc, "-e", "-q", qid)
    lines = out.splitlines()
    assert lines[0] == f"*** ENVELOPE RECORDS deferred/{qid} ***"
    assert lines[-3:] == [f"*** MESSAGE CONTENTS deferred/{qid} ***",
                          f"*** HEADER EXTRACTED deferred/{qid} ***",
                          f"*** MESSAGE FILE END deferred/{qid} ***"]
    _, out, _ = cat(capsys, "-c", etc, "-eh", "-q", qid)
    assert f"*** MESSAGE CONTENTS deferred/{qid} ***\nSubject: hi\nX-Test: yes\n*** HEADER EXTRACTED" in out
    _, both, _ = cat(capsys, "-c", etc, "-hb", "-q", qid)
    assert both == CONTENT.decode()


def test_offsets_point_into_the_file(env, capsys):
    store, etc = env
    qid = put(store)
    _, out, _ = cat(capsys, "-c", etc, "-o", "-q", qid)
    data = open(store.path("hold", qid), "rb").read()
    lines = out.splitlines()
    assert lines[0] == f"*** ENVELOPE RECORDS hold/{qid} ***"      # no offset, as in Postfix
    for line in lines[1:]:
        m = re.match(r"^ *(\d+) (.*)$", line)
        assert m and len(line) - len(line.lstrip()) + len(m.group(1)) == 9, line
        off, text = int(m.group(1)), m.group(2)
        if text == "body line":
            assert data[off:].startswith(b"body line\n")
        elif text.startswith("sender: "):
            assert data[off:off + 1] == b"S" and b"s@remote.test" in data[off:off + 20]
        elif text.startswith("named_attribute: client_name="):
            assert data[off:off + 1] == b"A" and data[off + 5:].startswith(b"client_name\0unknown")
        elif text.startswith("named_attribute: envelope_id="):
            assert data[off:off + 1] == b"P" and data[off + 5:].startswith(b"envid\0env-1")
        elif text.startswith("recipient: b@far.test"):
            assert data[off:off + 1] == b"R" and data[off + 6:].startswith(b"b@far.test\0")


def test_file_argument_done_recipient_and_errors(env, capsys, tmp_path):
    store, etc = env
    qid = put(store, done=True)
    path = store.path("hold", qid)
    rc, out, _ = cat(capsys, "-e", path)
    assert rc == 0
    assert out.startswith(f"*** ENVELOPE RECORDS {path} ***\n")
    assert "\noriginal_recipient: b@far.test\ndone_recipient: b@far.test\n" in out
    rc, out, err = cat(capsys, "-c", etc, "-q", "ABCDEF123")
    assert (rc, out, err) == (1, "", "postcat: fatal: open queue file ABCDEF123: No such file or directory\n")
    junk = tmp_path / "junk"
    # First byte no envelope record type: Postfix warns and goes on.
    junk.write_bytes(b"hello, not a queue file\n")
    # As Postfix: a warning, and on with the next file.
    rc, out, err = cat(capsys, "-h", str(junk), path)
    assert (rc, out, err) == (0, "Subject: hi\nX-Test: yes\n",
                              f"postcat: warning: {junk}: input is not a valid queue file\n")
    # -q without ids reads standard input as Postfix does: tests/test_cli_parity.py.


def test_standard_input(env, tmp_path):
    store, etc = env
    qid = put(store)
    with open(store.path("hold", qid), "rb") as f:
        cp = subprocess.run([sys.executable, "-m", "postwell.cli.postcat", "-e"], stdin=f,
                            capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("*** ENVELOPE RECORDS stdin ***\nmessage_size: ")
    assert cp.stdout.endswith("*** MESSAGE FILE END stdin ***\n")
    cp = subprocess.run([sys.executable, "-m", "postwell.cli.postcat"], input="garbage\n",
                        capture_output=True, text=True, timeout=60)
    assert (cp.returncode, cp.stdout, cp.stderr) == (0, "", "postcat: warning: stdin: input is not a "
                                                              "valid queue file\n")


def test_maildrop_file(env, capsys):
    store, etc = env
    w = md.MaildropWriter(store.path("maildrop"))
    w.open()
    w.write(b"Subject: md\n\nhello\n")
    name = w.finish(md.MaildropEnvelope(sender="me@example.test", recipients=["x@far.test", "y@far.test"],
                                        submit_time=ARRIVAL, fullname="Me Myself"))
    name = os.path.basename(name)
    rc, out, _ = cat(capsys, "-c", etc, "-q", name)
    assert rc == 0
    assert out == (f"*** ENVELOPE RECORDS maildrop/{name} ***\n"
                   f"message_arrival_time: {time.asctime(time.localtime(ARRIVAL))}\n"
                   "named_attribute: rewrite_context=local\n"
                   "sender_fullname: Me Myself\n"
                   "sender: me@example.test\n"
                   "recipient: x@far.test\n"
                   "recipient: y@far.test\n"
                   f"*** MESSAGE CONTENTS maildrop/{name} ***\n"
                   "Subject: md\n\nhello\n"
                   f"*** HEADER EXTRACTED maildrop/{name} ***\n"
                   f"*** MESSAGE FILE END maildrop/{name} ***\n")


# ------------------------------------------------------------------ against Postfix 3.7

def _queue_held(inst, port_of_smtp: int) -> str:
    replies = dialogue(port_of_smtp, ["EHLO c.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<a@far.test>",
                                      "RCPT TO:<b@far.test>", "DATA", "Subject: hi", "X-Test: yes", "",
                                      "body line", ".", "QUIT"], timeout=30)
    qid = str(replies[-2]).split()[-1]
    wait_for(lambda: re.search(rf"{qid}: to=<b@far\.test>.*status=deferred", inst.log_text()), 30,
             what="deferral")
    cp = inst.run("postsuper", "-h", qid)
    assert cp.returncode == 0, cp.stderr
    return qid


def _shape(out: str, qid: str) -> list[str]:
    """Record names and section markers, with the id replaced."""
    names = []
    for line in out.replace(qid, "ID").splitlines():
        if line.startswith("***"):
            names.append(line)
        elif re.match(r"^(message_size|message_arrival_time|create_time|sender|original_recipient|"
                      r"recipient|done_recipient): ", line):
            names.append(line.split(":", 1)[0] if line.startswith(("message_", "create_")) else line)
    return names


@pytest.mark.postfix
def test_same_shape_as_postfix_postcat(postwell_factory, reference_factory):
    relay = free_port()
    params = {"relayhost": f"[127.0.0.1]:{relay}", "minimal_backoff_time": "1h", "queue_run_delay": "1h"}
    ref = reference_factory(params).start()
    ours = postwell_factory(params)
    ours.master_cf = ours.default_master_cf() + "smtp      unix  -       -       n       -       -       smtp\n"
    ours.write_config()
    ours.start(timeout=60)
    rid = _queue_held(ref, ref.port)
    pid = _queue_held(ours, ours.port)
    for flags in ([], ["-e"], ["-h"], ["-b"], ["-eh"]):
        theirs = subprocess.run(["/usr/sbin/postcat", "-c", str(ref.config_dir), *flags, "-q", rid],
                                capture_output=True, text=True, timeout=30)
        mine = ours.run("postcat", *flags, "-q", pid)
        assert (mine.returncode, theirs.returncode) == (0, 0), (mine.stderr, theirs.stderr)
        assert _shape(mine.stdout, pid) == _shape(theirs.stdout, rid), (flags, mine.stdout, theirs.stdout)
        if flags == ["-b"]:
            assert mine.stdout == theirs.stdout == "\nbody line\n"
        if flags == ["-h"]:
            # Same user headers after the Received: header each MTA adds.
            def user_headers(text):
                return [ln for ln in text.splitlines() if re.match(r"^(Subject|X-Test|From):", ln)]
            assert user_headers(mine.stdout) == user_headers(theirs.stdout)
    # An unknown id: the same words (Postfix prefixes its full path name).
    theirs = subprocess.run(["/usr/sbin/postcat", "-c", str(ref.config_dir), "-q", "ABCDEF123"],
                            capture_output=True, text=True, timeout=30)
    mine = ours.run("postcat", "-q", "ABCDEF123")
    assert mine.returncode == theirs.returncode == 1
    assert theirs.stderr.split(": ", 1)[1] == mine.stderr.split(": ", 1)[1]


def test_content_split_across_chunks(capsys):
    """Lines and the header/body separator may fall anywhere in the chunks."""
    import io
    text = b"Subject: hi\nX-Long: " + b"y" * 100 + b"\n\nbody\nlast line without end"
    for size in (1, 2, 3, 7, 64, 1000):
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        for flags, want in ((postcat.HEAD, text.split(b"\n\n")[0] + b"\n"),
                            (postcat.BODY, b"\nbody\nlast line without end\n"),
                            (postcat.HEAD | postcat.BODY, text + b"\n")):
            out = io.BytesIO()
            postcat.Printer(out, flags, False).content(iter(chunks), 64)
            assert out.getvalue() == want, (size, flags)
    out = io.BytesIO()
    postcat.Printer(out, postcat.BODY, True).content(iter([text[:20], text[20:]]), 64)
    separator = 64 + text.index(b"\n\n") + 1
    body = 64 + text.index(b"body")
    assert out.getvalue().splitlines()[:2] == [f"{separator:>9} ".encode(), f"{body:>9} body".encode()]
