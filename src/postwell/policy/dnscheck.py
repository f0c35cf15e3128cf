"""DNS answers for reject_unknown_sender_domain / reject_unknown_recipient_domain.

Postfix asks for MX, then A/AAAA records of the domain (reject_unknown_mailhost):
any record means the domain exists; a null MX (RFC 7505) means it refuses
mail; NXDOMAIN or no records at all means "Domain not found"; a temporary
failure turns into defer_if_permit.  This module only turns a
postwell.dns Resolver's answers into those words; the resolver (real or fake)
comes from the dns package.
"""

from __future__ import annotations

from typing import Awaitable, Callable


def mailhost_lookup(resolver, families=("ipv4", "ipv6")) -> Callable[[str], Awaitable[str]]:
    """domain -> "ok" | "notfound" | "retry" | "nullmx"."""
    from postwell.dns import DnsTempFail, NoSuchDomain

    async def lookup(domain: str) -> str:
        retry = False
        try:
            records = await resolver.mx(domain)
            if records:
                # RFC 7505 3: a single MX of "." with preference 0.
                if len(records) == 1 and records[0].host in ("", "."):
                    return "nullmx"
                return "ok"
        except NoSuchDomain:
            return "notfound"
        except DnsTempFail:
            retry = True
        try:
            if await resolver.addresses(domain, families):
                return "ok"
        except NoSuchDomain:
            return "retry" if retry else "notfound"
        except DnsTempFail:
            return "retry"
        return "retry" if retry else "notfound"

    return lookup


def default_mailhost_lookup(config, log=None) -> Callable[[str], Awaitable[str]] | None:
    """The production hook: dnspython, or the system resolver as a fallback."""
    try:
        from postwell.dns import DnsPythonResolver, families_from_inet_protocols
        resolver = DnsPythonResolver.from_config(config)
        fams = families_from_inet_protocols(config.get("inet_protocols") or "all")
    except Exception as e:  # noqa: BLE001 - no DNS package: the restriction is skipped
        if log is not None:
            log.warning(f"DNS resolver unavailable ({e}); reject_unknown_*_domain skipped")
        return None
    return mailhost_lookup(resolver, fams)
