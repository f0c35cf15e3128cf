"""SASL authentication for the smtpd (RFC 4422, RFC 4954; Postfix SASL_README).

API for the smtpd glue::

    server = server_for_config(config)          # SaslServer | None (auth disabled)
    problems = check_sasl_config(config)        # list[str] for `postfix check`/start
    await server.prepare()                      # Dovecot: (re)connect, read MECH list
    server.mechanisms(tls_active) -> list[str]  # for EHLO "AUTH ..."
    ex = server.start(mech, initial_response, client_addr=..., client_port=...,
                      local_addr=..., local_port=..., local_domain=None, tls_active=...)
    step = await ex.begin()                     # then, while Challenge:
    step = await ex.step(line)                  # line: base64 text as the client sent it
    ex.abort()                                  # after the client's "*"
    step_reply(step) -> Reply                   # 334 / 235 2.7.0 / 535 5.7.8 / 454 4.7.0
    step_bytes(step) -> bytes                   # the same as wire bytes ("334 " keeps its space)
    failure_log_text(namaddr, mech, failure)    # "...: SASL PLAIN authentication failed: ..."

Or, simpler, one ``postwell.sasl.session.SmtpdAuth`` per SMTP session: it runs the
exchange, logs failures as Postfix does, applies Failure.delay and returns Replies.

Back ends (smtpd_sasl_type): ``cyrus`` (default; smtpd.conf with auxprop/sasldb
or saslauthd), ``dovecot`` (auth socket), ``postwell`` (built-in passwd file).
"""

from __future__ import annotations

import os

from .base import (ABORTED_REPLY, Challenge, Failure, SaslConfigError, SaslExchange,  # noqa: F401
                   SaslServer, SaslStep, Success, aborted_log_text, failure_log_text,
                   parse_security_options, step_bytes, step_reply)

SASL_TYPES = ("cyrus", "dovecot", "postwell")

try:
    from ..config.registry import register_implemented
    register_implemented(
        "smtpd_sasl_auth_enable", "smtpd_sasl_type", "smtpd_sasl_path", "cyrus_sasl_config_path",
        "smtpd_sasl_security_options", "smtpd_sasl_tls_security_options",
        "smtpd_sasl_mechanism_filter", "smtpd_sasl_response_limit", "smtpd_sasl_service",
        "smtpd_sasl_local_domain")
except ImportError:  # pragma: no cover
    pass


def _get(config, name: str, default: str = "") -> str:
    try:
        value = config.get(name)
    except KeyError:
        return default
    return default if value is None else value


def _options(config) -> tuple[frozenset[str], frozenset[str]]:
    plain = parse_security_options(_get(config, "smtpd_sasl_security_options", "noanonymous"))
    tls = parse_security_options(_get(config, "smtpd_sasl_tls_security_options",
                                      _get(config, "smtpd_sasl_security_options", "noanonymous")))
    return plain, tls


def _response_limit(config) -> int:
    try:
        return max(1, int(_get(config, "smtpd_sasl_response_limit", "12288")))
    except ValueError:
        raise SaslConfigError("smtpd_sasl_response_limit: bad number")


def dovecot_socket_path(config) -> str:
    """smtpd_sasl_path for Dovecot: relative paths are under queue_directory."""
    path = _get(config, "smtpd_sasl_path", "smtpd").strip()
    if path.startswith("inet:") or os.path.isabs(path):
        return path
    return os.path.join(_get(config, "queue_directory", "/var/spool/postfix"), path)


