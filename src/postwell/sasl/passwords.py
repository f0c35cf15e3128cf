"""Password hashes for the built-in passwd file, in Dovecot's ``{SCHEME}hash``
notation so one file can serve both Dovecot and postwell.

- ``{ARGON2ID}`` / ``{ARGON2I}``: argon2-cffi (PHC string ``$argon2id$...``).
- ``{BLF-CRYPT}`` (alias ``{BCRYPT}``): the ``bcrypt`` package (``$2y$``/``$2b$``).
- ``{SHA512-CRYPT}`` / ``{SHA256-CRYPT}``: ``$6$`` / ``$5$`` crypt(3) hashes,
  computed here from the published SHA-crypt algorithm (U. Drepper, "Unix crypt
  using SHA-256 and SHA-512"), because Python's ``crypt`` module is deprecated
  and gone in 3.13 and passlib is unmaintained.
- ``{PLAIN}``: clear text; refused by default for new entries.
argon2-cffi and bcrypt are imported only when used: a file with only
SHA512-CRYPT entries works without them.
"""

from __future__ import annotations

import hashlib
import hmac
import os

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

SCHEMES = ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "ARGON2I", "PLAIN")
_ALIASES = {"BCRYPT": "BLF-CRYPT", "CLEARTEXT": "PLAIN", "CRYPT-SHA512": "SHA512-CRYPT"}


class HashError(ValueError):
    """A hash this module cannot check (unknown scheme, missing library)."""


def _b64_24(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_ITOA64[w & 0x3F])
        w >>= 6
    return "".join(out)


