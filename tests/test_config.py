"""main.cf parsing, $name expansion, units, machine defaults, registry."""

from __future__ import annotations

import ipaddress
import os
import shutil

import pytest

from postwell.config import Config, ConfigError, load_config
from postwell.config import machine, registry
from postwell.config.defaults import DEFAULTS, POSTWELL_DIFFERENCES
from postwell.config.expand import ExpandError, expand
from postwell.config.main import parse_main_cf, parse_main_cf_entries
from postwell.config.postfix_defaults import POSTFIX_DEFAULTS
from postwell.config.units import default_time_unit, format_time, parse_time

STOCK = "/usr/share/postfix"


def write(tmp_path, main: str, master: str | None = None) -> str:
    (tmp_path / "main.cf").write_text(main)
    if master is not None:
        (tmp_path / "master.cf").write_text(master)
    return str(tmp_path)


def cfg_of(main: str) -> Config:
    return Config("/nonexistent", parse_main_cf(main), {}, [])


# ---- parsing --------------------------------------------------------------

def test_comments_blank_lines_and_continuations():
    text = ("# comment\n"
            "   # indented comment\n"
            "a = one\n"
            "  two\n"
            "# comment inside a continued value\n"
            "\n"
            "\tthree\n"
            "b=x # not a comment\n"
            "c =\n"
            "d =    lead and trail   \n")
    p = parse_main_cf(text)
    assert p["a"] == "one  two\tthree"       # newline dropped, leading white space kept
    assert p["b"] == "x # not a comment"
    assert p["c"] == ""
    assert p["d"] == "lead and trail"


def test_later_definition_wins_and_lines_recorded():
    entries = parse_main_cf_entries("a = 1\nb = 2\n  more\na = 3\n")
    assert [(e.name, e.first_line, e.last_line) for e in entries] == [
        ("a", 1, 1), ("b", 2, 3), ("a", 4, 4)]
    assert parse_main_cf("a = 1\na = 3\n")["a"] == "3"


def test_leading_whitespace_first_line_is_warned_and_skipped():
    warnings = []
    p = parse_main_cf("  b = 1\na = 2\n", "/x/main.cf", warnings.append)
    assert p == {"a": "2"}
    assert warnings == ['/x/main.cf: logical line must not start with whitespace: "  b = 1"']


@pytest.mark.parametrize("text,msg,line", [
    ("a = 1\nthis is bad\n", "missing '=' after attribute name: \"this is bad\"", 2),
    ("= 1\n", 'missing attribute name: "= 1"', 1),
    ("a b = 1\n", "missing '=' after attribute name: \"a b = 1\"", 1),
])
def test_broken_main_cf_names_file_and_line(tmp_path, text, msg, line):
    d = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(d)
    e = ei.value
    assert (e.file, e.line, e.msg) == (os.path.join(d, "main.cf"), line, msg)
    assert str(e) == f"{d}/main.cf, line {line}: {msg}"


