"""Handshake details that Python's ssl module does not expose.

Postfix logs the key-exchange group, the signature algorithm with the key size
and the signature digest of a TLS 1.3 handshake.  Python 3.11 has no API for
these, so we ask OpenSSL through ctypes, using the SSL* pointer inside the
``_ssl._SSLSocket`` object.  The pointer is trusted only after checking that
the neighbouring struct member is the object's own SSLContext; anything
unexpected (another Python, another layout, a missing symbol) makes
``handshake_details`` return None and the callers print the shorter text.

The same access lets a server context accept client certificates that do not
verify (``accept_any_client_certificate``, Postfix's never-failing verify
callback) and read the verification result afterwards (``peer_verify_result``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from dataclasses import dataclass

_NID_X25519 = 1034
_NID_X448 = 1035
_NID_ffdhe = range(1126, 1131)
_EVP_PKEY_RSA = 6
_EVP_PKEY_RSA_PSS = 912
_EVP_PKEY_EC = 408
_EVP_PKEY_ED25519 = 1087
_EVP_PKEY_ED448 = 1088
_SIG_NAMES = {_EVP_PKEY_RSA: "RSA", _EVP_PKEY_RSA_PSS: "RSA-PSS", _EVP_PKEY_EC: "ECDSA",
              _EVP_PKEY_ED25519: "ED25519", _EVP_PKEY_ED448: "ED448", 116: "DSA"}
_SSL_CTRL_GET_PEER_SIGNATURE_NID = 108
_SSL_CTRL_GET_SIGNATURE_NID = 132
_SSL_CTRL_GET_NEGOTIATED_GROUP = 134


@dataclass(frozen=True)
class HandshakeDetails:
    key_exchange: str | None        # "X25519", "ECDHE (prime256v1)"
    signature: str | None           # "RSA-PSS"
    signature_bits: int | None      # 2048
    digest: str | None              # "SHA256"
    signature_curve: str | None = None          # "prime256v1" (ECDSA keys: instead of bits)
    client_signature: str | None = None         # server side: the client certificate's key
    client_signature_bits: int | None = None
    client_signature_curve: str | None = None
    client_digest: str | None = None


class _Lib:
    def __init__(self) -> None:
        import _ssl
        lib = ctypes.CDLL(_ssl.__file__)   # dlsym through it finds the libssl _ssl uses
        self.ok = True
        try:
            self.SSL_ctrl = lib.SSL_ctrl
            self.SSL_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
            self.SSL_ctrl.restype = ctypes.c_long
            self.OBJ_nid2sn = lib.OBJ_nid2sn
            self.OBJ_nid2sn.argtypes = [ctypes.c_int]
            self.OBJ_nid2sn.restype = ctypes.c_char_p
            self.sig_type = self._opt(lib, "SSL_get_signature_type_nid",
                                      [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)])
            self.peer_sig_type = self._opt(lib, "SSL_get_peer_signature_type_nid",
                                           [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)])
            self.get_cert = self._opt(lib, "SSL_get_certificate", [ctypes.c_void_p],
                                      ctypes.c_void_p)
            self.get_peer_cert = (self._opt(lib, "SSL_get0_peer_certificate", [ctypes.c_void_p],
                                            ctypes.c_void_p))
            self.pubkey = self._opt(lib, "X509_get0_pubkey", [ctypes.c_void_p], ctypes.c_void_p)
            self.bits = (self._opt(lib, "EVP_PKEY_get_bits", [ctypes.c_void_p])
                         or self._opt(lib, "EVP_PKEY_bits", [ctypes.c_void_p]))
            self.key_id = (self._opt(lib, "EVP_PKEY_get_base_id", [ctypes.c_void_p])
                           or self._opt(lib, "EVP_PKEY_base_id", [ctypes.c_void_p]))
            self.group_name = self._opt(lib, "EVP_PKEY_get_group_name",
                                        [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                         ctypes.POINTER(ctypes.c_size_t)])
            # Client certificates (server side): see accept_any_client_certificate().
            self.get_ssl_ctx = self._opt(lib, "SSL_get_SSL_CTX", [ctypes.c_void_p],
                                         ctypes.c_void_p)
            self.ctx_set_verify = self._opt(lib, "SSL_CTX_set_verify",
                                            [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p],
                                            None)
            self.ctx_get_verify_mode = self._opt(lib, "SSL_CTX_get_verify_mode",
                                                 [ctypes.c_void_p])
            self.ctx_set_verify_depth = self._opt(lib, "SSL_CTX_set_verify_depth",
                                                  [ctypes.c_void_p, ctypes.c_int], None)
            self.store_error_depth = self._opt(lib, "X509_STORE_CTX_get_error_depth",
                                               [ctypes.c_void_p])
            self.store_set_error = self._opt(lib, "X509_STORE_CTX_set_error",
                                             [ctypes.c_void_p, ctypes.c_int], None)
            self.verify_result = self._opt(lib, "SSL_get_verify_result", [ctypes.c_void_p],
                                           ctypes.c_long)
            self.verify_error_string = self._opt(lib, "X509_verify_cert_error_string",
                                                 [ctypes.c_long], ctypes.c_char_p)
            self.load_client_ca = self._opt(lib, "SSL_load_client_CA_file", [ctypes.c_char_p],
                                            ctypes.c_void_p)
            self.ctx_set_client_ca = self._opt(lib, "SSL_CTX_set_client_CA_list",
                                               [ctypes.c_void_p, ctypes.c_void_p], None)
        except AttributeError:
            self.ok = False

    @staticmethod
    def _opt(lib, name, argtypes, restype=ctypes.c_int):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes = argtypes
            fn.restype = restype
        return fn

    def sn(self, nid: int) -> str | None:
        name = self.OBJ_nid2sn(nid)
        return name.decode("ascii", "replace") if name else None


_lib: _Lib | None = None
_SUPPORTED = (sys.implementation.name == "cpython" and (3, 8) <= sys.version_info[:2] <= (3, 13)
              and platform.architecture()[0] == "64bit")


def _ssl_pointer(ssl_object) -> int | None:
    """SSL* of an ssl.SSLObject / ssl.SSLSocket, or None when not provably right."""
    if not _SUPPORTED:
        return None
    inner = getattr(ssl_object, "_sslobj", None)
    if inner is None or type(inner).__name__ != "_SSLSocket":
        return None
    ctx = getattr(inner, "context", None)
    if ctx is None:
        return None
    # PySSLSocket: PyObject_HEAD (16 bytes), Socket*, SSL*, PySSLContext*.
    base = id(inner)
    if ctypes.c_void_p.from_address(base + 32).value != id(ctx):
        return None
    return ctypes.c_void_p.from_address(base + 24).value


def _key_params(lib: _Lib, cert) -> tuple[str | None, int | None, str | None]:
    """(name, bits, curve) of a certificate's key as Postfix names them
    (tls_misc.c): RSA keys sign with RSA-PSS in TLS 1.3 and show their size,
    EC keys show "ECDSA" and the curve, others their OpenSSL short name."""
    if not cert or lib.pubkey is None:
        return None, None, None
    key = lib.pubkey(cert)
    if not key:
        return None, None, None
    kid = lib.key_id(key) if lib.key_id is not None else 0
    if kid == _EVP_PKEY_RSA:
        bits = lib.bits(key) if lib.bits is not None else 0
        return "RSA-PSS", bits or None, None
    if kid == _EVP_PKEY_EC:
        curve = None
        if lib.group_name is not None:
            buf = ctypes.create_string_buffer(80)
            size = ctypes.c_size_t(0)
            if lib.group_name(key, buf, len(buf), ctypes.byref(size)) > 0:
                curve = buf.value.decode("ascii", "replace") or None
        return "ECDSA", None, curve
    if kid > 0:
        return lib.sn(kid), None, None
    return None, None, None


def handshake_details(ssl_object, *, server_side: bool) -> HandshakeDetails | None:
    """Key exchange and the server's signature, as Postfix logs them; None when
    they cannot be read safely.  On the server side, also the client
    certificate's signature when the client presented one."""
    global _lib
    ptr = _ssl_pointer(ssl_object)
    if not ptr:
        return None
    try:
        if _lib is None:
            _lib = _Lib()
        lib = _lib
        if not lib.ok:
            return None
        group = lib.SSL_ctrl(ptr, _SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None)
        kex = None
        if group in (_NID_X25519, _NID_X448):
            kex = lib.sn(group)
        elif group in _NID_ffdhe:
            kex = f"DHE ({lib.sn(group)})"
        elif group > 0:
            kex = f"ECDHE ({lib.sn(group)})"
        nid = ctypes.c_int(0)
        digest = None
        ctrl = _SSL_CTRL_GET_SIGNATURE_NID if server_side else _SSL_CTRL_GET_PEER_SIGNATURE_NID
        if lib.SSL_ctrl(ptr, ctrl, 0, ctypes.cast(ctypes.byref(nid), ctypes.c_void_p)) > 0:
            digest = lib.sn(nid.value)
        sig = None
        sig_fn = lib.sig_type if server_side else lib.peer_sig_type
        nid = ctypes.c_int(0)
        if sig_fn is not None and sig_fn(ptr, ctypes.byref(nid)) > 0:
            sig = _SIG_NAMES.get(nid.value) or lib.sn(nid.value)
        bits = curve = None
        if server_side:
            if lib.get_cert is not None:
                name, bits, curve = _key_params(lib, lib.get_cert(ptr))
                if name is not None and lib.key_id is not None:
                    sig = name
        elif lib.get_peer_cert is not None and lib.pubkey is not None and lib.bits is not None:
            cert = lib.get_peer_cert(ptr)
            if cert:
                key = lib.pubkey(cert)
                if key:
                    bits = lib.bits(key) or None
        csig = cbits = ccurve = cdigest = None
        if server_side and lib.get_peer_cert is not None:
            peer = lib.get_peer_cert(ptr)
            if peer:
                csig, cbits, ccurve = _key_params(lib, peer)
                nid = ctypes.c_int(0)
                if lib.SSL_ctrl(ptr, _SSL_CTRL_GET_PEER_SIGNATURE_NID, 0,
                                ctypes.cast(ctypes.byref(nid), ctypes.c_void_p)) > 0:
                    cdigest = lib.sn(nid.value)
        return HandshakeDetails(kex, sig, bits, digest, curve, csig, cbits, ccurve, cdigest)
    except (OSError, AttributeError, ValueError):
        return None


