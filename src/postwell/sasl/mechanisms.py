"""SASL mechanisms run inside postwell against a password back end.

Used by the cyrus (sasldb, saslauthd) and postwell (passwd file) back ends;
Dovecot runs its own mechanisms.  Failure texts are Cyrus SASL's
``sasl_errstring()`` words, which Postfix puts into its 535 reply, so a client
sees the same text as from Postfix with Cyrus.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass

from .base import (RESPONSE_LIMIT_FAILURE, Challenge, Failure, SaslExchange, SaslStep,
                   Success, printable)

# Cyrus SASL error strings (sasl_errstring) as Postfix reports them.
BADAUTH = "authentication failure"          # SASL_BADAUTH, also SASL_NOUSER (privacy)
BADPROT = "bad protocol / cancel"           # SASL_BADPROT
CONTINUE = "another step is needed in authentication"   # SASL_CONTINUE
NOMECH = "no mechanism available"           # SASL_NOMECH
GENERIC = "generic failure"                 # SASL_FAIL (temporary)
UNAVAIL = "remote authentication server unavailable"   # SASL_UNAVAIL (temporary)
NOAUTHZ = "authorization failure"           # SASL_NOAUTHZ
ENCRYPT = "encryption needed to use mechanism"  # SASL_ENCRYPT: forbidden by security options

SERVER_FIRST = "Remote sent first but mech does not allow it."   # libsasl2, server_start
PLAIN_WRONG = "Password verification failed"   # libsasl2's PLAIN plugin
_C_SPACE = " \t\n\v\f\r"     # C isspace(), what libsasl2 strips around names
ALL_WHITESPACE = "All-whitespace username."   # libsasl2's canonuser on an empty name

SCRAM_ITERATIONS = 4096      # RFC 7677 4: at least 4096 for SHA-256
# libsasl2's limits: the LOGIN plugin's USERNAME_MAXLEN / PASSWORD_MAXLEN, CRAM-MD5's
# input, and canonuser's CANON_BUF_SIZE (a longer name is SASL_BUFOVER).
_MAX_FIELD = 1024
BUFOVER = "overflowed buffer"               # SASL_BUFOVER


class BackendUnavailable(Exception):
    """The password store cannot answer now (temporary failure)."""


@dataclass(frozen=True)
class Identity:
    """A login split as Cyrus SASL does it (canonusr): ``user@realm`` names
    its realm, a bare ``user`` gets smtpd_sasl_local_domain, or the server's
    host name when that is empty.  ``reported`` is Postfix's sasl_username."""
    user: str
    realm: str
    reported: str


def canonical_identity(login: str, local_domain: str, hostname: str) -> Identity:
    if "@" in login:
        user, _, realm = login.rpartition("@")
        return Identity(user, realm, login)
    if local_domain:
        return Identity(login, local_domain, f"{login}@{local_domain}")
    return Identity(login, hostname, login)


class PasswordBackend:
    """Where a local mechanism checks a password.

    ``verify`` answers for a clear-text password (PLAIN, LOGIN);
    ``secret`` returns the clear-text (or plaintext-equivalent) secret that
    CRAM-MD5 and SCRAM need, or None for an unknown user.  Both raise
    BackendUnavailable on a temporary problem.
    """
    supports_secret = False
    failure_delay = 0.0
    # Whether this store stands for libsasl2, whose plugins log their own
    # failure reasons (Postfix's "SASL authentication failure: ..." warnings).
    cyrus_library = False

    async def verify(self, ident: Identity, password: str) -> bool:  # pragma: no cover
        raise NotImplementedError

    async def secret(self, ident: Identity) -> str | None:  # pragma: no cover
        raise NotImplementedError


def _text(data: bytes) -> str:
    """A client's field as libsasl2 takes it: any bytes (not UTF-8 ones travel as
    surrogate escapes, so the log shows them as sent)."""
    return data.decode("utf-8", "surrogateescape")


def _utf8(data: bytes) -> str | None:
    """SCRAM's fields, which RFC 5802 7 requires to be UTF-8."""
    if len(data) > _MAX_FIELD:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _c_string(text: str) -> str:
    """What C code sees of a field: up to its first NUL."""
    return text.split("\0", 1)[0]


