"""DnsPythonResolver against a real name server (dnsmasq) on loopback.

Needs the Debian package dnsmasq-base (the binary only; no service is started).
The resolver is pointed at 127.0.0.1:<port> only: no outside DNS is ever asked.
"""

import asyncio
import os
import random
import shutil
import subprocess
import time

import pytest

import harness

from postwell.dns import (DestinationError, DnsPythonResolver, DnsTempFail, MxRecord,
                          NoSuchDomain, resolve_destination)

DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq")
                                      else None)
pytestmark = pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq not installed (dnsmasq-base)")

ZONE = """
no-resolv
no-hosts
local=/test/
mx-host=example.test,mx1.example.test,10
mx-host=example.test,mx2.example.test,20
mx-host=nullmx.test,.,0
mx-host=loop.test,me.test,10
host-record=mx1.example.test,127.0.0.1
host-record=mx2.example.test,127.0.0.2,::1
host-record=nomx.test,127.0.0.3
host-record=me.test,127.0.0.9
server=/broken.test/127.0.0.1#9
"""


def _start_dnsmasq(conf):
    """dnsmasq on a port free for UDP and TCP (it binds both); a few ports are
    tried, since another process may take one between the check and the bind."""
    for _attempt in range(3):
        port = harness.free_port(udp=True)
        conf.write_text(f"port={port}\nlisten-address=127.0.0.1\nbind-interfaces\n" + ZONE)
        argv = [DNSMASQ, "-k", f"--conf-file={conf}", "--pid-file="]
        if os.geteuid() == 0:
            argv.append("--user=nobody")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        resolver = DnsPythonResolver([("127.0.0.1", port)], timeout=0.5, lifetime=1.5)
        while True:
            try:
                asyncio.run(resolver.mx("example.test"))
                return proc, resolver
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        err = proc.stderr.read()
        if b"Address already in use" not in err:
            pytest.fail(f"dnsmasq did not start: {err!r}")
    pytest.fail("dnsmasq found no free port in 3 attempts")


@pytest.fixture(scope="module")
def nameserver(tmp_path_factory):
    conf = tmp_path_factory.mktemp("dnsmasq") / "dnsmasq.conf"
    proc, resolver = _start_dnsmasq(conf)
    try:
        yield resolver
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_mx_records(nameserver):
    assert sorted(run(nameserver.mx("example.test"))) == [
        MxRecord(10, "mx1.example.test"), MxRecord(20, "mx2.example.test")]


def test_nodata_nxdomain_servfail(nameserver):
    assert run(nameserver.mx("nomx.test")) == []
    with pytest.raises(NoSuchDomain):
        run(nameserver.mx("nope.test"))
    with pytest.raises(DnsTempFail):
        run(nameserver.mx("x.broken.test"))


def test_null_mx_record(nameserver):
    assert run(nameserver.mx("nullmx.test")) == [MxRecord(0, "")]


def test_addresses_and_ptr(nameserver):
    assert run(nameserver.addresses("mx2.example.test")) == ["127.0.0.2", "::1"]
    assert run(nameserver.addresses("mx2.example.test", ("ipv6",))) == ["::1"]
    assert run(nameserver.addresses("nomx.test")) == ["127.0.0.3"]
    with pytest.raises(NoSuchDomain):
        run(nameserver.addresses("nope.test"))
    assert "mx1.example.test" in run(nameserver.ptr("127.0.0.1"))


def test_resolve_destination_end_to_end(nameserver):
    t = run(resolve_destination(nameserver, "example.test", rng=random.Random(0)))
    assert [x.relay for x in t] == ["mx1.example.test[127.0.0.1]:25",
                                    "mx2.example.test[127.0.0.2]:25", "mx2.example.test[::1]:25"]
    t = run(resolve_destination(nameserver, "nomx.test:2525", rng=random.Random(0)))
    assert [x.relay for x in t] == ["nomx.test[127.0.0.3]:2525"]
    with pytest.raises(DestinationError) as e:
        run(resolve_destination(nameserver, "nullmx.test", rng=random.Random(0)))
    assert e.value.dsn == "5.1.0"
    with pytest.raises(DestinationError) as e:
        run(resolve_destination(nameserver, "loop.test", rng=random.Random(0),
                                own_addresses=frozenset({"127.0.0.9"})))
    assert e.value.reason == "mail for loop.test loops back to myself"
