"""smtp(8): deliver over SMTP to the next hop (MX lookup or ``[host]:port``).

asyncio glue around the sans-IO engine :class:`postwell.smtp.client.SmtpClient`:
this module resolves the destination (postwell.dns), connects, applies Postfix's
per-stage timeouts, streams the queued content and turns replies into
per-recipient :class:`RecipientResult` objects worded as Postfix words them.

Idle connections are cached per destination and reused by later deliver()
calls (smtp_connection_cache_*, smtp_connection_reuse_*).  A reused connection
adds ``conn_use=N`` to the result (``result.conn_use``; the qmgr logs it after
``relay=``, as Postfix does).

8-bit content to a server without 8BITMIME (RFC 6152 3): Postfix's default
(disable_mime_output_conversion = no) downgrades MIME parts that declare
Content-Transfer-Encoding 8bit/binary to quoted-printable and leaves everything
else alone (a message without MIME headers goes out unchanged, 8-bit or not).
:class:`MimeDowngrade` does the same, line by line; see ``eight_bit_action``.
"""

from __future__ import annotations

import asyncio
import binascii
import os
import random
import re
import socket
import time
from dataclasses import dataclass

from postwell.dns import (DestinationError, DnsPythonResolver, NativeResolver, Target,
                          families_from_inet_protocols, own_addresses_from_config, parse_nexthop,
                          resolve_destination)
from postwell.smtp.client import (NEED_DATA, ConnectionClosed, ContentWanted, Envelope, Greeting,
                                  HelloDone, MailReply, MessageDone, ProtocolError,
                                  RcptReply, Recipient, Rejected, SmtpClient, State,
                                  TransactionFailed, needs_smtputf8, quote_address)
from postwell.smtp.reply import Reply

from .base import DeliveryAgent, RecipientResult


def eight_bit_action(body_type: str | None, server_8bitmime: bool,
                     disable_mime_output_conversion: bool) -> str:
    """What Postfix decides for 8-bit content: "send" as is, or "convert" to 7-bit.

    Postfix converts for a server without 8BITMIME unless
    disable_mime_output_conversion.  Content known to be 7-bit is never touched;
    an unknown body type is run through the converter, which only changes parts
    that declare an 8-bit transfer encoding.
    """
    if body_type == "7BIT" or server_8bitmime or disable_mime_output_conversion:
        return "send"
    return "convert"


_CT_RE = re.compile(rb"^content-type:\s*([!-~]+?)\s*/\s*([!-~]+?)\s*(?:;|$)", re.I)
_BOUNDARY_RE = re.compile(rb';\s*boundary\s*=\s*(?:"([^"]{1,200})"|([^\s;]{1,200}))', re.I)
_CTE_RE = re.compile(rb"^content-transfer-encoding:\s*([A-Za-z0-9-]+)", re.I)
MIME_HEADER_LIMIT = 102400       # header bytes per entity we analyse (bounded memory)


