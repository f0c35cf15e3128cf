"""Parameter defaults: Postfix 3.7's table plus postwell's deliberate differences.

Values are the unexpanded defaults as `postconf -d` prints them.  How the final
DEFAULTS dict is built (see the end of this file):

1. the literal below: entries other parts added (postwell-only parameters, or
   Postfix parameters they need; for a parameter Postfix knows, Postfix's own
   value from postfix_defaults.py wins, so a typo here cannot change a default);
2. POSTFIX_DEFAULTS (postfix_defaults.py, generated from `postconf -d`);
3. POSTWELL_DIFFERENCES: deliberate, documented departures (safer defaults);
4. machine-dependent defaults (myhostname, mydomain, mynetworks, process_id,
   process_name) computed for this host when one of them (or the whole
   table) is first read, not at import (_PendingDefaults); Config recomputes
   them from the loaded main.cf (machine.py), as Postfix does at run time.
"""

DEFAULTS: dict[str, str] = {
    "mail_name": "postwell",
    "syslog_name": "postfix",
    "syslog_facility": "mail",
    "maillog_file": "",
    "myorigin": "$myhostname",
    "mydestination": "$myhostname, localhost.$mydomain, localhost",
    "smtpd_banner": "$myhostname ESMTP $mail_name",
    "queue_directory": "/var/spool/postfix",
    "data_directory": "/var/lib/postfix",
    "mail_owner": "postfix",
    # master / qmgr / virtual (owner: master+qmgr engineer)
    "process_id_directory": "pid",
    "service_throttle_time": "60s",
    "default_process_limit": "100",
    "defer_transports": "",
    "inet_interfaces": "all",
    "inet_protocols": "all",
    "minimal_backoff_time": "300s",
    "maximal_backoff_time": "4000s",
    "queue_run_delay": "300s",
    "maximal_queue_lifetime": "5d",
    "bounce_queue_lifetime": "5d",
    "default_destination_concurrency_limit": "20",
    "default_destination_recipient_limit": "50",
    "delay_logging_resolution_limit": "2",
    "qmgr_message_active_limit": "20000",
    "double_bounce_sender": "double-bounce",
    "virtual_transport": "virtual",
    "virtual_mailbox_base": "",
    "virtual_mailbox_maps": "",
    "virtual_mailbox_domains": "$virtual_mailbox_maps",
    "virtual_uid_maps": "",
    "virtual_gid_maps": "",
    "virtual_minimum_uid": "100",
    "virtual_mailbox_limit": "51200000",
    "virtual_mailbox_lock": "fcntl, dotlock",
    "virtual_destination_concurrency_limit": "$default_destination_concurrency_limit",
    "virtual_destination_recipient_limit": "$default_destination_recipient_limit",
    "message_size_limit": "10240000",
    "mailbox_size_limit": "51200000",
    "smtpd_recipient_limit": "1000",
    "line_length_limit": "2048",
    # queue/ and cleanup/
    "header_size_limit": "102400",
    "hopcount_limit": "50",
    "queue_minfree": "0",
    "always_add_missing_headers": "no",
    "local_header_rewrite_clients": "permit_inet_interfaces",
    "undisclosed_recipients_header": "",
    "virtual_maps": "",
    "virtual_alias_maps": "$virtual_maps",
    "virtual_alias_expansion_limit": "1000",
    "virtual_alias_recursion_limit": "1000",
    "recipient_delimiter": "",
    "smtpd_timeout": "300s",
    "mynetworks_style": "host",
    "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination",
    # postwell extensions (dns/, delivery/smtp.py): name servers for the smtp client
    # ("127.0.0.1:5353, [::1]:53"; empty = resolv.conf) and BDAT on output (Postfix's
    # smtp client never sends BDAT, so the default stays off).
    "postwell_dns_servers": "",
    "postwell_smtp_use_chunking": "no",
}


# ---- structure (config owner); add plain entries to the literal above ----
from .postfix_defaults import POSTFIX_DEFAULTS  # noqa: E402

