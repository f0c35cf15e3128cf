"""Cleanup parity with Postfix 3.7, ninth sweep (each expectation observed on a
reference instance: postcat -e of its queue file).

* SMTPUTF8 (RFC 6531): Postfix's cleanup raises a "header" flag for a header it
  writes that is not ASCII (after header_checks, MIME part and nested headers,
  PREPEND text, the smtpd's Received:; never for the Message-Id/Date/From it
  adds, never for the body) and a "sender" flag for a UTF-8 envelope sender, for
  every mail class; for the smtputf8_autodetect_classes (sendmail) either one
  also asks for SMTPUTF8, as a UTF-8 recipient does.  postcat -e shows the sum as
  the last message_size field (1 requested, 2 header, 4 sender).
* encoding=8bit follows the Content-Transfer-Encoding header as written, after
  header_checks / mime_header_checks: IGNORE drops it, REPLACE can make one.
* Every recipient that reaches cleanup without an ORCPT gets a dsn_orig_rcpt
  record ("rfc822;" + the rewritten address), even when it says what the
  original recipient says; queue files written without it still read.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from test_pickup import drop, pickup_root  # noqa: E402

from postwell.cleanup import Cleanup  # noqa: E402
from postwell.cleanup.service import SMTPUTF8_FLAGS_ATTRIBUTE  # noqa: E402
from postwell.cli import postcat  # noqa: E402
from postwell.config import load_config  # noqa: E402
from postwell.config.main import Config  # noqa: E402
from postwell.dsn.orcpt import implied_orcpt  # noqa: E402
from postwell.log import NullLog  # noqa: E402
from postwell.pickup import pickup_once  # noqa: E402
from postwell.queue import QueueStore  # noqa: E402

T0 = 1_700_000_000.0
U = "\u00f6"
HEADER_CHECKS = f"""\
/^X-Drop:/ IGNORE
/^X-Utf: (.*)/ REPLACE X-Utf-Replaced: j{U}rg $1
/^X-To-Cte: (.*)/ REPLACE Content-Transfer-Encoding: $1
/^X-Prep:/ PREPEND X-Prepended: j{U}rg
/^Content-Transfer-Encoding:\\s*binary/ IGNORE
/^Content-Transfer-Encoding:\t8bit/ REPLACE X-Was-Cte: 8bit
"""
VIRTUAL = "va@virtual.test alice@virtual.test, bob@virtual.test\n"
MULTIPART = (b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=XX\n\n"
             b"--XX\n%s\nb\n--XX--\n")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def _cleanup(tmp_path, **params):
    (tmp_path / "header_checks").write_text(HEADER_CHECKS)
    (tmp_path / "virtual").write_text(VIRTUAL)
    p = {"myhostname": "mx.example.test", "mydestination": "mx.example.test, localhost",
         "myorigin": "example.test", "header_checks": f"regexp:{tmp_path}/header_checks",
         "virtual_alias_maps": f"texthash:{tmp_path}/virtual"}
    p.update(params)
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    return Cleanup(Config(str(tmp_path), p, {}, []), store, NullLog("cleanup")), store


def _queue(c, store, data, *, sendmail=False, sender="s@example.test", rcpts=("r@example.test",),
           smtputf8=False, body=None, received=None, fullname=None):
    """One message; ``sendmail``: the autodetect class pickup gives its mail."""
    cs = c.open(rewrite_local=True, content_checks=True)
    if sendmail:
        cs.autodetect_utf8 = c.autodetect_sendmail
    cs.set_sender(sender, smtputf8=smtputf8, body_type=body)
    cs.set_fullname(fullname)
    for r in rcpts:
        cs.add_recipient(*r) if isinstance(r, tuple) else cs.add_recipient(r)
    if received:
        cs.prepend_header(received)
    cs.write(data)
    reply = run(cs.finish())
    assert reply.code == 250, reply
    with store.open(cs.queue_id) as q:
        return (dict(q.params), dict(q.attributes),
                [(r.address, r.orig or "", r.orcpt) for r in q.recipients])


def _flags(params, attrs) -> int:
    """postcat -e's last message_size field."""
    return (1 if params.get("smtputf8") == "1" else 0) | postcat._smtputf8_flags(attrs)


