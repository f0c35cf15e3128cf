"""Postfix match lists: mynetworks-style host lists, domain lists, string lists.

A list is written as in main.cf: entries separated by commas or white space,
``/file/name`` pulls in the entries of a file, ``type:table`` looks the
subject up in a table, ``!entry`` negates.  The first entry that matches
decides; a negated match means "no".  This is Postfix's match_list(3)
behaviour, which is what mynetworks, relay_domains, mydestination and
friends all share.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from typing import Callable, Iterable

_SPLIT = re.compile(r"[\s,]+")
_MAX_INCLUDE_DEPTH = 20


class MatchListError(Exception):
    """A list that cannot be used (unreadable include file, bad CIDR...)."""


def _open_table(spec: str, config=None):
    from postwell.tables import get_table
    return get_table(spec, config)


def is_table_spec(entry: str) -> bool:
    # "type:name" - but not IPv6 addresses ("::1", "[::1]/128", "fe80::1").
    if entry.startswith("[") or entry.startswith("/"):
        return False
    typ, sep, _ = entry.partition(":")
    return bool(sep) and bool(typ) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", typ) is not None


def expand_entries(value: str, depth: int = 0) -> list[str]:
    """Split a list value; inline the contents of ``/file/name`` entries.

    ``!/file`` negates every entry of the file, as Postfix does.
    """
    if depth > _MAX_INCLUDE_DEPTH:
        raise MatchListError("list include files nested too deeply")
    out: list[str] = []
    for entry in _split_braced(value):
        neg = ""
        body = entry
        while body.startswith("!"):
            neg = "" if neg else "!"
            body = body[1:]
        if body.startswith("/"):
            try:
                with open(body, encoding="utf-8", errors="surrogateescape") as f:
                    text = "\n".join(line for line in f.read().splitlines()
                                     if line.strip() and not line.lstrip().startswith("#"))
            except OSError as e:
                raise MatchListError(f"open file {body}: {e.strerror}") from None
            for sub in expand_entries(text, depth + 1):
                out.append(_negate(sub) if neg else sub)
        elif body:
            out.append(neg + body)
    return out


def _negate(entry: str) -> str:
    return entry[1:] if entry.startswith("!") else "!" + entry


def _split_braced(value: str) -> list[str]:
    # "inline:{ a=b, c=d }" must stay one entry.
    out, cur, depth = [], [], 0
    for ch in value:
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        if depth == 0 and (ch in " \t\r\n,"):
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def parent_style(config, param: str) -> bool:
    """True when `param` is listed in parent_domain_matches_subdomains."""
    raw = config.get("parent_domain_matches_subdomains") if config is not None else ""
    return param in [x for x in _SPLIT.split(raw or "") if x]


# --------------------------------------------------------------------------
# Single-entry matchers (Postfix match_ops)

def match_string(entry: str, subject: str, lookup: Callable[[str, str], bool]) -> bool:
    if is_table_spec(entry):
        return lookup(entry, subject.lower())
    return entry.lower() == subject.lower()


def match_hostname(entry: str, name: str, parent: bool,
                   lookup: Callable[[str, str], bool]) -> bool:
    name = name.lower()
    if is_table_spec(entry):
        # The name, then its parent domains: "example.com" style with
        # parent matching, ".example.com" style without it.
        cur = name
        while cur:
            if lookup(entry, cur):
                return True
            i = cur.find(".", 1)
            if i < 0:
                return False
            cur = cur[i + 1:] if parent else cur[i:]
        return False
    pattern = entry.lower()
    if name == pattern:
        return True
    if parent:
        return len(name) > len(pattern) and name.endswith(pattern) \
            and name[-len(pattern) - 1] == "."
    if pattern.startswith("."):
        return len(name) > len(pattern) and name.endswith(pattern)
    return False


@functools.lru_cache(maxsize=4096)   # pure: lists are matched on every command
def parse_network(entry: str):
    """'1.2.3.0/24', '1.2.3.4', '[::1]/128', '[fe80::]/64', '::1' -> ip_network,
    or None when the entry is not an address pattern."""
    e = entry
    if e.startswith("["):
        close = e.find("]")
        if close < 0:
            return None
        e = e[1:close] + e[close + 1:]
    if not re.fullmatch(r"[0-9A-Fa-f:.]+(/\d{1,3})?", e) or not any(c.isdigit() for c in e):
        return None
    try:
        return ipaddress.ip_network(e, strict=False)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def parse_ip(addr: str):
    a = addr.strip()
    if a.startswith("[") and a.endswith("]"):
        a = a[1:-1]
    if a.lower().startswith("ipv6:"):
        a = a[5:]
    try:
        ip = ipaddress.ip_address(a.split("%", 1)[0])
    except ValueError:
        return None
    # IPv4-in-IPv6 compares as IPv4, as Postfix normalises it.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def match_hostaddr(entry: str, addr: str, lookup: Callable[[str, str], bool]) -> bool:
    if not addr or not re.fullmatch(r"[0-9A-Fa-f:.]+", addr):
        return False
    if is_table_spec(entry):
        return lookup(entry, addr)
    net = parse_network(entry)
    if net is None:
        return False
    ip = parse_ip(addr)
    if ip is None or ip.version != net.version:
        return False
    return ip in net


# --------------------------------------------------------------------------
# Lists

class _BaseList:
    def __init__(self, param: str, value: str, config=None, *, tables=None, warn=None):
        self.param = param
        self.config = config
        self.entries = expand_entries(value)
        self._tables = tables          # test stand-in: spec -> Table
        self._warn = warn

    def _lookup(self, spec: str, key: str) -> bool:
        table = self._tables.get(spec) if self._tables is not None else None
        if table is None:
            table = _open_table(spec, self.config)
        return table.lookup(key) is not None

    def _first_match(self, test: Callable[[str], bool]) -> bool:
        for entry in self.entries:
            neg = entry.startswith("!")
            body = entry[1:] if neg else entry
            if test(body):
                return not neg
        return False

    def __bool__(self) -> bool:
        return bool(self.entries)


class StringList(_BaseList):
    """Exact (case-insensitive) names or table keys: mydestination,
    virtual_alias_domains, virtual_mailbox_domains."""

    def match(self, subject: str) -> bool:
        return self._first_match(lambda e: match_string(e, subject, self._lookup))


class DomainList(_BaseList):
    """Domain names with parent-domain matching: relay_domains and friends."""

    def __init__(self, param: str, value: str, config=None, *, parent: bool | None = None, **kw):
        super().__init__(param, value, config, **kw)
        self.parent = parent_style(config, param) if parent is None else parent

    def match(self, domain: str) -> bool:
        d = domain.lower()
        if d.endswith(".") and not d.endswith(".."):
            d = d[:-1]
        return self._first_match(lambda e: match_hostname(e, d, self.parent, self._lookup))


class HostList(_BaseList):
    """Client host lists (namadr_list): mynetworks, permit_mx_backup_networks...
    Entries match the client name (domain style) or address (CIDR style)."""

    def __init__(self, param: str, value: str, config=None, *, parent: bool | None = None, **kw):
        super().__init__(param, value, config, **kw)
        self.parent = parent_style(config, param) if parent is None else parent
        static = True
        for entry in self.entries:
            body = entry.lstrip("!")
            if is_table_spec(body):
                static = False
            elif "/" in body and parse_network(body) is None:
                raise MatchListError(f"{param}: bad net/mask pattern: \"{body}\"")
        # Asked at every connection and RCPT (mynetworks, the anvil exceptions...): with
        # address/name patterns only, the answer for a client never changes, so it is
        # kept (bounded); a list naming a table is asked every time (tables change).
        self._cache: dict | None = {} if static else None

    def match(self, name: str | None, addr: str | None) -> bool:
        cache = self._cache
        if cache is None:
            return self._match(name, addr)
        key = (name, addr)
        hit = cache.get(key)
        if hit is None:
            hit = self._match(name, addr)      # an exception is not kept
            if len(cache) >= 4096:
                cache.clear()
            cache[key] = hit
        return hit

    def _match(self, name: str | None, addr: str | None) -> bool:
        def test(e: str) -> bool:
            if addr and match_hostaddr(e, addr, self._lookup):
                return True
            if name and parse_network(e) is None and not is_table_spec(e):
                return match_hostname(e, name, self.parent, self._lookup)
            if name and is_table_spec(e):
                return match_hostname(e, name, self.parent, self._lookup)
            return False
        return self._first_match(test)


# --------------------------------------------------------------------------
# Our own addresses (inet_interfaces / proxy_interfaces)

def _system_addresses() -> list[str]:
    """Every address configured on this host (what inet_interfaces=all means)."""
    addrs: set[str] = {"127.0.0.1", "::1"}
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if "/32 host LOCAL" in line and i > 0:
                m = re.search(r"(\d+\.\d+\.\d+\.\d+)", lines[i - 1])
                if m:
                    addrs.add(m.group(1))
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                hexaddr = line.split()[0]
                addrs.add(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except (OSError, ValueError, IndexError):
        pass
    return sorted(addrs)


def interface_addresses(value: str, inet_protocols: str = "all",
                        system_addresses: Callable[[], list[str]] = _system_addresses) -> list[str]:
    """Addresses named by an inet_interfaces/proxy_interfaces value."""
    protos = {p.lower() for p in _SPLIT.split(inet_protocols or "all") if p}
    want4 = "all" in protos or "ipv4" in protos
    want6 = "all" in protos or "ipv6" in protos
    out: list[str] = []
    for entry in (x for x in _SPLIT.split(value or "") if x):
        low = entry.lower()
        if low == "all":
            cands = system_addresses()
        elif low == "loopback-only":
            cands = ["127.0.0.1", "::1"]
        else:
            ip = parse_ip(entry)
            if ip is not None:
                cands = [str(ip)]
            else:
                # A host name: only names that resolve without the network
                # (localhost, /etc/hosts); never leave the machine here.
                cands = []
                try:
                    for info in socket.getaddrinfo(entry, None, flags=socket.AI_NUMERICSERV):
                        cands.append(info[4][0])
                except OSError:
                    pass
        for c in cands:
            ip = parse_ip(c)
            if ip is None:
                continue
            if (ip.version == 4 and want4) or (ip.version == 6 and want6):
                s = str(ip)
                if s not in out:
                    out.append(s)
    return out


class OwnAddresses:
    """inet_interfaces + proxy_interfaces, for user@[ip] and permit_inet_interfaces."""

    def __init__(self, config, *, system_addresses=_system_addresses):
        protos = config.get("inet_protocols") or "all"
        self.inet = {parse_ip(a) for a in interface_addresses(config.get("inet_interfaces") or "all",
                                                              protos, system_addresses)}
        self.proxy = {parse_ip(a) for a in interface_addresses(config.get("proxy_interfaces"),
                                                               "all", system_addresses)}

    def is_inet(self, addr: str) -> bool:
        ip = parse_ip(addr)
        return ip is not None and ip in self.inet

    def is_own(self, addr: str) -> bool:
        ip = parse_ip(addr)
        return ip is not None and (ip in self.inet or ip in self.proxy)


def default_mynetworks(config, *, system_addresses=_system_addresses) -> str:
    """mynetworks when main.cf leaves it unset, from mynetworks_style.

    host: our own addresses; subnet: the loopback nets and our addresses'
    /24 (IPv4) and /64 (IPv6) - an approximation of the interface netmask;
    class: the class A/B/C network of each address.
    """
    style = (config.get("mynetworks_style") or "host").strip().lower()
    addrs = interface_addresses("all", config.get("inet_protocols") or "all", system_addresses)
    nets: list[str] = []
    for a in addrs:
        ip = ipaddress.ip_address(a)
        if style == "host":
            n = ipaddress.ip_network(f"{a}/{ip.max_prefixlen}")
        elif style == "class" and ip.version == 4:
            first = int(str(ip).split(".")[0])
            plen = 8 if first < 128 else 16 if first < 192 else 24
            n = ipaddress.ip_network(f"{a}/{plen}", strict=False)
        else:
            plen = 8 if ip.is_loopback and ip.version == 4 else (24 if ip.version == 4 else 64)
            if ip.version == 6 and ip.is_loopback:
                plen = 128
            n = ipaddress.ip_network(f"{a}/{plen}", strict=False)
        s = f"[{n.network_address}]/{n.prefixlen}" if n.version == 6 else str(n)
        if s not in nets:
            nets.append(s)
    return " ".join(nets)


def mynetworks_list(config, **kw) -> HostList:
    value = config.get("mynetworks") if config.is_set("mynetworks") or config.get("mynetworks") \
        else default_mynetworks(config)
    return HostList("mynetworks", value, config, **kw)


def iter_nonempty(values: Iterable[str]) -> list[str]:
    return [v for v in values if v]


__all__ = [
    "MatchListError", "StringList", "DomainList", "HostList", "OwnAddresses",
    "interface_addresses", "default_mynetworks", "mynetworks_list", "parent_style",
    "expand_entries", "is_table_spec", "parse_ip", "parse_network",
]
