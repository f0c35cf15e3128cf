"""smtpd_sasl_type = cyrus: Cyrus SASL's configuration and password stores.

Postfix hands authentication to libsasl2, which reads ``<smtpd_sasl_path>.conf``
(default ``smtpd.conf``) from cyrus_sasl_config_path (Debian's Postfix looks in
/etc/postfix/sasl).  We read the same file and implement the two password
checks Postfix sites use with it:

- ``pwcheck_method: auxprop`` with ``auxprop_plugin: sasldb``: the Berkeley DB
  hash file that ``saslpasswd2`` writes (``sasldb_path``, default /etc/sasldb2),
  keys ``user NUL realm NUL userPassword``, clear-text values; every mechanism
  (PLAIN, LOGIN, CRAM-MD5, DIGEST-MD5, SCRAM-SHA-*) can be verified.
- ``pwcheck_method: saslauthd``: the saslauthd daemon's socket
  (``saslauthd_path``, default /var/run/saslauthd/mux); only PLAIN and LOGIN.
"""

from __future__ import annotations

import asyncio
import os
import struct

from .base import SaslConfigError
from .mechanisms import BackendUnavailable, Identity, PasswordBackend

DEFAULT_CONFIG_DIRS = ("/etc/postfix/sasl", "/etc/sasl2", "/usr/lib/sasl2")
DEFAULT_SASLDB = "/etc/sasldb2"
DEFAULT_SASLAUTHD = "/var/run/saslauthd/mux"
# libsasl2's order with Debian's plugins when smtpd.conf has no mech_list (seen
# in Postfix 3.7's EHLO), less NTLM, which postwell lacks.
DEFAULT_MECH_LIST = ("SCRAM-SHA-512", "SCRAM-SHA-384", "SCRAM-SHA-256", "SCRAM-SHA-224",
                     "SCRAM-SHA-1", "DIGEST-MD5", "CRAM-MD5", "PLAIN", "LOGIN")
_SASLAUTHD_TIMEOUT = 15.0
_MAX_CONF = 65536


def config_dirs(cyrus_sasl_config_path: str) -> list[str]:
    if cyrus_sasl_config_path.strip():
        return [d for d in cyrus_sasl_config_path.split(":") if d]
    return list(DEFAULT_CONFIG_DIRS)


def find_conf(cyrus_sasl_config_path: str, app: str) -> str | None:
    for d in config_dirs(cyrus_sasl_config_path):
        path = os.path.join(d, f"{app}.conf")
        if os.path.exists(path):
            return path
    return None


