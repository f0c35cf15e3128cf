"""virtual_alias_maps recipient expansion (Postfix cleanup's map1n behaviour).

Lookup order for one address (virtual(5)): ``user+ext@domain``, then
``user@domain`` when recipient_delimiter is set; the bare ``user`` form only
for domains in $mydestination/$myorigin-style local domains (left to the
caller's ``local_domain`` predicate); finally the domain-wide ``@domain``.
A result that is equal to its input stops the recursion for that address.
The ``@domain`` result form ``@other`` keeps the localpart.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

_SPLIT = re.compile(r"[\s,]+")


class AliasExpansionError(Exception):
    """Expansion exceeded a limit: defer the message (451 4.6.0)."""


class AliasLookupError(Exception):
    """A table lookup failed: defer the message (451 4.3.0), as Postfix does."""

    def __init__(self, address: str, cause: Exception):
        super().__init__(f"virtual_alias_maps map lookup problem for {address}")
        self.address = address
        self.cause = cause


def split_result(value: str) -> list[str]:
    return [v for v in _SPLIT.split(value.strip()) if v]


class VirtualAliasExpander:
    def __init__(self, lookups: list, *, expansion_limit: int = 1000,
                 recursion_limit: int = 1000, recipient_delimiter: str = "",
                 local_domain: Callable[[str], bool] | None = None):
        # Each lookup is a callable (a fixed-key table: keys are folded to lower
        # case, every address form is tried) or a (callable, True) pair for a
        # pattern table (regexp/pcre): virtual(5) says those see the whole
        # address only, as given.
        self.lookups = [(fn, False) if callable(fn) else (fn[0], bool(fn[1])) for fn in lookups]
        self.expansion_limit = expansion_limit
        self.recursion_limit = recursion_limit
        self.delimiter = recipient_delimiter
        self.local_domain = local_domain or (lambda d: False)

    def _lookup(self, key: str, original: str | None = None) -> str | None:
        """Try every table for one key form; ``original`` marks the full-address
        form, the only one pattern tables are asked (with the original case)."""
        for fn, pattern in self.lookups:
            try:
                if pattern:
                    if original is None:
                        continue
                    v = fn(original)
                else:
                    v = fn(key)
            except Exception as exc:
                raise AliasLookupError(self._current, exc) from exc
            if v is not None:
                return v
        return None

    _current = ""

    def lookup_address(self, address: str) -> list[str] | None:
        """One-level expansion of an address, or None when no rule matches."""
        self._current = address
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        dom_l = domain.lower()
        keys: list[str] = []
        base_local = local
        ext = ""
        if self.delimiter and local:
            for d in self.delimiter:
                i = local.find(d)
                if i > 0:
                    base_local, ext = local[:i], local[i:]
                    break
        # Postfix folds case for table lookups of addresses.
        full = f"{local}@{dom_l}".lower() if at else local.lower()
        keys.append(full)
        if ext:
            keys.append(f"{base_local}@{dom_l}".lower() if at else base_local.lower())
        for k in keys:
            v = self._lookup(k, address if k == full else None)
            if v is not None:
                return self._propagate_ext(split_result(v), ext if k != full else "")
        if not at or self.local_domain(dom_l):
            for k in ([local.lower()] + ([base_local.lower()] if ext else [])):
                v = self._lookup(k)
                if v is not None:
                    return self._propagate_ext(split_result(v), ext if k != local.lower() else "")
        if at:
            v = self._lookup("@" + dom_l)
            if v is not None:
                out = []
                for r in split_result(v):
                    if r.startswith("@"):
                        out.append(f"{local}{r}")   # "@domain @other": keep the localpart
                    else:
                        out.append(r)
                return out
        return None

    def _propagate_ext(self, results: list[str], ext: str) -> list[str]:
        # propagate_unmatched_extensions (default includes virtual): user+ext -> alias+ext
        if not ext:
            return results
        out = []
        for r in results:
            lp, at, dom = r.rpartition("@")
            if at and lp and self.delimiter and not any(d in lp for d in self.delimiter):
                out.append(f"{lp}{ext}@{dom}")
            elif not at and r and self.delimiter and not any(d in r for d in self.delimiter):
                out.append(r + ext)
            else:
                out.append(r)
        return out

    def expand(self, address: str) -> list[str]:
        """Full recursive expansion of one recipient, the way Postfix's cleanup does it.

        Each position of the work list is rewritten in place by its first
        result (extra results are appended and expanded in turn) until no
        rule matches.  An address that expands into itself is final from
        then on.  Loops hit the recursion limit and defer the message, as in
        Postfix.  Exact duplicates are removed (Postfix's duplicate filter is
        case-sensitive), order kept.
        """
        work = [address]
        final: set[str] = set()
        i = 0
        while i < len(work):
            if len(work) > self.expansion_limit:
                raise AliasExpansionError(
                    f"unreasonable virtual_alias_maps map expansion size for {address}")
            count = 0
            while True:
                cur = work[i]
                if cur.lower() in final:
                    break
                if count >= self.recursion_limit:
                    raise AliasExpansionError(
                        f"unreasonable virtual_alias_maps map nesting for {address}")
                targets = self.lookup_address(cur)
                if not targets:
                    break
                for n, t in enumerate(targets):
                    if n == 0:
                        work[i] = t
                    else:
                        work.append(t)
                    if t.lower() == cur.lower():
                        final.add(cur.lower())   # "allow an address to expand into itself once"
                count += 1
            i += 1
        out: list[str] = []
        seen: set[str] = set()
        for a in work:
            if a not in seen:
                seen.add(a)
                out.append(a)
        return out


def expand_all(expander: VirtualAliasExpander, addresses: Iterable[str]) -> list[list[str]]:
    return [expander.expand(a) for a in addresses]


def redirect_recipients(recipients: list, target: str) -> None:
    """REDIRECT as Postfix applies it: its queue manager, not cleanup, replaces the
    recipients.  Cleanup writes them as usual (alias-expanded, de-duplicated), so
    the qmgr's ``nrcpt=`` counts every one; only the first is then delivered, to
    ``target``, with its original recipient kept for ``orig_to=``, and the others
    are finished without a delivery or a log line (checked against Postfix 3.7:
    three recipients, one REDIRECT, ``nrcpt=3`` and one ``to=`` line).

    ``recipients`` are the queue file's recipient entries (``address`` and
    ``done`` are rewritten in place); the caller re-packs the envelope."""
    for index, rcpt in enumerate(recipients):
        rcpt.address = target
        if index:
            rcpt.done = True
