"""Test harness: isolated postwell and reference-Postfix instances, SMTP drivers.

Everything here talks to 127.0.0.1 only and every wait is bounded.  Two MTAs
share one API (:class:`MtaInstance`) so a test can run the same recipe against
postwell and against Debian's Postfix and compare what each did.

The reference Postfix tools are always called by absolute path: the bare
names ``postfix``/``postconf``/``postmap`` on PATH may be postwell's own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

POSTFIX_BIN = "/usr/sbin/postfix"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
TEST_USER = "postwelltest"
DEFAULT_MAIN_CF = Path("/etc/postfix/main.cf")

HOSTNAME = "mx.example.test"
DOMAIN = "example.test"
VIRTUAL_DOMAIN = "virtual.test"
# Virtual mailboxes every instance knows; the maps are identical for both MTAs.
MAILBOX_USERS = ("alice", "bob", "carol", "sink")


# ---------------------------------------------------------------- small tools

# Ports for test listeners come from below the kernel's ephemeral range, so an
# outgoing connection (which takes a random ephemeral port) can never grab a
# port between free_port() returning it and the server binding it.  Each
# process walks the range from its own random start (pytest-xdist workers and
# parallel runs by other people rarely meet) and never hands a port out twice.
_PORT_LOW, _PORT_HIGH = 20000, 32000
_port_lock = threading.Lock()
_port_next: list[int] = []
_ports_given: set[int] = set()


def _port_is_free(port: int, udp: bool = False) -> bool:
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    # Root Postfix instances can share a port (SO_REUSEPORT): bind() alone may
    # succeed beside a live listener, so check nobody answers either.
    return not port_accepts(port)


def free_port(udp: bool = False) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Not from the ephemeral range, and never the same one twice in a process.
    ``udp=True``: the UDP port of that number is free too (a DNS server).
    """
    with _port_lock:
        if not _port_next:
            import random
            worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
            n = int(re.sub(r"\D", "", worker) or 0)
            span = _PORT_HIGH - _PORT_LOW
            _port_next.append(_PORT_LOW + (n * 3001 + random.randrange(span)) % span)
        for _ in range(_PORT_HIGH - _PORT_LOW):
            port = _port_next[0]
            _port_next[0] = _PORT_LOW + (port + 1 - _PORT_LOW) % (_PORT_HIGH - _PORT_LOW)
            if port in _ports_given:
                continue
            _ports_given.add(port)
            if _port_is_free(port, udp):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def stderr_on_tty(cmd: list[str], env=None, timeout: float = 60.0) -> str:
    """What cmd writes to stderr when stderr is a terminal (a pty): postfix(1) and
    postfix-script speak there only then."""
    import pty
    import select
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=slave, env=env)
        os.close(slave)
        slave = -1
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:          # EIO: the terminal's last writer is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    wait_for(lambda: port_accepts(port, host), timeout, 0.05, f"{host}:{port} to accept")


def wait_banner(port: int, timeout: float = 15.0) -> str:
    """Wait until the port answers with a 220 greeting (not just accepts)."""
    def probe():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(3)
                data = s.recv(4096).decode("latin-1")
                if data.startswith("220"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                        s.recv(4096)
                    return data
        except OSError:
            return None
        return None
    return wait_for(probe, timeout, 0.1, f"a 220 banner on port {port}")


@contextlib.contextmanager
def machine_lock(name: str, timeout: float = 240.0):
    """Hold a machine-wide lock (a flock) while using a fixed-name resource.

    Real users (useradd pwe1...), fixed paths like /tmp/pwe-shared: another
    pytest run on the same machine (pytest-xdist workers, a colleague's run)
    must not create or delete them underneath us.  Bounded: TimeoutError.
    """
    path = os.path.join(tempfile.gettempdir(), f".postwell-tests-{name}.lock")
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lock {path} still held after {timeout:.0f}s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_root() -> bool:
    return os.geteuid() == 0


def ensure_test_user() -> str:
    """The unprivileged mail_owner for tests; created when running as root."""
    if not is_root():
        return pwd.getpwuid(os.getuid()).pw_name
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        # Serialised: two runs (or xdist workers) racing for /etc/passwd's lock
        # would make one useradd fail.
        with machine_lock("useradd"):
            try:
                pwd.getpwnam(TEST_USER)
            except KeyError:
                subprocess.run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", TEST_USER],
                               check=False, capture_output=True, timeout=30)
        pwd.getpwnam(TEST_USER)  # KeyError here means useradd failed
    return TEST_USER