_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def cyrus_decode64(text: str) -> bytes | str:
    """Cyrus's sasl_decode64(), whose verdicts Postfix reports: the bytes, or the
    failure text.  It walks whole 4-character groups first, so a bad character
    (or data after "=") in one is SASL_BADPROT; only then is a short tail
    "incomplete" (SASL_CONTINUE, hence its odd text; this includes the "="
    empty initial response), unless padding was seen (SASL_BADPROT)."""
    whole = len(text) - len(text) % 4
    saw_equal = False
    for i in range(0, whole, 4):
        a, b, c, d = text[i:i + 4]
        if saw_equal or a not in _B64 or b not in _B64:
            return BADPROT
        if (c != "=" and c not in _B64) or (d != "=" and d not in _B64):
            return BADPROT
        if c == "=" and d != "=":
            return BADPROT
        saw_equal = c == "=" or d == "="
    if whole != len(text):
        return BADPROT if saw_equal else CONTINUE
    return base64.b64decode(text[:whole].encode("ascii")) if whole else b""


class LocalExchange(SaslExchange):
    """Base for the mechanisms below: response decoding (Cyrus's texts),
    size bound, and failure bookkeeping."""

    def __init__(self, backend: PasswordBackend, initial: str | bytes | None, *,
                 local_domain: str, hostname: str, response_limit: int) -> None:
        self.backend = backend
        self.initial = initial
        self.local_domain = local_domain
        self.hostname = hostname
        self.response_limit = response_limit
        self.username: str | None = None
        self.done = False

    def identity(self, login: str) -> Identity:
        if self.backend.cyrus_library:
            # libsasl2's canonuser takes a C string and drops white space around it
            # (C isspace()).
            login = _c_string(login).strip(_C_SPACE)
        ident = canonical_identity(login, self.local_domain, self.hostname)
        self.username = ident.reported
        return ident

    def fail(self, reason: str = BADAUTH, temporary: bool = False,
             library: str | tuple[str, ...] | None = None) -> Failure:
        self.done = True
        delay = self.backend.failure_delay if reason == BADAUTH else 0.0
        if isinstance(library, str):
            library = (library,)
        logged = library if library and self.backend.cyrus_library else ()
        return Failure(reason, temporary=temporary, username=self.username, delay=delay,
                       library_log=logged)

    def succeed(self, username: str, authzid: str | None = None) -> Success:
        self.done = True
        return Success(printable(username), authzid)

    def decode(self, response: str | bytes) -> bytes | Failure:
        if isinstance(response, bytes):
            if len(response) > self.response_limit:
                self.done = True
                return RESPONSE_LIMIT_FAILURE
            return response
        if len(response) > self.response_limit:
            self.done = True
            return RESPONSE_LIMIT_FAILURE
        data = cyrus_decode64(response)
        if isinstance(data, str):
            return self.fail(data)
        return data

    async def begin(self) -> SaslStep:
        if self.initial is None:
            return await self.first(None)
        data = self.decode(self.initial)
        if isinstance(data, Failure):
            return data
        return await self.first(data)

    async def step(self, response: str | bytes) -> SaslStep:
        if self.done:
            return self.fail(BADPROT)
        if isinstance(response, str) and len(response) >= self.response_limit:
            # Postfix reads a response line with smtpd_sasl_response_limit as the cap: one
            # that reaches it is "too long" (checked against 3.7).
            self.done = True
            return RESPONSE_LIMIT_FAILURE
        data = self.decode(response)
        if isinstance(data, Failure):
            return data
        return await self.next(data)

    async def first(self, data: bytes | None) -> SaslStep:  # pragma: no cover
        raise NotImplementedError

    async def next(self, data: bytes) -> SaslStep:  # pragma: no cover
        raise NotImplementedError

    async def check_password(self, login: str, password: str, authzid: str | None = None,
                             wrong: str | None = None) -> SaslStep:
        """``wrong``: the plugin's message when the password does not verify
        (PLAIN has one, LOGIN is silent)."""
        ident = self.identity(login)
        try:
            ok = await self.backend.verify(ident, password)
        except BackendUnavailable:
            return self.fail(GENERIC, temporary=True)
        except UnicodeEncodeError:
            # Bytes that are not UTF-8 match no stored name or password.
            ok = False
        if not ok:
            return self.fail(BADAUTH, library=wrong)
        if authzid and len(authzid.encode("utf-8", "surrogateescape")) > _MAX_FIELD:
            # libsasl2 canonicalises the requested identity after the password.
            self.username = authzid
            return self.fail(BUFOVER)
        if authzid:
            # RFC 4616 2: we let nobody act for somebody else.  libsasl2 checks this
            # after the password, and reports the requested identity as the user.
            az = canonical_identity(authzid, self.local_domain, self.hostname)
            if (az.user, az.realm) != (ident.user, ident.realm):
                self.username = az.reported
                return self.fail(BADAUTH,
                                 library="Requested identity not authenticated identity")
        return self.succeed(ident.reported)

    async def lookup_secret(self, login: str) -> tuple[Identity, str | None] | Failure:
        ident = self.identity(login)
        try:
            return ident, await self.backend.secret(ident)
        except BackendUnavailable:
            return self.fail(GENERIC, temporary=True)
        except UnicodeEncodeError:
            return ident, None


