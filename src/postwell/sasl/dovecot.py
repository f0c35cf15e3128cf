"""smtpd_sasl_type = dovecot: Dovecot's authentication protocol (version 1.2).

One connection per smtpd process to the auth-client socket
(smtpd_sasl_path; a relative path is relative to queue_directory, so
``private/auth`` as in Postfix's SASL_README), multiplexing concurrent AUTH
requests by id.  Dovecot runs the mechanisms and delays failures itself.

Handshake: we send ``VERSION 1 2`` and ``CPID <pid>``; the server sends
``VERSION``, one ``MECH <name> <flags...>`` per mechanism, ``SPID``, ``CUID``,
``COOKIE`` and ``DONE``.  Then ``AUTH <id> <mech> service=smtp nologin lip=
rip= [secured] [resp=<base64>]``, answered by ``CONT <id> <base64>``,
``OK <id> user=<name>`` or ``FAIL <id> [reason=...] [user=...] [temp]``.
Fields are TAB-separated; values escape TAB, LF and backslash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import os

from .base import (Challenge, DEFAULT_RESPONSE_LIMIT, Failure, RESPONSE_LIMIT_FAILURE,
                   SaslExchange, SaslServer, SaslStep, Success, apply_mechanism_filter,
                   printable)

_CONNECT_TIMEOUT = 10.0
_REPLY_TIMEOUT = 60.0
_MAX_LINE = 65536

# Postfix's own reply texts for this back end (xsasl_dovecot_server.c).
LOST = "Connection lost to authentication server"
INVALID_MECH = "Invalid authentication mechanism"
BAD_INITIAL = "Invalid base64 data in initial response"
BAD_CONTINUED = "Invalid base64 data in continued response"


def _escape(value: str) -> str:
    return (value.replace("\001", "\0011").replace("\t", "\001t").replace("\n", "\001n")
            .replace("\r", "\001r"))


def _unescape(value: str) -> str:
    out, it = [], iter(value)
    table = {"1": "\001", "t": "\t", "n": "\n", "r": "\r", "0": "\0"}
    for c in it:
        if c == "\001":
            nxt = next(it, "")
            out.append(table.get(nxt, nxt))
        else:
            out.append(c)
    return "".join(out)


def _b64_ok(text: str) -> bool:
    try:
        base64.b64decode(text.encode("ascii"), validate=True)
        return True
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False


# smtpd_sasl_security_options word -> (Dovecot MECH flag, flag must be absent?)
_OPTION_FLAGS = {
    "noanonymous": ("anonymous", True),
    "noplaintext": ("plaintext", True),
    "nodictionary": ("dictionary", True),
    "noactive": ("active", True),
    "mutual_auth": ("mutual-auth", False),
    "forward_secrecy": ("forward-secrecy", False),
}


class DovecotConnection:
    """The shared client connection; reconnects on the next request after a loss."""

    def __init__(self, path: str, *, connect_timeout: float = _CONNECT_TIMEOUT) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self.mechanisms: dict[str, frozenset[str]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None
        # Bumped at each (re)connect: request ids are only valid on their own
        # connection, so an exchange never continues on a newer one.
        self.generation = 0

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def _open(self):
        if self.path.startswith("inet:"):
            host, _, port = self.path[5:].rpartition(":")
            return await asyncio.open_connection(host.strip("[]"), int(port), limit=_MAX_LINE)
        return await asyncio.open_unix_connection(self.path, limit=_MAX_LINE)

    async def connect(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.connected:
                return
            reader, writer = await asyncio.wait_for(self._open(), self.connect_timeout)
            writer.write(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
            mechs: dict[str, frozenset[str]] = {}
            try:
                while True:
                    line = await asyncio.wait_for(reader.readline(), self.connect_timeout)
                    if not line.endswith(b"\n"):
                        raise ConnectionError("authentication server closed the connection")
                    fields = line.decode("utf-8", "replace").rstrip("\n").split("\t")
                    if fields[0] == "VERSION" and (len(fields) < 2 or fields[1] != "1"):
                        raise ConnectionError(f"authentication server protocol version "
                                              f"{fields[1:2]} is not 1")
                    if fields[0] == "MECH" and len(fields) >= 2:
                        mechs[fields[1].upper()] = frozenset(fields[2:])
                    if fields[0] == "DONE":
                        break
            except BaseException:
                writer.close()
                raise
            self._reader, self._writer = reader, writer
            self.generation += 1
            self.mechanisms = mechs
            self._task = asyncio.ensure_future(self._read_loop(reader, writer))

    async def _read_loop(self, reader: asyncio.StreamReader, writer) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    break
                fields = line.decode("utf-8", "replace").rstrip("\n").split("\t")
                if len(fields) >= 2 and fields[1] in self._pending:
                    self._pending[fields[1]].put_nowait(fields)
        except (OSError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
                for q in self._pending.values():
                    q.put_nowait(None)

    async def request(self, line: str, req_id: str, generation: int | None = None
                      ) -> asyncio.Queue:
        """Send one AUTH/CONT line; replies for ``req_id`` arrive on the queue
        (None: connection lost).  With ``generation``, refuse to send on a
        connection other than that one."""
        if generation is None:
            await self.connect()
        if not self.connected or (generation is not None and generation != self.generation):
            raise ConnectionError("authentication server connection lost")
        q = self._pending.setdefault(req_id, asyncio.Queue())
        assert self._writer is not None
        self._writer.write(line.encode("utf-8", "surrogateescape"))
        return q

    def new_id(self) -> str:
        return str(next(self._ids))

    def forget(self, req_id: str) -> None:
        self._pending.pop(req_id, None)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        self._task = None
        self._lock = None          # bound to this event loop


class DovecotExchange(SaslExchange):

    def __init__(self, server: "DovecotSaslServer", mechanism: str,
                 initial: str | bytes | None, params: list[str]) -> None:
        self.server = server
        self.mechanism = mechanism
        self.initial = initial
        self.params = params
        self.req_id: str | None = None
        self.generation = 0
        self.queue: asyncio.Queue | None = None
        self.username: str | None = None
        self.done = False

    async def begin(self) -> SaslStep:
        conn = self.server.connection
        try:
            await conn.connect()
        except (OSError, asyncio.TimeoutError, ConnectionError):
            return self._end(Failure(LOST, temporary=True))
        if self.mechanism not in self.server.mechanisms(tls_active="secured" in self.params):
            return self._end(Failure(INVALID_MECH))
        line = ["AUTH", "", self.mechanism, f"service={self.server.service}", "nologin",
                *self.params]
        if self.initial is not None:
            text = self._as_text(self.initial)
            if text is None or len(text) > self.server.response_limit:
                return self._end(RESPONSE_LIMIT_FAILURE if text else Failure(BAD_INITIAL))
            if text != "=" and not _b64_ok(text):
                return self._end(Failure(BAD_INITIAL))
            # RFC 4954 4: "=" is an empty initial response.
            line.append("resp=" + ("" if text == "=" else text))
        self.req_id = conn.new_id()
        line[1] = self.req_id
        try:
            self.queue = await conn.request("\t".join(line) + "\n", self.req_id)
            self.generation = conn.generation
        except (OSError, asyncio.TimeoutError, ConnectionError):
            return self._end(Failure(LOST, temporary=True))
        return await self._answer()

    def _as_text(self, response: str | bytes) -> str | None:
        if isinstance(response, bytes):
            return base64.b64encode(response).decode("ascii")
        return response

    async def step(self, response: str | bytes) -> SaslStep:
        if self.done or self.req_id is None:
            return self._end(Failure(LOST, temporary=True))
        text = self._as_text(response)
        # A line that reaches smtpd_sasl_response_limit is too long (Postfix 3.7).
        if text is None or len(text) >= self.server.response_limit:
            return self._end(RESPONSE_LIMIT_FAILURE)
        if not _b64_ok(text):
            return self._end(Failure(BAD_CONTINUED, username=self.username))
        try:
            await self.server.connection.request(f"CONT\t{self.req_id}\t{text}\n", self.req_id,
                                                 self.generation)
        except (OSError, ConnectionError, asyncio.TimeoutError):
            return self._end(Failure(LOST, temporary=True))
        return await self._answer()

    async def _answer(self) -> SaslStep:
        assert self.queue is not None
        try:
            fields = await asyncio.wait_for(self.queue.get(), self.server.reply_timeout)
        except asyncio.TimeoutError:
            fields = None
        if fields is None:
            return self._end(Failure(LOST, temporary=True, username=self.username))
        kind = fields[0]
        args = [_unescape(f) for f in fields[2:]]
        params = {}
        for a in args:
            k, _, v = a.partition("=")
            params.setdefault(k, v)
        if "user" in params:
            self.username = params["user"]
        if kind == "CONT":
            try:
                data = base64.b64decode(fields[2] if len(fields) > 2 else "")
            except (binascii.Error, ValueError):
                return self._end(Failure(LOST, temporary=True))
            return Challenge(data)
        if kind == "OK":
            if not self.username:
                return self._end(Failure(LOST, temporary=True))
            self.done = True
            self._forget()
            return Success(printable(self.username))
        if kind == "FAIL":
            return self._end(Failure(params.get("reason", ""), temporary="temp" in params,
                                     username=self.username))
        return self._end(Failure(LOST, temporary=True))

    def _forget(self) -> None:
        if self.req_id is not None:
            self.server.connection.forget(self.req_id)

    def _end(self, failure: Failure) -> Failure:
        self.done = True
        self._forget()
        return failure

    def abort(self) -> None:
        # The protocol has no cancel: drop our interest; a late answer is ignored.
        self.done = True
        self._forget()


class DovecotSaslServer(SaslServer):
    type_name = "dovecot"

    def __init__(self, path: str, *, service: str = "smtp",
                 security_options: frozenset[str], tls_security_options: frozenset[str],
                 mechanism_filter: str = "", response_limit: int = DEFAULT_RESPONSE_LIMIT,
                 reply_timeout: float = _REPLY_TIMEOUT) -> None:
        self.connection = DovecotConnection(path)
        self.path = path
        self.service = service
        self.security_options = security_options
        self.tls_security_options = tls_security_options
        self.mechanism_filter = mechanism_filter
        self.response_limit = response_limit
        self.reply_timeout = reply_timeout

    async def prepare(self) -> None:
        """(Re)connect and read the mechanism list; call before EHLO."""
        try:
            await self.connection.connect()
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass

    def mechanisms(self, tls_active: bool = False) -> list[str]:
        required = self.tls_security_options if tls_active else self.security_options
        out = []
        for name, flags in self.connection.mechanisms.items():
            if "private" in flags:
                continue
            ok = True
            for opt in required:
                flag, must_be_absent = _OPTION_FLAGS.get(opt, ("", True))
                if flag and (flag in flags) == must_be_absent:
                    ok = False
            if ok:
                out.append(name)
        return apply_mechanism_filter(out, self.mechanism_filter)

    def start(self, mechanism: str, initial_response: str | bytes | None = None, *,
              client_addr: str = "", client_port: str = "", local_addr: str = "",
              local_port: str = "", local_domain: str | None = None,
              tls_active: bool = False) -> SaslExchange:
        params = []
        if local_addr:
            params.append(f"lip={_escape(local_addr)}")
        if client_addr:
            params.append(f"rip={_escape(client_addr)}")
        if local_port:
            params.append(f"lport={_escape(local_port)}")
        if client_port:
            params.append(f"rport={_escape(client_port)}")
        if tls_active:
            params.append("secured")
        return DovecotExchange(self, mechanism.upper(), initial_response, params)

    async def close(self) -> None:
        await self.connection.close()