# ---------------------------------------------------------------- SMTPUTF8 flags

@pytest.mark.parametrize("data,kw,sendmail_flags,smtpd_flags", [
    (f"Subject: j{U}rg\n\nb\n".encode(), {}, 3, 2),
    (f"Subject: a\n\nj{U}rg\n".encode(), {}, 0, 0),                     # body: never
    (f"Subject: a\n j{U}rg\n\nb\n".encode(), {}, 3, 2),                 # folded line
    (b"Subject: j\xf6rg\n\nb\n", {}, 3, 2),                              # not UTF-8: counts
    (f"To: j{U}rg@example.org\n\nb\n".encode(), {}, 3, 2),              # rewritten header
    (f"X-Drop: j{U}rg\n\nb\n".encode(), {}, 0, 0),                      # IGNORE'd
    (b"X-Utf: x\n\nb\n", {}, 3, 2),                                      # REPLACE'd into UTF-8
    (b"X-Prep: a\n\nb\n", {}, 3, 2),                                     # PREPEND'ed text
    (MULTIPART % f"Content-Type: text/plain; name=j{U}rg\n".encode(), {}, 3, 2),
    (f"MIME-Version: 1.0\nContent-Type: message/rfc822\n\nSubject: j{U}\n\nb\n".encode(),
     {}, 3, 2),                                                          # nested header
    (b"Subject: a\n\nb\n", {"sender": f"j{U}rg@example.test"}, 5, 4),  # From: added: no 2
    (b"Subject: a\n\nb\n", {"sender": "j\udcf6rg@example.test"}, 0, 0),  # not UTF-8
    (b"Subject: a\n\nb\n", {"fullname": f"J{U}rg"}, 0, 0),
    (b"Subject: a\n\nb\n", {"rcpts": [f"j{U}rg@x.test"]}, 1, 0),
    (b"Subject: a\n\nb\n", {"rcpts": ["va@virtual.test"]}, 0, 0),
    (b"Subject: a\n\nb\n", {"smtputf8": True}, 1, 1),
    (b"Subject: a\n\nb\n", {"received": f"Received: from j{U}rg.example (x [127.0.0.1])\n"
                                        "\tby mx.example.test"}, 3, 2),
])
def test_smtputf8_flags(tmp_path, data, kw, sendmail_flags, smtpd_flags):
    c, store = _cleanup(tmp_path)
    for sendmail, want in ((True, sendmail_flags), (False, smtpd_flags)):
        params, attrs, _ = _queue(c, store, data, sendmail=sendmail, **kw)
        assert _flags(params, attrs) == want, (sendmail, params, attrs)
        # The envelope parameter (what the qmgr and the smtp client read) is the
        # "requested" flag alone.
        assert params.get("smtputf8") == ("1" if want & 1 else None)


def test_ascii_mail_gets_no_flags_attribute(tmp_path):
    c, store = _cleanup(tmp_path)
    _, attrs, _ = _queue(c, store, b"Subject: a\n\nb\xc3\xa9\n", sendmail=True)
    assert SMTPUTF8_FLAGS_ATTRIBUTE not in attrs


def test_no_flags_when_smtputf8_disabled(tmp_path):
    c, store = _cleanup(tmp_path, smtputf8_enable="no")
    params, attrs, _ = _queue(c, store, f"Subject: j{U}rg\n\nb\n".encode(), sendmail=True,
                              sender=f"j{U}@example.test")
    assert _flags(params, attrs) == 0