class PlainExchange(LocalExchange):
    """RFC 4616: [authzid] NUL authcid NUL passwd."""
    mechanism = "PLAIN"

    async def first(self, data: bytes | None) -> SaslStep:
        if data is None:
            return Challenge(b"")
        return await self.next(data)

    async def next(self, data: bytes) -> SaslStep:
        parts = data.split(b"\0")
        # The texts of libsasl2's PLAIN plugin for each way the fields can be missing.
        if len(parts) == 1:
            return self.fail(BADPROT, library="Can only find author (no password)")
        if len(parts) == 2:
            return self.fail(BADPROT, library="Can only find author/en (no password)")
        if len(parts) > 3:
            return self.fail(BADPROT, library="Got more data than we were expecting in "
                                              "the PLAIN plugin\n")
        authzid, authcid, passwd = (_text(p) for p in parts)
        if len(parts[1]) > _MAX_FIELD:
            return self.fail(BUFOVER)
        if not authcid:
            # libsasl2's canonicalisation fails on an empty name: SASL_FAIL.
            return self.fail(GENERIC, temporary=True, library=ALL_WHITESPACE)
        if not authcid.strip(_C_SPACE):
            # Only blanks: libsasl2 also tries the password check, under the name "".
            self.identity(authcid)
            return self.fail(GENERIC, temporary=True, library=(ALL_WHITESPACE, PLAIN_WRONG))
        return await self.check_password(authcid, passwd, authzid or None, wrong=PLAIN_WRONG)


class LoginExchange(LocalExchange):
    """The LOGIN mechanism (draft-murchison-sasl-login): two prompts."""
    mechanism = "LOGIN"
    _login: str | None = None
    _login_sent = False

    async def first(self, data: bytes | None) -> SaslStep:
        if data is None:
            return Challenge(b"Username:")
        return await self.next(data)

    async def next(self, data: bytes) -> SaslStep:
        if self._login is None:
            if len(data) > _MAX_FIELD:
                return self.fail(BADPROT, library="username too long (>1024 characters)")
            # The plugin keeps the name as a C string and names it to libsasl2 only
            # with the password: until then a failure has no sasl_username.
            self._login = _c_string(_text(data))
            self._login_sent = bool(data)
            return Challenge(b"Password:")
        if len(data) > _MAX_FIELD:
            return self.fail(BADPROT,
                             library="clientinlen is > 1024 characters in LOGIN plugin")
        if not self._login.strip(_C_SPACE):
            # As libsasl2: an empty name is noticed only after the password.  An
            # empty response names nobody; blanks or a NUL name "".
            if self._login_sent:
                self.identity(self._login)
            return self.fail(GENERIC, temporary=True, library=ALL_WHITESPACE)
        return await self.check_password(self._login, _c_string(_text(data)))