# --- client certificates on the server side ------------------------------------------------
#
# Postfix asks for a client certificate with a verify callback that never fails the
# handshake, and decides trust afterwards from SSL_get_verify_result().  Python's ssl
# either fails the handshake on an untrusted certificate (CERT_OPTIONAL/REQUIRED) or does
# not ask at all (CERT_NONE), so we give the context's SSL_CTX the same kind of callback.

_SSL_VERIFY_PEER = 0x01
_X509_V_OK = 0
_X509_V_ERR_CERT_CHAIN_TOO_LONG = 22
_VERIFY_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_callbacks: list = []           # the C trampolines must live as long as any SSL_CTX using them


def _ssl_ctx_pointer(ctx) -> int | None:
    """SSL_CTX* of an ssl.SSLContext, found through a throwaway SSLObject whose SSL*
    _ssl_pointer() can prove (there is no way to read the context's own safely)."""
    import ssl
    probe = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    ptr = _ssl_pointer(probe)
    if not ptr or _lib.get_ssl_ctx is None:
        return None
    return _lib.get_ssl_ctx(ptr) or None


def accept_any_client_certificate(ctx, *, verify_depth: int = 9,
                                  ca_names_file: str | None = None) -> str | None:
    """Make a server SSLContext ask for a client certificate and accept any, trusted
    or not (Postfix's smtpd_tls_ask_ccert); trust is read per session with
    peer_verify_result().  Chains deeper than ``verify_depth`` count as untrusted
    (smtpd_tls_ccert_verifydepth).  The CA names of ``ca_names_file`` go into the
    CertificateRequest, as Postfix sends them.  Returns None when done, else why it
    could not be done on this Python (the context is then left as it was)."""
    import ssl
    global _lib
    if not _SUPPORTED:
        return f"not supported on {sys.implementation.name} {platform.python_version()}"
    try:
        if _lib is None:
            _lib = _Lib()
        lib = _lib
        needed = (lib.get_ssl_ctx, lib.ctx_set_verify, lib.ctx_get_verify_mode,
                  lib.store_error_depth, lib.store_set_error, lib.verify_result)
        if not lib.ok or any(fn is None for fn in needed):
            return "the OpenSSL functions it needs are missing"
        saved_mode = ctx.verify_mode
        # Let Python record CERT_OPTIONAL itself, so its own view of the mode stays true.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        sslctx = _ssl_ctx_pointer(ctx)
        if not sslctx or lib.ctx_get_verify_mode(sslctx) != _SSL_VERIFY_PEER:
            ctx.verify_mode = saved_mode
            return "cannot find the context's SSL_CTX"
        limit = max(0, int(verify_depth))
        get_depth, set_error = lib.store_error_depth, lib.store_set_error

        def verify(preverify_ok: int, store_ctx: int) -> int:
            # Never fail the handshake: an untrusted certificate is still a fingerprint.
            try:
                if store_ctx and get_depth(store_ctx) > limit:
                    set_error(store_ctx, _X509_V_ERR_CERT_CHAIN_TOO_LONG)
            except Exception:   # noqa: BLE001 - a callback must not raise into OpenSSL
                pass
            return 1

        callback = _VERIFY_CB(verify)
        _callbacks.append(callback)
        if lib.ctx_set_verify_depth is not None:
            lib.ctx_set_verify_depth(sslctx, limit + 1)
        # RFC 8446 4.2.4 / RFC 5246 7.4.4: the CertificateRequest names acceptable CAs.
        if ca_names_file and lib.load_client_ca is not None and lib.ctx_set_client_ca is not None:
            names = lib.load_client_ca(os.fsencode(ca_names_file))
            if names:
                lib.ctx_set_client_ca(sslctx, names)    # the SSL_CTX owns the list now
        # Last: once the callback is in, success is the only answer (the caller must
        # then judge trust by SSL_get_verify_result, never by the handshake's outcome).
        ctx._postwell_verify_callback = callback
        lib.ctx_set_verify(sslctx, _SSL_VERIFY_PEER, ctypes.cast(callback, ctypes.c_void_p))
        return None
    except (OSError, AttributeError, ValueError, TypeError, MemoryError) as exc:
        try:
            ctx.verify_mode = saved_mode
        except (NameError, ValueError):
            pass
        return f"ctypes: {exc}"


def peer_verify_result(ssl_object) -> int | None:
    """SSL_get_verify_result() of a session: 0 (X509_V_OK) when the client certificate
    verified; None when it cannot be read."""
    ptr = _ssl_pointer(ssl_object)
    if not ptr or _lib is None or not _lib.ok or _lib.verify_result is None:
        return None
    try:
        return int(_lib.verify_result(ptr))
    except (OSError, ValueError):
        return None


def verify_error_text(code: int) -> str:
    """OpenSSL's words for an X509_V_ERR_* code ("self-signed certificate")."""
    try:
        if _lib is not None and _lib.verify_error_string is not None:
            text = _lib.verify_error_string(code)
            if text:
                return text.decode("ascii", "replace")
    except (OSError, ValueError):
        pass
    return f"certificate verification error {code}"
