"""DATA content in bulk (the engine's fast path) must equal the line-by-line rules:
RFC 5321 4.5.2 dot-unstuffing, end only at CRLF "." CRLF, whatever the chunking."""

from __future__ import annotations

import random

import pytest

from postwell.smtp.reply import Reply
from postwell.smtp.server import NEED_DATA, DataChunk, DataEnd, ServerConfig, ServerConnection


def _run(chunks, size_limit=0):
    c = ServerConnection(ServerConfig(hostname="mx", message_size_limit=size_limit))
    c.send_greeting(Reply(220, "mx ESMTP"))
    c.receive_data(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    content, end = [], None

    def pump():
        nonlocal end
        while True:
            ev = c.next_event()
            if ev is NEED_DATA:
                return
            if isinstance(ev, DataChunk):
                content.append(ev.data)
            elif isinstance(ev, DataEnd):
                end = ev
            if c._pending is not None:
                c.send_reply(None)
    pump()
    for ch in chunks:
        c.receive_data(ch)
        pump()
    return b"".join(content), end


def _expected(lines):
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


@pytest.mark.parametrize("seed", range(5))
def test_bulk_content_matches_line_rules(seed):
    rnd = random.Random(seed)
    words = [b"x" * 70, b"hello", b".dot", b"..two", b"", b"Subject: s", b"a.b", b" ."]
    for _ in range(300):
        lines = [rnd.choice(words) for _ in range(rnd.randint(0, 40))]
        wire = b"".join(line + b"\r\n" for line in lines) + b".\r\nQUIT\r\n"
        cuts = sorted(rnd.sample(range(len(wire) + 1), min(len(wire) + 1, rnd.randint(0, 6))))
        chunks = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)]) if b > a]   # b"" is EOF
        # Unstuffed lines: a line that is "." alone would end the message early.
        if any(line == b"." for line in lines):
            continue
        content, end = _run(chunks)
        assert content == _expected(lines)
        assert end is not None and end.size == len(content) and not end.too_big


def test_bulk_content_respects_size_limit():
    lines = [b"y" * 98] * 100                     # 10,000 bytes with CRLFs
    wire = b"".join(line + b"\r\n" for line in lines) + b".\r\n"
    content, end = _run([wire], size_limit=5000)
    assert end.too_big
    assert len(content) <= 5000
