"""`postfix check`: what would stop the mail system from starting or working.

As Postfix's check: fatal configuration problems stop `postfix start`
(exit 1); missing queue directories are created with their owners and
modes; wrong ownership or permissions of the queue directories are
reported as warnings, in Postfix's words ("not owned by postfix:
/var/spool/postfix/active").  `postfix(1)` logs them as postfix-script
warnings, as Postfix's check-warn does.

Lookup tables are opened the way the daemons will open them: as mail_owner
when the check runs as root (postwell's children drop privileges before they
read any table).  Only tables that would work under Postfix but not under
postwell are reported ("nis:mail.aliases is unavailable. unsupported
dictionary type: nis"); a missing aliases.db or transport.db draws no word
from Postfix's check either, only from the daemon that uses it.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import stat


# Table types Postfix knows: a list item "type:name" with one of these is a table.
POSTFIX_TABLE_TYPES = frozenset({
    "btree", "cdb", "cidr", "dbm", "environ", "fail", "hash", "inline", "internal", "ldap",
    "lmdb", "memcache", "mongodb", "mysql", "netinfo", "nis", "nisplus", "pcre", "pgsql",
    "pipemap", "proxy", "randmap", "regexp", "sdbm", "socketmap", "sqlite", "static", "tcp",
    "texthash", "unionmap", "unix",
})

# Parameters (besides every *_maps and *_checks) whose value may name tables.
TABLE_LIST_PARAMETERS = (
    "mydestination", "relay_domains", "virtual_alias_domains", "virtual_mailbox_domains",
    "mynetworks", "permit_mx_backup_networks", "smtpd_client_event_limit_exceptions",
    "authorized_submit_users", "authorized_mailq_users", "authorized_flush_users",
    "smtpd_sasl_exceptions_networks", "debug_peer_list", "fast_flush_domains",
)
_TABLE_SUFFIXES = ("_maps", "_checks", "_restrictions")
_TOKEN = re.compile(r"^([a-z][a-z0-9_]*):(.+)$", re.S)

# Queue directories postwell uses: name -> (mode as root, mode otherwise, owner);
# owner "mail" = mail_owner, "root" = root.  maildrop is postwell's own design
# (world-writable sticky drop box instead of Postfix's set-gid postdrop).
QUEUE_LAYOUT = {
    "incoming": (0o700, 0o700, "mail"), "active": (0o700, 0o700, "mail"),
    "deferred": (0o700, 0o700, "mail"), "hold": (0o700, 0o700, "mail"),
    "corrupt": (0o700, 0o700, "mail"), "defer": (0o700, 0o700, "mail"),
    "bounce": (0o700, 0o700, "mail"), "maildrop": (0o1733, 0o700, "mail"),
    "public": (0o711, 0o711, "mail"), "private": (0o700, 0o700, "mail"),
    "pid": (0o755, 0o755, "root"),
}
# Postfix queue directories postwell does not create, checked when present.
OPTIONAL_DIRS = ("flush", "saved", "trace")


def run_check(config_dir: str) -> tuple[str | None, list[str]]:
    """(fatal text or None, warnings).  Creates missing queue directories."""
    from .daemon import MasterError, load
    warnings: list[str] = []
    try:
        # postconf's reading of master.cf, as Postfix's check (postfix-script runs
        # postconf, never the master's parser): an unclosed '{' or a malformed -o
        # is the master's or the daemon's problem at start, not check's.
        cfg = load(config_dir, lenient=True)
    except MasterError as exc:
        return str(exc), warnings
    root = os.geteuid() == 0
    try:
        owner = check_mail_owner(cfg, root)
    except MasterError as exc:
        return str(exc), warnings
    if owner is None and not root:
        warnings.append(f"file {cfg.config_dir}/main.cf: parameter mail_owner: unknown user name "
                        f"value: {cfg.get('mail_owner')}")
    main_cf = os.path.join(cfg.config_dir, "main.cf")
    for name in ("queue_directory", "data_directory"):
        path = cfg.get(name)
        if not path or not path.startswith("/"):
            return f"{main_cf}: parameter {name}: value must be an absolute path: {path}", warnings
    qdir = cfg.get("queue_directory")
    if os.path.exists(qdir) and not os.path.isdir(qdir):
        return f"chdir {qdir}: Not a directory", warnings
    # An inet address that does not parse stops the master at start (as
    # Postfix's check, which leaves listeners to the master, says nothing).
    # pipe(8) services whose attributes pipe(8) would die on.
    warnings += check_pipe_services(cfg, owner, root)
    try:
        warnings += check_queue_directories(cfg, owner if root else None)
    except OSError as exc:
        return f"mkdir {exc.filename or qdir}: {exc.strerror}", warnings
    warnings += check_config_files(cfg.config_dir, root)
    warnings += check_tables(cfg, owner if root else None)
    # TLS files named in main.cf must exist and be readable.
    for param in ("smtpd_tls_cert_file", "smtpd_tls_key_file", "smtpd_tls_chain_files",
                  "smtpd_tls_CAfile", "smtp_tls_CAfile"):
        if cfg.raw(param) is None or not cfg.is_set(param):
            continue
        for path in cfg.get_list(param):
            if not os.access(path, os.R_OK):
                why = "Permission denied" if os.path.exists(path) else "No such file or directory"
                warnings.append(f"cannot access {param} file {path}: {why}")
    # Each smtpd service as its daemon sees it (-o overrides applied): TLS and SASL.
    from postwell.sasl import check_sasl_config
    from postwell.tls import check_tls_config
    for svc in cfg.services or []:
        if svc.type == "inet" and svc.command == "smtpd":
            scfg = cfg.for_service(svc)
            for problem in check_tls_config(scfg) + check_sasl_config(scfg):
                text = f"master.cf service {svc.name}: {problem}"
                if text not in warnings:
                    warnings.append(text)
    # Services postwell does not run are reported once, by the master at start.
    return None, warnings


def check_mail_owner(cfg, root: bool):
    """The mail_owner passwd entry; MasterError (fatal) when it is unknown
    (as root: the daemons could not run) or privileged (always)."""
    from .daemon import MasterError
    name = cfg.get("mail_owner")
    where = f"file {cfg.config_dir}/main.cf: parameter mail_owner"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if root:
            raise MasterError(f"{where}: unknown user name value: {name}") from None
        return None
    # Postfix's words (mail_params.c check_mail_owner), without the ID itself.
    if pw.pw_uid == 0:
        raise MasterError(f"{where}: user {name} has privileged user ID")
    if pw.pw_gid == 0:
        raise MasterError(f"{where}: user {name} has privileged group ID")
    return pw


# ------------------------------------------------------------------ postfix(1) up front
# What Postfix's postfix(1) checks when it reads main.cf, before any command runs
# (mail_params_init): the global parameters every Postfix program needs.  A bad value
# is fatal for every command, in these words (each checked against Postfix 3.7).

# Numbers: name -> (min, max); 0 means no bound (Postfix's convention).
GLOBAL_INT_PARAMETERS = {
    "default_process_limit": (1, 0), "max_use": (1, 0), "dont_remove": (0, 0),
    "line_length_limit": (512, 0), "hash_queue_depth": (1, 0), "fork_attempts": (1, 0),
    "deliver_lock_attempts": (1, 0), "debug_peer_level": (1, 0),
    "fault_injection_code": (0, 0), "berkeley_db_create_buffer_size": (1, 0),
    "berkeley_db_read_buffer_size": (1, 0), "lmdb_map_size": (1, 0),
    "header_size_limit": (1, 0), "header_address_token_limit": (1, 0),
    "mime_nesting_limit": (1, 0), "mime_boundary_length_limit": (1, 0),
    "delay_logging_resolution_limit": (0, 6), "tcp_windowsize": (0, 0),
    "message_size_limit": (0, 0),
}
GLOBAL_BOOL_PARAMETERS = (
    "daemon_table_open_error_is_fatal", "disable_dns_lookups", "soft_bounce",
    "owner_request_special", "strict_8bitmime", "strict_7bit_headers", "strict_8bitmime_body",
    "strict_mime_encoding_domain", "disable_mime_input_processing",
    "disable_mime_output_conversion", "address_verify_negative_cache",
    "backwards_bounce_logfile_compatibility", "helpful_warnings", "send_cyrus_sasl_authzid",
    "multi_instance_enable", "enable_long_queue_ids", "enable_original_recipient",
    "dns_ncache_ttl_fix_enable", "enable_idna2003_compatibility", "strict_smtputf8",
    "smtputf8_enable",
)
# Time values: name -> (min, max), as above.
GLOBAL_TIME_PARAMETERS = {
    "application_event_drain_time": (1, 0), "max_idle": (1, 0), "ipc_timeout": (1, 0),
    "ipc_idle": (1, 0), "ipc_ttl": (1, 0), "trigger_timeout": (1, 0), "fork_delay": (1, 0),
    "deliver_lock_delay": (1, 0), "stale_lock_time": (1, 0), "daemon_timeout": (1, 0),
    "in_flow_delay": (0, 10),
}
# Strings that must not be empty (Postfix's minimum length 1).
GLOBAL_NONEMPTY_PARAMETERS = (
    "mail_name", "syslog_name", "mail_owner", "myorigin", "daemon_directory",
    "data_directory", "command_directory", "queue_directory", "process_id_directory",
    "double_bounce_sender", "default_privs", "mail_version", "default_database_type",
    "mynetworks_style",
)
SYSLOG_FACILITIES = frozenset({
    "auth", "authpriv", "cron", "daemon", "ftp", "kern", "lpr", "mail", "news", "syslog",
    "user", "uucp", *(f"local{i}" for i in range(8)),
})
_TIME_RE = re.compile(r"(\d+)(?:([smhdw]).*)?$")
_COMPAT_RE = re.compile(r"\d+(?:\.\d+){0,2}$")


def valid_hostname(name: str, gripe) -> bool:
    """Postfix's valid_hostname() with DO_GRIPE: letters, digits, "_" and inner
    hyphens in labels of at most 63 bytes, no empty label, not all digits, at most
    255 bytes; ``gripe`` gets its warning (RFC 1035 2.3.1, relaxed as Postfix is)."""
    if not name:
        gripe("valid_hostname: empty hostname")
        return False
    label = 0
    non_numeric = False
    for i, ch in enumerate(name):
        nxt = name[i + 1:i + 2]
        if ch.isascii() and (ch.isalnum() or ch == "_"):
            label += 1
            if label > 63:
                gripe(f"valid_hostname: hostname label too long: {name[:100]}...")
                return False
            if not ch.isdigit():
                non_numeric = True
        elif ch == ".":
            if label == 0 or not nxt:
                gripe(f"valid_hostname: misplaced delimiter: {name[:100]}")
                return False
            label = 0
        elif ch == "-":
            non_numeric = True
            label += 1
            if label == 1 or not nxt or nxt == ".":
                gripe(f"valid_hostname: misplaced hyphen: {name[:100]}")
                return False
        else:
            gripe(f"valid_hostname: invalid character {ord(ch)}(decimal): {name[:100]}")
            return False
    if not non_numeric:
        gripe(f"valid_hostname: numeric hostname: {name[:100]}")
        return False
    if len(name) > 255:
        gripe(f"valid_hostname: bad length {len(name)} for {name[:100]}...")
        return False
    return True


def _local_addresses() -> set[str]:
    """The addresses of this host's interfaces (Postfix's inet_addr_local()): what
    the kernel lists, not what it would let a socket bind (127.0.0.2 binds on Linux
    but Postfix finds no interface for it)."""
    import ipaddress
    try:
        from postwell.policy.matchlist import _system_addresses
        found = _system_addresses()
    except Exception:   # noqa: BLE001 - no interface list: the loopback at least
        found = ["127.0.0.1", "::1"]
    return {str(ipaddress.ip_address(a)) for a in found}


def _interface_problem(cfg) -> str | None:
    """inet_interfaces names only this host's addresses (Postfix's own_inet_addr_list).
    "all" and "loopback-only" are keywords only as the whole value."""
    import ipaddress
    import socket
    protos = {p.lower() for p in re.split(r"[\s,]+", cfg.get("inet_protocols") or "all") if p}
    families = set()
    if protos & {"all", "ipv4"}:
        families.add(socket.AF_INET)
    if protos & {"all", "ipv6"}:
        families.add(socket.AF_INET6)
    entries = [e for e in re.split(r"[\s,]+", cfg.get("inet_interfaces") or "") if e]
    if len(entries) == 1 and entries[0].lower() in ("all", "loopback-only"):
        return None
    local = None
    for entry in entries:
        host = entry[1:-1] if entry.startswith("[") and entry.endswith("]") else entry
        addrs = []
        for family in families:
            try:
                infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                continue
            addrs += [str(ipaddress.ip_address(i[4][0].split("%", 1)[0])) for i in infos]
        if not addrs:
            return f"config variable inet_interfaces: host not found: {entry}"
        if local is None:
            local = _local_addresses()
        if not any(a in local for a in addrs):
            return f"parameter inet_interfaces: no local interface found for {entry}"
    return None


def parameter_fatal(cfg, warn=lambda text: None) -> str | None:
    """The fatal text Postfix's postfix(1) would die with for this main.cf before it
    runs any command, or None; warnings before it (valid_hostname's) go to ``warn``."""
    main_cf = f"file {cfg.config_dir}/main.cf"

    def value(name: str) -> str:
        return (cfg.get(name) or "").strip()

    facility = value("syslog_facility")
    if facility.lower() not in SYSLOG_FACILITIES:
        return f"{main_cf}: parameter syslog_facility: unrecognized value: {facility}"
    protocols = cfg.get("inet_protocols") or ""
    for item in re.split(r"[\s,]+", protocols):
        if item and item.lower() not in ("all", "ipv4", "ipv6"):
            return f'unknown inet_protocols value "{item}" in "{protocols}"'
    level = value("compatibility_level")
    if level and not _COMPAT_RE.match(level):
        return f'malformed compatibility level syntax: "{level}"'
    for name in ("myhostname", "mydomain"):
        text = value(name)
        if not text:
            return f"bad string length 0 < 1: {name} = "
        if not valid_hostname(text, warn):
            return f"{main_cf}: parameter {name}: bad parameter value: {text}"
    for name in GLOBAL_NONEMPTY_PARAMETERS:
        if not value(name):
            return f"bad string length 0 < 1: {name} = "
    for name, (low, high) in GLOBAL_INT_PARAMETERS.items():
        text = value(name)
        if not re.fullmatch(r"-?\d+", text):
            return f"bad numerical configuration: {name} = {text}"
        number = int(text)
        if low and number < low:
            return f"invalid {name} parameter value {number} < {low}"
        if high and number > high:
            return f"invalid {name} parameter value {number} > {high}"
    for name in GLOBAL_BOOL_PARAMETERS:
        text = value(name)
        if text.lower() not in ("yes", "no"):
            return f"bad boolean configuration: {name} = {text}"
    for name, (low, high) in GLOBAL_TIME_PARAMETERS.items():
        text = value(name)
        m = _TIME_RE.match(text)
        if m is None:
            return f"parameter {name}: bad time value or unit: {text}"
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[
            m.group(2) or "s"]
        if low and seconds < low:
            return f"invalid {name}: {seconds} (min {low})"
        if high and seconds > high:
            return f"invalid {name}: {seconds} (max {high})"
    privs = value("default_privs")
    try:
        pw = pwd.getpwnam(privs)
    except KeyError:
        return f"{main_cf}: parameter default_privs: unknown user name value: {privs}"
    if pw.pw_uid == 0:
        return f"{main_cf}: parameter default_privs: user {privs} has privileged user ID"
    if pw.pw_gid == 0:
        return f"{main_cf}: parameter default_privs: user {privs} has privileged group ID"
    from .daemon import MasterError
    try:
        check_mail_owner(cfg, os.geteuid() == 0)
    except MasterError as exc:
        return str(exc)
    if privs == value("mail_owner"):
        return (f"{main_cf}: parameters default_privs and mail_owner specify the same "
                f"user {privs}")
    problem = _interface_problem(cfg)
    if problem:
        return problem
    hostname, relayhost = value("myhostname"), value("relayhost")
    if hostname.lower() == relayhost.lower():
        return f"myhostname and relayhost parameter settings must not be identical: {hostname}"
    origin = value("myorigin")
    if re.search(r"[, \t\r\n]", origin):
        return f"myorigin parameter setting must not contain multiple values: {origin}"
    return None


def check_queue_directories(cfg, owner) -> list[str]:
    """Create what is missing (owner and mode as postwell's parts expect) and
    report existing directories with the wrong owner or permissions.
    ``owner``: mail_owner's passwd entry when running as root, else None
    (then everything belongs to the invoking user)."""
    warnings = []
    qdir = cfg.get("queue_directory")
    root = owner is not None
    me = os.geteuid()
    mail_name = owner.pw_name if root else (pwd.getpwuid(me).pw_name if _known_uid(me) else str(me))
    mail_uid = owner.pw_uid if root else me
    mail_gid = owner.pw_gid if root else os.getegid()
    if not os.path.isdir(qdir):
        os.makedirs(qdir, 0o755)
        os.chmod(qdir, 0o755)
    st = os.stat(qdir)
    # Paths as postfix-script's find(1) prints them ("$queue_directory/.").
    if root and st.st_uid != 0:
        warnings.append(f"not owned by root: {_dot(qdir)}")
    if st.st_mode & 0o022:
        warnings.append(f"group or other writable: {_dot(qdir)}")
    for name, (root_mode, user_mode, who) in QUEUE_LAYOUT.items():
        path = os.path.join(qdir, name)
        mode = root_mode if root else user_mode
        want_uid = 0 if (who == "root" and root) else mail_uid
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, mode)
            os.chmod(path, mode)     # mkdir's mode went through the umask
            if root:
                os.chown(path, want_uid, 0 if who == "root" else mail_gid)
            continue
        if not stat.S_ISDIR(st.st_mode):
            warnings.append(f"not a directory: {path}")
            continue
        if st.st_uid != want_uid:
            warnings.append(f"not owned by {'root' if want_uid == 0 else mail_name}: {path}")
        have = stat.S_IMODE(st.st_mode)
        if name == "maildrop" and have in (root_mode, user_mode):
            continue   # pickup opens the drop box (1733) even when not root
        warnings += _mode_warnings(path, have, mode)
    for name in OPTIONAL_DIRS:
        path = os.path.join(qdir, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid != mail_uid:
            warnings.append(f"not owned by {mail_name}: {path}")
    data = cfg.get("data_directory")
    if data and os.path.isdir(data):
        st = os.stat(data)
        if st.st_uid != mail_uid:
            warnings.append(f"not owned by {mail_name}: {_dot(data)}")
    return warnings


def _dot(path: str) -> str:
    """How find(1) names a directory given as "DIR/." (postfix-script's form)."""
    return path.rstrip("/") + "/."


CONFIG_SCAN_LIMIT = 2000     # entries looked at under config_directory (bounded work)


def check_config_files(config_dir: str, root: bool) -> list[str]:
    """As Postfix's check-warn: the configuration must belong to root (when
    we are root) and be writable by nobody else."""
    out = []
    seen = 0
    start = _dot(config_dir)      # postfix-script: find $config_directory/. ...
    for top, dirs, files in os.walk(start):
        dirs.sort()
        for name in [None] + sorted(files):
            path = top if name is None else os.path.join(top, name)
            seen += 1
            if seen > CONFIG_SCAN_LIMIT:
                return out
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            if root and st.st_uid != 0:
                out.append(f"not owned by root: {path}")
            if st.st_mode & 0o022 and (name is None or stat.S_ISREG(st.st_mode)):
                out.append(f"group or other writable: {path}")
    return out


def _mode_warnings(path: str, have: int, want: int) -> list[str]:
    out = []
    extra_write = have & 0o022 & ~want
    if extra_write:
        out.append(f"group or other writable: {path}")
    extra_read = have & 0o055 & ~want
    if extra_read:
        out.append(f"group or other accessible: {path}")
    if not out and have != want:
        out.append(f"bad permissions {have:04o} (expected {want:04o}): {path}")
    return out


def _known_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def check_pipe_services(cfg, owner, root: bool) -> list[str]:
    try:
        from postwell.delivery.pipe import PipeConfigError, parse_attributes
    except ImportError:
        return []
    out = []
    for svc in cfg.services or []:
        if svc.command != "pipe" or svc.type != "unix":
            continue
        try:
            parse_attributes(svc.args, mail_owner=cfg.get("mail_owner") if root else None)
        except PipeConfigError as exc:
            if "unknown username" in str(exc) or "unknown group" in str(exc):
                # Stock master.cf lists pipe services for accounts most systems
                # lack (vmail, uucp...); Postfix only complains if one is used.
                continue
            out.append(f"{cfg.config_dir}/master.cf: line {svc.line}: service {svc.name}: {exc}")
    return out


# ------------------------------------------------------------------ tables

def table_specs(cfg) -> list[str]:
    """Every "type:name" table named by an explicitly set parameter (main.cf
    and master.cf -o overrides), in order, without duplicates."""
    from postwell.delivery.base import split_map_list
    try:
        from postwell.tables import table_types
        known = POSTFIX_TABLE_TYPES | set(table_types())
    except ImportError:
        known = POSTFIX_TABLE_TYPES
    values = []
    names = list(getattr(cfg, "params", {}) or {})
    for name in names:
        if name.endswith(_TABLE_SUFFIXES) or name in TABLE_LIST_PARAMETERS:
            try:
                values.append(cfg.get(name))
            except Exception:
                continue
    for svc in cfg.services or []:
        for name, value in (svc.overrides or {}).items():
            if name.endswith(_TABLE_SUFFIXES) or name in TABLE_LIST_PARAMETERS:
                try:
                    values.append(cfg.override(svc.overrides).get(name))
                except Exception:
                    continue
    specs: list[str] = []
    for value in values:
        previous = ""
        for token in split_map_list(value or ""):
            after, previous = previous, token.lower()
            if after == "check_policy_service":
                continue   # a policy server's socket ("unix:private/policy"), not a table
            m = _TOKEN.match(token)
            if not m or m.group(1) not in known:
                continue
            if token not in specs:
                specs.append(token)
    return specs


def _open_all(specs: list[str], config) -> list[tuple[str, str]]:
    from postwell.tables import open_table
    failed = []
    for spec in specs:
        try:
            open_table(spec, config)
        except ImportError:
            continue   # our own installation problem, not the table's: the daemons preload
        except Exception as exc:
            failed.append((spec, str(exc) or type(exc).__name__))
    return failed


def _preload_table_modules() -> None:
    # The child may not be able to read the interpreter's library once it is
    # mail_owner (as the master's children): import the table types first.
    import importlib
    import pkgutil
    try:
        import postwell.tables as tables
    except ImportError:
        return
    for info in pkgutil.iter_modules(tables.__path__, "postwell.tables."):
        try:
            importlib.import_module(info.name)
        except Exception:
            pass


def _open_as(owner, specs: list[str], config) -> list[tuple[str, str]]:
    """Open the tables in a child that has become mail_owner (root only)."""
    _preload_table_modules()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            os.setgroups([owner.pw_gid])
            os.setgid(owner.pw_gid)
            os.setuid(owner.pw_uid)
            data = json.dumps(_open_all(specs, config)).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while True:
            b = f.read(65536)
            if not b:
                break
            chunks.append(b)
    os.waitpid(pid, 0)
    try:
        return [tuple(x) for x in json.loads(b"".join(chunks))]
    except ValueError:
        return _open_all(specs, config)


def check_tables(cfg, owner) -> list[str]:
    """Tables postwell's daemons could not open although Postfix's could.

    Postfix's check opens no table: a missing or broken one (the usual case
    being an aliases.db that newaliases never built) shows up only when a
    daemon uses it, and postwell's daemons log that in the same words.  What
    check reports is what would work under Postfix but not here: a table type
    postwell lacks, or a table only root can read (Postfix's daemons open
    their tables before they drop privileges, postwell's after)."""
    try:
        specs = table_specs(cfg)
    except ImportError:
        return []
    if not specs:
        return []
    try:
        from postwell.tables import clear_cache, split_spec, table_types
        supported = set(table_types())
    except ImportError:
        return []
    failed = _open_as(owner, specs, cfg) if owner is not None else _open_all(specs, cfg)
    out = []
    unsupported = []
    for spec, why in failed:
        try:
            typ = split_spec(spec)[0]
        except Exception:
            continue
        if typ not in supported:
            unsupported.append((spec, why))
    if owner is not None:
        # Those that root can open fail only because of the privilege drop.
        retry = [spec for spec, _ in failed if (spec, _) not in unsupported]
        still = {spec for spec, _ in _open_all(retry, cfg)}
        privileged = [(spec, why) for spec, why in failed
                      if (spec, why) not in unsupported and spec not in still]
    else:
        privileged = []
    try:
        clear_cache()
    except Exception:
        pass
    for spec, why in failed:
        if (spec, why) in unsupported or (spec, why) in privileged:
            # Postfix's wording when a daemon meets such a table.
            out.append(f"{spec} is unavailable. {why}")
    return out
