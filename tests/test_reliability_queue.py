"""Queue-level guarantees behind "250 means stored": regression tests for fixes
made while turning DESIGN.md property 1 into tests."""

from __future__ import annotations

import os

import pytest

import harness
from harness import VIRTUAL_DOMAIN as VD

from postwell.queue import CorruptQueueFile, QueueStore, QueueWriteError
from postwell.queue import format as qf


def _store(tmp_path) -> QueueStore:
    s = QueueStore(str(tmp_path / "q"))
    s.ensure_layout()
    return s


def test_nul_inside_recipient_fields_keeps_the_file_readable(tmp_path):
    """ORCPT=rfc822;a+00b is valid xtext and decodes to a NUL.  Before the fix the
    NUL split the recipient record into five fields and the committed file was
    corrupt (after the 250 that would have lost the message)."""
    store = _store(tmp_path)
    msg = store.create()
    msg.set_sender("s@example.org", envid="e\0nvid")
    msg.add_recipient("alice@example.test", orig="alice@example.test",
                      orcpt="rfc822;a\0b@example.test", notify="FAILURE")
    msg.set_attribute("helo_name", "x\0y")
    msg.write(b"Subject: nul\n\nbody\n")
    msg.commit()
    with store.open(msg.queue_id, "incoming") as qm:
        [r] = qm.recipients
        # As Postfix's C strings: the value ends at the NUL.
        assert (r.address, r.orcpt, r.notify) == ("alice@example.test", "rfc822;a", "FAILURE")
        assert qm.envid == "e\0nvid" and qm.attributes["helo_name"] == "x\0y"
        qm.mark_done([r])
    with store.open(msg.queue_id, "incoming") as qm:
        assert qm.recipients[0].done


def test_unstorable_envelope_is_a_write_error_and_leaves_nothing(tmp_path):
    """An envelope the reader would reject is refused at commit (4xx), before the
    complete marker, and the file is removed: never a committed corrupt file."""
    store = _store(tmp_path)
    msg = store.create()
    msg.set_sender("s@example.org")
    msg.add_recipient("")            # an empty recipient address cannot be read back
    msg.write(b"Subject: x\n\nbody\n")
    with pytest.raises(QueueWriteError):
        msg.commit()
    assert store.scan("incoming") == []
    assert os.listdir(store.path("incoming")) == []
    with pytest.raises(CorruptQueueFile):
        qf.parse_envelope(qf.Envelope(sender="s", recipients=[qf.Recipient("")]).pack(), 64)


def test_orcpt_with_nul_is_accepted_and_delivered(postwell_factory):
    """End to end: Postfix 3.7 answers 250 to ORCPT=rfc822;a+00b and delivers; so must we."""
    inst = postwell_factory().start()
    r = harness.dialogue(inst.port, ["EHLO x.example.org", "MAIL FROM:<s@example.org>",
                                     f"RCPT TO:<alice@{VD}> ORCPT=rfc822;a+00b@x", "DATA",
                                     "Subject: orcpt-nul", "", "x", ".", "QUIT"])
    assert [x.code for x in r] == [220, 250, 250, 250, 354, 250, 221], [str(x) for x in r]
    inst.wait_maildir("alice", 1, timeout=20)
    assert not list((inst.queue_dir / "corrupt").iterdir())
