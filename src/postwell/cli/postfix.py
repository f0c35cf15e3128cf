"""postfix(1) / postwell: start, stop, reload, status, check, start-fg, abort, flush,
logrotate, set-permissions, upgrade-configuration; demo.

Usage: postwell [-c config_dir] [-v] command
"""

from __future__ import annotations

import os
import signal
import sys
import time

PROG = "postfix"
SCRIPT = "postfix/postfix-script"
STOP_WAIT_SECONDS = 90.0
START_WAIT_SECONDS = 60.0


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _maillog(config, service: str, level: str, text: str) -> None:
    """One maillog line (best effort); without a configuration, the system
    logger, as Postfix does before it has read main.cf."""
    try:
        from postwell.log import MailLog
        log = MailLog.from_config(config, service) if config is not None else MailLog(service)
        getattr(log, level)(text)
        log.close()
    except Exception:
        pass


# main.cf's "overriding earlier entry" warnings: every Postfix program that
# reads main.cf says them on a terminal (postfix(1) once, postlog(1) once per
# postfix-script message).
_CONF_WARNINGS: list[str] = []


def _script_log(config, text: str, level: str = "info") -> None:
    """A postfix-script message.  Postfix runs postlog(1), which always logs
    and copies the line to stderr only when stderr is a terminal (postlog.c
    isatty(2)): under an init system or a pipe, the maillog alone has it."""
    _maillog(config, "postfix-script", level, text)
    if _stderr_is_tty():
        prefix = "" if level == "info" else f"{level}: "
        for w in _CONF_WARNINGS:
            sys.stderr.write(f"postfix/postlog: warning: {w}\n")
        sys.stderr.write(f"{SCRIPT}: {prefix}{text}\n")


def _script_fatal(config, text: str) -> int:
    """postfix-script's $FATAL."""
    _script_log(config, text, "fatal")
    return 1


def _fatal(text: str, config=None) -> int:
    """postfix(1)'s own msg_fatal(): logged as "postfix", and on stderr only
    when it is a terminal (postfix.c sets up msg_vstream only for a tty)."""
    _maillog(config, "", "fatal", text)
    if _stderr_is_tty():
        sys.stderr.write(f"{PROG}: fatal: {text}\n")
    return 1


def _warn(text: str) -> None:
    """postfix(1)'s own msg_warn() before it has its log: the system logger, and
    stderr when it is a terminal."""
    _maillog(None, "", "warning", text)
    if _stderr_is_tty():
        sys.stderr.write(f"{PROG}: warning: {text}\n")


def _parameter_check(config_dir: str) -> int:
    """What postfix(1) dies of while it reads main.cf, whatever the command (Postfix's
    mail_params_init): logged as Postfix does at that point, before maillog_file is
    set up (system logger, terminal)."""
    try:
        from postwell.config import load_config
        from postwell.master.check import parameter_fatal
        cfg = load_config(config_dir, read_master=False)
    except Exception:
        return 0        # the command reports an unreadable configuration itself
    fatal = parameter_fatal(cfg, _warn)
    return _fatal(fatal) if fatal else 0