class MimeDowngrade:
    """Convert 8-bit MIME parts to quoted-printable (RFC 2045 6.7), streaming.

    Fed LF-terminated content in arbitrary chunks; yields converted chunks.  A
    leaf part with Content-Transfer-Encoding 8bit/binary gets its body QP-encoded
    and that header replaced by "Content-Transfer-Encoding: quoted-printable" at
    the end of the part's headers (where Postfix puts it); a multipart or
    message part that claims 8bit/binary is relabelled 7bit.  Nesting follows
    mime_nesting_limit.
    """

    def __init__(self, nesting_limit: int = 100) -> None:
        self.nesting_limit = nesting_limit
        self.boundaries: list[bytes] = []     # open multipart boundaries, innermost last
        self.in_headers = True
        self.headers: list[bytes] = []        # logical header lines of the entity being read
        self.header_bytes = 0
        self.default_type = b"text"
        self.encode_body = False
        self.rest = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.rest + chunk
        lines = data.split(b"\n")
        self.rest = lines.pop()
        return b"".join(self._line(line) for line in lines)

    def close(self) -> bytes:
        out = self._line(self.rest, last=True) if self.rest else b""
        self.rest = b""
        if self.in_headers and self.headers:
            out += self._flush_headers()
        return out

    def _line(self, line: bytes, last: bool = False) -> bytes:
        nl = b"" if last else b"\n"
        if self.in_headers:
            if line in (b"", b"\r"):
                return self._flush_headers() + line + nl
            if line[:1] in (b" ", b"\t") and self.headers:
                self.headers[-1] += b"\n" + line
            else:
                self.headers.append(line)
            self.header_bytes += len(line)
            if self.header_bytes > MIME_HEADER_LIMIT:
                # Give up analysing this entity: pass it through unchanged.
                out = b"\n".join(self.headers) + b"\n"
                self.headers, self.in_headers, self.encode_body = [], False, False
                return out
            return b""
        if line.startswith(b"--") and self.boundaries:
            stripped = line.rstrip(b" \t\r")
            for depth in range(len(self.boundaries) - 1, -1, -1):
                b = self.boundaries[depth]
                if stripped == b"--" + b:
                    del self.boundaries[depth + 1:]
                    self._start_entity(b"text")
                    return line + nl
                if stripped == b"--" + b + b"--":
                    del self.boundaries[depth:]
                    self.encode_body = False
                    return line + nl
        if self.encode_body:
            return _qp_line(line.rstrip(b"\r")) + nl
        return line + nl

    def _start_entity(self, default_type: bytes) -> None:
        self.in_headers, self.headers, self.header_bytes = True, [], 0
        self.default_type, self.encode_body = default_type, False

    def _flush_headers(self) -> bytes:
        ctype, boundary, cte = self.default_type, None, None
        for h in self.headers:
            m = _CT_RE.match(h)
            if m:
                ctype = m.group(1).lower()
                bm = _BOUNDARY_RE.search(h)
                if bm:
                    boundary = bm.group(1) or bm.group(2)
            m = _CTE_RE.match(h)
            if m:
                cte = m.group(1).lower()
        eight = cte in (b"8bit", b"binary")
        composite = ctype in (b"multipart", b"message")
        out = []
        for h in self.headers:
            if eight and _CTE_RE.match(h):
                if composite:
                    out.append(b"Content-Transfer-Encoding: 7bit")
                continue
            out.append(h)
        if eight and not composite:
            out.append(b"Content-Transfer-Encoding: quoted-printable")
        self.headers, self.in_headers = [], False
        self.encode_body = eight and not composite
        nested = len(self.boundaries)
        if ctype == b"multipart" and boundary and nested < self.nesting_limit:
            self.boundaries.append(boundary)
        elif ctype == b"message" and nested < self.nesting_limit and not self.boundaries:
            # message/rfc822 at this level: its body is a whole message (RFC 2046 5.2.1).
            self._start_entity(b"text")
        return b"".join(h + b"\n" for h in out)


def _qp_line(line: bytes) -> bytes:
    # RFC 2045 6.7: encode, then soft-break at 76 columns.
    return binascii.b2a_qp(line, quotetabs=False, istext=True).replace(b"\r", b"")


def _orig_orcpt(rcpt) -> str | None:
    orig = getattr(rcpt, "orig", None)
    return f"rfc822;{quote_address(orig)}" if orig else None


def _dsn_of(reply: Reply) -> str:
    # Postfix synthesises X.0.0 when the server gives no enhanced status code.
    return reply.enhanced or f"{reply.code // 100}.0.0"


def _one_line(reply: Reply) -> str:
    return str(reply)


def _soft(dsn: str) -> str:
    return "4" + dsn[1:] if dsn.startswith("5") else dsn


class _SessionFailure(Exception):
    """The session with one server failed; try the next one (site failure)."""

    def __init__(self, dsn: str, reason: str, *, permanent: bool = False,
                 relay: str = "none") -> None:
        super().__init__(reason)
        self.dsn, self.reason, self.permanent, self.relay = dsn, reason, permanent, relay
        self.before_mail = False
        self.conn_setup_done: float | None = None


