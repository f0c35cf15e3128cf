"""Which master.cf services postwell runs, and how inet services are bound.

Kept apart from the daemon loop so `postfix check` and tests can use the same
decisions without forking anything.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field

LISTEN_BACKLOG = 4096   # Postfix's 100 stalls smtp-source with 200 parallel clients

# Postfix daemons whose job is library code (or an in-qmgr agent) in postwell:
# mapped silently, no process of their own.
INTERNAL_COMMANDS = {
    "cleanup", "trivial-rewrite", "bounce", "defer", "trace", "verify", "flush",
    "proxymap", "proxywrite", "anvil", "scache", "tlsmgr", "error", "retry",
    "discard", "local", "virtual", "smtp", "relay", "lmtp", "postlog", "postlogd", "tlsproxy",
    "dnsblog",
}
QMGR_COMMANDS = {"qmgr", "oqmgr"}


@dataclass
class Plan:
    smtpd: list = field(default_factory=list)        # MasterService, type inet, command smtpd
    qmgr: object | None = None                        # MasterService or None (qmgr runs anyway)
    pickup: object | None = None                      # MasterService of the pickup service
    showq: object | None = None                       # MasterService of showq (runs anyway)
    pipe: list = field(default_factory=list)          # unix pipe(8) services (agents in qmgr)
    spawn: list = field(default_factory=list)         # spawn(8) services (unix or inet)
    unsupported: list = field(default_factory=list)   # (service, why)


def smtpd_available() -> bool:
    try:
        from postwell import smtpd
    except ImportError:
        return False
    return callable(getattr(smtpd, "serve", None))


def pickup_available() -> bool:
    try:
        from postwell.pickup import service
    except ImportError:
        return False
    return callable(getattr(service, "serve", None))


def plan_services(services) -> Plan:
    plan = Plan()
    have_smtpd = None
    for svc in services:
        cmd = svc.command
        if cmd == "smtpd" and svc.type == "inet":
            if have_smtpd is None:
                have_smtpd = smtpd_available()
            if have_smtpd:
                plan.smtpd.append(svc)
            else:
                plan.unsupported.append((svc, "the SMTP server is not available in this build"))
        elif cmd in QMGR_COMMANDS:
            plan.qmgr = svc
        elif cmd == "showq" and svc.type == "unix":
            if plan.showq is None:
                plan.showq = svc
        elif cmd in INTERNAL_COMMANDS:
            continue
        elif cmd == "pipe" and svc.type == "unix":
            plan.pipe.append(svc)
        elif cmd == "spawn" and svc.type in ("unix", "inet"):
            plan.spawn.append(svc)
        elif cmd == "pickup" and svc.type in ("unix", "fifo"):
            if plan.pickup is None and pickup_available():
                plan.pickup = svc
            elif plan.pickup is None:
                plan.unsupported.append((svc, "local submission pickup is not available in this build"))
        elif cmd == "spawn":
            plan.unsupported.append((svc, f"spawn on a {svc.type} socket is not implemented"))
        elif cmd == "smtpd":
            plan.unsupported.append((svc, f"smtpd on a {svc.type} socket is not implemented"))
        else:
            plan.unsupported.append((svc, f"command {cmd} is not implemented"))
    return plan


def inet_entry_error(svc) -> str | None:
    """What Postfix's master dies of as it reads an inet entry of master.cf
    (said after "FILE: line N: "): the name's syntax, then a private service."""
    problem = inet_address_error(svc, port=False)
    if problem is not None:
        return problem[0]
    if svc.private:
        return "inet service cannot be private"
    return None


def inet_address_error(svc, port: bool = True) -> tuple[str, bool] | None:
    """Why Postfix's master cannot listen on an inet service's name, in its
    words, with whether they carry the "master.cf: line N:" location (the
    name's syntax is checked as master.cf is read, a port name only when the
    socket is made); None when the name is usable.  A host name is never
    looked up here: a syntax check must not wait for DNS."""
    from .check import valid_hostname
    name = svc.name
    if name.startswith("["):
        end = name.find("]")
        if end < 0:
            return 'missing "]"' + f' in "{name}"', True
        host, service = name[1:end], name[end + 2:] if name[end + 1:end + 2] == ":" else ""
        if not _is_address(host):
            return f'valid hostname or network address required in "{name}"', True
    else:
        host, sep, service = name.rpartition(":")
        if ":" in host:
            return f"bad hostname or network address: {name}", True
        if host and not (_is_address(host) or valid_hostname(host, lambda text: None)):
            return f'valid hostname or network address required in "{name}"', True
    if not service:
        return f'missing service information in "{name}"', True
    if port and not service.isdigit():
        try:
            socket.getservbyname(service, "tcp")
        except OSError:
            from postwell.config.master import _PORT_FALLBACK
            if service not in _PORT_FALLBACK:
                return f"{name}: Servname not supported for ai_socktype", False
    return None


