"""smtp(8) delivery agent against a scripted asyncio SMTP server on loopback."""

import asyncio
import base64
import random
import socket
import ssl

import pytest

from postwell.config.main import Config
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.smtp import MimeDowngrade, SmtpDeliveryAgent, eight_bit_action
from postwell.dns import FakeResolver
from postwell.log import NullLog

TEST_TIMEOUT = 15


class ScriptedServer:
    """A tiny SMTP server whose replies tests choose.

    ``rcpt``: address -> reply line; ``replies``: command -> reply line;
    ``hold_until_data``: do not answer MAIL/RCPT before the DATA command arrived
    (a client that does not pipeline then stalls: proves RFC 2920 behaviour).
    """

    def __init__(self, *, greeting="220 mx.test ESMTP", ehlo=("PIPELINING", "SIZE 10240000",
                 "8BITMIME", "DSN", "ENHANCEDSTATUSCODES"), rcpt=None, replies=None,
                 hold_until_data=False, name="mx.test", close_after=None, tls=None,
                 broken_tls=False, auth=None, lmtp_final=None, unix_path=None):
        self.greeting = greeting
        self.ehlo = list(ehlo)
        self.rcpt = rcpt or {}
        self.replies = replies or {}
        self.hold_until_data = hold_until_data
        self.name = name
        self.close_after = close_after
        self.tls = tls                  # server SSLContext: offer STARTTLS
        self.broken_tls = broken_tls    # say 220 to STARTTLS, then talk garbage
        self.tls_sessions = []          # per connection: True once TLS is up
        self.auth = auth                # user -> password; None: no AUTH offered
        self.lmtp_final = lmtp_final    # LMTP: address -> final reply after DATA
        self.unix_path = unix_path      # listen on a UNIX-domain socket instead
        self.logins = []                # (mechanism, user, password) tried
        self.auth_line = "AUTH PLAIN LOGIN"
        self.sessions = []          # one list of command lines per connection
        self.messages = []          # raw DATA bytes (still dot-stuffed, CRLF)
        self.server = None
        self.port = None

    async def start(self):
        if self.unix_path:
            self.server = await asyncio.start_unix_server(self.handle, self.unix_path)
            self.port = 0
            return self
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()

    def reply(self, cmd, default):
        return self.replies.get(cmd, default)

    async def handle(self, reader, writer):
        lines = []
        self.sessions.append(lines)
        self.tls_sessions.append(False)
        tls_up = False
        held = []
        accepted = []

        def send(text):
            writer.write(text.encode() + b"\r\n")

        try:
            send(self.greeting)
            await writer.drain()
            if not self.greeting.startswith("220"):
                await asyncio.wait_for(reader.readline(), 5)
                return
            while True:
                raw = await asyncio.wait_for(reader.readline(), 5)
                if not raw:
                    return
                line = raw.decode().rstrip("\r\n")
                lines.append(line)
                verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
                if self.close_after == verb:
                    return
                if verb in ("EHLO", "LHLO"):
                    r = self.reply("EHLO", None)
                    ehlo = list(self.ehlo)
                    if (self.tls or self.broken_tls) and not tls_up:
                        ehlo.append("STARTTLS")
                    if self.auth is not None:
                        ehlo.append(self.auth_line)
                    if r:
                        send(r)
                    else:
                        for kw in [self.name] + ehlo[:-1]:
                            send(f"250-{kw}")
                        send(f"250 {ehlo[-1]}" if ehlo else f"250 {self.name}")
                elif verb == "AUTH":
                    parts = line.split()
                    mech = parts[1].upper()
                    if mech == "PLAIN":
                        if len(parts) > 2:
                            blob = parts[2]
                        else:
                            send("334 ")
                            await writer.drain()
                            blob = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
                        fields = base64.b64decode(blob).split(b"\0")
                        user, password = fields[1].decode(), fields[2].decode()
                    else:
                        send("334 VXNlcm5hbWU6")
                        await writer.drain()
                        raw_user = (await asyncio.wait_for(reader.readline(), 5)).strip()
                        send("334 UGFzc3dvcmQ6")
                        await writer.drain()
                        raw_pw = (await asyncio.wait_for(reader.readline(), 5)).strip()
                        user = base64.b64decode(raw_user).decode()
                        password = base64.b64decode(raw_pw).decode()
                    self.logins.append((mech, user, password))
                    if (self.auth or {}).get(user) == password:
                        send("235 2.7.0 Authentication successful")
                    else:
                        send(self.reply("AUTH", "535 5.7.8 Error: authentication failed: "
                                                "authentication failure"))
                elif verb == "STARTTLS":
                    r = self.reply("STARTTLS", "220 2.0.0 Ready to start TLS")
                    send(r)
                    await writer.drain()
                    if r.startswith("220"):
                        if self.broken_tls:
                            send("this is not a TLS handshake")
                            await writer.drain()
                            return
                        await writer.start_tls(self.tls)
                        tls_up = True
                        self.tls_sessions[-1] = True
                elif verb == "HELO":
                    send(self.reply("HELO", f"250 {self.name}"))
                elif verb == "MAIL":
                    held.append(self.reply("MAIL", "250 2.1.0 Ok"))
                elif verb == "RCPT":
                    addr = line.split("<", 1)[1].split(">", 1)[0]
                    r = self.rcpt.get(addr, "250 2.1.5 Ok")
                    if r.startswith("2"):
                        accepted.append(addr)
                    held.append(r)
                elif verb == "DATA":
                    for r in held:
                        send(r)
                    held.clear()
                    r = self.reply("DATA", "354 End data with <CR><LF>.<CR><LF>")
                    send(r)
                    await writer.drain()
                    if not r.startswith("354"):
                        continue
                    data = bytearray()
                    while not data.endswith(b"\r\n.\r\n") and data != b".\r\n":
                        chunk = await asyncio.wait_for(reader.readline(), 5)
                        if not chunk:
                            return
                        data += chunk
                    self.messages.append(bytes(data))
                    if self.close_after == ".":
                        return
                    if self.lmtp_final is not None:
                        for addr in accepted:   # RFC 2033 4.2
                            send(self.lmtp_final.get(addr, f"250 2.0.0 <{addr}> Saved"))
                    else:
                        send(self.reply(".", f"250 2.0.0 Ok: queued as Q{len(self.messages)}"))
                    accepted.clear()
                elif verb == "RSET":
                    send(self.reply("RSET", "250 2.0.0 Ok"))
                elif verb == "QUIT":
                    send("221 2.0.0 Bye")
                    await writer.drain()
                    return
                else:
                    send("502 5.5.2 Error: command not recognized")
                if not self.hold_until_data and held:
                    for r in held:
                        send(r)
                    held.clear()
                await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def make_config(**params):
    base = {"myhostname": "client.test", "smtp_helo_name": "client.test",
            "inet_protocols": "ipv4"}
    base.update({k: str(v) for k, v in params.items()})
    return Config("/nonexistent", base, {}, [])


