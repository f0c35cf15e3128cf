"""TLS for the smtpd (STARTTLS, RFC 3207) and the smtp client: ssl contexts
built from Postfix's parameters, config checks, and Postfix-shaped texts.

API::

    server_security_level(config) -> "none" | "may" | "encrypt"
    server_context(config) -> ssl.SSLContext | None    # None: level none / no TLS
    check_tls_config(config) -> list[str]              # for `postfix check` / start
    client_context(config, level, *, servername=None) -> ssl.SSLContext | None
    received_header_tls_text(ssl_object, client_cert_requested=False) -> str
    server_log_text(namaddr, ssl_object) -> str   # "Anonymous TLS connection established from ..."
    tls_log_text(trust, host, addr, port, ssl_object) -> str   # client side
    parse_protocols(value) -> (ssl.TLSVersion, ssl.TLSVersion)
    cipher_list(config, grade, excludes) -> str

Notes on what differs from Postfix:
- smtpd_tls_session_cache_timeout: 0 turns session tickets off; any other value
  keeps OpenSSL's built-in ticket lifetime (Python cannot set it).  Ticket
  keys are per process (Postfix's tlsmgr shares them), so resumption works
  only when the client comes back to the same smtpd process.
- smtpd_tls_ask_ccert: Python's ssl accepts a client certificate only when it
  verifies against smtpd_tls_CAfile/CApath; Postfix also accepts untrusted ones.
- smtpd_tls_dh1024_param_file is loaded when set; with OpenSSL 3 the ECDHE and
  TLS 1.3 groups are used in practice.  smtpd_tls_eecdh_grade is left to OpenSSL.
- TLS 1.0/1.1 are off by default (config/defaults.py POSTWELL_DIFFERENCES).
"""

from __future__ import annotations

import os
import ssl
import warnings

from .introspect import handshake_details  # noqa: F401

__all__ = ["TlsConfigError", "server_security_level", "server_context", "check_tls_config",
           "client_context", "received_header_tls_text", "server_log_text", "tls_log_text",
           "parse_protocols", "cipher_list", "client_security_level", "handshake_details"]


try:
    from ..config.registry import register_implemented
    register_implemented(
        "smtpd_tls_security_level", "smtpd_use_tls", "smtpd_enforce_tls", "smtpd_tls_cert_file",
        "smtpd_tls_key_file", "smtpd_tls_chain_files", "smtpd_tls_eccert_file",
        "smtpd_tls_eckey_file", "smtpd_tls_dcert_file", "smtpd_tls_dkey_file",
        "smtpd_tls_CAfile", "smtpd_tls_CApath", "smtpd_tls_protocols",
        "smtpd_tls_mandatory_protocols", "smtpd_tls_ciphers", "smtpd_tls_mandatory_ciphers",
        "smtpd_tls_exclude_ciphers", "smtpd_tls_mandatory_exclude_ciphers",
        "smtpd_tls_dh1024_param_file", "smtpd_tls_session_cache_timeout",
        "smtpd_tls_ask_ccert", "smtpd_tls_req_ccert", "tls_preempt_cipherlist",
        "tls_high_cipherlist", "tls_medium_cipherlist", "tls_low_cipherlist",
        "tls_export_cipherlist", "tls_null_cipherlist",
        "smtp_tls_security_level", "smtp_use_tls", "smtp_enforce_tls", "smtp_tls_CAfile",
        "smtp_tls_CApath", "smtp_tls_cert_file", "smtp_tls_key_file", "smtp_tls_chain_files",
        "smtp_tls_protocols", "smtp_tls_mandatory_protocols", "smtp_tls_ciphers",
        "smtp_tls_mandatory_ciphers", "smtp_tls_exclude_ciphers",
        "smtp_tls_mandatory_exclude_ciphers")
except ImportError:  # pragma: no cover
    pass


class TlsConfigError(Exception):
    """The TLS settings cannot produce a working context."""


