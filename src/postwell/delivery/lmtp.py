"""lmtp(8): the smtp(8) client speaking LMTP (RFC 2033).

The smtp agent does the work when ``protocol = "lmtp"``: LHLO instead of
EHLO, one final reply per accepted recipient after the end of DATA
(RFC 2033 4.2), next hops "unix:/path" (relative paths live under
$queue_directory, e.g. unix:private/dovecot-lmtp), "inet:host:port",
"[host]:port" or "host" (port lmtp_tcp_port, 24), never an MX lookup; it
reads the lmtp_* parameters.
"""

from __future__ import annotations

from .smtp import _SMTP_PARAMS, SmtpDeliveryAgent

try:  # start-up warnings name set-but-ignored parameters; these are honoured here
    from postwell.config.registry import register_implemented as _register
except ImportError:  # pragma: no cover
    def _register(*names):
        pass

# lmtp(8) reads the smtp(8) names with an lmtp_ prefix; the greeting ones are
# named after LHLO.
_LMTP_RENAMED = {"helo_name": "lhlo_name", "helo_timeout": "lhlo_timeout"}
_register(*(f"lmtp_{_LMTP_RENAMED.get(n, n)}" for n in _SMTP_PARAMS), "lmtp_lhlo_name",
          "lmtp_lhlo_timeout", "lmtp_discard_lhlo_keywords", "lmtp_tcp_port")


class LmtpDeliveryAgent(SmtpDeliveryAgent):
    name = "lmtp"
    protocol = "lmtp"
