"""TLS for the smtpd (STARTTLS, RFC 3207) and the smtp client: ssl contexts
built from Postfix's parameters, config checks, and Postfix-shaped texts.

API::

    server_security_level(config) -> "none" | "may" | "encrypt"
    server_context(config) -> ssl.SSLContext | None    # None: level none / no TLS
    client_cert_policy(ctx) -> ClientCertPolicy        # ask / require / digest / untrusted_ok
    client_certificate(ssl_object) -> ClientCert | None   # the client's certificate, after
                                                       # the handshake: trusted, subject_cn,
                                                       # issuer_cn, fingerprint, pkey_fingerprint
    fingerprint(der, digest="sha256") -> "AB:CD:..."   # Postfix's fingerprint form
    parse_certificate(der) -> (subject CN, issuer CN or O, SubjectPublicKeyInfo DER)
    check_tls_config(config) -> list[str]              # for `postfix check` / start
    client_context(config, level, *, servername=None) -> ssl.SSLContext | None
    received_header_tls_text(ssl_object, client_cert_requested=False, cert=<read>) -> str
    server_log_text(namaddr, ssl_object, trust=None) -> str
                                   # "Trusted|Untrusted|Anonymous TLS connection established from ..."
    tls_log_text(trust, host, addr, port, ssl_object) -> str   # client side
    parse_protocols(value) -> (ssl.TLSVersion, ssl.TLSVersion)
    cipher_list(config, grade, excludes) -> str

Client certificates (smtpd_tls_ask_ccert, smtpd_tls_req_ccert): as in Postfix, the
server asks for a certificate and accepts any for the handshake, trusted or not;
trust is OpenSSL's verification result against smtpd_tls_CAfile/CApath (chains
deeper than smtpd_tls_ccert_verifydepth are untrusted).  Python's ssl cannot
accept an untrusted certificate, so introspect.accept_any_client_certificate()
gives the context's SSL_CTX a verify callback that never fails (ctypes).  The
names of the CAs in smtpd_tls_CAfile go into the CertificateRequest.  With
smtpd_tls_req_ccert (level encrypt only) the smtpd refuses a session without a
trusted certificate after the handshake with Postfix's 421.

Notes on what differs from Postfix:
- smtpd_tls_session_cache_timeout: 0 turns session tickets off; any other value
  keeps OpenSSL's built-in ticket lifetime (Python cannot set it).  Ticket
  keys are per process (Postfix's tlsmgr shares them), so resumption works
  only when the client comes back to the same smtpd process.
- smtpd_tls_ask_ccert: where the verify callback cannot be installed (another
  Python implementation or version, a missing OpenSSL symbol) postwell logs one
  warning and falls back to Python's own verification: only certificates that
  verify against smtpd_tls_CAfile/CApath get through the handshake (others
  fail it), and without CA files no certificate is asked for.
- A bad smtpd_tls_CAfile is reported by `postfix check` (Postfix's check is
  silent; its smtpd then disables TLS, as postwell's does).
- smtpd_tls_wrappermode with smtpd_tls_req_ccert: the refusal's 421 is the only
  reply (Postfix 3.7 also sends its 220 greeting after it before closing).
- smtpd_tls_loglevel 2 logs the certificate summary line (subject_CN, issuer,
  fingerprints) but not OpenSSL's handshake state trace.
- smtpd_tls_dh1024_param_file is loaded when set; with OpenSSL 3 the ECDHE and
  TLS 1.3 groups are used in practice.  smtpd_tls_eecdh_grade is left to OpenSSL.
- TLS 1.0/1.1 are off by default (config/defaults.py POSTWELL_DIFFERENCES).
"""

from __future__ import annotations

import hashlib
import os
import ssl
import warnings
from dataclasses import dataclass, field

from .introspect import handshake_details  # noqa: F401

__all__ = ["TlsConfigError", "server_security_level", "server_context", "check_tls_config",
           "client_context", "received_header_tls_text", "server_log_text", "tls_log_text",
           "parse_protocols", "cipher_list", "client_security_level", "handshake_details",
           "ClientCert", "ClientCertPolicy", "client_cert_policy", "client_certificate",
           "fingerprint", "parse_certificate"]


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
        "smtpd_tls_ask_ccert", "smtpd_tls_req_ccert", "smtpd_tls_ccert_verifydepth",
        "smtpd_tls_fingerprint_digest", "relay_clientcerts", "tls_preempt_cipherlist",
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
            where = f'CAfile="{cafile}"' if cafile else f'CApath="{capath}"'
            if isinstance(e, ssl.SSLError):
                why = (e.reason or "").lower().replace("_", " ") or str(e)
            else:
                why = e.strerror or str(e)
            raise TlsConfigError(f"cannot load Certification Authority data, {where}: "
                                 f"{why}") from e
    _client_cert_setup(config, ctx, level, cafile, capath)
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