def mail_owner_ids() -> tuple[str, int, int]:
    name = ensure_test_user()
    pw = pwd.getpwnam(name)
    return name, pw.pw_uid, pw.pw_gid


def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its descendants, found through /proc (parents first)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        rest = stat[stat.rfind(")") + 2:].split()
        children.setdefault(int(rest[1]), []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop(0)
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return [p for p in out if os.path.exists(f"/proc/{p}")]


def pids_with_argument(arg: str) -> list[int]:
    """Live processes (not us) whose argv contains ``arg`` exactly."""
    want = arg.encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if want in argv and pid_alive(int(entry)):
            out.append(int(entry))
    return out


def pids_with_environ(name: str, value: str) -> list[int]:
    """Live processes (not us) started with ``name=value`` in their environment.

    Postfix's master runs as "master -w" whatever its configuration, but
    ``postfix -c DIR start`` hands it MAIL_CONFIG=DIR.
    """
    want = f"{name}={value}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if want in env and pid_alive(int(entry)):
            out.append(int(entry))
    return out


def sweep_instances(roots) -> list[int]:
    """Kill what is still running of the given instance directories.

    A process belongs to an instance when its argv (postwell: ``-c ROOT/etc``)
    or its MAIL_CONFIG (Postfix's master) names the instance's config dir.
    One pass over /proc, whatever the number of roots.
    """
    dirs = {str(Path(r) / "etc").encode() for r in roots}
    if not dirs:
        return []
    envs = {b"MAIL_CONFIG=" + d for d in dirs}
    hits = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = set(f.read().split(b"\0"))
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if (argv & dirs or env & envs) and pid_alive(int(entry)):
            hits.append(int(entry))
    killed = []
    for pid in hits:
        killed += kill_tree(pid)
    return killed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def kill_tree(root_pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal a process and every descendant by pid (never by name).

    The process group too when it is not ours: a daemonised master leads its own
    group, and killing the group catches children that were re-parented to init.
    """
    pids = process_tree(root_pid) if pid_alive(root_pid) else []
    with contextlib.suppress(OSError):
        pgid = os.getpgid(root_pid)
        if pgid == root_pid and pgid != os.getpgid(0):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
    return pids


@contextlib.contextmanager
def real_users(names, lock: str, prefix: str, lock_timeout: float = 240.0):
    """Real users (useradd, a home under a fresh 0755 directory, /bin/sh), made anew
    and removed again under machine_lock(lock): the names are fixed, so another run
    on this machine must not delete them underneath us.  Yields name -> pwd entry."""
    with machine_lock(lock, timeout=lock_timeout):
        base = tempfile.mkdtemp(prefix=prefix)
        os.chmod(base, 0o755)
        made = {}
        try:
            for name in names:
                subprocess.run(["userdel", "-r", name], capture_output=True, timeout=30)
                subprocess.run(["useradd", "-m", "-d", os.path.join(base, name), "-s", "/bin/sh",
                                name], check=True, capture_output=True, timeout=30)
                made[name] = pwd.getpwnam(name)
            yield made
        finally:
            for name in made:
                subprocess.run(["userdel", "-r", name], capture_output=True, timeout=30)
            shutil.rmtree(base, ignore_errors=True)


def test_base_dir() -> Path:
    """Where instances live when running as root: outside pytest's tmp dirs.

    pytest keeps its basetemp at mode 0700 and resets that mode (and prunes old
    runs) whenever any pytest run starts, which would cut the postfix user and
    postwell's mail_owner off from a running instance.
    """
    base = Path(os.environ.get("POSTWELL_TEST_BASE") or
                os.path.join(tempfile.gettempdir(), "postwell-tests"))
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o711)
    make_traversable(base.parent)
    return base


# Every instance directory this process made, for the end-of-session sweep.
created_roots: list[Path] = []


def instance_root(tmp_path: Path, name: str) -> Path:
    """A fresh directory for one instance; linked from tmp_path for debugging."""
    if not is_root():
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        created_roots.append(root)
        return root
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=test_base_dir()))
    created_roots.append(root)
    os.chmod(root, 0o755)
    with contextlib.suppress(OSError):
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(root)
    return root


def make_traversable(path: Path) -> None:
    """Give the unprivileged mail owner search (x) access down to ``path``.

    pytest's temporary directories are mode 0700, which the postfix user and
    postwell's mail_owner cannot cross.  Only the search bit is added: the
    directories stay unlistable.
    """
    if not is_root():
        return
    for d in [Path(path), *Path(path).parents]:
        with contextlib.suppress(OSError):
            mode = d.stat().st_mode & 0o7777
            if mode & 0o011 != 0o011:
                os.chmod(d, mode | 0o011)


def pss_kib(pids) -> int:
    """Sum of the proportional set size of the given processes, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


# ---------------------------------------------------------------- instances

def _render_main_cf(params: dict[str, str], extra: dict | str | None) -> str:
    params = dict(params)
    tail = ""
    if isinstance(extra, dict):
        params.update({k: str(v) for k, v in extra.items()})
    elif isinstance(extra, str):
        tail = extra if extra.endswith("\n") or not extra else extra + "\n"
    return "".join(f"{k} = {v}\n" for k, v in params.items()) + tail


class MtaInstance:
    """What postwell and the reference Postfix have in common for tests."""

    kind = "mta"

    def __init__(self, tmp_path: Path, name: str, port: int | None = None) -> None:
        self.root = instance_root(Path(tmp_path), name)
        self.port = port or free_port()
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mail_dir = self.root / "mail"
        self.maillog = self.root / "maillog"
        self.running = False
        self.mail_owner, self.uid, self.gid = mail_owner_ids()

    # --- common main.cf: the classic recipe, with everything under self.root
    def base_params(self) -> dict[str, str]:
        return {
            "compatibility_level": "3.6",
            "myhostname": HOSTNAME,
            "mydomain": DOMAIN,
            "myorigin": "$mydomain",
            "mydestination": "$myhostname, localhost.$mydomain, localhost",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "smtpd_peername_lookup": "no",
            "smtpd_forbid_bare_newline": "normalize",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog),
            "virtual_mailbox_domains": VIRTUAL_DOMAIN,
            "virtual_mailbox_base": str(self.mail_dir),
            "virtual_mailbox_maps": f"texthash:{self.config_dir}/vmailbox",
            "virtual_uid_maps": f"static:{self.uid}",
            "virtual_gid_maps": f"static:{self.gid}",
            "virtual_minimum_uid": "1",
            "biff": "no",
            "append_dot_mydomain": "no",
            # No outside DNS: a relay destination must never leave the machine.
            "disable_dns_lookups": "yes",
            "smtp_host_lookup": "native",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "queue_run_delay": "5s",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "10s",
        }

    def _write_common(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        make_traversable(self.root)
        for d in (self.root, self.config_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        self.mail_dir.mkdir(exist_ok=True)
        if is_root():
            os.chown(self.mail_dir, self.uid, self.gid)
        (self.config_dir / "vmailbox").write_text(
            "".join(f"{u}@{VIRTUAL_DOMAIN} {VIRTUAL_DOMAIN}/{u}/\n" for u in MAILBOX_USERS))

    # --- log
    def log_text(self) -> str:
        try:
            return self.maillog.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, regex: str, timeout: float = 10.0, flags: int = re.M) -> re.Match:
        pattern = re.compile(regex, flags)
        try:
            return wait_for(lambda: pattern.search(self.log_text()), timeout, 0.05,
                            f"log line /{regex}/ in {self.maillog}")
        except TimeoutError:
            tail = "\n".join(self.log_text().splitlines()[-30:])
            raise TimeoutError(f"no log line matching /{regex}/ within {timeout}s; "
                               f"log tail:\n{tail}") from None

    # --- mailboxes
    def maildir(self, user: str) -> Path:
        return self.mail_dir / VIRTUAL_DOMAIN / user

    def maildir_messages(self, user: str) -> list[Path]:
        """Delivered files of a virtual mailbox (new/ and cur/), oldest name first."""
        out: list[Path] = []
        for sub in ("new", "cur"):
            d = self.maildir(user) / sub
            if d.is_dir():
                out.extend(sorted(d.iterdir()))
        return out

    def wait_maildir(self, user: str, count: int = 1, timeout: float = 15.0) -> list[Path]:
        try:
            return wait_for(lambda: (m := self.maildir_messages(user)) and len(m) >= count and m,
                            timeout, 0.05, f"{count} message(s) in {user}'s Maildir")
        except TimeoutError:
            tail = "\n".join(self.log_text().splitlines()[-30:])
            raise TimeoutError(f"{user}'s Maildir has {len(self.maildir_messages(user))} "
                               f"message(s), wanted {count}; log tail:\n{tail}") from None

    def queue_files(self, queues=("incoming", "active", "deferred", "maildrop")) -> list[Path]:
        out = []
        for q in queues:
            d = self.queue_dir / q
            if d.is_dir():
                out.extend(p for p in d.rglob("*") if p.is_file())
        return out

    def wait_queue_empty(self, timeout: float = 60.0) -> None:
        wait_for(lambda: not self.queue_files(), timeout, 0.1, f"{self.kind} queue to drain")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def processes(self) -> list[int]:
        pid = self.master_pid()
        return process_tree(pid) if pid and pid_alive(pid) else []

    def kill9(self) -> list[int]:
        pid = self.master_pid()
        killed = kill_tree(pid) if pid else []
        self.running = False
        return killed

    def cleanup(self) -> None:
        """Remove the instance directory (after stop); keep it if POSTWELL_KEEP_TEST_DIRS."""
        if self.running or os.environ.get("POSTWELL_KEEP_TEST_DIRS"):
            return
        if is_root() and self.root.parent == test_base_dir():
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        self.cleanup()


class PostwellInstance(MtaInstance):
    """An isolated postwell: config dir, queue, Maildirs and log under ``root``.

    ``main_cf`` as a dict updates the test defaults; as a string it is appended
    (later lines win in main.cf).  ``master_cf`` replaces the default, which is
    one smtpd on 127.0.0.1:port plus the qmgr.
    """

    kind = "postwell"

    def __init__(self, tmp_path, main_cf: dict | str | None = None,
                 master_cf: str | None = None, port: int | None = None,
                 name: str = "postwell") -> None:
        super().__init__(Path(tmp_path), name, port)
        self.main_cf = main_cf
        self.master_cf = master_cf
        self.write_config()

    def base_params(self) -> dict[str, str]:
        p = super().base_params()
        p["mail_owner"] = self.mail_owner
        return p

    def default_master_cf(self) -> str:
        return (f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
                "qmgr      unix  n       -       n       300     1       qmgr\n"
                "virtual   unix  -       n       n       -       -       virtual\n"
                "error     unix  -       -       n       -       -       error\n"
                "discard   unix  -       -       n       -       -       discard\n")

    def write_config(self) -> None:
        self._write_common()
        (self.config_dir / "main.cf").write_text(_render_main_cf(self.base_params(), self.main_cf))
        (self.config_dir / "master.cf").write_text(
            self.master_cf if self.master_cf is not None else self.default_master_cf())

    def cli(self, *args: str, timeout: float = 60.0, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess:
        """``python -m postwell.cli.postfix -c DIR args...``."""
        return self.run("postfix", *args, timeout=timeout, check=check, input=input)

    def run(self, tool: str, *args: str, timeout: float = 60.0, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run one of postwell's CLI tools (postfix, postconf, postmap, postqueue...)
        against this instance's config directory."""
        module = {"postwell": "postfix", "mailq": "postqueue"}.get(tool, tool)
        # sendmail names its configuration with -C, like Postfix's; the others use -c.
        flag = "-C" if module == "sendmail" else "-c"
        cmd = [sys.executable, "-m", f"postwell.cli.{module}", flag, str(self.config_dir), *args]
        env = dict(os.environ, MAIL_CONFIG=str(self.config_dir))
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            input=input, env=env, stdin=None if input is not None else subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {cp.returncode}\n"
                                 f"stdout: {cp.stdout}\nstderr: {cp.stderr}\nlog:\n{self.log_text()[-3000:]}")
        return cp

    def start(self, timeout: float = 20.0) -> "PostwellInstance":
        self.cli("start", check=True, timeout=timeout)
        self.running = True
        try:
            wait_banner(self.port, timeout)
        except TimeoutError:
            raise TimeoutError(f"postwell did not answer on port {self.port}; log:\n"
                               f"{self.log_text()[-3000:]}") from None
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop politely, then make sure nothing of this instance is left running."""
        pid = self.master_pid()
        with contextlib.suppress(Exception):
            self.cli("stop", timeout=timeout)
        if pid:
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: not pid_alive(pid), 10, 0.05, "postwell master to exit")
            if pid_alive(pid):
                kill_tree(pid)
        # A master that died before writing its pid file, or children it lost:
        # anything still running with our (unique, temporary) config dir in argv.
        for stray in pids_with_argument(str(self.config_dir)):
            kill_tree(stray)
        self.running = False

    def reload(self) -> subprocess.CompletedProcess:
        return self.cli("reload", check=True)


# ---------------------------------------------------------------- reference Postfix

_REF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def register_alternate_config_dir(config_dir: Path, main_cf: Path = DEFAULT_MAIN_CF) -> None:
    """List config_dir in the default main.cf's alternate_config_directories.

    Postfix's set-gid tools (postqueue, postdrop) refuse an unlisted -c directory.
    Entries whose directory is gone are dropped so the list does not grow forever;
    a lock file serialises concurrent test runs.
    """
    main_cf.parent.mkdir(parents=True, exist_ok=True)
    with open(main_cf.parent / ".postwell-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = main_cf.read_text() if main_cf.exists() else ""
        lines = text.splitlines()
        current: list[str] = []
        kept: list[str] = []
        for line in lines:
            m = re.match(r"\s*alternate_config_directories\s*=(.*)", line)
            if m:
                current += [d for d in re.split(r"[\s,]+", m.group(1)) if d]
            else:
                kept.append(line)
        if str(config_dir) in current and text:
            return
        current = [d for d in current if os.path.isdir(d) or d.startswith("$")]
        current.append(str(config_dir))
        if not any(re.match(r"\s*compatibility_level\s*=", ln) for ln in kept):
            kept.append("compatibility_level = 3.6")
        kept.append("alternate_config_directories = " + " ".join(dict.fromkeys(current)))
        tmp = main_cf.with_name(main_cf.name + ".postwell-tmp")
        tmp.write_text("\n".join(kept) + "\n")
        # Dated 3 s back: every Postfix program reads this file and would wait
        # until it is a second or two old (see ReferencePostfix.cool_config); the
        # rename makes the new text appear whole.
        past = time.time() - 3
        os.utime(tmp, (past, past))
        os.replace(tmp, main_cf)


def reference_available() -> str | None:
    """None when a reference Postfix can run here, else the reason it cannot."""
    if not os.path.exists(POSTFIX_BIN):
        return f"{POSTFIX_BIN} is not installed"
    if not is_root():
        return "the reference Postfix instance needs root"
    return None


class ReferencePostfix(MtaInstance):
    """An isolated Debian Postfix (3.7) under ``root``, same API as PostwellInstance."""

    kind = "postfix"

    def __init__(self, tmp_path, main_cf_extra: dict | str | None = None,
                 port: int | None = None, name: str = "postfix",
                 master_cf_extra: str = "") -> None:
        super().__init__(Path(tmp_path), name, port)
        self.main_cf_extra = main_cf_extra
        self.master_cf_extra = master_cf_extra
        self.write_config()

    def base_params(self) -> dict[str, str]:
        p = super().base_params()
        p.update({
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file_prefixes": str(self.root),
            "mail_name": "Postfix",
        })
        return p

    def write_config(self) -> None:
        self._write_common()
        (self.config_dir / "main.cf").write_text(
            _render_main_cf(self.base_params(), self.main_cf_extra))
        (self.config_dir / "master.cf").write_text(
            f"127.0.0.1:{self.port} inet n - n - - smtpd\n" + _REF_SERVICES + self.master_cf_extra)
        self.data_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        os.chmod(self.queue_dir, 0o755)
        self.maillog.touch()
        if is_root():
            pf = pwd.getpwnam("postfix")
            os.chown(self.data_dir, pf.pw_uid, pf.pw_gid)
            os.chown(self.maillog, pf.pw_uid, pf.pw_gid)
            register_alternate_config_dir(self.config_dir)

    def postfix(self, *args: str, timeout: float = 60.0, check: bool = False):
        cmd = [POSTFIX_BIN, "-c", str(self.config_dir), *args]
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {cp.returncode}\n"
                                 f"stdout: {cp.stdout}\nstderr: {cp.stderr}\n"
                                 f"log:\n{self.log_text()[-3000:]}")
        return cp

    def run(self, tool: str, *args: str, timeout: float = 60.0, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a reference tool (/usr/sbin/TOOL) with ``-c`` this instance's config."""
        cmd = [f"/usr/sbin/{tool}", "-c", str(self.config_dir), *args]
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                            stdin=None if input is not None else subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {cp.returncode}: {cp.stderr}")
        return cp

    def cool_config(self) -> None:
        """Postfix reads a configuration file or table again and again (300 ms apart)
        until its mtime is at least a second older than the read began: a file the
        test just wrote costs every Postfix program ~2 s (load_file.c).  Clamp the
        mtimes of recently written files under config_dir to 3 s ago; the order of
        any two files' mtimes is kept (no map becomes older than its source)."""
        past = time.time() - 3
        for path in self.config_dir.rglob("*"):
            try:
                st = path.lstat()
                if path.is_file() and not path.is_symlink() and st.st_mtime > past:
                    os.utime(path, (st.st_atime, past))
            except OSError:
                pass

    def start(self, timeout: float = 30.0) -> "ReferencePostfix":
        reason = reference_available()
        if reason:
            import pytest
            pytest.skip(reason)
        self.cool_config()
        self.postfix("check", timeout=timeout)   # creates the queue directories
        self.postfix("start", check=True, timeout=timeout)
        self.running = True
        try:
            wait_banner(self.port, timeout)
        except TimeoutError:
            raise TimeoutError(f"reference Postfix did not answer on port {self.port}; log:\n"
                               f"{self.log_text()[-3000:]}") from None
        return self

    def stop(self, timeout: float = 30.0) -> None:
        pid = self.master_pid()
        if self.running or pid:
            with contextlib.suppress(Exception):
                self.postfix("stop", timeout=timeout)
        if pid:
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: not pid_alive(pid), 10, 0.05, "Postfix master to exit")
            if pid_alive(pid):
                kill_tree(pid)
        # The pid file is gone when someone removed the instance directory under
        # a running master: find it (and daemons it lost) by its MAIL_CONFIG.
        for stray in pids_with_environ("MAIL_CONFIG", str(self.config_dir)):
            kill_tree(stray)
        self.running = False

    def reload(self):
        self.cool_config()
        return self.postfix("reload", check=True)

    def flush(self):
        return self.postfix("flush")


# ---------------------------------------------------------------- raw SMTP dialogue

@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)   # text after "ddd-"/"ddd "

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code of the last line, if any."""
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", self.lines[-1] if self.lines else "")
        return m.group(1) if m else None

    def __str__(self) -> str:
        return "\n".join(f"{self.code}{'-' if i < len(self.lines) - 1 else ' '}{t}"
                         for i, t in enumerate(self.lines))


class SmtpConnection:
    """A blocking line-level SMTP client for raw dialogues (no smtplib niceties)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.closed = False

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self.sock.sendall(data)

    def _line(self) -> bytes | None:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r")

    def reply(self) -> Reply | None:
        """One complete (possibly multi-line) reply, None on EOF/timeout."""
        lines: list[str] = []
        while True:
            raw = self._line()
            if raw is None:
                return Reply(0, lines) if lines else None
            text = raw.decode("utf-8", "replace")
            m = re.match(r"(\d{3})([ -]?)(.*)", text)
            if not m:
                lines.append(text)
                continue
            lines.append(m.group(3))
            if m.group(2) != "-":
                return Reply(int(m.group(1)), lines)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def dialogue(port: int, lines, pipelined: bool = False,
             timeout: float = 10.0, host: str = "127.0.0.1", *, conn=None,
             on_starttls=None) -> list[Reply]:
    """Send raw SMTP lines and return every reply, the banner first.

    Each item of ``lines`` is a line, or a list of lines sent in one write
    (PIPELINING, RFC 2920); ``pipelined=True`` sends everything in one write.
    Replies are read in order, one per command: after a 354 the message lines
    up to the lone "." get no reply of their own, and if DATA was refused the
    would-be message lines are commands, as the server sees them.  A line is
    sent as given plus CRLF unless it already ends in "\\n" (so bare-LF and
    BDAT tests can send exact bytes).  Stops at EOF, timeout, 221 or 421.
    ``conn``: a connected SmtpConnection (subclass) to use instead of a new one;
    ``on_starttls(conn)``: called after a 220 to STARTTLS to shake hands, returns
    False to stop there.
    """
    def wire(line: str) -> bytes:
        return (line if line.endswith("\n") else line + "\r\n").encode("utf-8", "surrogateescape")

    if pipelined:
        groups = [[x for item in lines for x in ([item] if isinstance(item, str) else item)]]
    else:
        groups = [[item] if isinstance(item, str) else list(item) for item in lines]

    if conn is None:
        conn = SmtpConnection(port, host, timeout)
    replies: list[Reply] = []
    try:
        banner = conn.reply()
        if banner is None:
            return replies
        replies.append(banner)
        in_data = False
        for group in groups:
            try:
                conn.send(b"".join(wire(x) for x in group))
            except OSError:
                return replies
            for line in group:
                if in_data:
                    if line.rstrip("\r\n") != ".":
                        continue
                    in_data = False
                r = conn.reply()
                if r is None:
                    return replies
                replies.append(r)
                if r.code == 354:
                    in_data = True
                if r.code in (221, 421):
                    return replies
                if (on_starttls is not None and r.code == 220
                        and line.upper() == "STARTTLS" and not on_starttls(conn)):
                    return replies
        return replies
    finally:
        conn.close()


def start_side_by_side(*instances) -> None:
    """Start instances together (their start-up is most of a parity test's time) and
    wait until each has logged its start-up probe's session, so a dialogue that
    measures where its own log lines begin starts after it."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(instances)) as pool:
        for done in [pool.submit(inst.start) for inst in instances]:
            done.result()
    for inst in instances:
        wait_for(lambda: "]: disconnect from " in inst.log_text(), 10, 0.05,
                 f"{inst.kind} to log the start-up probe")


def run_side_by_side(fn, ref, pw, *args, **kw):
    """(fn(ref, ...), fn(pw, ...)) run at once: most of a side-by-side dialogue is
    waiting (read timeouts, error sleeps, log lines), so the pair takes the time of
    its slower side instead of the sum.  The instances share nothing, and an
    exception of either side is raised here."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(fn, ref, *args, **kw), pool.submit(fn, pw, *args, **kw)
        return a.result(), b.result()


def stop_side_by_side(instances) -> None:
    """Stop and remove instances, several at once."""
    from concurrent.futures import ThreadPoolExecutor

    def finish(inst):
        inst.stop()
        inst.cleanup()
    if instances:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(finish, instances))


