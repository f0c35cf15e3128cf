"""Cleanup as a library: what Postfix's cleanup(8) daemon does, in-process.

One :class:`Cleanup` per process; one :class:`CleanupSession` per message.
The session creates the queue file at ``open()`` (the queue id is known from
then on, for the smtpd's ``ID: client=...`` log line), streams content through
:class:`~postwell.cleanup.headers.ContentProcessor` into the queue file, and
at ``finish()`` expands virtual aliases, de-duplicates recipients, commits
durably and only then answers 250.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from ..queue import HOLD_ATTRIBUTE, QueueStore, QueueWriteError, notify_qmgr
from ..queue.store import wake_qmgr_kept
from ..dsn.orcpt import is_utf8_address as _utf8_address, stored_orcpt
from ..smtp.reply import Reply
from .addresses import ADDRESS_HEADERS, rewrite_header, rewrite_local
from .canonical import (ENVELOPE_RECIPIENT, ENVELOPE_SENDER, HEADER_RECIPIENT, HEADER_SENDER,
                        SENDER_HEADERS, AddressMapper)
from .headers import ContentChecks, ContentProcessor, ContentStop, MessageChecks
from . import recsize as rs
from .recsize import SIZE_ATTRIBUTE
from .virtual import (AliasExpansionError, AliasLookupError, VirtualAliasExpander,
                      redirect_recipients)

# Replies as Postfix 3.7's smtpd words them after cleanup's status (checked
# against a real instance).  "552 5.3.4 Message size exceeds fixed limit" is
# the MAIL FROM SIZE= reply (smtpd's); at end of data Postfix says "message
# file too big".
REPLY_QUEUED = "Ok: queued as {}"
REPLY_TOO_BIG = Reply(552, "Error: message file too big", "5.3.4")
REPLY_TOO_MANY_HOPS = Reply(554, "Error: too many hops", "5.4.0")
REPLY_WRITE_ERROR = Reply(451, "Error: queue file write error", "4.3.0")
REPLY_ALIAS_ERROR = Reply(451, "Alias expansion error", "4.6.0")
REPLY_NO_RECIPIENTS = Reply(554, "Error: no valid recipients", "5.5.1")
# Postfix's VSTREAM_BUFSIZE: what smtpd holds before cleanup sees any of a message.
SMTPD_STREAM_BUFFER = 4096
# Envelope attribute for a FILTER action (Postfix's REC_TYPE_FILT): transport:nexthop.
FILTER_ATTRIBUTE = "postwell_filter"
REDIRECT_ATTRIBUTE = "postwell_redirect"


_date_cache: tuple = (None, "")


def mail_date(when: float) -> str:
    """RFC 5322 3.3 date as Postfix's mail_date() writes it: local time, numeric
    zone, and the zone name in a comment: ``Sun, 29 Nov 2026 06:11:14 +0000 (UTC)``."""
    global _date_cache
    # One-second resolution: formatted once for every header of a busy second (the
    # zone names are part of the key, so a tzset() is seen at once).
    key = (int(when), time.tzname)
    if _date_cache[0] == key:
        return _date_cache[1]
    text = _format_mail_date(key[0])
    _date_cache = (key, text)
    return text


def _format_mail_date(when: int) -> str:
    lt = time.localtime(when)
    off = lt.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    zone = f"{sign}{off // 3600:02d}{(off % 3600) // 60:02d}"
    # Postfix's mail_date() pads the day of the month with a space ("Sun,  6 Dec");
    # strftime's %a/%b follow the C locale here (Python does not call setlocale).
    rest = time.strftime("%b %Y %H:%M:%S", lt)
    return f"{time.strftime('%a', lt)}, {lt.tm_mday:2d} {rest} {zone} ({lt.tm_zone or 'UTC'})"


def _quote_local(address: str) -> str:
    """Quote the localpart when needed (RFC 5322 3.4.1), as quote_822_local does."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    specials = set('()<>@,;:\\".[] \t')
    parts = local.split(".")
    if local and (any(not p for p in parts) or any(c in specials and c != "." or ord(c) < 33 for c in local)):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{domain}" if at else local


_wake_pending: dict[str, object] = {}


