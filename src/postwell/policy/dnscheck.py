"""DNS answers for the smtpd restrictions that ask DNS.

reject_unknown_sender_domain / reject_unknown_recipient_domain: Postfix asks
for MX, then A/AAAA records of the domain (reject_unknown_mailhost): any record
means the domain exists; a null MX (RFC 7505) means it refuses mail; NXDOMAIN or
no records at all means "Domain not found"; a temporary failure turns into
defer_if_permit.  ``mailhost_lookup`` turns a postwell.dns Resolver's answers
into those words.

The other DNS-based restrictions (reject_rbl_client and the RHSBL family,
permit_dnswl_client / permit_rhswl_client, reject_unknown_helo_hostname,
check_*_{mx,ns,a}_access, permit_mx_backup) get their answers from a
``DnsChecker``: raw lookups, DNSxL queries with their cache, reply filters
("=127.0.0.[2..11]") and the reply template language of default_rbl_reply.
The resolver (real or fake) comes from the dns package.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------
# DNS-based restrictions (reject_rbl_client & co., reject_unknown_helo_hostname,
# check_*_{mx,ns,a}_access, permit_mx_backup): the DNS side, as Postfix's
# smtpd_check.c sees it.  Everything here is async and bounded by the
# resolver's timeouts; nothing blocks the event loop.

# Postfix's RBL_TXT_LIMIT: several TXT records are joined with " / " up to this size.
RBL_TXT_LIMIT = 500

SOFT = "soft"
"""A DNSxL lookup that failed temporarily (Postfix's dnsxl_stat_soft)."""


@dataclass(frozen=True)
class DnsxlHit:
    """A listed name: its A records and the joined TXT text (None without TXT)."""
    addresses: tuple[str, ...]
    txt: str | None


class DnsChecker:
    """The DNS lookups behind the DNS-based smtpd restrictions.

    ``resolver`` answers DNS questions (a postwell.dns resolver: the dnspython
    one, or the fake); ``host_resolver`` turns host names into addresses the way
    Postfix's hostname_to_sockaddr() does (the system's getaddrinfo unless the
    tests point postwell_dns_servers at their own name server).  DNSxL answers are
    cached per process like Postfix's ctable (bounded, and here also aged out).
    """

    def __init__(self, resolver, *, host_resolver=None, families=("ipv4", "ipv6"),
                 log=None, clock=time.monotonic, cache_size: int = 100,
                 cache_ttl: float = 100.0) -> None:
        self.resolver = resolver
        self.host_resolver = host_resolver if host_resolver is not None else resolver
        self.families = tuple(families)
        self.log = log
        self.clock = clock
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self._cache: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}

    @classmethod
    def from_config(cls, config, log=None) -> "DnsChecker | None":
        try:
            from postwell.dns import DnsPythonResolver, NativeResolver, families_from_inet_protocols
            resolver = DnsPythonResolver.from_config(config)
            fams = families_from_inet_protocols(config.get("inet_protocols") or "all")
        except Exception as e:  # noqa: BLE001 - no DNS package: the restrictions are skipped
            if log is not None:
                log.warning(f"DNS resolver unavailable ({e}); DNS-based restrictions skipped")
            return None
        # Postfix finds host addresses with getaddrinfo (hosts file, NSS); only a
        # configured test name server replaces that.
        hosts = resolver if config.get("postwell_dns_servers") else NativeResolver()
        return cls(resolver, host_resolver=hosts, families=fams, log=log)

    # -- raw lookups ---------------------------------------------------------
    async def lookup(self, name: str, rtype: str) -> list:
        """Records of one type: A/AAAA/NS -> [str], TXT -> [str], MX -> [MxRecord].

        Raises NoSuchDomain (NXDOMAIN, or a name the resolver must not be given)
        or DnsTempFail; [] means the name exists without such records.
        """
        from postwell.dns import MxRecord, NoSuchDomain
        from .resolve import valid_hostname
        # Postfix's dns_lookup() refuses malformed names (a trailing dot included) as
        # "not found" without asking.
        if not valid_hostname(name):
            raise NoSuchDomain(name, rtype)
        r = self.resolver
        if hasattr(r, "lookup"):
            return list(await r.lookup(name, rtype))
        if hasattr(r, "_get"):                      # postwell.dns.FakeResolver
            values = r._get(name, rtype)
            if rtype == "MX":
                return [MxRecord(int(p), h.rstrip(".").lower()) for p, h in values]
            return list(values)
        answer = await r._query(name, rtype)        # postwell.dns.DnsPythonResolver
        if answer.rrset is None:
            return []
        out: list = []
        for rd in answer.rrset:
            if rtype in ("A", "AAAA"):
                out.append(rd.address)
            elif rtype == "TXT":
                # Postfix keeps the first character-string of a record (RFC 1035 3.3.14),
                # with every byte that is not printable ASCII turned into a space.
                text = rd.strings[0] if rd.strings else b""
                out.append("".join(chr(b) if 32 <= b < 127 else " " for b in text))
            elif rtype == "MX":
                out.append(MxRecord(int(rd.preference),
                                    rd.exchange.to_text(omit_final_dot=True).lower()))
            elif rtype == "NS":
                out.append(rd.target.to_text(omit_final_dot=True).lower())
            else:
                out.append(rd.to_text())
        return out

    async def host_addresses(self, host: str, families=None) -> list[str]:
        """hostname_to_sockaddr(): the host's addresses in inet_protocols' families."""
        return await self.host_resolver.addresses(host, tuple(families or self.families))

    async def host_status(self, name: str) -> str:
        """reject_unknown_hostname's lookup: A, then AAAA, then MX; the first answer
        wins.  -> "ok" | "nullmx" | "notfound" | "retry".

        With smtpd_delay_reject every RCPT asks again; definitive answers are kept
        for a while (Postfix leaves that to the system's caching resolver)."""
        key = "host:" + name.lower()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self.clock():
            self._cache.move_to_end(key)
            return hit[1]
        status = await self._host_status(name)
        if status != "retry":
            self._remember(key, status)
        return status

    def _remember(self, key: str, value) -> None:
        self._cache[key] = (self.clock() + self.cache_ttl, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _host_status(self, name: str) -> str:
        from postwell.dns import DnsTempFail, NoSuchDomain
        retry = False
        for rtype in ("A", "AAAA", "MX"):
            try:
                records = await self.lookup(name, rtype)
            except NoSuchDomain:
                continue
            except DnsTempFail:
                retry = True
                continue
            if records:
                if rtype == "MX" and len(records) == 1 and records[0].host in ("", "."):
                    return "nullmx"         # RFC 7505: an MTA name may have a null MX
                return "ok"
        return "retry" if retry else "notfound"

    # -- DNSxL ---------------------------------------------------------------
    async def dnsxl(self, query: str):
        """None (not listed), SOFT (temporary failure) or a DnsxlHit."""
        now = self.clock()
        hit = self._cache.get(query)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(query)
            return hit[1]
        task = self._inflight.get(query)
        if task is None:
            # One query per name however many sessions ask at once; it runs as its own
            # task so that a client hanging up does not cancel it for the others.
            task = asyncio.ensure_future(self._dnsxl_lookup(query))
            self._inflight[query] = task

            def done(t: asyncio.Future, query: str = query) -> None:
                self._inflight.pop(query, None)
                if not t.cancelled() and t.exception() is None:
                    self._remember(query, t.result())
            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _dnsxl_lookup(self, query: str):
        from postwell.dns import DnsError, NoSuchDomain
        try:
            addrs = await self.lookup(query, "A")
        except NoSuchDomain:
            return None
        except DnsError as e:
            # No definitive answer: the client gets the benefit of the doubt.
            if self.log is not None:
                self.log.warning(f"{query}: RBL lookup error: Host or domain name not found. "
                                 f"Name service error for name={query} type=A: {e.detail}")
            return SOFT
        if not addrs:
            return None
        txt = None
        try:
            records = await self.lookup(query, "TXT")
        except DnsError:
            records = []
        if records:
            buf = ""
            for i, rec in enumerate(records):
                space = RBL_TXT_LIMIT - len(buf)
                if space <= 0:
                    break
                buf += rec[:space]
                if i + 1 < len(records) and RBL_TXT_LIMIT - len(buf) > 3:
                    buf += " / "
            txt = buf
        return DnsxlHit(tuple(addrs), txt)


def reverse_address_query(addr: str) -> str:
    """1.2.3.4 -> "4.3.2.1."; an IPv6 address -> its 32 nibbles reversed, dot-separated
    (the DNSBL convention, RFC 5782 2.1 / 2.4)."""
    import ipaddress
    ip = ipaddress.ip_address(addr)
    if ip.version == 6:
        return "".join(f"{n}." for n in reversed(ip.exploded.replace(":", "")))
    return "".join(f"{o}." for o in reversed(addr.split(".")))


def split_dnsxl(spec: str) -> tuple[str, str | None]:
    """"zen.example=127.0.0.[2..11]" -> ("zen.example", "127.0.0.[2..11]")."""
    domain, eq, pattern = spec.partition("=")
    return domain, (pattern if eq else None)


def parse_reply_pattern(pattern: str) -> list[frozenset[int]]:
    """A DNSxL reply filter: four octets, each a number or "[...]" with
    ";"-separated numbers and number..number ranges.  Raises ValueError with
    Postfix's complaint."""
    octets: list[frozenset[int]] = []
    i, n = 0, len(pattern)

    def number(j: int) -> tuple[int, int]:
        k = j
        while k < n and pattern[k].isdigit():
            k += 1
        if k == j or k - j > 3 or int(pattern[j:k]) > 255:
            raise ValueError(f"in \"{pattern}\": bad octet value")
        return int(pattern[j:k]), k

    while True:
        if i < n and pattern[i] == "[":
            i += 1
            values: set[int] = set()
            while True:
                lo, i = number(i)
                hi = lo
                if pattern.startswith("..", i):
                    hi, i = number(i + 2)
                    if hi < lo:
                        raise ValueError(f"in \"{pattern}\": bad octet range")
                values.update(range(lo, hi + 1))
                if i < n and pattern[i] == ";":
                    i += 1
                    continue
                if i < n and pattern[i] == "]":
                    i += 1
                    break
                raise ValueError(f"in \"{pattern}\": missing \"]\"")
            octets.append(frozenset(values))
        else:
            v, i = number(i)
            octets.append(frozenset((v,)))
        if len(octets) == 4:
            if i != n:
                raise ValueError(f"in \"{pattern}\": too many octets")
            return octets
        if i >= n or pattern[i] != ".":
            raise ValueError(f"in \"{pattern}\": too few octets")
        i += 1


def reply_matches(octets: list[frozenset[int]], addresses) -> bool:
    for a in addresses:
        parts = a.split(".")
        if len(parts) == 4 and all(p.isdigit() for p in parts) and \
                all(int(p) in o for p, o in zip(parts, octets)):
            return True
    return False


# ---------------------------------------------------------------------------
# Reply templates (default_rbl_reply, rbl_reply_maps): Postfix's mac_expand()
# subset that those use -- $name, ${name}, $(name), ${name?text}, ${name:text},
# ${name?{text}:{text}} and $$.

class TemplateError(Exception):
    pass


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def unescape(text: str) -> str:
    """Postfix's unescape(): \\t \\n \\\\ \\ooo and friends (smtpd_expansion_filter)."""
    out, i = [], 0
    simple = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
    while i < len(text):
        c = text[i]
        if c != "\\" or i + 1 >= len(text):
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in "01234567":
            j = i + 1
            while j < len(text) and j < i + 4 and text[j] in "01234567":
                j += 1
            out.append(chr(int(text[i + 1:j], 8)))
            i = j
            continue
        out.append(simple.get(nxt, nxt))
        i += 2
    return "".join(out)


def expand_template(template: str, lookup: Callable[[str], str | None], allowed: str | None) -> str:
    """Expand a reply template.  ``lookup`` returns None for an unknown name; a
    bare unknown $name makes the template bad (TemplateError), as in Postfix.
    Characters of looked-up values outside ``allowed`` become "_"."""
    allowed_set = frozenset(allowed) if allowed is not None else None

    undefined: list[str] = []

    def value_of(name: str) -> str | None:
        v = lookup(name)
        if v is None or allowed_set is None:
            return v
        return "".join(ch if ch in allowed_set else "_" for ch in v)

    def closing(text: str, i: int, open_ch: str, close_ch: str) -> int:
        depth = 1
        while i < len(text):
            if text[i] == open_ch:
                depth += 1
            elif text[i] == close_ch:
                depth -= 1
                if depth == 0:
                    return i
            i += 1
        raise TemplateError(f"missing '{close_ch}'")

    def braced(text: str) -> str:
        t = text.strip()
        if t.startswith("{") and t.endswith("}"):
            return t[1:-1]
        return text

    def expand(text: str, depth: int) -> str:
        if depth > 20:
            raise TemplateError("recursion")
        out, i = [], 0
        while i < len(text):
            c = text[i]
            if c != "$":
                out.append(c)
                i += 1
                continue
            i += 1
            if i >= len(text):
                out.append("$")
                break
            c = text[i]
            if c == "$":
                out.append("$")
                i += 1
                continue
            if c in "{(":
                close = "}" if c == "{" else ")"
                end = closing(text, i + 1, c, close)
                body = text[i + 1:end]
                i = end + 1
                j = 0
                while j < len(body) and body[j] in _NAME_CHARS:
                    j += 1
                name, rest = body[:j], body[j:].lstrip()
                if not name:
                    raise TemplateError("bad macro name")
                if not rest:
                    v = value_of(name)
                    if v is None:
                        undefined.append(name)
                    else:
                        out.append(v)
                    continue
                op, arg = rest[0], rest[1:]
                v = value_of(name)
                if op == "?":
                    yes, no = arg, None
                    s = arg.strip()
                    if s.startswith("{"):
                        k = closing(s, 1, "{", "}")
                        tail = s[k + 1:].strip()
                        yes = s[1:k]
                        if tail.startswith(":"):
                            no = braced(tail[1:])
                        elif tail:
                            raise TemplateError("bad conditional")
                    out.append(expand(yes, depth + 1) if v else
                               (expand(no, depth + 1) if no is not None else ""))
                elif op == ":":
                    out.append("" if v else expand(braced(arg), depth + 1))
                else:
                    raise TemplateError(f"bad operator {op!r}")
                continue
            j = i
            while j < len(text) and text[j] in _NAME_CHARS:
                j += 1
            if j == i:
                out.append("$")
                continue
            v = value_of(text[i:j])
            if v is None:
                undefined.append(text[i:j])
            else:
                out.append(v)
            i = j
        return "".join(out)

    result = expand(template, 0)
    # Like mac_expand(), finish (every lookup, every warning) before judging.
    if undefined:
        raise TemplateError(f"undefined {undefined[0]}")
    return result


def smtpd_macro(state, name: str, warn=None, server_name: str = "") -> str | None:
    """smtpd_expand_lookup(): the session facts a reply template may name (and
    $server_name, our myhostname); None, with a warning, for any other name."""
    def addr_part(addr: str | None, suffix: str) -> str | None:
        if addr is None:
            return ""
        if suffix == "":
            return addr or "<>"
        if suffix == "_name":
            if not addr:
                return "<>"
            return addr.rpartition("@")[0] if "@" in addr else addr
        if suffix == "_domain":
            return addr.rpartition("@")[2] if "@" in addr else ""
        return None

    simple = {
        "client": lambda: state.namaddr,
        "client_address": lambda: state.client_addr,
        "client_name": lambda: state.client_name,
        "client_port": lambda: state.client_port,
        "reverse_client_name": lambda: state.reverse_client_name,
        "helo_name": lambda: state.helo_name or "",
        "localtime": lambda: time.strftime("%b %d %H:%M:%S", time.localtime()),
    }
    if name == "server_name":
        return server_name
    if name in simple:
        return simple[name]()
    for prefix, addr in (("sender", state.sender), ("recipient", state.recipient)):
        if name.startswith(prefix):
            v = addr_part(addr, name[len(prefix):])
            if v is not None:
                return v
    if warn is not None:
        warn(f"unknown macro name \"{name}\" in expansion request")
    return None