def _build(config):
    """(server, backend-or-None); raises SaslConfigError."""
    kind = _get(config, "smtpd_sasl_type", "cyrus").strip().lower()
    if kind not in SASL_TYPES:
        raise SaslConfigError(f"unsupported SASL server implementation: {kind}")
    plain_opts, tls_opts = _options(config)
    common = dict(security_options=plain_opts, tls_security_options=tls_opts,
                  mechanism_filter=_get(config, "smtpd_sasl_mechanism_filter", ""),
                  response_limit=_response_limit(config))
    if kind == "dovecot":
        from .dovecot import DovecotSaslServer
        return DovecotSaslServer(dovecot_socket_path(config),
                                 service=_get(config, "smtpd_sasl_service", "smtp"),
                                 **common), None
    from .local import LocalSaslServer
    hostname = _get(config, "myhostname", "localhost")
    local_domain = _get(config, "smtpd_sasl_local_domain", "")
    if kind == "cyrus":
        from .cyrus import load_settings
        settings = load_settings(_get(config, "cyrus_sasl_config_path", ""),
                                 _get(config, "smtpd_sasl_path", "smtpd") or "smtpd")
        backend = settings.backend(_get(config, "smtpd_sasl_service", "smtp"))
        mechs = settings.mech_list
    else:
        from .passwdfile import open_backend
        backend = open_backend(_get(config, "smtpd_sasl_path", "smtpd"),
                               getattr(config, "config_dir", None) or "/etc/postfix")
        mechs = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "SCRAM-SHA-1"]
    server = LocalSaslServer(backend, mechs, hostname=hostname, local_domain=local_domain,
                             type_name=kind, **common)
    return server, backend


def server_for_config(config, service_overrides: dict | None = None) -> SaslServer | None:
    """The SASL server for an smtpd service, or None when smtpd_sasl_auth_enable
    is off.  ``service_overrides``: master.cf -o settings not yet applied to
    ``config``.  Raises SaslConfigError when the configuration cannot work."""
    if service_overrides:
        config = config.override(service_overrides)
    enabled = _get(config, "smtpd_sasl_auth_enable", "no").strip().lower()
    if enabled not in ("yes", "true", "1"):
        return None
    server, _ = _build(config)
    return server


def _access_problem(path: str, user: str, write: bool = False) -> str | None:
    """Why ``user`` (mail_owner) cannot read (or, for a socket, write) ``path``."""
    import pwd
    import stat
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None                # the master's own check reports a bad mail_owner
    if pw.pw_uid == 0:
        return None
    groups = set(os.getgrouplist(user, pw.pw_gid))
    want = stat.S_IWOTH if write else stat.S_IROTH
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_uid == pw.pw_uid:
        ok = st.st_mode & (want << 6)
    elif st.st_gid in groups:
        ok = st.st_mode & (want << 3)
    else:
        ok = st.st_mode & want
    if ok:
        return None
    verb = "write to" if write else "read"
    return (f"{path}: mail_owner {user} cannot {verb} it (smtpd runs as {user}; "
            f"add {user} to group of the file or change its mode)")


def check_sasl_config(config, service_overrides: dict | None = None) -> list[str]:
    """Problems that would make AUTH fail, as texts for `postfix check`."""
    if service_overrides:
        config = config.override(service_overrides)
    enabled = _get(config, "smtpd_sasl_auth_enable", "no").strip().lower()
    if enabled not in ("yes", "true", "1"):
        return []
    try:
        server, backend = _build(config)
    except SaslConfigError as e:
        return [str(e)]
    problems: list[str] = []
    if backend is not None:
        problems.extend(backend.check())
        path = getattr(backend, "path", None)
        owner = _get(config, "mail_owner", "postfix")
        if path and not problems and os.geteuid() == 0:
            # The smtpd reads the store after dropping to mail_owner.
            why = _access_problem(path, owner, write=path.endswith("mux"))
            if why:
                problems.append(why)
        if hasattr(server, "configured") and not server.configured:
            problems.append(f"SASL type {server.type_name}: no usable mechanism "
                            "(check mech_list and the password store)")
    else:
        path = dovecot_socket_path(config)
        if not path.startswith("inet:") and not os.path.exists(path):
            problems.append(f"Dovecot auth socket {path} does not exist (is Dovecot running?)")
    return problems
