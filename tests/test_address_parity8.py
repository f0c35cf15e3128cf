"""Address and DSN parity with Postfix 3.7, eighth sweep.

* trivial-rewrite takes an empty domain for a local one: "@" and "@@" resolve to
  "MAILER-DAEMON@" with the error flag (the qmgr bounces them "5.1.3 bad address
  syntax", orig_to= the address as given), "a@b@" to "a@b".
* A notice's Original-Recipient: a recorded ORCPT as it was stored; without one the
  original recipient as "rfc822;addr", the form of the ORCPT Postfix's cleanup
  records for every smtpd, pickup and local(8) recipient (its bounce daemon's
  "rfc822; addr" is only for a queue file without that record).
* A success notice returns the headers only, RET=FULL or not.
* The SMTP engine decodes ORCPT=utf-8;... as RFC 6533 (\\x{HEX}), other types as
  xtext (RFC 3461 4).

The side-by-side test submits the same recipients with both sendmails and compares
the bounce log lines and the notices.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import subprocess
import sys

import pytest

import harness
from postwell.config.main import Config
from postwell.dsn.notice import FAILURE, SUCCESS, DsnRecipient, render_notice
from postwell.policy import AddressResolver, OwnAddresses, ResolveFlag
from postwell.smtp.server import Rcpt
from test_smtp_engine import Driver, one

T0 = 1_700_000_000.0
ORIGINAL = b"From: a@x.test\nSubject: hi\n\nbody line\n"


# ---------------------------------------------------------------- resolver

def _resolver(extra=None):
    params = {"myhostname": "mx.example.com", "mydomain": "example.com",
              "mydestination": "$myhostname, localhost", "compatibility_level": "3.6",
              "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4"}
    params.update(extra or {})
    cfg = Config("/nonexistent", params, {}, [])
    own = OwnAddresses(cfg, system_addresses=lambda: ["127.0.0.1"])
    return AddressResolver(cfg, tables={}, own_addresses=own)


@pytest.mark.parametrize("address,recipient,error", [
    # What Postfix 3.7 logged as to=<...> for these sendmail recipients.
    ("@", "MAILER-DAEMON@", True),
    ("@@", "MAILER-DAEMON@", True),
    ('""@', "MAILER-DAEMON@", True),
    ("@@mx.example.com", "MAILER-DAEMON@", True),
    ("a@", "a@", True),
    ("bob@@mx.example.com", "bob@", True),
    # resolve_addr(): the trailing "@" is stripped as a local domain, then the rest
    # resolves on its own.
    ("a@b.test@", "a@b.test", False),
    ("a@mx.example.com@", "a@mx.example.com", False),
    ("@mx.example.com", "MAILER-DAEMON@mx.example.com", False),
    ("", "MAILER-DAEMON@mx.example.com", False),
])
def test_empty_domain_is_local(address, recipient, error):
    r = _resolver().resolve(address)
    assert r.recipient == recipient
    assert bool(r.flags & ResolveFlag.FLAG_ERROR) == error
    if error:
        # Postfix cuts an invalid address short as the default class.
        assert r.address_class == "default"


def test_empty_domain_uses_empty_address_recipient():
    r = _resolver({"empty_address_recipient": "nobody"}).resolve("@")
    assert r.recipient == "nobody@" and r.flags & ResolveFlag.FLAG_ERROR


def test_resolve_null_domain_still_strips_the_at():
    r = _resolver({"resolve_null_domain": "yes"}).resolve("a@")
    assert r.recipient == "a@mx.example.com" and not r.flags & ResolveFlag.FLAG_ERROR


# ---------------------------------------------------------------- notices

@pytest.fixture
def cfg(tmp_path):
    return Config(str(tmp_path), {"myhostname": "mx.demo.test", "mydomain": "demo.test",
                                  "myorigin": "$mydomain"}, {}, [])


def _render(cfg, kind, rcpts, **kw):
    data = render_notice(cfg, kind=kind, queue_id="4F1A2B3C", sender="alice@x.test",
                         arrival_time=T0, recipients=rcpts, original=lambda: iter([ORIGINAL]),
                         content_size=len(ORIGINAL), now=T0 + 60, **kw)
    return data, email.message_from_bytes(data, policy=email.policy.compat32)


def test_original_recipient_forms(cfg):
    rcpts = [DsnRecipient("a@v.test", "5.1.1", "x", orig="A@v.test", orcpt="rfc822;A@v.test"),
             DsnRecipient("b@v.test", "5.1.1", "x", orig="info@v.test"),
             DsnRecipient("c@v.test", "5.1.1", "x", orcpt="rfc822;c@v.test  "),
             DsnRecipient("d@v.test", "5.1.1", "x")]
    data, _ = _render(cfg, FAILURE, rcpts)
    got = re.findall(rb"^Original-Recipient: (.*)$", data, re.M)
    # A stored ORCPT as it is; else the original, as cleanup's ORCPT would say it.
    assert got == [b"rfc822;A@v.test", b"rfc822;info@v.test", b"rfc822;c@v.test  "]


@pytest.mark.parametrize("ret", [None, "FULL", "HDRS"])
def test_success_notice_returns_headers_only(cfg, ret):
    r = DsnRecipient("bob@v.test", "2.0.0", "delivered to maildir", action="delivered")
    data, msg = _render(cfg, SUCCESS, [r], ret=ret)
    original = msg.get_payload()[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Description"] == "Message Headers"
    assert b"body line" not in data and b"Subject: hi" in data


def test_failure_notice_still_returns_the_message(cfg):
    r = DsnRecipient("bob@v.test", "5.1.1", "unknown user")
    data, msg = _render(cfg, FAILURE, [r], ret="FULL")
    assert msg.get_payload()[2].get_content_type() == "message/rfc822" and b"body line" in data


# ---------------------------------------------------------------- SMTP engine ORCPT

@pytest.mark.parametrize("arg,reply", [
    # Postfix 3.7's replies (tests/test_smtpd_parity8.py runs them side by side).
    (b"ORCPT=utf-8;bad\\x{ZZ}@x", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"ORCPT=utf-8;a\\x{110000}@x", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"ORCPT=utf-8;a\\x{F6", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"ORCPT=UTF-8;a\\x{zz}", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"ORCPT=utf-8;a+ZZb", "250 2.1.5 Ok"),
    (b"ORCPT=utf-8;j\\x{F6}rg@x", "250 2.1.5 Ok"),
    (b"ORCPT=rfc822;a+ZZb", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"ORCPT=;a", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
])
def test_engine_orcpt_syntax(arg, reply):
    assert one(b"RCPT TO:<c@d> " + arg + b"\r\n", b"MAIL FROM:<a@b>\r\n") == reply + "\r\n"


@pytest.mark.parametrize("arg,orcpt", [
    (b"ORCPT=utf-8;j\\x{F6}rg@x", "utf-8;j\u00f6rg@x"),
    (b"ORCPT=UTF-8;a+ZZb", "UTF-8;a+ZZb"),
    (b"ORCPT=rfc822;a+2Bb@c", "rfc822;a+b@c"),
    (b"ORCPT=rfc822;+C3+A9@c", "rfc822;\u00e9@c"),      # xtext bytes, then UTF-8
    (b"ORCPT=rfc822;a@c+20+20", "rfc822;a@c"),          # stored: trailing blanks go
])
def test_engine_orcpt_decoded(arg, orcpt):
    d = Driver()
    d.feed(b"MAIL FROM:<>\r\nRCPT TO:<c@d> " + arg + b"\r\n")
    (r,) = d.of(Rcpt)
    assert r.orcpt == orcpt


# ---------------------------------------------------------------- side by side

PICKUP = "pickup    unix  n       -       n       60      1       pickup\n"
# Every recipient ends at the error transport or an unknown virtual mailbox (each
# bounces): nothing leaves the machine (no DNS lookup of a remote domain).
SENDMAIL_RCPTS = ["@", "@@", "nobody@virtual.test", "x%y@virtual.test", "erin@virtual.test"]
# Where Postfix's cleanup records an ORCPT after rewriting (rfc822;nobody@$myorigin,
# rfc822;carl@virtual.test) and the empty recipient draws no orig_to=.
CLEANUP_RCPTS = ['""', "nobody", "virtual.test!carl", "erin@virtual.test"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("address8")
    params = {"notify_classes": "", "mail_name": "Postfix", "myorigin": "virtual.test"}
    ref = harness.ReferencePostfix(base, params)
    pw = harness.PostwellInstance(base, params)
    pw.master_cf = pw.default_master_cf() + PICKUP
    pw.write_config()
    try:
        harness.start_side_by_side(ref, pw)
        yield ref, pw
    finally:
        harness.stop_side_by_side([ref, pw])


_BOUNCED = re.compile(r"\]: [0-9A-F]+: to=<([^>]*)>, (?:orig_to=<([^>]*)>, )?relay=[^,]*, "
                      r"delay=[^,]*, delays=[^,]*, dsn=([\d.]+), status=bounced \((.*)\)$", re.M)


def _submit(inst, rcpts):
    """The bounce lines (to, orig_to, dsn, text), the notice's recipient blocks
    (Final-Recipient, Original-Recipient, Action, Status) and its human-readable
    paragraphs, each sorted (Postfix's qmgr sorts recipients; postwell keeps their
    order: another part's difference)."""
    box = inst.root / "mail" / "virtual.test" / "alice" / "new"
    before = set(box.glob("*")) if box.exists() else set()
    log_at = os.path.getsize(inst.maillog)
    if inst.kind == "postfix":
        cmd = ["/usr/sbin/sendmail", "-C", str(inst.config_dir)]
    else:
        cmd = [sys.executable, "-m", "postwell.cli.sendmail", "-C", str(inst.config_dir)]
    subprocess.run(cmd + ["-f", "alice@virtual.test", *rcpts], timeout=30, check=True,
                   input=b"Subject: address8\n\nbody line\n",
                   env=dict(os.environ, MAIL_CONFIG=str(inst.config_dir)))

    def notice():
        new = [p for p in (set(box.glob("*")) if box.exists() else set()) - before
               if b"Undelivered Mail Returned" in p.read_bytes()]
        return new[0] if new else None
    path = harness.wait_for(notice, 30, 0.05, f"{inst.kind}'s bounce notice")

    def lines():
        with open(inst.maillog, "rb") as f:
            f.seek(log_at)
            text = f.read().decode("utf-8", "replace")
        got = sorted(m.groups(default="") for m in _BOUNCED.finditer(text))
        return got if len(got) >= len(rcpts) else None    # none has a mailbox
    bounced = harness.wait_for(lines, 30, 0.05, f"{inst.kind}'s bounce lines")
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    human, report = msg.get_payload()[0], msg.get_payload()[1]
    paras = sorted(" ".join(p.split()) for p in human.get_payload().split("\n\n")
                   if p.startswith("<"))
    blocks = sorted((b["Final-Recipient"], b["Original-Recipient"], b["Action"], b["Status"])
                    for b in report.get_payload()[1:])
    return bounced, blocks, paras


def test_sendmail_recipients_side_by_side(pair):
    ref, pw = pair
    want, got = harness.run_side_by_side(_submit, ref, pw, SENDMAIL_RCPTS)
    bounced, blocks, _ = want
    # What Postfix 3.7 does with them (the reason this test exists).
    assert ("MAILER-DAEMON@", '""@', "5.1.3", "bad address syntax") in bounced
    assert ("MAILER-DAEMON@", '"@"@', "5.1.3", "bad address syntax") in bounced
    assert ("rfc822; nobody@virtual.test", "rfc822;nobody@virtual.test", "failed",
            "5.1.1") in blocks
    assert ("rfc822; MAILER-DAEMON@", "rfc822;@@", "failed", "5.1.3") in blocks
    assert got == want


def test_sendmail_unqualified_recipients_side_by_side(pair):
    ref, pw = pair
    want, got = harness.run_side_by_side(_submit, ref, pw, CLEANUP_RCPTS)
    bounced, blocks, _ = want
    assert ("rfc822; nobody@virtual.test", "rfc822;nobody@virtual.test", "failed",
            "5.1.1") in blocks
    assert ("MAILER-DAEMON@virtual.test", "", "5.1.1") == \
        [b for b in bounced if b[0] == "MAILER-DAEMON@virtual.test"][0][:3]
    assert got == want
