"""local_header_rewrite_clients side by side with Postfix 3.7: which SMTP clients get
their headers rewritten as local (an unqualified From: completed with $myorigin,
missing Message-Id/Date added)."""

from __future__ import annotations

import re
import smtplib

import pytest

import harness

CASES = {
    "default": {},
    "empty": {"local_header_rewrite_clients": ""},
    "static_all": {"local_header_rewrite_clients": "static:all"},
    "mynetworks_in": {"local_header_rewrite_clients": "permit_mynetworks",
                      "mynetworks": "127.0.0.0/8"},
    "mynetworks_out": {"local_header_rewrite_clients": "permit_mynetworks",
                       "mynetworks": "10.9.9.0/24"},
    "sasl_only": {"local_header_rewrite_clients": "permit_sasl_authenticated"},
}


def _headers(inst) -> list[str]:
    text = inst.wait_maildir("alice", 1, timeout=20)[0].read_text()
    head = text.split("\n\n", 1)[0]
    keep = []
    for line in re.split(r"\n(?![ \t])", head):
        name = line.split(":", 1)[0].lower()
        if name in ("from", "to", "cc"):
            keep.append(line)
        elif name in ("message-id", "date"):
            keep.append(name + ": PRESENT")
    return sorted(keep)


@pytest.mark.postfix
@pytest.mark.parametrize("name", list(CASES))
def test_rewrite_clients_match_reference(tmp_path, name):
    if harness.reference_available():
        pytest.skip(harness.reference_available())
    params = dict(CASES[name])
    ref = harness.ReferencePostfix(tmp_path / "ref", params)
    pw = harness.PostwellInstance(tmp_path / "pw", params)
    try:
        harness.start_side_by_side(ref, pw)

        def send(inst):
            with smtplib.SMTP("127.0.0.1", inst.port, timeout=20) as s:
                s.sendmail("joe@example.org", [f"alice@{harness.VIRTUAL_DOMAIN}"],
                           b"From: joe\r\nTo: alice@" + harness.VIRTUAL_DOMAIN.encode()
                           + b", bob\r\nSubject: rw\r\n\r\nbody\r\n")
            return _headers(inst)
        want, got = harness.run_side_by_side(send, ref, pw)
    finally:
        harness.stop_side_by_side([ref, pw])
    assert got == want