class _Postconf:
    """The postconf(1) runs postfix-script (and the post-install script it
    starts) makes, run in-process: their stderr is what Postfix's commands
    print whatever stderr is (postconf always writes its warnings there), with
    the program named as postfix-script calls it, $command_directory/postconf.
    Each kind of run is made once per command and its words repeated as often
    as Postfix's scripts run it (the files do not change in between)."""

    def __init__(self, config_dir: str):
        self.config_dir = config_dir
        self._runs: dict[tuple, tuple[int, str]] = {}
        self.cfg = None
        self.command_directory = "/usr/sbin"
        try:
            from postwell.config import load_config
            self.cfg = load_config(config_dir, read_master=False)
            self.command_directory = self.cfg.get("command_directory") or "/usr/sbin"
        except Exception:
            pass

    def run(self, *args: str) -> tuple[int, str]:
        if args not in self._runs:
            import io
            from postwell.cli import postconf
            err = io.StringIO()
            try:
                rc = postconf.main(list(args), stdout=io.StringIO(), stderr=err)
            except Exception:
                rc = 1
            prefix = f"{postconf.PROG}: "
            named = f"{self.command_directory}/postconf: "
            text = "".join(named + line[len(prefix):] if line.startswith(prefix) else line
                           for line in err.getvalue().splitlines(True))
            self._runs[args] = (rc, text)
        return self._runs[args]

    def defaults_run(self) -> str:
        """`postconf -dh config_directory` (and post-install's -d runs): master.cf
        is read, main.cf is not."""
        return self.run("-dh", "config_directory")[1]

    def full_run(self) -> str:
        """`postconf -h NAME`: main.cf and master.cf, unused-parameter warnings."""
        return self.run("-h", "maillog_file")[1]

    def postsuper_warnings(self) -> str:
        """What postsuper(1) says on stderr as it reads main.cf."""
        try:
            from postwell.cli.postconf import override_warnings
            words = override_warnings(os.path.join(self.config_dir, "main.cf"), with_syntax=True)
        except Exception:
            return ""
        return "".join(f"postsuper: warning: {w}\n" for w in words)

    def post_install_noise(self) -> str:
        """stderr of postfix-script's check-fatal up to its master.cf test (Postfix
        3.7, Debian): its own first postconf run and post-install's (two read
        master.cf only, fifteen main.cf too)."""
        return self.defaults_run() * 3 + self.full_run() * 15

    def check_fatal_rest(self) -> str:
        """... and after it: the maillog_file postconf run, postsuper's scan, and
        the check-warn postfix-script's first postconf run."""
        return self.full_run() + self.postsuper_warnings() + self.defaults_run()


_POSTCONF: list = []


def _postconf(config_dir: str) -> _Postconf:
    if not _POSTCONF or _POSTCONF[0].config_dir != config_dir:
        _POSTCONF[:] = [_Postconf(config_dir)]
    return _POSTCONF[0]


def _postconf_check(config_dir: str) -> int:
    """postfix-script's first `postconf -dh config_directory`: its warnings on
    stderr (whatever stderr is); a master.cf that postconf cannot parse stops
    every command, with postconf's own fatal message on stderr and
    postfix-script's in the log."""
    pc = _postconf(config_dir)
    if pc.cfg is None:
        return 0        # no main.cf: postfix(1) dies of it before postfix-script runs
    rc, err = pc.run("-dh", "config_directory")
    sys.stderr.write(err)
    if rc:
        return _script_fatal(pc.cfg, f"cannot execute {pc.command_directory}/postconf!")
    return 0


def _load(config_dir):
    # postconf's view of master.cf: what only the master or one daemon would
    # die of does not stop postfix(1) (Postfix's commands read it with postconf)
    from postwell.master.startup import MasterError, load
    try:
        return load(config_dir, lenient=True), None
    except MasterError as exc:
        return None, str(exc)


def cmd_check(config_dir: str, quiet: bool = False, starting: bool = False) -> int:
    from postwell.master.check import run_check
    cfg, err = _load(config_dir)
    if cfg is None:
        return _fatal(err)
    fatal, warnings = run_check(config_dir)
    if fatal:
        return _fatal(fatal, cfg)
    pc = _postconf(config_dir)
    sys.stderr.write(pc.post_install_noise())
    master_cf = os.path.join(cfg.config_dir, "master.cf")
    if not os.path.isfile(master_cf):
        _script_fatal(cfg, f"no {master_cf} file found")
        if starting:
            _script_fatal(cfg, "Postfix integrity check failed!")
        return 1
    sys.stderr.write(pc.check_fatal_rest())
    # postfix-script check-warn reports each finding through $WARN (postlog).
    for w in warnings if not quiet else ():
        _script_log(cfg, w, "warning")
    return 0


def cmd_status(config_dir: str) -> int:
    from postwell.master.startup import read_running_pid
    cfg, err = _load(config_dir)
    if cfg is None:
        return _fatal(err)
    pid = read_running_pid(cfg)
    if pid:
        _script_log(cfg, f"the Postfix mail system is running: PID: {pid}")
        return 0
    _script_log(cfg, "the Postfix mail system is not running")
    return 1


