"""Machine-dependent defaults, computed at run time as Postfix does.

- myhostname: the system host name (gethostname, no DNS); a name without a dot
  gets ".$mydomain" (or ".localdomain") appended, like Postfix's check_myhostname.
- mydomain: $myhostname minus its first label, or "localdomain".
- mynetworks: from mynetworks_style (host, subnet, class) and this machine's
  interface addresses, limited by inet_interfaces and inet_protocols.
- process_id / process_name: the running process.
"""

from __future__ import annotations

import os
import sys

# ctypes, ipaddress and socket are imported where they are used: every CLI tool
# imports this module through the defaults, and most never need an interface list.

DEFAULT_MYDOMAIN = "localdomain"


def system_hostname() -> str:
    import socket
    return socket.gethostname() or "localhost"


def default_myhostname(mydomain: str | None = None) -> str:
    name = system_hostname()
    if "." not in name:
        name = f"{name}.{mydomain or DEFAULT_MYDOMAIN}"
    return name


def default_mydomain(myhostname: str) -> str:
    _, dot, rest = myhostname.partition(".")
    return rest if dot and rest else DEFAULT_MYDOMAIN


def process_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if name.endswith(".py"):
        name = name[:-3]
    return name if name and name not in ("__main__", "-c", "-m") else "postwell"


# ---- interface addresses -------------------------------------------------

_ctypes_api = None


def _getifaddrs_api():
    """(ctypes, libc, the ifaddrs structure type), built on first use."""
    global _ctypes_api
    if _ctypes_api is None:
        import ctypes

        class _SockAddr(ctypes.Structure):
            _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]

        class _IfAddrs(ctypes.Structure):
            pass

        _IfAddrs._fields_ = [
            ("ifa_next", ctypes.POINTER(_IfAddrs)),
            ("ifa_name", ctypes.c_char_p),
            ("ifa_flags", ctypes.c_uint),
            ("ifa_addr", ctypes.POINTER(_SockAddr)),
            ("ifa_netmask", ctypes.POINTER(_SockAddr)),
            ("ifa_ifu", ctypes.c_void_p),
            ("ifa_data", ctypes.c_void_p),
        ]
        # The running interpreter already has libc mapped: its global symbols
        # carry getifaddrs, which spares find_library()'s `ldconfig -p` child.
        libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(libc, "getifaddrs"):
            import ctypes.util
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _ctypes_api = (ctypes, libc, _IfAddrs)
    return _ctypes_api


def _sockaddr_bytes(ctypes, ptr) -> tuple[int, bytes] | None:
    import socket
    if not ptr:
        return None
    family = ptr.contents.sa_family
    base = ctypes.addressof(ptr.contents)
    if family == socket.AF_INET:        # sockaddr_in: family, port, 4-byte address
        return family, ctypes.string_at(base + 4, 4)
    if family == socket.AF_INET6:       # sockaddr_in6: family, port, flowinfo, 16-byte address
        return family, ctypes.string_at(base + 8, 16)
    return None


_iface_cache: list | None = None


def interface_networks() -> list:
    """All interface addresses with their netmasks (IPv4 first, then IPv6), as
    ipaddress.IPv4Interface / IPv6Interface objects."""
    global _iface_cache
    if _iface_cache is not None:
        return list(_iface_cache)
    import ipaddress
    found: list = []
    try:
        ctypes, libc, _IfAddrs = _getifaddrs_api()
        head = ctypes.POINTER(_IfAddrs)()
        if libc.getifaddrs(ctypes.byref(head)) != 0:
            raise OSError(ctypes.get_errno(), "getifaddrs")
        try:
            node = head
            while node:
                ifa = node.contents
                addr = _sockaddr_bytes(ctypes, ifa.ifa_addr)
                mask = _sockaddr_bytes(ctypes, ifa.ifa_netmask)
                if addr and mask and addr[0] == mask[0]:
                    ip = ipaddress.ip_address(addr[1])
                    prefix = bin(int.from_bytes(mask[1], "big")).count("1")
                    found.append(ipaddress.ip_interface(f"{ip}/{prefix}"))
                node = ifa.ifa_next
        finally:
            libc.freeifaddrs(head)
    except (OSError, AttributeError, ValueError):
        found = [ipaddress.ip_interface("127.0.0.1/8"), ipaddress.ip_interface("::1/128")]
    v4 = [i for i in found if i.version == 4]
    v6 = [i for i in found if i.version == 6]
    _iface_cache = _dedupe(v4 + v6)
    return list(_iface_cache)


def _dedupe(items: list) -> list:
    seen, out = set(), []
    for i in items:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def _wanted_versions(inet_protocols: str) -> set[int]:
    words = {w for w in inet_protocols.replace(",", " ").lower().split()}
    if not words or "all" in words:
        return {4, 6}
    return {v for w, v in (("ipv4", 4), ("ipv6", 6)) if w in words}


def own_interfaces(inet_interfaces: str = "all", inet_protocols: str = "all") -> list:
    """The addresses Postfix treats as its own (own_inet_addr_list), with masks."""
    versions = _wanted_versions(inet_protocols)
    ifaces = [i for i in interface_networks() if i.version in versions]
    words = [w for w in inet_interfaces.replace(",", " ").split() if w]
    if not words or any(w.lower() == "all" for w in words):
        return ifaces
    import ipaddress
    import socket
    wanted: list = []
    for w in words:
        if w.lower() == "loopback-only":
            wanted += [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
            continue
        host = w[1:-1] if w.startswith("[") and w.endswith("]") else w
        try:
            wanted.append(ipaddress.ip_address(host.split("%")[0]))
        except ValueError:
            try:
                for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
                    wanted.append(ipaddress.ip_address(info[4][0].split("%")[0]))
            except OSError:
                continue
    out = []
    for addr in wanted:
        if addr.version not in versions:
            continue
        match = next((i for i in ifaces if i.ip == addr), None)
        out.append(match or ipaddress.ip_interface(f"{addr}/{addr.max_prefixlen}"))
    out = [i for i in out if i.version == 4] + [i for i in out if i.version == 6]
    return _dedupe(out)


def _format_net(net) -> str:
    if net.version == 6:
        return f"[{net.network_address}]/{net.prefixlen}"
    return f"{net.network_address}/{net.prefixlen}"


def compute_mynetworks(style: str = "host", inet_interfaces: str = "all",
                       inet_protocols: str = "all") -> str:
    style = style.strip().lower()
    if style not in ("host", "subnet", "class"):
        raise ValueError(f"unknown mynetworks_style value: {style}")
    import ipaddress
    nets = []
    for iface in own_interfaces(inet_interfaces, inet_protocols):
        if style == "host":
            prefix = iface.max_prefixlen
        elif style == "class" and iface.version == 4:
            first = int(iface.ip) >> 24
            # Classful masks; IPv6 has no classes, so it keeps its subnet.
            prefix = 8 if first < 128 else 16 if first < 192 else 24 if first < 224 else 32
        else:
            prefix = iface.network.prefixlen
        nets.append(ipaddress.ip_network(f"{iface.ip}/{prefix}", strict=False))
    return " ".join(_format_net(n) for n in _dedupe(nets))


def static_machine_defaults() -> dict[str, str]:
    """This host's values for an empty main.cf (compatibility_level 3.6)."""
    host = default_myhostname()
    return {
        "myhostname": host,
        "mydomain": default_mydomain(host),
        "mynetworks": compute_mynetworks("host"),
        "process_id": str(os.getpid()),
        "process_name": process_name(),
    }
