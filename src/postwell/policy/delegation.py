"""check_policy_service: SMTP access policy delegation, as Postfix 3.7's smtpd does it.

The smtpd sends a policy server one request per check (``name=value`` lines and an empty
line) and reads back ``action=...`` plus an empty line; the action is applied exactly like
an access(5) table result (the engine's ``table_result``).  Everything observable was
checked against a real Postfix 3.7.11 with a recording policy server:

- the attributes, their order and form (``REQUEST_ORDER``); no caching, not even of an
  identical request in the same restriction list;
- connection reuse across sessions (one client per service and smtpd worker), closing after
  ``max_idle`` idle / ``max_ttl`` of life / ``request_limit`` requests;
- failures: each try that fails is followed by ``retry_delay`` and another try, up to
  ``try_limit``; then ``default_action`` applies.  The warnings are Postfix's
  (``connect to X: ...``, ``missing attribute action in input from X``, ``timeout on X while
  reading input attribute name``, ``problem talking to server X: ...``), logged at the same
  moments (an end-of-file or missing attribute is only "problem talking" on the last try).

Unlike Postfix, whose limit is per read, ``timeout`` bounds the whole reply, and the reply is
capped (line length, attribute count), so a trickling or hostile server costs one session at
most ``timeout`` and bounded memory; the I/O is asyncio, so other sessions go on meanwhile.

What the SessionState does not carry yet is taken from optional attributes the smtpd may
set: ``instance`` (else derived here, per transaction), ``act_size`` (the received size at
END-OF-MESSAGE), ``etrn_domain``, and ``policy_protocol_state`` (e.g. "VRFY" while the RCPT
checks run for a VRFY command).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
import weakref
from collections import deque
from dataclasses import dataclass

from .restrictions import parse_restrictions

# Postfix 3.7.11's request, in its order (Postfix 3.8 appends compatibility_level and
# mail_version; 3.7 does not send them).
REQUEST_ORDER = (
    "request", "protocol_state", "protocol_name", "client_address", "client_name",
    "client_port", "reverse_client_name", "server_address", "server_port", "helo_name",
    "sender", "recipient", "recipient_count", "queue_id", "instance", "size", "etrn_domain",
    "stress", "sasl_method", "sasl_username", "sasl_sender", "ccert_subject", "ccert_issuer",
    "ccert_fingerprint", "ccert_pubkey_fingerprint", "encryption_protocol",
    "encryption_cipher", "encryption_keysize", "policy_context",
)

MAX_REPLY_LINE = 16384        # bytes in one reply line (a long REJECT text still fits)
MAX_REPLY_ATTRIBUTES = 64     # name=value lines in one reply
MAX_IDLE_CONNECTIONS = 32     # idle connections kept per service and worker
# Requests in flight per service and worker: Postfix has one per smtpd process (so at most
# maxproc); a postwell worker serves many sessions, and must not flood the policy server.
MAX_BUSY_CONNECTIONS = 100
BUILTIN_DEFAULT_ACTION = "451 4.3.5 Server configuration problem"

_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIME_OPTIONS = ("timeout", "max_idle", "max_ttl", "retry_delay")
_INT_OPTIONS = ("request_limit", "try_limit")
_STR_OPTIONS = ("default_action", "policy_context")
# Errors Postfix does not report until the last try: a server that went away between
# requests is normal (it restarted, or closed an idle connection).
_QUIET_ERRORS = (0, errno.EPIPE, errno.ENOENT, errno.ECONNRESET)


class PolicySpecError(ValueError):
    """A check_policy_service argument Postfix's smtpd would refuse to start with."""


@dataclass
class ServiceSettings:
    spec: str                  # the restriction argument as written
    kind: str                  # "inet" or "unix"
    name: str                  # the endpoint as Postfix logs it: host:port or the path
    host: str = ""
    port: int = 0
    path: str = ""             # unix: absolute (relative names are under queue_directory)
    timeout: float = 100.0
    max_idle: float = 300.0
    max_ttl: float = 1000.0
    request_limit: int = 0
    try_limit: int = 2
    retry_delay: float = 1.0
    default_action: str = BUILTIN_DEFAULT_ACTION
    policy_context: str = ""


