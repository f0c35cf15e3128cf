"""postwell.smtpd: the SMTP server process (asyncio glue around postwell.smtp.server)."""

from .server import SmtpdServer, SmtpdSession, client_hostname, preload, serve  # noqa: F401
