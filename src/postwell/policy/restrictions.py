"""smtpd_*_restrictions, evaluated as Postfix's smtpd_check does.

Each restriction returns DUNNO (go on with the list), OK (this list is done,
permitted) or REJECT (reply sent).  Replies are built the way Postfix builds
them ("<name>: Class rejected: text", the SMTP code's first digit forced onto
the enhanced code, soft_bounce, warn_if_reject, defer_if_permit /
defer_if_reject), so the text a client sees is the text Postfix would send.

One function per restriction name, registered in RESTRICTIONS; the ones that
look up a table (check_*_access) are in MAP_COMMANDS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Awaitable, Callable

from postwell.smtp.reply import Reply

from .matchlist import HostList, OwnAddresses, StringList, is_table_spec, mynetworks_list, parse_ip
from .resolve import AddressResolver, ResolveFlag
from .resolve import valid_hostname as _valid_hostname
from .resolve import valid_mailhost_addr
from .state import SessionState

DUNNO, OK, REJECT = 0, 1, 2

# Reply classes, as Postfix names what it rejects.
CLIENT = "Client host"
REV_CLIENT = "Unverified Client host"
HELO = "Helo command"
SENDER = "Sender address"
RECIPIENT = "Recipient address"
DATA = "Data command"
EOD = "End-of-data"
ETRN = "Etrn command"

_ERR_SOFTWARE = "software"
_ERR_DATA = "data"
_ERR_RESOURCE = "resource"
_ERR_POLICY = "policy"
_ERR_BOUNCE = "bounce"


class PolicyConfigError(Exception):
    """A configuration Postfix's smtpd refuses to start with (logged as fatal)."""


class _Abort(Exception):
    """Postfix's longjmp out of the restriction lists (server errors)."""

    def __init__(self, status: int):
        self.status = status


_DSN = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


def dsn_split(default: str, text: str) -> tuple[str, str]:
    """'5.1.1 text' -> ('5.1.1', 'text'); no leading code -> (default, text)."""
    m = _DSN.match(text)
    if m:
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}", text[m.end():]
    return default, text


# Observed on Postfix 3.7.11: "550 5.1.N text" in check_sender_access /
# check_recipient_access answers 5.1.<sender>/5.1.<recipient> below.
_DSN_MAP = {"1": ("4.1.7", "4.1.1"), "2": ("4.1.8", "4.1.2"), "3": ("4.1.7", "4.1.3"),
            "4": ("4.1.7", "4.1.4"), "5": ("4.1.0", "4.1.5"), "6": ("4.1.7", "4.1.6"),
            "7": ("4.1.7", "4.1.3"), "8": ("4.1.8", "4.1.2")}


def dsn_fix(status: str, reply_class: str, log=None) -> str:
    """Make an address status (X.1.Y) fit what is rejected (smtpd_dsn_fix); like
    Postfix, say so in the log when the status changes."""
    if len(status) >= 4 and status[0].isdigit() and status[1:4] == ".1.":
        if reply_class == SENDER:
            result = _DSN_MAP.get(status[4:], ("4.1.0", "4.1.0"))[0]
        elif reply_class == RECIPIENT:
            result = _DSN_MAP.get(status[4:], ("4.1.0", "4.1.0"))[1]
        else:
            result = "4.0.0"
        if log is not None and result[1:] != status[1:]:
            log.info(f"mapping DSN status {status} into {reply_class} status {status[0]}{result[1:]}")
        return result
    return status


def _printable(text: str) -> str:
    return "".join(c if (c.isprintable() and c != "\x7f") else " " for c in text)


LOG_RECORD_LIMIT = 2000
_822_SPECIALS = frozenset('()<>@,;:\\".[] \t')


def log_address(address: str) -> str:
    """info_log_address_format = external (Postfix 3.5+ default): logs show a local part
    that is not an RFC 822 dot-string in quotes, as in the SMTP command."""
    local, at, domain = address.rpartition("@")
    if not at:
        local = address
    if not local and at:
        return '""' + at + domain       # "@example.org" is logged as ""@example.org
    if not local or all(w and not any(c in _822_SPECIALS or ord(c) < 32 or ord(c) == 127
                                      for c in w) for w in local.split(".")):
        return address
    quoted = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return quoted + (at + domain if at else "")


def format_whatsup(state: SessionState, whatsup: str, text: str) -> str:
    """The smtpd's log line for a reject/warn/hold... (log_whatsup):
    'NOQUEUE: reject: RCPT from name[addr]: 554 5.7.1 ...; from=<s> to=<r> proto=ESMTP helo=<h>'."""
    line = f"{state.queue_id or 'NOQUEUE'}: {whatsup}: {state.where} from {state.namaddr}: {text};"
    if state.sender is not None:
        line += f" from=<{log_address(state.sender)}>"
    if state.recipient is not None:
        line += f" to=<{log_address(state.recipient)}>"
    if state.protocol:
        line += f" proto={state.protocol}"
    if state.helo_name is not None:
        line += f" helo=<{state.helo_name}>"
    # Postfix's logger cuts every record at 2000 characters (checked against 3.7).
    return line[:LOG_RECORD_LIMIT]


MailhostLookup = Callable[[str], Awaitable[str]]
"""DNS hook for reject_unknown_*_domain: domain -> "ok" | "notfound" |
"retry" | "nullmx" | "inval" | "policy" (the dns package supplies it)."""


@dataclass
class _Ctx:
    state: SessionState
    reply_name: str
    reply_class: str
    def_acl: str | None


