"""Fuzz targets: one function per parser, each fed arbitrary bytes.

Every target states the only exceptions its code may raise for hostile
input (the contract) and turns anything else into a failure by letting it
propagate.  Shared by the hypothesis tests (tests/test_fuzz_targets.py) and
the long runs (fuzz/run.py, atheris when installed).
"""

from __future__ import annotations

import os
import stat
import struct
import tempfile

from postwell.cleanup.addresses import rewrite_header_value, rewrite_local, tokenize
from postwell.cleanup.headers import ContentProcessor
from postwell.config.main import Config, ConfigError, parse_main_cf
from postwell.config.master import parse_master_cf
from postwell.queue import CorruptQueueFile, QueueStore
from postwell.queue import format as qf
from postwell.smtp import server as engine
from postwell.smtp.reply import Reply

# ---------------------------------------------------------------- helpers


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _chunks(data: bytes, sizes: bytes) -> list[bytes]:
    """Cut ``data`` where the bytes of ``sizes`` say: exercises every split point."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = (sizes[i % len(sizes)] if sizes else 255) % 97 + 1
        out.append(data[pos:pos + n])
        pos += n
        i += 1
    return out


# ---------------------------------------------------------------- SMTP server engine

ENGINE_CFG = engine.ServerConfig(hostname="mx.example.test", line_length_limit=512,
                                 message_size_limit=8192, recipient_limit=5,
                                 hard_error_limit=8, soft_error_limit=3, error_sleep_time=0,
                                 starttls_offered=True, auth_mechanisms=("PLAIN", "LOGIN"))
REPLIES = (None, None, None, Reply(250, "Ok", "2.0.0"), Reply(554, "Rejected", "5.7.1"),
           Reply(451, "Try later", "4.3.0"), Reply(334, ""), Reply(421, "Bye", "4.7.0"),
           Reply(220, "Go ahead", "2.0.0"), Reply(235, "Authenticated", "2.7.0"))
SMTP_DICT = [b"EHLO x\r\n", b"HELO y\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<> SIZE=9\r\n",
             b"RCPT TO:<c@d>\r\n", b"RCPT TO:<c@d> NOTIFY=NEVER ORCPT=rfc822;x\r\n", b"DATA\r\n",
             b"BDAT 5\r\n", b"BDAT 0 LAST\r\n", b"BDAT 3 LAST\r\n", b"RSET\r\n", b"NOOP\r\n",
             b"QUIT\r\n", b"VRFY a\r\n", b"ETRN d\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n",
             b"AUTH LOGIN dXNlcg==\r\n", b"*\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r",
             b"..\r\n", b"\x00", b"\n", b"\r", b"\r\n", b"x" * 600, b"MAIL FROM:<a@[IPv6:::1]>\r\n",
             b"BDAT 99999999999\r\n", b"GET / HTTP/1.0\r\n", b"\xff\xfe"]


def smtp_engine(data: bytes) -> None:
    """The sans-IO server: never raises, never loops, never buffers beyond its bound."""
    if not data:
        return
    split, body = data[:8], data[8:]
    c = engine.ServerConnection(ENGINE_CFG, client="unknown[192.0.2.1]",
                                forbid_bare_newline=("normalize", "reject", "no")[data[0] % 3])
    c.send_greeting(Reply(220, "mx.example.test ESMTP"))
    chunks = _chunks(body, split)
    # One line at most; an AUTH continuation line may be longer (smtpd_sasl_response_limit).
    line_bound = max(ENGINE_CFG.line_length_limit,
                     getattr(ENGINE_CFG, "auth_response_limit", 0) + 1)
    bound = line_bound + 128 + max((len(x) for x in chunks), default=0)
    answers = 0
    for ch in chunks + [b""]:
        c.receive_data(ch)
        for _ in range(20000):
            ev = c.next_event()
            assert c.buffered <= bound, f"engine buffers {c.buffered} bytes (bound {bound})"
            if ev is engine.NEED_DATA or isinstance(ev, engine.ConnectionClosed):
                break
            if ev is engine.PAUSED:
                raise AssertionError("engine paused with no event awaiting a reply")
            if getattr(ev, "needs_reply", False):
                c.send_reply(REPLIES[(answers + split[answers % len(split)]) % len(REPLIES)]
                             if split else None)
                answers += 1
        else:
            raise AssertionError("engine produced 20000 events for one chunk")
        c.data_to_send()
        if c.closed:
            break


def smtp_engine_tokens(data: bytes) -> None:
    """The same, on a command soup built from a dictionary of SMTP pieces."""
    out = bytearray(data[:8])
    for b in data[8:]:
        out += SMTP_DICT[b % len(SMTP_DICT)]
    smtp_engine(bytes(out))


# ---------------------------------------------------------------- configuration

PARAM_NAMES = ("myhostname", "mydomain", "myorigin", "mydestination", "message_size_limit",
               "smtpd_timeout", "maximal_queue_lifetime", "smtpd_tls_security_level", "mynetworks",
               "disable_vrfy_command", "queue_minfree", "x", "a", "b")


def main_cf(data: bytes) -> None:
    """main.cf text and $name expansion: ConfigError is the only way to fail."""
    text = _text(data)
    try:
        params = parse_main_cf(text, "main.cf", warn=lambda *a: None)
    except ConfigError:
        return
    cfg = Config(tempfile.gettempdir(), params, {}, [])
    for name in list(params)[:20] + list(PARAM_NAMES):
        for getter in (cfg.get, cfg.get_list, cfg.get_int, cfg.get_bool, cfg.get_time, cfg.get_size):
            try:
                getter(name)
            except ConfigError:
                pass


def master_cf(data: bytes) -> None:
    """master.cf text: ConfigError is the only way to fail."""
    try:
        services = parse_master_cf(_text(data), "master.cf", warn=lambda *a: None)
    except ConfigError:
        return
    for svc in services:
        for fn in (svc.wakeup_seconds, svc.process_limit):
            try:
                fn()
            except ConfigError:
                pass


# ---------------------------------------------------------------- queue file reader

_STORE_DIR = None


def _store() -> QueueStore:
    global _STORE_DIR
    if _STORE_DIR is None or not os.path.isdir(_STORE_DIR):
        _STORE_DIR = tempfile.mkdtemp(prefix="fuzz-queue-")
    store = QueueStore(_STORE_DIR)
    if not os.path.isdir(store.path("incoming")):
        store.ensure_layout()
    return store


def _valid_file(store: QueueStore) -> bytes:
    msg = store.create()
    msg.set_sender("sender@example.org", ret="HDRS", envid="id1")
    msg.add_recipient("a@example.test", orig="A@example.test", orcpt="rfc822;a@example.test",
                      notify="FAILURE")
    msg.add_recipient("b@example.test")
    msg.set_attribute("client_name", "client.example.org")
    msg.write(b"Subject: fuzz\n\nbody line\n")
    msg.commit()
    path = store.path("incoming", msg.queue_id)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


_VALID: bytes | None = None


def queue_file(data: bytes) -> None:
    """The queue file reader: CorruptQueueFile is the only way to fail.

    The first byte picks raw bytes or a mutation of a valid file (with the
    header CRC fixed up half the time, to get past the checksum)."""
    global _VALID
    store = _store()
    if _VALID is None:
        _VALID = _valid_file(store)
    if not data:
        return
    mode, rest = data[0], data[1:]
    if mode % 2 == 0:
        content = rest
    else:
        buf = bytearray(_VALID)
        # rest = (offset_lo, offset_hi, value) triples written over the valid file
        for i in range(0, len(rest) - 2, 3):
            off = (rest[i] | rest[i + 1] << 8) % (len(buf) + 8)
            if off < len(buf):
                buf[off] = rest[i + 2]
            else:
                buf.append(rest[i + 2])
        if len(rest) % 3 == 1:
            del buf[(rest[-1] * 7) % len(buf):]
        if mode % 4 == 1 and len(buf) >= qf.HEADER_SIZE:
            buf[56:60] = struct.pack("<I", __import__("zlib").crc32(bytes(buf[:56])))
        content = bytes(buf)
    qid = "FFFFF1"
    path = store.path("incoming", qid)
    with open(path, "wb") as f:
        f.write(content)
    os.chmod(path, stat.S_IRWXU)
    try:
        try:
            qm = store.open(qid, "incoming")
        except CorruptQueueFile:
            return
        with qm:
            total = sum(len(c) for c in qm.iter_content(4096))
            assert total == qm.content_size
            _ = (qm.sender, qm.recipients, qm.attributes, qm.params, qm.ret, qm.envid)
            if qm.recipients:
                qm.mark_done([qm.recipients[0]])
        with store.open(qid, "incoming") as again:
            assert again.recipients[0].done if again.recipients else True
    finally:
        os.unlink(path)
    try:
        qf.parse_envelope(rest, qf.HEADER_SIZE)
    except CorruptQueueFile:
        pass
    qf.parse_log_entries(rest)


# ---------------------------------------------------------------- addresses

def addresses(data: bytes) -> None:
    """Envelope and header address parsing never raise (except the engine's own
    syntax error, which becomes 501), and stay bounded."""
    text = _text(data)
    for null_ok in (False, True):
        try:
            addr, params = engine.parse_path(text, null_ok)
        except engine._SyntaxError:
            addr = None
        if addr is not None:
            assert len(addr) <= len(text)
            assert "\r" not in addr and "\n" not in addr and "\0" not in addr, repr(addr)
    rewrite_local(text, "example.org")
    rewrite_local(text, "")
    tokenize(text)
    rewrite_header_value(text, "example.org")
    from postwell.policy.resolve import strip_source_route, to_internal
    to_internal(text)
    strip_source_route(text)


# ---------------------------------------------------------------- cleanup headers

def cleanup_headers(data: bytes) -> None:
    """Header processing: never raises; LF-only output; no CR survives; bounded growth."""
    if not data:
        return
    split, body = data[:8], data[8:]
    out = bytearray()
    proc = ContentProcessor(out.extend, header_size_limit=1 + split[0] * 8,
                            hopcount_limit=3, line_length_limit=1 + (split[1] if len(split) > 1 else 0) * 4,
                            on_header_end=lambda p: [b"X-Added: yes"],
                            on_message_id=lambda v, resent: None,
                            header_rewriter=lambda raw, n: rewrite_header_value(
                                raw[n + 1:].decode("utf-8", "surrogateescape"), "example.org")
                            and None,
                            rewrite_names=frozenset({"from", "to", "cc"}))
    proc.begin_client_data()
    for ch in _chunks(body, split):
        proc.feed(ch)
    proc.finish()
    assert b"\r" not in out, "a CR reached the queue file"
    assert not out or out.endswith(b"\n"), "content does not end with a whole line"
    # Added text is bounded: one added header, a space per folded piece, final newlines.
    assert len(out) <= 2 * len(body) + 64, (len(out), len(body))


TARGETS = {
    "smtp_engine": smtp_engine,
    "smtp_engine_tokens": smtp_engine_tokens,
    "main_cf": main_cf,
    "master_cf": master_cf,
    "queue_file": queue_file,
    "addresses": addresses,
    "cleanup_headers": cleanup_headers,
}
