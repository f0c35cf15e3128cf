"""SmtpdPolicy: which restriction lists run at which SMTP stage.

With smtpd_delay_reject = yes (the default) the client, HELO and sender
lists are evaluated at RCPT time, again for every RCPT, exactly as Postfix
does, so that a reject can be logged with the recipient and so that
permit_* decisions about the recipient can override them.  With "no" they
run at their own stage.  smtpd_relay_restrictions run before
smtpd_recipient_restrictions (Postfix >= 2.10 with
smtpd_relay_before_recipient_restrictions = yes).
"""

from __future__ import annotations

from postwell.smtp.reply import Reply

from .restrictions import (CLIENT, DATA, EOD, ETRN, HELO, RECIPIENT, REJECT, REQUIRED_RELAY,
                           SENDER, Engine, PolicyConfigError, format_whatsup, has_required,
                           parse_restrictions)
from .etrn import FLUSH_DENY, FLUSH_OK, FastFlush
from .matchlist import MatchListError
from .state import SessionState


# A sequence error, not a restriction: Postfix's mail_cmd() answers it without a
# "NOQUEUE: reject" log line (checked against 3.7), so the smtpd must not log it.
REPLY_HELO_FIRST = Reply(503, "Error: send HELO/EHLO first", "5.5.1")

# The stages whose restrictions run once for the whole recipient list.
_AFTER_RCPT_STAGES = ("DATA", "BDAT", "END-OF-MESSAGE")


