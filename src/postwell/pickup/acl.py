"""authorized_submit_users, apart from the pickup service: sendmail checks it
before it writes to the maildrop and must not load cleanup for that."""

from __future__ import annotations

import pwd
import re


def submit_denied(config, uid: int) -> str | None:
    """authorized_submit_users: None when uid may submit, else its login name
    (or the uid as text).  Supports static:anyone, user names, !name and
    lookup tables (a table hit means allowed, as in Postfix's check_user_acl)."""
    spec = config.get("authorized_submit_users") if config.raw("authorized_submit_users") is not None \
        else "static:anyone"
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    items = [x for x in re.split(r"[,\s]+", spec or "") if x]
    if not items:
        return name
    for item in items:
        neg = item.startswith("!")
        if neg:
            item = item[1:]
        if item == "static:anyone":
            return name if neg else None
        if ":" in item and not item.startswith("/"):
            try:
                from postwell.tables import open_table
                hit = open_table(item, config).lookup(name) is not None
            except Exception:
                hit = False
        else:
            hit = item == name
        if hit:
            return name if neg else None
    return name
