"""The sans-IO SMTP client engine, byte for byte."""

import pytest

from postwell.smtp.client import (NEED_DATA, ConnectionClosed, ContentWanted, Envelope, Extensions,
                                  Greeting, HelloDone, IgnoredLine, RecipientDone, TlsRefused,
                                  TlsWanted, MailReply, MessageDone, ProtocolError, QuitDone,
                                  RcptReply, Recipient, Rejected, RsetDone, SmtpClient,
                                  SmtpClientError, TransactionFailed, parse_ehlo, quote_address,
                                  xtext, needs_smtputf8)
from postwell.smtp.reply import Reply

EHLO_FULL = (b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
             b"250-SMTPUTF8\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n"
             b"250-AUTH PLAIN LOGIN\r\n250 CHUNKING\r\n")
EHLO_PLAIN = b"250-mx.example.org\r\n250 ENHANCEDSTATUSCODES\r\n"


def events(c):
    out = []
    while (ev := c.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def ready(ehlo=EHLO_FULL, **kw):
    c = SmtpClient("client.example.com", **kw)
    c.receive_data(b"220 mx.example.org ESMTP\r\n")
    assert c.data_to_send() == b"EHLO client.example.com\r\n"
    c.receive_data(ehlo)
    evs = events(c)
    assert isinstance(evs[0], Greeting) and isinstance(evs[1], HelloDone)
    return c


def env(*rcpts, **kw):
    return Envelope(kw.pop("sender", "s@example.com"),
                    tuple(r if isinstance(r, Recipient) else Recipient(r) for r in rcpts), **kw)


def test_ehlo_keywords():
    c = ready()
    ext = c.extensions
    assert ext.esmtp and ext.pipelining and ext.eightbitmime and ext.smtputf8 and ext.dsn
    assert ext.chunking and ext.starttls and ext.enhancedstatuscodes
    assert ext.size == 10240000
    assert ext.auth == ("PLAIN", "LOGIN")


def test_ehlo_old_auth_syntax_and_bare_size():
    ext = parse_ehlo(Reply(250, "x\nAUTH=LOGIN\nsize\nAUTH PLAIN"))
    assert ext.auth == ("LOGIN", "PLAIN") and ext.size == 0 and ext.has("SIZE")


def test_discard_ehlo_keywords():
    c = ready(discard_ehlo_keywords=frozenset({"pipelining"}))
    assert not c.extensions.pipelining


def test_helo_fallback_on_5xx_ehlo():
    c = SmtpClient("me.example")
    c.receive_data(b"220 old.example SMTP\r\n")
    assert c.data_to_send() == b"EHLO me.example\r\n"
    c.receive_data(b"502 5.5.2 Error: command not recognized\r\n")
    assert c.data_to_send() == b"HELO me.example\r\n"
    c.receive_data(b"250 old.example\r\n")
    evs = events(c)
    assert isinstance(evs[-1], HelloDone) and evs[-1].command == "HELO"
    assert not c.extensions.esmtp and c.usable


def test_never_send_ehlo():
    c = SmtpClient("me", never_send_ehlo=True)
    c.receive_data(b"220 x ESMTP\r\n")
    assert c.data_to_send() == b"HELO me\r\n"


def test_ehlo_421_is_rejection():
    c = SmtpClient("me")
    c.receive_data(b"220 x\r\n")
    c.data_to_send()
    c.receive_data(b"421 4.3.2 Service shutting down\r\n")
    evs = events(c)
    assert isinstance(evs[-1], Rejected) and evs[-1].command == "EHLO"
    assert not c.usable


def test_5xx_greeting_rejected():
    c = SmtpClient("me")
    c.receive_data(b"554-no service\r\n554 go away\r\n")
    evs = events(c)
    assert isinstance(evs[1], Rejected) and evs[1].reply.code == 554
    assert evs[1].reply.text == "no service\ngo away"
    assert c.data_to_send() == b"" and not c.usable


def test_pipelined_transaction_with_params_and_partial_rejection():
    c = ready()
    e = env(Recipient("a@x.org", notify="SUCCESS,FAILURE", orcpt="rfc822;a+1@x.org"), "b@x.org",
            size=1234, body_type="8BITMIME", ret="HDRS", envid="id=1")
    c.start_transaction(e)
    # RFC 2920: MAIL, all RCPT and DATA in one write.
    assert c.data_to_send() == (
        b"MAIL FROM:<s@example.com> SIZE=1234 BODY=8BITMIME ENVID=id+3D1 RET=HDRS\r\n"
        b"RCPT TO:<a@x.org> ORCPT=rfc822;a+2B1@x.org NOTIFY=SUCCESS,FAILURE\r\n"
        b"RCPT TO:<b@x.org> ORCPT=rfc822;b@x.org\r\n"
        b"DATA\r\n")
    c.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <b@x.org>: Recipient address "
                   b"rejected: User unknown\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    evs = events(c)
    assert isinstance(evs[0], MailReply)
    assert isinstance(evs[1], RcptReply) and evs[1].reply.code == 250
    assert isinstance(evs[2], RcptReply) and evs[2].index == 1
    r = evs[2].reply
    assert (r.code, r.enhanced, r.text) == (550, "5.1.1",
                                            "<b@x.org>: Recipient address rejected: User unknown")
    assert str(r) == "550 5.1.1 <b@x.org>: Recipient address rejected: User unknown"
    assert evs[2].command == "RCPT TO"
    assert isinstance(evs[3], ContentWanted)
    c.send_content(b"Subject: t\n\n.hidden\nline")
    c.send_content(b" continues\n..two\n")
    c.end_content()
    assert c.data_to_send() == b"Subject: t\r\n\r\n..hidden\r\nline continues\r\n...two\r\n.\r\n"
    c.receive_data(b"250 2.0.0 Ok: queued as ABC\r\n")
    (done,) = events(c)
    assert isinstance(done, MessageDone) and done.command == "end of DATA"
    assert str(done.reply) == "250 2.0.0 Ok: queued as ABC"
    assert c.usable and c.transactions == 1


def test_no_dsn_params_without_dsn_extension():
    c = ready(EHLO_PLAIN)
    c.start_transaction(env(Recipient("a@x", notify="NEVER", orcpt="a@x"), ret="FULL",
                            envid="e", body_type="8BITMIME", size=5))
    assert c.data_to_send() == b"MAIL FROM:<s@example.com>\r\n"


def test_unpipelined_one_command_at_a_time():
    c = ready(EHLO_PLAIN)
    c.start_transaction(env("a@x", "b@x"))
    assert c.data_to_send() == b"MAIL FROM:<s@example.com>\r\n"
    c.receive_data(b"250 ok\r\n")
    assert c.data_to_send() == b"RCPT TO:<a@x>\r\n"
    c.receive_data(b"450 4.2.0 greylisted\r\n")
    assert c.data_to_send() == b"RCPT TO:<b@x>\r\n"
    c.receive_data(b"250 ok\r\n")
    assert c.data_to_send() == b"DATA\r\n"
    c.receive_data(b"354 go\r\n")
    evs = events(c)
    assert [type(e) for e in evs] == [MailReply, RcptReply, RcptReply, ContentWanted]
    assert evs[1].reply.is_transient


def test_no_valid_recipients_no_data_rset():
    c = ready(EHLO_PLAIN)
    c.start_transaction(env("a@x"))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n")
    c.data_to_send()
    c.receive_data(b"550 5.1.1 no\r\n")
    assert c.data_to_send() == b"RSET\r\n"
    evs = events(c)
    assert isinstance(evs[-1], TransactionFailed) and evs[-1].command == "RCPT TO"
    c.receive_data(b"250 2.0.0 Ok\r\n")
    assert isinstance(events(c)[-1], RsetDone) and c.usable


def test_pipelined_no_valid_recipients_data_rejected():
    c = ready()
    c.start_transaction(env("a@x"))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n550 5.1.1 no\r\n554 5.5.1 Error: no valid recipients\r\n")
    evs = events(c)
    assert isinstance(evs[-1], TransactionFailed) and evs[-1].command == "RCPT TO"
    assert c.data_to_send() == b"RSET\r\n"


def test_pipelined_no_valid_recipients_but_354():
    c = ready()
    c.start_transaction(env("a@x"))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n550 5.1.1 no\r\n354 go ahead\r\n")
    assert c.data_to_send() == b".\r\n"
    c.receive_data(b"554 5.5.1 no valid recipients\r\n")
    assert isinstance(events(c)[-1], TransactionFailed)
    assert c.data_to_send() == b"RSET\r\n"


def test_mail_rejected_pipelined():
    c = ready()
    c.start_transaction(env("a@x", "b@x"))
    c.data_to_send()
    c.receive_data(b"553 5.7.1 sender rejected\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
                   b"503 5.5.1 need MAIL\r\n")
    evs = events(c)
    assert [type(e) for e in evs] == [MailReply, TransactionFailed]
    assert evs[-1].command == "MAIL FROM" and evs[-1].reply.code == 553


def test_data_rejected():
    c = ready()
    c.start_transaction(env("a@x"))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n250 ok\r\n451 4.3.0 try later\r\n")
    evs = events(c)
    assert isinstance(evs[-1], TransactionFailed) and evs[-1].command == "DATA"


def test_bdat_when_chunking_enabled():
    c = ready(use_chunking=True, chunk_size=8)
    c.start_transaction(env("a@x"))
    # BDAT needs the RCPT replies first: no DATA in the pipeline.
    assert c.data_to_send() == b"MAIL FROM:<s@example.com>\r\nRCPT TO:<a@x> ORCPT=rfc822;a@x\r\n"
    c.receive_data(b"250 ok\r\n250 ok\r\n")
    assert isinstance(events(c)[-1], ContentWanted)
    c.send_content(b".abc\ndefgh\n")
    c.end_content()
    # No dot-stuffing with BDAT (RFC 3030).
    assert c.data_to_send() == b"BDAT 8\r\n.abc\r\nde" + b"BDAT 5 LAST\r\nfgh\r\n"
    c.receive_data(b"250 2.0.0 chunk ok\r\n250 2.0.0 Ok: queued\r\n")
    done = events(c)[-1]
    assert isinstance(done, MessageDone) and done.reply.text == "Ok: queued"


def test_chunking_off_by_default():
    c = ready()
    c.start_transaction(env("a@x"))
    assert c.data_to_send().endswith(b"DATA\r\n")


def test_bare_cr_never_sent_and_crlf_kept():
    c = ready(EHLO_PLAIN)
    c.start_transaction(env("a@x"))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n")
    c.data_to_send()
    c.receive_data(b"250 ok\r\n")
    c.data_to_send()
    c.receive_data(b"354 go\r\n")
    events(c)
    c.send_content(b"a\rb\r\nc\r")
    c.send_content(b"\nd")            # CR LF split across chunks; last line without LF
    c.end_content()
    out = c.data_to_send()
    assert out == b"ab\r\nc\r\nd\r\n.\r\n"
    assert b"\r" not in out.replace(b"\r\n", b"")


def test_dot_stuffing_across_chunks():
    c = ready(EHLO_PLAIN)
    c.start_transaction(env("a@x"))
    for r in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        c.data_to_send()
        c.receive_data(r)
    events(c)
    c.send_content(b"x\n")
    c.send_content(b".\n.")
    c.send_content(b"y\n")
    c.end_content()
    assert c.data_to_send() == b"x\r\n..\r\n..y\r\n.\r\n"


def test_long_lines_broken():
    c = ready(EHLO_PLAIN, line_length_limit=10)
    c.start_transaction(env("a@x"))
    for r in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        c.data_to_send()
        c.receive_data(r)
    events(c)
    c.send_content(b"0123456789abcdefghijklmnop\nshort\n")
    c.end_content()
    out = c.data_to_send()
    assert out == b"0123456789\r\n abcdefghi\r\n jklmnop\r\nshort\r\n.\r\n"
    assert all(len(line) <= 10 for line in out.split(b"\r\n"))


def test_reuse_second_transaction_and_quit():
    c = ready()
    for n in range(2):
        c.start_transaction(env("a@x"))
        c.data_to_send()
        c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
        events(c)
        c.send_content(b"hi\n")
        c.end_content()
        c.data_to_send()
        c.receive_data(b"250 2.0.0 Ok: queued as X%d\r\n" % n)
        assert isinstance(events(c)[-1], MessageDone)
    assert c.transactions == 2
    c.quit()
    assert c.data_to_send() == b"QUIT\r\n"
    assert isinstance(events(c)[-1], QuitDone)


def test_quit_waits_when_asked():
    c = ready(skip_quit_response=False)
    c.quit()
    c.data_to_send()
    assert events(c) == []
    c.receive_data(b"221 2.0.0 Bye\r\n")
    assert events(c)[-1].reply.code == 221


def test_multiline_reply_split_across_reads():
    c = SmtpClient("me")
    for piece in (b"22", b"0-first\r", b"\n220 second", b"\r\n"):
        c.receive_data(piece)
    g = events(c)[0]
    assert isinstance(g, Greeting) and g.reply.text == "first\nsecond"


def test_enhanced_code_only_when_class_matches():
    c = ready(EHLO_PLAIN)
    c.start_transaction(env("a@x"))
    c.data_to_send()
    c.receive_data(b"550 4.1.1 odd\r\n")
    ev = events(c)[0]
    assert ev.reply.enhanced is None and ev.reply.text == "4.1.1 odd"


@pytest.mark.parametrize("garbage", [b"hello there\r\n", b"2500 x\r\n", b"\x00\xff\r\n", b"\r\n"])
def test_garbage_lines_are_skipped_like_postfix(garbage):
    c = SmtpClient("me")
    c.receive_data(b"220 x\r\n")
    c.data_to_send()
    c.receive_data(garbage + b"250 x\r\n")
    evs = events(c)
    assert isinstance(evs[-2], IgnoredLine) and not evs[-2].pipelining
    assert isinstance(evs[-1], HelloDone) and c.usable


def test_garbage_flood_is_protocol_error():
    c = SmtpClient("me")
    c.receive_data(b"220 x\r\n")
    c.data_to_send()
    c.receive_data(b"junk\r\n" * 500)
    evs = events(c)
    assert isinstance(evs[-1], ProtocolError)
    assert evs[-1].stage == "performing the EHLO handshake"
    assert not c.usable


def test_multiline_reply_keeps_raw_lines_and_last_code():
    c = SmtpClient("me")
    c.receive_data(b"220 x\r\n")
    c.data_to_send()
    c.receive_data(b"250-a\r\n251 b\r\n")
    ev = events(c)[-1]
    assert isinstance(ev, HelloDone) and ev.reply.code == 251
    c = ready()
    c.start_transaction(env("a@x"))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n550-5.1.1 first\r\n550 5.1.1 second\r\n")
    r = events(c)[-1].reply
    assert r.text == "first\nsecond" and r.enhanced == "5.1.1"
    assert str(r) == "550-5.1.1 first 550 5.1.1 second"     # as Postfix quotes it


def test_overlong_reply_line_bounded():
    c = SmtpClient("me")
    c.receive_data(b"220 " + b"x" * 100000)
    c.receive_data(b"y" * 100000 + b"\r\n")
    g = events(c)[0]
    assert isinstance(g, Greeting) and len(g.reply.text) < 4096


def test_too_many_reply_lines_bounded():
    c = SmtpClient("me")
    c.receive_data(b"220-x\r\n" * 5000 + b"220 end\r\n")
    g = events(c)[0]
    assert len(g.reply.text.split("\n")) <= 100


def test_unexpected_reply_is_protocol_error():
    c = ready()
    c.receive_data(b"250 surprise\r\n")
    assert isinstance(events(c)[-1], ProtocolError)


def test_server_close_reports_stage():
    c = ready()
    c.start_transaction(env("a@x"))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n")
    c.receive_data(b"")
    evs = events(c)
    assert isinstance(evs[-1], ConnectionClosed) and evs[-1].stage == "sending RCPT TO"


def test_out_of_order_use_raises():
    c = SmtpClient("me")
    with pytest.raises(SmtpClientError):
        c.start_transaction(env("a@x"))
    c = ready()
    with pytest.raises(SmtpClientError):
        c.send_content(b"x")


def test_smtputf8_as_requested():
    c = ready()
    c.start_transaction(env("a@x"))
    assert b"SMTPUTF8" not in c.data_to_send()
    c = ready()
    c.start_transaction(env("ü@x", smtputf8=True))
    assert c.data_to_send().startswith(b"MAIL FROM:<s@example.com> SMTPUTF8\r\n")
    assert needs_smtputf8(env("ü@x", smtputf8=True)) and not needs_smtputf8(env("a@x", smtputf8=True))


def test_orcpt_of_quoted_recipient():
    c = ready()
    c.start_transaction(env("b c@x"))
    assert b'RCPT TO:<"b c"@x> ORCPT=rfc822;"b+20c"@x\r\n' in c.data_to_send()


def test_null_sender_and_quoting():
    c = ready(EHLO_PLAIN)
    c.start_transaction(env("john smith@x", sender=""))
    assert c.data_to_send() == b"MAIL FROM:<>\r\n"
    assert quote_address("john smith@x") == '"john smith"@x'
    assert quote_address("a.b@x") == "a.b@x"
    assert quote_address('a"b@x') == '"a\\"b"@x'
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"


def test_starttls_discards_plaintext_after_220_and_says_ehlo_again():
    c = ready()
    c.starttls()
    assert c.data_to_send() == b"STARTTLS\r\n"
    # An attacker appends a forged reply to the 220 (CVE-2011-0411 pattern).
    c.receive_data(b"220 2.0.0 Ready\r\n250-forged\r\n250 AUTH PLAIN\r\n")
    evs = events(c)
    assert isinstance(evs[-1], TlsWanted)
    c.tls_established()
    assert c.data_to_send() == b"EHLO client.example.com\r\n"
    assert c.extensions == Extensions()
    c.receive_data(b"250-mx\r\n250 PIPELINING\r\n")
    ev = events(c)[-1]
    assert isinstance(ev, HelloDone) and c.tls and c.extensions.pipelining
    assert not c.extensions.auth
    with pytest.raises(SmtpClientError):
        c.starttls()                     # once per connection


def test_starttls_refused_keeps_connection():
    c = ready()
    c.starttls()
    c.data_to_send()
    c.receive_data(b"454 4.7.0 TLS not available\r\n")
    assert isinstance(events(c)[-1], TlsRefused) and c.usable and not c.tls
    c = ready(EHLO_PLAIN)
    with pytest.raises(SmtpClientError):
        c.starttls()                     # not offered


def test_lmtp_per_recipient_final_replies():
    c = SmtpClient("me", lmtp=True)
    c.receive_data(b"220 lmtp ready\r\n")
    assert c.data_to_send() == b"LHLO me\r\n"
    c.receive_data(b"250-lmtp\r\n250 PIPELINING\r\n")
    assert isinstance(events(c)[-1], HelloDone)
    c.start_transaction(env("a@x", "b@x", "c@x"))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n")
    assert isinstance(events(c)[-1], ContentWanted)
    c.send_content(b"hi\n")
    c.end_content()
    c.data_to_send()
    c.receive_data(b"250 2.0.0 <a@x> delivered\r\n452 4.2.2 <c@x> mailbox full\r\n")
    evs = events(c)
    assert [type(e) for e in evs] == [RecipientDone, RecipientDone, MessageDone]
    assert (evs[0].index, evs[0].reply.code) == (0, 250)
    assert (evs[1].index, evs[1].recipient.address, evs[1].reply.code) == (2, "c@x", 452)
    assert c.usable


def test_lmtp_lhlo_refused_has_no_helo_fallback():
    c = SmtpClient("me", lmtp=True)
    c.receive_data(b"220 x\r\n")
    c.data_to_send()
    c.receive_data(b"500 5.5.1 what\r\n")
    assert isinstance(events(c)[-1], Rejected) and c.data_to_send() == b""


def test_bdat_pipelined_mail_rejected_fails_transaction():
    c = ready(use_chunking=True)
    c.start_transaction(env("a@x"))
    c.data_to_send()
    c.receive_data(b"553 5.7.1 no\r\n503 5.5.1 need MAIL\r\n")
    evs = events(c)
    assert isinstance(evs[-1], TransactionFailed) and evs[-1].command == "MAIL FROM"
    assert c.data_to_send() == b"RSET\r\n"