def _parse_time(name: str, value: str) -> float:
    v = value.strip().lower()
    unit = 1
    if v and v[-1] in _TIME_UNITS:
        unit, v = _TIME_UNITS[v[-1]], v[:-1]
    if not v.isdigit() or int(v) <= 0:
        raise PolicySpecError(f"invalid {name} value: \"{value}\"")
    return float(int(v) * unit)


def _parse_int(name: str, value: str, minimum: int) -> int:
    v = value.strip()
    if not v.isdigit() or int(v) < minimum:
        raise PolicySpecError(f"invalid {name} value: \"{value}\"")
    return int(v)


def parse_service(spec: str, config) -> ServiceSettings:
    """``inet:host:port``, ``unix:path`` or ``{ endpoint, name=value, { name = value } }``."""
    g = config.get

    def cfg_time(name: str, default: float) -> float:
        try:
            return _parse_time(name, g(name) or "")
        except PolicySpecError:
            return default

    def cfg_int(name: str, default: int, minimum: int) -> int:
        try:
            return _parse_int(name, g(name) or "", minimum)
        except PolicySpecError:
            return default

    values: dict[str, object] = {
        "timeout": cfg_time("smtpd_policy_service_timeout", 100.0),
        "max_idle": cfg_time("smtpd_policy_service_max_idle", 300.0),
        "max_ttl": cfg_time("smtpd_policy_service_max_ttl", 1000.0),
        "retry_delay": cfg_time("smtpd_policy_service_retry_delay", 1.0),
        "request_limit": cfg_int("smtpd_policy_service_request_limit", 0, 0),
        "try_limit": cfg_int("smtpd_policy_service_try_limit", 2, 1),
        "default_action": (g("smtpd_policy_service_default_action") or BUILTIN_DEFAULT_ACTION).strip(),
        "policy_context": g("smtpd_policy_service_policy_context") or "",
    }
    endpoint = spec.strip()
    if endpoint.startswith("{"):
        if not endpoint.endswith("}"):
            raise PolicySpecError(f"policy service syntax error: missing '}}' in \"{spec}\"")
        parts = parse_restrictions(endpoint[1:-1])   # Postfix's mystrtokq: { } stay whole
        if not parts:
            raise PolicySpecError(f"empty policy service: \"{spec}\"")
        endpoint = parts[0]
        for option in parts[1:]:
            if option.startswith("{"):
                inner = option[1:-1] if option.endswith("}") else option[1:]
                key, eq, value = inner.partition("=")
                key, value = key.strip(), value.strip()
            else:
                key, eq, value = option.partition("=")
            if not eq:
                raise PolicySpecError(f"malformed option: missing '=' after attribute name: \"{option}\"")
            if key in _TIME_OPTIONS:
                values[key] = _parse_time(key, value)
            elif key in _INT_OPTIONS:
                values[key] = _parse_int(key, value, 1 if key == "try_limit" else 0)
            elif key in _STR_OPTIONS:
                values[key] = value
            else:
                raise PolicySpecError(f"unknown attribute name: \"{key}\"")
    kind, colon, rest = endpoint.partition(":")
    kind = kind.lower()
    if not colon or not rest:
        raise PolicySpecError(f"need transport:server, not \"{endpoint}\"")
    if kind == "inet":
        host, colon, port_s = rest.rpartition(":")
        if not colon or not port_s:
            raise PolicySpecError(f"missing port in \"{rest}\"")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_s) if port_s.isdigit() else socket.getservbyname(port_s, "tcp")
        except OSError:
            raise PolicySpecError(f"unknown service: {port_s}/tcp") from None
        if not 0 < port < 65536:
            raise PolicySpecError(f"bad port number: {port_s}")
        return ServiceSettings(spec, "inet", rest, host=host or "localhost", port=port, **values)
    if kind in ("unix", "local"):
        # Postfix daemons run in the queue directory: relative names are under it.
        path = rest if rest.startswith("/") else os.path.join(g("queue_directory") or ".", rest)
        return ServiceSettings(spec, "unix", rest, path=path, **values)
    raise PolicySpecError(f"unsupported transport type: {kind}")


class _TryFailed(Exception):
    def __init__(self, err: int):
        super().__init__(err)
        self.err = err