class _Connection:
    """One TCP connection and its engine."""

    def __init__(self, target: Target, reader, writer, engine: SmtpClient, created: float) -> None:
        self.target = target
        self.reader, self.writer = reader, writer
        self.engine = engine
        self.created = created
        self.uses = 0
        self.idle_handle: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def namaddr(self) -> str:
        return self.target.namaddr

    async def flush(self, timeout: float) -> None:
        data = self.engine.data_to_send()
        if data:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), timeout)

    async def next_event(self, timeout: float):
        while True:
            ev = self.engine.next_event()
            if ev is not NEED_DATA:
                return ev
            # Replies can make the engine queue commands (HELO fallback, RSET...).
            await self.flush(timeout)
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            self.engine.receive_data(data)

    def abort(self) -> None:
        self.closed = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        try:
            self.writer.close()
        except Exception:
            pass

    async def quit(self, timeout: float) -> None:
        if self.closed:
            return
        try:
            self.engine.quit()
            await self.flush(timeout)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            self.abort()


@dataclass
class _Settings:
    helo_name: str
    port: int
    connect_timeout: float
    helo_timeout: float
    mail_timeout: float
    rcpt_timeout: float
    data_init_timeout: float
    data_xfer_timeout: float
    data_done_timeout: float
    rset_timeout: float
    quit_timeout: float
    mx_address_limit: int
    mx_session_limit: int
    never_send_ehlo: bool
    skip_5xx_greeting: bool
    skip_quit_response: bool
    line_length_limit: int
    quote_envelope: bool
    use_chunking: bool
    cache_on_demand: bool
    cache_destinations: list[str]
    cache_time_limit: float
    reuse_time_limit: float
    reuse_count_limit: int
    families: tuple[str, ...]
    address_preference: str
    dns_enabled: bool
    native_hosts: bool
    myhostname: str
    disable_mime_output_conversion: bool
    discard_ehlo_keywords: frozenset[str]

    @classmethod
    def from_config(cls, cfg, prefix: str = "smtp") -> "_Settings":
        def g(name):
            return cfg.get(f"{prefix}_{name}")

        def t(name):
            return cfg.get_time(f"{prefix}_{name}")

        def b(name):
            return cfg.get_bool(f"{prefix}_{name}")

        def i(name):
            v = g(name).strip()
            return int(v) if v.isdigit() else 0

        port_text = g("tcp_port") or "smtp"
        if port_text.isdigit():
            port = int(port_text)
        else:
            try:
                port = socket.getservbyname(port_text, "tcp")
            except OSError:
                port = 25
        return cls(
            helo_name=g("helo_name") or cfg.get("myhostname") or socket.getfqdn(),
            port=port,
            connect_timeout=t("connect_timeout"), helo_timeout=t("helo_timeout"),
            mail_timeout=t("mail_timeout"), rcpt_timeout=t("rcpt_timeout"),
            data_init_timeout=t("data_init_timeout"), data_xfer_timeout=t("data_xfer_timeout"),
            data_done_timeout=t("data_done_timeout"), rset_timeout=t("rset_timeout"),
            quit_timeout=t("quit_timeout"),
            mx_address_limit=i("mx_address_limit"), mx_session_limit=i("mx_session_limit"),
            never_send_ehlo=b("never_send_ehlo"), skip_5xx_greeting=b("skip_5xx_greeting"),
            skip_quit_response=b("skip_quit_response"),
            line_length_limit=i("line_length_limit"),
            quote_envelope=b("quote_rfc821_envelope"),
            use_chunking=cfg.get_bool("postwell_smtp_use_chunking"),
            cache_on_demand=b("connection_cache_on_demand"),
            cache_destinations=cfg.get_list(f"{prefix}_connection_cache_destinations"),
            cache_time_limit=t("connection_cache_time_limit"),
            reuse_time_limit=t("connection_reuse_time_limit"),
            reuse_count_limit=i("connection_reuse_count_limit"),
            families=families_from_inet_protocols(cfg.get("inet_protocols")),
            address_preference=(g("address_preference") or "any").lower(),
            dns_enabled=not cfg.get_bool("disable_dns_lookups")
            and (g("dns_support_level") or "").lower() != "disabled",
            native_hosts=(cfg.get_bool("disable_dns_lookups")
                          or (g("dns_support_level") or "").lower() == "disabled"
                          or [w.lower() for w in cfg.get_list(f"{prefix}_host_lookup")][:1]
                          == ["native"]),
            myhostname=cfg.get("myhostname"),
            disable_mime_output_conversion=cfg.get_bool("disable_mime_output_conversion"),
            discard_ehlo_keywords=frozenset(w.upper() for w in
                                            cfg.get_list(f"{prefix}_discard_ehlo_keywords")),
        )