class CramMd5Exchange(LocalExchange):
    """RFC 2195: HMAC-MD5 over a server challenge with the shared secret."""
    mechanism = "CRAM-MD5"

    def __init__(self, *args, clock=time.time, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.challenge = (f"<{int.from_bytes(os.urandom(4), 'big')}."
                          f"{int(clock())}@{self.hostname}>").encode("ascii")
        self.sent = False

    async def first(self, data: bytes | None) -> SaslStep:
        if data:
            # RFC 2195 has no initial response.
            return self.fail(BADPROT, library=SERVER_FIRST)
        self.sent = True
        return Challenge(self.challenge)

    async def next(self, data: bytes) -> SaslStep:
        if len(data) > _MAX_FIELD:
            return self.fail(BADPROT, library="CRAM-MD5 input longer than 1024 bytes")
        text = _text(data)
        login, _, digest = text.rpartition(" ")
        if not login:
            # libsasl2's CRAM-MD5 plugin: no space after a non-empty name.
            return self.fail(BADPROT, library="need authentication name")
        found = await self.lookup_secret(login)
        if isinstance(found, Failure):
            return found
        ident, secret = found
        if secret is None:
            return self.fail(BADAUTH)
        expected = hmac.new(secret.encode("utf-8"), self.challenge, hashlib.md5).hexdigest()
        answer = digest.lower().encode("utf-8", "surrogateescape")
        if hmac.compare_digest(expected.encode(), answer):
            return self.succeed(ident.reported)
        return self.fail(BADAUTH, library="incorrect digest response")


def _scram_unescape(name: str) -> str | None:
    # RFC 5802 5.1: "=2C" and "=3D" stand for "," and "="; any other "=" is an error.
    out, i = [], 0
    while i < len(name):
        c = name[i]
        if c == "=":
            esc = name[i:i + 3]
            if esc == "=2C":
                out.append(",")
            elif esc == "=3D":
                out.append("=")
            else:
                return None
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


class ScramExchange(LocalExchange):
    """RFC 5802 (SCRAM-SHA-1) and RFC 7677 (SCRAM-SHA-256; the -224/-384/-512
    variants that libsasl2 also offers work the same way), without channel
    binding (we do not advertise the -PLUS variants)."""

    def __init__(self, *args, hash_name: str = "sha256", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hash_name = hash_name
        self.mechanism = "SCRAM-" + hash_name.upper().replace("SHA", "SHA-")
        self.state = "first"

    def _h(self, data: bytes) -> bytes:
        return hashlib.new(self.hash_name, data).digest()

    def _hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.hash_name).digest()

    async def first(self, data: bytes | None) -> SaslStep:
        if data is None:
            self.state = "client-first"
            return Challenge(b"")
        return await self._client_first(data)

    async def next(self, data: bytes) -> SaslStep:
        if self.state in ("first", "client-first"):
            return await self._client_first(data)
        if self.state == "client-final":
            return await self._client_final(data)
        if self.state == "server-final" and data == b"":
            # RFC 4954 4: the client acknowledges our server-final message.
            return self.succeed(self._ident.reported)
        return self.fail(BADPROT)

    async def _client_first(self, data: bytes) -> SaslStep:
        text = _utf8(data)
        if text is None:
            return self.fail(BADPROT)
        parts = text.split(",", 2)
        if len(parts) != 3:
            return self.fail(BADPROT)
        cbflag, authzid, bare = parts
        # RFC 5802 7: gs2-cbind-flag; "p=" asks for channel binding we did not offer.
        if cbflag not in ("n", "y"):
            return self.fail(BADPROT)
        if authzid and not authzid.startswith("a="):
            return self.fail(BADPROT)
        fields = bare.split(",")
        if len(fields) < 2 or not fields[0].startswith("n=") or not fields[1].startswith("r="):
            return self.fail(BADPROT)
        login = _scram_unescape(fields[0][2:])
        cnonce = fields[1][2:]
        if not login or not cnonce or any(c in cnonce for c in ", "):
            return self.fail(BADPROT)
        az = _scram_unescape(authzid[2:]) if authzid else None
        self._gs2 = f"{cbflag},{authzid},"
        self._bare = bare
        found = await self.lookup_secret(login)
        if isinstance(found, Failure):
            return found
        self._ident, secret = found
        if az:
            azi = canonical_identity(az, self.local_domain, self.hostname)
            if (azi.user, azi.realm) != (self._ident.user, self._ident.realm):
                secret = None
        if secret is None:
            # libsasl2 fails an unknown user at once (checked against Postfix
            # 3.7 + Cyrus); we do the same rather than fake a challenge.
            return self.fail(BADAUTH)
        salt = os.urandom(16)
        self._secret = secret
        self._salted = hashlib.pbkdf2_hmac(self.hash_name, (secret or "\0").encode("utf-8"),
                                           salt, SCRAM_ITERATIONS)
        self._nonce = cnonce + base64.b64encode(os.urandom(18)).decode("ascii")
        self._server_first = (f"r={self._nonce},s={base64.b64encode(salt).decode('ascii')},"
                              f"i={SCRAM_ITERATIONS}")
        self.state = "client-final"
        return Challenge(self._server_first.encode("ascii"))

    async def _client_final(self, data: bytes) -> SaslStep:
        text = _utf8(data)
        if text is None or ",p=" not in text:
            return self.fail(BADPROT)
        without_proof, _, proof_b64 = text.rpartition(",p=")
        fields = dict(f.split("=", 1) for f in without_proof.split(",") if "=" in f)
        try:
            cbind = base64.b64decode(fields.get("c", ""), validate=True)
            proof = base64.b64decode(proof_b64, validate=True)
        except Exception:
            return self.fail(BADPROT)
        if cbind != self._gs2.encode("utf-8") or fields.get("r") != self._nonce:
            return self.fail(BADPROT)
        auth_message = f"{self._bare},{self._server_first},{without_proof}".encode("utf-8")
        client_key = self._hmac(self._salted, b"Client Key")
        stored_key = self._h(client_key)
        signature = self._hmac(stored_key, auth_message)
        if len(proof) != len(signature) or self._secret is None:
            return self.fail(BADAUTH)
        candidate = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(self._h(candidate), stored_key):
            return self.fail(BADAUTH)
        server_key = self._hmac(self._salted, b"Server Key")
        verifier = base64.b64encode(self._hmac(server_key, auth_message)).decode("ascii")
        self.state = "server-final"
        return Challenge(f"v={verifier}".encode("ascii"))


# RFC 2831 2.1.2: "The size of a digest-response is less than 4096 bytes."
_DIGEST_RESPONSE_MAX = 4096
# RFC 2831 2.1.2 lets these appear at most once.  libsasl2 answers a repeat
# with SASL_FAIL for the first set and SASL_BADAUTH for the second, and
# takes the last value of any other directive (checked against Postfix + Cyrus).
_DIGEST_SINGLE_FAIL = frozenset({"realm", "digest-uri", "charset", "qop"})
_DIGEST_SINGLE_BADAUTH = frozenset({"maxbuf", "cipher"})
_DIGEST_SERVICE = "smtp"


def _digest_fields(text: str) -> dict[str, str] | None:
    """RFC 2831 7.1 ``#( name "=" ( token | quoted-string ) )``, names folded
    to lower case; None on a syntax error.  A repeated directive (RFC 2831
    2.1.2 forbids repeats) is listed under the key ``""``."""
    out: dict[str, str] = {}
    repeated: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t,":
            i += 1
        if i >= n:
            break
        eq = text.find("=", i)
        if eq < 0:
            return None
        name = text[i:eq].strip().lower()
        if not name or any(c in name for c in ' \t,"'):
            return None
        i = eq + 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == '"':
            i += 1
            chars = []
            while True:
                if i >= n:
                    return None
                c = text[i]
                if c == "\\" and i + 1 < n:      # RFC 2831 7.2 quoted-pair
                    chars.append(text[i + 1])
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                chars.append(c)
                i += 1
            value = "".join(chars)
        else:
            end = text.find(",", i)
            end = n if end < 0 else end
            value = text[i:end].strip()
            i = end
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] != ",":
            return None
        if name in out:
            repeated.append(name)
        out[name] = value            # the last one counts, as with libsasl2
    if repeated:
        out[""] = " ".join(repeated)
    return out