def request(nexthop, rcpts, content=b"Subject: test\n\nhello\n", sender="s@client.test", **kw):
    chunks = kw.pop("chunks", None) or [content]
    return DeliveryRequest(queue_id="ABC", sender=sender,
                           recipients=[Recipient(r) for r in rcpts], transport="smtp",
                           nexthop=nexthop, arrival_time=0.0,
                           open_content=lambda: iter(chunks),
                           content_size=sum(len(c) for c in chunks), **kw)


def agent(cfg=None, resolver=None, **kw):
    return SmtpDeliveryAgent(cfg or make_config(), resolver or FakeResolver({}), NullLog("smtp"),
                             rng=random.Random(0), own_addresses=frozenset(), **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT))


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def with_server(server, body):
    await server.start()
    try:
        return await body(server)
    finally:
        await server.stop()


def test_sent_with_pipelining_and_reason():
    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test", "b@x.test"]))
        a.close()
        return res
    srv = ScriptedServer(hold_until_data=True)
    res = run(with_server(srv, body))
    assert [r.status for r in res] == ["sent", "sent"]
    assert res[0].dsn == "2.0.0" and res[0].reason == "250 2.0.0 Ok: queued as Q1"
    assert res[0].relay == f"127.0.0.1[127.0.0.1]:{srv.port}"
    assert srv.sessions[0][:5] == ["EHLO client.test", "MAIL FROM:<s@client.test> SIZE=21",
                                   "RCPT TO:<a@x.test> ORCPT=rfc822;a@x.test",
                                   "RCPT TO:<b@x.test> ORCPT=rfc822;b@x.test", "DATA"]
    assert srv.messages == [b"Subject: test\r\n\r\nhello\r\n.\r\n"]