class SmtpDeliveryAgent(DeliveryAgent):
    """The smtp(8) delivery agent (also serves the "relay" transport)."""

    name = "smtp"

    def __init__(self, config, resolver=None, log=None, *, clock=time.time,
                 monotonic=time.monotonic, rng: random.Random | None = None,
                 own_addresses: frozenset[str] | None = None) -> None:
        self.config = config
        self.log = log
        self.clock = clock
        self.monotonic = monotonic
        self.settings = _Settings.from_config(config)
        self.resolver = resolver if resolver is not None else DnsPythonResolver.from_config(config)
        self.rng = rng or random.Random()
        self._own = own_addresses
        self._native = NativeResolver()
        self._tasks: set[asyncio.Task] = set()
        # destination key -> idle connections (LIFO)
        self._cache: dict[str, list[_Connection]] = {}

    # ------------------------------------------------------------ helpers

    @property
    def own_addresses(self) -> frozenset[str]:
        if self._own is None:
            self._own = own_addresses_from_config(self.config)
        return self._own

    def _info(self, text: str) -> None:
        if self.log is not None:
            self.log.info(text)

    def _warning(self, text: str) -> None:
        if self.log is not None:
            self.log.warning(text)

    def _timeout_for(self, state: State) -> float:
        s = self.settings
        return {
            State.GREETING: s.helo_timeout, State.HELLO: s.helo_timeout, State.HELO: s.helo_timeout,
            State.MAIL: s.mail_timeout, State.RCPT: s.rcpt_timeout, State.DATA: s.data_init_timeout,
            State.CONTENT: s.data_xfer_timeout, State.DONE: s.data_done_timeout,
            State.RSET: s.rset_timeout, State.QUIT: s.quit_timeout,
        }.get(state, s.helo_timeout) or 300.0

    @staticmethod
    def _envelope(request) -> Envelope:
        attrs = getattr(request, "attributes", None) or {}
        rcpts = tuple(Recipient(getattr(r, "nexthop_recipient", None) or r.address,
                                getattr(r, "notify", None),
                                getattr(r, "orcpt", None) or _orig_orcpt(r))
                      for r in request.recipients)
        body = attrs.get("body") or attrs.get("body_type")
        return Envelope(
            sender=request.sender, recipients=rcpts,
            size=getattr(request, "content_size", None) or 0,
            body_type=body.upper() if body else None,
            smtputf8=str(attrs.get("smtputf8", "")).lower() in ("1", "yes", "true"),
            ret=attrs.get("ret") or None, envid=attrs.get("envid") or None)

    @staticmethod
    def _content_chunks(request):
        opener = getattr(request, "open_content", None)
        if opener is not None:
            return opener()
        return request.iter_content()

    # ------------------------------------------------------------ cache

    def _cache_key(self, request) -> str:
        return f"{getattr(request, 'transport', 'smtp')}:{request.nexthop}".lower()

    def _caching_wanted(self, request) -> bool:
        s = self.settings
        return s.cache_on_demand or request.nexthop in s.cache_destinations

    def _take_cached(self, key: str) -> _Connection | None:
        conns = self._cache.get(key)
        while conns:
            conn = conns.pop()
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            if conn.closed or conn.reader.at_eof() or not conn.engine.usable:
                conn.abort()
                continue
            return conn
        return None

    def _reusable(self, conn: _Connection) -> bool:
        s = self.settings
        if conn.closed or not conn.engine.usable:
            return False
        if s.reuse_time_limit and self.monotonic() - conn.created >= s.reuse_time_limit:
            return False
        # "With a reuse count limit of N, a connection is used up to N+1 times."
        if s.reuse_count_limit and conn.uses > s.reuse_count_limit:
            return False
        return True

    def _put_cached(self, key: str, conn: _Connection) -> None:
        self._cache.setdefault(key, []).append(conn)
        loop = asyncio.get_running_loop()

        def expire():
            conns = self._cache.get(key, [])
            if conn in conns:
                conns.remove(conn)
            conn.idle_handle = None
            self._background(conn.quit(self.settings.quit_timeout))

        conn.idle_handle = loop.call_later(max(self.settings.cache_time_limit, 0.0), expire)

    def _background(self, coro) -> None:
        # Keep a reference: the loop holds tasks only weakly.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_all(self) -> None:
        """QUIT every cached connection (qmgr shutdown)."""
        conns = [c for cs in self._cache.values() for c in cs]
        self._cache.clear()
        for c in conns:
            await c.quit(self.settings.quit_timeout)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.quit_timeout or 1)

    def close(self) -> None:
        for cs in self._cache.values():
            for c in cs:
                c.abort()
        self._cache.clear()

    # ------------------------------------------------------------ delivery

    async def deliver(self, request) -> list[RecipientResult]:
        recipients = list(request.recipients)
        if not recipients:
            return []
        results: dict[int, RecipientResult] = {}
        pending = list(range(len(recipients)))
        key = self._cache_key(request)
        last: _SessionFailure | None = None

        def left() -> list[int]:
            return [i for i in pending if i not in results]

        # 1. A cached connection to the same destination first.
        conn = self._take_cached(key)
        if conn is not None:
            try:
                soft = await self._transaction(conn, request, recipients, pending, results,
                                               final=False)
            except _SessionFailure as f:
                conn.abort()
                if not f.before_mail:
                    last = f
            else:
                last = soft or last
                self._finish_connection(key, request, conn)
            pending = left()
            if not pending:
                return [results[i] for i in range(len(recipients))]

        # 2. Fresh connections along the MX list (RFC 5321 5.1).
        try:
            targets = await resolve_destination(
                self.resolver, request.nexthop, rng=self.rng, families=self.settings.families,
                own_addresses=self.own_addresses, address_limit=self.settings.mx_address_limit,
                address_preference=self.settings.address_preference,
                default_port=self.settings.port, dns_enabled=self.settings.dns_enabled,
                address_resolver=self._native if self.settings.native_hosts else None)
        except DestinationError as e:
            status = "bounced" if e.permanent else "deferred"
            for i in pending:
                results[i] = RecipientResult(recipients[i], status, e.dsn, e.reason, "none")
            return [results[i] for i in range(len(recipients))]

        session_limit = self.settings.mx_session_limit
        sessions = 0
        for n, target in enumerate(targets):
            last_target = n == len(targets) - 1
            try:
                conn = await self._connect(target)
            except _SessionFailure as f:
                last = f
                if not last_target:
                    self._info(f.reason)
                continue
            try:
                await self._handshake(conn, best=target.best,
                                      nexthop=parse_nexthop(request.nexthop).host)
                sessions += 1
                final = last_target or bool(session_limit and sessions >= session_limit)
                soft = await self._transaction(conn, request, recipients, pending, results,
                                               final=final)
            except _SessionFailure as f:
                last = f
                if not conn.closed:
                    await conn.quit(self.settings.quit_timeout)
                conn.abort()
                pending = left()
                if f.permanent:
                    for i in pending:
                        results[i] = RecipientResult(recipients[i], "bounced", f.dsn, f.reason,
                                                     f.relay)
                    pending = []
                    break
                if not last_target and pending:
                    self._info(f.reason)
                if session_limit and sessions >= session_limit:
                    break
                continue
            last = soft or last
            self._finish_connection(key, request, conn)
            pending = left()
            if not pending or final:
                break

        for i in left():
            if last is None:
                last = _SessionFailure("4.4.1", "delivery temporarily suspended: no server to try")
            results[i] = RecipientResult(recipients[i], "deferred", _soft(last.dsn), last.reason,
                                         last.relay)
            if last.conn_setup_done is not None:
                results[i].conn_setup_done = last.conn_setup_done
        return [results[i] for i in range(len(recipients))]

    def _finish_connection(self, key: str, request, conn: _Connection) -> None:
        if self._caching_wanted(request) and self._reusable(conn):
            self._put_cached(key, conn)
        else:
            self._background(conn.quit(self.settings.quit_timeout))

    async def _connect(self, target: Target) -> _Connection:
        s = self.settings
        where = f"connect to {target.namaddr}:{target.port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(target.ip, target.port, limit=1 << 16), s.connect_timeout)
        except asyncio.TimeoutError:
            raise _SessionFailure("4.4.1", f"{where}: Connection timed out") from None
        except OSError as e:
            # No session yet: Postfix logs relay=none for connect failures.
            text = os.strerror(e.errno) if e.errno else str(e)
            raise _SessionFailure("4.4.1", f"{where}: {text}") from None
        engine = SmtpClient(s.helo_name, never_send_ehlo=s.never_send_ehlo,
                            use_chunking=s.use_chunking, line_length_limit=s.line_length_limit,
                            quote_envelope=s.quote_envelope, skip_quit_response=s.skip_quit_response,
                            discard_ehlo_keywords=s.discard_ehlo_keywords)
        return _Connection(target, reader, writer, engine, self.monotonic())

    @staticmethod
    def _fail(dsn: str, reason: str, target: Target, **kw) -> _SessionFailure:
        return _SessionFailure(dsn, reason, relay=target.relay, **kw)

    async def _event(self, conn: _Connection):
        """Next engine event, with the stage's timeout; I/O trouble becomes a site failure."""
        state = conn.engine.state
        try:
            await conn.flush(self._timeout_for(state))
            ev = await conn.next_event(self._timeout_for(conn.engine.state))
        except asyncio.TimeoutError:
            conn.abort()
            raise self._fail("4.4.2", f"conversation with {conn.namaddr} timed out while "
                             f"{conn.engine.stage}", conn.target) from None
        except OSError:
            conn.abort()
            raise self._fail("4.4.2", f"lost connection with {conn.namaddr} while "
                             f"{conn.engine.stage}", conn.target) from None
        if isinstance(ev, ConnectionClosed):
            conn.abort()
            raise self._fail("4.4.2", f"lost connection with {conn.namaddr} while {ev.stage}",
                             conn.target)
        if isinstance(ev, ProtocolError):
            conn.abort()
            self._warning(f"{conn.namaddr}: {ev.detail}")
            raise self._fail("4.5.0", f"conversation with {conn.namaddr} failed while {ev.stage}: "
                             "malformed server reply", conn.target)
        return ev

    async def _handshake(self, conn: _Connection, best: bool, nexthop: str) -> None:
        s = self.settings
        # Postfix detects loops only on the SMTP port (smtp_connect.c).
        loop_detect = conn.target.port == 25
        while True:
            ev = await self._event(conn)
            if isinstance(ev, Greeting):
                first = ev.reply.text.split("\n")[0].split(" ", 1)[0]
                if ev.reply.code == 220 and loop_detect and self._is_myself(first):
                    self._warning(f"host {conn.target.relay} greeted me with my own hostname "
                                  f"{s.myhostname}")
                continue
            if isinstance(ev, Rejected):
                dsn = _dsn_of(ev.reply)
                reason = f"host {conn.namaddr} refused to talk to me: {_one_line(ev.reply)}"
                permanent = ev.reply.code // 100 == 5 and not (
                    ev.stage == "greeting" and s.skip_5xx_greeting)
                raise self._fail(dsn if permanent else _soft(dsn), reason, conn.target,
                                 permanent=permanent)
            if isinstance(ev, HelloDone):
                first = ev.reply.text.split("\n")[0].split(" ", 1)[0]
                if loop_detect and self._is_myself(first):
                    self._warning(f"host {conn.target.relay} replied to HELO/EHLO with my own "
                                  f"hostname {s.myhostname}")
                    raise self._loop(conn, best, nexthop)
                return

    def _is_myself(self, name: str) -> bool:
        return bool(name) and name.lower() == (self.settings.myhostname or "").lower()

    def _loop(self, conn: _Connection, best: bool, nexthop: str) -> _SessionFailure:
        # Postfix bounces when the looping host is the best MX, else defers.
        dsn = "5.4.6" if best else "4.4.6"
        return self._fail(dsn, f"mail for {nexthop} loops back to myself", conn.target,
                          permanent=best)

    async def _transaction(self, conn: _Connection, request, recipients, pending: list[int],
                           results: dict[int, RecipientResult], *,
                           final: bool) -> "_SessionFailure | None":
        """One MAIL transaction for the ``pending`` recipients.

        Final answers go into ``results``; a recipient with a soft (4xx) answer on a
        non-final server stays out of ``results`` (RFC 5321 5.1: the next MX host may
        take it) and the last such answer is returned.  I/O trouble raises
        :class:`_SessionFailure` (``before_mail`` set when nothing was committed yet).
        """
        full = self._envelope(request)
        envelope = Envelope(full.sender, tuple(full.recipients[i] for i in pending), full.size,
                            full.body_type, full.smtputf8, full.ret, full.envid)
        ext = conn.engine.extensions
        relay = conn.target.relay
        conn.uses += 1
        conn_use = conn.uses if conn.uses > 1 else None
        setup_done = self.clock()
        soft: _SessionFailure | None = None

        def result(i, status, dsn, reason):
            r = RecipientResult(recipients[i], status, dsn, reason, relay)
            r.conn_setup_done = setup_done
            if conn_use:
                r.conn_use = conn_use
            results[i] = r

        # Checks before MAIL FROM that fail the message, not the server.
        if ext.size and envelope.size and envelope.size > ext.size:
            for i in pending:        # RFC 1870 6.1
                result(i, "bounced", "5.3.4", f"message size {envelope.size} exceeds size limit "
                       f"{ext.size} of server {conn.namaddr}")
            return None
        if needs_smtputf8(envelope) and not ext.smtputf8:
            for i in pending:        # RFC 6531 3.2
                result(i, "bounced", "5.6.7", "SMTPUTF8 is required, but was not offered by host "
                       f"{conn.namaddr}")
            return None
        downgrade = eight_bit_action(envelope.body_type, ext.eightbitmime,
                                     self.settings.disable_mime_output_conversion) == "convert"

        conn.engine.start_transaction(envelope)
        accepted: list[int] = []
        got_mail = False

        def said(reply: Reply, command: str) -> str:
            return f"host {conn.namaddr} said: {_one_line(reply)} (in reply to {command} command)"

        def refuse(i, reply: Reply, command: str):
            nonlocal soft
            if reply.code // 100 == 5:
                result(i, "bounced", _dsn_of(reply), said(reply, command))
            elif final:
                result(i, "deferred", _dsn_of(reply), said(reply, command))
            else:
                soft = self._fail(_dsn_of(reply), said(reply, command), conn.target)
                soft.conn_setup_done = setup_done

        try:
            while True:
                ev = await self._event(conn)
                if isinstance(ev, MailReply):
                    got_mail = True
                elif isinstance(ev, RcptReply):
                    i = pending[ev.index]
                    if ev.reply.code // 100 == 2:
                        accepted.append(i)
                    else:
                        refuse(i, ev.reply, ev.command)
                elif isinstance(ev, TransactionFailed) and ev.closing:
                    for i in pending:
                        if i not in results:
                            refuse(i, ev.reply, ev.command)
                    conn.abort()
                    return soft
                elif isinstance(ev, TransactionFailed):
                    if ev.command != "RCPT TO":
                        for i in (accepted if ev.command == "DATA" else pending):
                            if i not in results:
                                refuse(i, ev.reply, ev.command)
                    # The engine sent RSET; its reply keeps the connection reusable.
                    try:
                        await self._event(conn)
                    except _SessionFailure:
                        conn.abort()
                    return soft
                elif isinstance(ev, ContentWanted):
                    await self._send_content(conn, request, downgrade)
                elif isinstance(ev, MessageDone):
                    for i in accepted:
                        if ev.reply.code // 100 == 2:
                            result(i, "sent", _dsn_of(ev.reply), _one_line(ev.reply))
                        else:
                            refuse(i, ev.reply, ev.command)
                    return soft
        except _SessionFailure as f:
            f.before_mail = not got_mail
            f.conn_setup_done = setup_done
            raise

    async def _send_content(self, conn: _Connection, request, downgrade: bool = False) -> None:
        timeout = self.settings.data_xfer_timeout or 180.0
        mime = MimeDowngrade(self.config.get_int("mime_nesting_limit") or 100) if downgrade else None
        try:
            for chunk in self._content_chunks(request):
                conn.engine.send_content(mime.feed(chunk) if mime else chunk)
                await conn.flush(timeout)
            if mime:
                conn.engine.send_content(mime.close())
            conn.engine.end_content()
            await conn.flush(timeout)
        except asyncio.TimeoutError:
            conn.abort()
            raise self._fail("4.4.2", f"conversation with {conn.namaddr} timed out while "
                             "sending message body", conn.target) from None
        except OSError:
            conn.abort()
            raise self._fail("4.4.2", f"lost connection with {conn.namaddr} while "
                             "sending message body", conn.target) from None