def wake_qmgr(queue_directory: str) -> None:
    """notify_qmgr() once per event-loop turn: every message committed in one group
    commit round is found by the same incoming scan, so one byte wakes it for all."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        notify_qmgr(queue_directory)
        return
    if _wake_pending.get(queue_directory) is loop:
        return
    _wake_pending[queue_directory] = loop
    loop.call_soon(_wake_now, queue_directory)


def _wake_now(queue_directory: str) -> None:
    _wake_pending.pop(queue_directory, None)
    wake_qmgr_kept(queue_directory)


# The queue file attribute (Postfix's name) for content that declared itself 8-bit.
ENCODING_ATTRIBUTE = "encoding"
# Postfix's SMTPUTF8 flags (smtputf8.h) beyond "requested" (the envelope parameter
# smtputf8 = 1): a header that is not ASCII, a UTF-8 envelope sender.  Postfix keeps
# them in its size record (postcat -e shows the sum as message_size's last field);
# postwell writes this attribute, the decimal sum, only when one is raised.
SMTPUTF8_FLAGS_ATTRIBUTE = "postwell_smtputf8"
# Postfix's REC_TYPE_FULL record (the submitter's full name, sendmail -F).
FULLNAME_ATTRIBUTE = "postwell_fullname"
SMTPUTF8_REQUESTED, SMTPUTF8_HEADER, SMTPUTF8_SENDER = 1, 2, 4


class CleanupSession:
    def __init__(self, cleanup: "Cleanup", rewrite_local: bool, content_checks: bool = False):
        self.cleanup = cleanup
        self.rewrite_local = rewrite_local
        # The tables first: one that cannot be opened fails the open, before a
        # queue file exists.
        checks = cleanup.content_checks() if content_checks else None
        self.msg = cleanup.store.create()
        self.queue_id = self.msg.queue_id
        self.arrival_time = self.msg.arrival_time
        self.size = 0
        self.too_big = False
        self.created = cleanup.store.clock()
        self.fullname: str | None = None
        self._client_recipients = 0
        self._recipient_records = 0     # set when the recipients are output (finish)
        self._envelope_floor = -1
        self.write_error: QueueWriteError | None = None
        self.finished = False
        self._recipients: list[tuple[str, str | None, str | None, str | None]] = []
        self.message_id: str | None = None
        self.content_stop = False
        self.redirect: str | None = None
        self.bcc: list[str] = []
        self._held_log: list[tuple[bool, str]] | None = []
        # header_checks/body_checks state of this message; None: no checks apply.
        self.checks = MessageChecks(checks, self._log_check, self._log_warning) \
            if checks is not None else None
        if self.checks is not None:
            self.checks.queue_id = self.queue_id
        cfg = cleanup
        self.proc = ContentProcessor(self._sink, header_size_limit=cfg.header_size_limit,
                                     hopcount_limit=cfg.hopcount_limit,
                                     line_length_limit=cfg.line_length_limit,
                                     on_header_end=self._missing_headers,
                                     on_message_id=self._log_message_id,
                                     header_rewriter=self._rewrite_header
                                     if rewrite_local or cfg.remote_header_domain else None,
                                     rewrite_names=ADDRESS_HEADERS, checks=self.checks,
                                     mime=cfg.mime, mime_nesting_limit=cfg.mime_nesting_limit,
                                     track_utf8=cfg.smtputf8_enable)
        self._id_logged = False
        self._data_started = False
        self.map_error: Exception | None = None
        # Postfix's smtpd and pickup stamp content_filter on what they receive (mail
        # postwell makes itself is not filtered); an access-map or header_checks
        # FILTER replaces it later, the last one winning.
        self.filter: str | None = cleanup.content_filter() if content_checks else None
        self.external = content_checks
        # Postfix's CLEANUP_FLAG_AUTOUTF8 (smtputf8_autodetect_classes; pickup sets
        # it, None: smtpd mail follows the "smtpd" class, other mail none): a UTF-8
        # envelope address, or a header that is not ASCII, asks for SMTPUTF8.
        self.autodetect_utf8: bool | None = None
        self.utf8_flags = 0               # SMTPUTF8_HEADER | SMTPUTF8_SENDER seen

    # -- envelope ----------------------------------------------------------------
    @property
    def sender(self) -> str:
        return self.msg.sender

    def set_sender(self, sender: str, ret: str | None = None, envid: str | None = None,
                   smtputf8: bool = False, body_type: str | None = None) -> None:
        sender = self.cleanup.qualify(sender)
        mapper = self.cleanup.mapper()
        if mapper is not None:
            try:
                sender = mapper.map(sender, ENVELOPE_SENDER)
            except AliasLookupError as exc:
                self.map_error = exc      # answered 451 by finish()
        if self.cleanup.smtputf8_enable and _utf8_address(sender):
            # Postfix raises its sender flag for every mail class; it asks for
            # SMTPUTF8 (RFC 6531 3.4) only for an autodetect class (finish()).
            self.utf8_flags |= SMTPUTF8_SENDER
        else:
            self.utf8_flags &= ~SMTPUTF8_SENDER
        self.msg.set_sender(sender, ret=ret, envid=envid, smtputf8=smtputf8,
                            body_type=body_type)

    def add_recipient(self, address: str, orig: str | None = None, orcpt: str | None = None,
                      notify: str | None = None) -> None:
        self._recipients.append((address, orig, orcpt, notify))

    def set_attribute(self, name: str, value) -> None:
        # The smtpd sets a dozen per message: straight into the envelope, which is
        # what IncomingMessage.set_attribute() does (drop the packed copy, store).
        msg = self.msg
        msg._envelope = None
        if value is None:
            msg.envelope.attributes.pop(name, None)
        else:
            msg.envelope.attributes[name] = value if type(value) is str else str(value)

    # -- content ----------------------------------------------------------------
    def prepend_header(self, text: str) -> None:
        """A header the receiving server adds in front (its Received: header)."""
        data = text.replace("\r\n", "\n").rstrip("\n").encode("utf-8", "surrogateescape") + b"\n"
        self.size += len(data)
        if self.content_stop:
            return
        try:
            self.proc.prepend_received(data)
        except ContentStop:
            self.content_stop = True

    def write(self, data: bytes) -> None:
        """Message data as received (dot-unstuffed; CRLF or LF lines; any chunking)."""
        if self.finished:
            raise RuntimeError("cleanup session already finished")
        self.size += len(data)
        if self.too_big or self.write_error is not None or self.content_stop:
            return
        if not self._data_started:
            self._data_started = True
            self.proc.begin_client_data()
        proc = self.proc
        try:
            proc.feed(data)
        except ContentStop:
            # REJECT/DISCARD from the checks: as Postfix, nothing more is read into
            # the message (no further checks, no message-id line).
            self.content_stop = True
            return
        # Postfix's cleanup limits its queue file, so what counts is what is stored
        # (after header_size_limit cut the header), in its record sizes; the bytes
        # received are the smtpd's limit (smtp.server).  Past the limit the caller
        # keeps reading the client's data, but nothing more is stored.
        limit = self.cleanup.message_size_limit
        stored = proc.records.stored()
        if limit and stored * 2 > limit:
            floor = self._envelope_floor
            if floor < 0:
                # Once per message, and only for one that nears the limit: Postfix's
                # envelope less its recipient records (aliases and duplicates may
                # still change those), a lower bound of what it adds to the content.
                floor = self._envelope_floor = self._floor()
            if stored + floor > limit:
                self.too_big = True
                self.msg.abort()
        if self._held_log is not None and stored >= SMTPD_STREAM_BUFFER:
            self._release_log()

    def _sink(self, data: bytes) -> None:
        if self.too_big or self.write_error is not None:
            return
        try:
            self.msg.write(data)
        except QueueWriteError as exc:
            self.write_error = exc

    def _rewrite_header(self, raw: bytes, name_len: int) -> bytes | None:
        # A remote client's headers are rewritten only when remote_header_rewrite_domain
        # is set, and then complete addresses with that domain instead of $myorigin
        # (Postfix's "remote" rewrite context; checked side by side with 3.7).
        c = self.cleanup
        mapper = c.mapper()
        return rewrite_header(raw, name_len, c.myorigin if self.rewrite_local
                              else c.remote_header_domain,
                              None if mapper is None else _header_mapper(mapper, self))

    # Postfix's smtpd writes to cleanup through a 4096-byte stream buffer: cleanup
    # sees a small message only at end of data, after the smtpd's end-of-data
    # restrictions, so its lines come after theirs.  Ours are held as long as the
    # message would still sit in that buffer.
    def _log_info(self, text: str) -> None:
        held = self._held_log
        if held is None:
            self.cleanup.log.info(text)
        else:
            held.append((False, text))

    def _log_warning(self, text: str) -> None:
        held = self._held_log
        if held is None:
            self.cleanup.log.warning(text)
        else:
            held.append((True, text))

    def _release_log(self) -> None:
        held, self._held_log = self._held_log, None
        if held:
            log = self.cleanup.log
            for warning, text in held:
                (log.warning if warning else log.info)(text)

    def _log_check(self, verdict) -> None:
        """cleanup's line for a header/body checks action (Postfix cleanup_act_log)."""
        attrs = self.msg.envelope.attributes
        # Postfix names the latest recipient record it read (checked against 3.7).
        last = self._recipients[-1][0] if self._recipients else None
        # Both addresses in external form, a local part that is no dot-atom quoted
        # (info_log_address_format = external; checked against 3.7).
        self._log_info(verdict.log_text(
            self.queue_id, attrs.get("log_message_origin") or "unknown",
            _quote_local(self.msg.sender or ""),
            _quote_local(self.cleanup.qualify(last)) if last is not None else None,
            attrs.get("protocol_name"), attrs.get("helo_name")))

    def _log_message_id(self, value: str, resent: bool) -> None:
        if not resent:
            # Postfix logs "message-id=<>" whenever no plain Message-Id was seen or
            # added, even when a Resent-Message-Id was (cleanup_header_done_callback).
            self.message_id = value
            self._id_logged = True
        self._log_info(f"{self.queue_id}: {'resent-' if resent else ''}message-id={value}")

    def _missing_headers(self, proc: ContentProcessor) -> list[bytes]:
        """Headers Postfix adds when missing: only for local clients unless
        always_add_missing_headers = yes (Postfix >= 2.6)."""
        out: list[bytes] = []
        c = self.cleanup
        # Postfix 3.7 adds them whenever it rewrites headers at all: a remote client's
        # too once remote_header_rewrite_domain is set (its hdr_rewrite_context).
        if not (self.rewrite_local or c.remote_header_domain or c.always_add_missing_headers) \
                or proc.too_many_hops:
            return out
        resent = proc.resent
        pre = "Resent-" if resent else ""
        if not proc.seen(pre + "message-id"):
            stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(self.arrival_time))
            mid = f"<{stamp}.{self.queue_id}@{c.myhostname}>"
            out.append(f"{pre}Message-Id: {mid}".encode())
            self._log_message_id(mid, resent)
        if not proc.seen(pre + "date"):
            out.append(f"{pre}Date: {mail_date(self.arrival_time)}".encode())
        if not proc.seen(pre + "from"):
            sender = self.msg.sender or "MAILER-DAEMON"
            out.append(f"{pre}From: {_quote_local(sender)}".encode("utf-8", "surrogateescape"))
        if c.undisclosed_recipients_header and not proc.has_destination(resent):
            out.append(c.undisclosed_recipients_header.encode("utf-8", "surrogateescape"))
        return out

    # -- the end -----------------------------------------------------------------
    async def finish(self) -> Reply:
        """Commit and answer; 250 is returned only after the durable commit."""
        reply = self._prepare()
        if reply is not None:
            return reply
        try:
            await self.msg.commit_async()
        except QueueWriteError as exc:
            self.cleanup.log.warning(f"{self.queue_id}: {exc}")
            return REPLY_WRITE_ERROR
        return self._committed()

    def finish_sync(self) -> Reply:
        """finish() for callers without an event loop (sendmail/pickup)."""
        reply = self._prepare()
        if reply is not None:
            return reply
        try:
            self.msg.commit()
        except QueueWriteError as exc:
            self.cleanup.log.warning(f"{self.queue_id}: {exc}")
            return REPLY_WRITE_ERROR
        return self._committed()

    def _prepare(self) -> Reply | None:
        if self.finished:
            raise RuntimeError("cleanup session already finished")
        self.finished = True
        self._release_log()
        if not self.too_big and self.write_error is None and not self.content_stop:
            try:
                self.proc.finish()
            except ContentStop:
                self.content_stop = True
        checks = self.checks
        if checks is not None and checks.lookup_failed:
            self.msg.abort()
            return REPLY_WRITE_ERROR
        if checks is not None and (checks.reject is not None or checks.discard):
            # Nothing is queued: a REJECT answers 5XX (or 4XX with a 4.X.X code), a
            # DISCARD answers 250 as if queued (Postfix cleanup_act).
            self.msg.abort()
            if checks.reject is not None:
                code, dsn, text = checks.reject.reply
                return Reply(code, text, dsn)
            return Reply(250, REPLY_QUEUED.format(self.queue_id), "2.0.0")
        if self.too_big:
            self.msg.abort()
            return self._too_big()
        if self.write_error is not None:
            self.msg.abort()
            self.cleanup.log.warning(f"{self.queue_id}: {self.write_error}")
            return REPLY_WRITE_ERROR
        if self.proc.too_many_hops:
            self.cleanup.log.warning(f"{self.queue_id}: message rejected: hopcount exceeded")
            self.msg.abort()
            return REPLY_TOO_MANY_HOPS
        if not self._id_logged:
            # Postfix logs the (missing) message-id for every message.
            self._log_info(f"{self.queue_id}: message-id=<>")
        if checks is not None:
            if checks.hold:
                self.set_hold()
            if checks.filter:
                # Postfix's FILTER record: content_filter for this message only.
                self.filter = checks.filter
        if self.filter:
            self.msg.set_attribute(FILTER_ATTRIBUTE, self.filter)
        if self.proc.utf8_header:
            self.utf8_flags |= SMTPUTF8_HEADER
        if self.autodetect_utf8 is None:
            self.autodetect_utf8 = self.cleanup.autodetect_smtpd and self.external \
                and "client_address" in self.msg.envelope.attributes
        if self.utf8_flags:
            if self.autodetect_utf8:
                # RFC 6531 3.2: a UTF-8 sender or header needs an SMTPUTF8 path
                # (Postfix's autodetection; its smtp client bounces such mail 5.6.7
                # at a server without SMTPUTF8).  Recipients: _output_recipients.
                self._request_smtputf8()
            self.msg.set_attribute(SMTPUTF8_FLAGS_ATTRIBUTE, str(self.utf8_flags))
        try:
            if self.map_error is not None:
                raise self.map_error
            self._output_recipients()
        except AliasExpansionError as exc:
            self.cleanup.log.warning(f"{self.queue_id}: {exc} -- message not accepted, try again later")
            self.msg.abort()
            return REPLY_ALIAS_ERROR
        except AliasLookupError as exc:
            # A table that cannot be read: defer, never lose or bounce (Postfix's words).
            self.cleanup.log.warning(f"{self.queue_id}: {exc} -- message not accepted, try again later")
            self.msg.abort()
            return REPLY_WRITE_ERROR
        if not self.msg.recipients:
            self.msg.abort()
            return REPLY_NO_RECIPIENTS
        # Postfix's size= (qmgr) and postqueue -p size: its content records' length.
        content = self.proc.records.close()
        self.msg.set_attribute(SIZE_ATTRIBUTE, str(content))
        # message_size_limit covers the whole queue file, envelope included, as in
        # Postfix ("the maximal size in bytes of a message, including envelope
        # information"): the file Postfix's cleanup would have written, not ours.
        limit = self.cleanup.message_size_limit
        if limit and content + self._size_bound() > limit \
                and self.postfix_file_size(content) > limit:
            self.too_big = True
            self.msg.abort()
            return self._too_big()
        if self.proc.mime_8bit and self.cleanup.detect_8bit:
            # Postfix's extracted "encoding=8bit" record: a Content-Transfer-Encoding
            # of 8bit or binary overrides the client's BODY= (even BODY=7BIT), so
            # its smtp client sends BODY=8BITMIME (RFC 6152; 3.7 side by side).
            # Undeclared 8-bit text changes nothing.
            self.msg.set_attribute(ENCODING_ATTRIBUTE, "8bit")
        return None

    def _too_big(self) -> Reply:
        """The refusal of a queue file past message_size_limit.  Postfix's cleanup
        logs it when the file is closed at the end of the message (3.7: never while
        the smtpd still sends; a message the smtpd itself found too big reaches no
        end here), then the close of the failed stream, which its pickup path does
        not log."""
        if self.cleanup.logs_size_refusal:
            log = self.cleanup.log
            log.warning(f"{self.queue_id}: queue file size limit exceeded")
            if self.msg.envelope.attributes.get("log_message_origin") != "local":
                log.warning("mail_stream_cleanup: close error")
        return REPLY_TOO_BIG

    def envelope_overhead(self) -> int:
        """Postfix's queue file less its content records (see postfix_file_size)."""
        return self.postfix_file_size(0)

    def postfix_file_size(self, content: int) -> int:
        """The size Postfix's cleanup would give this message's queue file, content
        records of ``content`` bytes included: what message_size_limit measures
        (recsize.py describes the records; checked against 3.7's files)."""
        env = self.msg.envelope
        attrs = env.attributes
        params = env.params
        size = rs.SIZE_RECORD + 3 * rs.EMPTY_RECORD + content
        sec, usec = divmod(round(self.arrival_time * 1_000_000), 1_000_000)
        size += rs.record(len(str(sec)) + 1 + len(str(usec)))
        size += rs.attribute("create_time", str(int(self.created)))
        size += rs.record(rs.text_length(env.sender))
        origin = attrs.get("log_message_origin")
        if origin == "local":
            # pickup: the submitter's full name and the rewrite context; no client, no
            # log_ident record.  What "sendmail -bs" drops (Postfix's stand-alone
            # smtpd) carries neither.
            if "protocol_name" not in attrs:
                size += rs.record(rs.text_length(self.fullname or ""))
                size += rs.attribute("rewrite_context", attrs.get("rewrite_context") or "local")
        elif "client_address" in attrs:
            size += rs.attribute("log_ident", self.queue_id)
            size += rs.attribute("rewrite_context", "local" if self.rewrite_local else "remote")
            # Postfix's smtpd sends the client's identity twice, for logging
            # (log_client_name, ...) and as is (client_name, ...).
            for name, logged in _SMTPD_ATTRIBUTES:
                value = attrs.get(name)
                if value:
                    size += rs.attribute(name, value)
                    if logged:
                        size += rs.attribute("log_" + name, value)
            size += rs.attribute("client_address_type",
                                 "10" if ":" in attrs["client_address"] else "2")
        else:
            # Mail postwell makes itself (notices, forwarded copies): an estimate, the
            # records of Postfix's bounce(8) and local(8) submissions were not compared.
            size += rs.attribute("log_ident", self.queue_id)
            size += rs.attribute("rewrite_context", "local")
        envid = params.get("envid")
        if envid:
            size += rs.attribute("envelope_id", envid)
        if params.get("ret"):
            size += rs.attribute("ret_flags", "1")
        body = params.get("body")
        encoding = _ENCODINGS.get(body.upper()) if body else None
        if encoding:
            size += rs.attribute("encoding", encoding)
        if self.proc.mime_8bit and self.cleanup.detect_8bit:
            # The extracted segment says what the content declared (any part).
            encoding = "8bit"
        if encoding:
            size += rs.attribute("encoding", encoding)
        default_filter = self.cleanup.content_filter() if self.external else None
        if default_filter:
            size += rs.record(rs.text_length(default_filter))
        if self.filter and self.filter != default_filter:
            size += rs.record(rs.text_length(self.filter))
        redirect = attrs.get(REDIRECT_ATTRIBUTE)
        if redirect:
            size += rs.record(rs.text_length(redirect))
        records = self._recipient_records
        if records is None:
            records = self._recipient_records = self._recipients_size()
        return size + records

    def _size_bound(self) -> int:
        """An upper bound of postfix_file_size(0) from character counts alone (a
        character is at most 4 bytes of UTF-8, a record's type and length at most 6;
        every record that postfix_file_size() prices is covered), so the exact price
        is asked only of a message near message_size_limit."""
        env = self.msg.envelope
        attrs = env.attributes
        cleanup = self.cleanup
        chars = (len(self.queue_id) + len(env.sender) + len(self.fullname or "")
                 + len(self.filter or "") + len(cleanup.content_filter() or "")
                 + len(env.params.get("envid") or "")
                 + sum(map(len, attrs)) + sum(map(len, attrs.values())))
        bound = 1024 + 32 * len(attrs)
        records = self._recipient_records
        if records is not None:
            bound += records
        else:
            rcpts = env.recipients
            for r in rcpts:
                chars += len(r.address) + len(r.orig or "") + len(r.orcpt or "")
            bound += len(rcpts) * (128 + 4 * len(cleanup.myorigin))
        return bound + 8 * chars

    def _recipients_size(self) -> int:
        """The recipients' records (per recipient: notify_flags, dsn_orig_rcpt, O, R)."""
        size = 0
        client = self._client_recipients
        for i, r in enumerate(self.msg.envelope.recipients):
            if r.notify:
                size += rs.attribute("notify_flags", str(rs.notify_mask(r.notify)))
            if i < client:
                # The client's ORCPT (the smtpd always has one: the address as given
                # when the client sent none); for sendmail's recipients the address
                # completed with $myorigin.  always_bcc and BCC actions have none.
                size += rs.attribute("dsn_orig_rcpt", r.orcpt or
                                     f"rfc822;{self.cleanup.qualify(r.orig or r.address)}")
            # The original recipient is written even with enable_original_recipient = no.
            size += rs.record(rs.text_length(r.orig or ""))
            size += rs.record(rs.text_length(r.address))
        return size

    def _floor(self) -> int:
        # The queue file's recipients are written only at finish(): none counted here.
        return self.postfix_file_size(0)

    def set_fullname(self, name: str | None) -> None:
        """The submitter's full name (pickup: sendmail -F or the GECOS name), which
        Postfix keeps in its queue file (it counts in message_size_limit; postcat -e
        shows it as sender_fullname)."""
        self.fullname = name
        if name is not None:
            self.set_attribute(FULLNAME_ATTRIBUTE, name)

    def _output_recipients(self) -> None:
        expander = self.cleanup.expander()
        self.msg.clear_recipients()
        dups: set[tuple] = set()
        recipients = self._recipients
        checks = self.checks
        if self.bcc:
            # An access map's BCC: one more recipient, expanded like the others; in
            # Postfix 3.7's queue file it is a recipient as a client's (an ORCPT, no
            # NOTIFY).
            recipients = recipients + [(a, None, None, None) for a in self.bcc]
        # Recipients up to here have an ORCPT record in Postfix's queue file.
        client = len(recipients)
        if checks is not None and checks.bcc:
            # header_checks BCC: "as if specified with NOTIFY=NONE" (header_checks(5);
            # its queue file record says notify_flags=1).
            recipients = recipients + [(a, None, None, "NEVER") for a in checks.bcc]
        if self.external and self.cleanup.always_bcc:
            # Postfix adds always_bcc to mail from smtpd and pickup only
            # (CLEANUP_FLAG_BCC_OK), never to its own notices, as if given with
            # NOTIFY=NEVER (postconf(5)): no DSN for it, and a real recipient of the
            # same address is not its duplicate (checked side by side with 3.7).
            recipients = recipients + [(self.cleanup.always_bcc, None, None, "NEVER")]
        # The latest REDIRECT wins: the checks run after the smtpd's access maps.
        redirect = (checks.redirect if checks is not None else None) or self.redirect
        mapper = self.cleanup.mapper()
        self._client_recipients = -1
        for index, (address, orig, orcpt, notify) in enumerate(recipients):
            if index == client:
                self._client_recipients = len(self.msg.recipients)
            given = address
            if not address:
                # Postfix's cleanup_addr_recipient(): the null recipient goes to
                # $empty_address_recipient; the original stays empty (no orig_to=).
                address = self.cleanup.empty_address_recipient
            address = self.cleanup.qualify(address)
            if mapper is not None:
                address = mapper.map(address, ENVELOPE_RECIPIENT)
            if self.autodetect_utf8 and _utf8_address(address):
                self._request_smtputf8()
            if orig is None:
                orig = given      # Postfix keeps the address as the client gave it
            if orcpt is None and index < client:
                # RFC 3461 5.2.1: Postfix's cleanup records an ORCPT for every
                # recipient record that came without one (sendmail, its own
                # notices, local(8)'s forwarding below a mailing list, verify
                # probes): the address after the local rewrite and canonical
                # mapping, before virtual aliasing; the record is written even
                # when it says what "rfc822;" + the original recipient would
                # (3.7 side by side, postcat -e).  always_bcc and BCC actions
                # get none.  Readers still take a missing one (older queue files)
                # for "rfc822;" + the original recipient.
                orcpt = self._default_orcpt(address)
            targets = expander.expand(address) if expander is not None else [address]
            # Postfix's duplicate filter key (cleanup_out_recipient, checked against
            # 3.7): the client's ORCPT, NOTIFY, the original recipient and the final
            # one, case-folded (its been_here table is BH_FLAG_FOLD): <Y@x> after <y@x>
            # is dropped, while one address reached through two aliases (or as itself
            # and through an alias) is kept once per original recipient.
            fold = (_client_orcpt(orcpt, orig).lower(), notify or "", orig.lower()) \
                if self.cleanup.enable_orcpt else None
            for t in targets:
                key = (t.lower(), fold)
                if key in dups:
                    continue
                dups.add(key)
                self.msg.add_recipient(t, orig=orig if orig is not None else address,
                                       orcpt=orcpt, notify=notify)
        if self._client_recipients < 0:
            self._client_recipients = len(self.msg.recipients)
        # Postfix's queue file keeps the recipients as they are here; its qmgr applies
        # a REDIRECT (so they are priced now); otherwise when a size is asked for.
        self._recipient_records = self._recipients_size() if redirect else None
        if redirect:
            # Postfix's qmgr applies REDIRECT: the first recipient goes to the target
            # (not alias-expanded), the others are finished; nrcpt= counts them all.
            target = self.cleanup.qualify(redirect)
            redirect_recipients(self.msg.recipients, target)
            # Postfix's REDIRECT record (its qmgr lets a redirect override the filter);
            # setting it also drops the envelope packed before the rewrite.
            self.msg.set_attribute(REDIRECT_ATTRIBUTE, target)

    def _request_smtputf8(self) -> None:
        msg = self.msg
        msg._envelope = None              # drop the packed copy, as set_attribute()
        msg.envelope.params["smtputf8"] = "1"

    def _default_orcpt(self, address: str) -> str:
        # RFC 6533 3: a non-ASCII address of SMTPUTF8 mail is of type utf-8.
        utf8 = not address.isascii() and "smtputf8" in self.msg.envelope.params
        return stored_orcpt(("utf-8;" if utf8 else "rfc822;") + address)

    def set_redirect(self, address: str) -> None:
        """An access-map REDIRECT (smtpd): every recipient becomes ``address``."""
        self.redirect = address

    def set_filter(self, spec: str) -> None:
        """An access-map FILTER transport:nexthop (smtpd): this message's content_filter."""
        self.filter = spec

    def add_bcc(self, address: str) -> None:
        """An access-map BCC (smtpd): one more recipient."""
        self.bcc.append(address)

    def set_hold(self) -> None:
        """Put the message on hold (an access-map HOLD action): after the durable commit it
        moves to hold/ instead of waking the qmgr; `postsuper -H` releases it.  The
        envelope says so too, so a qmgr that finds the file in incoming/ before the
        move (another message's wake-up) holds it instead of delivering it."""
        self.hold = True
        self.msg.set_attribute(HOLD_ATTRIBUTE, "1")

    def _committed(self) -> Reply:
        if getattr(self, "hold", False):
            try:
                # rename + fsync of both directories; a crash before it leaves the message
                # in incoming/, where it is delivered: never lost.
                self.cleanup.store.move(self.queue_id, "incoming", "hold")
            except FileNotFoundError:
                pass    # a qmgr scan took it first; it moves held mail to hold/ itself
            except OSError as exc:
                self.cleanup.log.warning(f"{self.queue_id}: cannot move to hold queue: {exc}")
                wake_qmgr(self.cleanup.store.queue_directory)
        else:
            wake_qmgr(self.cleanup.store.queue_directory)
        return Reply(250, REPLY_QUEUED.format(self.queue_id), "2.0.0")

    def abort(self) -> None:
        self.finished = True
        self._release_log()
        self.msg.abort()


