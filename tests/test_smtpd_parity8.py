"""smtpd, anvil and log parity with Postfix 3.7, eighth sweep.

* The DSN original recipient the smtpd records: without ORCPT, "rfc822;" and the RCPT TO
  address exactly as the client wrote it (quotes, backslashes, a source route kept, one
  pair of <> removed, trailing blanks dropped); with ORCPT, its address decoded as
  Postfix decodes the type (xtext; RFC 6533 \\x{HEX} for utf-8), cut at a NUL.
* Which smtpd_client_*_limit refused a session comes from anvil's LimitReply (the
  connection count's 421 is a policy error for notify_classes, the rate's not).
* STARTTLS keeps the protocol name (proto=ESMTP after EHLO, STARTTLS, HELO) and the
  Received header says UTF8SMTP for an SMTPUTF8 transaction, S/A (TLS, AUTH) only in
  an EHLO session; its "for <path>" quotes the local part where it needs it.
* Notices of SMTPUTF8 mail use RFC 6533's "global" types and "utf-8" addresses; cleanup
  sends the null recipient to $empty_address_recipient with an empty original.
* Log records pass Postfix's printable(): ASCII controls become '?'; with
  smtputf8_enable = yes a byte 0xC2-0xFE with its continuation bytes stays as it is
  (valid UTF-8 or not), any other byte >= 0x80 becomes '?'; with "no" every byte
  >= 0x80 becomes '?'.

The side-by-side tests run one dialogue against a reference Postfix and postwell; the
unit tests pin what those runs showed.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import subprocess

import pytest

import harness
from postwell.anvil import LimitReply, SmtpdLimits
from postwell.dsn.orcpt import decode_orcpt, fallback_orcpt, stored_orcpt
from postwell.log import MailLog, NullLog, sanitize
from postwell.smtpd.server import rcpt_orcpt
from test_smtpd import WAIT, smtpd  # noqa: F401 - fixture

H = "mx.example.test"


def _raw(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- printable() in the log

# name -> (bytes a client sent, logged with smtputf8_enable = yes, with "no"): what
# Postfix 3.7's cleanup logged for a header_checks WARN on "Subject: x<bytes>y".
LOG_BYTES = {
    "utf8_e_acute": (b"\xc3\xa9", b"\xc3\xa9", b"??"),
    "lone_lead": (b"\xe9", b"?", b"?"),
    "lead_one_continuation": (b"\xe3\x8f", b"\xe3\x8f", b"??"),
    "c1_control": (b"\xc2\x85", b"\xc2\x85", b"??"),
    "line_separator": (b"\xe2\x80\xa8", b"\xe2\x80\xa8", b"???"),
    "overlong_c0": (b"\xc0\x80", b"??", b"??"),
    "overlong_c1": (b"\xc1\x81", b"??", b"??"),
    "lead_f5": (b"\xf5\x80\x80\x80", b"\xf5\x80\x80\x80", b"????"),
    "surrogate": (b"\xed\xa0\x80", b"\xed\xa0\x80", b"???"),
    "ff": (b"\xff", b"?", b"?"),
    "del_tab": (b"\x7f\x09", b"??", b"??"),
    "lead_fe": (b"\xfe\x80", b"\xfe\x80", b"??"),
    "lone_continuation": (b"\x80", b"?", b"?"),
    "nbsp": (b"\xc2\xa0", b"\xc2\xa0", b"??"),
    "two_leads": (b"\xe9\xe9", b"??", b"??"),
    "lead_then_utf8": (b"\xc3\xc3\xa9", b"?\xc3\xa9", b"???"),
    "four_bytes": (b"\xf0\x9f\x98\x80", b"\xf0\x9f\x98\x80", b"????"),
    "zero_width_space": (b"\xe2\x80\x8b", b"\xe2\x80\x8b", b"???"),
    "lead_at_end": (b"\xc3", b"?", b"?"),
}


@pytest.mark.parametrize("name", sorted(LOG_BYTES))
def test_sanitize_as_postfix_printable(name):
    sent, with_utf8, without = LOG_BYTES[name]
    text = _raw(b"x" + sent + b"y")
    assert _bytes(sanitize(text, True)) == b"x" + with_utf8 + b"y"
    assert _bytes(sanitize(text, False)) == b"x" + without + b"y"


def test_sanitize_ascii_and_odd_surrogates():
    assert sanitize("plain text") == "plain text"
    assert sanitize("a\r\nb\0c\x1bd") == "a??b?c?d"
    # A lone surrogate that is no surrogate escape is judged by its UTF-8 form.
    assert _bytes(sanitize("a\ud800b")) == b"a\xed\xa0\x80b"
    assert sanitize("a\ud800b", False) == "a???b"


def test_maillog_keeps_raw_bytes_per_smtputf8_enable(tmp_path):
    from postwell.config.main import Config
    for enable, want in (("yes", b"sasl_username=4\xe3\x8f\n"), ("no", b"sasl_username=4??\n")):
        path = tmp_path / f"maillog-{enable}"
        cfg = Config(str(tmp_path), {"maillog_file": str(path), "myhostname": H,
                                     "smtputf8_enable": enable}, {}, [])
        log = MailLog.from_config(cfg, "smtpd")
        log.warning(_raw(b"sasl_username=4\xe3\x8f"))
        log.close()
        assert path.read_bytes().endswith(b": warning: " + want)


def test_syslog_gets_text_it_can_take(monkeypatch):
    import syslog
    calls = []
    monkeypatch.setattr(syslog, "openlog", lambda *a: None)
    monkeypatch.setattr(syslog, "syslog", lambda prio, text: (text.encode("utf-8"),
                                                              calls.append(text)))
    log = MailLog("smtpd", maillog_file="")
    log.info(_raw(b"user=4\xe3\x8f \xc3\xa9"))
    assert calls == ["user=4\ufffd \u00e9"]


def test_nulllog_follows_the_same_rule():
    log = NullLog("smtpd")
    log.info(_raw(b"a\xe3\x8f\tb\xe9"))
    assert _bytes(log.lines[-1]) == b"a\xe3\x8f?b?"


# ---------------------------------------------------------------- the DSN original recipient

@pytest.mark.parametrize("line, engine, want", [
    (f'RCPT TO:<"dan@remote.test"@{H}>', None, f'rfc822;"dan@remote.test"@{H}'),
    (f"RCPT TO:<@a.test,@b.test:u1@{H}>", None, f"rfc822;@a.test,@b.test:u1@{H}"),
    (f"RCPT TO:< u2@{H} >", None, f"rfc822; u2@{H}"),
    (f"RCPT TO:u3@{H}", None, f"rfc822;u3@{H}"),
    (f'RCPT TO:<"a b"@{H}>', None, f'rfc822;"a b"@{H}'),
    (f"RCPT TO:<U7@MX.{H[3:]}>", None, f"rfc822;U7@MX.{H[3:]}"),
    (f"RCPT TO:<u8\\@x@{H}>", None, f"rfc822;u8\\@x@{H}"),
    (f"RCPT TO:<<u9@{H}>>", None, f"rfc822;<u9@{H}>"),
    (f"rcpt to: <u10@{H}> NOTIFY=NEVER", None, f"rfc822;u10@{H}"),
    (f"RCPT TO:<j\u00f6rg@{H}>", None, f"rfc822;j\u00f6rg@{H}"),
    (f'RCPT TO:<""@{H}>', None, f'rfc822;""@{H}'),
    (f"RCPT TO:<u@{H}> ORCPT=rfc822;x+2By@example.org", "rfc822;x+y@example.org",
     "rfc822;x+y@example.org"),
    (f"RCPT TO:<u@{H}> ORCPT=utf-8;j\\x{{F6}}rg@x", "utf-8;j\\x{F6}rg@x", "utf-8;j\u00f6rg@x"),
    (f"RCPT TO:<u@{H}> ORCPT=utf-8;a+2Bb@x", "utf-8;a+b@x", "utf-8;a+2Bb@x"),
    (f"RCPT TO:<u@{H}> ORCPT=rfc822;a+E9b@x", "rfc822;a\u00e9b@x", _raw(b"rfc822;a\xe9b@x")),
    (f"RCPT TO:<u@{H}> ORCPT=rfc822;a+00b@x", "rfc822;a\0b@x", "rfc822;a"),
    (f"RCPT TO:<u@{H}> ORCPT=rfc822;ab+20", "rfc822;ab ", "rfc822;ab"),
])
def test_rcpt_orcpt(line, engine, want):
    assert rcpt_orcpt(line, engine) == want


@pytest.mark.parametrize("value, want", [
    ("rfc822;x+2By@example.org", "rfc822;x+y@example.org"),
    ("utf-8;a+2Bb@x", "utf-8;a+2Bb@x"),                 # no xtext in the utf-8 type
    ("utf-8;a\\x{2B}b@x", "utf-8;a+b@x"),
    ("UTF-8;j\\x{F6}rg@x", "UTF-8;j\u00f6rg@x"),
    ("utf-8;a\\x{D800}@x", _raw(b"utf-8;a\xed\xa0\x80@x")),
    ("utf-8;j\u00f6rg@x", "utf-8;j\u00f6rg@x"),
    ("rfc822;j\u00f6rg@x", "rfc822;j\u00f6rg@x"),
    ("rfc822;a\\x{F6}@x", "rfc822;a\\x{F6}@x"),         # no RFC 6533 escape in rfc822
    ("utf-8;a\\x{41}b@x", "utf-8;aAb@x"),
    ("x-foo;a+41", "x-foo;aA"),
    ("utf-8;a\\x{}b", "utf-8;a"),                       # U+0000 ends the C string
    ("utf-8;a\\x{0}b", "utf-8;a"),
    ("utf-8;a\\b", "utf-8;a\\b"),
    ("utf-8;a+ZZb", "utf-8;a+ZZb"),
    ("utf-8;\\x{F6}\\x{1F600}", "utf-8;\u00f6\U0001f600"),
    ("utf-8;\\x{0000F6}", "utf-8;\u00f6"),
    # Postfix answers 501 5.5.4 Error: Bad ORCPT parameter syntax:
    ("utf-8;bad\\x{ZZ}@x", None), ("utf-8;a\\x{110000}@x", None), ("utf-8;a\\x{F6", None),
    ("rfc822;a+ZZb", None), ("rfc822;a+4", None), ("rfc822", None), (";a@b", None),
])
def test_decode_orcpt(value, want):
    assert decode_orcpt(value) == want


def test_fallback_and_stored_forms():
    assert fallback_orcpt("<a@b>") == "rfc822;a@b"
    assert fallback_orcpt("a@b") == "rfc822;a@b"
    assert fallback_orcpt("<a@b>x") == "rfc822;<a@b>x"
    assert fallback_orcpt("<\ta@b\t>") == "rfc822;\ta@b"
    assert stored_orcpt("rfc822;a\0b") == "rfc822;a"
    assert stored_orcpt("rfc822;a \t") == "rfc822;a"


def _session(port: int, lines: list[str]) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.settimeout(WAIT)
        f = s.makefile("rb")
        out = []

        def reply():
            text = []
            while True:
                ln = f.readline()
                text.append(ln)
                if not ln or ln[3:4] != b"-":
                    return _raw(b"".join(text))
        out.append(reply())
        for line in lines:
            s.sendall(_bytes(line) + b"\r\n")
            out.append(reply())
        return out


def test_smtpd_queues_the_orcpt_as_written(smtpd):
    s = smtpd()
    rcpts = [f'<"dan@remote.test"@{H}>', f"<@a.test:u1@{H}>", f'<""@{H}>', f"<@{H}>",
             f"<u2@{H}> ORCPT=utf-8;j\\x{{F6}}rg@x"]
    out = _session(s.port, ["EHLO c.example", "MAIL FROM:<s@example.org>"]
                   + [f"RCPT TO:{r}" for r in rcpts] + ["DATA", "Subject: t\r\n\r\nhi\r\n.",
                                                        "QUIT"])
    assert [r[:3] for r in out[3:]] == ["250"] * len(rcpts) + ["354", "250", "221"], out
    [qid] = s.queued()
    got = [(r.address, r.orig, r.orcpt) for r in s.store.open(qid, "incoming").recipients]
    # Two recipients that differ only in the ORCPT Postfix makes up are both kept,
    # as Postfix's cleanup keeps them (its duplicate filter keys on the ORCPT too).
    assert got == [(f"dan@remote.test@{H}", f"dan@remote.test@{H}",
                    f'rfc822;"dan@remote.test"@{H}'),
                   (f"u1@{H}", f"u1@{H}", f"rfc822;@a.test:u1@{H}"),
                   (f"@{H}", f"@{H}", f'rfc822;""@{H}'),
                   (f"@{H}", f"@{H}", f"rfc822;@{H}"),
                   (f"u2@{H}", f"u2@{H}", "utf-8;j\u00f6rg@x")]


# ---------------------------------------------------------------- anvil: which limit refused

class _Cfg:
    def __init__(self, **params):
        self.params = params

    def get_int(self, name):
        return int(self.params.get(name, "0"))


class _AnvilAnswers:
    def __init__(self, count, rate):
        self.answer = (count, rate, 7)

    async def connect(self, service, addr):
        return self.answer

    def disconnect(self, service, addr, generation):
        pass


class _Session:
    addr = "192.0.2.9"
    namaddr = "unknown[192.0.2.9]"

    class state:
        client_name = "unknown"


@pytest.mark.parametrize("answer, limit, warning", [
    ((4, 1), "smtpd_client_connection_count_limit", "Connection concurrency limit exceeded: 4"),
    ((1, 9), "smtpd_client_connection_rate_limit", "Connection rate limit exceeded: 9"),
])
def test_limit_reply_names_the_limit(answer, limit, warning):
    log = NullLog("smtpd")
    lim = SmtpdLimits(_Cfg(smtpd_client_connection_count_limit="3",
                           smtpd_client_connection_rate_limit="5"), log, service="smtp",
                      hostname=H, client=_AnvilAnswers(*answer))
    r = asyncio.run(lim.connect(_Session()))
    assert isinstance(r, LimitReply) and r.limit == limit
    assert str(r) == f"421 4.7.0 {H} Error: too many connections from 192.0.2.9"
    assert warning in log.lines[-1]


class _Limits:
    """SmtpdLimits as the smtpd uses it, refusing every connection with ``reply``."""
    ntls_limit = mail_limit = rcpt_limit = auth_limit = 0

    def __init__(self, reply):
        self.reply = reply

    async def connect(self, session):
        session.anvil_generation = 1
        return self.reply

    def disconnect(self, session):
        session.anvil_generation = None

    async def disconnect_settled(self, session):
        self.disconnect(session)

    def close(self):
        pass


@pytest.mark.parametrize("limit, notices", [("smtpd_client_connection_count_limit", 1),
                                             ("smtpd_client_connection_rate_limit", 0)])
def test_only_the_count_limit_is_a_policy_error(smtpd, limit, notices):
    s = smtpd({"notify_classes": "policy", "mynetworks": "192.0.2.0/24"})
    s.server.limits = _Limits(LimitReply(421, f"{H} Error: too many connections from 127.0.0.1",
                                         "4.7.0", limit))
    with socket.create_connection(("127.0.0.1", s.port), timeout=WAIT) as c:
        c.settimeout(WAIT)
        assert c.recv(512).startswith(b"421 4.7.0 ")
        # The notice, if any, is queued before the 421 leaves; the hang-up follows.
        assert c.recv(512) == b""
    s.wait_log(r"disconnect from")
    assert len(s.queued()) == notices, s.lines()


# ---------------------------------------------------------------- side by side with Postfix 3.7

PAIR_RCPTS = [
    f'<"dan@remote.test"@{H}>', f"<@a.test,@b.test:u1@{H}>", f"< u2@{H} >", f"u3@{H}",
    f"<u4@{H}> ORCPT=rfc822;x+2By@example.org", f"<u5@{H}> ORCPT=utf-8;j\\x{{F6}}rg@example.org",
    f'<"a b"@{H}>', f"<U7@MX.{H[3:]}>", f"<u8\\@x@{H}>", f"<<u9@{H}>>", f"<u10@{H}> NOTIFY=NEVER",
    f"<v1@{H}> ORCPT=utf-8;a+2Bb@x", f"<v3@{H}> ORCPT=UTF-8;j\\x{{F6}}rg@x",
    f"<v5@{H}> ORCPT=utf-8;a\\x{{D800}}@x", f"<v6@{H}> ORCPT=utf-8;j\u00f6rg@x",
    f"<v7@{H}> ORCPT=rfc822;j\u00f6rg@x", f"<v8@{H}> ORCPT=rfc822;a\\x{{F6}}@x",
    f"<v9@{H}> ORCPT=utf-8;a\\x{{41}}b@x", f"<v10@{H}> ORCPT=x-foo;a+41",
    f"<v13@{H}> ORCPT=utf-8;a\\x{{}}b", f"<v14@{H}> ORCPT=utf-8;a\\b",
    f"<v15@{H}> ORCPT=utf-8;a\\x{{0}}b", f"<j\u00f6rg@{H}>",
    f"<v17@{H}> ORCPT=utf-8;\\x{{F6}}\\x{{1F600}}", f"<v18@{H}> ORCPT=rfc822;a+E9b@x",
    f"<v19@{H}> ORCPT=rfc822;a+00b@x", f"<v20@{H}> ORCPT=rfc822;ab+20", f'<""@{H}>', f"<@{H}>",
]
# Refused by Postfix 3.7 (501 5.5.4 Error: Bad ORCPT parameter syntax) or taken by it,
# where postwell's engine (smtp/server.py _cmd_rcpt, xtext for every type) answers the
# other way.
ENGINE_ORCPT = [f"<w1@{H}> ORCPT=utf-8;bad\\x{{ZZ}}@x", f"<w2@{H}> ORCPT=utf-8;a\\x{{110000}}@x",
                f"<w3@{H}> ORCPT=utf-8;a\\x{{F6", f"<w4@{H}> ORCPT=utf-8;a+ZZb"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    tables = harness.table_dir("parity8-", {"hc": "/^Subject:/ WARN\n"})
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(tables / "key.pem"), "-out", str(tables / "cert.pem"), "-days", "2",
                    "-subj", f"/CN={H}"], check=True, capture_output=True, timeout=60)
    for name in ("key.pem", "cert.pem"):
        os.chmod(tables / name, 0o644)    # a test key, read by the unprivileged daemons
    base = tmp_path_factory.mktemp("parity8")
    params = {"smtpd_end_of_data_restrictions": "check_client_access static:HOLD",
              "header_checks": f"regexp:{tables}/hc", "smtpd_tls_security_level": "may",
              "smtpd_tls_cert_file": f"{tables}/cert.pem",
              "smtpd_tls_key_file": f"{tables}/key.pem"}
    ref = harness.ReferencePostfix(base, params)
    pw = harness.PostwellInstance(base, params)
    try:
        harness.start_side_by_side(ref, pw)
        yield ref, pw
    finally:
        harness.stop_side_by_side([ref, pw])
        import shutil
        shutil.rmtree(tables, ignore_errors=True)


def _transaction(inst, rcpts, headers=b"Subject: t\r\n"):
    """One message to ``rcpts``: (RCPT replies, queue id or None)."""
    with socket.create_connection(("127.0.0.1", inst.port), timeout=20) as s:
        s.settimeout(20)
        f = s.makefile("rb")

        def reply():
            text = []
            while True:
                ln = f.readline()
                text.append(ln)
                if not ln or ln[3:4] != b"-":
                    return _raw(b"".join(text)).rstrip("\r\n")
        reply()
        for line in ("EHLO c.example", "MAIL FROM:<s@example.org> SMTPUTF8"):
            s.sendall(_bytes(line) + b"\r\n")
            reply()
        answers = []
        for r in rcpts:
            s.sendall(_bytes(f"RCPT TO:{r}") + b"\r\n")
            answers.append(reply())
        s.sendall(b"DATA\r\n")
        qid = None
        if reply().startswith("354"):
            s.sendall(headers + b"\r\nhi\r\n.\r\n")
            m = re.search(r"queued as (\w+)", reply())
            qid = m and m.group(1)
        s.sendall(b"QUIT\r\n")
        reply()
        return answers, qid


def _reference_orcpts(ref, qid) -> list[tuple[bytes, bytes]]:
    out = subprocess.run(["/usr/sbin/postcat", "-c", str(ref.config_dir), "-e", "-q", qid],
                         capture_output=True, timeout=30, stdin=subprocess.DEVNULL).stdout
    got, orcpt = [], None
    for line in out.split(b"\n"):
        if line.startswith(b"named_attribute: dsn_orig_rcpt="):
            orcpt = line.split(b"=", 1)[1]
        elif line.startswith(b"recipient: "):
            got.append((line[len(b"recipient: "):], orcpt))
            orcpt = None
    return got


def _postwell_orcpts(pw, qid) -> list[tuple[bytes, bytes]]:
    from postwell.queue import QueueStore
    qm = QueueStore(str(pw.queue_dir)).open(qid, "hold", writable=False)
    return [(_bytes(r.address), _bytes(r.orcpt) if r.orcpt else None) for r in qm.recipients]


def test_orcpt_recorded_side_by_side(pair):
    ref, pw = pair
    (want_r, want_q), (got_r, got_q) = harness.run_side_by_side(_transaction, ref, pw, PAIR_RCPTS)
    assert got_r == want_r and all(r.startswith("250") for r in want_r), (want_r, got_r)
    assert want_q and got_q
    want = _reference_orcpts(ref, want_q)
    assert len(want) == len(PAIR_RCPTS)
    assert (f'rfc822;"dan@remote.test"@{H}'.encode(), ) == want[0][1:]
    assert _postwell_orcpts(pw, got_q) == want


def test_utf8_orcpt_syntax_side_by_side(pair):
    ref, pw = pair
    (want_r, _), (got_r, _) = harness.run_side_by_side(_transaction, ref, pw, ENGINE_ORCPT)
    assert [r[:3] for r in want_r] == ["501", "501", "501", "250"]
    assert got_r == want_r


def _warned_subjects(inst, count) -> dict[str, bytes]:
    pattern = re.compile(rb"warning: header Subject: (\w+) x(.*?)y from ")
    found: dict[str, bytes] = {}

    def seen():
        found.clear()
        for m in pattern.finditer(inst.maillog.read_bytes()):
            found[m.group(1).decode()] = m.group(2)
        return len(found) >= count
    harness.wait_for(seen, 20, 0.05, f"{inst.kind}'s header warnings")
    return dict(found)


def test_log_bytes_side_by_side(pair):
    ref, pw = pair
    headers = b"".join(b"Subject: %s x%sy\r\n" % (name.encode(), LOG_BYTES[name][0])
                       for name in sorted(LOG_BYTES))
    (_, want_q), (_, got_q) = harness.run_side_by_side(_transaction, ref, pw, [f"<u@{H}>"],
                                                       headers=headers)
    assert want_q and got_q
    want = _warned_subjects(ref, len(LOG_BYTES))
    assert want == {name: v[1] for name, v in LOG_BYTES.items()}
    assert _warned_subjects(pw, len(LOG_BYTES)) == want


# ---------------------------------------------------------------- protocol names after STARTTLS

def _greeting_session(inst, steps, smtputf8):
    """``steps`` (greetings and STARTTLS), then a refused and an accepted recipient:
    (the refusal's proto=... helo=..., the Received header's "with" word)."""
    pattern = re.compile(r"reject: RCPT from .* to=<nobody@virtual\.test> "
                         r"(proto=\S+(?: helo=<[^>]*>)?)")
    before = len(pattern.findall(inst.log_text()))
    s = socket.create_connection(("127.0.0.1", inst.port), timeout=20)
    s.settimeout(20)
    f = s.makefile("rb")

    def cmd(line=None):
        if line is not None:
            s.sendall(_bytes(line) + b"\r\n")
        text = []
        while True:
            ln = f.readline()
            text.append(ln)
            if not ln or ln[3:4] != b"-":
                return _raw(b"".join(text))
    try:
        cmd()
        for step in steps:
            assert cmd(step).startswith(("250", "220")), step
            if step == "STARTTLS":
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                s = ctx.wrap_socket(s, server_hostname=H)
                f = s.makefile("rb")
        cmd("MAIL FROM:<s@example.org>" + (" SMTPUTF8" if smtputf8 else ""))
        assert cmd("RCPT TO:<nobody@virtual.test>").startswith("550")
        cmd(f"RCPT TO:<u@{H}>")
        cmd("DATA")
        qid = re.search(r"queued as (\w+)", cmd("Subject: t\r\n\r\nhi\r\n.")).group(1)
        cmd("QUIT")
    finally:
        s.close()
    found: list[str] = []

    def logged():
        found[:] = pattern.findall(inst.log_text())
        return len(found) > before
    harness.wait_for(logged, 20, 0.05, f"{inst.kind}'s reject line")
    if inst.kind == "postfix":
        head = subprocess.run(["/usr/sbin/postcat", "-c", str(inst.config_dir), "-bh", "-q", qid],
                              capture_output=True, timeout=30).stdout
    else:
        from postwell.queue import QueueStore
        head = b"".join(QueueStore(str(inst.queue_dir)).open(qid, "hold",
                                                             writable=False).iter_content())
    return found[before], re.search(rb"\tby \S+ \(\w+\) with (\S+)", head).group(1).decode()


@pytest.mark.parametrize("steps, smtputf8", [
    (["EHLO a.example"], True),
    (["EHLO a.example", "STARTTLS", "HELO b.example"], False),
    (["EHLO a.example", "STARTTLS", "HELO b.example"], True),
    (["HELO a.example", "STARTTLS", "HELO b.example"], False),
    (["HELO a.example", "STARTTLS", "HELO b.example"], True),
    (["HELO a.example", "STARTTLS", "EHLO b.example"], False),
    (["EHLO a.example", "STARTTLS"], False),
    (["HELO a.example", "STARTTLS"], True),
], ids=lambda v: "-".join(w.split()[0] for w in v) if isinstance(v, list) else str(v))
def test_protocol_names_side_by_side(pair, steps, smtputf8):
    ref, pw = pair
    want, got = harness.run_side_by_side(_greeting_session, ref, pw, steps, smtputf8)
    assert got == want


# ---------------------------------------------------------------- the null recipient in cleanup

def test_cleanup_sends_the_null_recipient_to_empty_address_recipient(tmp_path):
    """Postfix's cleanup_addr_recipient(): "" becomes $empty_address_recipient (then
    qualified), the original recipient stays empty, so the qmgr logs no orig_to=
    (sendmail '""' on Postfix 3.7: to=<MAILER-DAEMON@example.test>, no orig_to)."""
    from postwell.cleanup import Cleanup
    from postwell.config.main import Config
    from postwell.queue import QueueStore
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    for params, want in (({}, "MAILER-DAEMON@example.test"),
                         ({"empty_address_recipient": "nobody"}, "nobody@example.test")):
        cfg = Config(str(tmp_path), {"myhostname": H, "mydomain": "example.test",
                                     "myorigin": "example.test", **params}, {}, [])
        cs = Cleanup(cfg, store, NullLog("cleanup")).open(rewrite_local=True)
        cs.set_sender("s@example.test")
        cs.add_recipient("")
        cs.write(b"Subject: t\r\n\r\nhi\r\n")
        reply = asyncio.run(cs.finish())
        assert reply.code == 250, reply
        with store.open(cs.queue_id) as q:
            assert [(r.address, r.orig) for r in q.recipients] == [(want, None)]


# ---------------------------------------------------------------- notices of SMTPUTF8 mail

def _notice(smtputf8, rcpts, sender="alice@virtual.test", full=None):
    from postwell.config.main import Config
    from postwell.dsn import FAILURE, render_notice
    cfg = Config("/nonexistent", {"myhostname": H, "mydomain": "example.test"}, {}, [])
    return render_notice(cfg, kind=FAILURE, queue_id="C60E46F66DC", sender=sender,
                         arrival_time=1_796_000_000.0, recipients=rcpts,
                         original=lambda: iter([b"Subject: t\n", b"\n", b"hi\n"]),
                         content_size=20, full=full, now=1_796_000_060.0,
                         smtputf8=smtputf8).decode("utf-8", "surrogateescape")


def test_smtputf8_notice_as_postfix():
    """What Postfix 3.7 sent back for MAIL FROM:<alice@virtual.test> SMTPUTF8 to an
    unknown <jörg@mx.example.test>: the delivery report and the returned message in
    their RFC 6533 "global" types, the recipient typed utf-8."""
    from postwell.dsn import DsnRecipient
    r = DsnRecipient(f"j\u00f6rg@{H}", "5.1.1", 'unknown user: "j\u00f6rg"',
                     orcpt=f"rfc822;j\u00f6rg@{H}")
    text = _notice(True, [r])
    assert ("Content-Description: Delivery report\nContent-Type: message/global-delivery-status\n"
            "Content-Transfer-Encoding: 8bit\n\n") in text
    assert "X-Postfix-Sender: rfc822; alice@virtual.test\n" in text
    assert (f"Final-Recipient: utf-8; j\u00f6rg@{H}\nOriginal-Recipient: rfc822;j\u00f6rg@{H}\n"
            "Action: failed\n") in text
    assert ("Content-Description: Undelivered Message\nContent-Type: message/global\n"
            "Content-Transfer-Encoding: 8bit\n\nReturn-Path: <alice@virtual.test>\n") in text
    assert "report-type=delivery-status;" in text
    # Headers only: message/global-headers.
    assert "Content-Type: message/global-headers\n" in _notice(True, [r], full=False)
    # Without SMTPUTF8 nothing changes; an address that is no UTF-8 stays rfc822.
    plain = _notice(False, [r], sender="j\u00f6rg@example.org")
    assert "Content-Type: message/delivery-status\n" in plain
    assert f"Final-Recipient: rfc822; j\u00f6rg@{H}\n" in plain
    assert "X-Postfix-Sender: rfc822; j\u00f6rg@example.org\n" in plain
    raw = DsnRecipient(_raw(b"j\xf6rg@" + H.encode()), "5.1.1", "x", orig=_raw(b"\xe9@x.test"))
    assert (_bytes(f"Final-Recipient: rfc822; {raw.address}\nOriginal-Recipient: rfc822;"
                   f"{raw.orig}\n") in _bytes(_notice(True, [raw])))
    orig = DsnRecipient(f"x@{H}", "5.1.1", "x", orig="\u00e9@x.test")
    assert "Original-Recipient: utf-8; \u00e9@x.test\n" in _notice(True, [orig])
    assert "X-Postfix-Sender: utf-8; j\u00f6rg@example.org\n" in _notice(True, [r],
                                                                         sender="j\u00f6rg@example.org")


# ---------------------------------------------------------------- Received: ... for <path>

def _received_for(inst, qid) -> str:
    if inst.kind == "postfix":
        head = subprocess.run(["/usr/sbin/postcat", "-c", str(inst.config_dir), "-bh", "-q", qid],
                              capture_output=True, timeout=30).stdout
    else:
        from postwell.queue import QueueStore
        head = b"".join(QueueStore(str(inst.queue_dir)).open(qid, "hold",
                                                             writable=False).iter_content())
    return _raw(re.search(rb"\n\tfor (<.*>);", head).group(1))


@pytest.mark.parametrize("rcpt", [
    f'<"a b"@{H}>', f'<"dan@remote.test"@{H}>', f"<@a.test:u1@{H}>", f'<"a\\"b"@{H}>',
    f'<""@{H}>', f"<a.@{H}>", f'<"a\\\\b"@{H}>', f'<".a"@{H}>', f"<j\u00f6rg@{H}>",
])
def test_received_for_side_by_side(pair, rcpt):
    ref, pw = pair
    (_, want_q), (_, got_q) = harness.run_side_by_side(_transaction, ref, pw, [rcpt])
    assert want_q and got_q
    assert _received_for(pw, got_q) == _received_for(ref, want_q)


def test_notice_lines_wrap_at_79_octets():
    """Postfix's line_wrap() counts bytes: "café" takes five, so "(in" no longer fits
    (seen side by side with 3.7 in test_smtp_client_fuzz7's notice_wrap_utf8)."""
    from postwell.dsn.notice import wrap_line
    text = ("<u1@remote.test>: host 127.0.0.1[127.0.0.1] said: 550 5.7.1 caf\u00e9 xxxxxxxxxx "
            "(in reply to DATA command)")
    assert wrap_line(text) == [text[:text.index(" (in")], "    (in reply to DATA command)"]
    ascii_text = text.replace("\u00e9", "e")
    assert wrap_line(ascii_text)[0].endswith("xxxxxxxxxx (in")
    assert wrap_line(_raw(b"x" * 70 + b" \xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9 y")) == [
        _raw(b"x" * 70 + b" \xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9"), "    y"]


def test_protocol_error_names_the_remote_mta():
    from postwell.dsn.notice import diagnostic
    reason = ("Protocol error: host mx.far.test[192.0.2.7] said: 250 2.0.0 fine "
              "(in reply to DATA command)")
    assert diagnostic(reason, "smtp", "250 2.0.0 fine") == ("mx.far.test", "smtp; 250 2.0.0 fine")
    assert diagnostic(reason) == ("mx.far.test", "smtp; 250 2.0.0 fine")
