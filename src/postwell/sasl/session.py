"""Per-SMTP-session AUTH handling, so the smtpd glue stays a few lines.

    auth = SmtpdAuth(server, log, namaddr="host[addr]", client_addr=..., client_port=...,
                     local_addr=..., local_port=..., local_domain=None)
    # engine event Auth(mechanism, initial_response):
    conn.send_reply(await auth.start(ev.mechanism, ev.initial_response, tls_active=...))
    # engine event AuthResponse(data):
    conn.send_reply(await auth.respond(ev.data))
    # the engine answered "*" itself (501 5.7.0): call auth.aborted()
    auth.username / auth.method      # set after 235, for logs and policy (sasl_*)

Failures are logged as Postfix does (``warning: host[addr]: SASL PLAIN
authentication failed: <reason>, sasl_username=...``) and delayed by
``Failure.delay`` before the reply goes out.
"""

from __future__ import annotations

import asyncio

from ..smtp.reply import Reply
from .base import (Challenge, Failure, SaslExchange, SaslServer, Success, aborted_log_text,
                   failure_log_text, printable, step_reply)


class SmtpdAuth:

    def __init__(self, server: SaslServer, log, *, namaddr: str, client_addr: str = "",
                 client_port: str = "", local_addr: str = "", local_port: str = "",
                 local_domain: str | None = None, sleep=asyncio.sleep) -> None:
        self.server = server
        self.log = log
        self.namaddr = namaddr
        self.where = dict(client_addr=client_addr, client_port=str(client_port),
                          local_addr=local_addr, local_port=str(local_port),
                          local_domain=local_domain)
        self.sleep = sleep
        self.exchange: SaslExchange | None = None
        self.mechanism = ""
        self.username: str | None = None
        self.method: str | None = None
        self.failures = 0

    async def start(self, mechanism: str, initial_response: str | None, *,
                    tls_active: bool = False) -> Reply:
        # Postfix logs and keeps the name as the client typed it ("SASL plain ...").
        self.mechanism = printable(mechanism)
        self.exchange = self.server.start(mechanism, initial_response, tls_active=tls_active,
                                          **self.where)
        return await self._finish(await self.exchange.begin())

    async def respond(self, data: str) -> Reply:
        if self.exchange is None:
            return Reply(503, "Error: no authentication in progress", "5.5.1")
        return await self._finish(await self.exchange.step(data))

    def aborted(self) -> None:
        self.log.warning(aborted_log_text(self.namaddr, self.mechanism))
        if self.exchange is not None:
            self.exchange.abort()
        self.exchange = None

    async def _finish(self, step) -> Reply:
        if isinstance(step, Challenge):
            return step_reply(step)
        self.exchange = None
        if isinstance(step, Success):
            self.username = step.username
            self.method = self.mechanism
            return step_reply(step)
        assert isinstance(step, Failure)
        self.failures += 1
        for text in step.library_log:
            # Postfix's xsasl_cyrus_log() callback: libsasl2's SASL_LOG_FAIL messages.
            self.log.warning(f"SASL authentication failure: {printable(text)}")
        if step.code is None:
            self.log.warning(failure_log_text(self.namaddr, self.mechanism, step))
        if step.delay > 0:
            await self.sleep(step.delay)
        return step_reply(step)