def test_per_recipient_550_does_not_fail_others():
    srv = ScriptedServer(rcpt={"bad@x.test": "550 5.1.1 <bad@x.test>: Recipient address "
                                             "rejected: User unknown in local recipient table"})

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}",
                                      ["ok@x.test", "bad@x.test", "ok2@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert [r.status for r in res] == ["sent", "bounced", "sent"]
    assert res[1].dsn == "5.1.1"
    assert res[1].reason == (f"host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <bad@x.test>: Recipient "
                             "address rejected: User unknown in local recipient table (in reply "
                             "to RCPT TO command)")
    assert len(srv.messages) == 1


def test_4xx_defers_and_no_data_when_nobody_accepted():
    srv = ScriptedServer(ehlo=("ENHANCEDSTATUSCODES",),
                         rcpt={"a@x.test": "450 4.2.0 <a@x.test>: Recipient address rejected: "
                                           "Greylisted"})

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        a.close()
        await asyncio.sleep(0.05)
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "deferred" and res[0].dsn == "4.2.0"
    assert res[0].reason.endswith("Greylisted (in reply to RCPT TO command)")
    assert "DATA" not in srv.sessions[0] and srv.messages == []
    assert srv.sessions[0][-2:] == ["RSET", "QUIT"] or srv.sessions[0][-1] == "RSET"


def test_mail_from_rejected_applies_to_all():
    srv = ScriptedServer(replies={"MAIL": "553 5.7.1 <s@client.test>: Sender address rejected"})

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test", "b@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert [r.status for r in res] == ["bounced", "bounced"]
    assert res[0].reason.endswith("Sender address rejected (in reply to MAIL FROM command)")


def test_end_of_data_rejection():
    srv = ScriptedServer(replies={".": "554 5.7.1 Message rejected: spam"})

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "bounced" and res[0].dsn == "5.7.1"
    assert res[0].reason == ("host 127.0.0.1[127.0.0.1] said: 554 5.7.1 Message rejected: spam "
                             "(in reply to end of DATA command)")


def test_connect_refused():
    port = closed_port()
    a = agent()
    res = run(a.deliver(request(f"[127.0.0.1]:{port}", ["a@x.test"])))
    assert res[0].status == "deferred" and res[0].dsn == "4.4.1"
    assert res[0].reason == f"connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused"
    assert res[0].relay == "none"


def test_mx_fallback_after_refused_connect():
    srv = ScriptedServer()
    port = None

    async def body(srv):
        nonlocal port
        port = srv.port
        # mx1 resolves to an address with nobody listening on srv.port (127.0.0.2)?  Use two
        # loopback addresses: 127.0.0.3 refuses, 127.0.0.1 answers.
        resolver = FakeResolver({("dest.test", "MX"): [(10, "mx1.dest.test"), (20, "mx2.dest.test")],
                                 ("mx1.dest.test", "A"): ["127.0.0.3"],
                                 ("mx2.dest.test", "A"): ["127.0.0.1"]})
        log = NullLog("smtp")
        a = SmtpDeliveryAgent(make_config(), resolver, log, rng=random.Random(0),
                              own_addresses=frozenset())
        res = await a.deliver(request(f"dest.test:{srv.port}", ["a@dest.test"]))
        a.close()
        return res, log
    res, log = run(with_server(srv, body))
    assert res[0].status == "sent" and res[0].relay == f"mx2.dest.test[127.0.0.1]:{port}"
    assert any(line.startswith("connect to mx1.dest.test[127.0.0.3]") for line in log.lines)


def test_soft_rcpt_error_tries_next_mx():
    bad = ScriptedServer(rcpt={"a@dest.test": "451 4.3.0 try later"})
    good = ScriptedServer()

    async def body():
        await bad.start()
        await good.start()
        try:
            # Both servers on 127.0.0.1 but different ports: use literal nexthops via two
            # deliveries is not MX; so resolve two MX names to the same IP and patch ports.
            resolver = FakeResolver({("dest.test", "MX"): [(10, "mx1.dest.test"),
                                                           (20, "mx2.dest.test")],
                                     ("mx1.dest.test", "A"): ["127.0.0.1"],
                                     ("mx2.dest.test", "A"): ["127.0.0.2"]})
            a = agent(resolver=resolver)
            # route each MX to its server
            a.route = lambda host, port: ("127.0.0.1", bad.port if host == "127.0.0.1" else good.port)
            res = await a.deliver(request("dest.test", ["a@dest.test"]))
            a.close()
            return res
        finally:
            await bad.stop()
            await good.stop()
    res = run(body())
    assert res[0].status == "sent" and res[0].relay == "mx2.dest.test[127.0.0.2]:25"
    assert good.messages and bad.messages in ([], [b".\r\n"])   # no content to the 4xx server


def test_dot_stuffing_and_crlf_on_the_wire():
    srv = ScriptedServer()
    chunks = [b"Subject: dots\n\n.\n..x\n", b".starts a line\nspl", b"it\r\nbare\rcr\n.", b"end"]

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"], chunks=chunks))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "sent"
    assert srv.messages[0] == (b"Subject: dots\r\n\r\n..\r\n...x\r\n..starts a line\r\nsplit\r\n"
                               b"barecr\r\n..end\r\n.\r\n")


def test_connection_reuse_across_deliveries():
    srv = ScriptedServer()

    async def body(srv):
        a = agent()
        results = []
        for n in range(3):
            results += await a.deliver(request(f"[127.0.0.1]:{srv.port}", [f"r{n}@x.test"]))
        await a.close_all()
        return results
    res = run(with_server(srv, body))
    assert [r.status for r in res] == ["sent"] * 3
    assert len(srv.sessions) == 1 and len(srv.messages) == 3
    assert [getattr(r, "conn_use", None) for r in res] == [None, 2, 3]


def test_connection_reuse_count_limit():
    srv = ScriptedServer()

    async def body(srv):
        a = agent(make_config(smtp_connection_reuse_count_limit=1))
        for n in range(3):
            await a.deliver(request(f"[127.0.0.1]:{srv.port}", [f"r{n}@x.test"]))
        await a.close_all()
    run(with_server(srv, body))
    # used up to N+1 = 2 times per connection
    assert len(srv.sessions) == 2


def test_no_reuse_without_cache_and_idle_expiry():
    srv = ScriptedServer()

    async def body(srv):
        a = agent(make_config(smtp_connection_cache_on_demand="no"))
        await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["b@x.test"]))
        b = agent(make_config(smtp_connection_cache_time_limit="0s"))
        await b.deliver(request(f"[127.0.0.1]:{srv.port}", ["c@x.test"]))
        await asyncio.sleep(0.1)              # the 0s idle timer closes it
        res = await b.deliver(request(f"[127.0.0.1]:{srv.port}", ["d@x.test"]))
        await b.close_all()
        return res
    res = run(with_server(srv, body))
    assert len(srv.sessions) == 4 and getattr(res[0], "conn_use", None) is None