_PROTOCOLS = ["SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
             "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_GRADES = ("export", "low", "medium", "high", "null")


def _get(config, name: str, default: str = "") -> str:
    try:
        value = config.get(name)
    except KeyError:
        return default
    return default if value is None else value


def _yes(config, name: str) -> bool:
    return _get(config, name, "no").strip().lower() in ("yes", "true", "1", "on")


def parse_protocols(value: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """Postfix protocol syntax: ``>=TLSv1.2``, ``<=TLSv1.3``, ``!SSLv3``,
    or a plain list of names.  Returns (minimum, maximum)."""
    tokens = [t for t in value.replace(",", " ").replace(":", " ").split() if t]
    include: set[str] = set()
    exclude: set[str] = set()
    lo, hi = 0, len(_PROTOCOLS) - 1
    names_lower = {p.lower(): i for i, p in enumerate(_PROTOCOLS)}
    for tok in tokens:
        op = ""
        for prefix in (">=", "<=", "!"):
            if tok.startswith(prefix):
                op, tok = prefix, tok[len(prefix):]
                break
        idx = names_lower.get(tok.lower())
        if idx is None:
            raise TlsConfigError(f"Invalid TLS protocol list: unknown protocol \"{tok}\"")
        if op == ">=":
            lo = max(lo, idx)
        elif op == "<=":
            hi = min(hi, idx)
        elif op == "!":
            exclude.add(_PROTOCOLS[idx])
        else:
            include.add(_PROTOCOLS[idx])
    allowed = [p for i, p in enumerate(_PROTOCOLS)
               if lo <= i <= hi and p not in exclude and (not include or p in include)
               and p in _VERSIONS]
    if not allowed:
        raise TlsConfigError(f"Invalid TLS protocol list \"{value}\": no protocol left")
    return _VERSIONS[allowed[0]], _VERSIONS[allowed[-1]]


def _set_versions(ctx: ssl.SSLContext, value: str) -> None:
    lo, hi = parse_protocols(value)
    with warnings.catch_warnings():
        # The admin asked for TLS 1.0/1.1 explicitly; Python's deprecation
        # warning would only add noise (OpenSSL's security level still rules).
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version, ctx.maximum_version = lo, hi


def cipher_list(config, grade: str, excludes: list[str]) -> str:
    """OpenSSL cipher string for a Postfix grade (tls_<grade>_cipherlist)
    minus the excluded ciphers.  Applies to TLS 1.2 and older; TLS 1.3 suites
    are OpenSSL's defaults, as with Postfix."""
    grade = grade.strip().lower() or "medium"
    if grade not in _GRADES:
        raise TlsConfigError(f"invalid cipher grade: {grade}")
    defaults = {"high": "aNULL:-aNULL:HIGH:@STRENGTH",
                "medium": "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH",
                "low": "aNULL:-aNULL:HIGH:MEDIUM:LOW:+RC4:@STRENGTH",
                "export": "aNULL:-aNULL:HIGH:MEDIUM:LOW:EXPORT:+RC4:@STRENGTH",
                "null": "eNULL:!aNULL"}
    base = _get(config, f"tls_{grade}_cipherlist", defaults[grade]) or defaults[grade]
    parts = [base] + [f"!{x}" for x in excludes if x]
    return ":".join(parts)


def _excludes(config, *names: str) -> list[str]:
    out: list[str] = []
    for n in names:
        out.extend(t for t in _get(config, n).replace(",", " ").replace(":", " ").split() if t)
    return out


# --- server ----------------------------------------------------------------------------


def server_security_level(config) -> str:
    """smtpd_tls_security_level, or the legacy smtpd_use_tls/smtpd_enforce_tls."""
    level = _get(config, "smtpd_tls_security_level").strip().lower()
    if level:
        if level not in ("none", "may", "encrypt"):
            raise TlsConfigError(f"invalid smtpd_tls_security_level value: \"{level}\"")
        return level
    if _yes(config, "smtpd_enforce_tls"):
        return "encrypt"
    if _yes(config, "smtpd_use_tls"):
        return "may"
    return "none"


def _server_files(config) -> list[tuple[str, str]]:
    """(certificate chain file, key file) pairs to load, in Postfix's order."""
    chain = [f for f in _get(config, "smtpd_tls_chain_files").replace(",", " ").split() if f]
    if chain:
        # Postfix 3.4+: each file may hold key and certificates together.
        return [(f, f) for f in chain]
    pairs = []
    for cert_p, key_p in (("smtpd_tls_cert_file", "smtpd_tls_key_file"),
                          ("smtpd_tls_eccert_file", "smtpd_tls_eckey_file"),
                          ("smtpd_tls_dcert_file", "smtpd_tls_dkey_file")):
        cert = _get(config, cert_p).strip()
        if cert:
            pairs.append((cert, _get(config, key_p).strip() or cert))
    return pairs


def _wants_tls(config) -> bool:
    return server_security_level(config) != "none" or _yes(config, "smtpd_tls_wrappermode")


def server_context(config) -> ssl.SSLContext | None:
    """The smtpd's SSLContext, or None when TLS is off (level none and no
    wrapper mode).  Raises TlsConfigError when TLS is wanted but the
    certificate or settings are unusable: Postfix then logs a warning and
    runs without STARTTLS (level may) or refuses mail (level encrypt)."""
    if not _wants_tls(config):
        return None
    level = server_security_level(config)
    mandatory = level == "encrypt"
    pairs = _server_files(config)
    if not pairs:
        raise TlsConfigError("no server certificate: set smtpd_tls_cert_file (or "
                             "smtpd_tls_chain_files); TLS is not available")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for cert, key in pairs:
        try:
            # A passphrase callback that gives nothing: OpenSSL would otherwise
            # prompt on the terminal for an encrypted key.
            ctx.load_cert_chain(cert, key, password=_no_passphrase)
        except FileNotFoundError as e:
            raise TlsConfigError(f"cannot load certificate {cert} / key {key}: "
                                 f"{e.filename or cert}: No such file or directory") from e
        except PermissionError as e:
            raise TlsConfigError(f"cannot load certificate {cert} / key {key}: "
                                 f"{e.filename or cert}: Permission denied") from e
        except ssl.SSLError as e:
            raise TlsConfigError(_ssl_problem(cert, key, e)) from e
    proto = _get(config, "smtpd_tls_mandatory_protocols" if mandatory else "smtpd_tls_protocols",
                 ">=TLSv1.2")
    _set_versions(ctx, proto)
    grade = _get(config, "smtpd_tls_mandatory_ciphers" if mandatory else "smtpd_tls_ciphers",
                 "medium")
    excl = _excludes(config, "smtpd_tls_exclude_ciphers",
                     *(["smtpd_tls_mandatory_exclude_ciphers"] if mandatory else []))
    try:
        ctx.set_ciphers(cipher_list(config, grade, excl))
    except ssl.SSLError as e:
        raise TlsConfigError(f"invalid cipher list for grade {grade}: {e.reason or e}") from e
    cafile = _get(config, "smtpd_tls_CAfile").strip() or None
    capath = _get(config, "smtpd_tls_CApath").strip() or None
    if cafile or capath:
        try:
            ctx.load_verify_locations(cafile=cafile, capath=capath)
        except (OSError, ssl.SSLError) as e:
            raise TlsConfigError(f"cannot load CA certificates from "
                                 f"{cafile or capath}: {getattr(e, 'strerror', None) or e}") from e
    if _yes(config, "smtpd_tls_req_ccert") and level == "encrypt":
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif _yes(config, "smtpd_tls_ask_ccert") and (cafile or capath):
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    dh = _get(config, "smtpd_tls_dh1024_param_file").strip()
    if dh:
        try:
            ctx.load_dh_params(dh)
        except (OSError, ssl.SSLError) as e:
            raise TlsConfigError(f"cannot load DH parameters from {dh}: {e}") from e
    if _yes(config, "tls_preempt_cipherlist"):
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_SINGLE_ECDH_USE
    timeout = _get(config, "smtpd_tls_session_cache_timeout", "3600s")
    if _zero_time(timeout):
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    return ctx


def _zero_time(value: str) -> bool:
    v = value.strip().lower().rstrip("smhdw")
    try:
        return int(v or "0") == 0
    except ValueError:
        return False


def _no_passphrase() -> bytes:
    return b""


def _pem_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("ascii", "replace")
    except OSError:
        return ""


def _ssl_problem(cert: str, key: str, e: ssl.SSLError) -> str:
    # Python reports most load failures as "PEM lib": look at the files to say more.
    reason = (e.reason or "").upper()
    if "KEY_VALUES_MISMATCH" in reason:
        return f"private key {key} does not match public key in certificate {cert}"
    cert_text, key_text = _pem_text(cert), _pem_text(key)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        return f"cannot load certificate from {cert}: no PEM certificate found"
    if "PRIVATE KEY-----" not in key_text:
        return f"cannot load private key from {key}: no PEM private key found"
    if "ENCRYPTED" in key_text:
        return f"cannot load private key from {key}: the key is encrypted (a passphrase is not supported)"
    return f"cannot load certificate {cert} / key {key}: {e.reason or e}"


def check_tls_config(config) -> list[str]:
    """Problems for `postfix check` and start: missing or unreadable cert/key,
    key/cert mismatch, bad protocol or cipher settings."""
    problems: list[str] = []
    try:
        if not _wants_tls(config):
            return []
    except TlsConfigError as e:
        return [str(e)]
    for cert, key in _server_files(config):
        for path in dict.fromkeys((cert, key)):
            if not os.path.exists(path):
                problems.append(f"TLS certificate/key file {path}: No such file or directory")
            elif not os.access(path, os.R_OK):
                problems.append(f"TLS certificate/key file {path}: Permission denied")
    if problems:
        return problems
    try:
        server_context(config)
    except TlsConfigError as e:
        problems.append(str(e))
    for name in ("smtpd_tls_protocols", "smtpd_tls_mandatory_protocols"):
        try:
            parse_protocols(_get(config, name, ">=TLSv1.2"))
        except TlsConfigError as e:
            msg = f"{name}: {e}"
            if msg not in problems:
                problems.append(msg)
    return problems


# --- client ----------------------------------------------------------------------------

CLIENT_LEVELS = ("none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure")


def client_security_level(config) -> str:
    level = _get(config, "smtp_tls_security_level").strip().lower()
    if level:
        return level
    if _yes(config, "smtp_enforce_tls"):
        return "verify" if _yes(config, "smtp_tls_enforce_peername") else "encrypt"
    if _yes(config, "smtp_use_tls"):
        return "may"
    return "none"


def client_context(config, level: str | None = None, *,
                   servername: str | None = None) -> ssl.SSLContext | None:
    """SSLContext for the smtp client at a policy level.  ``may``/``encrypt``
    do not verify the server (Postfix's opportunistic/mandatory-unauthenticated
    TLS); ``verify``/``secure`` check the chain against smtp_tls_CAfile/CApath
    (or the system store when both are empty) and the host name
    ``servername``.  None for level ``none``."""
    level = (level or client_security_level(config)).lower()
    if level == "none":
        return None
    if level not in CLIENT_LEVELS:
        raise TlsConfigError(f"invalid TLS security level: \"{level}\"")
    if level in ("dane", "dane-only", "fingerprint"):
        # Not implemented yet: treat as mandatory encryption, never weaker.
        level = "encrypt"
    mandatory = level != "may"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    proto = _get(config, "smtp_tls_mandatory_protocols" if mandatory else "smtp_tls_protocols",
                 ">=TLSv1.2")
    _set_versions(ctx, proto)
    grade = _get(config, "smtp_tls_mandatory_ciphers" if mandatory else "smtp_tls_ciphers",
                 "medium")
    excl = _excludes(config, "smtp_tls_exclude_ciphers",
                     *(["smtp_tls_mandatory_exclude_ciphers"] if mandatory else []))
    try:
        ctx.set_ciphers(cipher_list(config, grade, excl))
    except ssl.SSLError as e:
        raise TlsConfigError(f"invalid cipher list for grade {grade}: {e.reason or e}") from e
    cafile = _get(config, "smtp_tls_CAfile").strip() or None
    capath = _get(config, "smtp_tls_CApath").strip() or None
    if level in ("verify", "secure"):
        ctx.check_hostname = servername is not None
        ctx.verify_mode = ssl.CERT_REQUIRED
        if cafile or capath:
            ctx.load_verify_locations(cafile=cafile, capath=capath)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if cafile or capath:
            # Loaded so the log can say "Trusted" when the chain verifies.
            try:
                ctx.load_verify_locations(cafile=cafile, capath=capath)
            except (OSError, ssl.SSLError):
                pass
    cert = _get(config, "smtp_tls_cert_file").strip()
    chain = [f for f in _get(config, "smtp_tls_chain_files").replace(",", " ").split() if f]
    try:
        if chain:
            for f in chain:
                ctx.load_cert_chain(f, f, password=_no_passphrase)
        elif cert:
            ctx.load_cert_chain(cert, _get(config, "smtp_tls_key_file").strip() or cert,
                                password=_no_passphrase)
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(f"cannot load client certificate: {e}") from e
    return ctx


# --- texts -----------------------------------------------------------------------------


def _summary(ssl_object, *, server_side: bool) -> str:
    version = ssl_object.version() or "unknown"
    name, _proto, bits = ssl_object.cipher() or ("unknown", version, 0)
    # Python reports the secret bits only; Postfix prints used/algorithm bits,
    # which are equal for every cipher OpenSSL still enables.
    text = f"{version} with cipher {name} ({bits}/{bits} bits)"
    if version == "TLSv1.3":
        d = handshake_details(ssl_object, server_side=server_side)
        if d is not None:
            extra = []
            if d.key_exchange:
                extra.append(f"key-exchange {d.key_exchange}")
            if d.signature:
                extra.append(f"server-signature {d.signature}"
                             + (f" ({d.signature_bits} bits)" if d.signature_bits else ""))
            if d.digest:
                extra.append(f"server-digest {d.digest}")
            if extra:
                text += "\n" + " ".join(extra)
    return text


def received_header_tls_text(ssl_object, client_cert_requested: bool = False) -> str:
    """The TLS comment of the smtpd's Received header, as Postfix 3.7 writes it
    (smtpd_tls_received_header = yes), e.g.::

        (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)
        \\t key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256)
        \\t(No client certificate requested)

    Lines are joined with "\\n\\t"; the first has no leading tab.  The caller
    puts it between the ``Received: from ...`` line and ``\\tby ...``."""
    summary = _summary(ssl_object, server_side=True)
    lines = summary.split("\n")
    first = f"(using {lines[0]}" + (")" if len(lines) == 1 else "")
    out = [first]
    if len(lines) > 1:
        out.append(f" {lines[1]})")
    if not client_cert_requested:
        out.append("(No client certificate requested)")
    else:
        cert = ssl_object.getpeercert()
        if not cert:
            out.append("(Client did not present a certificate)")
        else:
            cn = _cn(cert.get("subject", ()))
            issuer = _cn(cert.get("issuer", ()))
            out.append(f"(Client CN \"{cn}\", Issuer \"{issuer}\" (verified OK))")
    return "\n\t".join(out)


def _cn(name) -> str:
    for rdn in name:
        for k, v in rdn:
            if k == "commonName":
                return v
    return ""


def server_log_text(namaddr: str, ssl_object, trust: str | None = None) -> str:
    """``Anonymous TLS connection established from name[addr]: TLSv1.3 with
    cipher ... (256/256 bits) key-exchange X25519 server-signature ...``
    ``trust`` defaults to ``Trusted`` when the client presented a certificate
    (Python's ssl only accepts ones that verify) and ``Anonymous`` otherwise."""
    if trust is None:
        trust = "Trusted" if ssl_object.getpeercert() else "Anonymous"
    summary = _summary(ssl_object, server_side=True).replace("\n", " ")
    return f"{trust} TLS connection established from {namaddr}: {summary}"


def tls_log_text(trust: str, host: str, addr: str, port: int | str, ssl_object) -> str:
    """Client side: ``Verified TLS connection established to host[addr]:port: ...``;
    ``trust`` is Anonymous, Untrusted, Trusted or Verified (Postfix's words)."""
    summary = _summary(ssl_object, server_side=False).replace("\n", " ")
    return f"{trust} TLS connection established to {host}[{addr}]:{port}: {summary}"
