"""Which parameters exist (Postfix's view) and which postwell honours.

Postfix accepts, besides its built-in parameters:
- per-transport parameters `<service>_<suffix>` for each master.cf service
  whose command is a delivery agent (e.g. relay_destination_concurrency_limit);
- user-defined parameters: any main.cf name that some main.cf value or
  master.cf -o value references as $name, or that smtpd_restriction_classes lists;
- legacy names that built-in defaults still refer to (stress, virtual_maps,
  postscreen_whitelist_interfaces, ...).
Anything else set in main.cf draws `unused parameter: name=value`.

IMPLEMENTED lists what postwell actually honours; every part registers its
own names with register_implemented(), so a start-up warning can name each
explicitly set parameter that Postfix knows but postwell ignores.
"""

from __future__ import annotations

import re

from .defaults import DEFAULTS

IMPLEMENTED: set[str] = set()


def register_implemented(*names: str) -> None:
    """Mark parameters as honoured.  A name "*_suffix" covers every
    per-transport form, e.g. "*_destination_concurrency_limit"."""
    IMPLEMENTED.update(names)


_SOURCE_NAMES: set[str] | None = None
# Files that name every parameter without honouring it.
_SCAN_SKIP = {"postfix_defaults.py", "defaults.py", "registry.py", "postconf.py"}
_LITERAL = re.compile(r"""["']([a-z][a-z0-9_]*)["']""")


def _source_names() -> set[str]:
    """Parameter names that postwell's own code reads.

    A parameter counts as honoured when some module other than the tables of
    names mentions it as a string literal (``cfg.get("message_size_limit")``).
    This keeps the start-up warning honest without every part having to keep
    a registration list in step with its code; explicit registrations still
    cover computed names ("*_destination_concurrency_limit").
    """
    global _SOURCE_NAMES
    if _SOURCE_NAMES is None:
        import pathlib
        found: set[str] = set()
        root = pathlib.Path(__file__).resolve().parent.parent
        for path in root.rglob("*.py"):
            if path.name in _SCAN_SKIP:
                continue
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            found.update(m for m in _LITERAL.findall(text) if m in DEFAULTS)
        _SOURCE_NAMES = found
    return _SOURCE_NAMES


def is_implemented(name: str) -> bool:
    if name in IMPLEMENTED:
        return True
    if name in _source_names():
        return True
    return any(p.startswith("*_") and name.endswith(p[1:]) for p in IMPLEMENTED)


# Parameters the config part itself honours.
register_implemented(
    "config_directory", "compatibility_level", "myhostname", "mydomain", "mynetworks",
    "mynetworks_style", "inet_interfaces", "inet_protocols", "process_id", "process_name",
    "mail_name", "mail_version", "default_process_limit", "service_name",
)

# master.cf commands that are delivery agents (postconf registers the
# per-transport parameters below for their service names).
DELIVERY_COMMANDS = frozenset({"smtp", "lmtp", "local", "virtual", "pipe", "error"})

TRANSPORT_SUFFIXES = {
    "delivery_slot_cost": "$default_delivery_slot_cost",
    "delivery_slot_discount": "$default_delivery_slot_discount",
    "delivery_slot_loan": "$default_delivery_slot_loan",
    "destination_concurrency_failed_cohort_limit":
        "$default_destination_concurrency_failed_cohort_limit",
    "destination_concurrency_limit": "$default_destination_concurrency_limit",
    "destination_concurrency_negative_feedback":
        "$default_destination_concurrency_negative_feedback",
    "destination_concurrency_positive_feedback":
        "$default_destination_concurrency_positive_feedback",
    "destination_rate_delay": "$default_destination_rate_delay",
    "destination_recipient_limit": "$default_destination_recipient_limit",
    "extra_recipient_limit": "$default_extra_recipient_limit",
    "initial_destination_concurrency": "$initial_destination_concurrency",
    "minimum_delivery_slots": "$default_minimum_delivery_slots",
    "recipient_limit": "$default_recipient_limit",
    "recipient_refill_delay": "$default_recipient_refill_delay",
    "recipient_refill_limit": "$default_recipient_refill_limit",
    "transport_rate_delay": "$default_transport_rate_delay",
}
PIPE_SUFFIXES = {"time_limit": "$command_time_limit"}

_REF = re.compile(r"\$(?:\{\s*|\(\s*)?([A-Za-z0-9_]+)")


def service_parameters(services) -> dict[str, str]:
    """{name: default} for the per-transport parameters of master.cf services."""
    out: dict[str, str] = {}
    for svc in services or ():
        if svc.command == "spawn":          # spawn(8) only has a time limit
            out.setdefault(f"{svc.name}_time_limit", PIPE_SUFFIXES["time_limit"])
            continue
        if svc.command not in DELIVERY_COMMANDS:
            continue
        suffixes = dict(TRANSPORT_SUFFIXES)
        if svc.command == "pipe":
            suffixes.update(PIPE_SUFFIXES)
        for suffix, default in suffixes.items():
            out.setdefault(f"{svc.name}_{suffix}", default)
    return out


