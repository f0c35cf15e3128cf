"""Handshake details that Python's ssl module does not expose.

Postfix logs the key-exchange group, the signature algorithm with the key size
and the signature digest of a TLS 1.3 handshake.  Python 3.11 has no API for
these, so we ask OpenSSL through ctypes, using the SSL* pointer inside the
``_ssl._SSLSocket`` object.  The pointer is trusted only after checking that
the neighbouring struct member is the object's own SSLContext; anything
unexpected (another Python, another layout, a missing symbol) makes
``handshake_details`` return None and the callers print the shorter text.
"""

from __future__ import annotations

import ctypes
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


def handshake_details(ssl_object, *, server_side: bool) -> HandshakeDetails | None:
    """Key exchange and the server's signature, as Postfix logs them; None when
    they cannot be read safely."""
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
        bits = None
        cert_fn = lib.get_cert if server_side else lib.get_peer_cert
        if cert_fn is not None and lib.pubkey is not None and lib.bits is not None:
            cert = cert_fn(ptr)
            if cert:
                key = lib.pubkey(cert)
                if key:
                    bits = lib.bits(key) or None
        return HandshakeDetails(kex, sig, bits, digest)
    except (OSError, AttributeError, ValueError):
        return None
