"""A SaslServer whose mechanisms run in postwell against a PasswordBackend."""

from __future__ import annotations

from .base import (MECHANISM_PROPERTIES, DEFAULT_RESPONSE_LIMIT, SaslExchange, SaslServer,
                   allowed_by_options, apply_mechanism_filter)
from .mechanisms import (ENCRYPT, LOCAL_MECHANISMS, SECRET_MECHANISMS, NoMechanismExchange,
                         PasswordBackend, cyrus_decode64)


class LocalSaslServer(SaslServer):

    def __init__(self, backend: PasswordBackend, mechanisms: list[str], *,
                 security_options: frozenset[str], tls_security_options: frozenset[str],
                 mechanism_filter: str = "", hostname: str = "localhost",
                 local_domain: str = "", response_limit: int = DEFAULT_RESPONSE_LIMIT,
                 type_name: str = "cyrus") -> None:
        self.backend = backend
        self.type_name = type_name
        usable = []
        for name in mechanisms:
            name = name.upper()
            if name not in LOCAL_MECHANISMS or name in usable:
                continue
            # Offer only what the store can verify: hashed passwords cannot
            # answer a CRAM-MD5 or SCRAM exchange.
            if name in SECRET_MECHANISMS and not backend.supports_secret:
                continue
            usable.append(name)
        self.configured = usable
        self.security_options = security_options
        self.tls_security_options = tls_security_options
        self.mechanism_filter = mechanism_filter
        self.hostname = hostname
        self.local_domain = local_domain
        self.response_limit = response_limit

    def mechanisms(self, tls_active: bool = False) -> list[str]:
        required = self.tls_security_options if tls_active else self.security_options
        names = [m for m in self.configured
                 if allowed_by_options(MECHANISM_PROPERTIES.get(m, frozenset()), required)]
        return apply_mechanism_filter(names, self.mechanism_filter)

    def start(self, mechanism: str, initial_response: str | bytes | None = None, *,
              client_addr: str = "", client_port: str = "", local_addr: str = "",
              local_port: str = "", local_domain: str | None = None,
              tls_active: bool = False) -> SaslExchange:
        name = mechanism.upper()
        if isinstance(initial_response, str) and self.backend.cyrus_library:
            # Postfix's xsasl_cyrus_server_first() decodes the initial response before
            # libsasl2 looks at the mechanism: a bad one fails whatever the mechanism.
            decoded = cyrus_decode64(initial_response)
            if isinstance(decoded, str):
                return NoMechanismExchange(name, decoded)
        if name not in self.configured:
            return NoMechanismExchange(name, library=f"Couldn't find mech {mechanism}"
                                       if self.backend.cyrus_library else None)
        required = self.tls_security_options if tls_active else self.security_options
        if not allowed_by_options(MECHANISM_PROPERTIES.get(name, frozenset()), required):
            # What libsasl2 answers for a mechanism the security options forbid.
            return NoMechanismExchange(name, ENCRYPT)
        cls, kwargs = LOCAL_MECHANISMS[name]
        domain = self.local_domain if local_domain is None else local_domain
        return cls(self.backend, initial_response, local_domain=domain,
                   hostname=self.hostname, response_limit=self.response_limit, **kwargs)
