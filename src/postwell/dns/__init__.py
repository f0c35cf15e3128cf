"""DNS for the smtp client: a resolver interface with a real and a fake implementation,
and MX selection (RFC 5321 5.1, RFC 7505).

    Resolver (protocol): await r.mx(domain) -> [MxRecord]; await r.addresses(host, families)
                         -> [ip]; await r.ptr(ip) -> [name]; raise NoSuchDomain / DnsTempFail
    DnsPythonResolver(servers=None) / DnsPythonResolver.from_config(cfg)   # postwell_dns_servers
    FakeResolver({("example.com", "MX"): [(10, "mx.example.com")], ...})
    select_mx_hosts(domain, records, rng) -> [MxRecord]                   # raises NullMx
    await resolve_destination(resolver, nexthop, rng=..., ...) -> [Target] # raises DestinationError
"""

from .mx import (DestinationError, Nexthop, NullMx, Target, local_interface_addresses,  # noqa: F401
                 own_addresses_from_config, parse_nexthop, resolve_destination, select_mx_hosts)
from .resolver import (IPV4, IPV6, DnsError, DnsPythonResolver, DnsTempFail,  # noqa: F401
                       FakeResolver, MxRecord, NativeResolver, NoSuchDomain, Resolver, families_from_inet_protocols,
                       parse_dns_servers)
