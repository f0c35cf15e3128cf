"""cleanup's per-message CPU work (issue 8, H8) must not change a byte of output.

A seeded corpus of varied messages (CRLF and LF, bare CR, long and folded headers,
lines around line_length_limit and the 128-byte record length step, MIME multipart
and message/rfc822, 8-bit and UTF-8 text, mbox From lines, missing headers,
header_checks/body_checks, small limits) goes through Cleanup in several chunkings.
What it leaves (the reply, cleanup's log lines, the queue file's envelope and content,
the queue id replaced by "QID") was recorded with the code before the change; each
group's digest must stay the same.  ``PW_RECORD_PERF9=1`` prints the table instead:
after a change of the corpus, run it against the code before the change (e.g.
PYTHONPATH pointing at ``git archive HEAD src`` unpacked elsewhere); after a
deliberate change of output, against the new code.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time

import pytest

from postwell.cleanup import Cleanup
from postwell.cleanup.recsize import RecordSize
from postwell.config.main import Config
from postwell.log import NullLog
from postwell.queue import QueueStore

T0 = 1_795_932_674.25

HEADER_RULES = """\
/^X-Drop:/ IGNORE
/^X-Warn:/ WARN header watch
/^Subject: replace-me/ REPLACE Subject: replaced
/^X-Prepend:/ PREPEND X-Added: yes
/^Content-Transfer-Encoding: 8bit-off/ REPLACE Content-Transfer-Encoding: 7bit
"""
BODY_RULES = """\
/^body-warn/ WARN body watch
/^body-replace/ REPLACE new body line
/^body-ignore/ IGNORE
"""

# Groups: main.cf settings beyond the common ones; "checks" adds the tables above.
GROUPS = {
    "default": {},
    "noutf8": {"smtputf8_enable": "no"},
    "small": {"header_size_limit": "300", "line_length_limit": "100",
              "message_size_limit": "30000", "hopcount_limit": "3"},
    "nomime": {"disable_mime_input_processing": "yes", "detect_8bit_encoding_header": "no"},
    "checks": {},
    "remote": {"remote_header_rewrite_domain": "rw.example", "always_add_missing_headers": "yes"},
    "alias": {"recipient_delimiter": "+"},
}

EXPECTED = {
    "default": "84ff2e81f23e8db4833e992f9404c29d18d6b0e6f1eed332d5679a2b4d403ef4",
    "noutf8": "517ff8baa0ae3d923fa42ec2fdef535652796d447ae9382b9bcd239241ea0e04",
    "small": "1a0a34e02ec58856261b31ebec78152b853857e0b467810be56ea59b534b8640",
    "nomime": "1dad8368cecd65df686bb52455b2d9834efb55700de28a3d05c8146e56e4a62f",
    "checks": "0e1e6e6a3a765b4650788c705b2e178f82b64ad972ebd56849fbce5a36f503ce",
    "alias": "4537818393ec996dc565993105e2d6f2cd434902bd6a3d6ed0b96f3a43ea76a3",
    "remote": "1b01cedf08ceca76e9e1406ea8e64930bb4ff0d0b5664b6fd9b17b801fc59c03",
}


def _words(rng: random.Random, n: int) -> str:
    pool = ["alpha", "beta", "gamma", "delta", "x", "mail", "Grüße", "naïve", "ok", "=?utf-8?q?x?="]
    return " ".join(rng.choice(pool) for _ in range(n))


def _header(rng: random.Random) -> str:
    kind = rng.randrange(22)
    if kind == 0:
        return f"Subject: {_words(rng, rng.randrange(1, 12))}"
    if kind == 1:
        return "From: Someone <someone@example.org>"
    if kind == 2:
        return f"To: a@example.org, b, \"Q u\" <c@{rng.choice(['x.test', 'example.org'])}>"
    if kind == 3:
        return f"Message-ID: <{rng.randrange(10**9)}@example.org>"
    if kind == 4:
        return "Date: Mon, 30 Nov 2026 07:00:00 +0000"
    if kind == 5:
        return "Received: from a (b [192.0.2.1])\n\tby c; Mon, 30 Nov 2026 07:00:00 +0000"
    if kind == 6:
        # Folded, sometimes long enough to pass header_size_limit in the small group.
        return "X-Long: " + "\n\t".join(_words(rng, rng.randrange(1, 30))
                                         for _ in range(rng.randrange(1, 8)))
    if kind == 7:
        return "Cc: " + ", ".join(f"u{i}@example.net" for i in range(rng.randrange(1, 40)))
    if kind == 8:
        return "Subject : spaced " + _words(rng, 2)
    if kind == 9:
        return rng.choice(["Bcc: hidden@example.org", "Return-Path: <x@y>", "Content-Length: 5"])
    if kind == 10:
        return "X-" + "n" * rng.choice([1, 60, 127, 200]) + ": " + "v" * rng.choice([0, 1, 126, 127, 2100])
    if kind == 11:
        return "Resent-From: r@example.org"
    if kind == 12:
        return "X-Drop: gone"
    if kind == 13:
        return "X-Warn: " + _words(rng, 3)
    if kind == 14:
        return "Subject: replace-me please"
    if kind == 15:
        return "X-Prepend: p"
    if kind == 16:
        return "Content-Transfer-Encoding: " + rng.choice(["8bit", "7bit", "binary", "8bit-off"])
    if kind == 17:
        return "Reply-To: <rt@example.org>"
    if kind == 18:
        return "Resent-Message-Id: <r@x>"
    if kind == 19:
        return "X-Utf8: " + rng.choice(["plain", "Grüße", "\u4e2d\u6587"])
    if kind == 20:
        return "Sender: s"
    return "MIME-Version: 1.0"


def _body_line(rng: random.Random) -> str:
    kind = rng.randrange(14)
    if kind == 0:
        return ""
    if kind == 12:
        # Hyphens inside lines (PartScanner's search for boundary lines).
        return '<div style="font-family: a-b; margin-top: 1px">e-mail re-sent</div> x-y' * rng.randrange(1, 3)
    if kind == 13:
        return rng.choice(["-- ", "--", "-x", "--not-a-boundary", "---", "- item"])
    if kind == 1:
        return "x" * rng.choice([99, 100, 101, 127, 128, 129, 2047, 2048, 2049, 4096, 5000])
    if kind == 2:
        return rng.choice(["body-warn here", "body-replace this", "body-ignore it"])
    if kind == 3:
        return "From me to you"
    if kind == 4:
        return "Grüße " + _words(rng, 4)
    if kind == 5:
        return "Subject: not a header in the body"
    return _words(rng, rng.randrange(0, 15))


def _multipart(rng: random.Random, depth: int = 0) -> tuple[str, list[str]]:
    boundary = f"b{depth}-{rng.randrange(1000)}"
    lines = ["This is a multi-part message in MIME format.", ""]
    for _ in range(rng.randrange(1, 4)):
        lines.append(f"--{boundary}")
        choice = rng.randrange(5)
        if choice == 0 and depth < 2:
            ctype, inner = _multipart(rng, depth + 1)
            lines += [f"Content-Type: {ctype}", ""] + inner
        elif choice == 1 and depth < 2:
            lines += ["Content-Type: message/rfc822", "", "Subject: inner",
                      "Content-Transfer-Encoding: 8bit", "", "inner body Grüße"]
        elif choice == 2:
            # Many lines with hyphens inside, some starting with one.
            lines += ["Content-Type: text/html", "X-Html : yes", ""]
            lines += [rng.choice(['<p style="font-family: a-b">e-mail</p>', "-x", "--y", "plain",
                                  f"--{boundary}x", "a-b-c-d"]) for _ in range(rng.randrange(5, 40))]
        else:
            lines += ["Content-Type: text/plain; charset=utf-8",
                      "Content-Transfer-Encoding: " + rng.choice(["7bit", "8bit", "quoted-printable"]),
                      "X-Part : " + _words(rng, 2), ""]
            lines += [_body_line(rng) for _ in range(rng.randrange(0, 8))]
    lines.append(f"--{boundary}--")
    lines.append("epilogue")
    return f'multipart/mixed; boundary="{boundary}"', lines


def _message(rng: random.Random) -> bytes:
    headers = []
    if rng.random() < 0.1:
        headers.append("From sender@example.org Mon Nov 30 07:00:00 2026")
    headers += [_header(rng) for _ in range(rng.choice([0, 1, 3, 5, 15, 15, 25]))]
    if rng.random() < 0.35:
        ctype, body = _multipart(rng)
        headers += ["MIME-Version: 1.0", f"Content-Type: {ctype}"]
    else:
        n = rng.choice([0, 1, 5, 60, 60, 200])
        body = [_body_line(rng) for _ in range(n)]
        if rng.random() < 0.2:
            # smtp-source's shape: many short lines of one character.
            body = ["La " * 20] * rng.randrange(10, 80)
    if rng.random() < 0.1:
        text = "\n".join(headers + body)          # no empty line: the body starts at once
    else:
        text = "\n".join(headers + [""] + body)
    if rng.random() < 0.85:
        text += "\n"
    data = text.encode("utf-8")
    style = rng.randrange(6)
    if style < 4:
        data = data.replace(b"\n", b"\r\n")
    elif style == 4 and data:
        pos = rng.randrange(len(data))
        data = data[:pos] + b"\r" + data[pos:]    # a bare CR somewhere
    return data


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    how = rng.randrange(5)
    if how == 0 or not data:
        return [data]
    if how == 1:
        size = 4096
    elif how == 2:
        size = 65536
    elif how == 3 and len(data) < 3000:
        size = rng.choice([1, 2, 3])
    else:
        out, pos = [], 0
        while pos < len(data):
            step = rng.randrange(1, 900)
            out.append(data[pos:pos + step])
            pos += step
        return out
    return [data[i:i + size] for i in range(0, len(data), size)]


def _make(tmp_path, group: str):
    p = {"myhostname": "mx.example.test", "mydestination": "mx.example.test, localhost"}
    if group == "checks":
        for name, text in (("header_checks", HEADER_RULES), ("body_checks", BODY_RULES)):
            path = tmp_path / name
            path.write_text(text)
            p[name] = f"regexp:{path}"
    if group == "alias":
        path = tmp_path / "valias"
        path.write_text("u@example.test v@example.test, x@other.test\nw u@example.test\n"
                        "v@example.test v@example.test, y+z@other.test\n")
        p["virtual_alias_maps"] = f"texthash:{path}"
    p.update(GROUPS[group])
    cfg = Config(str(tmp_path), p, {}, [])
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    log = NullLog("cleanup")
    return Cleanup(cfg, store, log), store, log


def _dump(store: QueueStore, qid: str) -> str:
    with store.open(qid, writable=False) as q:
        rcpts = [(r.address, r.orig, r.orcpt, r.notify, r.done) for r in q.recipients]
        return repr((q.sender, sorted(q.params.items()), sorted(q.attributes.items()), rcpts,
                     q.read_content()))


def _run_group(tmp_path, group: str, count: int) -> tuple[str, list[str]]:
    c, store, log = _make(tmp_path, group)
    rng = random.Random(f"perf9-{group}")
    digest = hashlib.sha256()
    dumps = []
    for i in range(count):
        data = _message(rng)
        local = rng.random() < 0.5
        external = group == "checks" or rng.random() < 0.3
        log.lines.clear()
        cs = c.open(rewrite_local=local, content_checks=external)
        qid = cs.queue_id
        cs.set_sender(rng.choice(["s@example.test", "", "local", "ü@example.test"]))
        for r in rng.sample(["u@example.test", "v@example.test", "U@example.test", "w"],
                            rng.randrange(1, 4)):
            cs.add_recipient(r, orig=r)
        if external:
            for k, v in (("client_name", "client.example"), ("client_address", "127.0.0.1"),
                         ("protocol_name", "ESMTP"), ("helo_name", "client.example"),
                         ("log_message_origin", "client.example[127.0.0.1]")):
                cs.set_attribute(k, v)
        if rng.random() < 0.8:
            cs.prepend_header(f"Received: from client.example (localhost [127.0.0.1])\n"
                              f"\tby mx.example.test (Postfix) with ESMTP id {qid}\n"
                              f"\tfor <u@example.test>; Mon, 30 Nov 2026 07:00:00 +0000")
        for piece in _chunks(rng, data):
            cs.write(piece)
        reply = asyncio.run(asyncio.wait_for(cs.finish(), 20))
        if reply.code == 250 and hasattr(cs, "_size_bound"):   # (absent in older code)
            # The cheap bound that spares the exact price must never be below it.
            assert cs._size_bound() >= cs.postfix_file_size(0)
        text = f"{reply.code} {reply.enhanced} {reply.text}\n" + "\n".join(log.lines)
        if reply.code == 250 and cs.msg.path and os.path.exists(store.path("incoming", qid)):
            text += "\n" + _dump(store, qid)
            store.remove(qid, "incoming")
        elif reply.code == 250 and os.path.exists(store.path("hold", qid)):
            text += "\nhold\n" + _dump(store, qid)
            store.remove(qid, "hold")
        text = text.replace(qid, "QID")
        dumps.append(text)
        digest.update(text.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest(), dumps


@pytest.fixture
def utc(monkeypatch):
    # Date: and Message-Id: are local time: the digests are taken in UTC.
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


COUNT = 120


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_queue_files_unchanged(tmp_path, utc, group):
    digest, dumps = _run_group(tmp_path, group, COUNT)
    if os.environ.get("PW_RECORD_PERF9"):
        print(f'    "{group}": "{digest}",')
        return
    assert digest == EXPECTED[group], group


def test_record_size_matches_a_line_by_line_count():
    # RecordSize's arithmetic against the rule stated plainly, in random chunkings.
    rng = random.Random(99)
    for _ in range(400):
        limit = rng.choice([1, 2, 100, 127, 128, 129, 2048])
        lines = [b"y" * rng.choice([0, 1, 126, 127, 128, 129, limit - 1, limit, limit + 1,
                                    2 * limit, rng.randrange(3000)]) for _ in range(rng.randrange(8))]
        text = b"\n".join(lines) + (b"\n" if rng.random() < 0.7 else b"")
        for header in (True, False):
            whole = RecordSize(limit)
            (whole.header if header else whole.body)(text)
            cut = RecordSize(limit)
            pos = 0
            while pos < len(text):
                step = rng.randrange(1, 300)
                (cut.header if header else cut.body)(text[pos:pos + step])
                pos += step
            assert (whole.total, whole.stored(), whole.close()) == \
                (cut.total, cut.stored(), cut.close())


def test_size_bound_covers_the_exact_price(tmp_path):
    # Envelopes heavy in what the bound counts loosely: 4-byte UTF-8, surrogate
    # escapes, long values crossing the 128-byte record length step, many recipients.
    c, store, log = _make(tmp_path, "default")
    rng = random.Random(3)
    alphabet = ["a", "é", "\u4e2d", "\U0001f600", "\udcff", "@", "%", "!", "."]

    def text(k):
        return "".join(rng.choice(alphabet) for _ in range(k))

    for i in range(60):
        cs = c.open(rewrite_local=rng.random() < 0.5, content_checks=rng.random() < 0.5)
        cs.set_sender(text(rng.choice([0, 5, 130])), envid=text(rng.choice([0, 3, 200])) or None,
                      ret=rng.choice([None, "FULL"]), body_type=rng.choice([None, "8BITMIME"]))
        if rng.random() < 0.3:
            cs.set_fullname(text(rng.choice([1, 140])))
        for name in ("client_name", "client_address", "helo_name", "protocol_name",
                     "log_message_origin", "sasl_username"):
            if rng.random() < 0.7:
                cs.set_attribute(name, text(rng.choice([1, 20, 300])))
        if rng.random() < 0.3:
            cs.set_filter("smtp:" + text(rng.choice([1, 150])))
        for _ in range(rng.randrange(1, 20)):
            a = text(rng.choice([1, 10, 200])) + rng.choice(["", "@x.test"])
            cs.add_recipient(a, orig=a, orcpt=rng.choice([None, "rfc822;" + text(140)]),
                             notify=rng.choice([None, "SUCCESS,DELAY"]))
        cs.write(b"Subject: s\n\nbody\n")
        reply = asyncio.run(asyncio.wait_for(cs.finish(), 20))
        if reply.code == 250:
            assert cs._size_bound() >= cs.postfix_file_size(0)
            store.remove(cs.queue_id, "incoming")


def test_unchanged_header_shortcut_agrees_with_the_parser():
    # addresses._UNCHANGED_RE spares the tokenizer for From:/To: values the local
    # rewrite leaves alone (quoted display names included): whenever it matches, the
    # full path must find nothing to change.
    from postwell.cleanup import addresses as A
    rng = random.Random(5)
    parts = ['"', "\\", "a", "b", " ", ",", "<", ">", "@", ".", "x.test", "ü", "(c)", "\n",
             "\t", "Doe", '"Doe, J"', "<a@b.c>", "q@r.s", ":", ";", "[1.2.3.4]", "%", "!", ".."]
    matched = 0
    for _ in range(20000):
        if rng.random() < 0.5:
            value = "".join(rng.choice(parts) for _ in range(rng.randrange(1, 12)))
        else:
            value = (" " + rng.choice(['"A B"', '"a\\"b"', 'Al "x" B', '"x"y', "A", '"(q)"', '"<a@b>"'])
                     + " " + rng.choice(["<a@b.c>", "<a@b>", "<a@b.>", "<a>", '<"q"@b.c>', "<a%b@c.d>"])
                     + rng.choice(["", ", c@d.e", ', "X" <y@z.w>', ",", " (c)"]))
        if A._UNCHANGED_RE.fullmatch(value):
            matched += 1
            assert A.rewrite_header_value(value, "origin.test", lambda a: a) is None, value
    assert matched > 1000
    # Input that fails late must not backtrack without bound.
    t0 = time.process_time()
    A._UNCHANGED_RE.fullmatch(" " + "a " * 5000 + '"')
    A._UNCHANGED_RE.fullmatch('"x"' * 3000 + " a")
    assert time.process_time() - t0 < 1.0


@pytest.mark.parametrize("seed", range(3))
def test_boundary_search_modes_agree(monkeypatch, seed):
    # PartScanner finds boundary lines hyphen by hyphen, then (after a few hyphens
    # inside lines) with a search for "\n-": either way the same output.
    from postwell.cleanup import mime
    from postwell.cleanup.headers import ContentProcessor
    rng = random.Random(seed)
    pieces = ["a-b c-d", "-x", "--y", "--b1", "--b1--", "--b2", "--b2--", "X-H : v", "",
              "Content-Type: multipart/mixed; boundary=b2", "text", "- -", "-", "x--b1", "x--b2"]
    for _ in range(150):
        lines = ["Content-Type: multipart/mixed; boundary=b1", ""]
        lines += [rng.choice(pieces) for _ in range(rng.randrange(1, 80))]
        data = ("\n".join(lines) + rng.choice(["", "\n"])).encode()
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 40))))
        results = []
        for skips in (0, 3, 10**9):
            monkeypatch.setattr(mime, "_SKIPS_BEFORE_PAIR_SEARCH", skips)
            out = []
            proc = ContentProcessor(out.append)
            for a, b in zip([0] + cuts, cuts + [len(data)]):
                proc.feed(data[a:b])
            proc.finish()
            results.append(b"".join(out))
        assert results[0] == results[1] == results[2], data


def _fake_rewriter(raw: bytes, name_len: int) -> bytes | None:
    # Changes some headers, sometimes into text that must be cut or folded.
    if b"a@" in raw:
        return raw.replace(b"a@", b"rewritten@")
    if b"fold@" in raw:
        return raw + b",\n\tmore@example.org" * 30
    for marker, size in ((b"late2@", 110), (b"late@", 280)):
        if marker in raw:
            # A last line that starts past 90% of header_size_limit (120 or 300) and
            # ends within it: written whole, as a held late line.
            return raw + b"\n\t" + b"y" * (size - len(raw) - 2) + b"\n\tz"
    return None


@pytest.mark.parametrize("seed", range(4))
def test_header_run_agrees_with_the_line_path(monkeypatch, seed):
    # ContentProcessor._header_run takes whole headers in one step; with it disabled
    # every line goes through _classify.  Output, log callbacks and state must agree.
    from postwell.cleanup.addresses import ADDRESS_HEADERS
    from postwell.cleanup.headers import ContentProcessor
    rng = random.Random(seed)
    pool = ["Subject: s", "From: a@x.test", "To: b@x.test,\n\tfold@x.test", "Cc: c@y.test",
            "Message-ID: <m@x>", "Resent-Message-Id: <r@x>", "Received: r", "Received: r2\n x",
            "Resent-From: a@x.test", "Bcc: hidden", "Return-Path: <x>", "Content-Length: 1",
            "Content-Type: multipart/mixed; boundary=q", "Content-Transfer-Encoding: 8bit",
            "Content-Transfer-Encoding : binary", "X-Long: " + "v" * 150, "X-Fold: a\n\tb\n c",
            "X-8bit: Gr\u00fc\u00dfe", " leading space", "From nobody", "no colon here",
            "To: " + "a@x.test, " * 20, "X-Empty:", "Date: d", "Sender: fold@x.test",
            "Cc: late@x.test", "Reply-To: late2@x.test"]
    for _ in range(150):
        kw = dict(header_size_limit=rng.choice([102400, 120, 300]),
                  line_length_limit=rng.choice([2048, 40, 100]),
                  hopcount_limit=rng.choice([50, 2]),
                  mime=rng.random() < 0.8, track_utf8=rng.random() < 0.5)
        rewrite = rng.random() < 0.6
        lines = [rng.choice(pool) for _ in range(rng.randrange(0, 15))]
        data = ("\n".join(lines) + rng.choice(["\n\nbody\n", "\n", "", "\nbody"])).encode()
        if rng.random() < 0.5:
            data = data.replace(b"\n", b"\r\n")
        cuts = sorted(rng.sample(range(1, max(len(data), 2)), min(max(len(data) - 1, 0),
                                                                   rng.randrange(0, 8))))
        first = rng.random() < 0.7
        results = []
        for run in (True, False):
            if not run:
                monkeypatch.setattr(ContentProcessor, "_header_run", lambda self, d, p: p)
            out, ids = [], []
            proc = ContentProcessor(out.append, on_message_id=lambda v, r: ids.append((v, r)),
                                    header_rewriter=_fake_rewriter if rewrite else None,
                                    rewrite_names=ADDRESS_HEADERS, **kw)
            if first:
                proc.prepend_received(b"Received: by me\n\tid X\n")
            proc.begin_client_data()
            for a, b in zip([0] + cuts, cuts + [len(data)]):
                proc.feed(data[a:b])
            proc.finish()
            results.append((b"".join(out), ids, sorted(proc.headers_seen), proc.hops,
                            proc.too_many_hops, proc.resent, proc.ctype, proc.mime_8bit,
                            proc.utf8_header, proc.header_truncated, proc.records.close()))
            monkeypatch.undo()
        assert results[0] == results[1], data


def test_header_run_passes_output_on_in_bounded_pieces():
    # A chunk holding a large header block: the run hands it on in pieces of about
    # 64 KiB (as the line path does), with the same bytes.
    from postwell.cleanup.headers import ContentProcessor
    data = b"".join(b"X-H%d: %s\n" % (i, b"v" * 100) for i in range(3000)) + b"\nbody\n"
    out = []
    proc = ContentProcessor(out.append)
    proc.feed(data)
    proc.finish()
    assert b"".join(out) == data
    assert max(map(len, out)) < 70000
