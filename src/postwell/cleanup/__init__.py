"""postwell.cleanup: Postfix's cleanup(8) as a library.

``Cleanup(config, store, log)``; ``cs = cleanup.open(rewrite_local)`` creates
the queue file (queue id known at once); ``set_sender`` / ``add_recipient`` /
``set_attribute`` / ``prepend_header`` / ``write``; ``await cs.finish()``
answers only after the durable commit (``finish_sync()`` without a loop).

What it does to a message, each point checked against Postfix 3.7:

* line ends: CRLF and LF become LF, a bare CR becomes a space;
* envelope addresses: local-context rewriting for every client (append
  @$myorigin, ``host!user``, ``user%domain``, trailing dots);
* header block: streamed, never held whole; Bcc, Resent-Bcc, Return-Path and
  Content-Length removed; a leading mbox ``From `` line becomes
  X-Mailbox-Line:; a first line starting with white space starts the body;
  a non-header line ends the header block (an empty line is inserted);
* for local clients (local_header_rewrite_clients, decided by the smtpd), remote
  ones when remote_header_rewrite_domain is set (that domain completes their
  addresses) or always_add_missing_headers = yes: address headers rewritten
  (canonical Postfix form only when an address changes, folded by bytes) and
  missing (Resent-)Message-Id, Date, From added; undisclosed_recipients_header
  when no To/Cc/Resent-To/Resent-Cc is left; "Name :" written as "Name:";
* canonical.py: sender_/recipient_/canonical_maps (+ *_classes) and
  masquerade_domains (+ exceptions, classes) on the envelope and on rewritten
  headers; always_bcc (NOTIFY=NEVER) for smtpd/pickup mail; all off with
  receive_override_options = no_address_mappings (virtual aliases too);
* enable_original_recipient = no: duplicates keyed on the final recipient only;
* header_size_limit cuts a long header as Postfix does (at the last line
  boundary past 90% of the limit, else at the limit; address headers after
  their rewrite);
* ``ID: message-id=...`` log line (``<>`` when none), hopcount_limit
  (554 5.4.0), message_size_limit over the whole queue file Postfix's cleanup
  would write (``postfix_file_size()``: size record, arrival time, attributes,
  sender, per recipient ORCPT/NOTIFY/original/final, content records, extracted
  segment; 552 5.3.4 "Error: message file too big" exactly where 3.7 refuses),
  virtual_alias_maps expansion (451 4.6.0 on limits/loops, 451 4.3.0 on table
  failure), Postfix's duplicate filter;
* MIME (unless disable_mime_input_processing): multipart and message/rfc822 part
  headers written "Name:" as Postfix's MIME parser writes them (mime.py, only for
  mail whose primary Content-Type has parts), a declared 8bit/binary encoding
  noted;
* header_checks (primary headers, the receiving server's Received: included),
  mime_header_checks (Content-*/MIME-Version anywhere, multipart part headers),
  nested_header_checks (message/rfc822 part headers) and body_checks (body lines
  in line_length_limit records, the first body_checks_size_limit bytes of each
  part) for sessions opened with ``content_checks=True`` (smtpd, pickup), unless
  receive_override_options has no_header_body_checks; REJECT/DISCARD stop the
  reading of the message (headers.py ``MessageChecks``, ``BodyScanner``);
* cleanup's log lines of a message are held while it is smaller than Postfix's
  smtpd stream buffer (4096 bytes), so they follow the smtpd's end-of-data lines;
* Postfix's message size (its queue file's content records, recsize.py) is
  stored as the envelope attribute ``postwell_size``: the qmgr's ``size=`` and
  the size column of ``postqueue -p`` show it.
"""

from .headers import ContentProcessor  # noqa: F401
from .service import (  # noqa: F401
    REPLY_ALIAS_ERROR, REPLY_TOO_BIG, REPLY_TOO_MANY_HOPS, REPLY_WRITE_ERROR, Cleanup,
    CleanupSession, mail_date,
)
from .virtual import AliasExpansionError, AliasLookupError, VirtualAliasExpander  # noqa: F401
