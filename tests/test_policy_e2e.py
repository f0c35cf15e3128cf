"""No open relay, side by side: the same RCPT dialogue against postwell and the
reference Postfix, full reply texts compared.

The loopback client is made an outside client with mynetworks = 192.0.2.0/24.
"""

from __future__ import annotations

import pytest

import harness

EXTRA = {
    "mynetworks": "192.0.2.0/24",
    "mydestination": "$myhostname, localhost.$mydomain, localhost, $mydomain",
    "relay_domains": "relay.test",
    "smtpd_soft_error_limit": "1000",
    "smtpd_hard_error_limit": "1000",
    "smtpd_error_sleep_time": "0",
    "smtpd_recipient_restrictions": "reject_non_fqdn_recipient",
}

D = harness.DOMAIN
V = harness.VIRTUAL_DOMAIN
RECIPIENTS = [
    f"user@{D}",
    "user@other.org",
    f"user%other.org@{D}",
    f"@a.org:user@{D}",
    f"@{D}:user@other.org",
    f"user@other.org@{D}",
    f"other.org!user@{D}",
    f"user@{D}.",
    f"USER@{D.upper()}",
    "user@relay.test",
    "user%other.org@relay.test",
    f"alice@{V}",
    f"nobody@{V}",
    f"a!b!user@{D}",
    f"user%a%b@{D}",
    "postmaster",
    "user",
    f"user@sub.{D}",
]


# Quoted local parts and address literals: the policy must see Postfix's internal
# (unquoted) address form, which is also what Postfix echoes in the reply.
SMTPD_SIDE = [
    f'"user@other.org"@{D}',
    f'"user%other.org"@{D}',
    "user@[127.0.0.1]",
    "user@[192.0.2.99]",
]


def _dialogue(port, recipients):
    lines = ["EHLO client.example.net", "MAIL FROM:<s@example.org>"]
    lines += [f"RCPT TO:<{r}>" for r in recipients]
    lines += ["QUIT"]
    return harness.dialogue(port, lines, timeout=20)


def _compare(postwell_factory, reference_factory, recipients):
    ref = reference_factory(EXTRA).start()
    try:
        pw = postwell_factory(EXTRA).start()
    except Exception as e:  # the smtpd is another part; report, don't hide
        pytest.fail(f"postwell did not start: {e}")
    want = _dialogue(ref.port, recipients)
    got = _dialogue(pw.port, recipients)
    assert len(got) == len(want)
    # banner and EHLO differ in host name/extensions; compare from MAIL on
    rows = list(zip(["MAIL"] + recipients + ["QUIT"], want[2:], got[2:]))
    mismatches = [(what, str(w), str(g)) for what, w, g in rows if str(w) != str(g)]
    assert not mismatches, "\n".join(f"{what}: postfix={w!r} postwell={g!r}" for what, w, g in mismatches)


def test_relay_decisions_match_postfix(postwell_factory, reference_factory):
    _compare(postwell_factory, reference_factory, RECIPIENTS)


def test_quoted_and_literal_recipients_match_postfix(postwell_factory, reference_factory):
    _compare(postwell_factory, reference_factory, SMTPD_SIDE)


ACCESS = dict(EXTRA)
ACCESS.update({
    "smtpd_helo_restrictions": "reject_invalid_helo_hostname",
    "smtpd_sender_restrictions": "check_sender_access inline:{{bad@example.org=REJECT}, "
                                 "{spam.example=550 5.1.1 go away}}, reject_non_fqdn_sender",
    "smtpd_recipient_restrictions": "check_recipient_access inline:{{rej@example.test=REJECT no thanks}, "
                                    "{c450@example.test=450 4.2.0 busy}, dip@example.test=DEFER_IF_PERMIT, "
                                    "{cls@example.test=reject_unauth_destination}}, reject_non_fqdn_recipient",
    "smtpd_data_restrictions": "reject_multi_recipient_bounce",
})


def test_access_restrictions_match_postfix(postwell_factory, reference_factory):
    ref = reference_factory(ACCESS).start()
    try:
        pw = postwell_factory(ACCESS).start()
    except Exception as e:
        pytest.fail(f"postwell did not start: {e}")
    script = ["EHLO client.example.net",
              "MAIL FROM:<bad@example.org>", "RCPT TO:<user@example.test>", "RSET",
              "MAIL FROM:<x@sub.spam.example>", "RCPT TO:<user@example.test>", "RSET",
              "MAIL FROM:<unqualified>", "RCPT TO:<user@example.test>", "RSET",
              "MAIL FROM:<s@example.org>", "RCPT TO:<rej@example.test>", "RCPT TO:<c450@example.test>",
              "RCPT TO:<dip@example.test>", "RCPT TO:<cls@example.test>", "RCPT TO:<x@other.org>",
              "RSET",
              "MAIL FROM:<>", "RCPT TO:<user@example.test>", "RCPT TO:<postmaster@example.test>", "DATA",
              "RSET", "QUIT"]
    want = harness.dialogue(ref.port, script, timeout=20)
    got = harness.dialogue(pw.port, script, timeout=20)
    rows = list(zip(script[1:], want[2:], got[2:]))
    mismatches = [(what, str(w), str(g)) for what, w, g in rows if str(w) != str(g)]
    assert not mismatches, "\n".join(f"{what}: postfix={w!r} postwell={g!r}" for what, w, g in mismatches)
    bad_helo = ["EHLO bad_name!", "MAIL FROM:<s@example.org>", "RCPT TO:<user@example.test>", "QUIT"]
    want = harness.dialogue(ref.port, bad_helo, timeout=20)
    got = harness.dialogue(pw.port, bad_helo, timeout=20)
    assert [str(r) for r in got[2:]] == [str(r) for r in want[2:]]


def test_local_recipient_maps_match_postfix(postwell_factory, reference_factory):
    conf = dict(EXTRA)
    conf.update({"local_recipient_maps": "proxy:unix:passwd.byname $alias_maps", "alias_maps": "",
                 "recipient_delimiter": "+", "smtpd_reject_unlisted_sender": "yes"})
    ref = reference_factory(conf).start()
    try:
        pw = postwell_factory(conf).start()
    except Exception as e:
        pytest.fail(f"postwell did not start: {e}")
    script = ["EHLO client.example.net", "MAIL FROM:<s@example.org>",
              "RCPT TO:<root@example.test>", "RCPT TO:<Root@Example.Test>", "RCPT TO:<root+ext@example.test>",
              "RCPT TO:<nosuch@example.test>", "RCPT TO:<nosuch+root@example.test>",
              "RCPT TO:<MAILER-DAEMON@example.test>", "RCPT TO:<root%other.org@example.test>",
              "RCPT TO:<root@localhost>", "RSET",
              "MAIL FROM:<nosuch@example.test>", "RCPT TO:<root@example.test>", "QUIT"]
    want = harness.dialogue(ref.port, script, timeout=20)
    got = harness.dialogue(pw.port, script, timeout=20)
    rows = list(zip(script[1:], want[2:], got[2:]))
    mismatches = [(what, str(w), str(g)) for what, w, g in rows if str(w) != str(g)]
    assert not mismatches, "\n".join(f"{what}: postfix={w!r} postwell={g!r}" for what, w, g in mismatches)
