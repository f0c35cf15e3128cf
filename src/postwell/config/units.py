"""Time units as postconf(5) defines them: s, m, h, d, w.

A time value is a whole number with at most one unit letter.  A bare number
takes the parameter's default unit, which Postfix fixes per parameter; the
unit letter of the parameter's default value is that unit.
"""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIME = re.compile(r"(\d+)([A-Za-z]?)")


def parse_time(text: str, default_unit: str = "s") -> float:
    """Seconds for a Postfix time value; ValueError when malformed."""
    text = text.strip()
    m = _TIME.fullmatch(text)
    if not m:
        raise ValueError(f"bad time value: {text!r}")
    unit = (m.group(2) or default_unit).lower()
    if unit not in _UNITS:
        raise ValueError(f"bad time unit: {text!r}")
    return float(int(m.group(1)) * _UNITS[unit])


def default_time_unit(default_value: str, cfg=None) -> str | None:
    """The unit letter of a default such as '5d' or '${stress?{10}:{300}}s'."""
    value = default_value
    if "$" in value and cfg is not None:
        try:
            value = cfg.expand(value)
        except Exception:
            value = default_value
    m = _TIME.fullmatch(value.strip())
    if m and m.group(2).lower() in _UNITS:
        return m.group(2).lower()
    return None


def format_time(seconds: float) -> str:
    """Shortest Postfix time text for a whole number of seconds."""
    s = int(seconds)
    for unit in ("w", "d", "h", "m"):
        if s and s % _UNITS[unit] == 0:
            return f"{s // _UNITS[unit]}{unit}"
    return f"{s}s"