@dataclass
class ClientCertPolicy:
    """How a server context treats client certificates (attached to it as
    ``ctx.postwell_ccert``; read it with client_cert_policy())."""
    ask: bool = False           # a certificate is requested
    require: bool = False       # smtpd_tls_req_ccert at level encrypt: trusted, or 421
    digest: str = "sha256"      # smtpd_tls_fingerprint_digest
    untrusted_ok: bool = False  # the handshake accepts certificates that do not verify
    warnings: list[str] = field(default_factory=list)   # to log once, at first use
    warned: bool = False


def client_cert_policy(ctx) -> ClientCertPolicy:
    pol = getattr(ctx, "postwell_ccert", None)
    return pol if isinstance(pol, ClientCertPolicy) else ClientCertPolicy()


def _fingerprint_digest(config) -> str:
    name = _get(config, "smtpd_tls_fingerprint_digest", "sha256").strip().lower() or "sha256"
    try:
        hashlib.new(name)
    except (ValueError, TypeError):
        # Postfix: tls_validate_digest() fails and the TLS engine is not started.
        raise TlsConfigError(f"Digest algorithm \"{name}\" not found") from None
    return name


def _client_cert_setup(config, ctx: ssl.SSLContext, level: str,
                       cafile: str | None, capath: str | None) -> None:
    """smtpd_tls_ask_ccert / smtpd_tls_req_ccert, Postfix's way: the client is asked
    for a certificate, any certificate is accepted for the handshake and trust is
    decided afterwards (present-but-untrusted still has a fingerprint)."""
    pol = ClientCertPolicy(digest=_fingerprint_digest(config))
    ctx.postwell_ccert = pol
    req = _yes(config, "smtpd_tls_req_ccert")
    if req and level != "encrypt":
        pol.warnings.append("Can't require client certs unless TLS is required")
    pol.require = req and level == "encrypt"
    pol.ask = _yes(config, "smtpd_tls_ask_ccert") or pol.require
    ctx.verify_mode = ssl.CERT_NONE
    if not pol.ask:
        return
    try:
        depth = int(_get(config, "smtpd_tls_ccert_verifydepth", "9").strip() or "9")
    except ValueError:
        depth = 9
    from .introspect import accept_any_client_certificate
    why = accept_any_client_certificate(ctx, verify_depth=depth, ca_names_file=cafile)
    if why is None:
        pol.untrusted_ok = True
        return
    # Python's own verification: only certificates that verify against the CA
    # files get through the handshake; without them nothing can be asked.
    pol.warnings.append(f"smtpd_tls_ask_ccert: cannot accept untrusted client certificates "
                        f"({why}); only certificates that verify against smtpd_tls_CAfile/"
                        f"smtpd_tls_CApath are accepted")
    if cafile or capath:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
        pol.ask = pol.require


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
    for p in _check_client_cert_config(config):
        # One report per CA file: server_context() may have named it already.
        path = p.split(" ", 2)[1].rstrip(":") if p.startswith("smtpd_tls_CA") else None
        if p not in problems and not (path and any(path in q for q in problems)):
            problems.append(p)
    return problems


def _check_client_cert_config(config) -> list[str]:
    """Client-certificate settings that would not do what the admin expects."""
    out: list[str] = []
    try:
        level = server_security_level(config)
    except TlsConfigError:
        return out
    req = _yes(config, "smtpd_tls_req_ccert")
    if not (_yes(config, "smtpd_tls_ask_ccert") or req):
        return out
    if req and level != "encrypt":
        out.append("smtpd_tls_req_ccert = yes: Can't require client certs unless TLS is "
                   "required (smtpd_tls_security_level = encrypt)")
    cafile = _get(config, "smtpd_tls_CAfile").strip()
    capath = _get(config, "smtpd_tls_CApath").strip()
    if cafile:
        text = _pem_text(cafile) if os.access(cafile, os.R_OK) else None
        if text is None:
            why = "Permission denied" if os.path.exists(cafile) else "No such file or directory"
            out.append(f"smtpd_tls_CAfile {cafile}: {why}; client certificates cannot be "
                       "verified")
        elif "-----BEGIN CERTIFICATE-----" not in text and "-----BEGIN TRUSTED CERTIFICATE" not in text:
            out.append(f"smtpd_tls_CAfile {cafile}: no PEM certificate found; client "
                       "certificates cannot be verified")
    elif capath and not os.path.isdir(capath):
        out.append(f"smtpd_tls_CApath {capath}: not a directory; client certificates cannot "
                   "be verified")
    try:
        _fingerprint_digest(config)
    except TlsConfigError as e:
        out.append(f"smtpd_tls_fingerprint_digest: {e}")
    return out


