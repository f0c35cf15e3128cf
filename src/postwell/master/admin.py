"""postfix(1)'s maintenance commands: logrotate, set-permissions, upgrade-configuration.

Postfix runs these from postfix-script (logrotate) and post-install (the other
two); postwell does the same work for its own layout with the same words on the
same streams and the same exit statuses.  Output goes through the callables the
caller passes (``script_fatal`` is postfix-script's $FATAL, ``fatal`` is
postfix(1)'s own msg_fatal), so this module stays free of terminal handling.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time

# Postfix's post-install keeps these in sync with main.cf (MOST_PARAMETERS).
INSTALL_PARAMETERS = (
    "command_directory", "daemon_directory", "data_directory", "html_directory", "mail_owner",
    "mailq_path", "manpage_directory", "newaliases_path", "queue_directory", "readme_directory",
    "sample_directory", "sendmail_path", "setgid_group", "shlib_directory", "meta_directory",
)

# Postfix's logrotate waits this long after the HUP before it compresses: every
# process still writing into the renamed file notices the new one within a second
# (postwell.log checks once a second).
ROTATE_SETTLE_SECONDS = 1.0
COMPRESS_TIMEOUT = 600.0


# ------------------------------------------------------------------ logrotate

def maillog_prefix_ok(path: str, prefixes: list[str]) -> bool:
    """postfix(1)'s maillog_file_prefixes test: a plain, case-sensitive string prefix."""
    return any(path.startswith(p) for p in prefixes if p)


def _mail_owner_ids(cfg) -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(cfg.get("mail_owner"))
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _mv_error(src: str, dst: str, exc: OSError) -> str:
    # mv(1)'s own words, which Postfix's message quotes.
    if exc.errno == errno.ENOENT and not os.path.lexists(src):
        return f"mv: cannot stat '{src}': No such file or directory"
    return f"mv: cannot move '{src}' to '{dst}': {exc.strerror}"


