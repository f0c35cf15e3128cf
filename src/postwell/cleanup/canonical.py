"""canonical(5) mapping and address masquerading, as Postfix's cleanup applies them.

Order for one address (cleanup_addr.c / cleanup_message.c): sender_canonical_maps
(or recipient_canonical_maps), then canonical_maps, then masquerading; each step only
for the address classes its *_classes parameter names (envelope_sender,
envelope_recipient, header_sender, header_recipient).  A canonical table is asked
once per address (no recursion), with virtual(5)'s search order (user@domain,
user without extension, user for a local domain, @domain); a multi-valued result
uses the first value.  Masquerading strips the subdomains of an address below a
masquerade_domains entry ("!name" stops the search without stripping) unless its
localpart is in masquerade_exceptions.
"""

from __future__ import annotations

from typing import Callable

from .virtual import AliasLookupError, VirtualAliasExpander


class CanonicalLookupError(AliasLookupError):
    """A canonical table failed: the message is deferred (451 4.3.0), never lost."""

    def __init__(self, name: str, address: str, cause: Exception):
        Exception.__init__(self, f"{name} map lookup problem for {address}")
        self.address = address
        self.cause = cause

ENVELOPE_SENDER = "envelope_sender"
ENVELOPE_RECIPIENT = "envelope_recipient"
HEADER_SENDER = "header_sender"
HEADER_RECIPIENT = "header_recipient"

# Postfix's header_opts: HDR_OPT_SENDER headers; the other address headers that
# cleanup rewrites are recipient headers.
SENDER_HEADERS = frozenset({
    "from", "sender", "reply-to", "errors-to", "return-receipt-to", "resent-from", "resent-sender",
    "resent-reply-to", "disposition-notification-to",
})

_ALL_CLASSES = "envelope_sender, envelope_recipient, header_sender, header_recipient"


def _classes(config, name: str, default: str) -> frozenset[str]:
    raw = config.get(name) if config.raw(name) is not None else default
    return frozenset(x.lower() for x in raw.replace(",", " ").split())


class AddressMapper:
    """Per-process canonical/masquerade settings; ``map(address, cls)`` rewrites one
    internal-form address for one class."""

    def __init__(self, config, *, myhostname: str, myorigin: str,
                 open_tables: Callable[[list[str]], list],
                 warn: Callable[[str], None] | None = None):
        from .service import _is_pattern_table, split_map_list
        self.warn = warn or (lambda text: None)
        mydest = {d.lower() for d in (config.get_list("mydestination")
                                      if config.raw("mydestination") is not None else [])}
        mydest.add(myhostname.lower())
        # virtual(5)/canonical(5): the bare "user" key applies for $myorigin too.
        mydest.add(myorigin.lower())
        delim = config.get("recipient_delimiter") if config.raw("recipient_delimiter") is not None \
            else ""
        self._steps: list[tuple[str, frozenset[str], str]] = []
        self._lookups: dict[str, tuple] = {}
        for name, classes_name, only in (
                ("sender_canonical_maps", "sender_canonical_classes", "sender"),
                ("recipient_canonical_maps", "recipient_canonical_classes", "recipient"),
                ("canonical_maps", "canonical_classes", "")):
            raw = config.get(name) if config.raw(name) is not None else ""
            specs = split_map_list(raw)
            if not specs:
                continue
            default = {"sender": "envelope_sender, header_sender",
                       "recipient": "envelope_recipient, header_recipient"}.get(only, _ALL_CLASSES)
            classes = _classes(config, classes_name, default)

            def lookups(specs=specs):
                return [(t.lookup, _is_pattern_table(s)) for s, t in zip(specs, open_tables(specs))]
            self._steps.append((name, classes, only))
            self._lookups[name] = (lookups, delim, mydest)
        raw = config.get("masquerade_domains") \
            if config.raw("masquerade_domains") is not None else ""
        self.masq_domains = [d.lower() for d in raw.replace(",", " ").split() if d.strip("!")]
        raw = config.get("masquerade_exceptions") \
            if config.raw("masquerade_exceptions") is not None else ""
        self.masq_exceptions = frozenset(x.lower() for x in raw.replace(",", " ").split())
        self.masq_classes = _classes(config, "masquerade_classes",
                                     "envelope_sender, header_sender, header_recipient")

    @property
    def active(self) -> bool:
        return bool(self._steps or self.masq_domains)

    def _canonical(self, name: str, address: str) -> str:
        lookups, delim, mydest = self._lookups[name]
        expander = VirtualAliasExpander(lookups(), recipient_delimiter=delim,
                                        local_domain=lambda d: d in mydest)
        try:
            found = expander.lookup_address(address)
        except AliasLookupError as exc:
            raise CanonicalLookupError(name, address, exc.cause) from exc
        if not found:
            return address
        if len(found) > 1:
            self.warn(f"multi-valued {name} entry for {address}")
        return found[0]

    def map(self, address: str, cls: str) -> str:
        if not address:
            return address
        is_sender = cls in (ENVELOPE_SENDER, HEADER_SENDER)
        for name, classes, only in self._steps:
            if cls not in classes or (only == "sender" and not is_sender) \
                    or (only == "recipient" and is_sender):
                continue
            address = self._canonical(name, address)
        if self.masq_domains and cls in self.masq_classes:
            address = self.masquerade(address)
        return address

    def masquerade(self, address: str) -> str:
        local, at, domain = address.rpartition("@")
        if not at or not domain:
            return address
        if self.masq_exceptions and local.lower() in self.masq_exceptions:
            return address
        dom = domain.lower()
        for masq in self.masq_domains:
            keep = masq.startswith("!")
            name = masq[1:] if keep else masq
            if dom == name:
                break
            if len(dom) > len(name) and dom.endswith("." + name):
                if not keep:
                    return f"{local}@{name}"
                break
        return address
