"""smtp(8) delivery agent against Postfix's own smtp-sink(1) on loopback."""

import asyncio
import contextlib
import os
import pathlib
import shutil
import random
import socket
import subprocess
import tempfile
import time

import pytest

from postwell.config.main import Config
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.smtp import SmtpDeliveryAgent
from postwell.dns import FakeResolver
from postwell.log import NullLog

SINK = "/usr/sbin/smtp-sink"
pytestmark = [pytest.mark.postfix,
              pytest.mark.skipif(not os.access(SINK, os.X_OK), reason="smtp-sink not installed")]


def free_port():
    # Outside the ephemeral range: no outgoing connection can take it meanwhile.
    import harness
    return harness.free_port()


@contextlib.contextmanager
def smtp_sink(tmp_path, *options):
    """Run smtp-sink with ``options``; yields (port, dump directory)."""
    # smtp-sink writes after dropping to nobody, who cannot enter pytest's 0700 tmp_path.
    dump = pathlib.Path(tempfile.mkdtemp(prefix="postwell-sink-"))
    os.chmod(dump, 0o777)
    port = free_port()
    argv = [SINK, "-h", "sink.test", "-d", f"{dump}/%M.", *options]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "nobody"]
    proc = subprocess.Popen(argv + [f"127.0.0.1:{port}", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"smtp-sink did not start: {proc.stderr.read()!r}")
                time.sleep(0.05)
        yield port, dump
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(dump, ignore_errors=True)


def dumps(dump):
    # Let smtp-sink finish writing; bounded wait.
    time.sleep(0.1)
    return [p.read_bytes() for p in sorted(dump.iterdir())]


def deliver(port, rcpts, chunks=(b"Subject: sink\n\nhello\n",), times=1, **cfg):
    params = {"myhostname": "client.test", "inet_protocols": "ipv4"}
    params.update(cfg)
    agent = SmtpDeliveryAgent(Config("/nonexistent", params, {}, []), FakeResolver({}),
                              NullLog("smtp"), rng=random.Random(0), own_addresses=frozenset())

    async def go():
        out = []
        for _ in range(times):
            req = DeliveryRequest("QID", "sender@client.test", [Recipient(r) for r in rcpts],
                                  "smtp", f"[127.0.0.1]:{port}", 0.0, lambda: iter(chunks),
                                  sum(map(len, chunks)))
            out.append(await agent.deliver(req))
        await agent.close_all()
        return out
    results = asyncio.run(asyncio.wait_for(go(), 20))
    return results if times > 1 else results[0]


def test_delivers_and_content_round_trips(tmp_path):
    body = [b"Subject: sink\n\n.leading dot\n..two\nmid", b"dle of line\n.\nend\n"]
    with smtp_sink(tmp_path) as (port, dump):
        res = deliver(port, ["a@sink.test", "b@sink.test"], body)
        files = dumps(dump)
    assert [r.status for r in res] == ["sent", "sent"]
    assert res[0].reason == "250 2.0.0 Ok" and res[0].dsn == "2.0.0"
    assert res[0].relay == f"127.0.0.1[127.0.0.1]:{port}"
    assert len(files) == 1
    head, _, content = files[0].partition(b"(UTC)\n")
    # As Postfix: ORCPT for every recipient when the server offers DSN.
    assert (b"X-Rcpt-Args: <a@sink.test> ORCPT=rfc822;a@sink.test\n"
            b"X-Rcpt-Args: <b@sink.test> ORCPT=rfc822;b@sink.test\n") in head
    assert b"X-Helo-Args: client.test\n" in head
    # smtp-sink removed our dot-stuffing: the stored content comes back unchanged.
    assert content == b"".join(body) + b"\n"


def test_hard_rcpt_reject_bounces(tmp_path):
    with smtp_sink(tmp_path, "-f", "RCPT") as (port, dump):
        res = deliver(port, ["a@sink.test"])
        assert dumps(dump) == []
    assert res[0].status == "bounced" and res[0].dsn == "5.3.0"
    assert res[0].reason == ("host 127.0.0.1[127.0.0.1] said: 500 5.3.0 Error: command failed "
                             "(in reply to RCPT TO command)")


def test_soft_rcpt_reject_defers(tmp_path):
    with smtp_sink(tmp_path, "-r", "RCPT") as (port, _):
        res = deliver(port, ["a@sink.test", "b@sink.test"])
    assert [r.status for r in res] == ["deferred", "deferred"]
    assert res[0].dsn == "4.3.0"
    assert res[0].reason.endswith("450 4.3.0 Error: command failed (in reply to RCPT TO command)")


def test_end_of_data_reject(tmp_path):
    with smtp_sink(tmp_path, "-f", ".") as (port, _):
        res = deliver(port, ["a@sink.test"])
    assert res[0].status == "bounced"
    assert res[0].reason.endswith("(in reply to end of DATA command)")


def test_without_pipelining_or_esmtp(tmp_path):
    with smtp_sink(tmp_path, "-p") as (port, dump):
        res = deliver(port, ["a@sink.test", "b@sink.test"])
        assert len(dumps(dump)) == 1
    assert [r.status for r in res] == ["sent", "sent"]


def test_helo_only_server(tmp_path):
    with smtp_sink(tmp_path, "-e") as (port, dump):
        res = deliver(port, ["a@sink.test"])
        files = dumps(dump)
    assert res[0].status == "sent"
    assert b"X-Client-Proto: SMTP\n" in files[0]


def test_disconnect_after_data_command(tmp_path):
    with smtp_sink(tmp_path, "-q", "DATA") as (port, _):
        res = deliver(port, ["a@sink.test"])
    assert res[0].status == "deferred" and res[0].dsn == "4.4.2"
    assert res[0].reason.startswith("lost connection with 127.0.0.1[127.0.0.1] while sending")


def test_421_on_mail(tmp_path):
    with smtp_sink(tmp_path, "-Q", "MAIL") as (port, _):
        res = deliver(port, ["a@sink.test"])
    assert res[0].status == "deferred"
    assert "421" in res[0].reason


def test_connection_reuse(tmp_path):
    with smtp_sink(tmp_path) as (port, dump):
        res = deliver(port, ["a@sink.test"], times=3)
        assert len(dumps(dump)) == 3
    assert [r[0].status for r in res] == ["sent"] * 3
    assert [getattr(r[0], "conn_use", None) for r in res] == [None, 2, 3]


def test_large_message_streams(tmp_path):
    line = b"x" * 76 + b"\n"
    chunks = [line * 800] * 50          # ~3 MB in 50 chunks
    with smtp_sink(tmp_path) as (port, dump):
        res = deliver(port, ["a@sink.test"], chunks)
        files = dumps(dump)
    assert res[0].status == "sent"
    assert files[0].endswith(line * 3 + b"\n")
