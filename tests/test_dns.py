"""MX selection and destination resolution against the fake resolver."""

import asyncio
import random

import pytest

from postwell.dns import (DestinationError, DnsTempFail, FakeResolver, MxRecord, NoSuchDomain,
                          NullMx, families_from_inet_protocols, parse_dns_servers, parse_nexthop,
                          resolve_destination, select_mx_hosts)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


ZONE = {
    ("example.com", "MX"): [(20, "mx2.example.com"), (10, "mx1.example.com"),
                            (10, "mx1b.example.com")],
    ("mx1.example.com", "A"): ["192.0.2.1"],
    ("mx1.example.com", "AAAA"): ["2001:db8::1"],
    ("mx1b.example.com", "A"): ["192.0.2.11"],
    ("mx2.example.com", "A"): ["192.0.2.2"],
    ("nomx.example", "A"): ["192.0.2.3"],
    ("nomx.example", "MX"): [],
    ("null.example", "MX"): [(0, "")],
    ("gone.example", "MX"): "NXDOMAIN",
    ("flaky.example", "MX"): "SERVFAIL",
    ("self.example", "MX"): [(10, "us.example"), (20, "backup.example")],
    ("us.example", "A"): ["198.51.100.7"],
    ("backup.example", "A"): ["192.0.2.9"],
    ("sec.example", "MX"): [(5, "better.example"), (10, "us.example")],
    ("better.example", "A"): ["192.0.2.5"],
    ("dead.example", "MX"): [(10, "nohost.example")],
    ("half.example", "MX"): [(10, "nohost.example"), (20, "tmp.example")],
    ("tmp.example", "A"): "SERVFAIL",
    ("noaddr.example", "MX"): [(10, "empty.example")],
    ("empty.example", "A"): [],
    ("v6only.example", "AAAA"): ["2001:db8::6"],
}


def resolve(nexthop, **kw):
    kw.setdefault("rng", random.Random(1))
    kw.setdefault("families", ("ipv4", "ipv6"))
    return run(resolve_destination(FakeResolver(ZONE), nexthop, **kw))


def test_select_orders_by_preference_and_shuffles_equal():
    recs = [MxRecord(20, "c"), MxRecord(10, "a"), MxRecord(10, "b"), MxRecord(30, "d")]
    seen = set()
    for seed in range(40):
        out = select_mx_hosts("d", recs, random.Random(seed))
        assert [r.preference for r in out] == [10, 10, 20, 30]
        seen.add(tuple(r.host for r in out[:2]))
    assert seen == {("a", "b"), ("b", "a")}     # RFC 5321 5.1: equal preference randomised


def test_select_is_deterministic_with_seeded_rng():
    recs = [MxRecord(10, h) for h in "abcdef"]
    a = select_mx_hosts("d", recs, random.Random(7))
    b = select_mx_hosts("d", recs, random.Random(7))
    assert a == b


def test_select_null_mx():
    with pytest.raises(NullMx) as e:
        select_mx_hosts("null.example", [MxRecord(0, "")], random.Random())
    assert e.value.dsn == "5.1.0" and e.value.permanent
    assert e.value.reason == "Domain null.example does not accept mail (nullMX)"


def test_select_empty_and_duplicates():
    assert select_mx_hosts("d", [], random.Random()) == []
    out = select_mx_hosts("d", [MxRecord(10, "a"), MxRecord(20, "a")], random.Random())
    assert out == [MxRecord(10, "a")]


def test_resolve_mx_order_and_addresses():
    t = resolve("example.com")
    assert [x.preference for x in t] == [10, 10, 10, 20]
    assert t[-1].relay == "mx2.example.com[192.0.2.2]:25"
    assert {x.host for x in t[:3]} == {"mx1.example.com", "mx1b.example.com"}
    assert all(x.best for x in t[:3]) and not t[-1].best


def test_resolve_families_and_preference():
    t = resolve("example.com", families=("ipv4",))
    assert all(":" not in x.ip for x in t)
    t = resolve("[mx1.example.com]", address_preference="ipv6")
    assert [x.ip for x in t] == ["2001:db8::1", "192.0.2.1"]


def test_resolve_address_limit():
    assert len(resolve("example.com", address_limit=2)) == 2


def test_resolve_literal_and_port():
    t = resolve("[192.0.2.50]:2525")
    assert t[0].relay == "192.0.2.50[192.0.2.50]:2525"
    t = resolve("[mx2.example.com]:26")
    assert t[0].relay == "mx2.example.com[192.0.2.2]:26"
    t = resolve("[ipv6:2001:db8::5]")
    assert t[0].ip == "2001:db8::5" and t[0].port == 25


def test_bracketed_name_skips_mx_lookup():
    r = FakeResolver(ZONE)
    run(resolve_destination(r, "[nomx.example]", rng=random.Random()))
    assert ("nomx.example", "MX") not in r.queries


def test_implicit_mx():
    t = resolve("nomx.example")
    assert [x.ip for x in t] == ["192.0.2.3"]


