"""The per-session facts restrictions look at (Postfix's SMTPD_STATE subset)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeferredReply:
    """A defer_if_permit / defer_if_reject reply waiting to be used."""
    active: bool = False
    code: int = 450
    dsn: str = "4.7.1"
    text: str = ""
    error_class: str = "policy"

    def arm(self, code: int, dsn: str, text: str, error_class: str = "policy") -> None:
        # The first reason wins, to keep the story simple for the client.
        if not self.active:
            self.active, self.code, self.dsn, self.text = True, code, dsn, text
            self.error_class = error_class


@dataclass
class CheckState:
    """Bookkeeping of the restriction engine; reset as Postfix resets it."""
    recursion: int = 0
    warn_if_reject: int = 0
    defer_if_reject: DeferredReply = field(default_factory=DeferredReply)
    defer_if_permit: DeferredReply = field(default_factory=DeferredReply)
    defer_if_permit_client: bool = False
    defer_if_permit_helo: bool = False
    defer_if_permit_sender: bool = False
    recipient_rcptmap_checked: bool = False
    sender_rcptmap_checked: bool = False
    last_reply: object = None               # the Reply of the last reject (per session)
    # "restriction `x' after `reject' is ignored": Postfix logs it after the reject
    # line.  An smtpd that logs the reject once the check is over sets hold_ignored
    # and logs these after it; otherwise they are logged at once.
    hold_ignored: bool = False
    table_entry: object = None              # (table, value) of the access entry expanding
    ignored: list = field(default_factory=list)


@dataclass
class SessionState:
    client_name: str = "unknown"            # verified name or "unknown"
    client_addr: str = ""
    client_port: str = ""
    # The connection's own peer address, which XCLIENT leaves alone: Postfix's
    # permit_inet_interfaces looks at the socket, not at the client XCLIENT named.
    peer_addr: str | None = None
    reverse_client_name: str = "unknown"
    server_addr: str = ""
    server_port: str = ""
    helo_name: str | None = None
    protocol: str = "SMTP"                  # SMTP / ESMTP (ESMTPS, ESMTPA... when known)
    sender: str | None = None               # None before MAIL FROM; "" is the null sender
    recipient: str | None = None            # the RCPT TO address being checked
    recipient_count: int = 0                # accepted recipients so far
    etrn_name: str | None = None            # the ETRN domain while smtpd_etrn_restrictions run
    sasl_method: str | None = None
    sasl_username: str | None = None
    sasl_sender: str | None = None
    queue_id: str | None = None
    act_size: int = 0                       # bytes received, only while END-OF-MESSAGE checks run
    policy_protocol_state: str | None = None   # overrides `where` in a policy request (VRFY)
    encryption_protocol: str | None = None  # TLS placeholders
    encryption_cipher: str | None = None
    encryption_keysize: int = 0
    tls_peer_cert_fingerprint: str | None = None
    # The TLS client certificate (smtpd_tls_ask_ccert), set by the smtpd after the
    # handshake; a certificate that does not verify is still present, as in Postfix.
    ccert_subject: str = ""                 # its CN ("" when none or unusable)
    ccert_issuer: str = ""                  # the issuer's CN (else O)
    ccert_fingerprint: str = ""             # "AB:CD:..." (smtpd_tls_fingerprint_digest); "" = none
    ccert_pubkey_fingerprint: str = ""
    ccert_trusted: bool = False             # verified against smtpd_tls_CAfile/CApath
    pipelining_violation: bool = False      # set by smtpd for reject_unauth_pipelining
    smtputf8: bool = False
    message_size: int = 0
    where: str = "CONNECT"                  # CONNECT HELO EHLO MAIL RCPT DATA END-OF-MESSAGE
    # Side effects of access-map actions, for the smtpd/cleanup to apply.
    discard: bool = False
    hold: bool = False
    filter: str | None = None
    redirect: str | None = None
    bcc: list[str] = field(default_factory=list)
    prepend: list[str] = field(default_factory=list)
    # Postfix's error_mask: classes ("software", "resource", "policy", ...) of the
    # rejects sent this session, for smtpd's notify_classes notice to postmaster.
    # Session-wide; the smtpd clears it once it has sent the notice.
    error_classes: set[str] = field(default_factory=set)
    check: CheckState = field(default_factory=CheckState)
    # name[addr] as log lines and replies show the client; None: made from client_name
    # and client_addr.  The smtpd pins it while an XCLIENT command changes those: Postfix
    # builds its name[addr] anew only once such a command has succeeded.
    shown_namaddr: str | None = None
    port_logging: bool = False              # smtpd_client_port_logging: name[addr]:port

    @property
    def namaddr(self) -> str:
        shown = self.shown_namaddr
        if shown is not None:
            return shown
        if self.port_logging and self.client_port:
            return f"{self.client_name}[{self.client_addr}]:{self.client_port}"
        return f"{self.client_name}[{self.client_addr}]"

    def reset_transaction(self) -> None:
        """After RSET / end of a mail transaction (access-map actions are per message)."""
        self.sender = None
        self.recipient = None
        self.recipient_count = 0
        self.discard = False
        self.hold = False
        self.filter = None
        self.redirect = None
        self.bcc = []
        self.prepend = []
        self.queue_id = None
        self.check.defer_if_permit_sender = False
        self.check.sender_rcptmap_checked = False