def test_reused_connection_closed_by_server_falls_back_to_new_one():
    srv = ScriptedServer()

    async def body(srv):
        a = agent(make_config(smtp_connection_cache_time_limit="30s"))
        await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        # The server side drops the idle connection.
        for c in list(a._cache.values())[0]:
            c.writer.transport.abort()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["b@x.test"]))
        await a.close_all()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "sent" and len(srv.sessions) == 2


def test_5xx_greeting_skipped_and_deferred():
    srv = ScriptedServer(greeting="554 5.7.1 mx.test go away")

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "deferred" and res[0].dsn == "4.7.1"
    assert res[0].reason == "host 127.0.0.1[127.0.0.1] refused to talk to me: 554 5.7.1 mx.test go away"


def test_5xx_greeting_bounces_without_skip():
    srv = ScriptedServer(greeting="554 5.7.1 go away")

    async def body(srv):
        a = agent(make_config(smtp_skip_5xx_greeting="no"))
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "bounced" and res[0].dsn == "5.7.1"


def test_helo_fallback():
    srv = ScriptedServer(replies={"EHLO": "502 5.5.2 Error: command not recognized"})

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "sent"
    assert srv.sessions[0][:3] == ["EHLO client.test", "HELO client.test", "MAIL FROM:<s@client.test>"]


