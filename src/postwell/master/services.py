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
