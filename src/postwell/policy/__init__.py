"""postwell.policy: smtpd access control, match lists and address resolution.

    policy = SmtpdPolicy(config, log)              # PolicyConfigError: refuse to start
    reply = await policy.on_connect/on_helo/on_mail/on_rcpt/on_data/on_end_of_data(state)
    reply = await policy.on_vrfy(state, address)   # None: answer "252 2.0.0 <arg>"
    policy.reject_log_line(state, reply)           # "NOQUEUE: reject: RCPT from ..."
    SmtpdPolicy(config, log, tables=..., own_addresses=..., mailhost_lookup=..., sleep=...)
                                                   # keyword stand-ins for tests
    resolver = AddressResolver(config)
    r = resolver.resolve(address, sender=None)     # Resolved(address_class, transport, nexthop,
                                                   #          recipient, flags)
    resolver.recipient_known(r) -> (bool, table_name | None)

Addresses are Postfix's internal (unquoted) form: "user@other.org"@example.com
arrives as user@other.org@example.com.  Access-map side effects (HOLD, DISCARD,
FILTER, REDIRECT, BCC, PREPEND) are left on the SessionState for the smtpd and
cleanup; state.reset_transaction() clears them.
"""

from .matchlist import DomainList, HostList, MatchListError, OwnAddresses, StringList  # noqa: F401
from .resolve import AddressResolver, Resolved, ResolveFlag  # noqa: F401
from .restrictions import PolicyConfigError, format_whatsup  # noqa: F401
from .smtpd_policy import SmtpdPolicy  # noqa: F401
from .state import SessionState  # noqa: F401