def test_lost_connection_while_sending_rcpt():
    srv = ScriptedServer(close_after="RCPT", ehlo=("ENHANCEDSTATUSCODES",))

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "deferred" and res[0].dsn == "4.4.2"
    assert res[0].reason == "lost connection with 127.0.0.1[127.0.0.1] while sending RCPT TO"


def test_lost_connection_after_end_of_data():
    srv = ScriptedServer(close_after=".")

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "deferred"
    assert res[0].reason == ("lost connection with 127.0.0.1[127.0.0.1] while sending end of data "
                             "-- message may be sent more than once")


def test_greeting_timeout():
    async def body():
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            a = agent()
            a.settings.helo_timeout = 0.3
            return await a.deliver(request(f"[127.0.0.1]:{port}", ["a@x.test"]))
        finally:
            srv.close()
    res = run(body())
    assert res[0].status == "deferred" and res[0].dsn == "4.4.2"
    assert res[0].reason == ("conversation with 127.0.0.1[127.0.0.1] timed out while receiving "
                             "the initial server greeting")


def test_size_limit_of_server():
    srv = ScriptedServer(ehlo=("SIZE 10",))

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "bounced" and res[0].dsn == "5.3.4"
    assert res[0].reason == "message size 21 exceeds size limit 10 of server 127.0.0.1[127.0.0.1]"


def test_smtputf8_required_not_offered():
    srv = ScriptedServer()

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["ü@x.test"],
                                      attributes={"smtputf8": "1"}))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "bounced" and res[0].dsn == "5.6.7"
    assert res[0].reason == "SMTPUTF8 is required, but was not offered by host 127.0.0.1[127.0.0.1]"


@pytest.mark.parametrize("flags, status", [("2", "bounced"), ("4", "bounced"), (None, "sent")])
def test_smtputf8_flags_of_cleanup_decide(flags, status):
    """cleanup's header (2: also a UTF-8 MIME part header, which the primary header
    does not show) and sender (4) flags make SMTPUTF8 mail undeliverable to a server
    without SMTPUTF8, as Postfix's smtp(8) reads them; ASCII mail without them goes."""
    srv = ScriptedServer()
    attrs = {"smtputf8": "1"}
    if flags:
        attrs["postwell_smtputf8"] = flags

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"], attributes=attrs))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == status
    if status == "bounced":
        assert res[0].dsn == "5.6.7"


async def deliver_via_port25(srv, a, nexthop, rcpts):
    """Deliver to nexthop port 25 but connect to the scripted server's port instead."""
    a.route = lambda host, port: ("127.0.0.1", srv.port)
    return await a.deliver(request(nexthop, rcpts))


