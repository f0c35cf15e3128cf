"""Postfix's message size (cleanup/recsize.py): the length of its queue file's
content records, as the qmgr logs it (size=) and postqueue -p shows it.

The rules below were read off Postfix 3.7 queue files (tests/test_parity_size.py
compares whole messages with a running reference)."""

from __future__ import annotations

import asyncio
import random

import pytest

from postwell.cleanup import Cleanup
from postwell.cleanup.headers import ContentProcessor
from postwell.cleanup.recsize import SIZE_ATTRIBUTE, RecordSize, _vlen
from postwell.config import load_config
from postwell.log import NullLog
from postwell.queue import QueueStore


def _records(text: bytes, limit: int, header: bool) -> int:
    """The oracle: one record per piece, each a type byte, the length, the text."""
    total = 0
    for line in text.split(b"\n")[:-1]:
        rest = len(line)
        # Header lines are cut only when longer than the limit, body lines at every
        # full limit (a 2048-byte body line is 2048 + an empty piece).
        while rest > limit or (not header and rest == limit):
            total += 1 + _vlen(limit) + limit
            rest -= limit
        total += 1 + _vlen(rest) + rest
    return total


@pytest.mark.parametrize("length,body,header", [
    (0, 2, 2), (127, 129, 129), (128, 131, 131), (2047, 2050, 2050),
    (2048, 2051 + 2, 2051), (2049, 2051 + 3, 2051 + 3), (4096, 2 * 2051 + 2, 2 * 2051),
    (5000, 2 * 2051 + 907, 2 * 2051 + 907),
])
def test_line_costs_as_postfix(length, body, header):
    for kind, want in (("body", body), ("header", header)):
        rs = RecordSize(2048)
        getattr(rs, kind)(b"x" * length + b"\n")
        assert rs.total == want, kind


def test_vlen():
    assert [_vlen(n) for n in (0, 127, 128, 16383, 16384, 2 ** 21)] == [1, 1, 2, 2, 3, 4]


def test_any_chunking_agrees_with_the_oracle():
    rng = random.Random(7)
    for _ in range(2000):
        limit = rng.choice([2048, 1, 2, 100, 127, 128, 129, 300, 20000])
        sizes = [0, 1, 5, 126, 127, 128, 129, limit - 1, limit, limit + 1, 2 * limit,
                 2 * limit + 1, rng.randint(0, 5000)]
        text = b"".join(b"x" * rng.choice(sizes) + b"\n" for _ in range(rng.randint(0, 12)))
        header = rng.random() < 0.5
        rs = RecordSize(limit)
        pos = 0
        while pos < len(text):
            n = rng.randint(1, 700)
            (rs.header if header else rs.body)(text[pos:pos + n])
            pos += n
        assert rs.close() == _records(text, limit, header)


def test_unended_line_counts_at_close():
    rs = RecordSize()
    rs.body(b"abc\nde")
    assert (rs.total, rs.stored()) == (5, 7)
    assert rs.close() == 5 + 4


def test_content_processor_sizes_headers_and_body_apart():
    out = []
    p = ContentProcessor(out.append)
    p.feed(b"X-A: " + b"h" * 2043 + b"\r\nSubject: s\r\n\r\n" + b"b" * 2048 + b"\r\nend")
    p.finish()
    text = b"".join(out)
    head, body = text.split(b"\n\n", 1)
    assert p.records.close() == (_records(head + b"\n", 2048, True)
                                 + _records(b"\n" + body, 2048, False))
    assert p.records.total == 2051 + 12 + 2 + (2051 + 2) + 5


def _cleanup(tmp_path, extra=""):
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "main.cf").write_text(f"queue_directory = {tmp_path / 'q'}\nmyhostname = mx.example.test\n"
                                 + extra)
    cfg = load_config(str(etc))
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    return Cleanup(cfg, store, NullLog()), store


def _submit(c, data):
    cs = c.open(rewrite_local=False)
    cs.set_sender("s@example.org")
    cs.add_recipient("u@example.org")
    cs.prepend_header("Received: from x")
    cs.write(data)
    return cs, asyncio.run(cs.finish())


def test_cleanup_stores_the_size(tmp_path):
    c, store = _cleanup(tmp_path)
    cs, reply = _submit(c, b"Subject: s\r\n\r\n" + b"b" * 200 + b"\r\n")
    assert reply.code == 250
    with store.open(cs.queue_id) as qm:
        content = b"".join(qm.iter_content())
        assert qm.attributes[SIZE_ATTRIBUTE] == str(_records(content, 2048, False))
        assert content == b"Received: from x\nSubject: s\n\n" + b"b" * 200 + b"\n"
        assert int(qm.attributes[SIZE_ATTRIBUTE]) == qm.content_size + 5


def test_size_limit_counts_what_the_header_cut_left(tmp_path):
    """Postfix limits its queue file: a message whose header only fits once
    header_size_limit has cut it is accepted (tests/test_parity_sweep.py
    headers_cut_then_size), one whose stored content is too big is not."""
    c, store = _cleanup(tmp_path, "header_size_limit = 300\nmessage_size_limit = 3000\n")
    data = b"Subject: " + b"h" * 1500 + b"\r\nX-A: " + b"i" * 2900 + b"\r\n\r\nbody\r\n"
    assert len(data) > 3000
    cs, reply = _submit(c, data)
    assert reply.code == 250
    with store.open(cs.queue_id) as qm:
        assert int(qm.attributes[SIZE_ATTRIBUTE]) == 18 + 2 * (300 + 3) + 2 + 6
    cs, reply = _submit(c, data + b"y" * 3000 + b"\r\n")
    assert (reply.code, reply.text) == (552, "Error: message file too big")


def test_content_processor_size_is_the_oracles_in_any_chunking():
    """Whatever the input and its chunking, the size is the oracle's over the output:
    header rule up to the empty line that ends the header block, body rule after."""
    rng = random.Random(11)
    parts = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"a", b"X-H: ", b"To: u", b"Subject: ",
             b"Message-Id: <m@x>", b"b" * 7, b"c" * 8, b"d" * 16, b"e" * 129, b"\r\n\r\n"]
    for _ in range(600):
        data = b"".join(rng.choice(parts) for _ in range(rng.randint(0, 40)))
        limit = rng.choice([8, 16, 2048])
        hlimit = rng.choice([30, 102400])
        results = set()
        for _ in range(3):
            out = []
            p = ContentProcessor(out.append, line_length_limit=limit,
                                 header_size_limit=hlimit)
            pos = 0
            while pos < len(data):
                n = rng.randint(1, 20)
                p.feed(data[pos:pos + n])
                pos += n
            p.finish()
            text = b"".join(out)
            lines = text.split(b"\n")[:-1]
            cut = lines.index(b"") if b"" in lines else len(lines)
            want = (_records(b"".join(x + b"\n" for x in lines[:cut]), limit, True)
                    + _records(b"".join(x + b"\n" for x in lines[cut:]), limit, False))
            got = p.records.close()
            assert got == want, (data, limit)
            results.add((text, got))
        assert len(results) == 1, data
