"""Address classes and next-hop resolution (Postfix's trivial-rewrite).

``AddressResolver(config).resolve(address)`` answers, for one envelope
recipient in internal (unquoted) form, which address class it belongs to
(ADDRESS_CLASS_README), which transport delivers it, to which next hop, and
the address as it will be delivered.  The smtpd uses it for the relay
decision and for reject_unlisted_recipient; the qmgr for routing.

Open-relay tricks are handled the way Postfix handles them: local domains are
stripped off one at a time, and what is left (user%host, host!user,
"user@host", @route:user@host) is re-parsed and resolved again, so
``user%remote@ourdomain`` resolves to the remote domain, not to us.  Routing
operators left in the local part of a non-local address raise the ROUTED
flag, which makes permit_auth_destination refuse to relay.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .matchlist import DomainList, OwnAddresses, StringList, is_table_spec, parse_ip


class ResolveFlag(enum.IntFlag):
    # Same bit meanings as Postfix's resolve_clnt.h, so logs can be compared.
    FLAG_FINAL = 1 << 1     # unused by Postfix >= 2.0, kept for numbering
    FLAG_ROUTED = 1 << 2    # routing operators left in the local part
    FLAG_ERROR = 1 << 3     # malformed domain
    FLAG_FAIL = 1 << 4      # table lookup failure: try again later
    CLASS_LOCAL = 1 << 8
    CLASS_ALIAS = 1 << 9
    CLASS_VIRTUAL = 1 << 10
    CLASS_RELAY = 1 << 11
    CLASS_DEFAULT = 1 << 12


CLASS_MASK = (ResolveFlag.CLASS_LOCAL | ResolveFlag.CLASS_ALIAS | ResolveFlag.CLASS_VIRTUAL
              | ResolveFlag.CLASS_RELAY | ResolveFlag.CLASS_DEFAULT)
# "final delivery" classes: accepted from anyone, never relaying.
CLASS_FINAL = ResolveFlag.CLASS_LOCAL | ResolveFlag.CLASS_ALIAS | ResolveFlag.CLASS_VIRTUAL

# Plain ints for the per-RCPT tests: an int & IntFlag goes through enum's Python
# operators (a few microseconds each), int & int does not.
_ROUTED = int(ResolveFlag.FLAG_ROUTED)
_ERROR = int(ResolveFlag.FLAG_ERROR)
_FAIL = int(ResolveFlag.FLAG_FAIL)
_FINAL = int(CLASS_FINAL)
_MASK = int(CLASS_MASK)
_LOCAL = int(ResolveFlag.CLASS_LOCAL)
_ALIAS = int(ResolveFlag.CLASS_ALIAS)
_VIRTUAL = int(ResolveFlag.CLASS_VIRTUAL)
_RELAY = int(ResolveFlag.CLASS_RELAY)

_CLASS_NAMES = {
    ResolveFlag.CLASS_LOCAL: "local",
    ResolveFlag.CLASS_ALIAS: "alias",
    ResolveFlag.CLASS_VIRTUAL: "virtual",
    ResolveFlag.CLASS_RELAY: "relay",
    ResolveFlag.CLASS_DEFAULT: "default",
}


@dataclass(frozen=True)
class Resolved:
    address_class: str          # local | alias | virtual | relay | default ("" on failure)
    transport: str              # "local", "virtual", "smtp", "error", ...
    nexthop: str                # domain, "[host]:port", relayhost, or error text
    recipient: str              # the resolved address, user@domain, internal form
    flags: int = 0

    @property
    def routed(self) -> bool:
        return bool(self.flags & _ROUTED)

    @property
    def error(self) -> bool:
        return bool(self.flags & _ERROR)

    @property
    def failed(self) -> bool:
        return bool(self.flags & _FAIL)

    @property
    def is_final(self) -> bool:
        return bool(self.flags & _FINAL)

    @property
    def domain(self) -> str:
        return self.recipient.rpartition("@")[2]


class ResolveError(Exception):
    """A table needed for resolution could not be searched (try again later)."""


# --------------------------------------------------------------------------
# Syntax helpers

_SPECIALS = set('()<>@,;:\\".[]')


def _needs_quoting(local: str) -> bool:
    # RFC 5322 3.2.3 dot-atom: atoms separated by single dots.
    if local == "":
        return True
    for atom in local.split("."):
        if atom == "":
            return True
        for ch in atom:
            if ch in _SPECIALS or ch <= " " or ch == "\x7f":
                return True
    return False


def _unquoted_positions(s: str, ch: str) -> list[int]:
    out, inq, esc = [], False, False
    for i, c in enumerate(s):
        if esc:
            esc = False
        elif c == "\\":
            esc = True
        elif c == '"':
            inq = not inq
        elif c == ch and not inq:
            out.append(i)
    return out


def _dequote(s: str) -> str:
    out, inq, esc = [], False, False
    for c in s:
        if esc:
            out.append(c)
            esc = False
        elif c == "\\" and inq:
            esc = True
        elif c == '"':
            inq = not inq
        else:
            out.append(c)
    return "".join(out)


def _single_qstring(s: str) -> bool:
    if len(s) < 2 or s[0] != '"' or s[-1] != '"':
        return False
    esc = False
    for c in s[1:-1]:
        if esc:
            esc = False
        elif c == "\\":
            esc = True
        elif c == '"':
            return False
    return not esc


class _Addr:
    """A parsed address: local part (raw external text or quoted string
    contents) and optional domain.  Mirrors the few tok822 operations the
    resolver needs."""

    __slots__ = ("local", "quoted", "domain")

    def __init__(self, local: str, quoted: bool, domain: str | None):
        self.local, self.quoted, self.domain = local, quoted, domain

    @classmethod
    def scan(cls, ext: str) -> "_Addr":
        ats = _unquoted_positions(ext, "@")
        if ats:
            local_raw, domain = ext[:ats[-1]], ext[ats[-1] + 1:]
        else:
            local_raw, domain = ext, None
        if _single_qstring(local_raw):
            return cls(_dequote(local_raw), True, domain)
        return cls(local_raw, False, domain)

    @classmethod
    def from_internal(cls, addr: str) -> "_Addr":
        # quote_822_local(): quote the local part when it is not a dot-atom.
        local, sep, domain = addr.rpartition("@")
        if not sep:
            local, domain = addr, None
        if _needs_quoting(local):
            return cls(local, True, domain)
        return cls(local, False, domain)

    def has_unquoted(self, ch: str) -> bool:
        return not self.quoted and bool(_unquoted_positions(self.local, ch))

    def internal(self) -> str:
        local = self.local if self.quoted else _dequote(self.local)
        return local if self.domain is None else f"{local}@{self.domain}"


# Postfix accepts "_" in names (observed: HELO bad_name.example is valid).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_\-\x80-\U0010ffff]{1,63}(?<!-)")


def valid_hostname(name: str) -> bool:
    if not name or len(name) > 255 or name.startswith(".") or name.endswith("."):
        return False
    labels = name.split(".")
    if any(not _LABEL.fullmatch(label) for label in labels):
        return False
    # All-numeric names look like addresses, which Postfix refuses as names.
    return not all(label.isdigit() for label in labels)


def valid_hostliteral(lit: str) -> bool:
    if not (lit.startswith("[") and lit.endswith("]")):
        return False
    inner = lit[1:-1]
    if inner.lower().startswith("ipv6:"):
        return ":" in inner[5:] and parse_ip(inner[5:]) is not None
    return re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", inner) is not None and parse_ip(inner) is not None


def valid_mailhost_addr(text: str) -> str | None:
    """'1.2.3.4' or 'IPv6:::1' -> the bare address, else None."""
    if text.lower().startswith("ipv6:"):
        bare = text[5:]
        ip = parse_ip(bare)
        return bare if ip is not None and ":" in bare else None
    if re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", text) and parse_ip(text) is not None:
        return text
    return None


# --------------------------------------------------------------------------

def to_internal(address: str) -> str:
    """External (RFC 5321) form to Postfix's internal form: '"a b"@x' -> 'a b@x'.

    The smtpd should hand the policy internal forms, as Postfix's smtpd does;
    this is the safety net for a quoted local part that slipped through.
    """
    if address.startswith('"'):
        a = _Addr.scan(address)
        if a.quoted:
            return a.internal()
    return address


def strip_source_route(address: str) -> str:
    """'@a,@b:user@dom' -> 'user@dom' (RFC 5321 4.1.2: routes are ignored)."""
    if address.startswith("@"):
        colon = address.find(":")
        if 0 < colon < len(address) - 1:
            return address[colon + 1:]
    return address


def _lookup_table(tables, config, spec: str, key: str) -> str | None:
    t = tables.get(spec) if tables is not None else None
    if t is None:
        from postwell.tables import get_table
        t = get_table(spec, config)
    return t.lookup(key)


# Resolved addresses kept per process, and the longest address kept: at most
# about half a megabyte, whatever the clients send.
_CACHE_MAX = 1024
_CACHE_ADDRESS_MAX = 256


class AddressResolver:
    """trivial-rewrite's resolve service, in-process.

    ``tables`` (spec -> object with .lookup) and ``own_addresses`` exist so
    tests can stand in for postwell.tables and the host's interfaces.
    """

    def __init__(self, config, *, tables=None, own_addresses: OwnAddresses | None = None, log=None):
        self.config = config
        self.log = log
        self._tables = tables
        g = config.get
        self.myhostname = g("myhostname")
        self.myorigin = g("myorigin")
        self.mydomain = g("mydomain")
        self.percent_hack = config.get_bool("allow_percent_hack")
        self.swap_bangpath = config.get_bool("swap_bangpath")
        self.append_at_myorigin = config.get_bool("append_at_myorigin")
        self.append_dot_mydomain = config.get_bool("append_dot_mydomain")
        self.resolve_dequoted = config.get_bool("resolve_dequoted_address")
        self.resolve_null_domain = config.get_bool("resolve_null_domain")
        self.resolve_numeric_domain = config.get_bool("resolve_numeric_domain")
        self.empty_address_recipient = g("empty_address_recipient") or "MAILER-DAEMON"
        self.show_table = config.get_bool("show_user_unknown_table_name")
        self.allow_min_user = config.get_bool("allow_min_user")
        kw = {"tables": tables}
        self.mydestination = StringList("mydestination", g("mydestination"), config, **kw)
        self.virtual_alias_domains = StringList("virtual_alias_domains",
                                                g("virtual_alias_domains"), config, **kw)
        self.virtual_mailbox_domains = StringList("virtual_mailbox_domains",
                                                  g("virtual_mailbox_domains"), config, **kw)
        self.relay_domains = DomainList("relay_domains", g("relay_domains"), config, **kw)
        self.own = own_addresses if own_addresses is not None else OwnAddresses(config)
        self.local_transport = g("local_transport")
        self.virtual_transport = g("virtual_transport")
        self.relay_transport = g("relay_transport")
        self.default_transport = g("default_transport")
        self.relayhost = g("relayhost")
        self.transport_maps = [x for x in config.get_list("transport_maps")]
        self.relocated_maps = [x for x in config.get_list("relocated_maps")]
        self.sender_relayhost_maps = [x for x in config.get_list("sender_dependent_relayhost_maps")]
        self.recipient_delimiter = g("recipient_delimiter")
        self.transport_parent = "transport_maps" in config.get_list("parent_domain_matches_subdomains")
        # The answer for an address depends only on the configuration (fixed for the
        # process: a reload starts new ones) unless a table takes part, whose contents
        # may change under us.  Without tables every RCPT of the same address (and the
        # qmgr's resolve of each message) would redo the same rewrite and list walks.
        static = not (self.transport_maps or self.relocated_maps or self.sender_relayhost_maps) \
            and not any(is_table_spec(e.lstrip("!"))
                        for lst in (self.mydestination, self.virtual_alias_domains,
                                    self.virtual_mailbox_domains, self.relay_domains)
                        for e in lst.entries)
        self._cache: dict | None = {} if static else None
        self._known_lists: dict[str, list[str]] = {}

    # -- table helpers ----------------------------------------------------
    def _lookup(self, spec: str, key: str) -> str | None:
        try:
            return _lookup_table(self._tables, self.config, spec, key)
        except Exception as e:  # TableError and friends: Postfix says "try again"
            raise ResolveError(f"{spec}: {e}") from None

    def _maps_find(self, specs: list[str], key: str) -> str | None:
        for spec in specs:
            v = self._lookup(spec, key)
            if v is not None:
                return v
        return None

    # -- local domain test (resolve_local) --------------------------------
    def is_local_domain(self, domain: str) -> bool:
        d = domain
        if d.endswith("."):
            d = d[:-1]
        if not d or d.endswith("."):
            return False
        try:
            if self.mydestination.match(d):
                return True
        except ResolveError:
            raise
        except Exception as e:
            raise ResolveError(f"mydestination: {e}") from None
        if d.startswith("[") and d.endswith("]"):
            bare = valid_mailhost_addr(d[1:-1])
            if bare is not None and self.own.is_own(bare):
                return True
        return False

    # -- rewrite (canonical form, local context) --------------------------
    def _rewrite_canon(self, a: _Addr) -> _Addr:
        """rewrite_tree(): source route, bang path, percent hack, @myorigin."""
        if a.quoted:
            if a.domain is None and a.local == "":
                return a  # the null address stays null
        else:
            local = a.local
            if a.domain is None and local.startswith("@"):
                colons = _unquoted_positions(local, ":")
                if colons and colons[0] != len(local) - 1:
                    a = _Addr.scan(local[colons[0] + 1:])
        if a.domain is None:
            if self.swap_bangpath and a.has_unquoted("!"):
                i = _unquoted_positions(a.local, "!")[0]
                a = _Addr(a.local[i + 1:], False, a.local[:i])
            elif self.percent_hack and a.has_unquoted("%"):
                i = _unquoted_positions(a.local, "%")[-1]
                a = _Addr(a.local[:i], False, a.local[i + 1:])
            elif self.append_at_myorigin and self.myorigin:
                a = _Addr(a.local, a.quoted, self.myorigin)
        if (self.append_dot_mydomain and self.mydomain and a.domain
                and not a.domain.startswith("[") and "." not in a.domain):
            a = _Addr(a.local, a.quoted, f"{a.domain}.{self.mydomain}")
        if a.domain and a.domain.endswith(".") and not a.domain.endswith(".."):
            a = _Addr(a.local, a.quoted, a.domain[:-1])
        return a

    def rewrite(self, address: str) -> str:
        """Canonicalise an internal-form address as the smtpd does before
        resolving (rewrite_clnt_internal, local context)."""
        if address == "":
            return address
        address = strip_source_route(address)
        a = _Addr.from_internal(address)
        return self._rewrite_canon(a).internal()

    # -- the resolver proper ----------------------------------------------
    def _strip_local(self, address: str) -> tuple[_Addr, bool]:
        """Strip local domains until a remote domain or none is left.
        Returns (address, remote) where remote says a domain is left."""
        a = _Addr.from_internal(address)
        saved_domain: str | None = None
        loop_max = len(address) + 100
        for _ in range(loop_max):
            if a.domain is not None and a.domain.endswith(".") and a.domain[:-1] \
                    and not a.domain.endswith(".."):
                a = _Addr(a.local, a.quoted, a.domain[:-1])
            if (self.resolve_numeric_domain and a.domain
                    and valid_mailhost_addr(a.domain) is not None and ":" not in a.domain):
                # resolve_numeric_domain: user@1.2.3.4 is user@[1.2.3.4], before the
                # local-domain test (Postfix's resolve_addr()).
                a = _Addr(a.local, a.quoted, f"[{a.domain}]")
            if a.domain == "" and self.resolve_null_domain:
                # Otherwise "user@" keeps its empty domain: remote, and malformed (the
                # error flag; 501 at the smtpd for bob@@ourdomain, checked against 3.7).
                a = _Addr(a.local, a.quoted, None)
            if a.domain is not None:
                # An empty domain counts as local (Postfix's resolve_addr() strips a
                # trailing "@" with nothing after it and puts it back at the end): the
                # address keeps its empty domain and gets the error flag below.
                if a.domain and not self.is_local_domain(a.domain):
                    return a, True
                saved_domain = a.domain
                a = _Addr(a.local, a.quoted, None)
            if a.has_unquoted("@") or (self.swap_bangpath and a.has_unquoted("!")) \
                    or (self.percent_hack and a.has_unquoted("%")):
                if a.has_unquoted("@"):
                    inner = _Addr.scan(a.local)
                    if inner.domain is not None and not a.local.startswith("@"):
                        a = self._rewrite_canon(inner)
                        continue
                a = self._rewrite_canon(a)
                continue
            if a.quoted and self.resolve_dequoted:
                lp = a.local
                oper = lp.rfind("@")
                if oper < 0 and self.percent_hack:
                    oper = lp.rfind("%")
                if oper < 0 and self.swap_bangpath:
                    oper = lp.rfind("!")
                if oper >= 0:
                    if lp[oper] == "%":
                        lp = lp[:oper] + "@" + lp[oper + 1:]
                    if lp[oper] == "@":
                        inner = _Addr.from_internal(strip_source_route(lp))
                    else:
                        inner = _Addr(lp, False, None)
                    a = self._rewrite_canon(inner)
                    continue
            if a.local == "":
                # An empty local part, quoted or not, becomes $empty_address_recipient
                # (Postfix: "for consistency with our own From: message headers").
                a = _Addr(self.empty_address_recipient, False, None)
            break
        if saved_domain == "":
            # "MAILER-DAEMON@": not a valid domain, so the caller flags an error;
            # Postfix cuts the resolve short as the default class, as for "user@".
            return _Addr(a.local, a.quoted, ""), True
        if saved_domain is not None:
            return _Addr(a.local, a.quoted, saved_domain), False
        return _Addr(a.local, a.quoted, self.myhostname), False

    def resolve(self, address: str, sender: str | None = None, *, rewrite: bool = True) -> Resolved:
        cache = self._cache
        if cache is not None:
            # Without sender_dependent_relayhost_maps the sender plays no part.
            hit = cache.get((address, rewrite))
            if hit is not None:
                return hit
        try:
            r = self._resolve(address, sender, rewrite)
        except ResolveError:
            return Resolved("", "", "", address, int(ResolveFlag.FLAG_FAIL))
        if cache is not None and not r.flags & _FAIL and len(address) <= _CACHE_ADDRESS_MAX:
            # A failure is not kept: it is logged (null transport) and retried each time.
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[(address, rewrite)] = r
        return r

    def syntax_error(self, address: str, domain_checked: bool = True) -> bool:
        """Postfix's smtpd_check_addr(): would trivial-rewrite flag this non-empty,
        internal-form MAIL/RCPT/VRFY address as malformed (the smtpd answers 501)?

        ``domain_checked``: the caller has already refused a bad domain as sent
        (the smtp engine does for MAIL and RCPT).  Then, without routing operators
        in the local part, the resolved address keeps the local part and domain as
        sent, so only allow_min_user's '-' is left to look at: no resolve per
        command.  With them (user%host@ourdomain, a@b@ourdomain) what counts is
        what is left once the local domains are stripped.
        """
        if domain_checked:
            at = address.rfind("@")
            local = address[:at] if at >= 0 else address
            if "@" not in local and "%" not in local and "!" not in local:
                return not self.allow_min_user and local[:1] == "-"
        return self.resolve(address).error

    def _resolve(self, address: str, sender: str | None, rewrite: bool) -> Resolved:
        address = to_internal(address)
        if rewrite:
            address = self.rewrite(address)
        flags = ResolveFlag(0)
        a, remote = self._strip_local(address)
        nextrcpt = a.internal()
        rcpt_domain = nextrcpt.rpartition("@")[2]
        if rcpt_domain.startswith("["):
            if not valid_hostliteral(rcpt_domain):
                flags |= ResolveFlag.FLAG_ERROR
        elif not valid_hostname(rcpt_domain):
            flags |= ResolveFlag.FLAG_ERROR
        # Routing operators left of the domain, whatever our own settings:
        # the next hop may honour them (backup MX relaying through primary).
        cut = len(nextrcpt)
        for op in "@!%":
            i = nextrcpt.find(op)
            if 0 <= i < cut:
                cut = i
        if nextrcpt[cut + 1:] != rcpt_domain:
            flags |= ResolveFlag.FLAG_ROUTED

        dom = rcpt_domain.lower()
        blame = ""
        if remote:
            if self.virtual_alias_domains and self._match(self.virtual_alias_domains, dom):
                channel = "error"
                # trivial-rewrite's words, DSN status included (checked against 3.7).
                nexthop = "5.1.1 User unknown" + (" in virtual alias table" if self.show_table else "")
                flags |= ResolveFlag.CLASS_ALIAS
            elif self.virtual_mailbox_domains and self._match(self.virtual_mailbox_domains, dom):
                channel, nexthop, blame = self.virtual_transport, rcpt_domain, "virtual_transport"
                flags |= ResolveFlag.CLASS_VIRTUAL
            else:
                if self.relay_domains and self._match(self.relay_domains, dom):
                    channel, blame = self.relay_transport, "relay_transport"
                    flags |= ResolveFlag.CLASS_RELAY
                else:
                    channel, blame = self.default_transport, "default_transport"
                    flags |= ResolveFlag.CLASS_DEFAULT
                relayhost = self.relayhost
                if sender is not None and self.sender_relayhost_maps:
                    relayhost = self._sender_relayhost(sender) or relayhost
                nexthop = relayhost or rcpt_domain
        else:
            channel, nexthop, blame = self.local_transport, rcpt_domain, "local_transport"
            flags |= ResolveFlag.CLASS_LOCAL

        # main.cf "transport:nexthop" beats relayhost (local_transport = local:$myhostname).
        channel, sep, dest = channel.partition(":")
        if sep and dest:
            nexthop = dest
        if not channel:
            # Postfix: "null transport is not allowed" -> try again later.
            if self.log is not None:
                self.log.warning(f"file {self.config.config_dir}/main.cf: parameter {blame}: "
                                 "null transport is not allowed")
            return Resolved("", "", "", nextrcpt, int(flags | ResolveFlag.FLAG_FAIL))

        if self.transport_maps and not (flags & ResolveFlag.CLASS_ALIAS):
            channel, nexthop = self._transport_lookup(nextrcpt, rcpt_domain, channel, nexthop)

        if self.relocated_maps:
            newloc = self._mail_addr_find(self.relocated_maps, nextrcpt, local_ok=not remote)
            if newloc is not None:
                # resolve.c: the status travels in the next hop text (checked against 3.7:
                # "550 5.1.6" at RCPT, dsn=5.1.6 from error(8)); RFC 3463 X.1.6 "moved".
                channel, nexthop = "error", f"5.1.6 User has moved to {newloc}"

        if not self.allow_min_user and nextrcpt.startswith("-"):
            # trivial-rewrite's resolve.c: an address starting with '-' could pass for
            # a command-line option; the error flag makes the smtpd refuse it (501) and
            # the qmgr bounce it ("5.1.3 bad address syntax"), the class is kept.
            flags |= ResolveFlag.FLAG_ERROR

        cls = _CLASS_NAMES.get(ResolveFlag(flags & CLASS_MASK), "")
        return Resolved(cls, channel, nexthop, nextrcpt, int(flags))

    def _match(self, lst, domain: str) -> bool:
        try:
            return lst.match(domain)
        except ResolveError:
            raise
        except Exception as e:
            raise ResolveError(f"{lst.param}: {e}") from None

    def _sender_relayhost(self, sender: str) -> str | None:
        key = sender or self.config.get("empty_address_relayhost_maps_lookup_key") or "<>"
        if not sender:
            return self._maps_find(self.sender_relayhost_maps, key)
        return self._mail_addr_find(self.sender_relayhost_maps, sender, local_ok=False,
                                    domain_at=True)

    def _transport_lookup(self, rcpt: str, rcpt_domain: str, channel: str, nexthop: str):
        """transport(5): user@domain, domain, parent domains, then '*'."""
        value = None
        keys = [rcpt.lower()]
        d = self.recipient_delimiter
        local, _, _dom = rcpt.rpartition("@")
        if d:
            for ch in d:
                if ch in local:
                    stripped = local.split(ch, 1)[0]
                    keys.append(f"{stripped}@{_dom}".lower())
                    break
        for k in keys:
            value = self._maps_find_full(self.transport_maps, k)
            if value is not None:
                break
        if value is None:
            name = rcpt_domain.lower()
            first = True
            while name:
                value = self._maps_find_full(self.transport_maps, name, partial=not first)
                if value is not None:
                    break
                i = name.find(".", 1)
                if i < 0:
                    break
                name = name[i + 1:] if self.transport_parent else name[i:]
                first = False
        if value is None:
            value = self._maps_find_full(self.transport_maps, "*", partial=True)
        if value is None:
            return channel, nexthop
        new_channel, _, new_nexthop = value.strip().partition(":")
        new_channel, new_nexthop = new_channel.strip(), new_nexthop.strip()
        if not new_channel:
            if new_nexthop:
                nexthop = new_nexthop
        else:
            channel = new_channel
            if new_nexthop:
                nexthop = new_nexthop
            elif channel not in ("error", "retry"):
                nexthop = rcpt_domain
            else:
                nexthop = "Address is undeliverable"
        return channel, nexthop

    def _maps_find_full(self, specs: list[str], key: str, partial: bool = False) -> str | None:
        for spec in specs:
            if partial and _is_regexp(spec):
                continue  # regexp tables see only full keys (DICT_FLAG_FIXED)
            v = self._lookup(spec, key)
            if v is not None:
                return v
        return None

    def _mail_addr_find(self, specs: list[str], address: str, *, local_ok: bool,
                        domain_at: bool = True) -> str | None:
        for key in mail_addr_keys(address, self.recipient_delimiter, local_ok=local_ok,
                                  domain_at=domain_at):
            v = self._maps_find_full(specs, key.key, partial=key.partial)
            if v is not None:
                return v
        return None

    # -- recipient validation (reject_unlisted_recipient) -----------------
    def _lists(self, name: str) -> list[str]:
        """A list parameter, parsed once (the configuration is fixed for the process):
        reject_unlisted_recipient asks for four to six of them at every RCPT."""
        got = self._known_lists.get(name)
        if got is None:
            got = self._known_lists[name] = self.config.get_list(name)
        return got

    def recipient_known(self, resolved: Resolved, *, sender_check: bool = False) -> tuple[bool, str | None]:
        """Is the resolved recipient listed for its address class?

        Returns (True, None) when known, or when the class has no recipient
        table; (False, table_name) otherwise, where table_name is "local
        recipient table", "virtual mailbox table", "virtual alias table" or
        "relay recipient table".  Raises ResolveError on a table failure.
        """
        rcpt = resolved.recipient
        cfg = self.config
        lists = self._lists
        # Anything a canonical or virtual alias map rewrites is taken as known.
        maps = lists("recipient_canonical_maps")
        if sender_check:
            maps = maps + lists("sender_canonical_maps")
        maps = maps + lists("canonical_maps") + lists("virtual_alias_maps")
        if maps and self._mail_addr_find(_open_ok(maps), rcpt,
                                         local_ok=self.is_local_domain(resolved.domain)) is not None:
            return True, None
        if resolved.transport == "error":
            if resolved.flags & _ALIAS:
                return False, "virtual alias table"
            return False, None
        if resolved.transport == "retry":
            return False, None
        flags = resolved.flags & _MASK
        if flags == _LOCAL:
            lrm = lists("local_recipient_maps")
            if not lrm:
                return True, None
            localpart = rcpt.rpartition("@")[0].lower()
            for special in (cfg.get("double_bounce_sender") or "double-bounce",
                            "postmaster", "mailer-daemon"):
                if localpart == special.lower():
                    return True, None
            found = self._mail_addr_find(_open_ok(lrm), rcpt, local_ok=True)
            return (True, None) if found is not None else (False, "local recipient table")
        if flags == _VIRTUAL:
            vmm = lists("virtual_mailbox_maps")
            if not vmm:
                return True, None
            found = self._mail_addr_find(_open_ok(vmm), rcpt, local_ok=False)
            return (True, None) if found is not None else (False, "virtual mailbox table")
        if flags == _RELAY:
            rrm = lists("relay_recipient_maps")
            if not rrm:
                return True, None
            found = self._mail_addr_find(_open_ok(rrm), rcpt, local_ok=False)
            return (True, None) if found is not None else (False, "relay recipient table")
        return True, None


def _is_regexp(spec: str) -> bool:
    s = spec
    while s.startswith("proxy:"):
        s = s[6:]
    return s.split(":", 1)[0].lower() in ("regexp", "pcre", "cidr")


def _open_ok(specs: list[str]) -> list[str]:
    # Table types postwell cannot open (nis:, ldap: ...) are skipped the way
    # a table that never matches is, but only for those types.
    from postwell.policy.matchlist import is_table_spec as _ts
    out = []
    for s in specs:
        t = s
        while t.startswith("proxy:"):
            t = t[6:]
        if _ts(t) and t.split(":", 1)[0].lower() in ("nis", "nisplus", "netinfo"):
            continue
        out.append(s)
    return out


@dataclass(frozen=True)
class _Key:
    key: str
    partial: bool


def mail_addr_keys(address: str, delimiter: str = "", *, local_ok: bool,
                   domain_at: bool = True) -> list[_Key]:
    """mail_addr_find() key order for recipient tables: user+ext@domain,
    user@domain, then (local domains only) user+ext, user, then @domain."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        local, domain = address, ""
    domain = domain.lower()
    local_l = local.lower()
    keys = [_Key(f"{local_l}@{domain}" if domain else local_l, False)]
    stripped = None
    if delimiter:
        for ch in delimiter:
            if ch in local_l and not local_l.startswith(ch):
                stripped = local_l.split(ch, 1)[0]
                break
    if stripped is not None:
        keys.append(_Key(f"{stripped}@{domain}", True))
    if local_ok:
        keys.append(_Key(local_l, True))
        if stripped is not None:
            keys.append(_Key(stripped, True))
    if domain_at and domain:
        keys.append(_Key(f"@{domain}", True))
    return keys


__all__ = ["AddressResolver", "Resolved", "to_internal", "ResolveFlag", "ResolveError", "CLASS_FINAL",
           "mail_addr_keys", "valid_hostname", "valid_hostliteral", "valid_mailhost_addr",
           "is_table_spec"]
