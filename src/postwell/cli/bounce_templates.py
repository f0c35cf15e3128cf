"""Bounce templates as bounce(5) describes them: `postconf -t` and `postconf -b`.

The built-in templates are the texts postwell's notices carry
(``postwell.dsn.notice.TEMPLATES``, Postfix's own words); Postfix's
``Charset`` and ``From`` labels and its verify template complete them so
`postconf -t` prints what Postfix 3.7 prints.  A template file
(``bounce_template_file`` or the file named on the command line) replaces
templates one by one, as Postfix's bounce daemon reads it: ``name = <<EOF``
... ``EOF`` entries, header labels first (missing ones keep the built-in
value), then the text, whose ``$name`` expressions `postconf -b` expands.

The notices themselves (``dsn/notice.py`` notice_templates) read
``bounce_template_file`` through the same parser.

Diagnostics are reported as Postfix's bounce template code words them, under
the program name ``postfix/bounce``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

PROG = "postfix/bounce"
NAMES = ("failure_template", "delay_template", "success_template", "verify_template")
MAX_FILE = 1024 * 1024          # a template file is a few KB; bounded read

_SENDER = "Mail Delivery System <MAILER-DAEMON>"
_VERIFY_TEXT = [
    "This is the mail system at host $myhostname.",
    "",
    "Enclosed is the mail delivery report that you requested.",
    "",
    "                   The mail system",
]
# bounce(5): the time parameters that take a unit suffix in template text.
_TIME_PARAMS = ("delay_warning_time", "maximal_queue_lifetime")
_UNITS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400, "weeks": 604800}
_HEADER = re.compile(r"^([\x21-\x39\x3b-\x7e]+):[ \t]*(.*)$")
_EXPR = re.compile(r"\$(?:\{([^}]*)\}|\(([^)]*)\)|(\w+)|(\$))")


class TemplateError(Exception):
    """A fatal problem (Postfix's bounce code stops): the text after "fatal: "."""


@dataclass(frozen=True)
class BounceTemplate:
    name: str                      # "failure_template", ...
    charset: str
    sender: str                    # From:
    subject: str
    postmaster_subject: str | None
    text: tuple[str, ...]

    @property
    def kind(self) -> str:         # "failure", as Postfix names it in messages
        return self.name[: -len("_template")]


def builtin_templates() -> dict[str, BounceTemplate]:
    from postwell.dsn.notice import DELAY, FAILURE, SUCCESS, TEMPLATES
    out = {}
    for name, kind in (("failure_template", FAILURE), ("delay_template", DELAY),
                       ("success_template", SUCCESS)):
        subject, pm_subject, text = TEMPLATES[kind]
        # The success report has no postmaster copy, so Postfix gives it no label.
        out[name] = BounceTemplate(name, "us-ascii", _SENDER, subject,
                                   pm_subject if kind != SUCCESS else None, tuple(text))
    out["verify_template"] = BounceTemplate("verify_template", "us-ascii", _SENDER,
                                            "Mail Delivery Status Report", None,
                                            tuple(_VERIFY_TEXT))
    return out


def _entries(text: str, path: str):
    """(name, lines, next line number) per entry of a main.cf-style file
    with here-documents; comments and blank lines between entries skipped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name or any(c.isspace() for c in name):
            raise TemplateError(f"{path}, line {i + 1}: missing '=' after attribute name: "
                                f'"{line.strip()}"')
        if value.startswith("<<"):
            marker = value[2:].strip()
            body = []
            while i < len(lines) and lines[i] != marker:
                body.append(lines[i])
                i += 1
            i += 1   # the end marker
            yield name, body, i + 1
        else:
            yield name, [value], i + 1


def _parse(name: str, body: list[str], default: BounceTemplate, path: str,
           warn: Callable[[str], None]) -> BounceTemplate:
    kind = name[: -len("_template")]
    values = {"charset": default.charset, "from": default.sender, "subject": default.subject,
              "postmaster-subject": default.postmaster_subject}
    i = 0
    if body and body[0] == "":
        i = 1                                   # no header labels at all
    elif body and _HEADER.match(body[0]):
        while i < len(body) and body[i] != "":
            m = _HEADER.match(body[i])
            label = m.group(1) if m else body[i]
            if not m or label.lower() not in values:
                warn(f'{path}: unknown "{label}" header label in {kind} template '
                     "-- ignoring this template")
                return default
            if label.lower() == "postmaster-subject" and default.postmaster_subject is None:
                warn(f'{path}: inapplicable "{label}" header label in {kind} template '
                     "-- ignoring this template")
                return default
            value = m.group(2)
            if not value.isascii() or "\0" in value:
                warn(f'{path}: non-ASCII "{label}" header value in {kind} template '
                     "-- ignoring this template")
                return default
            values[label.lower()] = value
            i += 1
        i += 1                                  # the blank line after the labels
    text = tuple(body[i:])
    if values["charset"].lower() == "us-ascii" and not all(t.isascii() for t in text):
        warn(f"{path}: 8-bit message text in {kind} template")
        warn("please specify a charset value other than us-ascii")
        warn("-- ignoring this template for now")
        return default
    return BounceTemplate(name, values["charset"], values["from"], values["subject"],
                          values["postmaster-subject"], text)


def read_template_file(path: str, warn: Callable[[str], None]) -> dict[str, BounceTemplate]:
    """The built-in templates with those the file defines put in their place."""
    templates = builtin_templates()
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise TemplateError(f"open {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise TemplateError(f"{path}: file too large")
    text = data.decode("utf-8", "surrogateescape")
    for name, body, next_line in _entries(text, path):
        if name not in templates:
            warn(f"{path}, line {next_line}: unknown template name: {name} "
                 "-- ignoring this template")
            continue
        templates[name] = _parse(name, body, templates[name], path, warn)
    return templates


def load_templates(config, path: str | None = None,
                   warn: Callable[[str], None] = lambda _: None) -> tuple[dict, str]:
    """(templates, where they came from): ``path``, else bounce_template_file,
    else the built-in ones ("built-in")."""
    path = path or (config.get("bounce_template_file") if config is not None else "")
    if path:
        return read_template_file(path, warn), path
    return builtin_templates(), "built-in"


def format_template(t: BounceTemplate) -> list[str]:
    """As `postconf -t` shows one template."""
    out = [f"{t.name} = <<EOF", f"Charset: {t.charset}", f"From: {t.sender}",
           f"Subject: {t.subject}"]
    if t.postmaster_subject is not None:
        out.append(f"Postmaster-Subject: {t.postmaster_subject}")
    return out + [""] + list(t.text) + ["EOF"]


def _time_value(config, param: str) -> float:
    try:
        return config.get_time(param, "s")
    except Exception:
        return 0.0


def expand_text(t: BounceTemplate, config, source: str,
                warn: Callable[[str], None] = lambda _: None) -> list[str]:
    """The template text with its $name expressions replaced (bounce(5))."""
    out = []
    warned = set()
    for line in t.text:
        pieces = []
        pos = 0
        for m in _EXPR.finditer(line):
            pieces.append(line[pos:m.start()])
            pos = m.end()
            if m.group(4):
                pieces.append("$")
                continue
            name = m.group(1) or m.group(2) or m.group(3) or ""
            value = _lookup(name, config, t, source, warn, warned)
            if value is None:
                raise TemplateError(f"{source}: undefined $name in {t.kind} template: {line}")
            pieces.append(value)
        pieces.append(line[pos:])
        out.append("".join(pieces))
    return out


def _lookup(name: str, config, t: BounceTemplate, source: str, warn, warned: set) -> str | None:
    for param in _TIME_PARAMS:
        if name.startswith(param + "_") and name[len(param) + 1:] in _UNITS:
            unit = name[len(param) + 1:]
            seconds = _time_value(config, param)
            value = int(seconds // _UNITS[unit])
            if value == 0 and seconds > 0 and name not in warned:
                warned.add(name)
                warn(f'{source}: zero result in {t.kind} template conversion of parameter '
                     f'"{name}"')
                warn(f'please reduce time unit "{unit}" of "{name}" in {t.kind} template')
                warn("for instructions see the bounce(5) manual")
            return str(value)
    if config.is_set(name) or config.default(name) is not None:
        return config.get(name)
    return None


def format_expanded(t: BounceTemplate, config, source: str,
                    warn: Callable[[str], None] = lambda _: None) -> list[str]:
    """As `postconf -b` shows one template."""
    return [f"expanded_{t.kind}_text = <<EOF"] + expand_text(t, config, source, warn) + ["EOF"]


def render(config, *, expand: bool, path: str | None = None,
           warn: Callable[[str], None] = lambda _: None) -> str:
    """The whole `postconf -t` (expand=False) or `postconf -b` output."""
    templates, source = load_templates(config, path, warn)
    blocks = []
    for name in NAMES:
        t = templates[name]
        blocks.append(format_expanded(t, config, source, warn) if expand else format_template(t))
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"


__all__ = ["BounceTemplate", "TemplateError", "NAMES", "builtin_templates", "read_template_file",
           "load_templates", "format_template", "expand_text", "format_expanded", "render"]
