"""The per-message fast paths of cleanup, the RCPT restrictions and the queue file
(issue 8): each must give exactly what the general path gives.

- queue/format.py pack_envelope_checked(): the bytes of Envelope.pack(), the
  recipients' status offsets and parse_envelope()'s verdict, without parsing again;
- queue/store.py: the queue directory descriptor kept between creates (and a
  directory made anew is still found);
- policy/resolve.py: resolve() answers kept when no table takes part, never when
  one does, never a failure;
- policy/matchlist.py: HostList answers kept for address/name lists, not for tables;
- cleanup/headers.py: an address header's whole line held and written without the
  record loop: the same queue-file content as when the same bytes arrive in pieces.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from postwell.cleanup import Cleanup
from postwell.cleanup.addresses import ADDRESS_HEADERS, rewrite_header
from postwell.cleanup.headers import ContentProcessor
from postwell.config.main import Config
from postwell.log import NullLog
from postwell.policy import AddressResolver, OwnAddresses
from postwell.policy.matchlist import HostList
from postwell.queue import QueueStore, QueueWriteError
from postwell.queue import format as qf
from postwell.queue.format import CorruptQueueFile, Envelope, Recipient

T0 = 1_795_932_674.5


# -- envelope packing --------------------------------------------------------------

_TEXTS = ["", "a", "\0", "b\0c", "\0lead", "é", "\udcff", "x" * 3, "@", "user@example.org"]


def _random_envelope(rng: random.Random) -> Envelope:
    env = Envelope(sender=rng.choice(_TEXTS))
    for _ in range(rng.randrange(3)):
        env.params[rng.choice(_TEXTS)] = rng.choice(_TEXTS)
    for _ in range(rng.randrange(4)):
        env.attributes[rng.choice(_TEXTS)] = rng.choice(_TEXTS)
    for i in range(rng.randrange(4)):
        opt = _TEXTS + [None]
        env.recipients.append(Recipient(rng.choice(_TEXTS), rng.choice(opt), rng.choice(opt),
                                        rng.choice(opt), rng.random() < 0.3, i))
    return env


def _verdict(data: bytes, base: int):
    try:
        return qf.parse_envelope(data, base), None
    except CorruptQueueFile as exc:
        return None, exc.reason


def test_checked_pack_agrees_with_pack_and_parse():
    rng = random.Random(8)
    refused = 0
    for _ in range(3000):
        env = _random_envelope(rng)
        data, offsets, problem = qf.pack_envelope_checked(env)
        assert data == env.pack()
        parsed, reason = _verdict(data, 1000)
        assert problem == reason
        if reason is None:
            assert [r.status_offset for r in parsed.recipients] == [1000 + o for o in offsets]
            assert all(data[o:o + 1] in (b"-", b"D") for o in offsets)
        else:
            refused += 1
    assert 0 < refused < 3000       # both outcomes were exercised


def test_checked_pack_refuses_an_oversized_record(monkeypatch):
    monkeypatch.setattr(qf, "MAX_RECORD", 64)
    for env in (Envelope(sender="s" * 65), Envelope(attributes={"a": "v" * 70}),
                Envelope(params={"envid": "e" * 70}),
                Envelope(recipients=[Recipient("r" * 70)])):
        data, _, problem = qf.pack_envelope_checked(env)
        assert problem == _verdict(data, 0)[1] == "truncated envelope record"


def _reference_parse(data: bytes, base: int):
    """The envelope rules of queue/format.py written plainly, one record at a time:
    what the tuned parse_envelope() must answer, result or refusal."""
    import struct
    out = {"sender": None, "P": {}, "A": {}, "R": []}
    pos, ended = 0, False
    while pos < len(data):
        if len(data) - pos < 5:
            return "truncated envelope record header"
        rtype, length = struct.unpack_from("<cI", data, pos)
        pos += 5
        if length > qf.MAX_RECORD or pos + length > len(data):
            return "truncated envelope record"
        payload = data[pos:pos + length]
        if rtype == b"E":
            if length:
                return "malformed end record"
            if pos != len(data):
                return "data after end record"
            ended = True
            break
        if rtype == b"S":
            if out["sender"] is not None:
                return "duplicate sender record"
            out["sender"] = payload.decode("utf-8", "surrogateescape")
        elif rtype in (b"P", b"A"):
            if b"\0" not in payload:
                return "malformed attribute record"
            k, v = payload.split(b"\0", 1)
            out[rtype.decode()][k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        elif rtype == b"R":
            if payload[:1] not in (b"-", b"D"):
                return "malformed recipient status"
            f = payload[1:].split(b"\0")
            if len(f) != 4 or not f[0]:
                return "malformed recipient record"
            d = [x.decode("utf-8", "surrogateescape") or None for x in f]
            out["R"].append((d[0], d[1], d[2], d[3], payload[:1] == b"D", base + pos))
        else:
            return f"unknown record type {rtype!r}"
        pos += length
    if not ended:
        return "missing end record (truncated envelope)"
    if out["sender"] is None:
        return "no sender record"
    return out


def test_parse_envelope_agrees_with_the_plain_rules_on_damaged_envelopes():
    rng = random.Random(11)
    for _ in range(4000):
        data = bytearray(_random_envelope(rng).pack())
        damage = rng.randrange(4)
        if damage == 1:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif damage == 2:
            del data[rng.randrange(len(data) + 1):]
        elif damage == 3:
            data += bytes([rng.randrange(256)])
        data = bytes(data)
        want = _reference_parse(data, 77)
        env, reason = _verdict(data, 77)
        if isinstance(want, str):
            assert reason == want, data
        else:
            assert reason is None, data
            assert (env.sender, env.params, env.attributes) == (want["sender"], want["P"], want["A"])
            assert [(r.address, r.orig, r.orcpt, r.notify, r.done, r.status_offset)
                    for r in env.recipients] == want["R"]
            assert [r.index for r in env.recipients] == list(range(len(env.recipients)))
    # An empty recipient record: its status byte is missing, not the next record's.
    data = qf.pack_record(b"S", b"s") + qf.pack_record(b"R", b"") + b"D" + qf.pack_record(b"E", b"")
    assert _verdict(data, 0)[1] == "malformed recipient status"


@pytest.fixture
def store(tmp_path):
    s = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    s.ensure_layout()
    return s


def test_commit_records_status_offsets_of_the_file(store):
    m = store.create()
    m.set_sender("s@example.org")
    m.set_attribute("client_name", "localhost")
    for i in range(3):
        m.add_recipient(f"r{i}@example.org", orig=f"o{i}@example.org", notify="NEVER" if i else None)
    m.write(b"Subject: x\n\nbody\n")
    m.commit()
    with store.open(m.queue_id) as q:
        assert [r.status_offset for r in q.recipients] == [r.status_offset for r in m.recipients]
    with open(store.path("incoming", m.queue_id), "rb") as f:
        data = f.read()
    assert all(r.status_offset > 0 and data[r.status_offset:r.status_offset + 1] == b"-"
               for r in m.recipients)


def test_an_unstorable_envelope_is_refused_and_leaves_no_file(store):
    m = store.create()
    m.set_sender("s@example.org")
    m.add_recipient("\0nothing")          # empty once cut at the NUL: parse would refuse it
    m.write(b"Subject: x\n\nbody\n")
    with pytest.raises(QueueWriteError, match="envelope not storable: malformed recipient record"):
        m.commit()
    assert os.listdir(store.path("incoming")) == []


# -- queue directory descriptor ------------------------------------------------------

def test_create_keeps_the_queue_directory_open(store, monkeypatch):
    store.create().abort()
    opened = []
    real_open = os.open

    def spy(path, *a, **kw):
        opened.append(path)
        return real_open(path, *a, **kw)
    monkeypatch.setattr(os, "open", spy)
    for _ in range(3):
        store.create().abort()
    assert store.queue_directory not in opened
    assert len(opened) == 3             # only the new files


def test_create_finds_a_queue_directory_made_anew(tmp_path):
    import shutil
    s = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    s.ensure_layout()
    s.create().abort()
    shutil.rmtree(tmp_path / "q")
    s.ensure_layout()
    m = s.create()
    assert os.path.exists(s.path("incoming", m.queue_id))
    m.abort()
    shutil.rmtree(tmp_path / "q")
    with pytest.raises(QueueWriteError):
        s.create()                       # gone for good: an error, as before


# -- resolver and host lists ----------------------------------------------------------

class CountingTable:
    def __init__(self, data):
        self.data = data
        self.calls = 0

    def lookup(self, key):
        self.calls += 1
        return self.data.get(key.lower())


def _resolver(params, tables=None, log=None):
    base = {"myhostname": "mx.example.com", "mydomain": "example.com",
            "mydestination": "$myhostname, localhost", "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4", "relayhost": "[127.0.0.1]:2525"}
    base.update(params)
    cfg = Config("/nonexistent", base, {}, [])
    own = OwnAddresses(cfg, system_addresses=lambda: ["127.0.0.1"])
    return AddressResolver(cfg, tables=tables or {}, own_addresses=own, log=log)


def test_resolve_answers_are_kept_without_tables():
    r = _resolver({"relay_domains": "relay.test"})
    a = r.resolve("u@relay.test", "s@x")
    assert r.resolve("u@relay.test", "other@y") is a
    assert (a.transport, a.nexthop, a.address_class) == ("relay", "[127.0.0.1]:2525", "relay")
    assert r.resolve("u%remote.test@mx.example.com").nexthop == "[127.0.0.1]:2525"
    assert r.resolve("u", rewrite=False) is not r.resolve("u")     # the key has both


def test_resolve_asks_a_table_every_time():
    t = CountingTable({"relay.test": "x"})
    r = _resolver({"relay_domains": "hash:/x/relay"}, tables={"hash:/x/relay": t})
    assert r.resolve("u@relay.test").address_class == "relay"
    t.data.clear()                                       # postmap rebuilt the table
    assert r.resolve("u@relay.test").address_class == "default"
    assert t.calls >= 2


def test_resolve_keeps_no_failure():
    log = NullLog()
    r = _resolver({"default_transport": ""}, log=log)
    assert r.resolve("u@remote.test").failed
    assert r.resolve("u@remote.test").failed
    assert sum("null transport is not allowed" in line for line in log.lines) == 2


def test_resolve_cache_is_bounded(monkeypatch):
    from postwell.policy import resolve as rmod
    monkeypatch.setattr(rmod, "_CACHE_MAX", 10)
    r = _resolver({})
    for i in range(35):
        r.resolve(f"u{i}@remote.test")
    assert len(r._cache) <= 10
    r._cache.clear()
    long = "x" * 300 + "@remote.test"
    assert r.resolve(long).recipient == long
    assert not r._cache              # a long address is answered, not kept


def test_host_list_answers_kept_only_without_tables():
    cfg = Config("/nonexistent", {}, {}, [])
    static = HostList("mynetworks", "127.0.0.0/8, example.com", cfg)
    assert static.match("a.example.com", "192.0.2.1") and static.match("x", "127.0.0.2")
    assert not static.match("x", "192.0.2.1")
    assert static.match("a.example.com", "192.0.2.1")
    assert len(static._cache) == 3
    t = CountingTable({"192.0.2.1": "OK"})
    dynamic = HostList("mynetworks", "hash:/x/nets", cfg, tables={"hash:/x/nets": t})
    assert dynamic.match("x", "192.0.2.1")
    t.data.clear()
    assert not dynamic.match("x", "192.0.2.1")
    assert dynamic._cache is None


# -- header fast paths -----------------------------------------------------------------

def _process(data: bytes, chunk: int | None, **kw) -> tuple[bytes, int, list]:
    out: list[bytes] = []
    ids: list = []
    p = ContentProcessor(out.append, on_message_id=lambda v, r: ids.append((v, r)),
                         header_rewriter=lambda raw, n: rewrite_header(raw, n, "mx.example.test"),
                         rewrite_names=ADDRESS_HEADERS, **kw)
    p.begin_client_data()
    if chunk is None:
        p.feed(data)
    else:
        for i in range(0, len(data), chunk):
            p.feed(data[i:i + chunk])
    p.finish()
    return b"".join(out), p.records.close(), ids


_HEADER_LINES = [b"From: <a@example.org>", b"To: user", b"To: a@b, c@d (x)",
                 b"Cc: \"q u\" <q@e>", b"Reply-To: r", b"Subject: hi", b"Message-Id: <m@x>",
                 b" folded", b"\tmore , z", b"Sender: s", b"Bcc: b@x", b"X-Long: " + b"y" * 60,
                 b"From: " + b"f" * 70, b"To: " + b"t@x, " * 20]


@pytest.mark.parametrize("seed", range(40))
def test_address_headers_same_in_one_piece_and_in_pieces(seed):
    rng = random.Random(seed)
    lines = [rng.choice(_HEADER_LINES) for _ in range(rng.randrange(1, 8))]
    body = b"\r\n".join(lines) + b"\r\n\r\nbody line\r\n"
    kw = {"line_length_limit": rng.choice([16, 64, 2048]),
          "header_size_limit": rng.choice([40, 100, 102400])}
    whole = _process(body, None, **kw)
    for chunk in (1, 2, 5):
        assert _process(body, chunk, **kw) == whole, chunk


def test_plain_message_content_through_cleanup(tmp_path):
    """A 4 KiB smtp-source style message from a local client, end to end: the queue
    file content is the message with LF line ends and the address headers as is."""
    cfg = Config(str(tmp_path), {"myhostname": "mx.example.test"}, {}, [])
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    c = Cleanup(cfg, store, NullLog())
    head = (b"From: <sender@example.org>\r\nTo: <sink@relay.test>\r\n"
            b"Date: Sun, 29 Nov 2026 14:55:03 +0000 (UTC)\r\nMessage-Id: <2a7c.0003.0000@vm>\r\n\r\n")
    body = b"".join(b"%dX" % i + b"X" * 76 + b"\r\n" for i in range(52))
    cs = c.open(rewrite_local=True)
    cs.set_sender("sender@example.org")
    cs.add_recipient("sink@relay.test")
    cs.prepend_header("Received: from localhost (localhost [127.0.0.1])\r\n\tby mx.example.test")
    cs.write(head + body)
    reply = asyncio.run(asyncio.wait_for(cs.finish(), 20))
    assert reply.code == 250
    with store.open(cs.queue_id) as q:
        assert q.read_content() == (b"Received: from localhost (localhost [127.0.0.1])\n"
                                    b"\tby mx.example.test\n" + (head + body).replace(b"\r\n", b"\n"))
        assert int(q.attributes["postwell_size"]) > len(head + body) - 2 * 57
