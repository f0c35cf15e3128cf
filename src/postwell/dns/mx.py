"""From a next-hop destination to an ordered list of addresses (RFC 5321 5.1).

``select_mx_hosts`` orders MX records; ``resolve_destination`` does the whole
job the smtp client needs: MX lookup (or none for ``[host]``), the implicit MX,
null MX, address lookups, the "loops back to myself" rule and the address limit.
Failures come out as :class:`DestinationError` carrying Postfix's DSN and text.
"""

from __future__ import annotations

import fcntl
import ipaddress
import random
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from .resolver import IPV4, IPV6, DnsError, MxRecord, NoSuchDomain, Resolver


class DestinationError(Exception):
    """No address to try.  ``permanent`` picks bounce over defer."""

    def __init__(self, dsn: str, reason: str) -> None:
        self.dsn, self.reason = dsn, reason
        super().__init__(f"{dsn} {reason}")

    @property
    def permanent(self) -> bool:
        return self.dsn.startswith("5")


class NullMx(DestinationError):
    def __init__(self, domain: str) -> None:
        # RFC 7505 3 suggests 5.1.10, but Postfix 3.7's smtp(8) logs and bounces
        # with dsn=5.1.0 (checked end to end against the reference, tests/test_outbound_mx.py).
        super().__init__("5.1.0", f"Domain {domain} does not accept mail (nullMX)")


@dataclass(frozen=True)
class Target:
    """One address to connect to."""
    host: str          # the MX host name (or the literal as written)
    ip: str
    port: int
    preference: int = 0
    best: bool = True  # this host has the lowest preference (loop detection wording)

    @property
    def relay(self) -> str:
        """``host[ip]:port`` as Postfix logs relay=."""
        return f"{self.host}[{self.ip}]:{self.port}"

    @property
    def namaddr(self) -> str:
        return f"{self.host}[{self.ip}]"


@dataclass(frozen=True)
class Nexthop:
    host: str
    port: int
    mx_lookup: bool     # False for "[host]" (RFC 5321 5.1: no MX for a literal)


