"""DNS for the smtp client: a resolver interface with a real and a fake implementation,
and MX selection (RFC 5321 5.1, RFC 7505).

    Resolver (protocol): await r.mx(domain) -> [MxRecord]; await r.addresses(host, families)
                         -> [ip]; await r.ptr(ip) -> [name]; raise NoSuchDomain / DnsTempFail
    DnsPythonResolver(servers=None) / DnsPythonResolver.from_config(cfg)   # postwell_dns_servers
    FakeResolver({("example.com", "MX"): [(10, "mx.example.com")], ...})
    NativeResolver()          # getaddrinfo(); errors carry gai_code/gai_text
    DnsThenNative(dns, native)  # smtp_host_lookup = dns, native
    select_mx_hosts(domain, records, rng) -> [MxRecord]                   # raises NullMx
    await resolve_destination(resolver, nexthop, rng=..., ...) -> [Target] # raises DestinationError
    relayhost_problem(error, nexthop, relayhost) -> (DestinationError 4.3.5, warning) | None
"""

from .mx import (DestinationError, Nexthop, NullMx, Target, local_interface_addresses,  # noqa: F401
                 own_addresses_from_config, parse_nexthop, relayhost_problem, resolve_destination,
                 select_mx_hosts)
from .resolver import (IPV4, IPV6, DnsError, DnsPythonResolver, DnsTempFail,  # noqa: F401
                       DnsThenNative, FakeResolver, MxRecord, NativeResolver, NoSuchDomain, Resolver,
                       families_from_inet_protocols, native_error, parse_dns_servers)