class SmtpdPolicy:
    unlogged_replies = (REPLY_HELO_FIRST,)

    def __init__(self, config, log, **engine_kw):
        self.config = config
        self.log = log
        self.engine = Engine(config, log, **engine_kw)
        g = config.get
        self.delay_reject = _bool(g("smtpd_delay_reject"), True)
        self.helo_required = _bool(g("smtpd_helo_required"), False)
        self.reject_unlisted_recipient = _bool(g("smtpd_reject_unlisted_recipient"), True)
        self.reject_unlisted_sender = _bool(g("smtpd_reject_unlisted_sender"), False)
        self.relay_before_rcpt = _bool(g("smtpd_relay_before_recipient_restrictions"), True)
        self.client_restrictions = parse_restrictions(g("smtpd_client_restrictions"))
        self.helo_restrictions = parse_restrictions(g("smtpd_helo_restrictions"))
        self.sender_restrictions = parse_restrictions(g("smtpd_sender_restrictions"))
        self.relay_restrictions = parse_restrictions(g("smtpd_relay_restrictions"))
        self.recipient_restrictions = parse_restrictions(g("smtpd_recipient_restrictions"))
        self.data_restrictions = parse_restrictions(g("smtpd_data_restrictions"))
        self.eod_restrictions = parse_restrictions(g("smtpd_end_of_data_restrictions"))
        self.etrn_restrictions = parse_restrictions(g("smtpd_etrn_restrictions"))
        self.fast_flush = FastFlush(config)
        override = _words(g("receive_override_options"))
        self.skip_unknown_rcpt = "no_unknown_recipient_checks" in override
        try:
            self.engine.mynetworks  # noqa: B018 - a bad pattern stops the smtpd, as in Postfix
        except MatchListError as e:
            raise PolicyConfigError(str(e)) from None
        classes = self.engine.classes
        if not (has_required(self.recipient_restrictions, classes, REQUIRED_RELAY)
                or has_required(self.relay_restrictions, classes, REQUIRED_RELAY)):
            # Postfix's smtpd refuses to run as a possible open relay.
            raise PolicyConfigError(
                "in parameter smtpd_relay_restrictions or smtpd_recipient_restrictions, specify "
                "at least one working instance of: reject_unauth_destination, "
                "defer_unauth_destination, reject, defer, defer_if_permit or check_relay_domains")

    # ----------------------------------------------------------------------
    @property
    def last_reject_detail(self) -> Reply | None:
        return self.engine.last_reply

    @property
    def resolver(self):
        return self.engine.resolver

    def reject_log_line(self, state: SessionState, reply: Reply) -> str:
        """The 'NOQUEUE: reject: RCPT from ...' line for the smtpd to log."""
        if state.where in _AFTER_RCPT_STAGES and state.recipient_count > 1:
            # Postfix's smtpd_check_data()/smtpd_check_eod() drop the recipient while
            # they run when there are several: one verdict for all, naming one misleads.
            saved, state.recipient = state.recipient, None
            try:
                return format_whatsup(state, "reject", str(reply))
            finally:
                state.recipient = saved
        return format_whatsup(state, "reject", str(reply))

    @staticmethod
    def _result(state: SessionState, status: int) -> Reply | None:
        # Per-session: another session may reject while this one awaits.
        return state.check.last_reply if status == REJECT else None

    # -- one stage each (smtpd_check_client/helo/mail/rcpt/data/eod) ----------
    async def _check_client(self, state: SessionState) -> int:
        chk = state.check
        if not state.client_addr:
            return 0
        chk.defer_if_permit.active = False
        self._reset(state)
        status = await self.engine.run_list(state, self.client_restrictions, state.namaddr,
                                            CLIENT, "check_client_access")
        chk.defer_if_permit_client = chk.defer_if_permit.active
        return status

    async def _check_helo(self, state: SessionState) -> int:
        chk = state.check
        if state.helo_name is None:
            return 0
        chk.defer_if_permit.active = chk.defer_if_permit_client
        self._reset(state)
        status = await self.engine.run_list(state, self.helo_restrictions, state.helo_name,
                                            HELO, "check_helo_access")
        chk.defer_if_permit_helo = chk.defer_if_permit.active
        return status

    async def _check_mail(self, state: SessionState) -> int:
        chk = state.check
        sender = state.sender
        if sender is None:
            return 0
        chk.defer_if_permit.active = chk.defer_if_permit_client or chk.defer_if_permit_helo
        chk.sender_rcptmap_checked = False
        self._reset(state)
        status = await self.engine.run_list(state, self.sender_restrictions, sender,
                                            SENDER, "check_sender_access")
        chk.defer_if_permit_sender = chk.defer_if_permit.active
        if (self.reject_unlisted_sender and status != REJECT and not chk.sender_rcptmap_checked
                and not state.discard and sender and not self.skip_unknown_rcpt):
            status = await self._guarded(state, self.engine.check_sender_rcpt_maps(state, sender))
        return status

    async def _guarded(self, state: SessionState, coro) -> int:
        from .restrictions import _Abort
        try:
            return await coro
        except _Abort as a:
            return a.status

    @staticmethod
    def _reset(state: SessionState) -> None:
        chk = state.check
        chk.recursion = 0
        chk.warn_if_reject = 0
        chk.defer_if_reject.active = False

    # -- public API ------------------------------------------------------------
    async def on_connect(self, state: SessionState, where: str = "CONNECT") -> Reply | None:
        # After XCLIENT the client restrictions run again, and Postfix's warn/hold/...
        # log lines then say "XCLIENT from" (the command being served).
        state.where = where
        if self.delay_reject:
            return None
        return self._result(state, await self._check_client(state))

    async def on_helo(self, state: SessionState, command: str | None = None) -> Reply | None:
        """``command``: "HELO" or "EHLO" as the client sent it (Postfix's log lines
        name it whatever the session's protocol); without it, the protocol says."""
        if command is None:
            command = ("EHLO" if state.protocol and state.protocol.upper().startswith("ESMTP")
                       else "HELO")
        state.where = command
        if self.delay_reject:
            return None
        return self._result(state, await self._check_helo(state))

    async def on_mail(self, state: SessionState) -> Reply | None:
        state.where = "MAIL"
        if self.helo_required and state.helo_name is None:
            return REPLY_HELO_FIRST
        if self.delay_reject:
            return None
        return self._result(state, await self._check_mail(state))

    async def on_rcpt(self, state: SessionState, where: str = "RCPT") -> Reply | None:
        state.where = where
        recipient = state.recipient
        if recipient is None:
            return None
        # RFC 5321 4.5.1: "postmaster" without a domain is always accepted.
        if recipient.lower() == "postmaster":
            return None
        chk = state.check
        chk.recipient_rcptmap_checked = False
        if self.delay_reject:
            for stage in (self._check_client, self._check_helo, self._check_mail):
                if await stage(state) == REJECT:
                    return state.check.last_reply
        chk.defer_if_permit.active = chk.defer_if_permit_sender
        self._reset(state)
        lists = ([self.relay_restrictions, self.recipient_restrictions] if self.relay_before_rcpt
                 else [self.recipient_restrictions, self.relay_restrictions])
        status = 0
        for restrictions in lists:
            status = await self.engine.run_list(state, restrictions, recipient, RECIPIENT,
                                                "check_recipient_access")
            if status == REJECT:
                break
        # An earlier temporary problem turns a permit into a deferral.
        if status != REJECT and chk.defer_if_permit.active:
            d = chk.defer_if_permit
            status = self.engine.reject(state, d.error_class, d.code, d.dsn, d.text)
        if (self.reject_unlisted_recipient and status != REJECT and not chk.recipient_rcptmap_checked
                and not state.discard and not self.skip_unknown_rcpt):
            status = await self._guarded(state, self.engine.check_recipient_rcpt_maps(state, recipient))
        return self._result(state, status)

    async def on_vrfy(self, state: SessionState, address: str) -> Reply | None:
        """VRFY runs the RCPT checks on the address (None: the smtpd answers 252).

        On a reject, state.recipient is left at the address so the reject log
        line carries to=<address> as Postfix's does; restore it after logging.
        """
        saved_where, saved_rcpt = state.where, state.recipient
        state.recipient = address
        state.policy_protocol_state = "VRFY"    # what a policy server is told (Postfix)
        try:
            # Postfix's vrfy_cmd() runs the checks with state->where = VRFY: its permit
            # and warn lines say "VRFY from".
            reply = await self.on_rcpt(state, "VRFY")
        finally:
            state.policy_protocol_state = None
        state.where = "VRFY"
        if reply is None:
            state.where, state.recipient = saved_where, saved_rcpt
        return reply

    async def on_etrn(self, state: SessionState, domain: str) -> Reply | None:
        """smtpd_etrn_restrictions (Postfix's smtpd_check_etrn): the delayed client and
        HELO lists first, then the ETRN list with the domain as the reply name."""
        state.where = "ETRN"
        chk = state.check
        if self.delay_reject:
            for stage in (self._check_client, self._check_helo):
                if await stage(state) == REJECT:
                    return state.check.last_reply
        chk.defer_if_permit.active = chk.defer_if_permit_client or chk.defer_if_permit_helo
        self._reset(state)
        state.etrn_name = domain
        try:
            status = await self.engine.run_list(state, self.etrn_restrictions, domain, ETRN,
                                                "check_etrn_access")
        finally:
            state.etrn_name = None
        if status != REJECT and chk.defer_if_permit.active:
            d = chk.defer_if_permit
            status = self.engine.reject(state, d.error_class, d.code, d.dsn, d.text)
        return self._result(state, status)

    def etrn_flush(self, state: SessionState, domain: str) -> Reply:
        """After on_etrn let it pass: Postfix's flush_send_site() and its replies."""
        verdict = self.fast_flush.check(domain)
        if verdict == FLUSH_OK:
            self.fast_flush.start(domain)
            return Reply(250, "Queuing started")
        if verdict == FLUSH_DENY:
            self.log.warning(f"reject: ETRN {domain[:100]}... from {state.namaddr}")
            return Reply(459, f"<{domain}>: service unavailable")
        self.log.warning("unable to talk to fast flush service")
        return Reply(458, "Unable to queue messages")

    async def _stage_after_rcpt(self, state: SessionState, where: str, restrictions: list[str],
                                reply_name: str, reply_class: str) -> Reply | None:
        state.where = where
        saved = state.recipient
        if state.recipient_count > 1:
            # One restriction for all recipients: naming one would mislead.
            state.recipient = None
        try:
            chk = state.check
            chk.defer_if_permit.active = False
            self._reset(state)
            status = await self.engine.run_list(state, restrictions, reply_name, reply_class, None)
            if status != REJECT and chk.defer_if_permit.active:
                d = chk.defer_if_permit
                status = self.engine.reject(state, d.error_class, d.code, d.dsn, d.text)
            return self._result(state, status)
        finally:
            state.recipient = saved

    async def on_data(self, state: SessionState, command: str = "DATA") -> Reply | None:
        """smtpd_data_restrictions, at DATA or at the first BDAT (command = "BDAT": the
        reject log line then says "reject: BDAT from ...", as Postfix's does)."""
        return await self._stage_after_rcpt(state, command, self.data_restrictions, "DATA", DATA)

    async def on_end_of_data(self, state: SessionState) -> Reply | None:
        return await self._stage_after_rcpt(state, "END-OF-MESSAGE", self.eod_restrictions,
                                            "END-OF-MESSAGE", EOD)


