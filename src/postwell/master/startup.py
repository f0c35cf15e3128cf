"""What postfix(1) needs before it knows that it will run a master: the
configuration as the master reads it (load) and the master's pid file, without
loading the master itself (`postfix status` and `stop` in every test: CLI
start-up)."""

from __future__ import annotations

import fcntl
import os


def pid_path(config) -> str:
    return os.path.join(config.get("queue_directory"), config.get("process_id_directory") or "pid",
                        "master.pid")


def read_running_pid(config) -> int | None:
    """The live master's pid, or None (stale files don't count)."""
    path = pid_path(config)
    try:
        fd = os.open(path, os.O_RDONLY)   # read-only: unprivileged users may ask too
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass   # locked: a master holds it
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        try:
            pid = int(os.read(fd, 64).strip() or 0)
        except ValueError:
            return None
        if pid <= 0:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid
    finally:
        os.close(fd)


class MasterError(Exception):
    """Fatal start-up problem; the text is what follows "fatal: ".  line: the
    master.cf line it is about (where Postfix's master logs it depends on it)."""

    def __init__(self, text: str, line: int | None = None):
        super().__init__(text)
        self.line = line


def load(config_dir: str, *, lenient: bool = False):
    """main.cf and master.cf as the master reads them: master.cf's fields and
    braces strictly (an error stops the master), a malformed `-o` only noted in
    the service's option_errors (only that daemon dies of it, when started).
    lenient: postconf's reading (an unclosed '{' is a warning), as `postfix
    check` sees master.cf: Postfix's check runs postconf, never the master's
    parser."""
    from postwell.config import ConfigError, load_config
    from postwell.config.master import parse_master_cf, read_master_text
    try:
        cfg = load_config(config_dir, read_master=False)
        path = os.path.join(cfg.config_dir, "master.cf")
        text = read_master_text(cfg)
        if text is None:
            return cfg
        cfg.services[:] = parse_master_cf(text, path, None, strict=not lenient,
                                          strict_options=False)
        if not lenient:
            from .services import inet_entry_error
            for svc in cfg.services:
                problem = inet_entry_error(svc) if svc.type == "inet" else None
                if problem is not None:
                    raise MasterError(f"{path}: line {svc.line}: {problem}", svc.line)
        return cfg
    except ConfigError as exc:
        at = exc.line if exc.file and os.path.basename(exc.file) == "master.cf" else None
        raise MasterError(master_cf_wording(exc), at) from None


def master_cf_wording(exc) -> str:
    """A master.cf error in the words of Postfix's master (master_ent.c
    fatal_with_context: "FILE: line N: text")."""
    if exc.file and os.path.basename(exc.file) == "master.cf" and exc.line:
        return f"{exc.file}: line {exc.line}: {exc.msg}"
    return str(exc)