class _Conn:
    __slots__ = ("reader", "writer", "loop", "created", "last_used", "requests", "expiry")

    def __init__(self, reader, writer, loop, now: float):
        self.reader, self.writer, self.loop = reader, writer, loop
        self.created = self.last_used = now
        self.requests = 0
        self.expiry = None

    def close(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - its loop may be gone (tests run many loops)
            pass


def _strerror(err: int) -> str:
    # Postfix prints errno 0 as "Application error" (a protocol problem, not a system one).
    return os.strerror(err) if err else "Application error"


class PolicyClient:
    """One policy service endpoint, shared by the sessions of one smtpd worker."""

    def __init__(self, settings: ServiceSettings, log, *, clock=time.monotonic, sleep=None):
        self.settings = settings
        self.log = log
        self.clock = clock
        self.sleep = sleep or asyncio.sleep
        self._idle: list[_Conn] = []
        self._loop = None
        self._busy = 0
        self._waiters: deque = deque()

    # -- connections ------------------------------------------------------------
    async def _take_slot(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:    # futures belong to one loop (tests run many)
            self._loop, self._busy, self._waiters = loop, 0, deque()
        deadline = self.clock() + self.settings.timeout
        while self._busy >= MAX_BUSY_CONNECTIONS:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - self.clock()))
            except asyncio.TimeoutError:
                raise _TryFailed(errno.ETIMEDOUT) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._busy += 1

    def _give_slot(self) -> None:
        self._busy = max(0, self._busy - 1)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _usable(self, conn: _Conn, loop, now: float) -> bool:
        s = self.settings
        return (conn.loop is loop and not conn.loop.is_closed()
                and not conn.reader.at_eof() and not conn.writer.is_closing()
                and now - conn.last_used < s.max_idle and now - conn.created < s.max_ttl)

    async def _acquire(self) -> _Conn:
        loop = asyncio.get_running_loop()
        now = self.clock()
        while self._idle:
            conn = self._idle.pop()
            if conn.expiry is not None:
                conn.expiry.cancel()
                conn.expiry = None
            if self._usable(conn, loop, now):
                return conn
            conn.close()
        s = self.settings
        try:
            if s.kind == "inet":
                opener = asyncio.open_connection(s.host, s.port)
            else:
                opener = asyncio.open_unix_connection(s.path)
            reader, writer = await asyncio.wait_for(opener, s.timeout)
        except asyncio.TimeoutError:
            self.log.warning(f"connect to {s.name}: {os.strerror(errno.ETIMEDOUT)}")
            raise _TryFailed(errno.ETIMEDOUT) from None
        except OSError as exc:
            err = exc.errno or errno.ECONNREFUSED
            if isinstance(exc, socket.gaierror):
                err = errno.EHOSTUNREACH
            self.log.warning(f"connect to {s.name}: {os.strerror(err)}")
            raise _TryFailed(err) from None
        return _Conn(reader, writer, loop, self.clock())

    def _release(self, conn: _Conn, reusable: bool) -> None:
        s = self.settings
        conn.requests += 1
        conn.last_used = self.clock()
        if (not reusable or (s.request_limit and conn.requests >= s.request_limit)
                or len(self._idle) >= MAX_IDLE_CONNECTIONS):
            conn.close()
            return
        # Don't hold the policy server's resources longer than max_idle.
        conn.expiry = conn.loop.call_later(s.max_idle, self._expire, conn)
        self._idle.append(conn)

    def _expire(self, conn: _Conn) -> None:
        conn.expiry = None
        if conn in self._idle:
            self._idle.remove(conn)
        conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    # -- one exchange -----------------------------------------------------------
    async def _exchange(self, conn: _Conn, payload: bytes) -> tuple[str, bool]:
        """Send the request, read the reply: (action, connection reusable)."""
        s = self.settings
        try:
            conn.writer.write(payload)
            await asyncio.wait_for(conn.writer.drain(), s.timeout)
        except asyncio.TimeoutError:
            raise _TryFailed(errno.ETIMEDOUT) from None
        except OSError as exc:
            raise _TryFailed(exc.errno or errno.EPIPE) from None
        deadline = self.clock() + s.timeout
        buf = bytearray()
        attrs: list[tuple[bytes, bytes]] = []
        while True:
            nl = buf.find(b"\n")
            while 0 <= nl <= MAX_REPLY_LINE:
                line = bytes(buf[:nl])
                del buf[:nl + 1]
                if not line:
                    return self._action(attrs), not buf
                if len(attrs) >= MAX_REPLY_ATTRIBUTES:
                    self.log.warning(f"too many attributes in input from {s.name}")
                    raise _TryFailed(0)
                name, eq, value = line.partition(b"=")
                if name == b"action" and not eq and not any(n == name for n, _ in attrs):
                    self.log.warning(f"missing value for string attribute action from {s.name}")
                    raise _TryFailed(0)
                # Postfix's strings end at a NUL byte.
                attrs.append((name, value.split(b"\0", 1)[0]))
                nl = buf.find(b"\n")
            if nl > MAX_REPLY_LINE or len(buf) > MAX_REPLY_LINE:
                self.log.warning(f"input attribute from {s.name} exceeds {MAX_REPLY_LINE} bytes")
                raise _TryFailed(0)
            what = "value" if b"=" in buf else "name"
            remaining = deadline - self.clock()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                chunk = await asyncio.wait_for(conn.reader.read(4096), remaining)
            except asyncio.TimeoutError:
                if attrs or buf:
                    self.log.warning(f"timeout on {s.name} while reading input attribute {what}")
                raise _TryFailed(errno.ETIMEDOUT) from None
            except OSError as exc:
                raise _TryFailed(exc.errno or errno.ECONNRESET) from None
            if not chunk:
                # A server that closes without a word is quiet until the last try (Postfix).
                if attrs or buf:
                    self.log.warning(f"premature end-of-input on {s.name} "
                                     f"while reading input attribute {what}")
                raise _TryFailed(0)
            buf += chunk

    def _action(self, attrs: list[tuple[bytes, bytes]]) -> str:
        for name, value in attrs:
            # The first action counts; other attributes are ignored (checked with 3.7).
            if name == b"action":
                return value.decode("utf-8", "surrogateescape")
        self.log.warning(f"missing attribute action in input from {self.settings.name}")
        raise _TryFailed(0)

    async def query(self, attributes: list[tuple[str, str]]) -> str | None:
        """The server's action, or None when every try failed (warnings logged)."""
        s = self.settings
        payload = encode_request(attributes)
        count = 0
        while True:
            count += 1
            conn = None
            slot = False
            try:
                await self._take_slot()
                slot = True
                conn = await self._acquire()
                action, reusable = await self._exchange(conn, payload)
                self._release(conn, reusable)
                conn = None
                return action
            except _TryFailed as failed:
                err = failed.err
            finally:
                # Also on cancellation (the SMTP session went away mid-request).
                if conn is not None:
                    conn.close()
                if slot:
                    self._give_slot()
            last = count >= s.try_limit
            if last or err not in _QUIET_ERRORS:
                self.log.warning(f"problem talking to server {s.name}: {_strerror(err)}")
            if last:
                return None
            await self.sleep(s.retry_delay)


