"""smtpd_sasl_type = postwell: the built-in passwd-style file (an extension).

Configuration::

    smtpd_sasl_type = postwell
    smtpd_sasl_path = /etc/postfix/sasl_passwd    # absolute, or relative to
                                                  # config_directory; Postfix's
                                                  # default "smtpd" means
                                                  # $config_directory/sasl_passwd

File format (compatible with Dovecot's passwd-file): one ``name:{SCHEME}hash``
per line, further ``:``-separated fields ignored, ``#`` comments.  ``name`` is
the canonical login: ``user@domain``, or a bare ``user`` (looked up as
``user@$smtpd_sasl_local_domain`` first when that is set).  Manage it with
``postwell saslpasswd`` (postwell.cli.saslpasswd).  Hashed entries allow
PLAIN and LOGIN only; a file whose entries are all ``{PLAIN}`` also allows
CRAM-MD5 and SCRAM.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading

from .base import SaslConfigError
from .mechanisms import BackendUnavailable, Identity, PasswordBackend
from .passwords import HashError, check_hash, split_scheme, verify_password

MAX_FILE = 16 * 1024 * 1024
DEFAULT_NAME = "sasl_passwd"
# Guessing passwords against a cheap store is throttled by the smtpd sleeping
# this long before the 535 (Failure.delay).
FAILURE_DELAY = 1.0
# argon2 needs 64 MiB per check and bcrypt a full CPU: at most this many run at
# once in a process, whatever the number of sessions (bounded memory).
_HASH_SLOTS = threading.BoundedSemaphore(max(1, min(4, os.cpu_count() or 1)))


def _verify_bounded(stored: str, password: str) -> bool:
    with _HASH_SLOTS:
        return verify_password(stored, password)


def resolve_path(smtpd_sasl_path: str, config_dir: str) -> str:
    path = smtpd_sasl_path.strip() or "smtpd"
    if path == "smtpd":
        return os.path.join(config_dir, DEFAULT_NAME)
    return path if os.path.isabs(path) else os.path.join(config_dir, path)


def parse_passwd(text: str, path: str = "passwd file") -> tuple[dict[str, str], list[str]]:
    """name -> stored hash, plus problems (line-numbered texts)."""
    users: dict[str, str] = {}
    problems: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not sep or not name:
            problems.append(f"{path}, line {n}: expected name:{{SCHEME}}hash")
            continue
        # The hash ends at the next ":" unless the scheme is PLAIN, whose value
        # is everything up to the end of the first field as Dovecot reads it.
        stored = rest.split(":", 1)[0]
        why = check_hash(stored)
        if why:
            problems.append(f"{path}, line {n}: {name}: {why}")
        if name in users:
            problems.append(f"{path}, line {n}: duplicate entry for {name}")
            continue
        users[name] = stored
    return users, problems


class PasswdFileBackend(PasswordBackend):
    failure_delay = FAILURE_DELAY

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple | None = None
        self._users: dict[str, str] = {}

    @property
    def supports_secret(self) -> bool:  # type: ignore[override]
        users = self._load_quiet()
        return bool(users) and all(split_scheme(v)[0] == "PLAIN" for v in users.values())

    def _load_quiet(self) -> dict[str, str]:
        try:
            return self._load()
        except BackendUnavailable:
            return {}

    def _load(self) -> dict[str, str]:
        # Re-read when the file changes, so `postwell saslpasswd` edits apply at once.
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise BackendUnavailable(f"{self.path}: {e.strerror}") from e
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            if st.st_size > MAX_FILE:
                raise BackendUnavailable(f"{self.path}: file too large")
            try:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    text = f.read(MAX_FILE)
            except OSError as e:
                raise BackendUnavailable(f"{self.path}: {e.strerror}") from e
            self._users, _ = parse_passwd(text, self.path)
            self._stamp = stamp
        return self._users

    def check(self) -> list[str]:
        try:
            st = os.stat(self.path)
        except OSError as e:
            return [f"SASL password file {self.path}: {e.strerror}"]
        if not stat.S_ISREG(st.st_mode):
            return [f"SASL password file {self.path} is not a regular file"]
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read(MAX_FILE)
        except OSError as e:
            return [f"SASL password file {self.path}: {e.strerror}"]
        _, problems = parse_passwd(text, self.path)
        if st.st_mode & 0o004:
            problems.append(f"SASL password file {self.path} is world-readable")
        return problems

    def _find(self, ident: Identity) -> str | None:
        users = self._load()
        if ident.reported in users:
            return users[ident.reported]
        full = f"{ident.user}@{ident.realm}"
        if full in users:
            return users[full]
        return None

    async def verify(self, ident: Identity, password: str) -> bool:
        stored = self._find(ident)
        if stored is None:
            return False
        try:
            return await asyncio.to_thread(_verify_bounded, stored, password)
        except HashError as e:
            raise BackendUnavailable(str(e)) from e

    async def secret(self, ident: Identity) -> str | None:
        stored = self._find(ident)
        if stored is None:
            return None
        scheme, value = split_scheme(stored)
        return value if scheme == "PLAIN" else None


def open_backend(smtpd_sasl_path: str, config_dir: str) -> PasswdFileBackend:
    path = resolve_path(smtpd_sasl_path, config_dir)
    if not path:
        raise SaslConfigError("smtpd_sasl_path is empty")
    return PasswdFileBackend(path)
