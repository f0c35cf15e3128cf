"""main.cf parsing and parameter expansion (minimal core; see config/__init__)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .defaults import DEFAULTS

DEFAULT_CONFIG_DIR = "/etc/postfix"


class ConfigError(Exception):
    def __init__(self, msg: str, file: str | None = None, line: int | None = None):
        self.file, self.line, self.msg = file, line, msg
        where = f"{file}, line {line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(where + msg)


_LIST_SPLIT = re.compile(r"[\s,]+")


def parse_main_cf(text: str, filename: str = "main.cf") -> dict[str, str]:
    """Parse main.cf text: comments, name = value, continuation lines."""
    params: dict[str, str] = {}
    logical: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not logical:
                raise ConfigError("continuation line without a preceding parameter", filename, lineno)
            start, prev = logical[-1]
            logical[-1] = (start, prev + " " + line.strip())
            continue
        logical.append((lineno, line.strip()))
    for lineno, line in logical:
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise ConfigError(f"missing '=' after attribute name: \"{name or line}\"", filename, lineno)
        params[name] = value.strip()
    return params


@dataclass
class Config:
    config_dir: str
    params: dict[str, str]
    overrides: dict[str, str]
    services: list

    def raw(self, name: str) -> str | None:
        if name in self.overrides:
            return self.overrides[name]
        if name in self.params:
            return self.params[name]
        return DEFAULTS.get(name)

    def is_set(self, name: str) -> bool:
        return name in self.overrides or name in self.params

    def get(self, name: str) -> str:
        value = self.raw(name)
        if value is None:
            return ""
        return self.expand(value)

    def expand(self, value: str, _depth: int = 0) -> str:
        from .expand import expand
        return expand(value, self.raw, _depth)

    def get_int(self, name: str) -> int:
        return int(self.get(name) or 0)

    def get_bool(self, name: str) -> bool:
        return self.get(name).strip().lower() in ("yes", "true", "1", "on")

    def get_time(self, name: str, default_unit: str = "s") -> float:
        from .units import parse_time
        return parse_time(self.get(name), default_unit)

    def get_size(self, name: str) -> int:
        return self.get_int(name)

    def get_list(self, name: str) -> list[str]:
        return [x for x in _LIST_SPLIT.split(self.get(name)) if x]

    def override(self, overrides: dict[str, str]) -> "Config":
        merged = dict(self.overrides)
        merged.update(overrides)
        return Config(self.config_dir, self.params, merged, self.services)


def load_config(config_dir: str | None = None) -> Config:
    config_dir = config_dir or os.environ.get("MAIL_CONFIG") or DEFAULT_CONFIG_DIR
    path = os.path.join(config_dir, "main.cf")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            params = parse_main_cf(f.read(), path)
    except FileNotFoundError:
        raise ConfigError("open main.cf: No such file or directory", path) from None
    params.setdefault("config_directory", config_dir)
    services: list = []
    master_path = os.path.join(config_dir, "master.cf")
    if os.path.exists(master_path):
        from .master import parse_master_cf
        with open(master_path, encoding="utf-8", errors="surrogateescape") as f:
            services = parse_master_cf(f.read(), master_path)
    return Config(config_dir, params, {}, services)