def parse_conf(path: str) -> dict[str, str]:
    """``key: value`` lines as libsasl2 reads them; '#' starts a comment."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CONF + 1)
    except OSError as e:
        raise SaslConfigError(f"cannot read Cyrus SASL configuration {path}: {e.strerror}")
    if len(raw) > _MAX_CONF:
        raise SaslConfigError(f"Cyrus SASL configuration {path} is too large")
    out: dict[str, str] = {}
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip() or " " in key.strip():
            raise SaslConfigError(f"{path}, line {n}: expected \"name: value\", got \"{line}\"")
        out[key.strip()] = value.strip()
    return out


class SasldbBackend(PasswordBackend):
    """Reads the sasldb2 file on every check, so saslpasswd2 changes take
    effect at once, as with libsasl2."""
    supports_secret = True
    cyrus_library = True

    def __init__(self, path: str, service: str = "smtp") -> None:
        self.path = path
        # smtpd_sasl_service: libsasl2's service name, which DIGEST-MD5's
        # digest-uri must carry.
        self.service = service

    def check(self) -> list[str]:
        if not os.path.exists(self.path):
            return [f"Cyrus SASL sasldb file {self.path} does not exist (create users with saslpasswd2)"]
        try:
            self._read_secret("", "")
        except BackendUnavailable as e:
            return [str(e)]
        return []

    def _read_secret(self, user: str, realm: str) -> str | None:
        try:
            from berkeleydb import db
        except ImportError as e:  # pragma: no cover - dependency of postwell
            raise BackendUnavailable(f"cannot read {self.path}: berkeleydb module missing") from e
        handle = db.DB()
        try:
            handle.open(self.path, dbtype=db.DB_UNKNOWN, flags=db.DB_RDONLY)
            value = handle.get(f"{user}\0{realm}\0userPassword".encode("utf-8"))
        except db.DBError as e:
            raise BackendUnavailable(f"cannot read Cyrus SASL sasldb file {self.path}: "
                                     f"{e.args[-1] if e.args else e}") from e
        finally:
            handle.close()
        return None if value is None else value.decode("utf-8", "replace")

    async def secret(self, ident: Identity) -> str | None:
        return await asyncio.to_thread(self._read_secret, ident.user, ident.realm)

    async def verify(self, ident: Identity, password: str) -> bool:
        import hmac
        stored = await self.secret(ident)
        return stored is not None and hmac.compare_digest(stored.encode(), password.encode())

    def users(self) -> list[tuple[str, str, str]]:
        """(user, realm, property) triples, like sasldblistusers2."""
        from berkeleydb import db
        handle = db.DB()
        out = []
        try:
            handle.open(self.path, dbtype=db.DB_UNKNOWN, flags=db.DB_RDONLY)
            for key in handle.keys():
                parts = key.split(b"\0")
                if len(parts) == 3:
                    out.append(tuple(p.decode("utf-8", "replace") for p in parts))
        finally:
            handle.close()
        return out


def _counted(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack("!H", len(data)) + data


class SaslauthdBackend(PasswordBackend):
    """saslauthd's request: four counted strings (login, password, service,
    realm); answer: one counted string, "OK..." or "NO ..."."""
    cyrus_library = True

    def __init__(self, path: str, service: str = "smtp", timeout: float = _SASLAUTHD_TIMEOUT):
        self.path = path
        self.service = service
        self.timeout = timeout

    def check(self) -> list[str]:
        if not os.path.exists(self.path):
            return [f"saslauthd socket {self.path} does not exist (is saslauthd running?)"]
        return []

    async def verify(self, ident: Identity, password: str) -> bool:
        # A bare login without smtpd_sasl_local_domain goes with an empty
        # realm, as libsasl2 sends it; saslauthd applies its own default.
        realm = "" if ident.reported == ident.user else ident.realm
        request = (_counted(ident.user) + _counted(password) + _counted(self.service)
                   + _counted(realm))
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path), self.timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise BackendUnavailable(f"cannot connect to saslauthd server: {e}") from e
        try:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readexactly(2), self.timeout)
            (length,) = struct.unpack("!H", head)
            answer = await asyncio.wait_for(reader.readexactly(min(length, 1024)), self.timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            raise BackendUnavailable(f"saslauthd: {e}") from e
        finally:
            writer.close()
        return answer.startswith(b"OK")

    async def secret(self, ident: Identity) -> str | None:
        return None


class CyrusSettings:
    """The parts of smtpd.conf we use, with libsasl2's defaults."""

    def __init__(self, conf: dict[str, str], conf_path: str | None) -> None:
        self.conf_path = conf_path
        self.pwcheck_methods = conf.get("pwcheck_method", "auxprop").split()
        self.auxprop_plugin = conf.get("auxprop_plugin", "sasldb")
        self.sasldb_path = conf.get("sasldb_path", DEFAULT_SASLDB)
        self.saslauthd_path = conf.get("saslauthd_path", DEFAULT_SASLAUTHD)
        mech_list = conf.get("mech_list", "")
        self.mech_list = ([m.upper() for m in mech_list.replace(",", " ").split()]
                          if mech_list else list(DEFAULT_MECH_LIST))

    def backend(self, service: str) -> PasswordBackend:
        methods = self.pwcheck_methods
        if not methods:
            raise SaslConfigError(f"{self.where()}: pwcheck_method is empty")
        unknown = [m for m in methods if m not in ("auxprop", "saslauthd")]
        if unknown:
            raise SaslConfigError(f"{self.where()}: unsupported pwcheck_method \"{unknown[0]}\" "
                                  "(postwell supports auxprop with sasldb, and saslauthd)")
        if methods[0] == "auxprop":
            plugins = self.auxprop_plugin.split()
            if "sasldb" not in plugins:
                raise SaslConfigError(f"{self.where()}: unsupported auxprop_plugin "
                                      f"\"{self.auxprop_plugin}\" (postwell supports sasldb)")
            return SasldbBackend(self.sasldb_path, service)
        path = self.saslauthd_path
        if os.path.isdir(path):
            path = os.path.join(path, "mux")
        return SaslauthdBackend(path, service)

    def where(self) -> str:
        return self.conf_path or "Cyrus SASL configuration (defaults)"


def load_settings(cyrus_sasl_config_path: str, app: str) -> CyrusSettings:
    path = find_conf(cyrus_sasl_config_path, app)
    return CyrusSettings(parse_conf(path) if path else {}, path)