# --- client certificates (server side) -----------------------------------------------


@dataclass(frozen=True)
class ClientCert:
    """What the smtpd knows about the client's certificate after the handshake
    (Postfix's peer_status, peer_CN, issuer_CN, peer_cert_fprint, peer_pkey_fprint)."""
    trusted: bool               # verified against smtpd_tls_CAfile/CApath
    subject_cn: str             # "" when missing or unusable (Postfix's tls_peer_CN)
    issuer_cn: str              # issuer CN, else its O (Postfix's tls_issuer_CN)
    fingerprint: str            # "AB:CD:..." of the DER certificate
    pkey_fingerprint: str       # "AB:CD:..." of the DER SubjectPublicKeyInfo
    verify_error: str | None = None     # OpenSSL's words when not trusted

    @property
    def trust(self) -> str:
        return "Trusted" if self.trusted else "Untrusted"


def fingerprint(data: bytes, digest: str = "sha256") -> str:
    """Postfix's fingerprint form: upper-case hex bytes joined by colons."""
    return ":".join(f"{b:02X}" for b in hashlib.new(digest, data).digest())


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at pos; ValueError
    on anything malformed (so a hostile certificate cannot make us loop or read
    past its end)."""
    if pos + 2 > end:
        raise ValueError("truncated")
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag number")
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > end:
            raise ValueError("bad length")
        length = int.from_bytes(buf[pos:pos + n], "big")
        pos += n
    if pos + length > end:
        raise ValueError("truncated")
    return tag, pos, pos + length


_OID_CN = bytes.fromhex("550403")
_OID_O = bytes.fromhex("55040a")
_STRING_CODECS = {12: "utf-8", 19: "latin-1", 22: "latin-1", 26: "latin-1", 20: "latin-1",
                  30: "utf-16-be", 28: "utf-32-be"}


def _name_attribute(buf: bytes, start: int, end: int, oid: bytes) -> str | None:
    """The first value of ``oid`` in a DER Name (X509_NAME_get_index_by_NID order),
    as Postfix's tls_text_name() accepts it; None when absent or unusable."""
    pos = start
    while pos < end:
        tag, rs, re_ = _tlv(buf, pos, end)          # RelativeDistinguishedName (SET)
        pos = re_
        apos = rs
        while apos < re_:
            _t, as_, ae = _tlv(buf, apos, re_)      # AttributeTypeAndValue (SEQUENCE)
            apos = ae
            otag, os_, oe = _tlv(buf, as_, ae)
            if otag != 0x06 or buf[os_:oe] != oid:
                continue
            vtag, vs, ve = _tlv(buf, oe, ae)
            codec = _STRING_CODECS.get(vtag)
            if codec is None:
                return None
            text = buf[vs:ve].decode(codec, "replace").rstrip("\0")
            # Postfix refuses long values, embedded NULs and ASCII control characters.
            if (len(text.encode("utf-8")) >= 256 or "\0" in text
                    or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)):
                return None
            return text
    return None


def parse_certificate(der: bytes) -> tuple[str, str, bytes]:
    """(subject CN, issuer CN or O, SubjectPublicKeyInfo DER) of a DER certificate.
    Names are "" when missing; ValueError when the DER is malformed."""
    _tag, cs, ce = _tlv(der, 0, len(der))                  # Certificate
    _tag, ts, te = _tlv(der, cs, ce)                       # TBSCertificate
    pos = ts
    tag, _s, pos = _tlv(der, pos, te)
    if tag == 0xA0:                                        # [0] version
        tag, _s, pos = _tlv(der, pos, te)                  # serialNumber
    fields = []
    for _ in range(4):                                     # signature issuer validity subject
        tag, fs, fe = _tlv(der, pos, te)
        fields.append((fs, fe))
        pos = fe
    _tag, ks, ke = _tlv(der, pos, te)                      # subjectPublicKeyInfo
    spki = der[pos:ke]
    (is_, ie), (ss, se) = fields[1], fields[3]
    subject = _name_attribute(der, ss, se, _OID_CN) or ""
    issuer = (_name_attribute(der, is_, ie, _OID_CN)
              or _name_attribute(der, is_, ie, _OID_O) or "")
    return subject, issuer, spki