def parse_nexthop(nexthop: str, default_port: int = 25) -> Nexthop:
    """``[host]:port``, ``[ipv6:...]``, ``host:port``, ``host``, optional ``smtp:`` prefix."""
    s = nexthop.strip()
    if s.lower().startswith(("smtp:", "relay:", "lmtp:")) and not s.startswith("["):
        s = s.split(":", 1)[1]
    port = default_port
    if s.startswith("["):
        inner, _, rest = s[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        return Nexthop(inner, port, False)
    if s.count(":") == 1:
        host, _, p = s.partition(":")
        if p.isdigit():
            return Nexthop(host, int(p), True)
        if p in ("smtp", ""):
            return Nexthop(host, port, True)
        try:
            return Nexthop(host, socket.getservbyname(p, "tcp"), True)
        except OSError:
            return Nexthop(host, port, True)
    return Nexthop(s, port, True)


def select_mx_hosts(domain: str, records: list[MxRecord], rng: random.Random) -> list[MxRecord]:
    """RFC 5321 5.1: ascending preference, equal preferences in random order.

    Raises :class:`NullMx` for a null MX (RFC 7505 3: the single record "0 .";
    Postfix treats any "." exchange as null).  An empty list means no MX (the
    caller falls back to the domain's own addresses).
    """
    if any(r.host in ("", ".") for r in records):
        raise NullMx(domain)
    shuffled = list(records)
    rng.shuffle(shuffled)
    seen: set[str] = set()
    out = []
    for r in sorted(shuffled, key=lambda r: r.preference):   # stable: keeps the shuffle
        if r.host not in seen:
            seen.add(r.host)
            out.append(r)
    return out


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


# getaddrinfo() codes as Postfix's smtp_addr.c weighs them.  DSN_NOHOST (x.4.4 rather
# than x.3.0) lists EAI_NODATA only where netdb.h defines it, which glibc does for
# _GNU_SOURCE builds alone: Debian's Postfix 3.7 reports EAI_NODATA ("No address
# associated with hostname") as 5.3.0 (checked side by side).
_GAI_RETRY = frozenset(c for c in (getattr(socket, "EAI_AGAIN", None),
                                   getattr(socket, "EAI_MEMORY", None),
                                   getattr(socket, "EAI_SYSTEM", None)) if c is not None)
_GAI_NOHOST = frozenset(c for c in (getattr(socket, "EAI_AGAIN", None),
                                    getattr(socket, "EAI_NONAME", None)) if c is not None)


class _Why:
    """Postfix's one reason buffer for a destination's address lookups: each failed
    host overwrites the text, and a soft status once seen stays soft ("a soft error
    dominates past and future hard errors", smtp_addr.c)."""

    def __init__(self) -> None:
        self.dsn = ""
        self.text = ""

    @property
    def soft(self) -> bool:
        return self.dsn.startswith("4")

    def failed(self, host: str, e: DnsError | None, rtype: str = "A") -> None:
        code = getattr(e, "gai_code", None) if e is not None else None
        if e is None:
            # DNS answered without a record of the type (NODATA)
            self.text = ("Host or domain name not found. Name service error for "
                         f"name={host} type={rtype}: Host found but no data record of "
                         "requested type")
            self.dsn = "4.4.4" if self.soft else "5.4.4"
        elif code == 0:
            self.text = f"{host}: host not found"
            self.dsn = "4.4.4" if self.soft else "5.4.4"
        elif code is not None:
            # smtp_host_lookup = native: "unable to look up host %s: %s" (gai_strerror)
            self.text = f"unable to look up host {host}: {e.gai_text}"
            soft = self.soft or code in _GAI_RETRY
            self.dsn = ("4" if soft else "5") + (".4.4" if code in _GAI_NOHOST else ".3.0")
        else:
            # dns_lookup.c: "Host or domain name not found. Name service error for ..."
            self.text = ("Host or domain name not found. Name service error for "
                         f"name={host} type={e.rtype}: {e.detail}")
            self.dsn = ("4.4.4" if self.soft else "5.4.4") if e.permanent else "4.4.3"

    def error(self) -> DestinationError:
        if not self.dsn:
            # smtp_connect.c's excuse when nothing was recorded
            return DestinationError("4.3.0", "server unavailable or unable to receive mail")
        return DestinationError(self.dsn, self.text)


def relayhost_problem(error: DestinationError, nexthop: str,
                      relayhost: str) -> tuple[DestinationError, str] | None:
    """smtp_connect.c: a hard lookup (or loop) failure of the relayhost is taken for a
    configuration problem, so the mail waits (4.3.5, same reason) instead of
    bouncing; returns that error and the warning smtp(8) logs, or None when the rule
    does not apply (a soft error, or a next hop other than $relayhost)."""
    if not error.permanent or not relayhost or nexthop != relayhost:
        return None
    return DestinationError("4.3.5", error.reason), "relayhost configuration problem"


def order_families(ips: list[str], preference: str) -> list[str]:
    """smtp_address_preference: ipv4 / ipv6 first, or any (resolver order)."""
    if preference == IPV4:
        return sorted(ips, key=lambda a: ":" in a)
    if preference == IPV6:
        return sorted(ips, key=lambda a: ":" not in a)
    return ips


async def resolve_destination(resolver: Resolver, nexthop: str, *, rng: random.Random,
                              families: Iterable[str] = (IPV4, IPV6),
                              own_addresses: frozenset[str] = frozenset(),
                              address_limit: int = 5, address_preference: str = "any",
                              default_port: int = 25, dns_enabled: bool = True,
                              address_resolver: Resolver | None = None,
                              randomize: bool = False,
                              warn: Callable[[str], None] | None = None) -> list[Target]:
    """Addresses to try, in order; raises :class:`DestinationError` when there are none.

    ``address_resolver`` answers the A/AAAA questions when it differs from the MX
    resolver (smtp_host_lookup = native); ``dns_enabled`` False skips MX lookups;
    ``randomize`` shuffles each host's addresses (smtp_randomize_addresses);
    ``warn`` gets smtp(8)'s "no MX host for DOMAIN has a valid address record".
    A failure reports the last host's lookup error, soft when any was soft
    (Postfix's smtp_addr.c); a getaddrinfo() failure is worded "unable to look
    up host HOST: gai_strerror()".
    """
    address_resolver = address_resolver or resolver
    families = tuple(families)
    hop = parse_nexthop(nexthop, default_port)
    # Postfix checks for loops only on the SMTP port (smtp_connect.c).
    loop_detect = hop.port == 25
    literal = _literal(hop.host)
    if literal is not None:
        if loop_detect and literal in own_addresses:
            raise DestinationError("5.4.6", f"mail for {hop.host} loops back to myself")
        return [Target(literal, literal, hop.port)]
    if not dns_enabled:
        hop = Nexthop(hop.host, hop.port, False)
    candidates: list[MxRecord]
    if hop.mx_lookup:
        try:
            records = await resolver.mx(hop.host)
        except NoSuchDomain:
            # Postfix (smtp_addr.c) treats a name without MX records, NXDOMAIN
            # included, as its own implicit MX: the error it reports then comes
            # from the address lookup ("type=A: Host not found").
            records = []
        except DnsError as e:
            mx_why = _Why()
            mx_why.failed(hop.host.rstrip("."), e)
            raise mx_why.error() from None
        candidates = select_mx_hosts(hop.host, records, rng)
    else:
        candidates = []
    # Lookup errors name the host as the next hop spelled it (Postfix passes it on
    # unchanged); MX host names come from the resolver.
    written = hop.host.rstrip(".")
    if not candidates:
        # RFC 5321 5.1: no MX -> the domain's own A/AAAA (implicit MX)
        candidates = [MxRecord(0, written.lower())]
    else:
        written = ""

    targets: list[Target] = []
    why = _Why()
    self_pref: int | None = None
    best_found: int | None = None
    best_pref = candidates[0].preference
    for rec in candidates:
        if self_pref is not None and rec.preference >= self_pref:
            break
        try:
            ips = await address_resolver.addresses(rec.host, families)
        except DnsError as e:
            why.failed(written or rec.host, e)
            continue
        if not ips:
            why.failed(written or rec.host, None, "AAAA" if IPV6 in families else "A")
            continue
        if randomize:
            ips = list(ips)
            rng.shuffle(ips)      # smtp_randomize_addresses: spread load over A records
        ips = order_families(ips, address_preference)
        if loop_detect and any(ip in own_addresses for ip in ips):
            # RFC 5321 5.1: a host that finds itself in the MX list must only try
            # hosts with a lower preference value than its own (Postfix: smtp_addr.c).
            self_pref = rec.preference
            targets = [t for t in targets if t.preference < self_pref]
            break
        if ips and best_found is None:
            best_found = rec.preference
        for ip in ips:
            targets.append(Target(rec.host, ip, hop.port, rec.preference,
                                  rec.preference == best_pref))
    if self_pref is not None and not targets:
        if best_found is not None and best_found != best_pref or \
                best_found is None and self_pref != best_pref:
            # Better MX hosts exist but none has an address (Postfix: smtp_addr.c).
            raise DestinationError("4.4.4", f"unable to find primary relay for {hop.host}")
        raise DestinationError("5.4.6", f"mail for {hop.host} loops back to myself")
    if not targets:
        if hop.mx_lookup and records and warn is not None:
            warn(f"no MX host for {hop.host} has a valid address record")
        raise why.error()
    if address_limit > 0:
        targets = targets[:address_limit]
    return targets


def local_interface_addresses() -> frozenset[str]:
    """Addresses of this machine's interfaces (inet_interfaces = all), best effort."""
    addrs = {"127.0.0.1", "::1"}
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                addrs.add(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except OSError:
        pass
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _, name in socket.if_nameindex():
                try:
                    req = struct.pack("256s", name.encode()[:15])
                    res = fcntl.ioctl(s.fileno(), 0x8915, req)   # SIOCGIFADDR
                    addrs.add(socket.inet_ntoa(res[20:24]))
                except OSError:
                    continue
        finally:
            s.close()
    except OSError:
        pass
    return frozenset(addrs)


def own_addresses_from_config(config) -> frozenset[str]:
    """inet_interfaces + proxy_interfaces as addresses (for the loop rule)."""
    addrs: set[str] = set()
    inet = [w.lower() for w in config.get_list("inet_interfaces")] or ["all"]
    if "all" in inet:
        addrs |= local_interface_addresses()
    else:
        for w in inet:
            if w in ("loopback-only", "localhost"):
                addrs |= {"127.0.0.1", "::1"}
            elif _literal(w.strip("[]")):
                addrs.add(_literal(w.strip("[]")))
            else:
                try:
                    addrs |= {ai[4][0] for ai in socket.getaddrinfo(w, None)}
                except OSError:
                    pass
    for w in config.get_list("proxy_interfaces"):
        lit = _literal(w.strip("[]"))
        if lit:
            addrs.add(lit)
    return frozenset(addrs)