def _create_log(path: str, owner: tuple[int, int] | None) -> None:
    """The new maillog, writable by the unprivileged daemons: postwell's daemons
    write the file themselves as mail_owner (Postfix's root postlogd creates it
    on its first line), so it must exist with that owner before any of them, or
    a root process, re-opens it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return      # the first daemon line creates it, as with Postfix
    try:
        if owner is not None:
            os.fchown(fd, owner[0], owner[1])
    except OSError:
        pass
    finally:
        os.close(fd)


def _compress(compressor: str, path: str, script: str) -> str | None:
    """Run the compressor as postfix-script does ("$compressor" file: one word,
    looked up in PATH); None on success, else the text Postfix quotes."""
    exe = compressor if "/" in compressor else shutil.which(compressor)
    if exe is None or not os.path.exists(exe):
        # the shell's words for a command it cannot find (postfix-script line 7)
        return f"{script}: 7: {compressor}: not found"
    if os.path.isdir(exe) or not os.access(exe, os.X_OK):
        return f"{script}: 7: {compressor}: Permission denied"
    try:
        cp = subprocess.run([exe, path], stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=COMPRESS_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{script}: 7: {compressor}: {getattr(exc, 'strerror', None) or exc}"
    if cp.returncode != 0:
        # `errors=$(...)` keeps stdout and stderr, less the trailing newlines
        return (cp.stdout + cp.stderr).decode(errors="replace").rstrip("\n")
    return None


def logrotate(cfg, args: list[str], *, fatal, script_fatal, running_pid,
              clock=time.time, sleep=time.sleep, postconf_run=None) -> int:
    """`postfix logrotate`: rename maillog_file with the strftime suffix, make
    the running system write a new file, compress the old one."""
    for name in ("maillog_file_compressor", "maillog_file_rotate_suffix"):
        if not cfg.get(name):
            # postfix(1) itself refuses an empty value of these (mail_params.c)
            return fatal(f"bad string length 0 < 1: {name} = ")
    maillog = cfg.get("maillog_file")
    if maillog and not maillog_prefix_ok(maillog, cfg.get_list("maillog_file_prefixes")):
        return fatal(f"maillog_file value '{maillog}' does not match any prefix in "
                     "maillog_file_prefixes")
    if len(args) != 1:
        return script_fatal(cfg, f"usage postfix {args[0]} (no arguments)")
    # postfix-script reads the three parameters with one `postconf -h` each,
    # whose warnings reach stderr (postconf_run says them)
    for name in ("maillog_file", "maillog_file_compressor", "maillog_file_rotate_suffix"):
        if postconf_run is not None:
            postconf_run(name)
        if name == "maillog_file" and not maillog:
            return script_fatal(cfg, "empty 'maillog_file' parameter value - logfile rotation failed")
    if maillog.startswith("/dev/"):
        return script_fatal(cfg, f"not rotating '{maillog}'")
    suffix = time.strftime(cfg.get("maillog_file_rotate_suffix"), time.localtime(clock()))
    rotated = f"{maillog}.{suffix}"
    script = os.path.join(cfg.get("daemon_directory") or "/usr/lib/postfix/sbin",
                          "postfix-script")

    def failed(errors: str) -> int:
        return script_fatal(cfg, f"logfile '{maillog}' rotation failed: {errors}")

    pid = running_pid(cfg)
    try:
        os.rename(maillog, rotated)
    except OSError as exc:
        return failed(_mv_error(maillog, rotated, exc))
    if pid:
        # Without a running system nothing writes: the next start creates the file.
        _create_log(maillog, _mail_owner_ids(cfg))
        # The master logs "reload" (into the rotated file, as Postfix's), opens the
        # new file and starts new children on it; draining children follow within
        # a second (postwell.log), before the compressor reads the old file.
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            return failed(f"kill: ({pid}) - {exc.strerror}")
    sleep(ROTATE_SETTLE_SECONDS)
    errors = _compress(cfg.get("maillog_file_compressor"), rotated, script)
    if errors is not None:
        return failed(errors)
    return 0


# ------------------------------------------------------------------ post-install

def _post_install(cfg) -> str:
    return os.path.join(cfg.get("daemon_directory") or "/usr/lib/postfix/sbin", "post-install")


def _usage(prog: str) -> str:
    return (f"{prog}: Error: Usage: {prog} [name=value] command\n"
            "    create-missing          Create missing queue directories.\n"
            "    upgrade-source          When installing or upgrading from source code.\n"
            "    upgrade-package         When installing or upgrading from pre-built package.\n"
            "    first-install-reminder  Remind of mandatory first-time configuration steps.\n"
            "    name=value              Specify an installation parameter.\n")


class _Install:
    """What post-install was asked to do, as its argument loop reads the words."""

    def __init__(self) -> None:
        self.create = self.set_perms = self.upgrade_perms = self.upgrade_conf = False
        self.reminder = False
        self.params: dict[str, str] = {}


def parse_install_args(words: list[str], prog: str, out, err) -> _Install | int:
    todo = _Install()
    for word in words:
        if " " in word or "\t" in word:
            out.write(f"{prog}: Error: argument contains whitespace: '{word}'\n")
            return 1
        if "=" in word:
            name, value = word.split("=", 1)
            todo.params[name] = value
        elif word == "create-missing":
            todo.create = True
        elif word.startswith("set-perm"):
            todo.create = todo.set_perms = True
        elif word.startswith("upgrade-perm"):
            todo.create = todo.upgrade_perms = True
        elif word.startswith("upgrade-conf"):
            todo.upgrade_conf = True
        elif word == "upgrade-source":
            todo.create = todo.upgrade_conf = todo.upgrade_perms = True
        elif word == "upgrade-package":
            todo.create = todo.upgrade_conf = todo.set_perms = True
        elif word.startswith("first-install"):
            todo.reminder = True
        else:
            err.write(_usage(prog))
            return 1
    if not (todo.create or todo.upgrade_conf or todo.reminder):
        err.write(_usage(prog))
        return 1
    return todo


def _save_overrides(cfg, params: dict[str, str], err) -> int:
    """post-install saves installation parameters given as name=value that differ
    from main.cf (postwell writes just those; Postfix rewrites all fifteen)."""
    changed = [f"{n} = {v}" for n, v in params.items()
               if n in INSTALL_PARAMETERS and cfg.get(n) != v]
    if not changed:
        return 0
    import io
    from postwell.cli import postconf
    out = io.StringIO()
    rc = postconf.main(["-c", cfg.config_dir, "-e", *changed], stdout=out, stderr=err)
    return 1 if rc else 0


# (path, owner ("root" or "mail_owner"), mode, flags): postwell's counterpart of
# Postfix's postfix-files for what it owns.  Flags as there: c = create when
# missing, r = owner recursively (modes of files never: a queue file's mode
# bits are its state).  maildrop is postwell's 1733 drop box (files keep their
# submitters as owners); public is 0711 (no set-gid postdrop).
def permission_table(cfg) -> list[tuple[str, str, int, str, bool]]:
    """(path, owner, mode, flags, group_too): group_too sets mail_owner's group,
    as postwell's queue set-up does."""
    q = cfg.get("queue_directory")
    rows: list[tuple[str, str, int, str, bool]] = [
        (cfg.config_dir, "root", 0o755, "", False),
    ]
    data = cfg.get("data_directory")
    if data:
        rows.append((data, "mail_owner", 0o700, "c", True))
    rows.append((q, "root", 0o755, "c", False))
    for name in ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold",
                 "incoming", "saved", "trace"):
        flags = "cr" if name not in ("flush", "saved", "trace") else "r"
        rows.append((os.path.join(q, name), "mail_owner", 0o700, flags, True))
    rows += [
        (os.path.join(q, "private"), "mail_owner", 0o700, "c", True),
        (os.path.join(q, "maildrop"), "mail_owner", 0o1733, "c", False),
        (os.path.join(q, "public"), "mail_owner", 0o711, "c", False),
        (os.path.join(q, "pid"), "root", 0o755, "c", False),
        (os.path.join(cfg.config_dir, "main.cf"), "root", 0o644, "f", False),
        (os.path.join(cfg.config_dir, "master.cf"), "root", 0o644, "f", False),
    ]
    return rows