def client_certificate(ssl_object, digest: str | None = None) -> ClientCert | None:
    """The client's certificate of a server-side TLS session, or None when it
    presented none.  Trust comes from the verification OpenSSL did during the
    handshake (SSL_get_verify_result), as in Postfix."""
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):
        return None
    if not der:
        return None
    pol = client_cert_policy(ssl_object.context)
    digest = digest or pol.digest
    try:
        subject, issuer, spki = parse_certificate(der)
    except (ValueError, IndexError):
        subject, issuer, spki = "", "", b""
    # OpenSSL's verdict whenever it can be read; else, only where Python's own
    # verification guarded the handshake, getting through it means trusted.
    from .introspect import peer_verify_result, verify_error_text
    code = peer_verify_result(ssl_object)
    if code is not None:
        trusted = code == 0
    else:
        trusted = not pol.untrusted_ok and ssl_object.context.verify_mode != ssl.CERT_NONE
    error = None
    if not trusted:
        error = verify_error_text(code) if code is not None else "verification result unknown"
    return ClientCert(trusted, subject, issuer, fingerprint(der, digest),
                      fingerprint(spki, digest) if spki else "", error)


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


def _sig_text(role: str, name: str | None, bits: int | None, curve: str | None,
              digest: str | None) -> list[str]:
    if not name:
        return []
    text = f"{role}-signature {name}"
    if curve:
        text += f" ({curve})"
    elif bits:
        text += f" ({bits} bits)"
    out = [text]
    if digest:
        out.append(f"{role}-digest {digest}")
    return out


def _summary(ssl_object, *, server_side: bool) -> str:
    """"TLSv1.3 with cipher ... (256/256 bits)", then (TLS 1.3) a line with the key
    exchange and the server's signature, then one with the client's signature when
    the client presented a certificate (Postfix's tls_log_summary() pieces)."""
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
            extra += _sig_text("server", d.signature, d.signature_bits, d.signature_curve,
                               d.digest)
            if extra:
                text += "\n" + " ".join(extra)
            client = _sig_text("client", d.client_signature, d.client_signature_bits,
                               d.client_signature_curve, d.client_digest)
            if client:
                text += "\n" + " ".join(client)
    return text


def received_header_tls_text(ssl_object, client_cert_requested: bool = False,
                             cert: "ClientCert | None | bool" = True) -> str:
    """The TLS comment of the smtpd's Received header, as Postfix 3.7 writes it
    (smtpd_tls_received_header = yes), e.g.::

        (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)
        \t key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256
        \t client-signature RSA-PSS (2048 bits) client-digest SHA256)
        \t(Client CN "x", Issuer "y" (not verified))

    Lines are joined with "\n\t"; the first has no leading tab.  The caller
    puts it between the ``Received: from ...`` line and ``\tby ...``.
    ``client_cert_requested`` is smtpd_tls_ask_ccert; ``cert`` the session's
    client_certificate() result (left out: read from ``ssl_object``)."""
    summary = _summary(ssl_object, server_side=True)
    lines = summary.split("\n")
    out = [f"(using {lines[0]}"] + [f" {more}" for more in lines[1:]]
    out[-1] += ")"
    if cert is True:
        cert = client_certificate(ssl_object)
    if cert:
        verdict = "verified OK" if cert.trusted else "not verified"
        out.append(f"(Client CN \"{cert.subject_cn}\", Issuer \"{cert.issuer_cn}\" ({verdict}))")
    elif client_cert_requested:
        out.append("(Client did not present a certificate)")
    else:
        out.append("(No client certificate requested)")
    return "\n\t".join(out)


def server_log_text(namaddr: str, ssl_object, trust: str | None = None) -> str:
    """``Anonymous TLS connection established from name[addr]: TLSv1.3 with
    cipher ... (256/256 bits) key-exchange X25519 server-signature ...``
    ``trust`` defaults to ``Trusted`` / ``Untrusted`` when the client presented
    a certificate that did / did not verify, and ``Anonymous`` otherwise."""
    if trust is None:
        cert = client_certificate(ssl_object)
        trust = cert.trust if cert else "Anonymous"
    summary = _summary(ssl_object, server_side=True).replace("\n", " ")
    return f"{trust} TLS connection established from {namaddr}: {summary}"


def tls_log_text(trust: str, host: str, addr: str, port: int | str, ssl_object) -> str:
    """Client side: ``Verified TLS connection established to host[addr]:port: ...``;
    ``trust`` is Anonymous, Untrusted, Trusted or Verified (Postfix's words)."""
    summary = _summary(ssl_object, server_side=False).replace("\n", " ")
    return f"{trust} TLS connection established to {host}[{addr}]:{port}: {summary}"