# Deliberate differences from Postfix 3.7 (docs/architecture.md, DESIGN.md).
POSTWELL_DIFFERENCES: dict[str, str] = {
    "mail_name": "postwell",
    # Postfix 3.7 defaults to 0 (legacy); we run with the 3.6 behaviour that
    # Postfix's own `${{$compatibility_level} <level ...}` defaults select.
    "compatibility_level": "3.6",
    # The Postfix 3.9 default, against SMTP smuggling.
    "smtpd_forbid_bare_newline": "normalize",
    # postwell's own release, not Postfix's: log lines and `postconf mail_version` tell
    # the truth about which program runs.
    "mail_version": "0.1.0",
    # Postfix turns per-record deadlines on only under stress; postwell always bounds a
    # whole request line (and DATA by smtpd_min_data_rate) by smtpd_timeout, so a client
    # trickling one byte per second cannot hold a session open past it.
    "smtpd_per_record_deadline": "yes",
    # TLS 1.0/1.1 are deprecated (RFC 8996); OpenSSL 3 refuses them at its
    # default security level anyway.  (owner: tls/)
    "smtpd_tls_protocols": ">=TLSv1.2",
    "smtpd_tls_mandatory_protocols": ">=TLSv1.2",
    "smtp_tls_protocols": ">=TLSv1.2",
    "smtp_tls_mandatory_protocols": ">=TLSv1.2",
}

# Names whose default depends on the machine (and on main.cf): machine.py.
MACHINE_DEPENDENT = ("myhostname", "mydomain", "mynetworks", "process_id", "process_name")


class _Defaults(dict):
    """DEFAULTS once its machine-dependent values are in: a plain dict."""
    __slots__ = ()


_MACHINE_NAMES = frozenset(MACHINE_DEPENDENT)


class _PendingDefaults(_Defaults):
    """DEFAULTS before anything has read a machine-dependent value.

    Those values cost an interface scan (ctypes, getifaddrs) and a host name
    look-up that most command-line tools never need (Config computes its own
    from main.cf), so they are computed the first time one of them, or the
    whole table, is read, or anything is changed; membership, len(), the
    names and every other value do not need them.  The object then becomes a
    _Defaults (same storage), so later reads cost what a dict's do.
    """
    __slots__ = ()

    def _fill(self) -> None:
        from .machine import static_machine_defaults
        # Values first, class second: a thread that reads meanwhile computes
        # them again (same result), never sees the placeholders.
        dict.update(self, static_machine_defaults())
        self.__class__ = _Defaults

    def __getitem__(self, key):
        if key in _MACHINE_NAMES:
            self._fill()
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        if key in _MACHINE_NAMES:
            self._fill()
        return dict.get(self, key, default)

    def setdefault(self, key, default=None):
        if key in _MACHINE_NAMES:
            self._fill()
        return dict.setdefault(self, key, default)

    def pop(self, key, *default):
        if key in _MACHINE_NAMES:
            self._fill()
        return dict.pop(self, key, *default)

    def __setitem__(self, key, value):
        if key in _MACHINE_NAMES:
            self._fill()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        if key in _MACHINE_NAMES:
            self._fill()
        dict.__delitem__(self, key)

    def __iter__(self):
        # Defined so that dict(DEFAULTS), {**DEFAULTS} and x.update(DEFAULTS)
        # copy through __getitem__: CPython copies a dict subclass's storage
        # directly when the subclass keeps dict's own __iter__.
        return dict.__iter__(self)

    # Everything else that shows values or changes the table: complete it first.
    def items(self):
        self._fill()
        return self.items()

    def values(self):
        self._fill()
        return self.values()

    def copy(self):
        self._fill()
        return self.copy()

    def __repr__(self):
        self._fill()
        return repr(self)

    def __eq__(self, other):
        self._fill()
        return self == other

    def __ne__(self, other):
        self._fill()
        return self != other

    def __or__(self, other):
        self._fill()
        return self | other

    def __ror__(self, other):
        self._fill()
        return other | self

    def __ior__(self, other):
        self._fill()
        self |= other
        return self

    def __reduce_ex__(self, protocol):
        self._fill()
        return self.__reduce_ex__(protocol)

    def update(self, *args, **kwargs):
        self._fill()
        self.update(*args, **kwargs)

    def popitem(self):
        self._fill()
        return self.popitem()

    def clear(self):
        self._fill()
        self.clear()


def _build() -> _Defaults:
    added_by_parts = {k: v for k, v in DEFAULTS.items() if k not in POSTFIX_DEFAULTS}
    built = _PendingDefaults()
    dict.update(built, POSTFIX_DEFAULTS)
    dict.update(built, added_by_parts)
    dict.update(built, POSTWELL_DIFFERENCES)
    # The machine-dependent names are known (and listed last) from the start;
    # their values are computed on first use (_PendingDefaults._fill).
    for name in MACHINE_DEPENDENT:
        dict.__setitem__(built, name, "")
    return built


DEFAULTS = _build()