def _is_address(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def endpoint_name(svc) -> str:
    """The name Postfix's master knows a service by: an inet service's
    numeric "[host]:port" (or port), the socket's path name otherwise."""
    if svc.type == "inet":
        try:
            host, port = listen_address(svc)
            port = resolve_port(port)
        except Exception:   # noqa: BLE001 - a bad name is the master's fatal, later
            return svc.name
        if not host:
            return str(port)
        host = host.strip("[]")
        try:
            import ipaddress
            host = str(ipaddress.ip_address(host))
        except ValueError:
            try:
                host = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)[0][4][0]
            except OSError:
                pass
        return f"[{host}]:{port}"
    return f"{'private' if svc.private else 'public'}/{svc.name}"


def drop_duplicates(services) -> tuple[list, list[str]]:
    """Postfix's master keeps the last of several master.cf entries for one
    service name (its warning words for each earlier one)."""
    names = [endpoint_name(svc) for svc in services]
    last = {name: index for index, name in enumerate(names)}
    kept, warnings = [], []
    seen = set()
    for index, (svc, name) in enumerate(zip(services, names)):
        if name in seen:
            warnings.append(f'duplicate master.cf entry for service "{svc.name}" ({name}) '
                            "-- using the last entry")
        seen.add(name)
        if last[name] == index:
            kept.append(svc)
    return kept, warnings


def worker_count(svc, config) -> int:
    maxproc = svc.maxproc
    if maxproc is None:
        maxproc = config.get_int("default_process_limit") or 100
    if maxproc <= 0:          # 0 = no limit in master.cf
        maxproc = 1 << 30
    return max(1, min(maxproc, os.cpu_count() or 1))


def listen_address(svc) -> tuple[str | None, str]:
    try:
        from postwell.config.master import listen_address as impl
    except ImportError:
        impl = None
    if impl is not None:
        return impl(svc)
    name = svc.name
    if name.startswith("[") and "]:" in name:
        host, port = name[1:].split("]:", 1)
        return host, port
    if ":" in name and name.count(":") == 1:
        host, port = name.split(":", 1)
        return host or None, port
    return None, name


def resolve_port(port) -> int:
    if isinstance(port, int):
        return port
    if str(port).isdigit():
        return int(port)
    try:
        return socket.getservbyname(str(port), "tcp")
    except OSError:
        raise OSError(errno.EINVAL, f"unknown service: {port}/tcp") from None


def _protocols(config) -> set[int]:
    value = [p.lower() for p in config.get_list("inet_protocols")] or ["all"]
    fams = set()
    if "all" in value or "ipv4" in value:
        fams.add(socket.AF_INET)
    if "all" in value or "ipv6" in value:
        if socket.has_ipv6:
            fams.add(socket.AF_INET6)
    return fams


def bind_addresses(svc, config) -> list[tuple[int, str, int]]:
    """(family, host, port) tuples to bind for one inet service."""
    host, port = listen_address(svc)
    port = resolve_port(port)
    fams = _protocols(config)
    if host:
        hosts = [host.strip("[]")]
    else:
        ifaces = [i.lower() for i in config.get_list("inet_interfaces")] or ["all"]
        if "all" in ifaces:
            hosts = []
            if socket.AF_INET6 in fams and _ipv6_works():
                hosts.append("::")
            if socket.AF_INET in fams:
                hosts.append("0.0.0.0")
            return [(_family(h), h, port) for h in hosts]
        hosts = []
        for i in ifaces:
            if i == "loopback-only":
                hosts += ["127.0.0.1", "::1"]
            else:
                hosts.append(i.strip("[]"))
    out = []
    for h in hosts:
        try:
            infos = socket.getaddrinfo(h, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        except socket.gaierror:
            infos = socket.getaddrinfo(h, port, 0, socket.SOCK_STREAM)
        for fam, _, _, _, sa in infos:
            if fam in fams and (fam, sa[0], port) not in out:
                out.append((fam, sa[0], port))
    return out


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _ipv6_works() -> bool:
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.close()
        return True
    except OSError:
        return False


def bind_service(svc, config) -> list[socket.socket]:
    """Bind and listen; raises OSError with Postfix's "bind HOST port N: ..." text."""
    socks = []
    try:
        for fam, host, port in bind_addresses(svc, config):
            s = socket.socket(fam, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise OSError(exc.errno, f"bind {host} port {port}: {exc.strerror}") from None
            s.listen(LISTEN_BACKLOG)
            s.set_inheritable(True)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def bind_key(svc, config) -> tuple:
    """What identifies a listener across reloads (same key: keep the socket)."""
    try:
        return tuple(sorted(bind_addresses(svc, config)))
    except OSError:
        return (svc.name,)