def test_header_flag_without_checks_and_with_disabled_mime(tmp_path):
    c, store = _cleanup(tmp_path, header_checks="", disable_mime_input_processing="yes")
    params, attrs, _ = _queue(c, store, MULTIPART % f"X-Part: j{U}\n".encode(), sendmail=True)
    assert _flags(params, attrs) == 0        # without MIME processing a part is body
    c, store = _cleanup(tmp_path, header_checks="")
    params, attrs, _ = _queue(c, store, MULTIPART % f"X-Part: j{U}\n".encode(), sendmail=True)
    assert _flags(params, attrs) == 3


# ---------------------------------------------------------------- encoding=8bit

@pytest.mark.parametrize("data,body,encoding", [
    (b"Content-Transfer-Encoding: 8bit\n\nb\n", None, "8bit"),
    (b"Content-Transfer-Encoding: 8bit\n\nb\n", "7BIT", "8bit"),
    (b"Content-Transfer-Encoding: binary\n\nb\n", None, None),          # IGNORE'd
    (b"Content-Transfer-Encoding:\t8bit\n\nb\n", None, None),           # REPLACE'd away
    (b"X-To-Cte: 8bit\n\nb\n", None, "8bit"),                           # REPLACE'd into one
    (b"X-To-Cte: binary\n\nb\n", None, "8bit"),
    (b"X-To-Cte: quoted-printable\n\nb\n", None, None),
    (MULTIPART % b"Content-Transfer-Encoding: binary\n", None, None),   # mime_header_checks
    (MULTIPART % b"X-To-Cte: 8bit\n", None, "8bit"),
    (MULTIPART % b"Content-Transfer-Encoding: 8bit\n", None, "8bit"),
])
def test_encoding_after_header_checks(tmp_path, data, body, encoding):
    c, store = _cleanup(tmp_path)
    _, attrs, _ = _queue(c, store, data, body=body)
    assert attrs.get("encoding") == encoding


@pytest.mark.parametrize("params,data,encoding", [
    # A primary header's encoding counts without MIME processing; a part's does not.
    ({"disable_mime_input_processing": "yes"}, b"Content-Transfer-Encoding: 8bit\n\nb\n", "8bit"),
    ({"disable_mime_input_processing": "yes"}, b"X-To-Cte: 8bit\n\nb\n", "8bit"),
    ({"disable_mime_input_processing": "yes"}, MULTIPART % b"Content-Transfer-Encoding: 8bit\n",
     None),
    ({"disable_mime_input_processing": "yes", "header_checks": ""},
     b"Content-Transfer-Encoding: 8bit\n\nb\n", "8bit"),
    ({"detect_8bit_encoding_header": "no"}, b"Content-Transfer-Encoding: 8bit\n\nb\n", None),
    ({"detect_8bit_encoding_header": "no", "header_checks": ""},
     MULTIPART % b"Content-Transfer-Encoding: 8bit\n", None),
])
def test_encoding_settings(tmp_path, params, data, encoding):
    c, store = _cleanup(tmp_path, **params)
    _, attrs, _ = _queue(c, store, data)
    assert attrs.get("encoding") == encoding


def test_encoding_without_checks_unchanged(tmp_path):
    c, store = _cleanup(tmp_path, header_checks="")
    _, attrs, _ = _queue(c, store, b"Content-Transfer-Encoding: binary\n\nb\n")
    assert attrs.get("encoding") == "8bit"


# ---------------------------------------------------------------- the stored ORCPT

def test_every_recipient_without_orcpt_gets_one(tmp_path):
    c, store = _cleanup(tmp_path, always_bcc="bcc@example.test")
    _, _, got = _queue(c, store, b"Subject: a\n\nb\n",
                       rcpts=["alice@virtual.test", "bob", "va@virtual.test",
                              ("x@remote.test", "x@remote.test", None, "FAILURE"),
                              ("y@remote.test", "y@remote.test", "rfc822;Y@else.test", None)])
    assert got == [
        ("alice@virtual.test", "alice@virtual.test", "rfc822;alice@virtual.test"),
        ("bob@example.test", "bob", "rfc822;bob@example.test"),
        ("alice@virtual.test", "va@virtual.test", "rfc822;va@virtual.test"),
        ("bob@virtual.test", "va@virtual.test", "rfc822;va@virtual.test"),
        # local(8) below a mailing list names the original recipient, no ORCPT.
        ("x@remote.test", "x@remote.test", "rfc822;x@remote.test"),
        ("y@remote.test", "y@remote.test", "rfc822;Y@else.test"),
        ("bcc@example.test", "bcc@example.test", None),      # always_bcc: none
    ]