class Cleanup:
    # True: cleanup logs its own "queue file size limit exceeded" refusal, with the
    # "mail_stream_cleanup: close error" line that follows it in Postfix (SMTP only).
    logs_size_refusal = True
    _expander_settings: tuple | None = None   # expander()'s settings, read once

    def __init__(self, config, store: QueueStore, log, *, clock: Callable[[], float] | None = None,
                 table_opener: Callable[[str], object] | None = None):
        self.config = config
        self.store = store
        self.log = log
        self.message_size_limit = _int(config, "message_size_limit", 10240000)
        self.header_size_limit = _int(config, "header_size_limit", 102400)
        self.hopcount_limit = _int(config, "hopcount_limit", 50)
        self.line_length_limit = _int(config, "line_length_limit", 2048)
        # Postfix's cleanup parses MIME structure unless told not to (part headers
        # are written "Name:", declared 8bit content is noted).
        self.mime = not _bool(config, "disable_mime_input_processing", False)
        self.mime_nesting_limit = _int(config, "mime_nesting_limit", 100)
        # detect_8bit_encoding_header = no: a Content-Transfer-Encoding never makes
        # the message 8-bit (only BODY= does).
        self.detect_8bit = _bool(config, "detect_8bit_encoding_header", True)
        self.myhostname = config.get("myhostname") or "localhost"
        self.myorigin = (config.get("myorigin") if config.raw("myorigin") is not None else "") or self.myhostname
        self.always_add_missing_headers = _bool(config, "always_add_missing_headers", False)
        self.undisclosed_recipients_header = (config.get("undisclosed_recipients_header") or "") \
            if config.raw("undisclosed_recipients_header") is not None else ""
        # Postfix's cleanup_out_recipient: with enable_original_recipient = no the
        # duplicate filter keys on the final recipient alone (been_here_fixed).
        self.enable_orcpt = _bool(config, "enable_original_recipient", True)
        self.smtputf8_enable = _smtputf8_enabled(config)
        self.autodetect_sendmail = _smtputf8_autodetect(config, "sendmail")
        self.autodetect_smtpd = _smtputf8_autodetect(config, "smtpd")
        self.empty_address_recipient = config.get("empty_address_recipient") or "MAILER-DAEMON"
        self.remote_header_domain = (config.get("remote_header_rewrite_domain") or "").strip() \
            if config.raw("remote_header_rewrite_domain") is not None else ""
        self._table_opener = table_opener
        self._mapper: AddressMapper | None | bool = False
        # receive_override_options = no_address_mappings (a content filter's
        # pre-filter smtpd): no canonical mapping, masquerading or virtual aliasing
        # here; the re-injected copy gets them.
        raw = config.get("receive_override_options") \
            if config.raw("receive_override_options") is not None else ""
        self.no_address_mappings = "no_address_mappings" in raw.replace(",", " ").split()
        self.always_bcc = "" if self.no_address_mappings else (
            (config.get("always_bcc") or "").strip() if config.raw("always_bcc") is not None else "")
        self._checks: ContentChecks | None = None
        self._checks_loaded = False
        self._tables: list | None = None
        self._specs: list[str] | None = None
        if clock is not None:
            store.clock = clock
        # The store built with QueueStore(dir) knows no limits; give it ours so
        # store.space_ok() (smtpd's 452 4.3.1 check) follows queue_minfree.
        if not store.message_size_limit:
            store.message_size_limit = self.message_size_limit
        if not store.queue_minfree:
            store.queue_minfree = _int(config, "queue_minfree", 0)

    def qualify(self, address: str) -> str:
        """Envelope addresses are rewritten in the local context for every client
        (append @$myorigin, bang path, percent hack; checked against 3.7)."""
        return rewrite_local(address, self.myorigin)

    def smtputf8_autodetect(self, mail_class: str) -> bool:
        """Is ``mail_class`` (sendmail, verify, smtpd, qmqpd, forward, bounce,
        notify, all) in smtputf8_autodetect_classes (and smtputf8_enable on)?
        The caller sets the session's ``autodetect_utf8`` from it."""
        if mail_class == "sendmail":
            return self.autodetect_sendmail
        if mail_class == "smtpd":
            return self.autodetect_smtpd
        return _smtputf8_autodetect(self.config, mail_class)

    def open(self, rewrite_local: bool = False, content_checks: bool = False) -> CleanupSession:
        """``content_checks``: apply header_checks/body_checks, as Postfix's cleanup
        does for mail from smtpd and pickup; mail postwell makes itself (notices,
        forwarded copies) is not checked (internal_mail_filter_classes is empty)."""
        return CleanupSession(self, rewrite_local, content_checks)

    def content_filter(self) -> str | None:
        """main.cf content_filter as this service sees it: a master.cf
        ``-o content_filter=`` (the re-injection listener) turns it off."""
        try:
            return self._content_filter
        except AttributeError:
            pass
        # Fixed for the process's life (a reload starts new processes).
        cfg = self.config
        value = None
        if cfg.raw("content_filter") is not None:
            value = cfg.get("content_filter").strip() or None
        self._content_filter = value
        return value

    def content_checks(self) -> ContentChecks | None:
        """The checks tables, opened once per process (a reload starts new
        processes); None when none is configured or receive_override_options has
        no_header_body_checks."""
        if self._checks_loaded:
            return self._checks
        cfg = self.config
        override = cfg.get("receive_override_options") if cfg.raw("receive_override_options") \
            is not None else ""
        if "no_header_body_checks" in override.replace(",", " ").split():
            self._checks = None
        else:
            self._checks = ContentChecks.from_config(cfg, warn=self.log.warning)
        self._checks_loaded = True
        return self._checks

    def _open_tables(self) -> list:
        """The virtual_alias_maps tables, through the tables package's shared
        cache (re-opened when postmap rebuilds a file).  A table that cannot be
        opened fails its lookups, which defers the message (451 4.3.0)."""
        if self._specs is None:
            # The configuration is fixed for the process (a reload starts new ones):
            # parsed once, not for every message.
            raw = self.config.get("virtual_alias_maps") if self.config.raw("virtual_alias_maps") is not None else ""
            self._specs = split_map_list(raw)
        if not self._specs:
            return []
        if self._table_opener is not None:
            if self._tables is None:
                self._tables = [self._table_opener(s) for s in self._specs]
            return self._tables
        from ..tables import get_table   # built by the tables engineer
        warn = self.log.warning
        return [get_table(s, self.config, warn=warn, surrogate=True) for s in self._specs]

    def mapper(self) -> AddressMapper | None:
        """canonical_maps/masquerade_domains settings, made once per process; None
        when none is set (the common case costs one attribute test)."""
        if self._mapper is False:
            if self.no_address_mappings:
                self._mapper = None
                return None
            m = AddressMapper(self.config, myhostname=self.myhostname, myorigin=self.myorigin,
                              open_tables=self._open_specs, warn=self.log.warning)
            self._mapper = m if m.active else None
        return self._mapper

    def _open_specs(self, specs: list[str]) -> list:
        if self._table_opener is not None:
            return [self._table_opener(s) for s in specs]
        from ..tables import get_table
        return [get_table(s, self.config, warn=self.log.warning, surrogate=True) for s in specs]

    def expander(self) -> VirtualAliasExpander | None:
        if self.no_address_mappings:
            return None
        tables = self._open_tables()
        if not tables:
            return None
        settings = self._expander_settings
        if settings is None:
            # The configuration is fixed for the process: read once, not per message
            # (the tables are asked for each time: postmap may rebuild them).
            mydest = {d.lower() for d in (self.config.get_list("mydestination")
                                          if self.config.raw("mydestination") is not None else [])}
            mydest.add(self.myhostname.lower())
            # virtual(5): the bare "user" form applies when the domain is $myorigin too.
            mydest.add(self.myorigin.lower())
            settings = self._expander_settings = (
                [_is_pattern_table(spec) for spec in self._specs or ()],
                dict(expansion_limit=_int(self.config, "virtual_alias_expansion_limit", 1000),
                     recursion_limit=_int(self.config, "virtual_alias_recursion_limit", 1000),
                     recipient_delimiter=self.config.get("recipient_delimiter")
                     if self.config.raw("recipient_delimiter") is not None else "",
                     local_domain=mydest.__contains__))
        patterns, options = settings
        return VirtualAliasExpander([(t.lookup, p) for p, t in zip(patterns, tables)], **options)


