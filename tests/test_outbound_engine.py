"""Client engine cases found end to end (tests/test_outbound_compare.py), byte for byte."""

from postwell.smtp.client import (NEED_DATA, ContentWanted, Envelope, Greeting, HelloDone,
                                  MessageDone, Recipient, SmtpClient, State)

EHLO = b"250-sink.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"


def events(c):
    out = []
    while (ev := c.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def ready():
    c = SmtpClient("client.test")
    c.receive_data(b"220 sink.test ESMTP\r\n")
    c.data_to_send()
    c.receive_data(EHLO)
    evs = events(c)
    assert isinstance(evs[0], Greeting) and isinstance(evs[1], HelloDone)
    return c


def envelope():
    return Envelope("s@client.test", (Recipient("a@sink.test"),))


def test_reply_before_the_dot_is_the_end_of_data_reply():
    """smtp-sink -A 0: "354" and "550" in one read, then the server stops reading.
    Postfix reports "550 ... (in reply to end of DATA command)"; the engine must not
    call it a protocol error, and the connection must not be reused."""
    c = ready()
    c.start_transaction(envelope())
    c.data_to_send()
    c.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n550 This violates SMTP\r\n")
    evs = events(c)
    assert isinstance(evs[-1], ContentWanted) and c.state is State.CONTENT
    c.send_content(b"Subject: x\n\nbody\n")
    c.end_content()
    done = events(c)[-1]
    assert isinstance(done, MessageDone) and done.reply.code == 550
    assert done.command == "end of DATA"
    assert not c.usable


def test_early_reply_after_a_failed_write():
    """The write of the body failed; the reply read afterwards still counts."""
    c = ready()
    c.start_transaction(envelope())
    c.data_to_send()
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    events(c)
    c.send_content(b"Subject: x\n\n")
    c.receive_data(b"552 5.3.4 Message too big\r\n")
    assert c.take_early_reply()
    done = events(c)[-1]
    assert isinstance(done, MessageDone) and done.reply.code == 552
    assert not c.usable


def test_no_early_reply_means_lost_connection():
    c = ready()
    c.start_transaction(envelope())
    c.data_to_send()
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    events(c)
    assert not c.take_early_reply()
    assert c.state is State.CONTENT


def test_normal_transaction_unaffected_and_reusable():
    c = ready()
    for _ in range(2):
        c.start_transaction(envelope())
        c.data_to_send()
        c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
        events(c)
        c.send_content(b"Subject: x\n\nbody\n")
        c.end_content()
        assert c.data_to_send().endswith(b"body\r\n.\r\n")
        c.receive_data(b"250 2.0.0 Ok\r\n")
        assert isinstance(events(c)[-1], MessageDone)
        assert c.usable
