"""Cleanup: streaming normalisation, header fix-ups, limits, virtual aliases.

Expected header behaviour was checked against Postfix 3.7 (a loopback client
matches local_header_rewrite_clients = permit_inet_interfaces; 127.0.0.2
does not).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import time

import pytest

from postwell.cleanup import Cleanup, VirtualAliasExpander, AliasExpansionError, mail_date
from postwell.cleanup.headers import ContentProcessor
from postwell.config.main import Config
from postwell.log import NullLog
from postwell.queue import QueueStore

T0 = 1_795_932_674.5   # Sun, 29 Nov 2026 06:11:14 UTC


class DictTable:
    """Stand-in for postwell.tables: exact, case-folded keys."""

    def __init__(self, d):
        self.d = {k.lower(): v for k, v in d.items()}

    def lookup(self, key):
        return self.d.get(key.lower())


def make(tmp_path, params=None, aliases=None, store_kw=None):
    p = {"myhostname": "mx.example.test", "mydestination": "mx.example.test, localhost"}
    if aliases is not None:
        p["virtual_alias_maps"] = "inline:{test}"
    p.update(params or {})
    cfg = Config(str(tmp_path), p, {}, [])
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0, **(store_kw or {}))
    store.ensure_layout()
    log = NullLog("cleanup")
    c = Cleanup(cfg, store, log, table_opener=lambda spec: DictTable(aliases or {}))
    return c, store, log


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def submit(c, data, rcpts=("u@example.test",), local=True, chunks=None, sender="s@example.test",
           received="Received: from client (localhost [127.0.0.1])\n\tby mx.example.test"):
    cs = c.open(rewrite_local=local)
    cs.set_sender(sender)
    for r in rcpts:
        if isinstance(r, tuple):
            cs.add_recipient(*r)
        else:
            cs.add_recipient(r)
    if received:
        cs.prepend_header(received)
    if chunks:
        for i in range(0, len(data), chunks):
            cs.write(data[i:i + chunks])
    else:
        cs.write(data)
    return cs, run(cs.finish())


def content(store, qid):
    with store.open(qid) as q:
        return q.read_content().decode("utf-8", "surrogateescape")


def test_queued_reply_and_content(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, b"Subject: hi\r\nMessage-ID: <a@b>\r\nDate: x\r\nFrom: f@x\r\n\r\nbody\r\n")
    assert (reply.code, reply.enhanced, reply.text) == (250, "2.0.0", f"Ok: queued as {cs.queue_id}")
    assert content(store, cs.queue_id) == (
        "Received: from client (localhost [127.0.0.1])\n\tby mx.example.test\n"
        "Subject: hi\nMessage-ID: <a@b>\nDate: x\nFrom: f@x\n\nbody\n")
    assert log.lines == [f"{cs.queue_id}: message-id=<a@b>"]
    assert store.scan("incoming") == [cs.queue_id]


def test_missing_headers_added_for_local_client(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, b"Subject: t1\r\n\r\nbody\r\n")
    qid = cs.queue_id
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(T0))
    text = content(store, qid)
    assert text.endswith(
        f"Subject: t1\nMessage-Id: <{stamp}.{qid}@mx.example.test>\n"
        f"Date: {mail_date(T0)}\nFrom: s@example.test\n\nbody\n")
    assert "To:" not in text      # undisclosed_recipients_header is empty since Postfix 2.8
    assert log.lines == [f"{qid}: message-id=<{stamp}.{qid}@mx.example.test>"]


def test_no_headers_added_for_remote_client(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, b"Subject: t2\r\n\r\nbody\r\n", local=False)
    assert content(store, cs.queue_id).endswith("Subject: t2\n\nbody\n")
    assert log.lines == [f"{cs.queue_id}: message-id=<>"]


def test_always_add_missing_headers(tmp_path):
    c, store, log = make(tmp_path, {"always_add_missing_headers": "yes"})
    cs, _ = submit(c, b"Subject: t\r\n\r\nb\r\n", local=False)
    assert "\nMessage-Id: <" in content(store, cs.queue_id)


def test_resent_headers(tmp_path):
    c, store, log = make(tmp_path)
    cs, _ = submit(c, b"Resent-To: x@y\r\nMessage-ID:   <orig@x>  (c)\r\nDate: d\r\nFrom: f\r\n\r\nb\r\n")
    text = content(store, cs.queue_id)
    assert "\nResent-Message-Id: <" in text and "\nResent-Date: " in text
    assert "\nResent-From: s@example.test\n" in text
    assert log.lines[0] == f"{cs.queue_id}: message-id=<orig@x>  (c)"   # as Postfix logs it
    assert log.lines[1].startswith(f"{cs.queue_id}: resent-message-id=<")


def test_folded_message_id_logged_as_postfix(tmp_path):
    c, store, log = make(tmp_path)
    cs, _ = submit(c, b"Message-ID: <a@b>\r\n folded\r\n\r\nx\r\n", chunks=3)
    assert log.lines == [f"{cs.queue_id}: message-id=<a@b>? folded"]


def test_null_sender_from_header(tmp_path):
    c, store, _ = make(tmp_path)
    cs, _ = submit(c, b"Subject: t\r\n\r\nb\r\n", sender="")
    assert "\nFrom: MAILER-DAEMON\n" in content(store, cs.queue_id)


def test_body_without_blank_line(tmp_path):
    # Postfix ends the header block at the first non-header line and inserts
    # the empty line after the added headers.
    c, store, _ = make(tmp_path)
    cs, _ = submit(c, b"this is not a header\r\nSubject: x\r\n\r\nbody\r\n")
    text = content(store, cs.queue_id)
    assert re.search(r"\nFrom: s@example.test\n\nthis is not a header\nSubject: x\n\nbody\n$", text)


def test_date_format():
    assert re.fullmatch(r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4} \(.+\)",
                        mail_date(T0))


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, None])
def test_chunk_boundaries_do_not_matter(tmp_path, chunk):
    c, store, _ = make(tmp_path)
    data = (b"Subject: a\r\n long folded\r\nX-A: b\r\rc\r\n\r\nline1\r\nbare\rcr\r\n"
            b"lf only\nend\r")
    cs, reply = submit(c, data, chunks=chunk, local=False)
    assert reply.code == 250
    assert content(store, cs.queue_id).split("mx.example.test\n", 1)[1] == (
        "Subject: a\n long folded\nX-A: b  c\n\nline1\nbare cr\nlf only\nend \n")


def test_no_cr_survives(tmp_path):
    c, store, _ = make(tmp_path)
    cs, _ = submit(c, b"S: \r\r\r\n\r\n\r\r\nx\r", chunks=1)
    assert "\r" not in content(store, cs.queue_id)


def test_final_line_without_newline_gets_one(tmp_path):
    c, store, _ = make(tmp_path)
    cs, _ = submit(c, b"Subject: t\r\n\r\nno newline", local=False)
    assert content(store, cs.queue_id).endswith("\n\nno newline\n")


def _many(n):
    return b"X-Many: a\r\n" + b"".join(b"\tcont%05d %s\r\n" % (i, b"c" * 60) for i in range(n))


@pytest.mark.parametrize("limit,data,kept", [
    # Postfix 3.7: line pieces of line_length_limit bytes; the folding newline
    # counts; a piece that would pass the limit is dropped, with the rest of
    # that header.
    ("102400", b"X-Huge: " + b"h" * 150000 + b"\r\n", ["X-Huge: " + "h" * (102400 - 8)]),
    ("102400", _many(2000), ["X-Many: a"] + ["\tcont%05d %s" % (i, "c" * 60) for i in range(1422)]),
    ("3000", _many(2000), ["X-Many: a"] + ["\tcont%05d %s" % (i, "c" * 60) for i in range(41)]),
    ("102400", b"X-Mid: " + b"m" * 5000 + b"\r\n", ["X-Mid: " + "m" * 5000]),
])
def test_header_size_limit_as_postfix(tmp_path, limit, data, kept):
    c, store, _ = make(tmp_path, {"header_size_limit": limit})
    cs, reply = submit(c, data + b"Subject: after\r\n\r\nbody\r\n", local=False, received=None,
                       chunks=997)
    assert reply.code == 250
    assert content(store, cs.queue_id) == "\n".join(kept) + "\nSubject: after\n\nbody\n"


def test_header_lookahead_bounded(tmp_path):
    # A first line with no colon within header_size_limit bytes is body.
    c, store, _ = make(tmp_path, {"header_size_limit": "50"})
    cs, reply = submit(c, b"A" * 200 + b": not a header after all\r\nmore\r\n", received=None,
                       local=False, chunks=10)
    assert content(store, cs.queue_id) == "\n" + "A" * 200 + ": not a header after all\nmore\n"


def test_long_header_line_kept_whole(tmp_path):
    # Lines longer than line_length_limit are kept whole (Postfix stores them as
    # continuation records and joins them again on delivery).
    c, store, _ = make(tmp_path)
    cs, _ = submit(c, b"X-L: " + b"y" * 5000 + b"\r\n\r\n" + b"z" * 9000 + b"\r\n", chunks=1000)
    text = content(store, cs.queue_id)
    assert "\nX-L: " + "y" * 5000 + "\n" in text and text.endswith("z" * 9000 + "\n")


@pytest.mark.parametrize("n,code", [(48, 250), (49, 554)])
def test_hopcount(tmp_path, n, code):
    # smtpd's own Received header counts too: 49 + 1 = hopcount_limit (50) is rejected.
    c, store, log = make(tmp_path)
    data = b"".join(b"Received: from h%d\r\n" % i for i in range(n)) + b"Subject: h\r\n\r\nb\r\n"
    cs, reply = submit(c, data)
    assert reply.code == code
    if code == 554:
        assert (reply.enhanced, reply.text) == ("5.4.0", "Error: too many hops")
        assert store.scan("incoming") == [] and os.listdir(store.path("incoming")) == []
        assert log.lines == [f"warning: {cs.queue_id}: message rejected: hopcount exceeded"]


def test_received_in_body_does_not_count(tmp_path):
    c, store, _ = make(tmp_path)
    data = b"Subject: h\r\n\r\n" + b"Received: from x\r\n" * 60
    assert submit(c, data)[1].code == 250


def test_message_size_limit(tmp_path):
    c, store, log = make(tmp_path, {"message_size_limit": "1000"})
    cs = c.open(rewrite_local=False)
    cs.set_sender("s@x")
    cs.add_recipient("u@x")
    for _ in range(100):
        cs.write(b"x" * 99 + b"\r\n")          # keeps accepting the stream
    assert not os.path.exists(store.path("incoming", cs.queue_id))   # space freed at once
    reply = run(cs.finish())
    assert (reply.code, reply.enhanced, reply.text) == (552, "5.3.4", "Error: message file too big")
    assert os.listdir(store.path("incoming")) == []


def test_message_size_limit_boundary(tmp_path):
    # The limit covers the queue file as Postfix measures it: the content as stored,
    # in Postfix's record sizes (a line of 128 bytes or more costs its length + 3),
    # plus the envelope.
    c, store, _ = make(tmp_path, {"message_size_limit": "1000"})

    def attempt(n):
        cs = c.open(rewrite_local=False)
        cs.set_sender("s@x")
        cs.add_recipient("u@x")
        cs.write(b"S: x\r\n\r\n" + b"y" * (n - 8))
        code = run(cs.finish()).code
        return code, cs.envelope_overhead(), cs.proc.records.total
    code, overhead, records = attempt(500)
    assert (code, records) == (250, 500 + 3)
    fits = 1000 - overhead - 3                # the same digits in the size attribute
    assert attempt(fits)[0] == 250
    assert attempt(fits + 1)[0] == 552
    assert attempt(1000)[0] == 552
    c0, _, _ = make(tmp_path / "unlimited", {"message_size_limit": "0"})
    assert submit(c0, b"S: x\r\n\r\n" + b"y" * 5000, local=False)[1].code == 250


def test_write_error_gives_451_and_no_file(tmp_path):
    def failing_write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    c, store, log = make(tmp_path, store_kw={"write": failing_write})
    cs, reply = submit(c, b"Subject: t\r\n\r\n" + b"b" * 200000)
    assert (reply.code, reply.enhanced, reply.text) == (451, "4.3.0", "Error: queue file write error")
    assert os.listdir(store.path("incoming")) == []
    assert any("No space left" in line for line in log.lines)


def test_abort_removes_file(tmp_path):
    c, store, _ = make(tmp_path)
    cs = c.open()
    cs.write(b"Subject: x\r\n")
    cs.abort()
    assert os.listdir(store.path("incoming")) == []


def test_envelope_and_attributes_stored(tmp_path):
    c, store, _ = make(tmp_path)
    cs = c.open(rewrite_local=False)
    cs.set_sender("s@x", ret="FULL", envid="abc", smtputf8=True, body_type="8BITMIME")
    cs.add_recipient("u@x", orig="U@x", orcpt="rfc822;U@x", notify="NEVER")
    cs.set_attribute("client_address", "127.0.0.1")
    cs.set_attribute("helo_name", "client")
    cs.write(b"S: x\r\n\r\nb\r\n")
    assert run(cs.finish()).code == 250
    with store.open(cs.queue_id) as q:
        assert (q.sender, q.ret, q.envid, q.smtputf8, q.body_type) == ("s@x", "FULL", "abc", True, "8BITMIME")
        r = q.recipients[0]
        assert (r.address, r.orig, r.orcpt, r.notify) == ("u@x", "U@x", "rfc822;U@x", "NEVER")
        # postwell_size: Postfix's size of "S: x", "", "b" (a record is type, length, text).
        assert q.attributes == {"client_address": "127.0.0.1", "helo_name": "client",
                                "postwell_size": "11"}


def test_duplicate_recipients_removed_as_postfix_does(tmp_path):
    aliases = {"joe@alias.test": "joe@mx.example.test"}
    c, store, _ = make(tmp_path, aliases=aliases)
    rcpts = ["joe@alias.test", "JOE@mx.example.test", "joe@mx.example.test",
             ("y@x", None, None, "SUCCESS"), ("y@x", None, None, "FAILURE"),
             ("y@x", None, "rfc822;zz@x", None), "y@x", "y@x"]
    cs, reply = submit(c, b"S: x\r\n\r\nb\r\n", rcpts=rcpts)
    with store.open(cs.queue_id) as q:
        got = [(r.address, r.orig, r.notify, r.orcpt) for r in q.recipients]
    # Same result as Postfix 3.7 for the same RCPT sequence; a recipient that came
    # without an ORCPT gets "rfc822;" + its address (postcat -e: dsn_orig_rcpt).
    assert got == [("joe@mx.example.test", "joe@alias.test", None, "rfc822;joe@alias.test"),
                   ("JOE@mx.example.test", "JOE@mx.example.test", None, "rfc822;JOE@mx.example.test"),
                   ("y@x", "y@x", "SUCCESS", "rfc822;y@x"), ("y@x", "y@x", "FAILURE", "rfc822;y@x"),
                   ("y@x", "y@x", None, "rfc822;zz@x"), ("y@x", "y@x", None, "rfc822;y@x")]


def test_default_orcpt_filled_by_smtpd_does_not_defeat_dedup(tmp_path):
    c, store, _ = make(tmp_path, aliases={"joe@alias.test": "joe@mx.example.test"})
    rcpts = [("joe@mx.example.test", "joe@mx.example.test", "rfc822;joe@mx.example.test", None),
             ("joe@mx.example.test", "joe@mx.example.test", None, None),
             ("joe@alias.test", "joe@alias.test", "rfc822;joe@alias.test", None)]
    cs, reply = submit(c, b"S: x\r\n\r\nb\r\n", rcpts=rcpts)
    with store.open(cs.queue_id) as q:
        # The original recipient is part of Postfix 3.7's key: joe@mx reached as itself
        # and through the alias is kept twice (nrcpt=2, two to= lines in Postfix).
        assert [(r.address, r.orig) for r in q.recipients] == [
            ("joe@mx.example.test", "joe@mx.example.test"),
            ("joe@mx.example.test", "joe@alias.test")]


def test_duplicate_filter_folds_case_with_the_original_recipient(tmp_path):
    # Postfix 3.7 (checked side by side): RCPT joe@alias.test (-> joe@mx), JOE@mx,
    # joe@mx, Y@x, y@x, z@x, z@X give nrcpt=4 after folding on (orig, recipient).
    c, store, _ = make(tmp_path, aliases={"joe@alias.test": "joe@mx.example.test"})
    rcpts = ["joe@alias.test", "JOE@mx.example.test", "joe@mx.example.test",
             "Y@x.test", "y@x.test", "z@x.test", "z@X.test"]
    cs, reply = submit(c, b"S: x\r\n\r\nb\r\n", rcpts=rcpts)
    with store.open(cs.queue_id) as q:
        assert [(r.address, r.orig) for r in q.recipients] == [
            ("joe@mx.example.test", "joe@alias.test"),
            ("JOE@mx.example.test", "JOE@mx.example.test"),
            ("Y@x.test", "Y@x.test"), ("z@x.test", "z@x.test")]


def test_virtual_alias_expansion_in_cleanup(tmp_path):
    aliases = {"a@mx.example.test": "b@mx.example.test",
               "b@mx.example.test": "b@mx.example.test, c@mx.example.test"}
    c, store, _ = make(tmp_path, aliases=aliases)
    cs, reply = submit(c, b"S: x\r\n\r\nb\r\n", rcpts=["a@mx.example.test"])
    with store.open(cs.queue_id) as q:
        assert [(r.address, r.orig) for r in q.recipients] == [
            ("b@mx.example.test", "a@mx.example.test"), ("c@mx.example.test", "a@mx.example.test")]


def test_virtual_alias_loop_defers(tmp_path):
    aliases = {"l1@x.test": "l2@x.test", "l2@x.test": "l1@x.test"}
    c, store, log = make(tmp_path, aliases=aliases)
    cs, reply = submit(c, b"S: x\r\n\r\nb\r\n", rcpts=["l1@x.test"])
    assert (reply.code, reply.enhanced, reply.text) == (451, "4.6.0", "Alias expansion error")
    assert log.lines[-1] == (f"warning: {cs.queue_id}: unreasonable virtual_alias_maps map nesting "
                             "for l1@x.test -- message not accepted, try again later")
    assert os.listdir(store.path("incoming")) == []


def test_virtual_table_failure_defers(tmp_path):
    class Broken:
        def lookup(self, key):
            raise OSError("table unavailable")
    c, store, log = make(tmp_path, {"virtual_alias_maps": "hash:/nonexistent"})
    c._table_opener = lambda spec: Broken()
    cs, reply = submit(c, b"S: x\r\n\r\nb\r\n")
    # Postfix 3.7's reply and warning for a table that cannot be read.
    assert (reply.code, reply.enhanced, reply.text) == (451, "4.3.0", "Error: queue file write error")
    assert log.lines[-1] == (f"warning: {cs.queue_id}: virtual_alias_maps map lookup problem for "
                             "u@example.test -- message not accepted, try again later")
    assert os.listdir(store.path("incoming")) == []


def test_missing_table_file_defers(tmp_path):
    pytest.importorskip("postwell.tables")
    cfg = Config(str(tmp_path), {"myhostname": "mx.example.test",
                                 "virtual_alias_maps": f"hash:{tmp_path}/nonexistent"}, {}, [])
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    log = NullLog("cleanup")
    c = Cleanup(cfg, store, log)
    cs, reply = submit(c, b"S: x\r\n\r\nb\r\n")
    assert reply.code == 451 and os.listdir(store.path("incoming")) == []
    assert any("map lookup problem for u@example.test" in line for line in log.lines)


def expander(d, **kw):
    t = DictTable(d)
    kw.setdefault("local_domain", lambda dom: dom == "local.test")
    return VirtualAliasExpander([t.lookup], **kw)


def test_expander_rules():
    e = expander({"a@x.test": "b@x.test", "@dom.test": "catch@x.test", "@old.test": "@new.test",
                  "self@x.test": "self@x.test, other@x.test", "bare": "bare-result@x.test",
                  "multi@x.test": "m1@x.test m2@x.test,m3@x.test"})
    assert e.expand("a@x.test") == ["b@x.test"]
    assert e.expand("A@X.TEST") == ["b@x.test"]
    assert e.expand("anyone@dom.test") == ["catch@x.test"]
    assert e.expand("user@old.test") == ["user@new.test"]
    assert e.expand("self@x.test") == ["self@x.test", "other@x.test"]
    assert e.expand("nomatch@x.test") == ["nomatch@x.test"]
    assert e.expand("bare@local.test") == ["bare-result@x.test"]
    assert e.expand("bare@remote.test") == ["bare@remote.test"]    # bare form: local domains only
    assert e.expand("multi@x.test") == ["m1@x.test", "m2@x.test", "m3@x.test"]


def test_expander_full_address_beats_domain_wildcard():
    e = expander({"@d.test": "all@x.test", "vip@d.test": "boss@x.test"})
    assert e.expand("vip@d.test") == ["boss@x.test"]


def test_expander_recipient_delimiter():
    e = expander({"joe@x.test": "j@y.test"}, recipient_delimiter="+")
    assert e.expand("joe+lists@x.test") == ["j+lists@y.test"]
    e2 = expander({"joe+lists@x.test": "l@y.test", "joe@x.test": "j@y.test"}, recipient_delimiter="+")
    assert e2.expand("joe+lists@x.test") == ["l@y.test"]


def test_expander_limits():
    big = {"list@x.test": ", ".join(f"m{i}@x.test" for i in range(20))}
    assert len(expander(big, expansion_limit=20).expand("list@x.test")) == 20
    with pytest.raises(AliasExpansionError, match="expansion size"):
        expander(big, expansion_limit=19).expand("list@x.test")
    chain = {f"c{i}@x.test": f"c{i + 1}@x.test" for i in range(10)}
    # As in Postfix, the limit is checked before each lookup, the last (failing) one included.
    assert expander(chain, recursion_limit=11).expand("c0@x.test") == ["c10@x.test"]
    with pytest.raises(AliasExpansionError, match="nesting"):
        expander(chain, recursion_limit=10).expand("c0@x.test")


def test_expander_dedups_results():
    e = expander({"a@x.test": "b@x.test, c@x.test", "c@x.test": "b@x.test"})
    assert e.expand("a@x.test") == ["b@x.test"]


def test_content_processor_direct():
    out = []
    p = ContentProcessor(out.append, hopcount_limit=2)
    p.feed(b"Received: a\r\nReceived: b\r\n\r\nx")
    p.finish()
    assert b"".join(out) == b"Received: a\nReceived: b\n\nx\n"
    assert p.too_many_hops


def test_streaming_50mb_bounded_memory(tmp_path):
    import tracemalloc
    c, store, _ = make(tmp_path, {"message_size_limit": "0"})
    cs = c.open(rewrite_local=True)
    cs.set_sender("s@x")
    cs.add_recipient("u@x")
    line = b"0123456789" * 7 + b"abcdefg\r\n"     # 79 bytes
    chunk = line * 829                           # ~64 KB, lines span chunk boundaries below
    tracemalloc.start()
    cs.write(b"Subject: big\r\n\r\n")
    total = 0
    while total < 50 * 1024 * 1024:
        cs.write(chunk[:40000])
        cs.write(chunk[40000:])
        total += len(chunk)
    reply = run(cs.finish())
    _cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert reply.code == 250
    assert peak < 3_000_000
    with store.open(cs.queue_id) as q:
        assert q.content_size > total * 78 // 79


@pytest.mark.parametrize("local", [True, False])
def test_bcc_headers_removed(tmp_path, local):
    c, store, _ = make(tmp_path)
    data = (b"From: j@x.test\r\nBcc: Foo <foo@x.test>,\r\n bar@x.test\r\nResent-Bcc: rb@x.test\r\n"
            b"bcc : x@y.test\r\nSubject: s\r\n\r\nBcc: in body stays\r\n")
    cs, _ = submit(c, data, local=local, chunks=5, received=None)
    text = content(store, cs.queue_id)
    assert text.startswith("From: j@x.test\nSubject: s\n")
    assert "foo@" not in text and "bar@" not in text and "rb@" not in text and "x@y" not in text
    assert text.endswith("\nBcc: in body stays\n")
    # Resent-Bcc makes it a resent message, as in Postfix.
    assert ("Resent-Message-Id: <" in text) == local


def test_unqualified_envelope_addresses_get_myorigin(tmp_path):
    c, store, _ = make(tmp_path, {"myorigin": "example.org"})
    cs, reply = submit(c, b"Subject: s\r\n\r\nb\r\n", rcpts=["bob", "q@x.test"], sender="root", local=False)
    with store.open(cs.queue_id) as q:
        assert q.sender == "root@example.org"
        assert [(r.address, r.orig) for r in q.recipients] == [("bob@example.org", "bob"),
                                                                ("q@x.test", "q@x.test")]
    cs, reply = submit(c, b"Subject: s\r\n\r\nb\r\n", sender="")
    with store.open(cs.queue_id) as q:
        assert q.sender == ""


def test_undecided_header_line_fed_bytewise_is_linear(tmp_path):
    # 100 KB of header-name characters with no colon, one byte per write: must
    # not rescan the buffer on every byte.
    c, store, _ = make(tmp_path, {"message_size_limit": "0"})
    cs = c.open(rewrite_local=False)
    cs.set_sender("s@x")
    cs.add_recipient("u@x")
    t0 = time.monotonic()
    for _ in range(102500):
        cs.write(b"A")
    cs.write(b"\r\nbody\r\n")
    assert run(cs.finish()).code == 250
    assert time.monotonic() - t0 < 20
    assert content(store, cs.queue_id) == "\n" + "A" * 102500 + "\nbody\n"


def test_name_then_blanks_then_colon_across_chunks(tmp_path):
    c, store, _ = make(tmp_path)
    cs, _ = submit(c, b"X-Odd  \t: v\r\nNot header line\r\n", chunks=1, local=False, received=None)
    # Postfix 3.7 writes "Name:" without the blanks before the colon (see
    # test_cleanup_fuzz6.py test_white_space_before_colon_is_removed).
    assert content(store, cs.queue_id) == "X-Odd: v\n\nNot header line\n"


# Header address rewriting for local clients: inputs and outputs observed on Postfix 3.7
# (myorigin = ref.example.test).
POSTFIX_REWRITES = [
    (b"From: f, Joe <joe>, \"q u\"@x.test (c), g@h",
     b"From: f@ref.example.test, Joe <joe@ref.example.test>,\n\t\"q u\"@x.test (c), g@h"),
    (b"To: undisclosed:;, bob", b"To: undisclosed: ;, bob@ref.example.test"),
    (b"Cc: a (comment) , <b>", b"Cc: a@ref.example.test (comment), <b@ref.example.test>"),
    (b"Reply-To: r", b"Reply-To: r@ref.example.test"),
    (b"From: Joe  <joe@x.test>", b"From: Joe  <joe@x.test>"),
    (b"To: a@b.test,c@d.test", b"To: a@b.test,c@d.test"),
    (b"From: host!user, a%b, \"q\\\"x\" <qq>, x@y.", b"From: user@host, a@b, \"q\\\"x\" <qq@ref.example.test>, x@y"),
    (b"To: ,, a ,", b"To: , , a@ref.example.test, "),
    (b"Cc: \"\" <c>, d (c1) (c2), \"Doe, John\" <jd>, <>",
     b"Cc: \"\" <c@ref.example.test>, d@ref.example.test (c1) (c2),\n\t\"Doe, John\" <jd@ref.example.test>, <>"),
    (b"Reply-To: Group: m1, m2@x.test;, Other:;", b"Reply-To: Group: m1@ref.example.test, m2@x.test;, Other: ;"),
    (b"Sender: weird <a b>", b"Sender: weird <ab@ref.example.test>"),
    (b"From: root (Cron Daemon)", b"From: root@ref.example.test (Cron Daemon)"),
    (b"Errors-To: e", b"Errors-To: e@ref.example.test"),
    (b"Disposition-Notification-To: dn", b"Disposition-Notification-To: dn@ref.example.test"),
    (b"X-Addr: xa", b"X-Addr: xa"),
]


@pytest.mark.parametrize("given,expected", POSTFIX_REWRITES)
def test_header_address_rewriting_matches_postfix(tmp_path, given, expected):
    c, store, _ = make(tmp_path, {"myorigin": "ref.example.test"})
    cs, _ = submit(c, given.replace(b"\n", b"\r\n") + b"\r\nSubject: s\r\n\r\nbody\r\n", chunks=4,
                   received=None)
    assert content(store, cs.queue_id).startswith(expected.decode() + "\nSubject: s\n")


def test_no_header_rewriting_for_remote_clients(tmp_path):
    c, store, _ = make(tmp_path)
    data = b"From: root (Cron Daemon)\r\nTo: ,, a ,\r\n\r\nbody\r\n"
    cs, _ = submit(c, data, local=False, received=None)
    assert content(store, cs.queue_id) == "From: root (Cron Daemon)\nTo: ,, a ,\n\nbody\n"


def test_return_path_and_content_length_dropped(tmp_path):
    c, store, _ = make(tmp_path)
    data = b"Return-Path: <rp@x.test>\r\nContent-Length: 42\r\nSubject: s\r\n\r\nbody\r\n"
    for local in (True, False):
        cs, _ = submit(c, data, local=local, received=None)
        assert content(store, cs.queue_id).startswith("Subject: s\n")


def test_long_address_header_is_cut_after_the_rewrite(tmp_path):
    # Postfix 3.7 rewrites the header it took in, then cuts the rewritten (longer,
    # folded) text at header_size_limit: here at the last line boundary, which keeps
    # more than 90% of the 200 bytes (checked against a real instance).
    to = b"To: " + b", ".join(b"u%d" % i for i in range(100))
    c0, store0, _ = make(tmp_path / "whole")
    cs, _ = submit(c0, to + b"\r\n\r\nbody\r\n", received=None)
    whole = content(store0, cs.queue_id).split("\nMessage-Id:", 1)[0].split("\n")
    keep, size = [], -1
    for line in whole:
        if size + 1 + len(line) > 200:
            break
        size += 1 + len(line)
        keep.append(line)
    assert 180 < size <= 200 and len(keep) < len(whole)
    c, store, _ = make(tmp_path / "cut", {"header_size_limit": "200"})
    cs, _ = submit(c, to + b"\r\n\r\nbody\r\n", received=None, chunks=50)
    assert content(store, cs.queue_id).startswith("\n".join(keep) + "\nMessage-Id:")


def test_envelope_bang_and_percent(tmp_path):
    c, store, _ = make(tmp_path, {"myorigin": "o.test"})
    cs, _ = submit(c, b"S: x\r\n\r\nb\r\n", rcpts=["host!user", "a%b", "x@y."], sender="s")
    with store.open(cs.queue_id) as q:
        assert q.sender == "s@o.test"
        assert [r.address for r in q.recipients] == ["user@host", "a@b", "x@y"]


def test_pattern_tables_see_whole_address_only():
    import re as _re

    def regexp_lookup(key):
        m = _re.fullmatch(r"(?i)(.*)@old\.test", key)
        return f"{m.group(1)}@new.test" if m else None
    seen = []

    def spy(key):
        seen.append(key)
        return None
    e = VirtualAliasExpander([(spy, True), (regexp_lookup, True)], local_domain=lambda d: True)
    assert e.expand("Joe@OLD.test") == ["Joe@new.test"]
    assert seen == ["Joe@OLD.test", "Joe@new.test"]     # never "joe", "@old.test", ...


def test_real_inline_table_integration(tmp_path):
    pytest.importorskip("postwell.tables")
    p = {"myhostname": "mx.example.test",
         "virtual_alias_maps": "inline:{a@x.test=b@x.test, {l@x.test = m1@y.test, m2@y.test}}"}
    cfg = Config(str(tmp_path), p, {}, [])
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    c = Cleanup(cfg, store, NullLog("cleanup"))
    cs, reply = submit(c, b"S: x\r\n\r\nb\r\n", rcpts=["A@x.test", "l@x.test", "z@x.test"])
    assert reply.code == 250
    with store.open(cs.queue_id) as q:
        assert [r.address for r in q.recipients] == ["b@x.test", "m1@y.test", "m2@y.test", "z@x.test"]


from hypothesis import given, settings, strategies as st  # noqa: E402

_ALPHABET = st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"a", b"B", b"Received: x",
                             b"Message-Id: <m@x>", b"To: y", b"Bcc: z", b"\xc3\xa9", b"-"])


def _process(data: bytes, cuts: list[int], limit: int) -> tuple[bytes, int, set]:
    out = []
    p = ContentProcessor(out.append, header_size_limit=limit,
                         on_header_end=lambda proc: [b"X-Added: 1"],
                         header_rewriter=lambda raw, n: raw.upper(), rewrite_names=frozenset({"to"}))
    pos = 0
    for c in sorted(set(cuts)):
        if 0 < c < len(data):
            p.feed(data[pos:c])
            pos = c
    p.feed(data[pos:])
    p.finish()
    return b"".join(out), p.hops, p.headers_seen


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=60).map(b"".join), st.lists(st.integers(0, 400), max_size=8),
       st.sampled_from([5, 16, 102400]))
def test_chunking_never_changes_the_result(data, cuts, limit):
    whole = _process(data, [], limit)
    split = _process(data, cuts, limit)
    assert split == whole
    out = whole[0]
    assert b"\r" not in out
    assert out.endswith(b"\n")
    assert b"X-Added: 1\n" in out


@pytest.mark.parametrize("local", [True, False])
def test_first_client_line_rules(tmp_path, local):
    # Checked against Postfix 3.7: a leading mbox "From " line (also ">From ")
    # becomes X-Mailbox-Line:, only as the first line; a first line starting
    # with white space does not continue the Received: header.
    c, store, _ = make(tmp_path)
    cases = [
        (b"From someone Sun Nov 29 06:11:14 2026\r\nSubject: x\r\n\r\nb\r\n",
         "X-Mailbox-Line: From someone Sun Nov 29 06:11:14 2026\nSubject: x\n"),
        (b">From someone\r\nSubject: x\r\n\r\nb\r\n", "X-Mailbox-Line: >From someone\nSubject: x\n"),
        (b"Subject: x\r\nFrom someone\r\n\r\nb\r\n", "Subject: x\n"),
        (b"\tTab first\r\nSubject: x\r\n\r\nb\r\n", ""),
    ]
    for data, head in cases:
        cs, _ = submit(c, data, local=local, chunks=3)
        text = content(store, cs.queue_id).split("mx.example.test\n", 1)[1]
        assert text.startswith(head)
        if data.startswith(b"\t"):
            assert "\n\n\tTab first\nSubject: x\n\nb\n" in "\n" + text
        if data.startswith(b"Subject"):
            assert "\n\nFrom someone\n\nb\n" in text
        if local and data.startswith(b"From"):
            assert "\nFrom: s@example.test\n" in text


def test_mail_date_pads_the_day_with_a_space():
    # Postfix's mail_date() uses strftime "%a, %e %b ..." (seen in its Date:,
    # Received: and notice dates on days 1-9).
    import time as _time
    from postwell.cleanup.service import _format_mail_date
    from postwell.smtpd.server import _own_mail_date
    when = int(_time.mktime((2026, 12, 6, 10, 0, 0, 0, 0, -1)))
    lt = _time.localtime(when)
    assert _format_mail_date(when).startswith(f"Sun,  6 Dec 2026 {_time.strftime('%H:%M:%S', lt)} ")
    assert _own_mail_date(when) == _format_mail_date(when)
    later = int(_time.mktime((2026, 12, 16, 10, 0, 0, 0, 0, -1)))
    assert _format_mail_date(later).startswith("Wed, 16 Dec 2026 ")