# Postfix's smtpd's attributes (3.7 queue files): postwell's name, and whether a
# "log_" copy of it is written too (the values logging uses, XFORWARD's when given).
_SMTPD_ATTRIBUTES = (("client_name", True), ("reverse_client_name", False),
                     ("client_address", True), ("client_port", True),
                     ("server_address", False), ("server_port", False), ("helo_name", True),
                     ("protocol_name", True), ("log_message_origin", False),
                     ("sasl_method", False), ("sasl_username", False), ("sasl_sender", False))
_ENCODINGS = {"7BIT": "7bit", "8BITMIME": "8bit", "BINARYMIME": "binary"}


def split_map_list(text: str) -> list[str]:
    """Split a map list on commas/white space, keeping ``inline:{...}`` braces whole."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        if depth == 0 and (ch in ", \t\n"):
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def _is_pattern_table(spec: str) -> bool:
    kind = spec.split(":", 1)[0].lower()
    if kind == "proxy":
        kind = spec.split(":", 2)[1].lower() if spec.count(":") >= 2 else kind
    return kind in ("regexp", "pcre", "cidr", "socketmap", "tcp")


def _client_orcpt(orcpt: str | None, orig: str | None) -> str:
    """The ORCPT the client sent, for the duplicate filter.  The smtpd may fill
    in the default ``rfc822;<original recipient>`` itself; that one counts as
    no ORCPT, as in Postfix, where only the client's parameter is compared."""
    if not orcpt:
        return ""
    if orig is not None and orcpt.lower() == f"rfc822;{orig}".lower():
        return ""
    return orcpt


def _smtputf8_enabled(config) -> bool:
    try:
        return bool(config.get_bool("smtputf8_enable"))
    except (ValueError, TypeError, KeyError):
        return False


def _smtputf8_autodetect(config, mail_class: str) -> bool:
    try:
        if not config.get_bool("smtputf8_enable"):
            return False
        classes = [c.lower() for c in config.get_list("smtputf8_autodetect_classes")]
    except (ValueError, TypeError, KeyError):
        return False
    return mail_class in classes or "all" in classes


def _int(config, name: str, default: int) -> int:
    if config.raw(name) is None:
        return default
    return config.get_int(name)


def _header_mapper(mapper: AddressMapper, session: CleanupSession) -> Callable[[str, str], str]:
    def run(address: str, header_name: str) -> str:
        cls = HEADER_SENDER if header_name in SENDER_HEADERS else HEADER_RECIPIENT
        try:
            return mapper.map(address, cls)
        except AliasLookupError as exc:
            session.map_error = session.map_error or exc    # answered 451 by finish()
            return address
    return run


def _bool(config, name: str, default: bool) -> bool:
    if config.raw(name) is None:
        return default
    return config.get_bool(name)
