"""Submission parity with Postfix 3.7, eighth sweep (each fact checked side by side).

* Cleanup records an ORCPT (RFC 3461 5.2.1) for a recipient that came without one
  (sendmail/pickup, notices): "rfc822;" + the address after the local rewrite and
  the canonical maps, before virtual aliasing ("utf-8;" for a non-ASCII address
  of SMTPUTF8 mail), even when it equals "rfc822;" + the original recipient.
* ``sendmail '""'``: the maildrop file keeps the empty recipient, as Postfix's
  postdrop file does; cleanup sends it to $empty_address_recipient with an empty
  original recipient (no orig_to=).
* ``sendmail -bs``: a recipient without ORCPT gets "rfc822;" + the address as
  typed, as Postfix's smtpd records it.
* A Content-Transfer-Encoding of exactly 8bit or binary (any part, after leading
  white space only) makes the message 8-bit whatever BODY= said, and the smtp
  client then sends BODY=8BITMIME; undeclared 8-bit text does not.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from test_cleanup import run as run_async  # noqa: E402
from test_pickup import drop, pickup_root  # noqa: E402
from test_sendmail import maildrop_names, read_drop  # noqa: E402
from test_sendmail import run as run_sendmail  # noqa: E402

from postwell.cleanup import Cleanup  # noqa: E402
from postwell.cleanup.mime import postfix_8bit_encoding  # noqa: E402
from postwell.config import load_config  # noqa: E402
from postwell.config.main import Config  # noqa: E402
from postwell.delivery.smtp import SmtpDeliveryAgent  # noqa: E402
from postwell.log import NullLog  # noqa: E402
from postwell.pickup import MaildropEnvelope, pickup_once  # noqa: E402
from postwell.pickup import maildrop as md  # noqa: E402
from postwell.queue import QueueStore  # noqa: E402
from postwell.smtp.client import HelloDone, SmtpClient  # noqa: E402

T0 = 1_700_000_000.0


# ---------------------------------------------------------------- cleanup's ORCPT

def _cleanup(tmp_path, **params):
    (tmp_path / "canonical").write_text("canon@example.test c@relay.test\n")
    (tmp_path / "virtual").write_text("va@relay.test v1@relay.test, v2@relay.test\n")
    p = {"myhostname": "mx.example.test", "mydestination": "mx.example.test, localhost",
         "myorigin": "example.test",
         "recipient_canonical_maps": f"texthash:{tmp_path}/canonical",
         "virtual_alias_maps": f"texthash:{tmp_path}/virtual"}
    p.update(params)
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    return Cleanup(Config(str(tmp_path), p, {}, []), store, NullLog("cleanup")), store


def _queue(c, store, rcpts, smtputf8=False, data=b"Subject: t\n\nb\n", body=None):
    cs = c.open(rewrite_local=True)
    cs.set_sender("s@example.test", smtputf8=smtputf8, body_type=body)
    for r in rcpts:
        cs.add_recipient(*r) if isinstance(r, tuple) else cs.add_recipient(r)
    cs.write(data)
    assert run_async(cs.finish()).code == 250
    with store.open(cs.queue_id) as q:
        return [(r.address, r.orig or "", r.orcpt) for r in q.recipients], dict(q.attributes)


def test_cleanup_records_orcpt_of_the_rewritten_address(tmp_path):
    c, store = _cleanup(tmp_path)
    got, _ = _queue(c, store, ["nobody", "relay.test!bang", "canon", "va@relay.test",
                               "x@relay.test", "", ("u", "u", None, None)])
    # What Postfix 3.7's queue file says (postcat -e): a record for every one,
    # "rfc822;" + the original recipient included.
    assert got == [
        ("nobody@example.test", "nobody", "rfc822;nobody@example.test"),
        ("bang@relay.test", "relay.test!bang", "rfc822;bang@relay.test"),
        ("c@relay.test", "canon", "rfc822;c@relay.test"),
        ("v1@relay.test", "va@relay.test", "rfc822;va@relay.test"),
        ("v2@relay.test", "va@relay.test", "rfc822;va@relay.test"),
        ("x@relay.test", "x@relay.test", "rfc822;x@relay.test"),
        ("MAILER-DAEMON@example.test", "", "rfc822;MAILER-DAEMON@example.test"),
        # A caller that names the original recipient but no ORCPT (local(8) below
        # a mailing list, verify probes) gets one from the rewritten address too.
        ("u@example.test", "u", "rfc822;u@example.test"),
    ]


@pytest.mark.parametrize("smtputf8,orcpt", [(True, "utf-8;j\u00f6rg@example.test"),
                                            (False, "rfc822;j\u00f6rg@example.test")])
def test_cleanup_orcpt_type_of_non_ascii_address(tmp_path, smtputf8, orcpt):
    c, store = _cleanup(tmp_path)
    got, _ = _queue(c, store, ["j\u00f6rg"], smtputf8=smtputf8)
    assert got == [("j\u00f6rg@example.test", "j\u00f6rg", orcpt)]


def test_unqualified_duplicates_still_dropped_once(tmp_path):
    c, store = _cleanup(tmp_path)
    got, _ = _queue(c, store, ["nobody", "nobody", "Nobody", "nobody@example.test"])
    assert [g[1] for g in got] == ["nobody", "nobody@example.test"]


# ---------------------------------------------------------------- sendmail and pickup

@pytest.fixture
def inst(tmp_path):
    root = pickup_root(tmp_path, "submit8", "myhostname = mx.example.com\nmydomain = example.com\n"
                       "myorigin = example.com\nmydestination = $myhostname, localhost\n")
    os.chmod(root, 0o755)
    os.chmod(root / "etc", 0o755)
    return root


def _picked_up(root):
    assert pickup_once(load_config(str(root / "etc")), NullLog()) == 1
    store = QueueStore(str(root / "queue"))
    with store.open(store.scan("incoming")[0]) as q:
        return [(r.address, r.orig or "", r.orcpt) for r in q.recipients]

def test_maildrop_keeps_an_empty_recipient():
    env = MaildropEnvelope(sender="a@x", recipients=["", "b"], submit_time=T0)
    data = env.pack()
    assert b"rcpt \n" in data
    assert md.parse_envelope(data).recipients == ["", "b"]


def test_sendmail_empty_recipient_has_no_original(inst):
    rc, _, err = run_sendmail(["-C", str(inst / "etc"), "-f", "a@example.com",
                               '""', "nobody"], b"Subject: t\n\nb\n")
    assert (rc, err) == (0, b"")
    env, _ = read_drop(inst, maildrop_names(inst)[0])
    assert env.recipients == ["", "nobody"]
    got = _picked_up(inst)
    assert got == [("MAILER-DAEMON@example.com", "", "rfc822;MAILER-DAEMON@example.com"),
                   ("nobody@example.com", "nobody", "rfc822;nobody@example.com")]


def test_sendmail_bs_records_the_address_as_typed(inst):
    dialogue = (b"EHLO c\r\nMAIL FROM:<u@example.org>\r\nRCPT TO:<nobody>\r\n"
                b'RCPT TO:<"a b"@example.net>\r\nRCPT TO: <v@example.net> NOTIFY=NEVER\r\n'
                b"RCPT TO:<w@example.net> ORCPT=rfc822;x+2By@z\r\n"
                b"DATA\r\nSubject: t\r\n\r\nb\r\n.\r\nQUIT\r\n")
    rc, _, err = run_sendmail(["-C", str(inst / "etc"), "-bs"], dialogue)
    assert (rc, err) == (0, b"")
    env, _ = read_drop(inst, maildrop_names(inst)[0])
    # "rfc822;" + the recipient is implied; the others are written.
    assert env.rcpt_orcpt == {1: 'rfc822;"a b"@example.net', 3: "rfc822;x+y@z"}
    got = _picked_up(inst)
    # Postfix 3.7: rfc822;nobody, rfc822;"a b"@example.net, rfc822;v@example.net,
    # rfc822;x+y@z (the first and third implied by the maildrop file, written by cleanup).
    assert got == [("nobody@example.com", "nobody", "rfc822;nobody"),
                   ("a b@example.net", "a b@example.net", 'rfc822;"a b"@example.net'),
                   ("v@example.net", "v@example.net", "rfc822;v@example.net"),
                   ("w@example.net", "w@example.net", "rfc822;x+y@z")]


def test_pickup_orcpt_of_unqualified_recipient(inst):
    drop(inst, b"Subject: s\n\nb\n", recipients=["bob", "x@example.org"])
    assert [r[2] for r in _picked_up(inst)] == ["rfc822;bob@example.com", "rfc822;x@example.org"]


# ---------------------------------------------------------------- 8-bit content

@pytest.mark.parametrize("header,eight", [
    (b"Content-Transfer-Encoding: 8bit\n", True),
    (b"Content-Transfer-Encoding: BINARY\n", True),
    (b"Content-Transfer-Encoding:\n 8Bit\n", True),
    (b"Content-Transfer-Encoding:8bit", True),
    # Postfix compares the whole value: a trailing blank or comment does not count.
    (b"Content-Transfer-Encoding: 8bit \n", False),
    (b"Content-Transfer-Encoding: 8bit (yes)\n", False),
    (b"Content-Transfer-Encoding: quoted-printable\n", False),
    (b"Content-Transfer-Encoding: 7bit\n", False),
])
def test_postfix_8bit_encoding(header, eight):
    assert postfix_8bit_encoding(header) is eight


@pytest.mark.parametrize("data,body,encoding", [
    (b"MIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\n\nb\xc3\xa9\n", None, "8bit"),
    (b"MIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\n\nb\n", "7BIT", "8bit"),
    (b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n--B\n"
     b"Content-Transfer-Encoding: binary\n\nx\n--B--\n", None, "8bit"),
    (b"Subject: t\n\nb\xc3\xa9\n", None, None),             # undeclared: unknown
    (b"Subject: t\n\nb\n", "8BITMIME", None),
])
def test_cleanup_notes_declared_8bit(tmp_path, data, body, encoding):
    c, store = _cleanup(tmp_path)
    _, attrs = _queue(c, store, ["x@relay.test"], data=data, body=body)
    assert attrs.get("encoding") == encoding


def _mail_command(attributes) -> bytes:
    request = SimpleNamespace(sender="a@x.test", content_size=10, attributes=attributes,
                              recipients=[SimpleNamespace(address="b@y.test", notify=None,
                                                          orcpt=None, orig="b@y.test")])
    envelope = SmtpDeliveryAgent._envelope(request)
    c = SmtpClient("mx.example.test")
    c.receive_data(b"220 sink ESMTP\r\n250-sink\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 DSN\r\n")
    for _ in range(10):
        if isinstance(c.next_event(), HelloDone):
            break
    else:
        raise AssertionError("no HelloDone")
    c.data_to_send()
    c.start_transaction(envelope)
    return c.data_to_send().split(b"\r\n")[0]


@pytest.mark.parametrize("attributes,line", [
    ({"smtputf8": "1", "encoding": "8bit"}, b"MAIL FROM:<a@x.test> BODY=8BITMIME SMTPUTF8"),
    ({"body": "7BIT", "encoding": "8bit"}, b"MAIL FROM:<a@x.test> BODY=8BITMIME"),
    ({"smtputf8": "1"}, b"MAIL FROM:<a@x.test> SMTPUTF8"),
    ({"body": "7BIT"}, b"MAIL FROM:<a@x.test> BODY=7BIT"),
    ({}, b"MAIL FROM:<a@x.test>"),
])
def test_smtp_client_body_parameter(attributes, line):
    assert _mail_command(attributes) == line


# ---------------------------------------------------------------- side by side

class _Sink:
    """A loopback SMTP peer announcing 8BITMIME, SMTPUTF8 and DSN that keeps the
    MAIL and RCPT lines it is sent."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.transactions: list[tuple[str, ...]] = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(20)
        mine: list[str] = []
        try:
            f = conn.makefile("rb")
            conn.sendall(b"220 sink ESMTP\r\n")
            in_data = False
            for raw in f:
                if in_data:
                    if raw == b".\r\n":
                        in_data = False
                        conn.sendall(b"250 2.0.0 ok\r\n")
                    continue
                up = raw.upper()
                if up.startswith(b"MAIL"):
                    mine = [raw.decode("utf-8", "replace").rstrip("\r\n")]
                elif up.startswith(b"RCPT"):
                    mine.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                if up.startswith(b"EHLO"):
                    conn.sendall(b"250-sink\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n"
                                 b"250 PIPELINING\r\n")
                elif up.startswith(b"DATA"):
                    in_data = True
                    # One transaction: its MAIL line and RCPT lines, together.
                    self.transactions.append(tuple(mine))
                    conn.sendall(b"354 go\r\n")
                elif up.startswith(b"QUIT"):
                    conn.sendall(b"221 bye\r\n")
                    break
                else:
                    conn.sendall(b"250 ok\r\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("submit8")
    sinks = {"postfix": _Sink(), "postwell": _Sink()}
    made = []

    def params(kind):
        return {"notify_classes": "", "myorigin": "virtual.test", "relay_domains": "relay.test",
                "smtp_tls_security_level": "none",
                "transport_maps": f"inline:{{relay.test=smtp:[127.0.0.1]:{sinks[kind].port}}}"}
    try:
        ref = harness.ReferencePostfix(base, params("postfix"))
        made.append(ref)
        pw = harness.PostwellInstance(base, params("postwell"))
        made.append(pw)
        pw.master_cf = (pw.default_master_cf() + "smtp unix - - n - - smtp\n"
                        "pickup unix n - n 60 1 pickup\n")
        pw.write_config()
        harness.start_side_by_side(ref, pw)
        ref.sink, pw.sink = sinks["postfix"], sinks["postwell"]
        yield ref, pw
    finally:
        harness.stop_side_by_side(made)
        for s in sinks.values():
            s.close()


MIME = b"MIME-Version: 1.0\r\n"
SMTP_CASES = [
    ("utf8-8bit", b" SMTPUTF8", b"Subject: a\r\n\r\nb\xc3\xa9\r\n"),
    ("plain-8bit", b"", b"Subject: b\r\n\r\nb\xc3\xa9\r\n"),
    ("7bit-cte8", b" BODY=7BIT", b"Subject: c\r\n" + MIME + b"Content-Transfer-Encoding: 8bit\r\n\r\nb\r\n"),
    ("utf8-cte8", b" SMTPUTF8", b"Subject: d\r\n" + MIME + b"Content-Transfer-Encoding: 8bit\r\n\r\nb\xc3\xa9\r\n"),
    ("cte-comment", b"", b"Subject: e\r\n" + MIME + b"Content-Transfer-Encoding: 8bit (x)\r\n\r\nb\r\n"),
    ("part-binary", b"", b"Subject: f\r\n" + MIME + b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
                         b"--B\r\nContent-Transfer-Encoding: binary\r\n\r\nx\r\n--B--\r\n"),
    ("8bm-7bit", b" BODY=8BITMIME", b"Subject: g\r\n\r\nb\r\n"),
]
BS_DIALOGUE = (b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<bs-a@relay.test>\r\n"
               b'RCPT TO:<"bs q"@relay.test>\r\nRCPT TO:<bs-o@relay.test> ORCPT=rfc822;x+2By@z\r\n'
               b"DATA\r\nSubject: bs\r\n\r\nbody\r\n.\r\nQUIT\r\n")


def _send(port: int, mail: bytes, rcpt: bytes, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        f = c.makefile("rb")

        def reply() -> bytes:
            while True:
                line = f.readline()
                if line[3:4] != b"-":
                    return line
        reply()
        for cmd in (b"EHLO me", mail, rcpt, b"DATA"):
            c.sendall(cmd + b"\r\n")
            reply()
        c.sendall(data + b".\r\nQUIT\r\n")
        return reply()


def _relay(inst):
    """Each message as the peer got it (its MAIL line, then its RCPT lines), sorted."""
    for name, mail_params, data in SMTP_CASES:
        answer = _send(inst.port, b"MAIL FROM:<a@x.test>" + mail_params,
                       f"RCPT TO:<{name}@relay.test>".encode(), data)
        assert answer.startswith(b"250 "), (inst.kind, name, answer)
    if inst.kind == "postfix":
        cmd = ["/usr/sbin/sendmail", "-C", str(inst.config_dir)]
    else:
        cmd = [sys.executable, "-m", "postwell.cli.sendmail", "-C", str(inst.config_dir)]
    env = dict(os.environ, MAIL_CONFIG=str(inst.config_dir))
    subprocess.run(cmd + ["-f", "a@x.test", "relay.test!sm-bang", "sm-plain@relay.test"],
                   input=b"Subject: sm\nMIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\n\nb\n",
                   env=env, timeout=30, check=True)
    subprocess.run(cmd + ["-bs"], input=BS_DIALOGUE, env=env, timeout=30, check=True,
                   capture_output=True)
    want = len(SMTP_CASES) + 2

    def done():
        got = list(inst.sink.transactions)
        return sorted(got, key=lambda t: t[1:]) if len(got) >= want else None
    return harness.wait_for(done, 30, 0.05, f"{inst.kind}'s relayed messages")


def test_relay_body_and_orcpt_side_by_side(pair):
    ref, pw = pair
    want, got = harness.run_side_by_side(_relay, ref, pw)
    mail_of = {t[1].split()[1]: t[0] for t in want}
    # What Postfix 3.7 does (the reason this test exists).
    assert mail_of["TO:<utf8-8bit@relay.test>"] == "MAIL FROM:<a@x.test> SMTPUTF8"
    assert mail_of["TO:<7bit-cte8@relay.test>"] == "MAIL FROM:<a@x.test> BODY=8BITMIME"
    assert mail_of["TO:<utf8-cte8@relay.test>"] == "MAIL FROM:<a@x.test> BODY=8BITMIME SMTPUTF8"
    assert mail_of["TO:<cte-comment@relay.test>"] == "MAIL FROM:<a@x.test>"
    rcpts = {r for t in want for r in t[1:]}
    assert "RCPT TO:<sm-bang@relay.test> ORCPT=rfc822;sm-bang@relay.test" in rcpts
    assert 'RCPT TO:<"bs q"@relay.test> ORCPT=rfc822;"bs+20q"@relay.test' in rcpts
    assert "RCPT TO:<bs-o@relay.test> ORCPT=rfc822;x+2By@z" in rcpts
    assert got == want


# ---------------------------------------------------------------- SMTPUTF8 autodetection

@pytest.mark.parametrize("sender,rcpts,smtputf8,orcpts", [
    # Postfix 3.7 (smtputf8_autodetect_classes = sendmail, verify): a non-ASCII
    # envelope address of sendmail mail asks for SMTPUTF8 and its ORCPT is utf-8.
    ("a@example.com", ["j\u00f6rg@x.test", "p@x.test"], "1",
     ["utf-8;j\u00f6rg@x.test", "rfc822;p@x.test"]),
    ("s\u00f6@example.com", ["p@x.test"], "1", ["rfc822;p@x.test"]),
    ("a@example.com", ["p@x.test"], None, ["rfc822;p@x.test"]),
])
def test_pickup_smtputf8_autodetect(inst, sender, rcpts, smtputf8, orcpts):
    drop(inst, b"Subject: s\n\nb\xc3\xa9\n", sender=sender, recipients=rcpts)
    assert [r[2] for r in _picked_up(inst)] == orcpts
    store = QueueStore(str(inst / "queue"))
    with store.open(store.scan("incoming")[0]) as q:
        assert q.params.get("smtputf8") == smtputf8


def test_no_autodetect_when_class_not_listed(inst):
    with open(inst / "etc" / "main.cf", "a") as f:
        f.write("smtputf8_autodetect_classes = verify\n")
    drop(inst, b"Subject: s\n\nb\n", recipients=["j\u00f6rg"])
    assert [r[2] for r in _picked_up(inst)] == ["rfc822;j\u00f6rg@example.com"]
    store = QueueStore(str(inst / "queue"))
    with store.open(store.scan("incoming")[0]) as q:
        assert "smtputf8" not in q.params


@pytest.mark.parametrize("orcpt,param", [
    ("utf-8;j\u00f6rg@x", "utf-8;j\\x{F6}rg@x"),
    ("utf-8;j\u00f6+x=y@x", "utf-8;j\\x{F6}\\x{2B}x\\x{3D}y@x"),   # Postfix 3.7's bytes
    ("UTF-8;plain@x", "UTF-8;plain@x"),
    ("rfc822;j\u00f6rg@x", "rfc822;j+C3+B6rg@x"),
])
def test_orcpt_parameter_encoding(orcpt, param):
    from postwell.smtp.client import _orcpt_param
    assert _orcpt_param(orcpt) == param
