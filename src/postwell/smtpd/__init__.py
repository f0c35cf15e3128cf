"""postwell.smtpd: the SMTP server process (asyncio glue around postwell.smtp.server)."""

from .server import SmtpdServer, SmtpdSession, client_hostname, preload, preload_key, serve  # noqa: F401
