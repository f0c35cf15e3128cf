"""main.cf parsing and the Config object (see config/__init__ for the API).

Syntax, as Postfix reads it (readlline + split_nameval):
- a line whose first non-blank character is '#' is a comment; blank lines are
  skipped; neither ends a logical line;
- a line starting with white space continues the previous logical line (the
  newline is dropped, the leading white space kept);
- a logical line is `name = value`; white space around name and value is
  stripped; a later definition of the same name wins.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field

from .defaults import DEFAULTS

# Machine defaults being computed by this thread: {(id(config), name)}
_computing = threading.local()

DEFAULT_CONFIG_DIR = "/etc/postfix"


class ConfigError(Exception):
    def __init__(self, msg: str, file: str | None = None, line: int | None = None):
        self.file, self.line, self.msg = file, line, msg
        where = f"{file}, line {line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(where + msg)


_LIST_SPLIT = re.compile(r"[\s,]+")


def split_list(text: str) -> list[str]:
    """Split on commas and white space, but not inside {...}, as Postfix does
    for lists of tables ("hash:/a, inline:{ a=b, c=d }" is two items)."""
    if "{" not in text:
        return [x for x in _LIST_SPLIT.split(text) if x]
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        if depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                items.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        items.append("".join(cur))
    return items


@dataclass
class MainEntry:
    """One `name = value` logical line of main.cf (lines are 1-based, inclusive)."""
    name: str
    value: str
    first_line: int
    last_line: int


def iter_logical_lines(text: str, filename: str = "main.cf", warn=None):
    """Yield (first_line, last_line, text) for each logical line.

    A first line that starts with white space has nothing to continue: Postfix
    warns and skips it; `warn(message)` receives that warning.
    """
    current: list | None = None
    stray: list[str] | None = None

    def report_stray():
        # Postfix reads the whole stray logical line (its continuations
        # joined) before it complains, and quotes its first 30 bytes
        raw = "".join(stray).rstrip().encode("utf-8", "surrogateescape")
        shown = raw[:30].decode("utf-8", "surrogateescape") + ("..." if len(raw) > 30 else "")
        warn(f'{filename}: logical line must not start with whitespace: "{shown}"')

    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r") if line.endswith("\r") else line
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if current is None:
                if stray is None:
                    stray = [line]
                else:
                    stray.append(line)
                continue
            current[1] = lineno
            current[2] += line
            continue
        if stray is not None:
            if warn:
                report_stray()
            stray = None
        if current is not None:
            yield tuple(current)
        current = [lineno, lineno, line]
    if stray is not None and warn:
        report_stray()
    if current is not None:
        yield tuple(current)


def split_name_value(line: str, filename: str, lineno: int) -> tuple[str, str]:
    stripped = line.strip()
    m = re.match(r"[^\s=]*", stripped)
    name = m.group()
    rest = stripped[m.end():].lstrip()
    if not name:
        raise ConfigError(f'missing attribute name: "{stripped}"', filename, lineno)
    if not rest.startswith("="):
        raise ConfigError(f"missing '=' after attribute name: \"{stripped}\"", filename, lineno)
    return name, rest[1:].strip()


def parse_main_cf_entries(text: str, filename: str = "main.cf", warn=None) -> list[MainEntry]:
    entries = []
    for first, last, line in iter_logical_lines(text, filename, warn):
        name, value = split_name_value(line, filename, first)
        entries.append(MainEntry(name, value, first, last))
    return entries


def parse_main_cf(text: str, filename: str = "main.cf", warn=None) -> dict[str, str]:
    """Parse main.cf text into {name: raw value}; later definitions win."""
    return {e.name: e.value for e in parse_main_cf_entries(text, filename, warn)}


def _service_param_default(name: str, services) -> str | None:
    """Per-transport parameters Postfix derives from master.cf service names."""
    from .registry import service_parameter_default
    return service_parameter_default(name, services)


_UNCACHED = frozenset({"process_id"})


class Params(dict):
    """A dict that counts its changes, so Config can cache expanded values
    and still see an edit made after the fact (tests poke cfg.params)."""
    version = 0

    def _bump(self):
        self.version += 1

    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        self._bump()

    def __delitem__(self, k):
        super().__delitem__(k)
        self._bump()

    def update(self, *a, **kw):
        super().update(*a, **kw)
        self._bump()

    def pop(self, *a):
        self._bump()
        return super().pop(*a)

    def popitem(self):
        self._bump()
        return super().popitem()

    def clear(self):
        super().clear()
        self._bump()

    def setdefault(self, k, v=None):
        self._bump()
        return super().setdefault(k, v)


_MACHINE_NAMES = frozenset({"myhostname", "mydomain", "mynetworks", "process_id", "process_name"})

# Parameters Postfix never expands when reading the configuration: their
# $names are per-message macros expanded at use time (postconf -x leaves them).
RAW_PARAMETERS = frozenset({
    "default_rbl_reply", "forward_path", "luser_relay", "mailbox_command",
    "postscreen_expansion_filter", "postscreen_reject_footer",
    "smtpd_expansion_filter", "smtpd_reject_footer",
})


@dataclass
class Config:
    config_dir: str
    params: dict[str, str]
    overrides: dict[str, str]
    services: list
    main_cf_path: str | None = None
    param_lines: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- raw values --------------------------------------------------------
    def raw(self, name: str) -> str | None:
        if name in self.overrides:
            return self.overrides[name]
        if name in self.params:
            return self.params[name]
        machine = self._machine_default(name)
        if machine is not None:
            return machine
        value = DEFAULTS.get(name)
        if value is None and "_" in name:
            value = _service_param_default(name, self.services)
        return value

    def default(self, name: str) -> str | None:
        """The default value (as `postconf -d` prints it), ignoring main.cf."""
        machine = self._machine_default(name, defaults_only=True)
        if machine is not None:
            return machine
        value = DEFAULTS.get(name)
        if value is None and "_" in name:
            value = _service_param_default(name, self.services)
        return value

    def _machine_default(self, name: str, defaults_only: bool = False) -> str | None:
        if name not in _MACHINE_NAMES:
            return None
        from . import machine
        if name == "process_id":
            return str(os.getpid())
        if name == "process_name":
            return machine.process_name()
        base = Config(self.config_dir, {}, {}, self.services) if defaults_only else self
        inputs = {"myhostname": ("mydomain",), "mydomain": ("myhostname",),
                  "mynetworks": ("mynetworks_style", "inet_interfaces", "inet_protocols",
                                 "compatibility_level")}[name]
        key = ("machine", name, defaults_only) + tuple(
            (base.params.get(i), base.overrides.get(i)) for i in inputs)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # myhostname and mydomain default to each other: "myhostname = $mydomain" with
        # mydomain unset must end (Postfix prints mydomain = localdomain), not recurse.
        # The guard is per thread: another thread computing the same default at
        # the same moment is not a recursion (it got the fallback, and the
        # cache kept "localdomain" for good).
        busy = _computing.__dict__.setdefault("names", set())
        mark = (id(self), name)
        if mark in busy:
            return "localdomain" if name == "mydomain" else machine.default_myhostname(None)
        busy.add(mark)
        try:
            value = self._compute_machine_default(name, base, machine)
        finally:
            busy.discard(mark)
        self._cache[key] = value
        return value

    def _compute_machine_default(self, name: str, base: "Config", machine) -> str:
        if name == "myhostname":
            mydomain = base.get("mydomain") if base.is_set("mydomain") else None
            value = machine.default_myhostname(mydomain)
        elif name == "mydomain":
            value = machine.default_mydomain(base.get("myhostname"))
        else:
            try:
                value = machine.compute_mynetworks(base.get("mynetworks_style"),
                                                   base.get("inet_interfaces"),
                                                   base.get("inet_protocols"))
            except ValueError as e:
                raise ConfigError(str(e), self.main_cf_path) from None
        return value

    def is_set(self, name: str) -> bool:
        return name in self.overrides or name in self.params

    def is_known(self, name: str) -> bool:
        return self.default(name) is not None

    # ---- expanded values ---------------------------------------------------
    def _cache_valid(self) -> bool:
        """Expanded values are cached only while both dicts are change-counting
        and unchanged; a Config built on plain dicts always recomputes."""
        p, o = self.params, self.overrides
        if not (isinstance(p, Params) and isinstance(o, Params)):
            return False
        stamp = (id(p), p.version, id(o), o.version)
        if self._cache.get("__stamp__") != stamp:
            self._cache.clear()
            self._cache["__stamp__"] = stamp
        return True

    def get(self, name: str) -> str:
        cacheable = self._cache_valid() and name not in _UNCACHED
        if cacheable and name in self._cache:
            return self._cache[name]
        value = self.raw(name)
        if value is None:
            result = ""
        elif name in RAW_PARAMETERS:
            result = value
        else:
            try:
                result = self.expand(value)
            except ConfigError as e:
                raise self._error(name, e.msg) from None
        if cacheable:
            self._cache[name] = result
        return result

    def expand(self, value: str, _depth: int = 0, undefined=None) -> str:
        from .expand import ExpandError, expand
        try:
            return expand(value, self.raw, _depth, undefined)
        except ExpandError as e:
            raise ConfigError(str(e), self.main_cf_path) from None

    # ---- typed accessors (Postfix's conversion rules and messages) ---------
    def _error(self, name: str, msg: str) -> ConfigError:
        """A ConfigError pointing at where `name` was set (main.cf line, master.cf)."""
        if name in self.overrides:
            master = os.path.join(self.config_dir, "master.cf")
            return ConfigError(msg, master)
        if name in self.params:
            return ConfigError(msg, self.main_cf_path, self.param_lines.get(name))
        return ConfigError(msg, self.main_cf_path)

    def get_int(self, name: str) -> int:
        text = self.get(name).strip()
        if not re.fullmatch(r"-?\d+", text):
            raise self._error(name, f"bad numerical configuration: {name} = {text}")
        return int(text)

    def get_bool(self, name: str) -> bool:
        text = self.get(name).strip().lower()
        if text == "yes":
            return True
        if text == "no":
            return False
        raise self._error(name, f"bad boolean configuration: {name} = {self.get(name)}")

    def get_time(self, name: str, default_unit: str | None = None) -> float:
        """Seconds.  A bare number takes the parameter's own default unit (the
        unit of its Postfix default, e.g. days for maximal_queue_lifetime)."""
        from .units import default_time_unit, parse_time
        unit = default_unit or default_time_unit(self.default(name) or "", self) or "s"
        text = self.get(name)
        try:
            return parse_time(text, unit)
        except ValueError:
            raise self._error(name, f"parameter {name}: bad time value or unit: {text}") from None

    def get_size(self, name: str) -> int:
        text = self.get(name).strip()
        if not re.fullmatch(r"\d+", text):
            raise self._error(name, f"bad numerical configuration: {name} = {text}")
        return int(text)

    def get_list(self, name: str) -> list[str]:
        return split_list(self.get(name))

    # ---- master.cf -o overrides ---------------------------------------------
    def override(self, overrides: dict[str, str]) -> "Config":
        merged = Params(self.overrides)
        merged.update(overrides)
        return Config(self.config_dir, self.params, merged, self.services,
                      self.main_cf_path, self.param_lines, self.warnings)

    def for_service(self, service) -> "Config":
        """The configuration a daemon of this master.cf service sees: the
        service's -o overrides, $service_name (the master.cf name) and
        $process_name (the command, e.g. "smtpd", as Postfix logs it)."""
        extra = {"service_name": service.name, "process_name": service.command}
        extra.update(service.overrides)
        return self.override(extra)


def config_dir_from_env(config_dir: str | None = None) -> str:
    return config_dir or os.environ.get("MAIL_CONFIG") or DEFAULT_CONFIG_DIR


def load_config(config_dir: str | None = None, *, read_master: bool = True) -> Config:
    explicit = bool(config_dir or os.environ.get("MAIL_CONFIG"))
    config_dir = config_dir_from_env(config_dir)
    path = os.path.join(config_dir, "main.cf")
    warnings: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            entries = parse_main_cf_entries(f.read(), path, warnings.append)
    except FileNotFoundError:
        raise ConfigError(f"open {path}: No such file or directory") from None
    except PermissionError:
        raise ConfigError(f"open {path}: Permission denied") from None
    params = Params((e.name, e.value) for e in entries)
    lines = {e.name: e.first_line for e in entries}
    if explicit:
        params.setdefault("config_directory", config_dir)
    services: list = []
    master_path = os.path.join(config_dir, "master.cf")
    if read_master:
        from .master import parse_master_cf
        try:
            with open(master_path, encoding="utf-8", errors="surrogateescape") as f:
                master_text = f.read()
        except FileNotFoundError:
            warnings.append(f"open {master_path}: No such file or directory")
        except PermissionError:
            raise ConfigError(f"open {master_path}: Permission denied") from None
        else:
            services = parse_master_cf(master_text, master_path, warnings.append)
    return Config(config_dir, params, Params(), services, path, lines, warnings)