def test_missing_main_cf(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(str(tmp_path))
    assert str(ei.value) == f"open {tmp_path}/main.cf: No such file or directory"


def test_mail_config_environment(tmp_path, monkeypatch):
    d = write(tmp_path, "myorigin = example.org\n")
    monkeypatch.setenv("MAIL_CONFIG", d)
    cfg = load_config()
    assert cfg.config_dir == d and cfg.get("myorigin") == "example.org"
    assert cfg.get("config_directory") == d


# ---- expansion -----------------------------------------------------------

LOOK = {"h": "host.example", "e": "", "one": "1", "lvl": "3.6", "ref": "$h"}.get


@pytest.mark.parametrize("value,expected", [
    ("$h", "host.example"),
    ("${h}", "host.example"),
    ("$(h)", "host.example"),
    ("x$h.y", "xhost.example.y"),
    ("$ref", "host.example"),
    ("a $$ b", "a $ b"),
    ("${h?yes}", "yes"), ("${e?yes}", ""), ("${nosuch?yes}", ""),
    ("${h:no}", ""), ("${e:no}", "no"), ("${nosuch:no}", "no"),
    ("${h?{a b}:{c d}}", "a b"), ("${e?{a b}:{c d}}", "c d"),
    ("${h ? {Y} : {N}}", "Y"), ("${ h }", "host.example"),
    ("${h?{$ref}:{no}} end", "host.example end"),
    ("${h?a{b}c}", "a{b}c"), ("$(h?a)", "a"), ("${h?{a}}x", "ax"),
    ("${e?{a}:{${h?{nested}:{no}}}}", "nested"),
    ("{$h}", "{host.example}"), ("$h}", "host.example}"),
    ("$nosuch", ""),
    ("${{$one} == {1} ? {one} : {other}}", "one"),
    ("${{a} != {a} ? {x} : {y}}", "y"),
    ("${{2} < {10} ? {lt} : {ge}}", "lt"),          # numeric
    ("${{ 2 } < { 10 } ? {lt} : {ge}}", "ge"),      # not all digits: string compare
    ("${{ a } == {a}?{y}:{n}}", "n"),
    ("${{2} <= {2}?{y}:{n}}", "y"),
    ("${{$lvl} <level {2} ? {subnet} : {host}}", "host"),
    ("${{3.6} <level {3.10} ? {lt} : {ge}}", "lt"),
    ("${{3.6} ==level {3.6.0}?{y}:{n}}", "y"),
    ("${{a} == {b}}", ""),
])
def test_expansion_forms(value, expected):
    assert expand(value, LOOK) == expected


@pytest.mark.parametrize("value,message", [
    ("a$", 'empty macro name: "a$"'),
    ("a$-b", 'empty macro name: "a$-b"'),
    ("a${x", 'truncated macro reference: "a${x"'),
    ("$(h", 'truncated macro reference: "$(h"'),
    ("a${}", 'empty macro name: "a${}"'),
])
def test_expansion_errors(value, message):
    with pytest.raises(ExpandError) as ei:
        expand(value, LOOK)
    assert str(ei.value) == message


def test_recursion_guard():
    cfg = cfg_of("loop1 = $loop2\nloop2 = $loop1\n")
    with pytest.raises(ConfigError) as ei:
        cfg.get("loop1")
    assert "unreasonable macro call nesting" in str(ei.value)


def test_expansion_stays_linear():
    text = "".join(f"p{i} = $p{i + 1}$p{i + 1}\n" for i in range(60)) + "p60 = x\n"
    # 2**60 expansions without memoization; instant with it.
    assert cfg_of(text.replace("p60 = x", "p60 =")).get("p0") == ""
    small = "".join(f"q{i} = $q{i + 1}$q{i + 1}\n" for i in range(10)) + "q10 = x\n"
    assert cfg_of(small).get("q0") == "x" * 1024


def test_undefined_callback_reports_names():
    seen = []
    assert expand("a $x ${y:z}", LOOK, undefined=seen.append) == "a  z"
    assert seen == ["x", "y"]


def test_raw_parameters_are_not_expanded():
    cfg = cfg_of("mailbox_command = /bin/deliver $recipient\n")
    assert cfg.get("mailbox_command") == "/bin/deliver $recipient"
    assert cfg.get("forward_path").startswith("$home/.forward")


# ---- defaults ------------------------------------------------------------

def test_defaults_table_is_complete_and_safe():
    assert len(POSTFIX_DEFAULTS) > 800
    cfg = cfg_of("")
    assert cfg.get("mail_name") == "postwell"
    assert cfg.get("syslog_name") == "postfix"
    assert cfg.get("smtpd_banner") == f"{cfg.get('myhostname')} ESMTP postwell"
    assert cfg.get("compatibility_level") == "3.6"
    assert cfg.get("smtputf8_enable") == "yes"
    assert cfg.get("append_dot_mydomain") == "no"
    assert cfg.get("relay_domains") == ""
    assert cfg.get("mynetworks_style") == "host"
    assert cfg.get("smtpd_relay_restrictions") == (
        "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination")
    assert cfg.get("smtpd_forbid_bare_newline") == "normalize"
    assert cfg.raw("smtpd_forbid_bare_newline_exclusions") == "$mynetworks"
    assert cfg.get("queue_directory") == "/var/spool/postfix"
    assert cfg.get("data_directory") == "/var/lib/postfix"
    assert "chunking" not in cfg.get("smtpd_discard_ehlo_keywords")
    for name in POSTWELL_DIFFERENCES:
        assert DEFAULTS[name] == POSTWELL_DIFFERENCES[name]


def test_legacy_compatibility_level_selects_legacy_defaults():
    cfg = cfg_of("compatibility_level = 0\n")
    assert cfg.get("smtputf8_enable") == "no"
    assert cfg.get("mynetworks_style") == "subnet"
    assert cfg.get("relay_domains") == cfg.get("mydestination")


def test_machine_dependent_defaults(monkeypatch):
    monkeypatch.setattr(machine, "system_hostname", lambda: "box")
    assert cfg_of("").get("myhostname") == "box.localdomain"
    assert cfg_of("").get("mydomain") == "localdomain"
    assert cfg_of("mydomain = example.org\n").get("myhostname") == "box.example.org"
    monkeypatch.setattr(machine, "system_hostname", lambda: "mx1.mail.example.com")
    assert cfg_of("").get("mydomain") == "mail.example.com"
    assert cfg_of("myhostname = a.com\n").get("mydomain") == "com"
    assert cfg_of("myhostname = x\n").get("mydomain") == "localdomain"
    assert cfg_of("").get("process_id") == str(os.getpid())


def _fake_interfaces(monkeypatch):
    ifaces = [ipaddress.ip_interface(x) for x in
              ("127.0.0.1/8", "192.0.2.2/24", "172.16.5.9/12", "::1/128", "fd00::2/64")]
    monkeypatch.setattr(machine, "interface_networks", lambda: list(ifaces))


def test_mynetworks_styles(monkeypatch):
    _fake_interfaces(monkeypatch)
    assert cfg_of("").get("mynetworks") == (
        "127.0.0.1/32 192.0.2.2/32 172.16.5.9/32 [::1]/128 [fd00::2]/128")
    assert cfg_of("mynetworks_style = subnet\n").get("mynetworks") == (
        "127.0.0.0/8 192.0.2.0/24 172.16.0.0/12 [::1]/128 [fd00::]/64")
    assert cfg_of("mynetworks_style = class\n").get("mynetworks") == (
        "127.0.0.0/8 192.0.2.0/24 172.16.0.0/16 [::1]/128 [fd00::]/64")
    assert cfg_of("mynetworks_style = subnet\ninet_interfaces = loopback-only\n").get(
        "mynetworks") == "127.0.0.0/8 [::1]/128"
    assert cfg_of("inet_protocols = ipv4\n").get("mynetworks") == (
        "127.0.0.1/32 192.0.2.2/32 172.16.5.9/32")
    assert cfg_of("mynetworks_style = subnet\ninet_interfaces = 192.0.2.2, [::1]\n").get(
        "mynetworks") == "192.0.2.0/24 [::1]/128"
    assert cfg_of("mynetworks = 10.0.0.0/8\n").get("mynetworks") == "10.0.0.0/8"
    with pytest.raises(ConfigError):
        cfg_of("mynetworks_style = bogus\n").get("mynetworks")


def test_real_interfaces_include_loopback():
    nets = machine.compute_mynetworks("host")
    assert "127.0.0.1/32" in nets.split()


def test_override_and_for_service():
    cfg = cfg_of("smtpd_banner = $myhostname hi\nmyhostname = mx.example\n")
    o = cfg.override({"smtpd_banner": "other $myhostname"})
    assert o.get("smtpd_banner") == "other mx.example" and o.is_set("smtpd_banner")
    assert cfg.get("smtpd_banner") == "mx.example hi"
    from postwell.config.master import parse_master_line
    svc = parse_master_line("relay unix - - n - - smtp -o syslog_name=postfix/$service_name")
    assert cfg.for_service(svc).get("syslog_name") == "postfix/relay"
    assert cfg.for_service(svc).get("process_name") == "smtp"


# ---- units and typed getters --------------------------------------------

@pytest.mark.parametrize("text,unit,seconds", [
    ("300s", "s", 300), ("5m", "s", 300), ("1h", "s", 3600), ("1d", "s", 86400),
    ("1w", "s", 604800), ("7", "d", 7 * 86400), ("7", "s", 7), ("10H", "s", 36000),
])
def test_parse_time(text, unit, seconds):
    assert parse_time(text, unit) == seconds


@pytest.mark.parametrize("bad", ["", "5x", "1.5h", "-1s", "5 m", "h"])
def test_parse_time_rejects(bad):
    with pytest.raises(ValueError):
        parse_time(bad)


def test_time_bare_number_takes_parameters_default_unit():
    cfg = cfg_of("maximal_queue_lifetime = 2\nsmtpd_timeout = 60\nminimal_backoff_time = 5\n")
    assert cfg.get_time("maximal_queue_lifetime") == 2 * 86400
    assert cfg.get_time("smtpd_timeout") == 60
    assert cfg.get_time("minimal_backoff_time") == 5
    assert cfg.get_time("maximal_queue_lifetime", "s") == 2   # caller-chosen unit still works
    assert default_time_unit("${stress?{10}:{300}}s", cfg) == "s"
    assert format_time(86400 * 5) == "5d"


def test_typed_getter_errors_name_the_parameter():
    cfg = cfg_of("maximal_queue_lifetime = 5x\nsmtputf8_enable = maybe\n"
                 "message_size_limit = 10M\ndefault_process_limit = lots\n")
    with pytest.raises(ConfigError, match="parameter maximal_queue_lifetime: bad time value"):
        cfg.get_time("maximal_queue_lifetime")
    with pytest.raises(ConfigError, match="bad boolean configuration: smtputf8_enable = maybe"):
        cfg.get_bool("smtputf8_enable")
    with pytest.raises(ConfigError, match="bad numerical configuration: message_size_limit"):
        cfg.get_size("message_size_limit")
    with pytest.raises(ConfigError, match="default_process_limit"):
        cfg.get_int("default_process_limit")


def test_typed_getters():
    cfg = cfg_of("biff = YES\nmydestination = a, b  c,,d\n")
    assert cfg.get_bool("biff") is True
    assert cfg.get_bool("smtpd_use_tls") is False
    assert cfg.get_int("default_process_limit") == 100
    assert cfg.get_size("message_size_limit") == 10240000
    assert cfg.get_list("mydestination") == ["a", "b", "c", "d"]


# ---- registry -------------------------------------------------------------

MASTER = ("smtp inet n - n - - smtpd\n"
          "  -o smtpd_client_restrictions=$mua_client_restrictions\n"
          "relay unix - - n - - smtp\n"
          "mailman unix - n n - - pipe flags=FRX user=list argv=/bin/true\n")


def test_unused_and_user_defined_parameters(tmp_path):
    d = write(tmp_path, "foo = bar\nmua_client_restrictions = reject\naa = $bb\nbb = 1\n"
                        "relay_destination_concurrency_limit = 5\nmailman_time_limit = 10s\n"
                        "smtpd_restriction_classes = cls\ncls = reject\n"
                        "smtp_time_limit = 1\n", MASTER)
    cfg = load_config(d)
    assert registry.unused_parameters(cfg) == [("foo", "bar"), ("aa", "$bb"),
                                               ("smtp_time_limit", "1")]
    assert registry.is_known("bb", cfg) and registry.is_known("cls", cfg)
    assert cfg.get_int("relay_destination_concurrency_limit") == 5
    assert cfg.raw("lmtp_destination_concurrency_limit") is None   # no lmtp service here
    assert cfg.get("relay_destination_recipient_limit") == "50"
    assert registry.unused_parameter_warning("/d/main.cf", "x", "a\tb") == (
        "/d/main.cf: unused parameter: x=a?b")


def test_unimplemented_parameters(tmp_path, monkeypatch):
    # Only the config part's own names: other modules may have registered more.
    monkeypatch.setattr(registry, "IMPLEMENTED", {"myhostname"})
    monkeypatch.setattr(registry, "_SOURCE_NAMES", set())
    d = write(tmp_path, "myhostname = a.example\nbiff = yes\nfoo = 1\n",
              "smtp inet n - n - - smtpd -o smtpd_tls_security_level=may\n")
    cfg = load_config(d)
    registry.register_implemented("test_only_param")
    names = registry.unimplemented_parameters(cfg)
    assert "myhostname" not in names and "foo" not in names
    assert "biff" in names
    assert "smtpd_tls_security_level" in names


def test_behaviour_equal_settings_draw_no_warning(tmp_path, monkeypatch):
    # Debian's stock main.cf sets biff = no: that is what postwell does anyway.
    d = write(tmp_path, "biff = no\nreadme_directory = /usr/share/doc/postfix\n", "")
    assert registry.unimplemented_parameters(load_config(d)) == []


def test_parameters_read_by_the_code_count_as_implemented():
    # message_size_limit is read by the smtpd and cleanup as a string literal.
    assert registry.is_implemented("message_size_limit")


def test_implemented_suffix_patterns(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "IMPLEMENTED", set(registry.IMPLEMENTED))
    d = write(tmp_path, "relay_transport_rate_delay = 1s\n", "relay unix - - n - - smtp\n")
    cfg = load_config(d)
    assert registry.is_implemented("relay_transport_rate_delay") is (
        "relay_transport_rate_delay" in registry.IMPLEMENTED
        or "*_transport_rate_delay" in registry.IMPLEMENTED)
    registry.register_implemented("*_transport_rate_delay")
    assert registry.is_implemented("relay_transport_rate_delay")
    assert "relay_transport_rate_delay" not in registry.unimplemented_parameters(cfg)


@pytest.mark.skipif(not os.path.exists(f"{STOCK}/main.cf.debian"), reason="no postfix package")
@pytest.mark.parametrize("main", ["main.cf.debian", "main.cf.dist"])
def test_stock_files_parse(tmp_path, main):
    shutil.copy(f"{STOCK}/{main}", tmp_path / "main.cf")
    shutil.copy(f"{STOCK}/master.cf.dist", tmp_path / "master.cf")
    cfg = load_config(str(tmp_path))
    assert len(cfg.services) >= 25
    assert registry.unused_parameters(cfg) == []
    cfg.get("smtpd_banner")
    cfg.get("mynetworks")


def test_typed_error_points_at_main_cf_line(tmp_path):
    d = write(tmp_path, "# c\nmyorigin = x\nsmtpd_timeout = soon\n")
    cfg = load_config(d)
    with pytest.raises(ConfigError) as ei:
        cfg.get_time("smtpd_timeout")
    assert (ei.value.file, ei.value.line) == (f"{d}/main.cf", 3)
    with pytest.raises(ConfigError) as ei:
        cfg.override({"smtpd_timeout": "later"}).get_time("smtpd_timeout")
    assert ei.value.file == f"{d}/master.cf"


def test_cached_values_follow_later_edits(tmp_path):
    cfg = load_config(write(tmp_path, "myorigin = $mydomain\nmydomain = a.example\n"))
    assert cfg.get("myorigin") == "a.example"
    cfg.params["mydomain"] = "b.example"
    assert cfg.get("myorigin") == "b.example"
    plain = {"myorigin": "x"}
    c2 = Config("/x", plain, {}, [])
    assert c2.get("myorigin") == "x"
    plain["myorigin"] = "y"
    assert c2.get("myorigin") == "y"
    o = cfg.override({"myorigin": "z"})
    assert o.get("myorigin") == "z" and cfg.get("myorigin") == "b.example"


def test_get_list_keeps_braced_groups():
    cfg = cfg_of("virtual_alias_maps = hash:/etc/a, inline:{ a@x=b@y, { c@x = d@y } }\n"
                 "  regexp:/etc/r\n")
    assert cfg.get_list("virtual_alias_maps") == [
        "hash:/etc/a", "inline:{ a@x=b@y, { c@x = d@y } }", "regexp:/etc/r"]


def test_expansion_error_points_at_the_parameter(tmp_path):
    d = write(tmp_path, "a = 1\nmyorigin = x$\n")
    with pytest.raises(ConfigError) as ei:
        load_config(d).get("myorigin")
    assert (ei.value.file, ei.value.line, ei.value.msg) == (
        f"{d}/main.cf", 2, 'empty macro name: "x$"')