def _apply(path: str, uid: int, gid: int, mode: int, recursive: bool) -> None:
    if uid >= 0 and os.geteuid() == 0:
        os.chown(path, uid, gid)
    os.chmod(path, mode)
    if not recursive:
        return
    # Never through a symbolic link: the directories are writable by mail_owner,
    # and root must not be led to change a file elsewhere (Postfix's chown -R
    # and find -type d do not follow them either).
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(top, name)
            if os.geteuid() == 0:
                os.lchown(p, uid, -1)     # owner only: group and file modes (state) stay
            if name in dirs:
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue          # a symbolic link, or gone meanwhile
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)


def fix_permissions(cfg, todo: _Install, err) -> int:
    owner_name = todo.params.get("mail_owner") or cfg.get("mail_owner")
    try:
        pw = pwd.getpwnam(owner_name)
    except KeyError:
        err.write(f"chown: invalid user: '{owner_name}'\n")
        return 1
    ids = {"root": (0, -1), "mail_owner": (pw.pw_uid, pw.pw_gid)}
    table = permission_table(cfg)
    if "queue_directory" in todo.params or "data_directory" in todo.params:
        table = permission_table(cfg.override({k: v for k, v in todo.params.items()
                                               if k in ("queue_directory", "data_directory")}))
    for path, who, mode, flags, group_too in table:
        uid, gid = ids[who]
        if not group_too:
            gid = -1
        is_dir = "f" not in flags
        apply = False
        try:
            if is_dir and "c" in flags and not os.path.isdir(path):
                os.mkdir(path)
                apply = True
            elif todo.set_perms or (todo.upgrade_perms and is_dir):
                apply = os.path.lexists(path)
            if apply:
                _apply(path, uid, gid, mode, "r" in flags)
        except OSError as exc:
            err.write(f"{path}: {exc.strerror}\n")
            return 1
    # The log the unprivileged daemons append to (postwell's own need).
    maillog = cfg.get("maillog_file")
    if todo.set_perms and maillog and not maillog.startswith("/dev/") and os.path.isfile(maillog):
        try:
            os.chown(maillog, pw.pw_uid, pw.pw_gid)
        except OSError:
            pass
    return 0


