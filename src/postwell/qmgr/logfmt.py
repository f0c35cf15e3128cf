"""Postfix's delivery log line: ``to=<..>, relay=.., delay=.., delays=a/b/c/d, dsn=.., status=.. (..)``."""

from __future__ import annotations

import functools

from postwell.policy.restrictions import log_address as _log_address

# info_log_address_format = external.  The same few senders and recipients
# come back in every line (issue 8): remember their logged form (bounded).
log_address = functools.lru_cache(maxsize=1024)(_log_address)


def format_delay(seconds: float, sig_digits: int = 2, max_decimals: int = 2) -> str:
    """Format a delay as Postfix's format_tv() does: large values as whole
    seconds, small ones with ``sig_digits`` significant digits but no finer than
    ``max_decimals`` (delay_logging_resolution_limit), rounded half up."""
    if seconds < 0:
        seconds = 0.0
    if seconds < 1.0 and sig_digits == 2 and max_decimals == 2:
        # The common case (a delivery's delays, five per log line; issue 8):
        # under a second, at most two decimals, rounded half up to 10 ms.
        q = (int(round(seconds * 1_000_000)) + 5_000) // 10_000
        if q >= 100:
            return "1"
        return "0." + f"{q:02d}".rstrip("0") if q else "0"
    million = 1_000_000
    sec = int(seconds)
    usec = int(round((seconds - sec) * million))
    if usec >= million:
        sec, usec = sec + 1, usec - million
    max_decimals = max(0, min(6, max_decimals))
    resolution = million // (10 ** max_decimals)   # microseconds per last shown digit
    width = 10 ** sig_digits
    if resolution < million:
        if sec > 0:
            # One decimal less for every integer digit already shown.
            n = 1
            while sec >= n and n <= width // 10:
                n *= 10
            resolution = (million // width) * n
        else:
            while usec >= width * resolution:
                resolution *= 10
    if resolution > 1:
        usec += resolution // 2
        if usec >= million:
            sec, usec = sec + 1, usec - million
    out = str(sec)
    if usec >= resolution:
        digits = []
        rem, n = usec, million // 10
        while rem >= resolution and n > 0:
            digits.append(str(rem // n))
            rem %= n
            n //= 10
        out += "." + "".join(digits)
    return out


def delivery_line(queue_id: str, recipient: str, orig: str | None, relay: str, *,
                  arrival: float, active: float, handoff: float, conn_setup: float | None,
                  now: float, dsn: str, status: str, reason: str, max_decimals: int = 2,
                  conn_use: int | None = None) -> str:
    def fmt(x):
        return format_delay(x, 2, max_decimals)
    delay = now - arrival
    a = active - arrival
    b = handoff - active
    c = (conn_setup - handoff) if conn_setup is not None else 0.0
    d = now - (conn_setup if conn_setup is not None else handoff)
    orig_part = ""
    if orig and orig.lower() != recipient.lower():
        orig_part = f", orig_to=<{log_address(orig)}>"
    # Postfix prints conn_use only for a delivery over a reused (cached) connection.
    use_part = f", conn_use={conn_use}" if conn_use and conn_use > 1 else ""
    return (f"{queue_id}: to=<{log_address(recipient)}>{orig_part}, relay={relay}{use_part}, delay={fmt(delay)}, "
            f"delays={fmt(a)}/{fmt(b)}/{fmt(c)}/{fmt(d)}, dsn={dsn}, status={status} ({reason})")