def test_implied_orcpt():
    assert implied_orcpt("rfc822;A@x", "a@x") == "rfc822;A@x"
    assert implied_orcpt(None, "a@x") == "rfc822;a@x"
    assert implied_orcpt("", None) is None


@pytest.fixture
def inst(tmp_path):
    root = pickup_root(tmp_path, "parity9", "myhostname = mx.example.com\nmydomain = example.com\n"
                       "myorigin = example.com\nmydestination = $myhostname, localhost\n"
                       "virtual_alias_maps = inline:{va@example.org=v1@example.org}\n")
    os.chmod(root, 0o755)
    os.chmod(root / "etc", 0o755)
    return root


def test_requeued_file_without_orcpt_keeps_the_implied_one(inst):
    # A queue file from before: no record meant "rfc822;" + the original recipient.
    store = QueueStore(str(inst / "queue"))
    m = store.create()
    m.set_sender("s@example.org")
    m.add_recipient("v1@example.org", orig="va@example.org")
    m.add_recipient("w@example.org", orig="w@example.org", orcpt="rfc822;W@x")
    m.write(b"Subject: a\n\nb\n")
    m.commit()
    store.move(m.queue_id, "incoming", "maildrop")
    log = NullLog()
    assert pickup_once(load_config(str(inst / "etc")), log) == 1, log.lines
    [qid] = store.scan("incoming")
    with store.open(qid) as q:
        assert [(r.address, r.orig, r.orcpt) for r in q.recipients] == [
            ("v1@example.org", "va@example.org", "rfc822;va@example.org"),
            ("w@example.org", "w@example.org", "rfc822;W@x")]


def test_sendmail_bs_recipient_gets_the_typed_address(inst):
    drop(inst, b"Subject: s\n\nb\n", sender="u@example.org", protocol="ESMTP", helo="c",
         recipients=["nobody", "b@example.org"], rcpt_orcpt={1: "rfc822;B@x"})
    assert pickup_once(load_config(str(inst / "etc")), NullLog()) == 1
    store = QueueStore(str(inst / "queue"))
    with store.open(store.scan("incoming")[0]) as q:
        assert [r.orcpt for r in q.recipients] == ["rfc822;nobody", "rfc822;B@x"]


def test_old_queue_file_still_reads(tmp_path):
    # Written by the previous cleanup: no ORCPT in the recipient record.
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    m = store.create()
    m.set_sender("s@example.test")
    m.add_recipient("a@example.test", orig="a@example.test")
    m.write(b"Subject: a\n\nb\n")
    m.commit()
    with store.open(m.queue_id) as q:
        assert [(r.address, r.orcpt) for r in q.recipients] == [("a@example.test", None)]


# ---------------------------------------------------------------- postcat -e