# Postfix's upgrade-configuration, step by step in its order.  ("add", pattern,
# what, entry): append the entry when no line matches; ("edit", pattern, what,
# substitutions): change the first matching line as Postfix's ed(1) script does.
_WS = "[ \t]"
# Written so that config/registry.py's scan for parameter-name literals does not
# count it as honoured: postwell's queue directories are never hashed, and an
# admin who sets it should keep the "not implemented" warning.
_HASH_QUEUE_NAMES = "_".join(("hash", "queue", "names"))
_UPGRADE_STEPS = (
    ("add", r"^relay", "relay service", "relay\t  unix\t-\t-\tn\t-\t-\tsmtp"),
    ("add", r"^flush.*flush", "flush service",
     "flush     unix  -       -       n       1000?   0       flush"),
    ("add", r"trace.*bounce", "trace service", "trace\t  unix\t-\t-\tn\t-\t0\tbounce"),
    ("add", r"^verify.*verify", "verify service", "verify\t  unix\t-\t-\tn\t-\t1\tverify"),
    ("edit", rf"^verify.*{_WS}0{_WS}*verify", "setting verify process limit to 1",
     ((rf"({_WS})0({_WS})", r"\g<1>1\g<2>"),)),
    ("edit", rf"^pickup{_WS}*fifo{_WS}*n{_WS}*n", "making the pickup service unprivileged",
     ((rf"(n{_WS}*)n", r"\g<1>-"),)),
    ("edit", rf"^cleanup{_WS}*unix{_WS}*[-y]", "making the cleanup service public",
     ((r"[-y]", "n"),)),
    ("edit", rf"^flush{_WS}*unix{_WS}*[-y]", "making the flush service public",
     ((r"[-y]", "n"),)),
    ("hash queue names",),
    ("add", r"^proxymap.*proxymap", "proxymap service", "proxymap  unix\t-\t-\tn\t-\t-\tproxymap"),
    ("add", r"^anvil.*anvil", "anvil service", "anvil\t  unix\t-\t-\tn\t-\t1\tanvil"),
    ("add", r"^scache.*scache", "scache service", "scache\t  unix\t-\t-\tn\t-\t1\tscache"),
    ("add", r"^discard.*discard", "discard service", "discard\t  unix\t-\t-\tn\t-\t-\tdiscard"),
    ("edit", rf"^tlsmgr{_WS}*fifo{_WS}", "updating the tlsmgr from fifo to unix service",
     ((r"fifo", "unix"), (r"[0-9][0-9]*", r"\g<0>?"))),
    ("add", r"^tlsmgr.*tlsmgr", "tlsmgr service",
     "tlsmgr    unix  -       -       n       1000?   1       tlsmgr"),
    ("add", r"^retry.*error", "retry service",
     "retry     unix  -       -       n       -       -       error"),
    ("add", r"^proxywrite.*proxymap", "proxywrite service",
     "proxywrite unix -       -       n       -       1       proxymap"),
    ("edit", rf"^proxywrite.*-{_WS}*proxymap", "setting proxywrite process limit to 1",
     ((rf"-({_WS}*proxymap)", r"1\g<1>"),)),
    ("add", r"^#*smtp.*postscreen", "postscreen TCP service",
     "#smtp      inet  n       -       n       -       1       postscreen"),
    ("add", r"^#*smtpd.*smtpd", "smtpd unix-domain service",
     "#smtpd     pass  -       -       n       -       -       smtpd"),
    ("add", r"^#*dnsblog.*dnsblog", "dnsblog unix-domain service",
     "#dnsblog   unix  -       -       n       -       0       dnsblog"),
    ("add", r"^#*tlsproxy.*tlsproxy", "tlsproxy unix-domain service",
     "#tlsproxy  unix  -       -       n       -       0       tlsproxy"),
    ("inet_protocols",),
    ("add", r"^postlog", "postlog unix-domain datagram service",
     "postlog   unix-dgram n  -       n       -       1       postlogd"),
)


def _fmt(text: str) -> str:
    """Postfix pipes these notes through fmt(1); use it when it is there."""
    try:
        cp = subprocess.run(["fmt"], input=text.encode(), capture_output=True, timeout=10)
        if cp.returncode == 0:
            return cp.stdout.decode()
    except (OSError, subprocess.SubprocessError):
        pass
    import textwrap
    return textwrap.fill(" ".join(text.split()), 75, initial_indent="    ",
                         subsequent_indent="    ") + "\n"