def encode_request(attributes: list[tuple[str, str]]) -> bytes:
    """name=value lines and the empty line that ends the request."""
    out = bytearray()
    for name, value in attributes:
        # A newline in a value would let a client forge attributes of its own.
        value = value.replace("\n", " ")
        out += f"{name}={value}\n".encode("utf-8", "surrogateescape")
    out += b"\n"
    return bytes(out)


# -- the request ----------------------------------------------------------------

_AFTER_RCPT = ("DATA", "BDAT", "END-OF-MESSAGE")


def _instance(state) -> str:
    """Postfix's per-message ``instance`` (pid.seconds.microseconds.sequence, in hex): set
    once MAIL FROM is accepted and kept until the transaction ends, so a policy server can
    tie the RCPT, DATA and END-OF-MESSAGE requests of one message together."""
    given = getattr(state, "instance", None)
    if isinstance(given, str):
        return given
    if state.sender is None or state.where == "MAIL":
        return ""
    # The smtpd gives every transaction fresh side-effect lists (reset_transaction):
    # their identity tells one message from the next.
    marker = state.prepend
    saved = state.__dict__.get("_policy_instance")
    if saved is not None and saved[0] is marker:
        return saved[1]
    seqno = state.__dict__.get("_policy_seqno", 0)
    now = time.time()
    value = f"{os.getpid():x}.{int(now):x}.{int((now % 1) * 1e6):x}.{seqno:x}"
    state.__dict__["_policy_seqno"] = seqno + 1
    state.__dict__["_policy_instance"] = (marker, value)
    return value