def _nonce_count(text: str) -> int:
    """nc as libsasl2 reads it: hex digits only, else 0 (an error)."""
    if not text or any(c not in "0123456789abcdefABCDEF" for c in text) or len(text) > 16:
        return 0
    return int(text, 16)


def _digest_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _digest_bytes(value: str, utf8: bool) -> bytes:
    # RFC 2831 2.1.2.1: with charset=utf-8, a value whose characters all lie
    # in ISO 8859-1 is hashed in ISO 8859-1.
    if utf8:
        try:
            return value.encode("iso-8859-1")
        except UnicodeEncodeError:
            return value.encode("utf-8")
    return value.encode("iso-8859-1", "replace")


class DigestMd5Exchange(LocalExchange):
    """RFC 2831 DIGEST-MD5 (historic since RFC 6331; offered because Cyrus
    offers it).  Authentication only: qop="auth", never the integrity or
    confidentiality layers (auth-int, auth-conf); Postfix allows libsasl2 no
    security layer either, so its challenge offers only "auth" too.  The
    digest-uri must name smtpd_sasl_service (any case); its host part is not
    checked, as libsasl2 does not check it."""
    mechanism = "DIGEST-MD5"
    service = _DIGEST_SERVICE     # libsasl2 compares it with smtpd_sasl_service

    def __init__(self, *args, nonce: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nonce = nonce or base64.b64encode(os.urandom(32)).decode("ascii")
        self.service = getattr(self.backend, "service", None) or self.service
        # Cyrus's realm rule: the configured user realm, else the server name.
        self.realm = self.local_domain or self.hostname
        self.state = "challenge"

    def challenge_text(self) -> str:
        # RFC 2831 2.1.1: algorithm=md5-sess is mandatory; charset=utf-8 lets
        # the client send non-Latin-1 names.
        # Directive order as libsasl2 sends it (seen from Postfix 3.7 + Cyrus).
        return (f"nonce={_digest_quote(self.nonce)},realm={_digest_quote(self.realm)},"
                f'qop="auth",charset=utf-8,algorithm=md5-sess')

    async def first(self, data: bytes | None) -> SaslStep:
        # RFC 2831 2.2 subsequent authentication is not supported: an
        # initial response is ignored and a fresh challenge sent, as libsasl2
        # does without a reauth cache.
        self.state = "response"
        return Challenge(self.challenge_text().encode("utf-8"))

    async def next(self, data: bytes) -> SaslStep:
        if self.state == "response":
            return await self._response(data)
        if self.state == "rspauth":
            # RFC 2831 2.1.3 / RFC 4954 4: the client took our rspauth.
            # libsasl2 ignores what the client says here, so do we.
            return self.succeed(self._reported)
        return self.fail(BADPROT)

    async def _response(self, data: bytes) -> SaslStep:
        # The failure codes and their order (which decides whether the log
        # names the user) follow libsasl2, checked against Postfix 3.7 + Cyrus.
        if len(data) > _DIGEST_RESPONSE_MAX:
            return self.fail(BADPROT)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self.fail(BADAUTH)
        f = _digest_fields(text)
        if f is None:
            return self.fail(BADAUTH)
        repeated = set(f.pop("", "").split())
        if repeated & _DIGEST_SINGLE_FAIL:
            return self.fail(GENERIC, temporary=True)
        if repeated & _DIGEST_SINGLE_BADAUTH:
            return self.fail(BADAUTH)
        if f.get("username") == "":
            # As with PLAIN: canonicalising an empty name is SASL_FAIL.
            return self.fail(GENERIC, temporary=True)
        username, response = f.get("username"), f.get("response")
        cnonce, nc, uri = f.get("cnonce"), f.get("nc"), f.get("digest-uri")
        if (not username or response is None or cnonce is None or nc is None
                or uri is None or f.get("nonce") is None):
            return self.fail(BADAUTH)
        utf8 = "charset" in f
        if utf8 and f["charset"].lower() != "utf-8":
            # RFC 2831 2.1.2: utf-8 is the only value (libsasl2: SASL_FAIL).
            return self.fail(GENERIC, temporary=True)
        if not hmac.compare_digest(f["nonce"].encode(), self.nonce.encode()):
            return self.fail(BADAUTH)
        count = _nonce_count(nc)
        if count == 0:
            return self.fail(BADAUTH)
        service, sep, _host = uri.partition("/")
        if not sep or service.lower() != self.service.lower():
            return self.fail(BADAUTH)
        # RFC 2831 2.1.2: a missing realm is the empty string in A1.
        realm = f.get("realm", "")
        # libsasl2's rule (checked against Postfix 3.7 + Cyrus): the realm we
        # offered leaves the name to the usual canonicalisation (a bare name
        # gets the default realm, "user@realm" keeps its own); any other
        # realm is appended, so "bob@example.com" in realm "example.com" is
        # looked up as user "bob@example.com" and fails.
        login = f"{username}@{realm}" if realm and realm != self.realm else username
        # From here on libsasl2 names the user in its failures.
        self.identity(login)
        if count != 1:
            # RFC 2831 2.1.2: nc counts from 1; we allow one authentication
            # per nonce.  The response is checked with nc formatted as
            # "%08x", as libsasl2 does, so "nc=1" fails there.
            return self.fail(BADAUTH)
        qop = f.get("qop", "auth")
        if qop.lower() != "auth":
            # We offered only "auth" (RFC 2831 2.1.2: qop must be one
            # offered); libsasl2 calls this SASL_FAIL, a temporary failure.
            return self.fail(GENERIC, temporary=True)
        if "authzid" in repeated:
            return self.fail(BADAUTH)
        nc = "00000001"
        found = await self.lookup_secret(login)
        if isinstance(found, Failure):
            return found
        ident, secret = found
        authzid = f.get("authzid") or None
        if authzid is not None:
            az = canonical_identity(authzid, self.local_domain, self.hostname)
            if (az.user, az.realm) != (ident.user, ident.realm):
                self.username = az.reported
                return self.fail(BADAUTH)
        if secret is None:
            return self.fail(BADAUTH)
        # RFC 2831 2.1.2.1: A1 = H(user:realm:passwd):nonce:cnonce[:authzid].
        inner = hashlib.md5(_digest_bytes(username, utf8) + b":" + _digest_bytes(realm, utf8)
                            + b":" + _digest_bytes(secret, utf8)).digest()
        a1 = inner + f":{self.nonce}:{cnonce}".encode("utf-8")
        if authzid is not None:
            a1 += b":" + authzid.encode("utf-8")
        ha1 = hashlib.md5(a1).hexdigest()

        def kd(a2: str) -> str:
            ha2 = hashlib.md5(a2.encode("utf-8")).hexdigest()
            return hashlib.md5(f"{ha1}:{self.nonce}:{nc}:{cnonce}:{qop}:{ha2}"
                               .encode("utf-8")).hexdigest()
        if not hmac.compare_digest(kd(f"AUTHENTICATE:{uri}"), response.lower()):
            return self.fail(BADAUTH)
        # RFC 2831 2.1.3: rspauth proves that we know the secret too.
        self._reported = ident.reported
        self.state = "rspauth"
        return Challenge(f"rspauth={kd(':' + uri)}".encode("ascii"))


class NoMechanismExchange(SaslExchange):
    """AUTH with a mechanism we do not offer: Cyrus's SASL_NOMECH."""

    def __init__(self, mechanism: str, reason: str = NOMECH,
                 library: str | None = None) -> None:
        self.mechanism = mechanism
        self.reason = reason
        self.library_log = (library,) if library else ()

    async def begin(self) -> SaslStep:
        return Failure(self.reason, library_log=self.library_log)

    async def step(self, response: str | bytes) -> SaslStep:
        return Failure(self.reason, library_log=self.library_log)


LOCAL_MECHANISMS = {
    "PLAIN": (PlainExchange, {}),
    "LOGIN": (LoginExchange, {}),
    "CRAM-MD5": (CramMd5Exchange, {}),
    "DIGEST-MD5": (DigestMd5Exchange, {}),
    **{f"SCRAM-SHA-{n}": (ScramExchange, {"hash_name": f"sha{n}"})
       for n in (1, 224, 256, 384, 512)},
}
SECRET_MECHANISMS = frozenset({"CRAM-MD5", "DIGEST-MD5"} | {m for m in LOCAL_MECHANISMS
                                               if m.startswith("SCRAM-")})