def test_postcat_shows_the_full_name(tmp_path, capsys):
    c, store = _cleanup(tmp_path)
    _, attrs, _ = _queue(c, store, b"Subject: a\n\nb\n", sendmail=True, fullname="J Q")
    [qid] = store.scan("incoming")
    assert postcat.main(["-e", store.path("incoming", qid)]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("sender: s@example.test")
    assert out[i - 1] == "sender_fullname: J Q"
    assert not [ln for ln in out if "postwell_fullname" in ln]


def test_postcat_shows_flags_encoding_and_notify_as_postfix(tmp_path, capsys):
    c, store = _cleanup(tmp_path)
    params, attrs, _ = _queue(c, store, f"Subject: j{U}\nContent-Transfer-Encoding: 8bit\n\nb\n"
                              .encode(), sendmail=True, body="7BIT",
                              rcpts=[("n@example.test", "n@example.test", None, "SUCCESS")])
    [qid] = store.scan("incoming")
    assert postcat.main(["-e", store.path("incoming", qid)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[-1] == "3"
    assert "named_attribute: postwell_smtputf8=2" not in out
    body = out.index("sender: s@example.test")
    assert out[body + 1:body + 5] == ["named_attribute: encoding=7bit",
                                      "named_attribute: notify_flags=2",
                                      "named_attribute: dsn_orig_rcpt=rfc822;n@example.test",
                                      "original_recipient: n@example.test"]
    # cleanup's verdict on the content is in Postfix's extracted segment.
    extracted = [i for i, ln in enumerate(out) if ln.startswith("*** HEADER EXTRACTED")][0]
    assert out[extracted + 1] == "named_attribute: encoding=8bit"
    assert out.count("named_attribute: encoding=8bit") == 1


# ---------------------------------------------------------------- side by side

SIDE_CASES = [
    # (name, via, sender, recipients, content)
    ("utf8-subject", "sendmail", "s@example.org", ["alice@virtual.test"], f"Subject: j{U}rg\n\nb\n"),
    ("utf8-sender", "sendmail", f"j{U}rg@example.org", ["alice@virtual.test", "bob"],
     "Subject: a\n\nb\n"),
    ("dropped", "sendmail", "s@example.org", ["va@virtual.test"], f"X-Drop: j{U}rg\n\nb\n"),
    ("prepend", "smtp", "s@example.org", ["alice@virtual.test"], "X-Prep: a\n\nb\n"),
    ("cte-made", "smtp", "s@example.org", ["va@virtual.test"], "X-To-Cte: 8bit\n\nb\n"),
    ("cte-dropped", "smtp", "s@example.org", ["alice@virtual.test"],
     "Content-Transfer-Encoding: binary\n\nb\n"),
    ("orcpt", "smtp", "s@example.org",
     ["alice@virtual.test", "RCPT TO:<bob@virtual.test> ORCPT=rfc822;Bob@x.example"],
     "Subject: a\n\nb\n"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("parity9")
    tables = harness.table_dir("parity9-", {"header_checks": HEADER_CHECKS, "virtual": VIRTUAL})
    params = {"mail_name": "Postfix", "header_checks": f"regexp:{tables}/header_checks",
              "virtual_alias_maps": f"texthash:{tables}/virtual"}
    ref = harness.ReferencePostfix(base, params)
    # No qmgr: the queue files wait in incoming/ for postcat.
    mc = (ref.config_dir / "master.cf").read_text()
    (ref.config_dir / "master.cf").write_text(
        "".join(ln + "\n" for ln in mc.splitlines() if not ln.startswith("qmgr")))
    # postwell always runs its qmgr: deferring every transport keeps the files.
    pw = harness.PostwellInstance(base, dict(params, defer_transports="virtual, local, smtp, error"))
    pw.master_cf = pw.default_master_cf() + "pickup    unix  n       -       n       60      1       pickup\n"
    pw.write_config()
    try:
        harness.start_side_by_side(ref, pw)
        yield ref, pw
    finally:
        harness.stop_side_by_side([ref, pw])
        import shutil
        shutil.rmtree(tables, ignore_errors=True)


def _submit(inst, via, sender, rcpts, content) -> str:
    if via == "smtp":
        lines = ["EHLO c.example.org", f"MAIL FROM:<{sender}>"]
        lines += [r if r.startswith("RCPT") else f"RCPT TO:<{r}>" for r in rcpts]
        lines += ["DATA", content.replace("\n", "\r\n").rstrip("\r\n"), ".", "QUIT"]
        for r in harness.dialogue(inst.port, lines, timeout=15):
            m = re.search(r"queued as (\w+)", r.text)
            if m:
                return m.group(1)
        raise AssertionError(f"{inst.kind}: not queued")
    queues = ("incoming", "active", "deferred")
    before = {p.name for p in inst.queue_files(queues)}
    if inst.kind == "postfix":
        cmd = ["/usr/sbin/sendmail", "-C", str(inst.config_dir)]
    else:
        cmd = [sys.executable, "-m", "postwell.cli.sendmail", "-C", str(inst.config_dir)]
    subprocess.run(cmd + ["-f", sender, "--", *rcpts], input=content.encode(), timeout=30,
                   env=dict(os.environ, MAIL_CONFIG=str(inst.config_dir)), capture_output=True,
                   check=True)
    new = harness.wait_for(lambda: [p for p in inst.queue_files(queues)
                                    if p.name not in before], 15, 0.05, "queued")
    if inst.kind == "postfix":
        # Pickup's cleanup is still writing it: Postfix marks a finished queue file
        # with the owner's execute bit.
        harness.wait_for(lambda: _complete(new[0]), 15, 0.05, "queue file complete")
    return new[0].name


def _complete(path) -> bool:
    try:
        return bool(os.stat(path).st_mode & 0o100)
    except FileNotFoundError:
        return False


_KEEP = re.compile(r"(named_attribute: (dsn_orig_rcpt|encoding|notify_flags)=|sender:|"
                   r"sender_fullname:|(original_)?recipient:)")


def _postcat(inst, qid) -> list[str]:
    if inst.kind == "postfix":
        cmd = ["/usr/sbin/postcat", "-c", str(inst.config_dir), "-e", "-q", qid]
    else:
        # postwell's qmgr moves the file on; wait until it rests in deferred/.
        harness.wait_for(lambda: (inst.queue_dir / "deferred").is_dir() and any(
            p.name == qid for p in inst.queue_files(("deferred",))), 15, 0.05, "deferred")
        cmd = [sys.executable, "-m", "postwell.cli.postcat", "-c", str(inst.config_dir),
               "-e", "-q", qid]
    out = subprocess.run(cmd, capture_output=True, timeout=30, check=True).stdout
    lines = out.decode("utf-8", "surrogateescape").splitlines()
    flags = [ln.split()[-1] for ln in lines if ln.startswith("message_size:")]
    return flags + [ln for ln in lines if _KEEP.match(ln)]


def test_postcat_side_by_side(pair):
    ref, pw = pair
    for name, via, sender, rcpts, content in SIDE_CASES:
        want, got = harness.run_side_by_side(
            lambda inst: _postcat(inst, _submit(inst, via, sender, rcpts, content)), ref, pw)
        assert got == want, name


def test_autodetect_classes(tmp_path):
    c, _ = _cleanup(tmp_path)
    assert [c.smtputf8_autodetect(k) for k in ("sendmail", "verify", "smtpd", "bounce")] == \
        [True, True, False, False]
    c, _ = _cleanup(tmp_path, smtputf8_autodetect_classes="all")
    assert c.smtputf8_autodetect("smtpd") and c.smtputf8_autodetect("forward")
    c, _ = _cleanup(tmp_path, smtputf8_enable="no")
    assert not c.smtputf8_autodetect("sendmail")


@pytest.mark.parametrize("classes,smtpd,want", [
    ("smtpd", True, 3), ("all", True, 3), ("sendmail, verify", True, 2),
    ("smtpd", False, 2),            # not smtpd mail (no client): no class applies
])
def test_smtpd_class_autodetect_without_smtpd_help(tmp_path, classes, smtpd, want):
    # The smtpd only names its client; cleanup tells its mail by that.
    c, store = _cleanup(tmp_path, smtputf8_autodetect_classes=classes)
    cs = c.open(rewrite_local=False, content_checks=True)
    cs.set_sender("s@example.test")
    if smtpd:
        cs.set_attribute("client_address", "192.0.2.1")
    cs.add_recipient("r@example.test", orig="r@example.test", orcpt="rfc822;r@example.test")
    cs.write(f"Subject: j{U}\n\nb\n".encode())
    assert run(cs.finish()).code == 250
    with store.open(cs.queue_id) as q:
        assert _flags(q.params, q.attributes) == want
