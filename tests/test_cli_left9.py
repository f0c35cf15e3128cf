"""Three admin-tool differences from Postfix 3.7 left by the ninth sweep (H10):

1. postmap/postalias open the source before they look at the table type, so a
   missing source is "open FILE: No such file or directory" whatever the type
   (and a directory is read as an empty source, fail: refuses its first write,
   proxy: cannot be created);
2. `postfix stop` leaves public/showq in place, so postqueue -p says
   "Connection refused", and the next start binds over it (or a plain file);
3. `sendmail -v` records Postfix's DEL_REQ_FLAG_RECORD (postcat: trace_flags=1024),
   prints "Mail Delivery Status Report will be mailed to <sender>." and, once
   delivered, the sender gets that report (the -bv report's shape).

Side-by-side cases need the reference Postfix (skipped without it); the rest
runs postwell alone.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import harness
from postwell.cli import postmap
from postwell.pickup.maildrop import MaildropEnvelope, MaildropFormatError, parse_envelope

POSTMAP = "/usr/sbin/postmap"
needs_reference = pytest.mark.skipif(
    not (os.access(POSTMAP, os.X_OK) and harness.is_root()),
    reason="Debian postfix (run as root) is not available")

TYPES = ("hash", "btree", "lmdb", "texthash", "regexp", "pcre", "cidr", "unknown",
         "fail", "proxy", "inline", "static", "HASH")


@pytest.fixture
def cf(tmp_path):
    (tmp_path / "main.cf").write_text("")
    # Postfix pauses ~2 s when main.cf changed in the last seconds: backdate it
    os.utime(tmp_path / "main.cf", (time.time() - 3600,) * 2)
    return tmp_path


def run_ours(prog, args, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    old = sys.stderr
    sys.stderr = err
    try:
        rc = postmap.run(args, prog, stdin=io.StringIO(stdin), stdout=out)
    finally:
        sys.stderr = old
    return rc, out.getvalue(), err.getvalue()


def _workdir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "src").write_text("a b\nc: d\n")
    (root / "dir").mkdir(exist_ok=True)
    return root


# --- 1. postmap / postalias: the source is opened before the type is checked ---------

@pytest.mark.parametrize("prog", ["postmap", "postalias"])
@pytest.mark.parametrize("typ", [t for t in TYPES if t != "proxy"])
def test_missing_source_comes_before_the_type(cf, prog, typ):
    rc, out, err = run_ours(prog, ["-c", str(cf), f"{typ}:{cf}/nope"])
    assert (rc, out, err) == (1, "", f"{prog}: fatal: open {cf}/nope: No such file or directory\n")


@pytest.mark.parametrize("prog", ["postmap", "postalias"])
def test_type_errors_once_the_source_opens(cf, prog):
    src = _workdir(cf / "w") / "src"
    cases = {
        "cidr": "unsupported dictionary type: cidr does not support bulk-mode creation.",
        "tcp": "unsupported dictionary type: tcp does not support bulk-mode creation.",
        "unknown": "unsupported dictionary type: unknown. Is the postfix-unknown package installed?",
        # the type is taken as typed, as Postfix's split_at()
        "HASH": "unsupported dictionary type: HASH. Is the postfix-HASH package installed?",
    }
    for typ, text in cases.items():
        assert run_ours(prog, ["-c", str(cf), f"{typ}:{src}"]) == (1, "", f"{prog}: fatal: {text}\n")
    # proxy: is refused before the source is opened
    rc, _, err = run_ours(prog, ["-c", str(cf), f"proxy:{cf}/nope"])
    assert err == f"{prog}: fatal: can't create maps via the proxy service\n"
    # -i reads stdin, so the type is its first check; proxy is worded as a type there
    rc, _, err = run_ours(prog, ["-c", str(cf), "-i", f"proxy:{cf}/nope"])
    assert err == f"{prog}: fatal: unsupported dictionary type: proxy does not support bulk-mode creation.\n"


@pytest.mark.parametrize("prog", ["postmap", "postalias"])
def test_directory_source_builds_an_empty_table(cf, prog):
    d = _workdir(cf / "w") / "dir"
    assert run_ours(prog, ["-c", str(cf), f"hash:{d}"]) == (0, "", "")
    assert os.path.exists(f"{d}.db")
    rc, out, _ = run_ours(prog, ["-c", str(cf), "-s", f"hash:{d}"])
    assert rc == 0 and ("@" in out) == (prog == "postalias")


def test_fail_type_refuses_its_first_write(cf):
    src = _workdir(cf / "w") / "src"
    rc, _, err = run_ours("postmap", ["-c", str(cf), f"fail:{src}"])
    assert (rc, err) == (1, f"postmap: fatal: table fail:{src}: write error: Application error\n")
    bad = cf / "w" / "bad"
    bad.write_text("x\n")      # no entry: nothing written, nothing refused
    rc, _, err = run_ours("postmap", ["-c", str(cf), f"fail:{bad}"])
    assert rc == 0 and "expected format" in err
    # postalias always writes its "@" marker
    rc, _, err = run_ours("postalias", ["-c", str(cf), f"fail:{bad}"])
    assert rc == 1 and err.endswith(f"table fail:{bad}: write error: Application error\n")
    assert run_ours("postmap", ["-c", str(cf), "-i", f"fail:{bad}"]) == (0, "", "")
    rc, _, err = run_ours("postmap", ["-c", str(cf), "-d", "a", f"fail:{bad}"])
    assert err == f"postmap: fatal: table fail:{bad}: delete error: Application error\n"


def test_delete_words_per_type(cf):
    n = f"{cf}/nope"
    assert run_ours("postmap", ["-c", str(cf), "-d", "a", f"static:{n}"])[2] == \
        f"postmap: fatal: table static:{n}: delete operation is not supported\n"
    assert run_ours("postmap", ["-c", str(cf), "-d", "a", f"tcp:{n}"])[2] == \
        f"postmap: fatal: tcp:{n} map requires O_RDONLY access mode\n"
    assert run_ours("postmap", ["-c", str(cf), "-d", "a", f"internal:{n}"]) == (1, "", "")


def _ref(prog, cf, args, cwd):
    r = subprocess.run([f"/usr/sbin/{prog}", "-c", str(cf), *args], capture_output=True,
                       text=True, timeout=30, cwd=cwd, stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout, r.stderr


@needs_reference
def test_build_errors_side_by_side(cf):
    """Every type x {missing, file, directory} source, build and -i, for both
    tools: same exit code, output and files left (Postfix's msg_fatal sleeps a
    second, so its side runs in a pool)."""
    rows = []
    for prog in ("postmap", "postalias"):
        for typ in TYPES:
            for name in ("nope", "src", "dir"):
                rows.append((prog, [f"{typ}:@D@/{name}"]))
            rows.append((prog, ["-i", f"{typ}:@D@/new"]))
    refs, ours = [], []
    for k, (prog, args) in enumerate(rows):
        for side, acc in (("ref", refs), ("ours", ours)):
            d = _workdir(cf / side / str(k))
            acc.append((d, [a.replace("@D@", str(d)) for a in args]))
    with ThreadPoolExecutor(max_workers=16) as pool:
        futs = [pool.submit(_ref, prog, cf, args, d) for (prog, _), (d, args) in zip(rows, refs)]
        got_ours = [run_ours(prog, args) for (prog, _), (d, args) in zip(rows, ours)]
        got_ref = [f.result() for f in futs]
    for k, (prog, args) in enumerate(rows):
        (rd, _), (od, _) = refs[k], ours[k]
        want = tuple(x.replace(str(rd), "@D@") for x in map(str, got_ref[k]))
        have = tuple(x.replace(str(od), "@D@") for x in map(str, got_ours[k]))
        assert have == want, (prog, args)
        assert sorted(os.listdir(od)) == sorted(os.listdir(rd)), (prog, args)


# --- 2. public/showq stays after `postfix stop` -------------------------------------

def _showq_instance(tmp_path):
    pw = harness.PostwellInstance(tmp_path, {"mail_name": "Postfix"})
    pw.master_cf = (pw.default_master_cf() + "pickup unix n - n 60 1 pickup\n"
                    "showq unix n - n - - showq\n")
    pw.write_config()
    return pw


def _postqueue_p(pw):
    cp = pw.run("postqueue", "-p", timeout=30)
    return cp.returncode, cp.stdout, cp.stderr


@pytest.mark.skipif(not harness.is_root(), reason="the instance runs its children as mail_owner")
def test_showq_socket_survives_stop_and_start(tmp_path):
    pw = _showq_instance(tmp_path)
    path = pw.queue_dir / "public" / "showq"
    try:
        pw.start()
        assert _postqueue_p(pw) == (0, "Mail queue is empty\n", "")
        pw.stop()
        # Postfix leaves the socket: nobody listens, so "Connection refused"
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert _postqueue_p(pw) == (
            0, "Mail queue is empty\n",
            "postqueue: warning: Mail system is down -- accessing queue directly "
            "(Connect to the Postfix showq service: Connection refused)\n")
        # a start binds over the leftover socket ...
        pw.start()
        assert _postqueue_p(pw) == (0, "Mail queue is empty\n", "")
        pw.stop()
        # ... and over a plain file left at the name
        path.unlink()
        path.write_text("stray\n")
        pw.start()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert _postqueue_p(pw) == (0, "Mail queue is empty\n", "")
        assert "warning" not in pw.log_text() and "fatal" not in pw.log_text()
        pw.stop()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        pw.stop()
        pw.cleanup()


def test_showq_listen_replaces_a_plain_file(tmp_path):
    from postwell import showq
    path = tmp_path / "showq"
    path.write_text("stray\n")
    sock, ino = showq.listen(str(path))
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and os.stat(path).st_ino == ino
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(5)
        c.connect(str(path))
        c.close()
    finally:
        sock.close()


# --- 3. sendmail -v -----------------------------------------------------------------

def test_maildrop_trace_record_round_trip():
    env = MaildropEnvelope(sender="a@x", recipients=["b@y"], submit_time=1.0, trace="record")
    packed = env.pack()
    assert b"\ntrace record\n" in packed
    assert parse_envelope(packed).trace == "record"


def test_maildrop_trace_bad_value():
    env = MaildropEnvelope(sender="a@x", recipients=["b@y"], submit_time=1.0, trace="bogus")
    with pytest.raises(MaildropFormatError):
        parse_envelope(env.pack())


def test_qmgr_record_helpers():
    from postwell.qmgr.notices import records, wants_trace

    class Q:
        attributes = {"postwell_trace": "1"}

    class R:
        notify = "NEVER"
    assert records(Q) and wants_trace(Q, R)
    Q.attributes = {}
    assert not records(Q) and not wants_trace(Q, R)
    R.notify = "SUCCESS"
    assert wants_trace(Q, R)


def _masked(text: str) -> str:
    text = re.sub(r"\b[0-9A-F]{10,12}\b", "ID", text)
    return re.sub(r"\d{4} \d\d:\d\d:\d\d|\d{14}|\.\d{10}/", "T", text)


def _mailbox(inst, user):
    out = []
    for p in sorted((inst.mail_dir / harness.VIRTUAL_DOMAIN / user / "new").glob("*")):
        out.append(_masked(p.read_text()))
    return sorted(out)


def _drop_and_postcat(inst, cmd, msg):
    """sendmail -v while the instance is down (as Postfix's postdrop, with the
    warning that public/pickup is missing), then postcat -e of the file."""
    cp = subprocess.run(cmd, input=msg, capture_output=True, text=True, timeout=30,
                        env=dict(os.environ, MAIL_CONFIG=str(inst.config_dir)))
    drop = inst.queue_dir / "maildrop"
    [name] = [n for n in os.listdir(drop) if not n.startswith(".")]
    cat = subprocess.run([*_postcat(inst), "-e", str(drop / name)],
                         capture_output=True, text=True, timeout=30).stdout
    return (cp.returncode, cp.stdout, cp.stderr), [ln for ln in cat.splitlines() if "trace" in ln]


def _postcat(inst):
    if inst.kind == "postfix":
        return ["/usr/sbin/postcat", "-c", str(inst.config_dir)]
    return [sys.executable, "-m", "postwell.cli.postcat", "-c", str(inst.config_dir)]


@needs_reference
def test_sendmail_v_side_by_side(tmp_path):
    """stdout/stderr of sendmail -v and postcat of its maildrop file (both
    dropped while the system is down), then the report the sender gets once
    both are up: one delivered and one unknown recipient."""
    ref = harness.ReferencePostfix(tmp_path / "r")
    pw = _showq_instance(tmp_path / "p")
    sender = f"bob@{harness.VIRTUAL_DOMAIN}"
    rcpts = [f"alice@{harness.VIRTUAL_DOMAIN}", f"nobody@{harness.VIRTUAL_DOMAIN}"]
    msg = "Subject: hi\n\nbody\n"
    try:
        ref.cool_config()
        ref.postfix("check", timeout=30)
        pw.cli("check")
        want = _drop_and_postcat(ref, ["/usr/sbin/sendmail", "-C", str(ref.config_dir), "-v",
                                       "-f", sender, *rcpts], msg)
        have = _drop_and_postcat(pw, [sys.executable, "-m", "postwell.cli.sendmail", "-C",
                                      str(pw.config_dir), "-v", "-f", sender, *rcpts], msg)
        assert have == want
        assert want[0][1] == f"Mail Delivery Status Report will be mailed to <{sender}>.\n"
        assert want[1] == ["named_attribute: trace_flags=1024"]
        ref.start()
        pw.start()
        for inst in (ref, pw):
            inst.wait_log(r"sender delivery status notification: (\w+)", timeout=20)
        harness.wait_for(lambda: len(_mailbox(ref, "bob")) == 2 and len(_mailbox(pw, "bob")) == 2,
                         20, 0.1, "two notices to bob")
        assert _mailbox(pw, "bob") == _mailbox(ref, "bob")
        assert _mailbox(pw, "alice") == _mailbox(ref, "alice")
    finally:
        pw.stop()
        ref.stop()


def test_sendmail_double_v_records_nothing(tmp_path):
    pw = _showq_instance(tmp_path)
    pw.cli("check")
    cp = pw.run("sendmail", "-v", "-v", "-f", "a@x.test", "b@y.test", input="Subject: x\n\nb\n")
    assert cp.returncode == 0 and "Mail Delivery Status Report" not in cp.stdout
    drop = pw.queue_dir / "maildrop"
    names = [n for n in os.listdir(drop) if not n.startswith(".")]
    assert len(names) == 1
    assert b"\ntrace " not in (drop / names[0]).read_bytes()
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.skipif(not harness.is_root(), reason="the instance runs its children as mail_owner")
def test_sendmail_v_reports_a_deferral_once(tmp_path):
    """A first pass that defers: the report names the deferral (no
    Will-Retry-Until, no "delivery via none"), and the mark is gone from the
    queue file, so later passes report nothing (Postfix kills the record)."""
    port = harness.free_port()     # nothing listens there: connection refused
    pw = harness.PostwellInstance(tmp_path, {
        "mail_name": "Postfix", "transport_maps": f"inline:{{nowhere.test=smtp:[127.0.0.1]:{port}}}"})
    pw.master_cf = (pw.default_master_cf() + "pickup unix n - n 60 1 pickup\n"
                    "smtp unix - - n - - smtp\n")
    pw.write_config()
    sender = f"bob@{harness.VIRTUAL_DOMAIN}"
    try:
        pw.start()
        cp = pw.run("sendmail", "-v", "-f", sender, "x@nowhere.test", input="Subject: hi\n\nb\n")
        assert cp.stdout == f"Mail Delivery Status Report will be mailed to <{sender}>.\n"
        [(qid,)] = [m.groups() for m in [pw.wait_log(r"(\w+): sender delivery status notification")]]
        harness.wait_for(lambda: len(_mailbox(pw, "bob")) == 1, 20, 0.1, "the report")
        [report] = _mailbox(pw, "bob")
        assert "Enclosed is the mail delivery report that you requested." in report
        assert (f"<x@nowhere.test>: connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused"
                in report.replace("\n    ", " "))
        assert "Action: delayed\nStatus: 4.4.1\n" in report
        assert "Will-Retry-Until" not in report and "delivery via none" not in report
        harness.wait_for(lambda: (pw.queue_dir / "deferred" / qid).exists(), 10, 0.05, "deferred")
        cat = pw.run("postcat", "-e", "-q", qid).stdout
        assert "sender: bob@" in cat and "trace_flags" not in cat
    finally:
        pw.stop()
        pw.cleanup()


def test_kill_record_rewrites_the_mark(tmp_path):
    from postwell.qmgr.notices import TRACE_ATTRIBUTE, kill_record, records
    from postwell.queue import QueueStore
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    msg = store.create()
    msg.set_sender("a@x.test")
    msg.add_recipient("b@y.test")
    msg.set_attribute(TRACE_ATTRIBUTE, "1")
    msg.write(b"Subject: x\n\nb\n")
    msg.commit()
    qm = store.open(msg.queue_id)
    try:
        assert records(qm)
        kill_record(qm)
        assert not records(qm)
    finally:
        qm.close()
    qm = store.open(msg.queue_id)
    try:
        assert qm.attributes[TRACE_ATTRIBUTE] == "0" and not records(qm)
    finally:
        qm.close()
