"""cidr: tables (cidr_table(5)): "network/prefix result" rules, first match
wins, "!pattern" negation and nested if/endif blocks (Postfix 3.2+)."""

from __future__ import annotations

import ipaddress

from .base import FileStamp, Table, TableError, logical_lines, read_source, strip_braces


def parse_address(text: str):
    """A lookup key as Postfix's cidr code accepts it: a plain IPv4 or IPv6
    address (inet_pton rules: no leading zeros, no brackets, no scope).
    None when the key is not an address, which simply matches nothing."""
    try:
        if ":" in text:
            if "%" in text:
                return None
            return ipaddress.IPv6Address(text)
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


def parse_pattern(text: str):
    """'addr', 'addr/len', '[addr]/len' or '[addr/len]' -> ip_network.

    Raises ValueError carrying Postfix's warning text (without the
    ": skipping this rule" tail)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"missing ']' character after \"{text}\"")
        text = text[1:close] + text[close + 1:]
    addr_text, slash, plen_text = text.partition("/")
    if not slash:
        addr = parse_address(addr_text)
        if addr is None:
            raise ValueError(f'bad address pattern: "{text}"')
        return ipaddress.ip_network(addr)
    addr = parse_address(addr_text)
    if addr is None:
        raise ValueError(f'bad network value in "{text}"')
    if not plen_text.isdigit() or not plen_text.isascii():
        raise ValueError(f'bad mask value in "{text}"')
    plen = int(plen_text)
    if plen > addr.max_prefixlen:
        raise ValueError(f'bad mask length in "{text}"')
    net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    if net.network_address != addr:
        raise ValueError(f'non-null host address bits in "{text}", '
                         f'perhaps you should use "{net}" instead')
    return net


class _Rule:
    __slots__ = ("net", "negate", "result", "children", "lineno")

    def __init__(self, net, negate, result, children, lineno):
        self.net, self.negate, self.result = net, negate, result
        self.children, self.lineno = children, lineno

    def matches(self, addr) -> bool:
        # a negated pattern matches only keys of its own address family
        if addr.version != self.net.version:
            return False
        return (addr in self.net) != self.negate


def _split_lines(name: str, spec: str):
    """Source text of a file table, or of an inline 'type:{ {rule}, {rule} }'."""
    inner, braced = strip_braces(name)
    if name.lstrip().startswith("{") and not braced:
        raise TableError(f"cidr map: missing '}}' in \"{name}\"")
    if braced:
        from .regexp import _split_rules
        return "\n".join(_split_rules(inner, spec, "cidr map")) + "\n", None
    try:
        stamp = FileStamp(name)
        text = read_source(name, spec)
    except TableError:
        raise
    return text, stamp


class CidrTable(Table):
    type = "cidr"
    fold = False

    def __init__(self, spec: str, name: str, warn=None):
        super().__init__(spec, name)
        self.warn = warn or (lambda msg: None)
        text, self.stamp = _split_lines(name, spec)
        self.rules = self._parse(text)

    def _parse(self, text: str):
        top: list[_Rule] = []
        stack: list[list[_Rule]] = [top]
        if_lines: list[int] = []
        where = f"cidr map {self.name}"
        last = 0
        for lineno, line in logical_lines(text, self.warn, self.name):
            last = lineno
            parts = line.split(None, 1)
            head = parts[0]
            rest = parts[1].strip() if len(parts) > 1 else ""
            low = head.lower()
            if low == "endif":
                if rest:
                    # Postfix skips the whole line: it closes no IF
                    self.warn(f"{where}, line {lineno}: garbage after ENDIF: skipping this rule")
                    continue
                if len(stack) == 1:
                    self.warn(f"{where}, line {lineno}: ENDIF without IF: skipping this rule")
                else:
                    stack.pop()
                    if_lines.pop()
                continue
            is_if = low == "if"
            if is_if:
                # the whole rest of the line is the pattern (so trailing text
                # makes it a bad pattern, as in Postfix)
                pattern = rest
                if not pattern:
                    self.warn(f"{where}, line {lineno}: no address pattern: skipping this rule")
                    continue
            else:
                pattern = head
            negate = pattern.startswith("!")
            if negate:
                pattern = pattern[1:].lstrip()
            try:
                net = parse_pattern(pattern)
            except ValueError as e:
                self.warn(f"{where}, line {lineno}: {e}: skipping this rule")
                continue
            if is_if:
                rule = _Rule(net, negate, None, [], lineno)
                stack[-1].append(rule)
                stack.append(rule.children)
                if_lines.append(lineno)
                continue
            if not rest:
                self.warn(f"{where}, line {lineno}: no lookup result: skipping this rule")
                continue
            stack[-1].append(_Rule(net, negate, rest, None, lineno))
        # every IF still open is reported, innermost first, as Postfix does
        for if_line in reversed(if_lines):
            self.warn(f"{where}, line {if_line}: IF has no matching ENDIF")
        return top

    def _lookup(self, key: str):
        # IPv4-mapped IPv6 keys are not unmapped: they match only IPv6 rules,
        # as in Postfix.
        addr = parse_address(key)
        if addr is None:
            return None
        return self._search(self.rules, addr)

    def _search(self, rules, addr):
        for r in rules:
            if r.matches(addr):
                if r.children is None:
                    return r.result
                found = self._search(r.children, addr)
                if found is not None:
                    return found
        return None

    def changed(self):
        return self.stamp.changed() if self.stamp else False
