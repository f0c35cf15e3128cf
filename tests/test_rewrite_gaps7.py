"""trivial-rewrite's local context for an address that ends in "@": it has an
"@", so no @$myorigin is appended, and the queue manager bounces it as bad
address syntax (Postfix 3.7, observed with sendmail -- bob@ and -- @)."""

from __future__ import annotations

import re

import pytest

import harness
from postwell.cleanup import addresses as A


@pytest.mark.parametrize("address, want", [
    ("bob@", "bob@"), ("@", "@"), ("bob", "bob@example.org"), ("bob@x.test.", "bob@x.test"),
    ("a!b", "b@a"), ("u%h", "u@h"), ("", ""),
])
def test_rewrite_local(address, want):
    assert A.rewrite_local(address, "example.org") == want


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    pw = harness.PostwellInstance(tmp_path_factory.mktemp("rw7"), {})
    pw.master_cf = pw.default_master_cf() + "pickup    unix  n       -       n       60      1       pickup\n"
    pw.write_config()
    pw.start()
    yield pw
    pw.stop()


@pytest.mark.parametrize("rcpt, logged", [("bob@", "bob@"), ("@", '""@')])
def test_address_ending_in_at_bounces_instead_of_sticking(inst, rcpt, logged):
    before = len(inst.log_text())
    cp = inst.run("sendmail", "-f", f"alice@{harness.VIRTUAL_DOMAIN}", "--", rcpt,
                  input="Subject: t\n\nbody\n")
    assert cp.returncode == 0, cp.stderr
    line = harness.wait_for(
        lambda: re.search(r"to=<([^>]*)>, relay=none, .*dsn=5\.1\.3, status=bounced \(bad address syntax\)",
                          inst.log_text()[before:]), 30, 0.05, "the bounce of " + rcpt)
    assert line.group(1) == logged
    # Nothing left behind for pickup to retry.
    harness.wait_for(lambda: not list((inst.queue_dir / "maildrop").iterdir()), 10, 0.05,
                     "an empty maildrop")
    assert "envelope not storable" not in inst.log_text()[before:]
