"""The resolver interface, a dnspython implementation and a fake for tests.

Every lookup either returns records (possibly none: the name exists but has no
records of that type, NODATA) or raises:

* :class:`NoSuchDomain` -- NXDOMAIN, a permanent failure;
* :class:`DnsTempFail` -- SERVFAIL, timeout, no reachable name server.

A null MX (RFC 7505) is returned as the record ``MxRecord(0, "")``; the policy
decision lives in :mod:`postwell.dns.mx`.

Where the real resolver asks: ``postwell_dns_servers`` (a postwell extension,
not a Postfix parameter) lists ``host`` or ``host:port`` / ``[v6]:port`` name
servers; empty (the default) means the system's resolv.conf.  Tests point it at
a name server on loopback and never touch outside DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Iterable, Protocol

IPV4, IPV6 = "ipv4", "ipv6"


class DnsError(Exception):
    """A failed lookup, worded as Postfix's dns_strerror() words it.

    A failure of the system's getaddrinfo() (:class:`NativeResolver`) also carries
    ``gai_code`` (the EAI_* value; 0: an answer without a usable address family)
    and ``gai_text`` (gai_strerror()), which Postfix's smtp(8) reports instead.
    """

    permanent = False
    gai_code: int | None = None
    gai_text = ""

    def __init__(self, name: str, rtype: str, detail: str) -> None:
        self.name, self.rtype, self.detail = name, rtype, detail
        super().__init__(f"Name service error for name={name} type={rtype}: {detail}")


class NoSuchDomain(DnsError):
    permanent = True

    def __init__(self, name: str, rtype: str) -> None:
        super().__init__(name, rtype, "Host not found")


class DnsTempFail(DnsError):
    def __init__(self, name: str, rtype: str, detail: str = "Host not found, try again") -> None:
        super().__init__(name, rtype, detail)


@dataclass(frozen=True, order=True)
class MxRecord:
    preference: int
    host: str          # lower case, no trailing dot; "" is the null MX "."


class Resolver(Protocol):
    async def mx(self, domain: str) -> list[MxRecord]: ...
    async def addresses(self, host: str, families: Iterable[str] = (IPV4, IPV6)) -> list[str]: ...
    async def ptr(self, ip: str) -> list[str]: ...


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def families_from_inet_protocols(value: str) -> tuple[str, ...]:
    """inet_protocols (postconf(5)): all, ipv4, ipv6, or "ipv4, ipv6"."""
    words = {w for w in value.replace(",", " ").lower().split()}
    if not words or "all" in words:
        return (IPV4, IPV6)
    return tuple(f for f in (IPV4, IPV6) if f in words) or (IPV4,)


class FakeResolver:
    """A resolver built from a dict, for tests.

    Keys are ``(name, rtype)`` with rtype "MX", "A", "AAAA" or "PTR"; values are a
    list (MX: ``[(pref, host)]``, others: ``[str]``), or the strings
    ``"NXDOMAIN"`` / ``"SERVFAIL"``.  A name with any key exists; other names are
    NXDOMAIN.  ``queries`` records what was asked.
    """

    def __init__(self, records: dict[tuple[str, str], object]) -> None:
        self.records = {(_norm(n), t.upper()): v for (n, t), v in records.items()}
        self.names = {n for n, _ in self.records}
        # NXDOMAIN is about the name, not one record type (RFC 8020).
        self.nxdomain = {n for (n, _), v in self.records.items() if v == "NXDOMAIN"}
        self.queries: list[tuple[str, str]] = []

    def _get(self, name: str, rtype: str) -> list:
        name = _norm(name)
        self.queries.append((name, rtype))
        value = self.records.get((name, rtype))
        if value == "SERVFAIL":
            raise DnsTempFail(name, rtype)
        if name in self.nxdomain or (value is None and name not in self.names):
            raise NoSuchDomain(name, rtype)
        return list(value or [])

    async def mx(self, domain: str) -> list[MxRecord]:
        return [MxRecord(p, _norm(h)) for p, h in self._get(domain, "MX")]

    async def addresses(self, host: str, families: Iterable[str] = (IPV4, IPV6)) -> list[str]:
        out: list[str] = []
        missing: DnsError | None = None
        for fam in families:
            try:
                out += self._get(host, "A" if fam == IPV4 else "AAAA")
            except NoSuchDomain as e:
                missing = e
        if not out and missing is not None:
            raise missing
        return out

    async def ptr(self, ip: str) -> list[str]:
        return [_norm(h) for h in self._get(ip, "PTR")]


def preload_dnspython() -> None:
    """Import every dnspython module a lookup would otherwise import lazily.

    The qmgr drops root for mail_owner after start; where Python's packages
    sit in a directory mail_owner cannot read, a first lookup that imports the
    asyncio backend or an rdata class then fails with ModuleNotFoundError (seen
    end to end: every MX delivery deferred with "unexpected agent failure").
    The master imports all of postwell before the drop, so doing it here, at
    import time, covers the daemons.
    """
    try:
        import dns.asyncbackend
        import dns.asyncresolver  # noqa: F401
        import dns.exception  # noqa: F401
        import dns.nameserver  # noqa: F401
        import dns.rdata
        import dns.rdataclass
        import dns.rdatatype
        import dns.resolver  # noqa: F401
        import dns.reversename  # noqa: F401
    except ImportError:          # dnspython missing: DnsPythonResolver reports it on use
        return
    try:
        # dnspython sniffs the running async library with sniffio when present.
        import sniffio  # noqa: F401
    except ImportError:
        pass
    try:
        dns.asyncbackend.get_backend("asyncio")
    except Exception:            # noqa: BLE001 - best effort; a lookup will say what is wrong
        pass
    for rtype in ("A", "AAAA", "MX", "PTR", "CNAME", "SOA", "NS", "TXT", "DNAME"):
        try:
            dns.rdata.get_rdata_class(dns.rdataclass.IN, dns.rdatatype.from_text(rtype))
        except Exception:        # noqa: BLE001
            pass


preload_dnspython()


def parse_dns_servers(value: str) -> list[tuple[str, int]]:
    """``127.0.0.1:5353, [::1]:5353, 192.0.2.1`` -> [(ip, port)]."""
    servers = []
    for item in value.replace(",", " ").split():
        port = 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
        elif item.count(":") == 1:
            host, _, p = item.partition(":")
            port = int(p)
        else:
            host = item
        ipaddress.ip_address(host)     # name servers must be addresses
        servers.append((host, port))
    return servers


class DnsPythonResolver:
    """The real resolver (dnspython's asyncio resolver)."""

    def __init__(self, servers: list[tuple[str, int]] | None = None, *,
                 timeout: float = 5.0, lifetime: float = 10.0) -> None:
        import dns.asyncresolver
        import dns.nameserver
        if servers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
        else:
            try:
                r = dns.asyncresolver.Resolver()
            except Exception:
                # No usable resolv.conf: like the C library, ask a local name server.
                r = dns.asyncresolver.Resolver(configure=False)
                r.nameservers = ["127.0.0.1"]
        r.timeout = timeout
        r.lifetime = lifetime
        self._r = r

    @classmethod
    def from_config(cls, config) -> "DnsPythonResolver":
        raw = config.get("postwell_dns_servers") if config is not None else ""
        return cls(parse_dns_servers(raw) if raw else None)

    async def _query(self, name: str, rtype: str):
        import dns.exception
        import dns.resolver
        try:
            return await self._r.resolve(name, rtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(_norm(name), rtype) from None
        except dns.resolver.NoNameservers:
            raise DnsTempFail(_norm(name), rtype) from None
        except dns.exception.Timeout:
            raise DnsTempFail(_norm(name), rtype) from None
        except dns.exception.DNSException as e:
            raise DnsTempFail(_norm(name), rtype,
                              "Malformed or unexpected name server reply") from e

    async def mx(self, domain: str) -> list[MxRecord]:
        answer = await self._query(domain, "MX")
        if answer.rrset is None:
            return []
        return [MxRecord(int(r.preference), _norm(r.exchange.to_text(omit_final_dot=True)))
                for r in answer.rrset]

    async def addresses(self, host: str, families: Iterable[str] = (IPV4, IPV6)) -> list[str]:
        out: list[str] = []
        missing: DnsError | None = None
        for fam in families:
            try:
                answer = await self._query(host, "A" if fam == IPV4 else "AAAA")
            except NoSuchDomain as e:
                missing = e
                continue
            if answer.rrset is not None:
                out += [r.address for r in answer.rrset]
        if not out and missing is not None:
            raise missing
        return out

    async def ptr(self, ip: str) -> list[str]:
        import dns.reversename
        answer = await self._query(dns.reversename.from_address(ip).to_text(), "PTR")
        if answer.rrset is None:
            return []
        return [_norm(r.target.to_text()) for r in answer.rrset]


# getaddrinfo() failures that mean "no such host" rather than "try again".
_GAI_NOHOST = frozenset(c for c in (getattr(socket, "EAI_NONAME", None),
                                    getattr(socket, "EAI_NODATA", None),
                                    getattr(socket, "EAI_ADDRFAMILY", None)) if c is not None)


def native_error(host: str, rtype: str, code: int, text: str) -> DnsError:
    """The DnsError for a failed getaddrinfo(): NoSuchDomain or DnsTempFail as
    before (the policy checks go by the class), with the EAI code and text."""
    err: DnsError = NoSuchDomain(_norm(host), rtype) if code in _GAI_NOHOST or code == 0 \
        else DnsTempFail(_norm(host), rtype)
    err.gai_code, err.gai_text = code, text
    return err


class NativeResolver:
    """Host addresses through the system's getaddrinfo (/etc/hosts, NSS).

    Postfix uses this with smtp_host_lookup = native or disable_dns_lookups = yes.
    It knows no MX records: ``mx`` always answers "none".  Failures carry the
    getaddrinfo() code and text (:func:`native_error`).  ``getaddrinfo`` stands
    in for the event loop's in tests.
    """

    def __init__(self, getaddrinfo=None) -> None:
        self._getaddrinfo = getaddrinfo

    async def mx(self, domain: str) -> list[MxRecord]:
        return []

    async def addresses(self, host: str, families: Iterable[str] = (IPV4, IPV6)) -> list[str]:
        import asyncio
        fams = set(families) or {IPV4, IPV6}
        # Postfix's hostname_to_sockaddr(): one call, for both families unless
        # inet_protocols names only one.
        if fams == {IPV4}:
            af = socket.AF_INET
        elif fams == {IPV6}:
            af = socket.AF_INET6
        else:
            af = socket.AF_UNSPEC
        gai = self._getaddrinfo or asyncio.get_running_loop().getaddrinfo
        rtype = "AAAA" if af == socket.AF_INET6 else "A"
        try:
            infos = await gai(host, None, family=af, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise native_error(host, rtype, e.errno, e.strerror or str(e)) from None
        except UnicodeError:
            # IDNA encoding refused the name: it cannot exist.
            raise native_error(host, rtype, socket.EAI_NONAME, "Name or service not known") \
                from None
        wanted = {socket.AF_INET if f == IPV4 else socket.AF_INET6 for f in fams}
        out: list[str] = []
        for info in infos:
            ip = info[4][0]
            if info[0] in wanted and ip not in out:
                out.append(ip)
        if not out:
            # smtp_addr.c: "%s: host not found" (only other families came back)
            raise native_error(host, rtype, 0, "host not found")
        # IPv4 first, as the per-family lookups before did: callers order by
        # smtp_address_preference themselves, and tests may rely on a stable order.
        return sorted(out, key=lambda ip: ":" in ip)

    async def ptr(self, ip: str) -> list[str]:
        import asyncio
        loop = asyncio.get_running_loop()
        try:
            name, _ = await loop.getnameinfo((ip, 0), socket.NI_NAMEREQD)
        except OSError:
            return []
        return [_norm(name)]


class DnsThenNative:
    """Host addresses for smtp_host_lookup = dns, native: DNS first, and the
    system's getaddrinfo() when DNS says the name has no address (NXDOMAIN or
    no record of the type), as Postfix's smtp_addr_one(); a DNS failure to
    answer is final.  MX and PTR questions go to DNS."""

    def __init__(self, dns: Resolver, native: Resolver) -> None:
        self.dns, self.native = dns, native

    async def mx(self, domain: str) -> list[MxRecord]:
        return await self.dns.mx(domain)

    async def ptr(self, ip: str) -> list[str]:
        return await self.dns.ptr(ip)

    async def addresses(self, host: str, families: Iterable[str] = (IPV4, IPV6)) -> list[str]:
        families = tuple(families)
        try:
            found = await self.dns.addresses(host, families)
        except NoSuchDomain:
            found = []
        if found:
            return found
        # The native lookup's own failure (text and status) replaces DNS's.
        return await self.native.addresses(host, families)