class Engine:
    """The restriction evaluator shared by all sessions of one smtpd."""

    def __init__(self, config, log, *, tables=None, resolver: AddressResolver | None = None,
                 own_addresses: OwnAddresses | None = None,
                 mailhost_lookup: MailhostLookup | None = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None):
        self.config = config
        self.log = log
        self._tables = tables
        self.own = own_addresses if own_addresses is not None else OwnAddresses(config)
        self.resolver = resolver or AddressResolver(config, tables=tables, own_addresses=self.own, log=log)
        self.mailhost_lookup = mailhost_lookup
        self._dns_tried = mailhost_lookup is not None
        self.sleep = sleep
        self._mynetworks: HostList | None = None
        self.last_reply: Reply | None = None
        g = config.get
        gi = self._int
        self.codes = {
            "access_map_reject_code": gi("access_map_reject_code", 554),
            "access_map_defer_code": gi("access_map_defer_code", 450),
            "relay_domains_reject_code": gi("relay_domains_reject_code", 554),
            "reject_code": gi("reject_code", 554),
            "defer_code": gi("defer_code", 450),
            "non_fqdn_reject_code": gi("non_fqdn_reject_code", 504),
            "invalid_hostname_reject_code": gi("invalid_hostname_reject_code", 501),
            "unknown_address_reject_code": gi("unknown_address_reject_code", 450),
            "unknown_local_recipient_reject_code": gi("unknown_local_recipient_reject_code", 550),
            "unknown_virtual_mailbox_reject_code": gi("unknown_virtual_mailbox_reject_code", 550),
            "unknown_virtual_alias_reject_code": gi("unknown_virtual_alias_reject_code", 550),
            "unknown_relay_recipient_reject_code": gi("unknown_relay_recipient_reject_code", 550),
            "multi_recipient_bounce_reject_code": gi("multi_recipient_bounce_reject_code", 550),
            "plaintext_reject_code": gi("plaintext_reject_code", 450),
        }
        self.soft_bounce = config.get_bool("soft_bounce")
        self.allow_untrusted_routing = config.get_bool("allow_untrusted_routing")
        self.show_table = _bool(g("show_user_unknown_table_name"), True)
        self.null_key = g("smtpd_null_access_lookup_key") or "<>"
        self.access_parent = "smtpd_access_maps" in _words(
            g("parent_domain_matches_subdomains")
            if config.raw("parent_domain_matches_subdomains") is not None
            else "debug_peer_list,fast_flush_domains,mynetworks,permit_mx_backup_networks,"
                 "qmqpd_authorized_clients,relay_domains,smtpd_access_maps")
        self.recipient_delimiter = g("recipient_delimiter")
        self.policy_default_action = (g("smtpd_policy_service_default_action")
                                      or "451 4.3.5 Server configuration problem")
        self.classes: dict[str, list[str]] = {}
        for name in _words(g("smtpd_restriction_classes")):
            self.classes[name] = parse_restrictions(g(name))
        self._warned: set[str] = set()
        perm_log = g("smtpd_log_access_permit_actions")
        self.permit_log = (StringList("smtpd_log_access_permit_actions", perm_log, config,
                                      tables=tables) if perm_log and perm_log.strip() else None)

    def acl_permit(self, state: SessionState, action: str, reply_class: str, reply_name: str,
                   detail: str = "") -> int:
        """smtpd_acl_permit(): OK, logged as "permit" when smtpd_log_access_permit_actions
        names the action and no earlier defer_if_permit has overruled it.  Postfix adds
        a blank before the (maybe empty) detail: "...=unknown[1.2.3.4] ;" is its shape."""
        if self.permit_log is not None and not state.check.defer_if_permit.active:
            try:
                wanted = self.permit_log.match(action)
            except Exception:   # a table that fails: no line, the request still passes
                wanted = False
            if wanted:
                self.log.info(format_whatsup(
                    state, "permit", f"action={action} for {reply_class}={reply_name} {detail}"))
        return OK

    def _int(self, name: str, default: int) -> int:
        v = self.config.get(name)
        try:
            return int(v) if v else default
        except ValueError:
            return default

    @property
    def mynetworks(self) -> HostList:
        if self._mynetworks is None:
            self._mynetworks = mynetworks_list(self.config, tables=self._tables)
            # permit_mynetworks runs for every RCPT (relay and recipient lists): with
            # address/name patterns only, the answer for a client never changes, so it
            # is remembered; a list naming a table is asked every time (tables change).
            entries = getattr(self._mynetworks, "entries", None)
            self._mynet_cache = ({} if entries is not None
                                 and not any(is_table_spec(x.lstrip("!")) for x in entries)
                                 else None)
        return self._mynetworks

    _mynet_cache: dict | None = None

    def in_mynetworks(self, name: str | None, addr: str | None) -> bool:
        nets = self.mynetworks
        cache = self._mynet_cache
        if cache is None:
            return bool(nets.match(name, addr))
        key = (name, addr)
        hit = cache.get(key)
        if hit is None:
            hit = bool(nets.match(name, addr))    # an exception is not remembered
            if len(cache) >= 4096:
                cache.clear()
            cache[key] = hit
        return hit

    def warn_once(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            self.log.warning(text)

    # -- replies ------------------------------------------------------------
    def reject(self, state: SessionState, error_class: str, code: int, dsn: str, text: str) -> int:
        """smtpd_check_reject(): format, apply warn_if_reject / defer_if_reject /
        soft_bounce, remember the reply.  Returns REJECT or (warn only) DUNNO."""
        chk = state.check
        warn_only = bool(chk.warn_if_reject) and error_class not in (_ERR_SOFTWARE, _ERR_RESOURCE, _ERR_DATA)
        full = f"{code} {dsn} {text}"
        if code < 400 or code > 599:
            self.log.warning(f"SMTP reply code configuration error: {full}")
            code, dsn, text = 450, "4.7.1", "Service unavailable"
        elif not _DSN.match(dsn + " "):
            self.log.warning(f"DSN detail code configuration error: {full}")
            code, dsn, text = 450, "4.7.1", "Service unavailable"
        # No cut at RFC 5321 4.5.3.1.5's 512 octets: Postfix 3.7 sends the whole text (a
        # 2 KB address comes back whole), and the command line limit bounds it.
        full = _printable(f"{code} {dsn} {text}")
        if not warn_only and chk.defer_if_reject.active and full[0] == "5":
            d = chk.defer_if_reject
            chk.warn_if_reject = 0
            d.active = False
            return self.reject(state, d.error_class, d.code, d.dsn, d.text)
        if self.soft_bounce and full[0] == "5":
            full = "4" + full[1:]
        # The enhanced code's class follows the SMTP code (RFC 3463 / RFC 2034).
        full = full[:4] + full[0] + full[5:]
        code_s, dsn_s, text_s = full[:3], full[4:].split(" ", 1)[0], full[4:].partition(" ")[2]
        reply = Reply(int(code_s), text_s, dsn_s)
        if warn_only:
            self.log.info(format_whatsup(state, "reject_warning", str(reply)))
            return DUNNO
        self.last_reply = reply
        chk.last_reply = reply
        errors = getattr(state, "error_classes", None)   # stand-in states lack it
        if errors is not None:
            errors.add(error_class)
        return REJECT

    def server_error(self, state: SessionState):
        raise _Abort(self.reject(state, _ERR_SOFTWARE, 451, "4.3.5", "Server configuration error"))

    def dict_retry(self, state: SessionState, reply_name: str):
        raise _Abort(self.reject(state, _ERR_DATA, 451, "4.3.0",
                                 f"<{reply_name}>: Temporary lookup failure"))

    def defer_if_permit(self, state: SessionState, code: int, dsn: str, text: str) -> int:
        if state.check.warn_if_reject == 0:
            state.check.defer_if_permit.arm(code, dsn, text)
            return DUNNO
        return self.reject(state, _ERR_POLICY, code, dsn, text)

    # -- list evaluation ------------------------------------------------------
    async def generic_checks(self, state: SessionState, restrictions: list[str],
                             reply_name: str, reply_class: str, def_acl: str | None) -> int:
        chk = state.check
        if chk.recursion > 100:
            # A restriction class that names itself: stop, as for access maps.  A loop
            # through an access table entry is reported as Postfix's check_table_result()
            # does, naming the innermost entry.
            if chk.table_entry is not None:
                table, value = chk.table_entry
                self.log.warning(f"access table {table} entry {value} causes unreasonable "
                                 "recursion")
            else:
                self.log.warning(f"restriction list for {reply_class} causes unreasonable "
                                 "recursion")
            self.server_error(state)
        saved_recursion = chk.recursion
        chk.recursion += 1
        status = DUNNO
        try:
            i = 0
            while i < len(restrictions):
                if state.discard:
                    break
                name = restrictions[i]
                low = name.lower()
                if low == "warn_if_reject":
                    if chk.warn_if_reject == 0:
                        chk.warn_if_reject = chk.recursion
                    i += 1
                    continue
                args = restrictions[i + 1:]
                if is_table_spec(name):
                    # A bare type:table means the list's own check_*_access.
                    if def_acl is None:
                        self.log.warning(
                            "specify one of (check_client_access, check_reverse_client_host_access, "
                            "check_helo_access, check_sender_access, check_recipient_access, "
                            f"check_etrn_access) before {reply_class} restriction \"{name}\"")
                        self.server_error(state)
                    low = def_acl
                    args = restrictions[i:]
                    i -= 1
                ctx = _Ctx(state, reply_name, reply_class, def_acl)
                used = 0
                if low in MAP_COMMANDS:
                    if not args or not is_table_spec(args[0]):
                        self.log.warning(f"restriction {low}: bad argument \"{args[0] if args else ''}\": "
                                         "need maptype:mapname")
                        self.server_error(state)
                    status = await MAP_COMMANDS[low](self, ctx, args[0])
                    used = 1
                elif low in RESTRICTIONS:
                    fn, nargs = RESTRICTIONS[low]
                    if nargs:
                        used = nargs
                    status = await fn(self, ctx, args, name)
                    if nargs and status is None:
                        status = DUNNO
                    if status == OK and low in _PERMIT_LOGGED:
                        cls, who = _PERMIT_LOGGED[low](state, reply_class, reply_name)
                        status = self.acl_permit(state, name, cls, who)
                elif name in self.classes:
                    status = await self.generic_checks(state, self.classes[name], reply_name,
                                                       reply_class, def_acl)
                else:
                    self.log.warning(f"unknown smtpd restriction: \"{name}\"")
                    self.server_error(state)
                i += 1 + used
                if chk.warn_if_reject >= chk.recursion:
                    chk.warn_if_reject = 0
                if status != DUNNO:
                    break
                if chk.defer_if_permit.active and chk.defer_if_reject.active:
                    break
        finally:
            chk.recursion = saved_recursion
        if chk.warn_if_reject >= chk.recursion:
            chk.warn_if_reject = 0
        return status

    async def run_list(self, state: SessionState, restrictions: list[str], reply_name: str,
                       reply_class: str, def_acl: str | None) -> int:
        """One restriction list with Postfix's setjmp boundary."""
        if not restrictions:
            return DUNNO
        try:
            return await self.generic_checks(state, restrictions, reply_name, reply_class, def_acl)
        except _Abort as a:
            return a.status

    # -- access maps ----------------------------------------------------------
    def _table_lookup(self, spec: str, key: str) -> str | None:
        t = self._tables.get(spec) if self._tables is not None else None
        if t is None:
            from postwell.tables import get_table
            t = get_table(spec, self.config)
        return t.lookup(key)

    async def _found(self, ctx: _Ctx, table: str, key: str) -> tuple[bool, int]:
        """Look up one key; (found, status)."""
        try:
            value = self._table_lookup(table, key)
        except Exception as e:  # noqa: BLE001 - any table failure is a config/server problem
            self.warn_once(f"{table}: table lookup problem: {e}")
            return True, await self.table_result(ctx, table, "451 4.3.5 Server configuration error", key)
        if value is None:
            return False, DUNNO
        return True, await self.table_result(ctx, table, value, key)

    async def check_access(self, ctx: _Ctx, table: str, key: str) -> tuple[bool, int]:
        return await self._found(ctx, table, key)

    async def check_domain_access(self, ctx: _Ctx, table: str, domain: str) -> tuple[bool, int]:
        name = domain.lower()
        numeric = parse_ip(domain) is not None and "[" not in domain
        first = True
        while name:
            if first or not _is_regexp(table):
                found, status = await self._found(ctx, table, name)
                if found:
                    return True, status
            # Don't apply subdomain magic to numerical hostnames.
            if numeric:
                break
            j = name.find(".", 1)
            if j < 0:
                break
            name = name[j + 1:] if self.access_parent else name[j:]
            first = False
        return False, DUNNO

    async def check_addr_access(self, ctx: _Ctx, table: str, address: str) -> tuple[bool, int]:
        addr = address
        delim = ":" if ":" in addr else "."
        first = True
        while True:
            if first or not _is_regexp(table):
                found, status = await self._found(ctx, table, addr)
                if found:
                    return True, status
            first = False
            j = addr.rfind(delim)
            if j < 0:
                break
            addr = addr[:j]
            if not addr:
                break
        return False, DUNNO

    async def check_mail_access(self, ctx: _Ctx, table: str, addr: str) -> int:
        state = ctx.state
        other = state.recipient if ctx.reply_class == SENDER else state.sender
        r = self.resolver.resolve(addr, other)
        if r.failed:
            self.dict_retry(state, addr)
        rcpt = r.recipient.lower()
        if "@" not in rcpt:
            self.log.warning(f"check_mail_access: no @domain in address: {rcpt}")
            return DUNNO
        suspicious = (not self.allow_untrusted_routing and r.routed and ctx.reply_class == RECIPIENT)
        for key, partial in access_keys(rcpt, self.recipient_delimiter, self.access_parent):
            if partial and _is_regexp(table):
                continue
            found, status = await self._found(ctx, table, key)
            if found:
                if status == OK and suspicious:
                    return DUNNO
                return status
        return DUNNO

    async def table_result(self, ctx: _Ctx, table: str, value: str, datum: str) -> int:
        """check_table_result(): what an access(5) right-hand side means."""
        state = ctx.state
        cmd, _, rest = value.strip().partition(" ")
        if not _:
            cmd, _, rest = value.strip().partition("\t")
        text = rest.strip()
        up = cmd.upper()
        rn, rc = ctx.reply_name, ctx.reply_class
        if up == "DUNNO":
            return DUNNO
        if up == "REJECT":
            dsn, t = dsn_split("5.7.1", text)
            return self.reject(state, _ERR_POLICY, self.codes["access_map_reject_code"],
                               dsn_fix(dsn, rc, self.log), f"<{rn}>: {rc} rejected: {t or 'Access denied'}")
        if up == "DEFER":
            dsn, t = dsn_split("4.7.1", text)
            return self.reject(state, _ERR_POLICY, self.codes["access_map_defer_code"],
                               dsn_fix(dsn, rc, self.log), f"<{rn}>: {rc} rejected: {t or 'Access denied'}")
        if up == "INFO":
            self.log.info(format_whatsup(state, "info", text))
            return DUNNO
        if up == "WARN":
            self.log.info(format_whatsup(state, "warn", text))
            return DUNNO
        if up in ("FILTER", "HOLD", "DISCARD", "REDIRECT", "BCC", "PREPEND"):
            status = self._delegated_action(ctx, table, up, text, datum)
            if status == OK:    # DISCARD: a permit too
                return self.acl_permit(state, cmd, rc, rn, f"from {table}")
            return status
        if up == "DEFER_IF_PERMIT":
            dsn, t = dsn_split("4.7.1", text)
            return self.defer_if_permit(state, self.codes["access_map_defer_code"], dsn_fix(dsn, rc, self.log),
                                        f"<{rn}>: {rc} rejected: {t or 'Service unavailable'}")
        if up == "DEFER_IF_REJECT":
            dsn, t = dsn_split("4.7.1", text)
            state.check.defer_if_reject.arm(self.codes["access_map_defer_code"], dsn_fix(dsn, rc, self.log),
                                            f"<{rn}>: {rc} rejected: {t or 'Service unavailable'}")
            return DUNNO
        if value.strip().isdigit():
            # An all-numeric result is a time stamp meaning OK.
            return self.acl_permit(state, value.strip(), rc, rn, f"from {table}")
        if len(cmd) == 3 and text and cmd[0] in "45" and cmd[1:].isdigit():
            dsn, t = dsn_split(cmd[0] + ".7.1", text)
            return self.reject(state, _ERR_POLICY, int(cmd), dsn_fix(dsn, rc, self.log),
                               f"<{rn}>: {rc} rejected: {t or 'Access denied'}")
        if up in ("OK", "RELAY"):
            return self.acl_permit(state, cmd, rc, rn, f"from {table}")
        if ":" in value:
            self.log.warning(f"access table {table} has entry with lookup table: {value}")
            self.log.warning("do not specify lookup tables inside SMTPD access maps")
            self.log.warning("define a restriction class and specify its name instead.")
            self.server_error(state)
        if state.check.recursion > 100:
            self.log.warning(f"access table {table} entry {value} causes unreasonable recursion")
            self.server_error(state)
        restrictions = parse_restrictions(value)
        if not restrictions:
            self.log.warning(f"access table {table} entry {value} has empty value")
            return OK
        saved_entry, state.check.table_entry = state.check.table_entry, (table, value)
        try:
            return await self.generic_checks(state, restrictions, rn, rc, ctx.def_acl)
        finally:
            state.check.table_entry = saved_entry

    def _delegated_action(self, ctx: _Ctx, table: str, action: str, text: str, datum: str) -> int:
        state = ctx.state
        rn, rc = ctx.reply_name, ctx.reply_class
        if state.where == "ETRN" and action != "PREPEND":
            # ETRN receives no mail: nothing to store a queue file record in.
            self.log.warning(f"access table {table}: action {action} is unavailable in "
                             "smtpd_etrn_restrictions")
            return DUNNO
        if state.sender is None:
            # Postfix: with smtpd_delay_reject = no, client/helo actions are skipped; its
            # warning names both classes by their reply names, whichever one it was.
            self.log.warning(f"access table {table}: with smtpd_delay_reject=no, action {action} "
                             "is always skipped in Client host or Helo command restrictions")
            return DUNNO
        if action == "FILTER":
            if not text:
                self.log.warning(f"access table {table} entry \"{datum}\" has FILTER entry without value")
            elif ":" not in text:
                self.log.warning(f"access table {table} entry \"{datum}\" requires transport:destination")
            else:
                self.log.info(format_whatsup(state, "filter", f"<{rn}>: {rc} triggers FILTER {text}"))
                state.filter = text
            return DUNNO
        if action == "HOLD":
            if not state.hold:
                self.log.info(format_whatsup(state, "hold",
                                             f"<{rn}>: {rc} {text or 'triggers HOLD action'}"))
                state.hold = True
            return DUNNO
        if action == "DISCARD":
            self.log.info(format_whatsup(state, "discard",
                                         f"<{rn}>: {rc} {text or 'triggers DISCARD action'}"))
            state.discard = True
            return OK
        if action in ("REDIRECT", "BCC"):
            if "@" not in text:
                self.log.warning(f"access table {table} entry \"{datum}\" requires user@domain target")
                return DUNNO
            self.log.info(format_whatsup(state, action.lower(), f"<{rn}>: {rc} triggers {action} {text}"))
            if action == "REDIRECT":
                state.redirect = text
            else:
                state.bcc.append(text)
            return DUNNO
        # PREPEND
        if state.where == "END-OF-MESSAGE":
            self.log.warning(f"access table {table}: action PREPEND must be used before "
                             "smtpd_end_of_data_restrictions")
            return DUNNO
        if not text or not re.match(r"^[!-9;-~]+:", text):
            self.log.warning(f"access table {table} entry \"{datum}\" requires header: text")
            return DUNNO
        state.prepend.append(text)
        return DUNNO

    # -- recipient tables -------------------------------------------------------
    async def check_rcpt_maps(self, state: SessionState, other: str | None, address: str,
                              reply_class: str) -> int:
        r = self.resolver.resolve(address, other)
        if r.failed:
            self.dict_retry(state, address)
        try:
            known, table = self.resolver.recipient_known(r, sender_check=(reply_class == SENDER))
        except Exception:  # noqa: BLE001
            self.dict_retry(state, address)
        if known:
            return DUNNO
        is_sender = reply_class == SENDER
        if r.transport == "error":
            dsn, text = dsn_split("5.1.0" if is_sender else "5.1.1", r.nexthop)
            code = (self.codes["unknown_virtual_alias_reject_code"]
                    if r.flags & ResolveFlag.CLASS_ALIAS else 550)
            return self.reject(state, _ERR_BOUNCE, code, dsn_fix(dsn, reply_class, self.log),
                               f"<{address}>: {reply_class} rejected: {text}")
        if r.transport == "retry":
            dsn, text = dsn_split("4.1.0" if is_sender else "4.1.1", r.nexthop)
            return self.reject(state, _ERR_BOUNCE, 450, dsn_fix(dsn, reply_class, self.log),
                               f"<{address}>: {reply_class} rejected: {text}")
        code_param = {"local recipient table": "unknown_local_recipient_reject_code",
                      "virtual mailbox table": "unknown_virtual_mailbox_reject_code",
                      "relay recipient table": "unknown_relay_recipient_reject_code"}.get(table or "")
        if code_param is None:
            return DUNNO
        suffix = f" in {table}" if self.show_table else ""
        return self.reject(state, _ERR_BOUNCE, self.codes[code_param], "5.1.0" if is_sender else "5.1.1",
                           f"<{address}>: {reply_class} rejected: User unknown{suffix}")

    async def check_recipient_rcpt_maps(self, state: SessionState, recipient: str) -> int:
        chk = state.check
        if chk.recipient_rcptmap_checked:
            return DUNNO
        if chk.warn_if_reject == 0:
            chk.recipient_rcptmap_checked = True
        return await self.check_rcpt_maps(state, state.sender, recipient, RECIPIENT)

    async def check_sender_rcpt_maps(self, state: SessionState, sender: str) -> int:
        chk = state.check
        if chk.sender_rcptmap_checked:
            return DUNNO
        if chk.warn_if_reject == 0:
            chk.sender_rcptmap_checked = True
        return await self.check_rcpt_maps(state, state.recipient, sender, SENDER)

    # -- relay decision -------------------------------------------------------
    def permit_auth_destination(self, state: SessionState, recipient: str) -> int:
        r = self.resolver.resolve(recipient, state.sender)
        if r.failed:
            self.dict_retry(state, recipient)
        if "@" not in r.recipient:
            return OK
        # Source-routed non-local mail has an uncertain destination.
        if not self.allow_untrusted_routing and r.routed:
            return DUNNO
        if r.is_final:
            return OK
        if r.flags & ResolveFlag.CLASS_RELAY:
            return OK
        return DUNNO

    def reject_unauth_destination(self, state: SessionState, recipient: str, code: int, dsn: str) -> int:
        if self.permit_auth_destination(state, recipient) == OK:
            return DUNNO
        return self.reject(state, _ERR_POLICY, code, dsn, f"<{recipient}>: Relay access denied")


def _is_regexp(spec: str) -> bool:
    s = spec
    while s.startswith("proxy:"):
        s = s[6:]
    return s.split(":", 1)[0].lower() in ("regexp", "pcre", "cidr")


def _words(value: str | None) -> list[str]:
    return [w for w in re.split(r"[\s,]+", value or "") if w]


def _bool(value: str | None, default: bool) -> bool:
    if not value:
        return default
    return value.strip().lower() in ("yes", "true", "1", "on")


def parse_restrictions(value: str | None) -> list[str]:
    """Split a restriction list; "{ ... }" groups stay whole (inline tables)."""
    out, cur, depth = [], [], 0
    for ch in value or "":
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        if depth == 0 and ch in " \t\r\n,":
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def access_keys(address: str, delimiter: str, parent: bool) -> list[tuple[str, bool]]:
    """access(5) search order for an e-mail address: user+ext@domain,
    user@domain, domain, parent domains, user+ext@, user@."""
    local, _, domain = address.rpartition("@")
    keys: list[tuple[str, bool]] = [(address, False)]
    stripped = None
    if delimiter and local:
        for ch in delimiter:
            if ch in local and not local.startswith(ch):
                stripped = local.split(ch, 1)[0]
                break
    if stripped is not None:
        keys.append((f"{stripped}@{domain}", True))
    name = domain
    if name:
        keys.append((name, True))
        while True:
            j = name.find(".", 1)
            if j < 0:
                break
            name = name[j + 1:] if parent else name[j:]
            if not name:
                break
            keys.append((name, True))
    keys.append((f"{local}@", True))
    if stripped is not None:
        keys.append((f"{stripped}@", True))
    return keys


def _dup_if_truncate(name: str) -> str:
    if len(name) > 1 and name.endswith(".") and name[-2] != ".":
        return name[:-1]
    return name


def _valid_hostaddr(name: str) -> bool:
    return valid_mailhost_addr(name) is not None or (":" in name and parse_ip(name) is not None)


# ---------------------------------------------------------------------------
# Restriction implementations: async fn(engine, ctx, args, name) -> status

def _ignored_after(e: Engine, c: _Ctx, args, name: str) -> None:
    if args and c.state.check.warn_if_reject == 0:
        text = f"restriction `{args[0]}' after `{name}' is ignored"
        if c.state.check.hold_ignored:
            # Until the smtpd has logged the reject: Postfix's smtpd_check_reject()
            # logs it before generic_checks() warns.
            c.state.check.ignored.append(text)
        else:
            e.log.warning(text)


async def _permit(e: Engine, c: _Ctx, args, name):
    if args:
        e.log.warning(f"restriction `{args[0]}' after `{name}' is ignored")
    return OK


async def _reject(e: Engine, c: _Ctx, args, name):
    status = e.reject(c.state, _ERR_POLICY, e.codes["reject_code"], "5.7.1",
                      f"<{c.reply_name}>: {c.reply_class} rejected: Access denied")
    _ignored_after(e, c, args, name)
    return status


async def _defer(e: Engine, c: _Ctx, args, name):
    status = e.reject(c.state, _ERR_POLICY, e.codes["defer_code"], "4.3.2",
                      f"<{c.reply_name}>: {c.reply_class} rejected: Try again later")
    _ignored_after(e, c, args, name)
    return status


async def _defer_if_permit(e: Engine, c: _Ctx, args, name):
    return e.defer_if_permit(c.state, 450, "4.7.0",
                             f"<{c.reply_name}>: {c.reply_class} rejected: defer_if_permit requested")


async def _defer_if_reject(e: Engine, c: _Ctx, args, name):
    c.state.check.defer_if_reject.arm(450, "4.7.0",
                                      f"<{c.reply_name}>: {c.reply_class} rejected: defer_if_reject requested")
    return DUNNO


async def _sleep(e: Engine, c: _Ctx, args, name):
    if not args or not args[0].isdigit():
        e.log.warning("restriction sleep must be followed by number")
        e.server_error(c.state)
    # Postfix really sleeps (a tarpit); bounded here, and skippable in tests.
    if e.sleep is not None:
        await e.sleep(min(int(args[0]), 300))
    return DUNNO


async def _reject_unauth_pipelining(e: Engine, c: _Ctx, args, name):
    if c.state.pipelining_violation:
        return e.reject(c.state, "protocol", 503, "5.5.0",
                        f"<{c.reply_name}>: {c.reply_class} rejected: Improper use of SMTP command pipelining")
    return DUNNO


async def _reject_plaintext_session(e: Engine, c: _Ctx, args, name):
    if not c.state.encryption_protocol:
        return e.reject(c.state, _ERR_POLICY, e.codes["plaintext_reject_code"], "4.7.1",
                        "Session encryption is required")
    return DUNNO


async def _check_policy_service(e: Engine, c: _Ctx, args, name):
    if not args or ":" not in args[0]:
        e.log.warning("restriction check_policy_service must be followed by transport:server")
        e.server_error(c.state)
    # The client lives in delegation.py (preloaded by the master with every module).
    from .delegation import check_policy_service
    return await check_policy_service(e, c, args[0])


async def _permit_mynetworks(e: Engine, c: _Ctx, args, name):
    try:
        return OK if e.in_mynetworks(c.state.client_name, c.state.client_addr) else DUNNO
    except Exception as ex:  # noqa: BLE001
        e.warn_once(f"mynetworks: {ex}")
        e.server_error(c.state)


async def _permit_inet_interfaces(e: Engine, c: _Ctx, args, name):
    addr = c.state.peer_addr or c.state.client_addr
    return OK if e.own.is_inet(addr) else DUNNO


async def _permit_sasl_authenticated(e: Engine, c: _Ctx, args, name):
    return OK if c.state.sasl_username else DUNNO


async def _reject_unknown_client(e: Engine, c: _Ctx, args, name):
    # Postfix answers 450 whatever unknown_client_reject_code says when the name
    # lookup failed only temporarily (XCLIENT NAME=[TEMPUNAVAIL] says so; our own
    # lookups do not track the status yet: "unknown" counts as permanent).
    if c.state.client_name == "unknown":
        code = (450 if getattr(c.state, "client_name_status", "ok") == "temp"
                else e._int("unknown_client_reject_code", 450))
        return e.reject(c.state, _ERR_POLICY, code, "4.7.25",
                        f"Client host rejected: cannot find your hostname, [{c.state.client_addr}]")
    return DUNNO


async def _reject_unknown_reverse(e: Engine, c: _Ctx, args, name):
    if c.state.reverse_client_name == "unknown":
        code = (450 if getattr(c.state, "reverse_client_name_status", "ok") == "temp"
                else e._int("unknown_client_reject_code", 450))
        return e.reject(c.state, _ERR_POLICY, code, "4.7.1",
                        f"Client host rejected: cannot find your reverse hostname, [{c.state.client_addr}]")
    return DUNNO


async def _reject_invalid_helo(e: Engine, c: _Ctx, args, name):
    h = c.state.helo_name
    if h is None:
        return DUNNO
    if h.startswith("["):
        return _reject_invalid_hostaddr(e, c, h)
    test = _dup_if_truncate(h)
    if not _valid_hostname(test) and not _valid_hostaddr(test):
        return e.reject(c.state, _ERR_POLICY, e.codes["invalid_hostname_reject_code"], "5.5.2",
                        f"<{h}>: {HELO} rejected: Invalid name")
    return DUNNO


def _reject_invalid_hostaddr(e: Engine, c: _Ctx, h: str) -> int:
    test = h[1:-1] if len(h) > 2 and h.startswith("[") and h.endswith("]") else h
    if valid_mailhost_addr(test) is None:
        return e.reject(c.state, _ERR_POLICY, e.codes["invalid_hostname_reject_code"], "5.5.2",
                        f"<{h}>: {HELO} rejected: invalid ip address")
    return DUNNO


async def _reject_non_fqdn_helo(e: Engine, c: _Ctx, args, name):
    h = c.state.helo_name
    if h is None:
        return DUNNO
    if h.startswith("["):
        return _reject_invalid_hostaddr(e, c, h)
    test = _dup_if_truncate(h)
    if not _valid_hostname(test) or "." not in test:
        return e.reject(c.state, _ERR_POLICY, e.codes["non_fqdn_reject_code"], "5.5.2",
                        f"<{h}>: {HELO} rejected: need fully-qualified hostname")
    return DUNNO


def _reject_non_fqdn_address(e: Engine, c: _Ctx, addr: str, reply_class: str) -> int:
    domain = addr.rpartition("@")[2] if "@" in addr else ""
    if domain.startswith("[") and domain.endswith("]"):
        return DUNNO
    test = _dup_if_truncate(domain)
    if not test or not _valid_hostname(test) or "." not in test:
        return e.reject(c.state, _ERR_POLICY, e.codes["non_fqdn_reject_code"], "4.5.2",
                        f"<{addr}>: {reply_class} rejected: need fully-qualified address")
    return DUNNO


async def _reject_non_fqdn_sender(e: Engine, c: _Ctx, args, name):
    s = c.state.sender
    if s:
        return _reject_non_fqdn_address(e, c, s, SENDER)
    return DUNNO


async def _reject_non_fqdn_recipient(e: Engine, c: _Ctx, args, name):
    r = c.state.recipient
    if r is not None:
        return _reject_non_fqdn_address(e, c, r, RECIPIENT)
    return DUNNO


async def _reject_unknown_address(e: Engine, c: _Ctx, addr: str, reply_class: str) -> int:
    r = e.resolver.resolve(addr, c.state.recipient if reply_class == SENDER else c.state.sender)
    if r.failed:
        e.dict_retry(c.state, addr)
    if "@" not in r.recipient:
        return DUNNO
    domain = r.domain
    if r.is_final or (domain.startswith("[") and domain.endswith("]")):
        return DUNNO
    if e.mailhost_lookup is None and not e._dns_tried:
        e._dns_tried = True
        from .dnscheck import default_mailhost_lookup
        e.mailhost_lookup = default_mailhost_lookup(e.config, e.log)
    if e.mailhost_lookup is None:
        return DUNNO
    status = await e.mailhost_lookup(domain)
    is_sender = reply_class == SENDER
    if status == "ok":
        return DUNNO
    if status == "policy":
        e.log.warning(f"{domain}: MX or address lookup error: DNS reply filter drops all results")
        return DUNNO
    if status == "nullmx":
        return e.reject(c.state, _ERR_POLICY, 550 if is_sender else 556,
                        "4.7.27" if is_sender else "4.1.10",
                        f"<{addr}>: {reply_class} rejected: Domain {domain} does not accept mail (nullMX)")
    dsn = "4.1.8" if is_sender else "4.1.2"
    if status == "retry":
        return _defer_if_permit_or_reject(
            e, c.state, _tempfail_defers_if_permit(e, "unknown_address_tempfail_action"), 450,
            dsn, f"<{addr}>: {reply_class} rejected: Domain not found")
    why = "Malformed DNS server reply" if status == "inval" else "Domain not found"
    return e.reject(c.state, _ERR_POLICY, e.codes["unknown_address_reject_code"], dsn,
                    f"<{addr}>: {reply_class} rejected: {why}")


async def _reject_unknown_sender_domain(e: Engine, c: _Ctx, args, name):
    if c.state.sender:
        return await _reject_unknown_address(e, c, c.state.sender, SENDER)
    return DUNNO


async def _reject_unknown_recipient_domain(e: Engine, c: _Ctx, args, name):
    if c.state.recipient:
        return await _reject_unknown_address(e, c, c.state.recipient, RECIPIENT)
    return DUNNO


async def _reject_unlisted_sender(e: Engine, c: _Ctx, args, name):
    if c.state.sender:
        return await e.check_sender_rcpt_maps(c.state, c.state.sender)
    return DUNNO


async def _reject_unlisted_recipient(e: Engine, c: _Ctx, args, name):
    if c.state.recipient:
        return await e.check_recipient_rcpt_maps(c.state, c.state.recipient)
    return DUNNO


async def _permit_auth_destination(e: Engine, c: _Ctx, args, name):
    if c.state.recipient is not None:
        return e.permit_auth_destination(c.state, c.state.recipient)
    return DUNNO


async def _reject_unauth_destination(e: Engine, c: _Ctx, args, name):
    if c.state.recipient is not None:
        return e.reject_unauth_destination(c.state, c.state.recipient,
                                           e.codes["relay_domains_reject_code"], "5.7.1")
    return DUNNO


async def _defer_unauth_destination(e: Engine, c: _Ctx, args, name):
    if c.state.recipient is not None:
        return e.reject_unauth_destination(c.state, c.state.recipient,
                                           e.codes["relay_domains_reject_code"] - 100, "4.7.1")
    return DUNNO


async def _reject_multi_recipient_bounce(e: Engine, c: _Ctx, args, name):
    s = c.state
    if s.sender == "" and s.recipient_count > (0 if s.where == "RCPT" else 1):
        return e.reject(s, _ERR_POLICY, e.codes["multi_recipient_bounce_reject_code"], "5.5.3",
                        f"<{c.reply_name}>: {c.reply_class} rejected: Multi-recipient bounce")
    return DUNNO


# smtpd_sender_login_maps (Postfix smtpd_check.c reject_*_sender_login_mismatch) ------------

def _login_owners(e: Engine, c: _Ctx, sender: str) -> list[str] | None:
    """The SASL logins that own `sender` per smtpd_sender_login_maps, or None when the
    address is not listed. Keys as Postfix's mail_addr_find: the address, the address
    without its extension, then @domain (regexp tables: the address only)."""
    maps = parse_restrictions(e.config.get("smtpd_sender_login_maps"))
    if not maps:
        return None
    local, at, domain = sender.rpartition("@")
    if not at:
        local, domain = sender, ""
    keys = [sender]
    delim = e.recipient_delimiter
    if delim:
        for d in delim:
            if d in local:
                base = local.split(d, 1)[0]
                keys.append(f"{base}@{domain}" if domain else base)
                break
    if domain:
        keys.append(f"@{domain}")
    for spec in maps:
        for i, key in enumerate(dict.fromkeys(keys)):
            if _is_regexp(spec) and i:
                break
            try:
                value = e._table_lookup(spec, key if _is_regexp(spec) else key.lower())
            except Exception as ex:  # noqa: BLE001 - a broken table defers, never permits
                e.warn_once(f"{spec}: table lookup problem: {ex}")
                e.dict_retry(c.state, sender)
                return None
            if value is not None:
                return [w for w in value.replace(",", " ").split() if w]
    return None


def _auth_login_mismatch(e: Engine, c: _Ctx, sender: str, allow_unknown: bool) -> int:
    s = c.state
    if not s.sasl_username or not e.config.get("smtpd_sender_login_maps"):
        return DUNNO
    owners = _login_owners(e, c, sender)
    if owners is None and allow_unknown:
        return DUNNO
    if owners and any(o.lower() == s.sasl_username.lower() for o in owners):
        return DUNNO
    return e.reject(s, _ERR_POLICY, 553, "5.7.1",
                    f"<{sender}>: Sender address rejected: not owned by user {s.sasl_username}")


def _unauth_login_mismatch(e: Engine, c: _Ctx, sender: str) -> int:
    s = c.state
    if s.sasl_username or not e.config.get("smtpd_sender_login_maps"):
        return DUNNO
    if _login_owners(e, c, sender) is not None:
        return e.reject(s, _ERR_POLICY, 553, "5.7.1",
                        f"<{sender}>: Sender address rejected: not logged in")
    return DUNNO


async def _reject_sender_login_mismatch(e: Engine, c: _Ctx, args, name):
    low = name.lower()
    if not _bool(e.config.get("smtpd_sasl_auth_enable"), False):
        # Postfix checks these only with SASL on, warning on every use (even with
        # MAIL FROM:<>); reject_sender_login_mismatch is its built-in class of the
        # authenticated and unauthenticated variants, so it warns twice.
        if low == "reject_sender_login_mismatch":
            for part in ("reject_authenticated_sender_login_mismatch",
                         "reject_unauthenticated_sender_login_mismatch"):
                e.log.warning(f"restriction `{part}' ignored: no SASL support")
        else:
            e.log.warning(f"restriction `{name}' ignored: no SASL support")
        return DUNNO
    name = low
    sender = c.state.sender
    if not sender:
        return DUNNO
    if name == "reject_sender_login_mismatch":
        status = _auth_login_mismatch(e, c, sender, allow_unknown=False)
        return status if status != DUNNO else _unauth_login_mismatch(e, c, sender)
    if name == "reject_authenticated_sender_login_mismatch":
        return _auth_login_mismatch(e, c, sender, allow_unknown=False)
    if name == "reject_known_sender_login_mismatch":
        if c.state.sasl_username:
            return _auth_login_mismatch(e, c, sender, allow_unknown=True)
        return _unauth_login_mismatch(e, c, sender)
    return _unauth_login_mismatch(e, c, sender)


# TLS client certificates (Postfix's permit_tls_clientcerts() / check_ccert_access()).
# A certificate that did not verify still has a fingerprint: both restrictions that look
# fingerprints up accept it, as Postfix does; only permit_tls_all_clientcerts needs trust.

CCERT = "Client certificate"
_CCERT_SEARCH = {"cert_fingerprint": "ccert_fingerprint",
                 "pubkey_fingerprint": "ccert_pubkey_fingerprint"}


def _ask_ccert(e: Engine) -> bool:
    return _bool(e.config.get("smtpd_tls_ask_ccert"), False)


async def _permit_tls_clientcerts(e: Engine, c: _Ctx, args, name):
    s = c.state
    if not s.encryption_protocol:
        return DUNNO
    all_certs = name.lower() == "permit_tls_all_clientcerts"
    if all_certs and s.ccert_trusted and s.ccert_fingerprint:
        return OK
    if not s.ccert_fingerprint:
        if not _ask_ccert(e):
            e.log.warning(f"{name.lower()} is requested, but \"smtpd_tls_ask_ccert = no\"")
        return DUNNO
    from postwell.tables import TableLookupError
    prints = (s.ccert_fingerprint, s.ccert_pubkey_fingerprint)
    for fp in prints:
        if not fp:
            continue
        for table in parse_restrictions(e.config.get("relay_clientcerts")):
            try:
                found = e._table_lookup(table, fp)
            except TableLookupError:
                e.log.warning(f"relay_clientcerts: lookup error for fingerprint '{prints[0]}', "
                              f"pkey fingerprint {prints[1]}")
                e.dict_retry(s, c.reply_name)
            except Exception as ex:  # noqa: BLE001 - a missing table: configuration problem
                e.warn_once(f"relay_clientcerts: {table}: table lookup problem: {ex}")
                e.server_error(s)
            if found is not None:
                return OK
    return DUNNO


def _ccert_search_order(spec: str) -> tuple[str, list[str]] | None:
    """``type:table`` or Postfix 3.5's ``{ type:table, { search_order = cert_fingerprint,
    pubkey_fingerprint } }``; None when it cannot be parsed."""
    order = ["cert_fingerprint", "pubkey_fingerprint"]
    if not spec.startswith("{"):
        return (spec, order) if is_table_spec(spec) else None
    if not spec.endswith("}"):
        return None
    parts = [p.strip() for p in _split_top(spec[1:-1].strip()) if p.strip()]
    if not parts or not is_table_spec(parts[0]):
        return None
    for extra in parts[1:]:
        inner = extra[1:-1].strip() if extra.startswith("{") and extra.endswith("}") else extra
        key, eq, value = inner.partition("=")
        if not eq or key.strip() != "search_order":
            return None
        order = _words(value)
        if not order or any(o not in _CCERT_SEARCH for o in order):
            return None
    return parts[0], order


def _split_top(text: str) -> list[str]:
    out, cur, depth = [], [], 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


async def _check_ccert_access(e: Engine, c: _Ctx, args, name):
    s = c.state
    spec = args[0] if args else ""
    parsed = _ccert_search_order(spec)
    if parsed is None:
        e.log.warning(f"restriction {name.lower()}: bad argument \"{spec}\": need maptype:mapname "
                      "or { maptype:mapname, { search_order = cert_fingerprint, "
                      "pubkey_fingerprint } }")
        return e.reject(s, _ERR_SOFTWARE, 451, "4.3.5", "Server configuration error")
    table, order = parsed
    if not s.ccert_fingerprint:
        if not _ask_ccert(e):
            e.log.warning("check_ccert_access is requested, but \"smtpd_tls_ask_ccert = no\"")
        return DUNNO
    # The reject names the certificate's CN, as Postfix's does.
    sub = _Ctx(s, s.ccert_subject, CCERT, c.def_acl)
    for what in order:
        found, status = await e.check_access(sub, table, getattr(s, _CCERT_SEARCH[what]))
        if status != DUNNO:
            return status
    return DUNNO


# DNS-based restrictions (Postfix's smtpd_check.c reject_rbl_addr/reject_rbl_domain,
# permit_dnswl_*, reject_unknown_hostname, check_server_access, permit_mx_backup).
# The DNS side lives in dnscheck.py; these functions turn its answers into replies.

def _dns(e: Engine):
    """The engine's DnsChecker, made on first use (tests set ``engine.dns_checker``)."""
    chk = getattr(e, "dns_checker", None)
    if chk is None and not getattr(e, "_dns_checker_tried", False):
        e._dns_checker_tried = True
        from .dnscheck import DnsChecker
        chk = e.dns_checker = DnsChecker.from_config(e.config, e.log)
    return chk


def _tempfail_defers_if_permit(e: Engine, param: str) -> bool:
    """*_tempfail_action: defer_if_permit (True) or defer (False)."""
    # Each defaults to $reject_tempfail_action.
    value = (e.config.get(param) or e.config.get("reject_tempfail_action") or "").strip().lower()
    if value not in ("defer_if_permit", "defer"):
        e.warn_once(f"bad configuration: {param} = {value}")
    return value != "defer"


def _defer_if_permit_or_reject(e: Engine, state: SessionState, if_permit: bool, code: int,
                               dsn: str, text: str) -> int:
    if if_permit:
        return e.defer_if_permit(state, code, dsn, text)
    return e.reject(state, _ERR_POLICY, code, dsn, text)


def _gai_strerror(ex) -> str:
    """What getaddrinfo(3) says for a failed host lookup (Postfix's MAI_STRERROR)."""
    return "Name or service not known" if getattr(ex, "permanent", True) else \
        "Temporary failure in name resolution"


def _dns_strerror(ex) -> str:
    """Postfix's dns_strerror(h_errno) for a failed DNS query."""
    return "Host not found" if getattr(ex, "permanent", True) else "Host not found, try again"


def _ascii_domain(domain: str) -> str:
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _missing_domain_arg(e: Engine, args, name: str) -> bool:
    if not args:
        e.log.warning(f"restriction {name} requires domain name argument")
        return True
    return False


async def _dnsxl_find(e: Engine, c: _Ctx, spec: str, query_prefix: str):
    """Look ``query_prefix`` + the list's domain up; None, SOFT or a DnsxlHit that
    passes the "=d.d.d.d" reply filter, if any."""
    from .dnscheck import DnsxlHit, parse_reply_pattern, reply_matches, split_dnsxl
    chk = _dns(e)
    if chk is None:
        return None
    domain, pattern = split_dnsxl(spec)
    octets = None
    if pattern is not None:
        try:
            octets = parse_reply_pattern(pattern)
        except ValueError as ex:
            # Postfix stops the smtpd here (fatal); refuse the request instead.
            e.log.warning(f"RBL reply error: {ex}")
            e.server_error(c.state)
    result = await chk.dnsxl(query_prefix + domain)
    if isinstance(result, DnsxlHit) and octets is not None and \
            not reply_matches(octets, result.addresses):
        return None
    return result


def _rbl_address_prefix(addr: str) -> str | None:
    from .dnscheck import reverse_address_query
    try:
        return reverse_address_query(addr)
    except ValueError:
        return None


def _rbl_domain_prefix(what: str) -> str | None:
    """find_dnsxl_domain(): the domain to look up, or None to skip."""
    if "@" in what:
        domain = what.rpartition("@")[2]
        if domain.startswith("["):
            return None
    else:
        domain = what
    if not domain:
        return None
    # Names ending in a numeric label are never asked (some lists refuse IP queries).
    if domain.rpartition(".")[2].isdigit() or domain.endswith("."):
        return None
    domain = _ascii_domain(domain)
    if not _valid_hostname(domain):
        return None
    return domain + "."


async def _rbl_reject_reply(e: Engine, c: _Ctx, hit, spec: str, what: str, reply_class: str) -> int:
    """rbl_reject_reply(): rbl_reply_maps or default_rbl_reply, expanded."""
    from .dnscheck import TemplateError, expand_template, smtpd_macro, split_dnsxl, unescape
    s = c.state
    template = None
    for table in parse_restrictions(e.config.get("rbl_reply_maps")):
        try:
            template = e._table_lookup(table, spec.lower())
        except Exception as ex:  # noqa: BLE001 - a broken table is a server error
            e.warn_once(f"{table}: table lookup problem: {ex}")
            e.server_error(s)
        if template is not None:
            break
    txt = hit.txt or ""
    values = {"rbl_code": str(e._int("maps_rbl_reject_code", 554)),
              "rbl_domain": split_dnsxl(spec)[0], "rbl_reason": txt, "rbl_txt": txt,
              "rbl_what": what, "rbl_class": reply_class}

    def lookup(n: str):
        return values[n] if n in values else smtpd_macro(s, n, e.log.warning,
                                                         e.config.get("myhostname"))

    allowed = unescape(e.config.get("smtpd_expansion_filter"))
    default = e.config.get("default_rbl_reply")
    while True:
        try:
            why = expand_template(template if template is not None else default, lookup, allowed)
            break
        except TemplateError:
            if template is None:
                e.log.warning(f"rbl_reject_reply: bad default rbl reply template: {default}")
                e.server_error(s)
            e.log.warning(f"rbl_reject_reply: bad rbl reply template for domain {spec}: {template}")
            template = None
    if len(why) < 4 or why[0] not in "45" or not why[1:3].isdigit() or why[3] != " ":
        e.log.warning(f"rbl response code configuration error: {why}")
        return e.reject(s, _ERR_POLICY, 450, "4.7.1", "Service unavailable")
    dsn, text = dsn_split("4.7.1", why[4:])
    return e.reject(s, _ERR_POLICY, int(why[:3]), dsn_fix(dsn, reply_class, e.log),
                    text or "Service unavailable")


async def _reject_rbl_client(e: Engine, c: _Ctx, args, name):
    if _missing_domain_arg(e, args, name):
        return DUNNO
    from .dnscheck import DnsxlHit
    s = c.state
    prefix = _rbl_address_prefix(s.client_addr)
    if prefix is None:
        return DUNNO
    hit = await _dnsxl_find(e, c, args[0], prefix)
    if not isinstance(hit, DnsxlHit):
        return DUNNO        # not listed, or no definitive answer: benefit of the doubt
    return await _rbl_reject_reply(e, c, hit, args[0], s.client_addr, CLIENT)


async def _reject_maps_rbl(e: Engine, c: _Ctx, args, name):
    """The old spelling: reject_rbl_client for each of maps_rbl_domains."""
    if "reject_maps_rbl" not in e._warned:
        e._warned.add("reject_maps_rbl")
        e.log.warning(f"support for restriction \"reject_maps_rbl\" will be removed from "
                      f"{e.config.get('mail_name')}; use \"reject_rbl_client domain-name\" instead")
    for domain in _words(e.config.get("maps_rbl_domains")):
        status = await _reject_rbl_client(e, c, [domain], "reject_rbl_client")
        if status != DUNNO:
            return status
    return DUNNO


def _rhsbl_target(c: _Ctx, name: str) -> tuple[str | None, str]:
    s = c.state
    if name == "reject_rhsbl_client":
        return (s.client_name if s.client_name.lower() != "unknown" else None), CLIENT
    if name == "reject_rhsbl_reverse_client":
        return (s.reverse_client_name if s.reverse_client_name.lower() != "unknown" else None), \
            REV_CLIENT
    if name == "reject_rhsbl_helo":
        return s.helo_name, HELO
    if name == "reject_rhsbl_sender":
        return (s.sender or None), SENDER
    return s.recipient, RECIPIENT


async def _reject_rhsbl(e: Engine, c: _Ctx, args, name):
    if _missing_domain_arg(e, args, name):
        return DUNNO
    from .dnscheck import DnsxlHit
    what, reply_class = _rhsbl_target(c, name.lower())
    if what is None:
        return DUNNO
    prefix = _rbl_domain_prefix(what)
    if prefix is None:
        return DUNNO
    hit = await _dnsxl_find(e, c, args[0], prefix)
    if not isinstance(hit, DnsxlHit):
        return DUNNO
    return await _rbl_reject_reply(e, c, hit, args[0], what, reply_class)


async def _permit_dnswl(e: Engine, c: _Ctx, args, name):
    if _missing_domain_arg(e, args, name):
        return DUNNO
    from .dnscheck import SOFT, DnsxlHit
    s = c.state
    if name.lower() == "permit_rhswl_client":
        if s.client_name.lower() == "unknown":
            return DUNNO
        what, prefix = s.client_name, _rbl_domain_prefix(s.client_name)
    else:
        what, prefix = s.client_addr, _rbl_address_prefix(s.client_addr)
    if prefix is None:
        return DUNNO
    # An allow list must never open the relay: unauthorized recipients stay undecided.
    if s.where == "RCPT" and s.recipient is not None and \
            e.permit_auth_destination(s, s.recipient) != OK:
        return DUNNO
    hit = await _dnsxl_find(e, c, args[0], prefix)
    if hit == SOFT:
        s.check.defer_if_reject.arm(450, "4.7.1", f"<{what}>: {CLIENT} rejected: Service unavailable")
        return DUNNO
    return OK if isinstance(hit, DnsxlHit) else DUNNO


async def _reject_unknown_helo(e: Engine, c: _Ctx, args, name):
    s = c.state
    h = s.helo_name
    if h is None:
        return DUNNO
    if h.startswith("["):
        return _reject_invalid_hostaddr(e, c, h)
    chk = _dns(e)
    if chk is None:
        return DUNNO
    status = await chk.host_status(h)
    if status in ("ok", "nullmx"):
        return DUNNO
    text = f"<{h}>: {HELO} rejected: Host not found"
    if status == "retry":
        return _defer_if_permit_or_reject(
            e, s, _tempfail_defers_if_permit(e, "unknown_helo_hostname_tempfail_action"),
            450, "4.7.1", text)
    return e.reject(s, _ERR_POLICY, e._int("unknown_hostname_reject_code", 450), "4.7.1", text)


async def _check_server_access(e: Engine, c: _Ctx, table: str, name: str, rtype: str,
                               reply_name: str, reply_class: str) -> int:
    """check_server_access(): the MX hosts, name servers or the host itself of
    ``name``'s domain, by name and then by address, against an access table."""
    from postwell.dns import DnsError, MxRecord, NoSuchDomain
    s = c.state
    sub = _Ctx(s, reply_name, reply_class, c.def_acl)
    domain = name.rpartition("@")[2] if "@" in name else name
    # An address literal is its own mail server; it has no name servers.
    if domain.startswith("["):
        if rtype not in ("A", "MX") or not domain.endswith("]"):
            return DUNNO
        bare = valid_mailhost_addr(domain[1:-1])
        if bare is None:
            return DUNNO
        found, status = await e.check_addr_access(sub, table, bare)
        return status
    chk = _dns(e)
    if chk is None:
        return DUNNO
    domain = _ascii_domain(domain)
    if rtype == "A":
        servers = [domain]
    else:
        error = None
        try:
            records = await chk.lookup(domain, rtype)
        except DnsError as ex:
            records, error = [], ex
        if rtype == "MX" and len(records) == 1 and records[0].host in ("", "."):
            return DUNNO                    # RFC 7505 null MX
        if not records and (error is None or isinstance(error, NoSuchDomain)):
            if rtype == "MX":
                # A domain without MX records is its own mail server (RFC 5321 5.1).
                records, error = [MxRecord(0, domain)], None
            else:
                # No NS records here: the parent domains' name servers answer for it.
                where: str | None = domain
                while where is not None:
                    dot = where.find(".")
                    if dot < 0 or dot + 1 >= len(where):
                        where = None
                        break
                    where = where[dot + 1:]
                    try:
                        records, error = await chk.lookup(where, rtype), None
                    except DnsError as ex:
                        records, error = [], ex
                    if records or (error is not None and not error.permanent):
                        break
                domain = where if where else name
        if not records:
            if error is None:
                detail = "Host found but no data record of requested type"
            else:
                detail = _dns_strerror(error)
            e.log.warning(f"Unable to look up {rtype} host for {domain}: {detail}")
            return DUNNO
        servers = [r.host if rtype == "MX" else r for r in records]
    for server in servers:
        if parse_ip(server) is not None:
            found, status = await e.check_addr_access(sub, table, server)
            if status or found:
                return status
            continue
        if rtype != "A":
            found, status = await e.check_domain_access(sub, table, server)
            if status or found:
                return status
        try:
            addrs = await chk.host_addresses(server)
        except DnsError as ex:
            addrs, error = [], ex
        else:
            error = NoSuchDomain(server, "A") if not addrs else None
        if error is not None:
            if rtype != "A":
                e.log.warning(f"Unable to look up {rtype} host {server} for {reply_class} "
                              f"{reply_name}: {_gai_strerror(error)}")
            continue
        for a in addrs:
            found, status = await e.check_addr_access(sub, table, a)
            if status or found:
                return status
    return DUNNO


def _forbid_allowlist(e: Engine, state: SessionState, name: str, status: int, target: str) -> None:
    if not state.discard and status == OK:
        e.log.warning(f"restriction {name} returns OK for {target}")
        e.log.warning("this is not allowed for security reasons")
        e.log.warning("use DUNNO instead of OK if you want to make an exception")
        e.server_error(state)


def _server_access_command(command: str, rtype: str):
    """check_{client,reverse_client_hostname,helo,sender,recipient}_{mx,ns,a}_access."""
    async def run(e: Engine, c: _Ctx, table: str):
        s = c.state
        if command == "client":
            if s.client_name.lower() == "unknown":
                return DUNNO
            name, reply_name, reply_class = s.client_name, s.namaddr, CLIENT
        elif command == "reverse_client_hostname":
            if s.reverse_client_name.lower() == "unknown":
                return DUNNO
            name, reply_name, reply_class = s.reverse_client_name, s.reverse_client_name, REV_CLIENT
        elif command == "helo":
            if s.helo_name is None:
                return DUNNO
            name, reply_name, reply_class = s.helo_name, s.helo_name, HELO
        elif command == "sender":
            if not s.sender:
                return DUNNO
            name, reply_name, reply_class = s.sender, s.sender, SENDER
        else:
            if not s.recipient:
                return DUNNO
            name, reply_name, reply_class = s.recipient, s.recipient, RECIPIENT
        status = await _check_server_access(e, c, table, name, rtype, reply_name, reply_class)
        _forbid_allowlist(e, s, f"check_{command}_{rtype.lower()}_access", status, name)
        return status
    return run


async def _has_my_addr(e: Engine, c: _Ctx, host: str, rcpt: str) -> bool:
    from postwell.dns import DnsError, NoSuchDomain
    chk = _dns(e)
    try:
        addrs = await chk.host_addresses(host)
        if not addrs:
            raise NoSuchDomain(host, "A")
    except DnsError as ex:
        # Unsure whether we are an MX: a reject later becomes a deferral.
        c.state.check.defer_if_reject.arm(
            450, "4.4.4", f"<{rcpt}>: {RECIPIENT} rejected: Unable to look up mail exchanger "
                          f"host {host}: {_gai_strerror(ex)}")
        return False
    return any(e.own.is_own(a) for a in addrs)


async def _i_am_mx(e: Engine, c: _Ctx, hosts: list[str], rcpt: str) -> bool:
    # Names first (mydestination, our address literals); addresses only when needed.
    for host in hosts:
        try:
            if e.resolver.is_local_domain(host):
                return True
        except Exception:  # noqa: BLE001 - a lookup problem: try the addresses instead
            pass
    for host in hosts:
        if await _has_my_addr(e, c, host, rcpt):
            return True
    return False


async def _primary_mx_authorized(e: Engine, c: _Ctx, hosts: list[str], rcpt: str) -> bool:
    """permit_mx_primary(): every address of every primary MX in permit_mx_backup_networks."""
    from postwell.dns import DnsError
    from .matchlist import HostList
    chk = _dns(e)
    networks = HostList("permit_mx_backup_networks", e.config.get("permit_mx_backup_networks"),
                        e.config, tables=e._tables)
    for host in hosts:
        addrs: list[str] = []
        error = None
        for rtype in ("A" if f == "ipv4" else "AAAA" for f in chk.families):
            try:
                addrs += await chk.lookup(host, rtype)
            except DnsError as ex:
                error = error or ex
        if not addrs:
            c.state.check.defer_if_reject.arm(
                450, "4.4.4", f"<{rcpt}>: {RECIPIENT} rejected: Unable to look up host {host} as "
                              f"mail exchanger: {_dns_strerror(error) if error else 'Host not found'}")
            return False
        for a in addrs:
            try:
                ok = networks.match(host, a)
            except Exception:  # noqa: BLE001 - a table problem: defer rather than relay
                e.log.warning(f"all_auth_mx_addr: permit_mx_backup_networks lookup error for "
                              f"address {a} for {host}")
                c.state.check.defer_if_reject.arm(
                    450, "4.4.4", f"<{rcpt}>: {RECIPIENT} rejected: Unable to verify host {host} "
                                  "as mail exchanger")
                return False
            if not ok:
                return False
    return True


async def _permit_mx_backup(e: Engine, c: _Ctx, args, name):
    from postwell.dns import DnsError, NoSuchDomain
    s = c.state
    rcpt = s.recipient
    if rcpt is None:
        return DUNNO
    r = e.resolver.resolve(rcpt, s.sender)
    if r.failed:
        e.dict_retry(s, rcpt)
    if "@" not in r.recipient:
        return OK
    if not e.allow_untrusted_routing and r.routed:
        return DUNNO
    if r.is_final or r.flags & ResolveFlag.CLASS_RELAY:
        return OK
    domain = r.domain
    if domain.startswith("[") and domain.endswith("]"):
        return DUNNO
    chk = _dns(e)
    if chk is None:
        return DUNNO
    try:
        mx = await chk.lookup(_ascii_domain(domain), "MX")
    except NoSuchDomain:
        return DUNNO
    except DnsError as ex:
        s.check.defer_if_reject.arm(450, "4.4.4", f"<{rcpt}>: {RECIPIENT} rejected: Unable to look "
                                                  f"up mail exchanger information: {_dns_strerror(ex)}")
        return DUNNO
    if not mx or (len(mx) == 1 and mx[0].host in ("", ".")):
        return DUNNO
    best = min(m.preference for m in mx)
    primaries = [m.host for m in mx if m.preference == best]
    backups = [m.host for m in sorted(mx) if m.preference != best]
    # Only a backup MX may relay: a primary MX should list the domain itself.
    if await _i_am_mx(e, c, primaries, rcpt):
        return DUNNO
    if not backups or not await _i_am_mx(e, c, backups, rcpt):
        return DUNNO
    if e.config.get("permit_mx_backup_networks").strip() and \
            not await _primary_mx_authorized(e, c, primaries, rcpt):
        return DUNNO
    return OK


def _verify_client(e: Engine):
    """The engine's verify(8) client, made on first use (tests set ``engine.verify_client``)."""
    client = getattr(e, "verify_client", None)
    if client is None:
        from postwell.verify.client import VerifyClient
        client = e.verify_client = VerifyClient.from_config(e.config)
    return client


async def _reject_unverified_address(e: Engine, c: _Ctx, addr: str, reply_class: str,
                                     prefix: str) -> int:
    """Postfix's reject_unverified_address(): ask verify(8), polling while a probe
    is in progress (address_verify_poll_count x address_verify_poll_delay)."""
    from postwell.verify import STATUS_BOUNCE, STATUS_DEFER, STATUS_OK, STATUS_TODO
    from postwell.verify.client import VerifyError
    s = c.state
    client = _verify_client(e)
    try:
        polls = max(1, int(e.config.get("address_verify_poll_count") or "3"))
    except ValueError:
        polls = 3
    try:
        delay = e.config.get_time("address_verify_poll_delay")
    except Exception:   # noqa: BLE001 - a bad value: Postfix's default
        delay = 3.0
    sleep = e.sleep
    if sleep is None:
        import asyncio
        sleep = asyncio.sleep
    dsn = "4.1.7" if reply_class == SENDER else "4.1.1"
    if_permit = _tempfail_defers_if_permit(e, f"{prefix}_tempfail_action")
    count = 0
    while True:
        try:
            status, why = await client.query(addr)
        except VerifyError:
            e.log.warning(f"{e.config.get('address_verify_service_name') or 'verify'} "
                          "service failure")
            return _defer_if_permit_or_reject(
                e, s, if_permit, 450, dsn,
                f"<{addr}>: {reply_class} rejected: address verification problem")
        if status != STATUS_TODO:
            break
        count += 1
        if count >= polls:
            break
        await sleep(delay)
    if status in (STATUS_TODO, STATUS_DEFER):
        code = e._int(f"{prefix}_defer_code", 450)
    elif status == STATUS_BOUNCE:
        code = e._int(f"{prefix}_reject_code", 450)
    elif status == STATUS_OK:
        return DUNNO
    else:
        e.log.warning(f"unknown address verification status {status}")
        return DUNNO
    alt = e.config.get(f"{prefix}_reject_reason") or ""
    if code >= 400 and alt:
        why = alt
    if code // 100 == 2:
        return DUNNO
    if code // 100 == 4:
        return _defer_if_permit_or_reject(e, s, if_permit, code, dsn,
                                          f"<{addr}>: {reply_class} rejected: unverified address: "
                                          f"{why[:250]}")
    return e.reject(s, _ERR_POLICY, code, dsn,
                    f"<{addr}>: {reply_class} rejected: undeliverable address: {why}")


async def _reject_unverified_sender(e: Engine, c: _Ctx, args, name):
    if c.state.sender:
        return await _reject_unverified_address(e, c, c.state.sender, SENDER, "unverified_sender")
    return DUNNO


async def _reject_unverified_recipient(e: Engine, c: _Ctx, args, name):
    if c.state.recipient:
        return await _reject_unverified_address(e, c, c.state.recipient, RECIPIENT,
                                                "unverified_recipient")
    return DUNNO


async def _not_available(e: Engine, c: _Ctx, args, name):
    e.warn_once(f"restriction `{name}' ignored: not supported by postwell yet")
    return DUNNO


# access-map commands -------------------------------------------------------

async def _check_client_access(e: Engine, c: _Ctx, table: str):
    s = c.state
    sub = _Ctx(s, s.namaddr, CLIENT, c.def_acl)
    found, status = await e.check_domain_access(sub, table, s.client_name)
    if found or status:
        return status
    found, status = await e.check_addr_access(sub, table, s.client_addr)
    return status


async def _check_reverse_client_access(e: Engine, c: _Ctx, table: str):
    s = c.state
    sub = _Ctx(s, s.reverse_client_name, REV_CLIENT, c.def_acl)
    found, status = await e.check_domain_access(sub, table, s.reverse_client_name)
    if not (found or status):
        found, status = await e.check_addr_access(sub, table, s.client_addr)
    if status == OK and not s.discard:
        e.log.warning(f"restriction check_reverse_client_hostname_access returns OK for "
                      f"{s.reverse_client_name}")
        e.log.warning("this is not allowed for security reasons")
        e.log.warning("use DUNNO instead of OK if you want to make an exception")
        e.server_error(s)
    return status


async def _check_helo_access(e: Engine, c: _Ctx, table: str):
    s = c.state
    if s.helo_name is None:
        return DUNNO
    found, status = await e.check_domain_access(_Ctx(s, s.helo_name, HELO, c.def_acl), table, s.helo_name)
    return status


async def _check_etrn_access(e: Engine, c: _Ctx, table: str):
    s = c.state
    if s.etrn_name is None:
        return DUNNO
    sub = _Ctx(s, s.etrn_name, ETRN, c.def_acl)
    found, status = await e.check_domain_access(sub, table, s.etrn_name)
    return status


async def _check_sender_access(e: Engine, c: _Ctx, table: str):
    s = c.state
    if s.sender is None:
        return DUNNO
    sub = _Ctx(s, s.sender, SENDER, c.def_acl)
    if s.sender == "":
        found, status = await e.check_access(sub, table, e.null_key)
        return status
    return await e.check_mail_access(sub, table, s.sender)


async def _check_recipient_access(e: Engine, c: _Ctx, table: str):
    s = c.state
    if s.recipient is None:
        return DUNNO
    return await e.check_mail_access(_Ctx(s, s.recipient, RECIPIENT, c.def_acl), table, s.recipient)


async def _check_sasl_access(e: Engine, c: _Ctx, table: str):
    s = c.state
    if not s.sasl_username:
        return DUNNO
    sane = "".join(ch if ch.isprintable() else "_" for ch in s.sasl_username)
    found, status = await e.check_access(_Ctx(s, sane, "SASL login name", c.def_acl), table, s.sasl_username)
    return status


MAP_COMMANDS: dict[str, Callable] = {
    "check_client_access": _check_client_access,
    "check_reverse_client_hostname_access": _check_reverse_client_access,
    "check_helo_access": _check_helo_access,
    "check_sender_access": _check_sender_access,
    "check_recipient_access": _check_recipient_access,
    "check_sasl_access": _check_sasl_access,
    "check_etrn_access": _check_etrn_access,
}
for _cmd in ("client", "reverse_client_hostname", "helo", "sender", "recipient"):
    for _rtype in ("MX", "NS", "A"):
        MAP_COMMANDS[f"check_{_cmd}_{_rtype.lower()}_access"] = _server_access_command(_cmd, _rtype)

# name -> (function, number of arguments it consumes)
RESTRICTIONS: dict[str, tuple[Callable, int]] = {
    "permit": (_permit, 0),
    "reject": (_reject, 0),
    "defer": (_defer, 0),
    "defer_if_permit": (_defer_if_permit, 0),
    "defer_if_reject": (_defer_if_reject, 0),
    "sleep": (_sleep, 1),
    "reject_unauth_pipelining": (_reject_unauth_pipelining, 0),
    "reject_plaintext_session": (_reject_plaintext_session, 0),
    "check_policy_service": (_check_policy_service, 1),
    "permit_mynetworks": (_permit_mynetworks, 0),
    "permit_inet_interfaces": (_permit_inet_interfaces, 0),
    "permit_sasl_authenticated": (_permit_sasl_authenticated, 0),
    "reject_unknown_client_hostname": (_reject_unknown_client, 0),
    "reject_unknown_client": (_reject_unknown_client, 0),
    "reject_unknown_reverse_client_hostname": (_reject_unknown_reverse, 0),
    "reject_invalid_helo_hostname": (_reject_invalid_helo, 0),
    "reject_invalid_hostname": (_reject_invalid_helo, 0),
    "reject_non_fqdn_helo_hostname": (_reject_non_fqdn_helo, 0),
    "reject_non_fqdn_hostname": (_reject_non_fqdn_helo, 0),
    "reject_non_fqdn_sender": (_reject_non_fqdn_sender, 0),
    "reject_non_fqdn_recipient": (_reject_non_fqdn_recipient, 0),
    "reject_unknown_sender_domain": (_reject_unknown_sender_domain, 0),
    "reject_unknown_address": (_reject_unknown_sender_domain, 0),
    "reject_unknown_recipient_domain": (_reject_unknown_recipient_domain, 0),
    "reject_unlisted_sender": (_reject_unlisted_sender, 0),
    "reject_unlisted_recipient": (_reject_unlisted_recipient, 0),
    "check_recipient_maps": (_reject_unlisted_recipient, 0),
    "permit_auth_destination": (_permit_auth_destination, 0),
    "reject_unauth_destination": (_reject_unauth_destination, 0),
    "defer_unauth_destination": (_defer_unauth_destination, 0),
    "reject_multi_recipient_bounce": (_reject_multi_recipient_bounce, 0),
    "reject_unknown_helo_hostname": (_reject_unknown_helo, 0),
    "reject_unknown_hostname": (_reject_unknown_helo, 0),
    "reject_unverified_sender": (_reject_unverified_sender, 0),
    "reject_unverified_recipient": (_reject_unverified_recipient, 0),
    "permit_tls_clientcerts": (_permit_tls_clientcerts, 0),
    "permit_tls_all_clientcerts": (_permit_tls_clientcerts, 0),
    "check_ccert_access": (_check_ccert_access, 1),
    "permit_mx_backup": (_permit_mx_backup, 0),
    "reject_sender_login_mismatch": (_reject_sender_login_mismatch, 0),
    "reject_authenticated_sender_login_mismatch": (_reject_sender_login_mismatch, 0),
    "reject_known_sender_login_mismatch": (_reject_sender_login_mismatch, 0),
    "reject_unauthenticated_sender_login_mismatch": (_reject_sender_login_mismatch, 0),
}

RESTRICTIONS.update({
    "reject_rbl_client": (_reject_rbl_client, 1),
    "reject_rbl": (_reject_rbl_client, 1),
    "reject_maps_rbl": (_reject_maps_rbl, 0),
    "reject_rhsbl_client": (_reject_rhsbl, 1),
    "reject_rhsbl_reverse_client": (_reject_rhsbl, 1),
    "reject_rhsbl_helo": (_reject_rhsbl, 1),
    "reject_rhsbl_sender": (_reject_rhsbl, 1),
    "reject_rhsbl_recipient": (_reject_rhsbl, 1),
    "permit_dnswl_client": (_permit_dnswl, 1),
    "permit_rhswl_client": (_permit_dnswl, 1),
})

# The built-in permits that smtpd_log_access_permit_actions can log: name -> what the
# "for CLASS=NAME" part of the line shows (Postfix's generic_checks()).
_PERMIT_LOGGED: dict[str, Callable] = {
    "permit": lambda s, rc, rn: (rc, rn),
    "permit_naked_ip_address": lambda s, rc, rn: (HELO, s.helo_name),
    **{n: (lambda s, rc, rn: (CLIENT, s.namaddr)) for n in (
        "permit_mynetworks", "permit_inet_interfaces", "permit_sasl_authenticated",
        "permit_tls_clientcerts", "permit_tls_all_clientcerts", "permit_dnswl_client",
        "permit_rhswl_client")},
    **{n: (lambda s, rc, rn: (RECIPIENT, s.recipient)) for n in (
        "permit_auth_destination", "permit_mx_backup", "check_relay_domains")},
}

REQUIRED_RELAY = ["reject_unauth_destination", "defer_unauth_destination", "reject", "defer",
                  "defer_if_permit", "check_relay_domains"]


def has_required(restrictions: list[str], classes: dict[str, list[str]], required: list[str],
                 _depth: int = 0) -> bool:
    if _depth > 100:
        return False
    i = 0
    while i < len(restrictions):
        r = restrictions[i]
        if r == "warn_if_reject" and i + 1 < len(restrictions):
            i += 2
            continue
        if r in required:
            return True
        if r in classes and has_required(classes[r], classes, required, _depth + 1):
            return True
        i += 1
    return False

