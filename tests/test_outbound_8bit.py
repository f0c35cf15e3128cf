"""Issue 4 end to end: 8BITMIME downgrade and SMTPUTF8, postwell beside Postfix.

Each MTA relays the same messages to its own smtp-sink started with the same
options (-8: no 8BITMIME, and smtp-sink never offers SMTPUTF8); smtp-sink's
dump files show the MAIL arguments and the content as received.  What postwell
sends (or bounces) must be what the reference Postfix 3.7 sends (or bounces).
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile
from pathlib import Path

import pytest

import harness
from test_outbound_relay import outbound_postwell

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(not os.access(harness.SMTP_SINK, os.X_OK), reason="smtp-sink not installed"),
    pytest.mark.skipif(harness.reference_available() is not None,
                       reason=str(harness.reference_available())),
]

SENDER = f"alice@{harness.VIRTUAL_DOMAIN}"

MIME_8BIT = ("From: <alice@virtual.test>\r\nTo: <x@remote.test>\r\nSubject: mime 8bit\r\n"
             "Message-ID: <mime8@example.org>\r\nMIME-Version: 1.0\r\n"
             "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             "Gr\u00fc\u00dfe aus K\u00f6ln = 100% sch\u00f6n\r\nplain line\r\n").encode()
RAW_8BIT = ("From: <alice@virtual.test>\r\nTo: <x@remote.test>\r\nSubject: raw 8bit\r\n"
            "Message-ID: <raw8@example.org>\r\n\r\nno MIME headers: \u00e9t\u00e9\r\n").encode()
MULTI_8BIT = ("From: <alice@virtual.test>\r\nTo: <x@remote.test>\r\nSubject: multi\r\n"
              "Message-ID: <multi8@example.org>\r\nMIME-Version: 1.0\r\n"
              "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\n"
              "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
              "\u00fcber\r\n--b1\r\nContent-Type: text/plain\r\n\r\nascii part\r\n--b1--\r\n").encode()
UTF8_HDR = ("From: <alice@virtual.test>\r\nTo: <x@remote.test>\r\n"
            "Subject: \u00fcnicode header\r\nMessage-ID: <utf8h@example.org>\r\n\r\nbody\r\n").encode()
ASCII = (b"From: <alice@virtual.test>\r\nTo: <x@remote.test>\r\nSubject: ascii\r\n"
         b"Message-ID: <ascii@example.org>\r\n\r\nbody\r\n")

# (name, recipient, content, MAIL options)
CASES = [
    ("mime8", "x@remote.test", MIME_8BIT, ["BODY=8BITMIME"]),
    ("raw8", "x@remote.test", RAW_8BIT, ["BODY=8BITMIME"]),
    ("multi8", "x@remote.test", MULTI_8BIT, ["BODY=8BITMIME"]),
    ("utf8rcpt", "j\u00f6rg@remote.test", ASCII.replace(b"ascii@", b"utf8rcpt@"), ["SMTPUTF8"]),
    ("utf8hdr", "x@remote.test", UTF8_HDR, ["SMTPUTF8", "BODY=8BITMIME"]),
    ("asciiutf8", "x@remote.test", ASCII, ["SMTPUTF8"]),
]


class DumpSink(harness.SmtpSink):
    def __init__(self, extra=()):
        self.dump = Path(tempfile.mkdtemp(prefix="postwell-8bit-"))
        os.chmod(self.dump, 0o777)        # smtp-sink writes as the unprivileged -u user
        super().__init__(extra=["-d", f"{self.dump}/%M.", *extra])

    def messages(self) -> dict[str, bytes]:
        """Message-ID -> the dump (smtp-sink's X- records, then the content)."""
        out = {}
        for p in self.dump.iterdir():
            data = p.read_bytes()
            m = re.search(rb"^Message-ID: <([^>]+)>", data, re.M | re.I)
            if m:
                out[m.group(1).decode()] = data
        return out

    def stop(self):
        super().stop()
        shutil.rmtree(self.dump, ignore_errors=True)


def submit(port: int):
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.test")
        for name, rcpt, content, opts in CASES:
            try:
                s.sendmail(SENDER, [rcpt], content, mail_options=opts)
            except smtplib.SMTPException as e:     # recorded: the other MTA must agree
                raise AssertionError(f"{name}: {e}") from None


def normalise(dump: bytes) -> tuple[str, str]:
    """(MAIL arguments, content without the headers that differ between MTAs)."""
    text = dump.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
    mail_args = re.search(r"^X-Mail-Args: (.*)$", text, re.M).group(1)
    head, _, body = text.partition("\n\n")
    keep = []
    skip = False
    for line in head.split("\n"):
        if line[:1] in (" ", "\t"):
            if not skip:
                keep.append(line)
            continue
        name = line.split(":", 1)[0].lower()
        skip = name.startswith("x-") or name in ("received", "return-path", "date",
                                                 "delivered-to")
        if not skip:
            keep.append(line)
    args = re.sub(r"SIZE=\d+", "SIZE=n", mail_args)
    args = re.sub(r"ENVID=\S+", "ENVID=x", args)
    return args, "\n".join(keep) + "\n\n" + body


def run_both(postwell_factory, reference_factory, sink_extra):
    sinks = {}
    results = {}
    try:
        for kind in ("postwell", "postfix"):
            sink = DumpSink(sink_extra)
            sinks[kind] = sink
            # One session per message: Postfix 3.7 checks "SMTPUTF8 is required" only
            # while setting a session up, so over a reused (cached) connection it sends
            # UTF-8 mail to a server without SMTPUTF8 anyway (seen here with conn_use=2).
            # That quirk breaks RFC 6531 3.2 and postwell does not copy it.
            params = {"relayhost": f"[127.0.0.1]:{sink.port}", "smtputf8_enable": "yes",
                      "smtp_connection_cache_on_demand": "no"}
            if kind == "postwell":
                inst = outbound_postwell(postwell_factory, params)
            else:
                inst = reference_factory(params, name="ref8")
            inst.start()
            submit(inst.port)
            logs = {}
            for name, rcpt, _, _ in CASES:
                mid = {"utf8rcpt": "utf8rcpt", "utf8hdr": "utf8h", "asciiutf8": "ascii",
                       "mime8": "mime8", "raw8": "raw8", "multi8": "multi8"}[name]
                qid = inst.wait_log(rf"(\w+): message-id=<{mid}@example\.org>", 20).group(1)
                logs[name] = inst.wait_log(rf"{qid}: to=<[^>]*>.*?dsn=(\S+), status=(\w+) (.*)$",
                                           30)
            inst.wait_queue_empty(30)
            n_sent = sum(m.group(2) == "sent" for m in logs.values())
            delivered = harness.wait_for(lambda: len(sink.messages()) >= n_sent and sink.messages(),
                                         10, 0.1, f"{n_sent} dump files")
            results[kind] = (
                {n: (m.group(1), m.group(2), m.group(3)) for n, m in logs.items()},
                {k: normalise(v) for k, v in delivered.items()})
            inst.stop()
    finally:
        for s in sinks.values():
            s.stop()
    return results


def test_without_8bitmime_postwell_converts_and_bounces_like_postfix(postwell_factory,
                                                                    reference_factory):
    res = run_both(postwell_factory, reference_factory, ["-8"])
    (pw_status, pw_msgs), (pf_status, pf_msgs) = res["postwell"], res["postfix"]
    port_re = re.compile(r"127\.0\.0\.1\[127\.0\.0\.1\](:\d+)?")
    norm = {k: {n: (d, s, port_re.sub("HOST", r)) for n, (d, s, r) in v.items()}
            for k, v in (("postwell", pw_status), ("postfix", pf_status))}
    assert norm["postwell"] == norm["postfix"]
    assert set(pw_msgs) == set(pf_msgs)
    for mid in pf_msgs:
        assert pw_msgs[mid] == pf_msgs[mid], mid


def test_with_8bitmime_both_pass_8bit_through(postwell_factory, reference_factory):
    res = run_both(postwell_factory, reference_factory, [])
    (pw_status, pw_msgs), (pf_status, pf_msgs) = res["postwell"], res["postfix"]
    port_re = re.compile(r"127\.0\.0\.1\[127\.0\.0\.1\](:\d+)?")
    norm = {k: {n: (d, s, port_re.sub("HOST", r)) for n, (d, s, r) in v.items()}
            for k, v in (("postwell", pw_status), ("postfix", pf_status))}
    assert norm["postwell"] == norm["postfix"]
    assert set(pw_msgs) == set(pf_msgs)
    for mid in pf_msgs:
        assert pw_msgs[mid] == pf_msgs[mid], mid


def test_without_8bitmime_the_8bit_part_goes_out_quoted_printable(postwell_factory,
                                                                   reference_factory):
    """What the side-by-side run compared, stated: only 8-bit MIME parts are converted."""
    with DumpSink(["-8"]) as sink:
        pw = outbound_postwell(postwell_factory, {"relayhost": f"[127.0.0.1]:{sink.port}"})
        pw.start()
        with smtplib.SMTP("127.0.0.1", pw.port, timeout=15) as s:
            for content in (MIME_8BIT, RAW_8BIT, MULTI_8BIT):
                s.sendmail(SENDER, ["x@remote.test"], content, mail_options=["BODY=8BITMIME"])
        pw.wait_queue_empty(30)
        msgs = harness.wait_for(lambda: len(sink.messages()) == 3 and sink.messages(), 10, 0.1,
                                "three dumps")
    args, mime = normalise(msgs["mime8@example.org"])
    assert "BODY=8BITMIME" not in args           # RFC 6152 3: not to a server without it
    assert "Content-Transfer-Encoding: quoted-printable" in mime
    assert "Content-Transfer-Encoding: 8bit" not in mime
    assert "Gr=C3=BC=C3=9Fe aus K=C3=B6ln =3D 100% sch=C3=B6n" in mime
    _, multi = normalise(msgs["multi8@example.org"])
    assert "=C3=BCber" in multi and "ascii part" in multi
    _, raw = normalise(msgs["raw8@example.org"])
    assert "no MIME headers: \u00e9t\u00e9" in raw   # nothing declares 8bit: left alone


def test_smtputf8_check_also_applies_on_a_reused_connection(postwell_factory):
    """Unlike Postfix 3.7 (see run_both), a cached connection is no excuse to send
    UTF-8 mail to a server without SMTPUTF8 (RFC 6531 3.2)."""
    from test_outbound_peers import PySink
    keywords = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")
    with PySink(keywords=keywords) as sink:
        pw = outbound_postwell(postwell_factory, {"relayhost": f"[127.0.0.1]:{sink.port}"})
        pw.start()
        with smtplib.SMTP("127.0.0.1", pw.port, timeout=15) as s:
            s.sendmail(SENDER, ["x@remote.test"], ASCII)
            sink.wait_transactions(1, 20)
            s.sendmail(SENDER, ["j\u00f6rg@remote.test"], ASCII.replace(b"ascii@", b"u2@"),
                       mail_options=["SMTPUTF8"])
            s.sendmail(SENDER, ["x@remote.test"], UTF8_HDR, mail_options=["SMTPUTF8"])
        line = pw.wait_log(r"to=<j\u00f6rg@remote\.test>.*$", 20).group(0)
        assert "dsn=5.6.7, status=bounced (SMTPUTF8 is required, but was not offered by host " \
               "127.0.0.1[127.0.0.1])" in line, line
        line = pw.wait_log(r"(\w+): message-id=<utf8h@", 20)
        line = pw.wait_log(rf"{line.group(1)}: to=<x@remote\.test>.*$", 20).group(0)
        assert "status=bounced (SMTPUTF8 is required" in line, line
        pw.wait_queue_empty(20)
        assert sink.sessions == 1 and len(sink.transactions) == 1