def cmd_start(config_dir: str) -> int:
    from postwell.master.daemon import Master, read_running_pid
    cfg, err = _load(config_dir)
    if cfg is None:
        return _fatal(err)
    # postfix-script asks "master -t" before its checks
    if read_running_pid(cfg):
        return _script_fatal(cfg, "the Postfix mail system is already running")
    rc = cmd_check(config_dir, starting=True)
    if rc:
        return rc
    _script_log(cfg, "starting the Postfix mail system")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - daemon side
        try:
            os.close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            if null > 2:
                os.close(null)
            code = Master(os.path.abspath(config_dir), ready_fd=w).run()
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    data = b""
    deadline = time.monotonic() + START_WAIT_SECONDS
    import select
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], 1.0)
        if ready:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n"):
                break
    os.close(r)
    text = data.decode(errors="replace").strip()
    if text == "ok":
        return 0
    if text.startswith("fatal: "):
        text = text[len("fatal: "):]
    if text == "the Postfix mail system is already running":
        return _script_fatal(cfg, text)
    # As postfix-script after "master -w" failed: the master logged its reason.
    return _script_fatal(cfg, "mail system startup failed")


def cmd_start_fg(config_dir: str) -> int:
    from postwell.master.daemon import Master, read_running_pid
    cfg, err = _load(config_dir)
    if cfg is None:
        return _fatal(err)
    if read_running_pid(cfg):
        return _script_fatal(cfg, "the Postfix mail system is already running")
    rc = cmd_check(config_dir, starting=True)
    if rc:
        return rc
    _script_log(cfg, "starting the Postfix mail system")
    r, w = os.pipe()
    master = Master(os.path.abspath(config_dir), ready_fd=w)
    code = master.run()
    try:
        data = os.read(r, 4096).decode(errors="replace").strip()
    except OSError:
        data = ""
    os.close(r)
    if code and data.startswith("fatal: "):
        return _script_fatal(cfg, "mail system startup failed")
    return code


def _signal_master(config_dir: str, sig, verb: str, before=None) -> tuple[int, object, int | None]:
    from postwell.master.startup import read_running_pid
    cfg, err = _load(config_dir)
    if cfg is None:
        return _fatal(err), None, None
    pid = read_running_pid(cfg)
    if not pid:
        return _script_fatal(cfg, "the Postfix mail system is not running"), cfg, None
    if verb:
        _script_log(cfg, verb)
    if before is not None:
        before()
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return _script_fatal(cfg, "the Postfix mail system is not running"), cfg, None
    return 0, cfg, pid


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold any byte.
    return stat[stat.rfind(b")") + 2:][:1] == b"Z"


def _wait_gone(cfg, pid: int, limit: float) -> bool:
    from postwell.master.startup import read_running_pid
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if read_running_pid(cfg) != pid:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return True
            if _is_zombie(pid):
                return True     # exited; only its (foreign) parent has not reaped it yet
            # pid file released; the process is in its last moments
        time.sleep(0.05)
    return False


def cmd_stop(config_dir: str) -> int:
    rc, cfg, pid = _signal_master(config_dir, signal.SIGTERM, "stopping the Postfix mail system")
    if rc:
        return rc
    if not _wait_gone(cfg, pid, STOP_WAIT_SECONDS):
        return _fatal("timed out waiting for the Postfix mail system to stop", cfg)
    return 0


def cmd_abort(config_dir: str) -> int:
    rc, cfg, pid = _signal_master(config_dir, signal.SIGQUIT, "aborting the Postfix mail system")
    if rc:
        return rc
    if not _wait_gone(cfg, pid, 10):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return 0


def cmd_reload(config_dir: str) -> int:
    """postfix-script's reload: no check at all (a master.cf postconf could not
    read has stopped it already); "postsuper active" before the HUP and a
    postsuper run after it, each with its main.cf warnings.  The master reads
    the files again and dies, as Postfix's, of what would stop a start."""
    pc = _postconf(config_dir)
    rc, _, _ = _signal_master(config_dir, signal.SIGHUP, "refreshing the Postfix mail system",
                              before=lambda: sys.stderr.write(pc.postsuper_warnings()))
    if rc == 0:
        sys.stderr.write(pc.postsuper_warnings())
    return rc


def cmd_flush(config_dir: str) -> int:
    # postfix-script runs "postqueue -f": its words and exit status.
    from postwell.cli import postqueue
    return postqueue.main(["-c", config_dir, "-f"])