def xtext(text: str) -> str:
    """Postfix's xtext_quote(): bytes outside "!".."~", and "+", as "+XX"."""
    out = []
    for b in text.encode("utf-8", "surrogateescape"):
        out.append(chr(b) if 32 < b < 127 and b != 0x2B else f"+{b:02X}")
    return "".join(out)


def policy_tls_attributes(state: SessionState) -> list[tuple[str, str]]:
    """The TLS attributes of an smtpd_access_policy request, in Postfix 3.7's order
    and form (checked against it): the certificate's CN and issuer are sent, xtext
    quoted, only when it verified; its fingerprints whenever one was presented, so a
    policy server can match untrusted certificates too."""
    trusted = state.ccert_trusted and bool(state.ccert_fingerprint)
    tls = bool(state.encryption_protocol)
    return [
        ("ccert_subject", xtext(state.ccert_subject) if trusted else ""),
        ("ccert_issuer", xtext(state.ccert_issuer) if trusted else ""),
        ("ccert_fingerprint", state.ccert_fingerprint if tls else ""),
        ("ccert_pubkey_fingerprint", state.ccert_pubkey_fingerprint if tls else ""),
        ("encryption_protocol", state.encryption_protocol or ""),
        ("encryption_cipher", state.encryption_cipher or "" if tls else ""),
        ("encryption_keysize", str(state.encryption_keysize or 0) if tls else "0"),
    ]


def _bool(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("yes", "true", "1", "on")


def _words(value: str | None) -> list[str]:
    import re
    return [w for w in re.split(r"[\s,]+", value or "") if w]