def test_ehlo_with_my_own_hostname_loops():
    srv = ScriptedServer(name="client.test")

    async def body(srv):
        log = NullLog("smtp")
        a = SmtpDeliveryAgent(make_config(), FakeResolver({}), log, rng=random.Random(0),
                              own_addresses=frozenset())
        res = await deliver_via_port25(srv, a, "[127.0.0.1]", ["a@x.test"])
        a.close()
        return res, log
    res, log = run(with_server(srv, body))
    assert res[0].status == "bounced" and res[0].dsn == "5.4.6"
    assert res[0].reason == "mail for 127.0.0.1 loops back to myself"
    assert res[0].relay == "127.0.0.1[127.0.0.1]:25"
    assert ("warning: host 127.0.0.1[127.0.0.1]:25 replied to HELO/EHLO with my own hostname "
            "client.test") in log.lines


def test_greeting_with_my_own_hostname_only_warns():
    srv = ScriptedServer(greeting="220 client.test ESMTP")

    async def body(srv):
        log = NullLog("smtp")
        a = SmtpDeliveryAgent(make_config(), FakeResolver({}), log, rng=random.Random(0),
                              own_addresses=frozenset())
        res = await deliver_via_port25(srv, a, "[127.0.0.1]", ["a@x.test"])
        a.close()
        return res, log
    res, log = run(with_server(srv, body))
    assert res[0].status == "sent"
    assert any("greeted me with my own hostname client.test" in line for line in log.lines)


def test_no_loop_detection_off_port_25():
    srv = ScriptedServer(name="client.test")

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "sent"


def test_dns_failures_map_to_results():
    resolver = FakeResolver({("null.test", "MX"): [(0, ".")], ("tmp.test", "MX"): "SERVFAIL"})
    a = agent(resolver=resolver)
    res = run(a.deliver(request("null.test", ["a@null.test"])))
    assert (res[0].status, res[0].dsn, res[0].relay) == ("bounced", "5.1.0", "none")
    assert res[0].reason == "Domain null.test does not accept mail (nullMX)"
    res = run(a.deliver(request("tmp.test", ["a@tmp.test"])))
    assert (res[0].status, res[0].dsn) == ("deferred", "4.4.3")


def test_dsn_parameters_sent():
    srv = ScriptedServer()

    async def body(srv):
        a = agent()
        req = request(f"[127.0.0.1]:{srv.port}", [], attributes={"ret": "HDRS", "envid": "E1",
                                                                 "body": "8BITMIME"})
        req.recipients = [Recipient("a@x.test", orcpt="rfc822;a@x.test", notify="FAILURE")]
        res = await a.deliver(req)
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "sent"
    assert srv.sessions[0][1] == "MAIL FROM:<s@client.test> SIZE=21 BODY=8BITMIME ENVID=E1 RET=HDRS"
    assert srv.sessions[0][2] == "RCPT TO:<a@x.test> ORCPT=rfc822;a@x.test NOTIFY=FAILURE"


def test_eight_bit_decision():
    assert eight_bit_action("8BITMIME", False, False) == "convert"
    assert eight_bit_action("8BITMIME", True, False) == "send"
    assert eight_bit_action("8BITMIME", False, True) == "send"
    assert eight_bit_action(None, False, False) == "convert"   # only declared 8-bit parts change
    assert eight_bit_action("7BIT", False, False) == "send"


MIME_8BIT = (b"Subject: t\nMIME-Version: 1.0\nContent-Type: multipart/mixed;\n boundary=\"XX\"\n"
             b"Content-Transfer-Encoding: 8bit\n\npreamble\n--XX\n"
             b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
             b"caf\xc3\xa9 = x\n--XX\nContent-Type: text/plain\n\nplain \xc3\xa9\n--XX--\n")


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_mime_downgrade_any_chunking(size):
    m = MimeDowngrade()
    out = b"".join(m.feed(MIME_8BIT[i:i + size]) for i in range(0, len(MIME_8BIT), size))
    out += m.close()
    assert out == (b"Subject: t\nMIME-Version: 1.0\nContent-Type: multipart/mixed;\n boundary=\"XX\"\n"
                   b"Content-Transfer-Encoding: 7bit\n\npreamble\n--XX\n"
                   b"Content-Type: text/plain; charset=utf-8\n"
                   b"Content-Transfer-Encoding: quoted-printable\n\n"
                   b"caf=C3=A9 =3D x\n--XX\nContent-Type: text/plain\n\nplain \xc3\xa9\n--XX--\n")