def request_attributes(state, policy_context: str = "", stress: str = "") -> list[tuple[str, str]]:
    """The smtpd_access_policy request for this state, in Postfix 3.7's order and form."""
    from .smtpd_policy import policy_tls_attributes
    # The smtpd may name the stage itself where state.where says something else (VRFY runs
    # the RCPT checks with where = "RCPT"; Postfix sends protocol_state=VRFY).
    where = getattr(state, "policy_protocol_state", None) or state.where or ""
    # Postfix sets the protocol only after the HELO/EHLO checks pass: they see the old one.
    protocol = "SMTP" if where in ("HELO", "EHLO") else (state.protocol or "SMTP")
    size = getattr(state, "act_size", 0) or state.message_size or 0
    attrs = [
        ("request", "smtpd_access_policy"),
        ("protocol_state", "DATA" if where == "BDAT" else where),
        ("protocol_name", protocol),
        ("client_address", state.client_addr or ""),
        ("client_name", state.client_name or ""),
        ("client_port", str(state.client_port or "")),
        ("reverse_client_name", state.reverse_client_name or ""),
        ("server_address", state.server_addr or ""),
        ("server_port", str(state.server_port or "")),
        ("helo_name", state.helo_name or ""),
        ("sender", state.sender or ""),
        ("recipient", state.recipient or ""),
        ("recipient_count", str(state.recipient_count if where in _AFTER_RCPT else 0)),
        ("queue_id", state.queue_id or ""),
        ("instance", _instance(state)),
        ("size", str(size)),
        ("etrn_domain", getattr(state, "etrn_name", None) or ""),
        ("stress", stress),
        ("sasl_method", state.sasl_method or ""),
        ("sasl_username", state.sasl_username or ""),
        ("sasl_sender", state.sasl_sender or ""),
    ]
    attrs += policy_tls_attributes(state)
    attrs.append(("policy_context", policy_context))
    return attrs


# -- the restriction --------------------------------------------------------------

class PolicyClients:
    """The clients of one restriction engine (one smtpd worker), by restriction argument."""

    _by_engine: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, engine):
        self.engine = engine
        self.clients: dict[str, PolicyClient] = {}

    @classmethod
    def of(cls, engine) -> "PolicyClients":
        found = cls._by_engine.get(engine)
        if found is None:
            found = cls._by_engine[engine] = cls(engine)
        return found

    def get(self, spec: str) -> PolicyClient:
        client = self.clients.get(spec)
        if client is None:
            e = self.engine
            settings = parse_service(spec, e.config)
            client = PolicyClient(settings, e.log, sleep=getattr(e, "policy_sleep", None))
            self.clients[spec] = client
        return client

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


async def check_policy_service(e, c, spec: str) -> int:
    """The check_policy_service restriction (Postfix smtpd_check.c check_policy_service)."""
    state = c.state
    try:
        client = PolicyClients.of(e).get(spec)
    except PolicySpecError as exc:
        e.log.warning(f"check_policy_service {spec}: {exc}")
        e.server_error(state)
        raise  # not reached: server_error() leaves the restriction lists
    s = client.settings
    stress = e.config.get("stress") or ""
    action = await client.query(request_attributes(state, s.policy_context, stress))
    if action is not None:
        if action[:1] in (" ", "\t") and action.strip():
            # Postfix finds no command word in a value that starts with a blank, so the whole
            # value is a restriction list ("action= REJECT x": reject, x ignored; observed).
            from .restrictions import parse_restrictions
            words = [w if w.startswith("{") else w.lower() for w in parse_restrictions(action)]
            return await e.generic_checks(state, words, c.reply_name, c.reply_class, c.def_acl)
        return await e.table_result(c, spec, action, "policy query")
    # postconf(5): a check_policy_service that the default action itself invokes gets the
    # built-in default action, so a dead service cannot recurse through its own default.
    nested = state.__dict__.get("_policy_default_depth", 0)
    default = s.default_action if nested == 0 else BUILTIN_DEFAULT_ACTION
    state.__dict__["_policy_default_depth"] = nested + 1
    try:
        return await e.table_result(c, spec, default, "policy query")
    finally:
        state.__dict__["_policy_default_depth"] = nested