@contextlib.contextmanager
def variant_pairs(tmp_path_factory, prefix: str, params_for):
    """``get(variant) -> (reference, postwell)``, a pair started on first use with
    ``params_for(variant)`` as both main.cf's; every pair is stopped on the way out."""
    started: dict[str, tuple] = {}
    made: list = []

    def get(variant: str):
        if variant not in started:
            base = tmp_path_factory.mktemp(f"{prefix}-{variant}")
            params = params_for(variant)
            ref = ReferencePostfix(base, params)
            pw = PostwellInstance(base, params)
            made.extend([ref, pw])
            start_side_by_side(ref, pw)
            started[variant] = (ref, pw)
        return started[variant]
    try:
        yield get
    finally:
        stop_side_by_side(made)


def table_dir(prefix: str, files: dict[str, str]) -> Path:
    """Lookup tables both MTAs read: outside pytest's 0700 basetemp (see test_base_dir),
    so that the unprivileged daemons can, in a 0755 directory, each file 0644."""
    tables = Path(tempfile.mkdtemp(prefix=prefix, dir=test_base_dir()))
    os.chmod(tables, 0o755)
    for name, text in files.items():
        path = tables / name
        path.write_text(text)
        os.chmod(path, 0o644)
    return tables


def normalise(replies: list[Reply]) -> list[tuple[int, str | None]]:
    """Reply codes and enhanced codes only: what must match between the two MTAs."""
    return [(r.code, r.enhanced) for r in replies]