def test_mime_downgrade_leaves_non_mime_alone_and_breaks_long_lines():
    m = MimeDowngrade()
    plain = b"Subject: x\n\ncaf\xc3\xa9\n"
    assert m.feed(plain) + m.close() == plain
    m = MimeDowngrade()
    out = m.feed(b"Content-Transfer-Encoding: 8bit\n\n" + b"\xff" * 100 + b"\n") + m.close()
    body = out.split(b"\n\n", 1)[1]
    assert all(len(line) <= 76 for line in body.split(b"\n")) and body.isascii()


def test_mime_downgrade_on_the_wire():
    srv = ScriptedServer(ehlo=("PIPELINING", "ENHANCEDSTATUSCODES"))

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"], MIME_8BIT,
                                      attributes={"body": "8BITMIME"}))
        a.close()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "sent"
    assert b"caf=C3=A9 =3D x\r\n" in srv.messages[0]
    assert srv.sessions[0][1] == "MAIL FROM:<s@client.test>"


def test_no_downgrade_when_disabled_or_offered():
    for cfg, ehlo in ((make_config(disable_mime_output_conversion="yes"), ("PIPELINING",)),
                      (make_config(), ("PIPELINING", "8BITMIME"))):
        srv = ScriptedServer(ehlo=ehlo)

        async def body(srv):
            a = agent(cfg)
            res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"], MIME_8BIT))
            a.close()
            return res
        res = run(with_server(srv, body))
        assert res[0].status == "sent" and b"caf\xc3\xa9 = x" in srv.messages[0]


def test_mx_session_limit_and_final_soft_error():
    servers = [ScriptedServer(rcpt={"a@dest.test": f"450 4.2.0 busy {n}"}) for n in range(3)]

    async def body():
        for srv in servers:
            await srv.start()
        try:
            resolver = FakeResolver({("dest.test", "MX"): [(10, "m1.test"), (20, "m2.test"),
                                                           (30, "m3.test")],
                                     ("m1.test", "A"): ["127.0.0.11"],
                                     ("m2.test", "A"): ["127.0.0.12"],
                                     ("m3.test", "A"): ["127.0.0.13"]})
            a = agent(resolver=resolver)
            a.route = lambda host, port: ("127.0.0.1", servers[int(host.rsplit(".", 1)[1]) - 11].port)
            res = await a.deliver(request("dest.test", ["a@dest.test"]))
            await a.close_all()
            return res
        finally:
            for srv in servers:
                await srv.stop()
    res = run(body())
    # smtp_mx_session_limit = 2: the third MX is never tried; the last answer is reported.
    assert [len(s.sessions) for s in servers] == [1, 1, 0]
    assert res[0].status == "deferred" and res[0].relay == "m2.test[127.0.0.12]:25"
    assert res[0].reason == ("host m2.test[127.0.0.12] said: 450 4.2.0 busy 1 "
                             "(in reply to RCPT TO command)")


def test_multiline_and_odd_replies_worded_like_postfix():
    srv = ScriptedServer(rcpt={"m@x.test": "550-5.1.1 first line\r\n550-5.1.1 second line\r\n"
                                           "550 5.1.1 third",
                               "n@x.test": "452 Too many",
                               "o@x.test": "354 what"})

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["m@x.test", "n@x.test",
                                                                   "o@x.test", "ok@x.test"]))
        a.close()
        return res
    res = run(with_server(srv, body))
    said = "host 127.0.0.1[127.0.0.1] said: "
    assert (res[0].status, res[0].dsn) == ("bounced", "5.1.1")
    assert res[0].reason == (said + "550-5.1.1 first line 550-5.1.1 second line 550 5.1.1 third "
                             "(in reply to RCPT TO command)")
    assert (res[1].status, res[1].dsn) == ("deferred", "4.0.0")
    assert (res[2].status, res[2].dsn) == ("bounced", "5.5.0")
    assert res[3].status == "sent"


