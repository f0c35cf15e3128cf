"""`postfix check`: what would stop the mail system from starting or working.

Returns Postfix-worded problems; fatal ones stop `postfix start`.
"""

from __future__ import annotations

import os

from . import services as sv

# Parameters whose value is a list of lookup tables that must open.
TABLE_PARAMETERS = (
    "virtual_mailbox_maps", "virtual_uid_maps", "virtual_gid_maps", "virtual_alias_maps",
    "transport_maps", "relay_recipient_maps", "canonical_maps", "sender_canonical_maps",
    "recipient_canonical_maps", "alias_maps", "smtpd_sender_login_maps",
)


def run_check(config_dir: str) -> tuple[str | None, list[str]]:
    from .daemon import MasterError, load, mail_owner_ids
    warnings: list[str] = []
    try:
        cfg = load(config_dir)
    except MasterError as exc:
        return str(exc), warnings
    try:
        mail_owner_ids(cfg)
    except MasterError as exc:
        return str(exc), warnings
    main_cf = os.path.join(cfg.config_dir, "main.cf")
    for name in ("queue_directory", "data_directory"):
        path = cfg.get(name)
        if not path or not path.startswith("/"):
            return f"{main_cf}: parameter {name}: value must be an absolute path: {path}", warnings
    qdir = cfg.get("queue_directory")
    if os.path.exists(qdir) and not os.path.isdir(qdir):
        return f"chdir {qdir}: Not a directory", warnings
    # Listeners: every inet address must parse; a port in use is found at start.
    for svc in cfg.services or []:
        if svc.type == "inet":
            try:
                sv.bind_addresses(svc, cfg.override(svc.overrides) if svc.overrides else cfg)
            except OSError as exc:
                return f"{cfg.config_dir}/master.cf: line {svc.line}: {exc.strerror or exc}", warnings
    # Lookup tables.
    try:
        from postwell.delivery.base import split_map_list
        from postwell.tables import open_table
    except ImportError:
        open_table = None
    if open_table is not None:
        for param in TABLE_PARAMETERS:
            if not cfg.is_set(param):
                continue
            for spec in split_map_list(cfg.get(param)):
                if ":" not in spec:
                    continue
                try:
                    open_table(spec, cfg)
                except Exception as exc:
                    warnings.append(f"{param}: {exc}")
    # TLS files named in main.cf must exist and be readable.
    for param in ("smtpd_tls_cert_file", "smtpd_tls_key_file", "smtpd_tls_chain_files",
                  "smtpd_tls_CAfile", "smtp_tls_CAfile"):
        if cfg.raw(param) is None or not cfg.is_set(param):
            continue
        for path in cfg.get_list(param):
            if not os.access(path, os.R_OK):
                warnings.append(f"cannot access {param} file {path}: "
                                f"{'No such file or directory' if not os.path.exists(path) else 'Permission denied'}")
    # Services postwell does not run are reported once, by the master at start.
    return None, warnings