_PERM512 = [(0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
            (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
            (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16),
            (59, 17, 38), (18, 39, 60), (40, 61, 19), (62, 20, 41)]
_PERM256 = [(0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5),
            (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29)]


def sha_crypt(password: bytes, setting: str) -> str:
    """crypt(3) for ``$5$`` and ``$6$`` settings (``$6$[rounds=N$]salt``)."""
    if setting.startswith("$6$"):
        algo, magic, size = "sha512", "$6$", 64
    elif setting.startswith("$5$"):
        algo, magic, size = "sha256", "$5$", 32
    else:
        raise HashError("not a SHA-crypt hash")
    rest = setting[3:]
    rounds, explicit = 5000, False
    if rest.startswith("rounds="):
        num, _, rest = rest[7:].partition("$")
        if not num.isdigit():
            raise HashError("bad rounds")
        rounds, explicit = min(max(int(num), 1000), 999_999_999), True
    salt = rest.split("$", 1)[0][:16].encode("ascii")
    h = lambda *parts: hashlib.new(algo, b"".join(parts)).digest()  # noqa: E731
    plen = len(password)
    b = h(password, salt, password)
    a = hashlib.new(algo, password + salt)
    a.update(b * (plen // size) + b[:plen % size])
    n = plen
    while n:
        a.update(b if n & 1 else password)
        n >>= 1
    a_d = a.digest()
    dp = h(password * plen)
    p_seq = dp * (plen // size) + dp[:plen % size]
    ds = h(salt * (16 + a_d[0]))
    s_seq = ds * (len(salt) // size) + ds[:len(salt) % size]
    c = a_d
    for i in range(rounds):
        parts = [p_seq if i & 1 else c]
        if i % 3:
            parts.append(s_seq)
        if i % 7:
            parts.append(p_seq)
        parts.append(c if i & 1 else p_seq)
        c = h(*parts)
    if size == 64:
        enc = "".join(_b64_24(c[x], c[y], c[z], 4) for x, y, z in _PERM512) + _b64_24(0, 0, c[63], 2)
    else:
        enc = ("".join(_b64_24(c[x], c[y], c[z], 4) for x, y, z in _PERM256)
               + _b64_24(0, c[31], c[30], 3))
    prefix = f"{magic}rounds={rounds}$" if explicit else magic
    return f"{prefix}{salt.decode('ascii')}${enc}"


def _salt(n: int = 16) -> str:
    return "".join(_ITOA64[b % 64] for b in os.urandom(n))


def split_scheme(stored: str, default: str = "SHA512-CRYPT") -> tuple[str, str]:
    if stored.startswith("{") and "}" in stored:
        scheme, _, value = stored[1:].partition("}")
        scheme = scheme.upper()
        return _ALIASES.get(scheme, scheme), value
    # Like Dovecot: a bare crypt(3) string says what it is.
    if stored.startswith("$6$"):
        return "SHA512-CRYPT", stored
    if stored.startswith("$5$"):
        return "SHA256-CRYPT", stored
    if stored.startswith(("$2y$", "$2b$", "$2a$")):
        return "BLF-CRYPT", stored
    if stored.startswith("$argon2"):
        return "ARGON2ID", stored
    return default, stored


def hash_password(password: str, scheme: str = "ARGON2ID") -> str:
    scheme = _ALIASES.get(scheme.upper(), scheme.upper())
    pw = password.encode("utf-8")
    if scheme in ("ARGON2ID", "ARGON2I"):
        try:
            from argon2 import PasswordHasher, Type
        except ImportError as e:
            raise HashError("the ARGON2 schemes need the argon2-cffi package") from e
        kind = Type.ID if scheme == "ARGON2ID" else Type.I
        return "{%s}%s" % (scheme, PasswordHasher(type=kind).hash(pw))
    if scheme == "BLF-CRYPT":
        try:
            import bcrypt
        except ImportError as e:
            raise HashError("the BLF-CRYPT scheme needs the bcrypt package") from e
        if len(pw) > 72:
            raise HashError("bcrypt passwords are limited to 72 bytes")
        return "{BLF-CRYPT}" + bcrypt.hashpw(pw, bcrypt.gensalt()).decode("ascii")
    if scheme == "SHA512-CRYPT":
        return "{SHA512-CRYPT}" + sha_crypt(pw, "$6$" + _salt())
    if scheme == "SHA256-CRYPT":
        return "{SHA256-CRYPT}" + sha_crypt(pw, "$5$" + _salt())
    if scheme == "PLAIN":
        return "{PLAIN}" + password
    raise HashError(f"unknown password scheme {scheme}")


def verify_password(stored: str, password: str) -> bool:
    """True when ``password`` matches; HashError for a hash we cannot check.
    Slow on purpose (argon2/bcrypt): call it off the event loop."""
    scheme, value = split_scheme(stored)
    pw = password.encode("utf-8")
    if scheme in ("ARGON2ID", "ARGON2I"):
        try:
            from argon2 import PasswordHasher
            from argon2.exceptions import InvalidHashError, VerificationError
        except ImportError as e:
            raise HashError("the ARGON2 schemes need the argon2-cffi package") from e
        try:
            return PasswordHasher().verify(value, pw)
        except VerificationError:
            return False
        except InvalidHashError as e:
            raise HashError("invalid argon2 hash") from e
    if scheme == "BLF-CRYPT":
        try:
            import bcrypt
        except ImportError as e:
            raise HashError("the BLF-CRYPT scheme needs the bcrypt package") from e
        try:
            return bcrypt.checkpw(pw[:72], value.encode("ascii"))
        except ValueError as e:
            raise HashError("invalid bcrypt hash") from e
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        return hmac.compare_digest(sha_crypt(pw, value).encode("ascii"), value.encode("ascii"))
    if scheme == "PLAIN":
        return hmac.compare_digest(pw, value.encode("utf-8"))
    raise HashError(f"unknown password scheme {scheme}")


def check_hash(stored: str) -> str | None:
    """A reason why this entry can never be verified, or None."""
    scheme, value = split_scheme(stored)
    try:
        if scheme in ("ARGON2ID", "ARGON2I"):
            import argon2  # noqa: F401
            if not value.startswith("$argon2"):
                return "invalid argon2 hash"
        elif scheme == "BLF-CRYPT":
            import bcrypt  # noqa: F401
            if not value.startswith(("$2y$", "$2b$", "$2a$")):
                return "invalid bcrypt hash"
        elif scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
            if not value.startswith("$6$" if scheme == "SHA512-CRYPT" else "$5$"):
                return f"invalid {scheme} hash"
        elif scheme != "PLAIN":
            return f"unknown password scheme {scheme}"
    except ImportError as e:
        return f"scheme {scheme} needs the Python package {e.name}"
    return None