def test_garbage_reply_line_skipped_with_warning():
    srv = ScriptedServer(replies={"MAIL": "hello there\r\n250 2.1.0 Ok"})

    async def body(srv):
        log = NullLog("smtp")
        a = SmtpDeliveryAgent(make_config(), FakeResolver({}), log, rng=random.Random(0),
                              own_addresses=frozenset())
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        a.close()
        return res, log
    res, log = run(with_server(srv, body))
    assert res[0].status == "sent"
    assert (f"warning: ABC: non-ESMTP response from 127.0.0.1[127.0.0.1]:{srv.port}: hello there"
            in log.lines)


def test_bind_address():
    srv = ScriptedServer()
    peers = []
    orig = srv.handle

    async def handle(reader, writer):
        peers.append(writer.get_extra_info("peername")[0])
        await orig(reader, writer)
    srv.handle = handle

    async def body(srv):
        a = agent(make_config(smtp_bind_address="127.0.0.2"))
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        await a.close_all()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "sent" and peers == ["127.0.0.2"]


def test_bind_address_unavailable_not_enforced():
    srv = ScriptedServer()

    async def body(srv):
        log = NullLog("smtp")
        a = SmtpDeliveryAgent(make_config(smtp_bind_address="192.0.2.123"), FakeResolver({}), log,
                              rng=random.Random(0), own_addresses=frozenset())
        res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        await a.close_all()
        return res, log
    res, log = run(with_server(srv, body))
    assert res[0].status == "sent"
    assert any("bind 192.0.2.123" in line for line in log.lines)


def test_connection_reuse_time_limit_with_injected_clock():
    srv = ScriptedServer()
    now = [1000.0]

    async def body(srv):
        a = SmtpDeliveryAgent(make_config(smtp_connection_cache_time_limit="30s"),
                              FakeResolver({}), NullLog("smtp"), rng=random.Random(0),
                              own_addresses=frozenset(), monotonic=lambda: now[0])
        out = []
        for step in (0, 100, 250):      # reuse_time_limit 300s counts from the connect
            now[0] = 1000.0 + step
            out += await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
        await a.close_all()
        return out
    res = run(with_server(srv, body))
    # 1st at t=0 (new), 2nd at t=100 (reuse), 3rd at t=250: after the 2nd use the
    # connection is 100s old (< 300s) so it was cached and reused again.
    assert [getattr(r, "conn_use", None) for r in res] == [None, 2, 3]

    srv = ScriptedServer()

    async def body2(srv):
        a = SmtpDeliveryAgent(make_config(smtp_connection_cache_time_limit="30s"),
                              FakeResolver({}), NullLog("smtp"), rng=random.Random(0),
                              own_addresses=frozenset(), monotonic=lambda: now[0])
        out = []
        for step in (0, 301):
            now[0] = 1000.0 + step
            out += await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@x.test"]))
            now[0] = 1000.0 + step + 301      # the connection is too old to go back
        await a.close_all()
        return out
    res = run(with_server(srv, body2))
    assert [getattr(r, "conn_use", None) for r in res] == [None, None]
    assert len(srv.sessions) == 2


def test_connection_reused_after_rset():
    srv = ScriptedServer(rcpt={"bad@x.test": "550 5.1.1 no such user"})

    async def body(srv):
        a = agent()
        first = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["bad@x.test"]))
        second = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["good@x.test"]))
        await a.close_all()
        return first + second
    res = run(with_server(srv, body))
    assert [r.status for r in res] == ["bounced", "sent"]
    assert getattr(res[1], "conn_use", None) == 2
    assert len(srv.sessions) == 1 and "RSET" in srv.sessions[0]