# ---------------------------------------------------------------- smtp-source / smtp-sink

@dataclass
class SourceResult:
    returncode: int
    elapsed: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def count(self) -> int | None:
        """Messages sent, from the running counter ``-c`` prints (None without -c)."""
        nums = re.findall(r"(\d+)", self.stdout)
        return int(nums[-1]) if nums else None


def smtp_source(port: int, sessions: int = 1, messages: int = 1, size: int = 1024,
                extra: list[str] | tuple = (), sender: str = "sender@example.org",
                recipient: str = f"sink@{VIRTUAL_DOMAIN}", timeout: float = 120.0,
                host: str = "127.0.0.1") -> SourceResult:
    """Run /usr/sbin/smtp-source: ``-s sessions -m messages -l size``.

    smtp-source exits non-zero on any unexpected reply; the run is bounded by
    ``timeout`` (the process is killed after it).
    """
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-f", sender, "-t", recipient, *extra, f"{host}:{port}"]
    t0 = time.monotonic()
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return SourceResult(-9, time.monotonic() - t0, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""),
                            f"smtp-source timed out after {timeout}s")
    return SourceResult(cp.returncode, time.monotonic() - t0, cp.stdout, cp.stderr)


class SmtpSink:
    """/usr/sbin/smtp-sink in the background, counting the messages it receives.

    smtp-sink refuses to run as root without ``-u USER``; ``-c`` makes it print a
    running message counter, which :attr:`count` parses.
    """

    def __init__(self, port: int | None = None, backlog: int = 256,
                 extra: list[str] | tuple = (), user: str | None = None) -> None:
        self.port = port or free_port()
        cmd = [SMTP_SINK, "-c"]
        if is_root():
            cmd += ["-u", user or ensure_test_user()]
        cmd += [*extra, f"127.0.0.1:{self.port}", str(backlog)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self._out = b""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_port(self.port, 10)

    def _read(self) -> None:
        while True:
            chunk = self.proc.stdout.read1(4096) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(1)
            if not chunk:
                return
            with self._lock:
                self._out = (self._out + chunk)[-4096:]

    @property
    def count(self) -> int:
        """Messages received so far (smtp-sink -c prints the counter with CR)."""
        with self._lock:
            nums = re.findall(rb"(\d+)", self._out)
        return int(nums[-1]) if nums else 0

    def wait_count(self, n: int, timeout: float = 30.0) -> int:
        return wait_for(lambda: self.count >= n and self.count, timeout, 0.05,
                        f"smtp-sink to receive {n} messages")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def smtp_sink(port: int | None = None, **kw) -> SmtpSink:
    return SmtpSink(port, **kw)


# ---------------------------------------------------------------- message helpers

def make_message(test_id: str, size: int = 512, sender: str = "sender@example.org",
                 recipient: str = f"alice@{VIRTUAL_DOMAIN}") -> bytes:
    """A message whose X-Test-Id names it and X-Body-Sha256 checks its body."""
    line = (test_id + " ").encode() * 8
    body_lines, total = [], 0
    i = 0
    while total < size:
        ln = b"%06d " % i + line[:70]
        body_lines.append(ln)
        total += len(ln) + 2
        i += 1
    body = b"\r\n".join(body_lines) + b"\r\n"
    digest = hashlib.sha256(body).hexdigest()
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: test {test_id}\r\n"
            f"Message-ID: <{test_id}@example.org>\r\nX-Test-Id: {test_id}\r\n"
            f"X-Body-Sha256: {digest}\r\n\r\n").encode()
    return head + body


def check_delivered(path: Path) -> tuple[str | None, bool]:
    """(X-Test-Id, body intact?) of a delivered Maildir file."""
    data = path.read_bytes().replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    m_id = re.search(rb"^X-Test-Id: (\S+)", head, re.M)
    m_sum = re.search(rb"^X-Body-Sha256: ([0-9a-f]+)", head, re.M)
    if not (sep and m_id and m_sum):
        return (m_id.group(1).decode() if m_id else None), False
    digest = hashlib.sha256(body.replace(b"\n", b"\r\n")).hexdigest()
    return m_id.group(1).decode(), digest == m_sum.group(1).decode()


QUEUED_RE = re.compile(r"queued as ([0-9A-Za-z]+)")
# Postfix's cleanup warns when a new queue file's time stamp is ahead of time(): a
# property of the machine's clocks at that instant, never of the dialogue being compared.
POSTFIX_CLOCK_WARNING = re.compile(
    r"postfix/cleanup\[\d+\]: warning: (file system clock is -?\d+ seconds? ahead of local clock"
    r"|resetting file time stamps - this hurts performance)")
