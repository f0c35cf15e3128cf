"""Time units as postconf(5) defines them: s, m, h, d, w."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, default_unit: str = "s") -> float:
    text = text.strip()
    if not text:
        return 0.0
    unit = default_unit
    if text[-1].isalpha():
        unit, text = text[-1].lower(), text[:-1]
    if unit not in _UNITS:
        raise ValueError(f"bad time unit in {text!r}")
    return float(text) * _UNITS[unit]