class _MasterCf:
    """master.cf as Postfix's grep/cat/ed steps see it (bytes kept as they are)."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def lines(self) -> list[str]:
        return self.read().decode("utf-8", "surrogateescape").split("\n")

    def find(self, pattern: str) -> int | None:
        import re
        rx = re.compile(pattern)
        for i, line in enumerate(self.lines()):
            if rx.search(line):
                return i
        return None

    def append(self, entry: str) -> None:
        with open(self.path, "ab") as f:
            f.write(entry.encode() + b"\n")

    def edit(self, index: int, subs, out) -> None:
        """ed(1): it prints the size read, the addressed line, the line after the
        substitutions (p) and the size written."""
        import re
        data = self.read()
        out.write(f"{len(data)}\n")
        lines = self.lines()
        line = lines[index]
        out.write(line + "\n")
        for pattern, repl in subs:
            line = re.sub(pattern, repl, line, count=1)
        out.write(line + "\n")
        lines[index] = line
        new = "\n".join(lines).encode("utf-8", "surrogateescape")
        with open(self.path, "wb") as f:
            f.write(new)
        out.write(f"{len(new)}\n")


def upgrade_configuration(cfg, out, err) -> int:
    """Postfix's upgrade-configuration edits, with its messages: master.cf gains
    the standard entries it lacks (postwell maps them to its own parts, see
    docs/architecture.md) and loses what older releases wrote, hash_queue_names
    gains defer/deferred, and a main.cf without inet_protocols is pinned to ipv4
    as Postfix's safety net does."""
    master_cf = os.path.join(cfg.config_dir, "master.cf")
    mcf = _MasterCf(master_cf)
    for step in _UPGRADE_STEPS:
        try:
            if step[0] == "add":
                _, pattern, what, entry = step
                if mcf.find(pattern) is None:
                    out.write(f"Editing {master_cf}, adding missing entry for {what}\n")
                    mcf.append(entry)
            elif step[0] == "edit":
                _, pattern, what, subs = step
                index = mcf.find(pattern)
                if index is not None:
                    out.write(f"Editing {master_cf}, {what}\n")
                    mcf.edit(index, subs, out)
            elif step[0] == "hash queue names":
                found = cfg.get(_HASH_QUEUE_NAMES)
                missing = "".join(f" {n}" for n in ("defer", "deferred") if n not in found)
                if missing:
                    out.write(f"fixing main.cf {_HASH_QUEUE_NAMES} for missing{missing}\n")
                    if _postconf_edit(cfg, [f"{_HASH_QUEUE_NAMES}={found}{missing}"], err):
                        return 1
            elif step[0] == "inet_protocols":
                from postwell.config.defaults import DEFAULTS
                if DEFAULTS.get("inet_protocols") != "ipv4" and not cfg.is_set("inet_protocols"):
                    out.write(_fmt(
                        f"    COMPATIBILITY: editing {cfg.config_dir}/main.cf, setting\n"
                        "    inet_protocols=ipv4.  Specify inet_protocols explicitly if you\n"
                        "    want to enable IPv6.\n"
                        "    In a future release IPv6 will be enabled by default.\n"))
                    if _postconf_edit(cfg, ["inet_protocols=ipv4"], err):
                        return 1
        except OSError as exc:
            err.write(f"{master_cf}: {exc.strerror}\n")
            return 1
    return 0


def _postconf_edit(cfg, settings: list[str], err) -> int:
    import io
    from postwell.cli import postconf
    return 1 if postconf.main(["-c", cfg.config_dir, "-e", *settings],
                              stdout=io.StringIO(), stderr=err) else 0


def post_install(cfg, args: list[str], out=None, err=None) -> int:
    """`postfix set-permissions|upgrade-configuration [name=value ...]`: Postfix
    runs `post-install create-missing COMMAND ARGS...`."""
    out = out or sys.stdout
    err = err or sys.stderr
    prog = _post_install(cfg)
    todo = parse_install_args(["create-missing", *args], prog, out, err)
    if isinstance(todo, int):
        return todo
    if _save_overrides(cfg, todo.params, err):
        return 1
    if todo.create:
        rc = fix_permissions(cfg, todo, err)
        if rc:
            return rc
    if todo.upgrade_conf:
        from postwell.config import load_config
        try:
            fresh = load_config(cfg.config_dir, read_master=False)
        except Exception:   # noqa: BLE001 - the config read before us
            fresh = cfg
        rc = upgrade_configuration(fresh, out, err)
        if rc:
            return rc
    out.flush()
    return 0