def test_null_mx_bounces():
    with pytest.raises(DestinationError) as e:
        resolve("null.example")
    assert e.value.dsn == "5.1.0"


def test_nxdomain_bounces():
    with pytest.raises(DestinationError) as e:
        resolve("gone.example")
    assert e.value.permanent and e.value.dsn == "5.4.4"
    assert e.value.reason == ("Host or domain name not found. Name service error for "
                              "name=gone.example type=AAAA: Host not found")  # Postfix: the A/AAAA lookup after NXDOMAIN for MX


def test_servfail_defers():
    with pytest.raises(DestinationError) as e:
        resolve("flaky.example")
    assert not e.value.permanent and e.value.dsn == "4.4.3"
    assert e.value.reason.endswith("type=MX: Host not found, try again")


def test_all_mx_hosts_dead_bounces_but_tempfail_defers():
    with pytest.raises(DestinationError) as e:
        resolve("dead.example")
    assert e.value.permanent
    with pytest.raises(DestinationError) as e:
        resolve("half.example")
    assert not e.value.permanent


def test_mx_without_addresses():
    with pytest.raises(DestinationError) as e:
        resolve("noaddr.example")
    assert e.value.dsn == "5.4.4" and "Host found but no data record" in e.value.reason


def test_loops_back_to_myself():
    with pytest.raises(DestinationError) as e:
        resolve("self.example", own_addresses=frozenset({"198.51.100.7"}))
    assert e.value.dsn == "5.4.6"
    assert e.value.reason == "mail for self.example loops back to myself"


def test_loop_rules_only_on_port_25_and_for_literals():
    assert resolve("self.example:2525", own_addresses=frozenset({"198.51.100.7"}))
    with pytest.raises(DestinationError) as e:
        resolve("[198.51.100.7]", own_addresses=frozenset({"198.51.100.7"}))
    assert e.value.reason == "mail for 198.51.100.7 loops back to myself"


def test_primary_relay_without_address():
    zone = dict(ZONE)
    zone[("prim.example", "MX")] = [(5, "nohost.example"), (10, "us.example")]
    r = FakeResolver(zone)
    with pytest.raises(DestinationError) as e:
        run(resolve_destination(r, "prim.example", rng=random.Random(0),
                                own_addresses=frozenset({"198.51.100.7"})))
    assert e.value.dsn == "4.4.4"
    assert e.value.reason == "unable to find primary relay for prim.example"


def test_secondary_mx_only_tries_better_hosts():
    # We are MX 10; only MX 5 may be tried (RFC 5321 5.1).
    t = resolve("sec.example", own_addresses=frozenset({"198.51.100.7"}))
    assert [x.host for x in t] == ["better.example"]


def test_parse_nexthop():
    assert parse_nexthop("example.com") == parse_nexthop("example.com:25")
    h = parse_nexthop("smtp:[10.0.0.1]:2525")
    assert (h.host, h.port, h.mx_lookup) == ("10.0.0.1", 2525, False)
    h = parse_nexthop("relay.example:587")
    assert (h.host, h.port, h.mx_lookup) == ("relay.example", 587, True)


def test_families_and_servers_parsing():
    assert families_from_inet_protocols("all") == ("ipv4", "ipv6")
    assert families_from_inet_protocols("ipv4") == ("ipv4",)
    assert families_from_inet_protocols("ipv6, ipv4") == ("ipv4", "ipv6")
    assert parse_dns_servers("127.0.0.1:5353, [::1]:53, 10.0.0.1") == [
        ("127.0.0.1", 5353), ("::1", 53), ("10.0.0.1", 53)]
    with pytest.raises(ValueError):
        parse_dns_servers("ns.example.com")


def test_fake_resolver_errors_and_ptr():
    r = FakeResolver({("1.2.3.4", "PTR"): ["host.example."], ("x.example", "A"): ["1.2.3.4"]})
    assert run(r.ptr("1.2.3.4")) == ["host.example"]
    with pytest.raises(NoSuchDomain):
        run(r.mx("y.example"))
    assert run(r.mx("x.example")) == []
    r = FakeResolver({("x.example", "MX"): "SERVFAIL"})
    with pytest.raises(DnsTempFail):
        run(r.mx("x.example"))


def test_randomize_addresses_of_one_host():
    zone = {("multi.example", "A"): [f"192.0.2.{i}" for i in range(1, 9)]}
    orders = set()
    for seed in range(10):
        t = run(resolve_destination(FakeResolver(zone), "[multi.example]", rng=random.Random(seed),
                                    randomize=True, address_limit=0))
        orders.add(tuple(x.ip for x in t))
        assert sorted(x.ip for x in t) == sorted(zone[("multi.example", "A")])
    assert len(orders) > 1
    t = run(resolve_destination(FakeResolver(zone), "[multi.example]", rng=random.Random(0)))
    assert [x.ip for x in t] == [f"192.0.2.{i}" for i in range(1, 6)]   # limit 5, DNS order
