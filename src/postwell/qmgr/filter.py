"""Content filter routing (Postfix's content_filter and FILTER actions).

Cleanup records the filter of a message in the envelope attribute
``postwell_filter`` (main.cf content_filter stamped by smtpd/pickup, replaced
by an access-map or header_checks FILTER).  While it is set, every recipient of
the message goes through that transport to that next hop, in one delivery per
recipient limit: the address resolver (transport_maps, relayhost, MX, aliases
of the destination class) is not asked, and the recipient is not rewritten,
as in Postfix's qmgr_message_resolve().  The filter re-injects the mail
through a listener with ``-o content_filter=``, so the copy it sends back has
no filter and is delivered normally.
"""

from __future__ import annotations

FILTER_ATTRIBUTE = "postwell_filter"
# Cleanup has already replaced the recipients of a redirected message; the
# mark says a REDIRECT happened, which overrides the filter in Postfix's qmgr.
REDIRECT_ATTRIBUTE = "postwell_redirect"


def filter_route(spec: str | None, myhostname: str) -> tuple[str, str] | None:
    """(transport, nexthop) for a ``transport:nexthop`` filter, or None when no
    filter applies.  The split is at the first colon, so ``lmtp:unix:/path``
    and ``smtp:[127.0.0.1]:10024`` keep their next hop whole; a filter without
    a next hop (``scan`` or ``scan:``) goes to $myhostname, as in Postfix."""
    if spec is None:
        return None
    spec = spec.strip()
    if not spec:
        return None
    transport, _, nexthop = spec.partition(":")
    return transport, (nexthop or myhostname)


def message_filter(attributes, myhostname: str) -> tuple[str, str] | None:
    """The filter route of a queued message (its envelope attributes)."""
    if not attributes or attributes.get(REDIRECT_ATTRIBUTE):
        return None
    return filter_route(attributes.get(FILTER_ATTRIBUTE), myhostname)