def service_parameter_default(name: str, services) -> str | None:
    for svc in services or ():
        if name.startswith(svc.name + "_"):
            suffix = name[len(svc.name) + 1:]
            if svc.command in DELIVERY_COMMANDS and suffix in TRANSPORT_SUFFIXES:
                return TRANSPORT_SUFFIXES[suffix]
            if svc.command in ("pipe", "spawn") and suffix in PIPE_SUFFIXES:
                return PIPE_SUFFIXES[suffix]
    return None


def looks_per_service(name: str) -> bool:
    """True for names shaped like `<service>_<per-transport suffix>`."""
    return any(name.endswith("_" + sfx) for sfx in (*TRANSPORT_SUFFIXES, *PIPE_SUFFIXES))


def referenced_names(text: str) -> set[str]:
    # "$$" is a literal dollar, never the start of a reference
    return set(_REF.findall(text.replace("$$", "")))


_LEGACY: set[str] | None = None

# $names in default values that are filled in per use (per message, per
# recipient), not parameters.
PER_USE_MACROS = frozenset({"home", "extension", "recipient_delimiter_", "rbl_class",
                            "rbl_code", "rbl_domain", "rbl_reason", "rbl_what"})


def legacy_parameters() -> set[str]:
    """Names that built-in defaults refer to but that have no default of their
    own (renamed parameters such as postscreen_whitelist_interfaces, and
    stress, virtual_maps, ...): Postfix accepts them when set."""
    global _LEGACY
    if _LEGACY is None:
        from .postfix_defaults import POSTFIX_DEFAULTS
        refs: set[str] = set()
        for value in POSTFIX_DEFAULTS.values():
            if "$" in value:
                refs |= referenced_names(value)
        from .defaults import MACHINE_DEPENDENT
        _LEGACY = refs - set(POSTFIX_DEFAULTS) - set(MACHINE_DEPENDENT) - PER_USE_MACROS
    return _LEGACY


def user_defined_parameters(cfg) -> set[str]:
    """main.cf names that are not built in but are referenced as $name."""
    refs: set[str] = set(legacy_parameters())
    for value in cfg.params.values():
        refs |= referenced_names(value)
    for svc in cfg.services or ():
        for value in svc.overrides.values():
            refs |= referenced_names(value)
    # Restriction class names are parameters too (smtpd_restriction_classes).
    classes = cfg.params.get("smtpd_restriction_classes", "")
    refs |= {w for w in re.split(r"[\s,]+", classes) if w}
    return {n for n in refs if n in cfg.params and not _builtin(n, cfg)}


def _builtin(name: str, cfg) -> bool:
    return name in DEFAULTS or service_parameter_default(name, cfg.services) is not None


def is_known(name: str, cfg) -> bool:
    """Known to Postfix: built in, per-transport, or user-defined."""
    return _builtin(name, cfg) or name in user_defined_parameters(cfg)


def unused_parameters(cfg) -> list[tuple[str, str]]:
    """main.cf (name, value) pairs Postfix would report as "unused parameter"."""
    user = user_defined_parameters(cfg)
    return [(n, v) for n, v in cfg.params.items()
            if not _builtin(n, cfg) and n not in user]


def unused_master_parameters(cfg) -> list[tuple[str, str]]:
    """master.cf -o (name, value) pairs that name no known parameter."""
    user = user_defined_parameters(cfg)
    out = []
    for svc in cfg.services or ():
        for n, v in svc.overrides.items():
            if not _builtin(n, cfg) and n not in user and n not in cfg.params:
                out.append((n, v))
    return out


def unused_parameter_warning(path: str, name: str, value: str) -> str:
    """Postfix's wording (non-printable characters shown as '?')."""
    shown = "".join(c if c.isprintable() else "?" for c in value)
    return f"{path}: unused parameter: {name}={shown}"


# Parameters whose setting postwell always behaves as: no warning when the
# admin's value says the same (Debian's stock main.cf sets biff = no).
BEHAVES_AS = {"biff": "no"}

# Where Postfix's own programs and documents are installed: they carry no
# behaviour for postwell, which has its own installation.
register_implemented(
    "readme_directory", "html_directory", "manpage_directory", "sample_directory",
    "daemon_directory", "command_directory", "shlib_directory", "meta_directory",
    "sendmail_path", "newaliases_path", "mailq_path", "setgid_group",
)


def unimplemented_parameters(cfg) -> list[str]:
    """Explicitly set parameters that Postfix knows but postwell ignores."""
    names = list(cfg.params)
    for svc in cfg.services or ():
        names += [n for n in svc.overrides if n not in names]
    user = user_defined_parameters(cfg)
    out = []
    for n in names:
        if is_implemented(n) or n in user or n in out:
            continue
        if n in BEHAVES_AS and cfg.get(n).strip().lower() == BEHAVES_AS[n]:
            continue
        if _builtin(n, cfg):
            out.append(n)
    return out
