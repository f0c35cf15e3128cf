"""The client side of the verify service (smtpd queries, qmgr updates)."""

from __future__ import annotations

import asyncio

from . import MAX_LINE, socket_path


class VerifyError(Exception):
    """The service could not be asked (Postfix's VRFY_STAT_FAIL / VRFY_STAT_BAD)."""


def _field(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


class VerifyClient:
    """One short connection per request, every wait bounded by ``timeout``."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    @classmethod
    def from_config(cls, config) -> "VerifyClient":
        try:
            timeout = min(config.get_time("ipc_timeout"), 30.0)
        except Exception:   # noqa: BLE001
            timeout = 10.0
        return cls(socket_path(config), timeout)

    async def _ask(self, line: str) -> list[str]:
        async def exchange():
            reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_LINE)
            try:
                writer.write(line.encode("utf-8", "surrogateescape") + b"\n")
                await writer.drain()
                reply = await reader.readuntil(b"\n")
            finally:
                writer.close()
            return reply.decode("utf-8", "surrogateescape").rstrip("\n").split("\t")
        try:
            fields = await asyncio.wait_for(exchange(), self.timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            raise VerifyError(str(exc) or type(exc).__name__) from None
        if not fields or fields[0] != "ok":
            raise VerifyError("bad request")
        return fields

    async def query(self, address: str) -> tuple[int, str]:
        """(recipient status, text); raises VerifyError."""
        fields = await self._ask(f"query\t{_field(address)}")
        if len(fields) != 3 or not fields[1].isdigit():
            raise VerifyError("malformed reply")
        return int(fields[1]), fields[2]

    async def update(self, address: str, status: int, text: str) -> None:
        await self._ask(f"update\t{_field(address)}\t{int(status)}\t{_field(text)}")
