"""Sans-IO SMTP protocol engines (no sockets, no asyncio here)."""

from .reply import Reply  # noqa: F401