def _admin_config(config_dir: str):
    try:
        from postwell.config import load_config
        return load_config(config_dir, read_master=False), None
    except Exception as exc:   # noqa: BLE001 - reported as the other commands do
        return None, str(exc)


def cmd_logrotate(config_dir: str, args: list[str]) -> int:
    """postfix-script's logrotate (see master/admin.py)."""
    from postwell.master import admin
    from postwell.master.startup import read_running_pid
    cfg, err = _admin_config(config_dir)
    if cfg is None:
        return _fatal(err)
    pc = _postconf(config_dir)
    return admin.logrotate(cfg, args, fatal=_fatal, script_fatal=_script_fatal,
                           running_pid=read_running_pid,
                           postconf_run=lambda name: sys.stderr.write(pc.run("-h", name)[1]))


def cmd_post_install(config_dir: str, args: list[str]) -> int:
    """set-permissions / upgrade-configuration: Postfix's post-install
    create-missing COMMAND [name=value ...], for postwell's layout."""
    from postwell.master import admin
    cfg, err = _admin_config(config_dir)
    if cfg is None:
        return _fatal(err)
    return admin.post_install(cfg, args)


# Commands that take the rest of the command line (postfix-script gets "$@").
ARG_COMMANDS = {
    "logrotate": cmd_logrotate,
    "set-permissions": cmd_post_install,
    "upgrade-configuration": cmd_post_install,
}

COMMANDS = {
    "start": cmd_start, "stop": cmd_stop, "reload": cmd_reload, "status": cmd_status,
    "check": cmd_check, "start-fg": cmd_start_fg, "abort": cmd_abort, "flush": cmd_flush,
}


def _bad_option(word: str) -> int:
    """glibc getopt's words for postfix(1)'s "c:Dv", then Postfix's usage,
    which msg_fatal() shows only on a terminal (main.cf is not read yet)."""
    k = 1
    while k < len(word) and word[k] in "Dv":
        k += 1
    if word[k] == "c":
        sys.stderr.write(f"{PROG}: option requires an argument -- 'c'\n")
    else:
        sys.stderr.write(f"{PROG}: invalid option -- '{word[k]}'\n")
    if _stderr_is_tty():
        sys.stderr.write(f"{PROG}: fatal: usage: {PROG} [-c config_dir] [-Dv] command\n")
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config_dir = os.environ.get("MAIL_CONFIG") or "/etc/postfix"
    args = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-c" and i + 1 < len(argv):
            config_dir = argv[i + 1]
            i += 2
            continue
        if a.startswith("-c") and len(a) > 2:
            config_dir = a[2:]
        elif a in ("-v", "-D"):
            pass
        elif a == "--" and not args:
            args.extend(argv[i + 1:])
            break
        elif a.startswith("-") and len(a) > 1 and not args:
            return _bad_option(a)
        else:
            args.append(a)
        i += 1
    if not args:
        args = [""]   # postfix-script gets an empty command, as in Postfix
    if args[0] == "demo":
        from postwell.demo import main as demo_main
        return demo_main(args[1:])
    if _stderr_is_tty():
        from postwell.cli.postconf import override_warnings
        _CONF_WARNINGS[:] = override_warnings(os.path.join(config_dir, "main.cf"))
        for w in _CONF_WARNINGS:
            sys.stderr.write(f"{PROG}: warning: {w}\n")
    os.environ["MAIL_CONFIG"] = config_dir
    try:
        # postfix(1) checks main.cf, then postfix-script runs postconf (which
        # reads master.cf) before it looks at the command.
        rc = _parameter_check(config_dir) or _postconf_check(config_dir)
        if rc:
            return rc
        if args[0] in ARG_COMMANDS:
            return ARG_COMMANDS[args[0]](config_dir, args)
        cmd = COMMANDS.get(args[0])
        if cmd is None:
            try:
                from postwell.config import load_config
                cfg = load_config(config_dir, read_master=False)
            except Exception:
                cfg = None
            return _script_fatal(cfg, f"unknown command: '{args[0]}'. Usage: postfix start (or stop, "
                                      "reload, abort, flush, check, status, set-permissions, "
                                      "upgrade-configuration, logrotate)")
        return cmd(config_dir)
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
