"""master.cf parsing and listen addresses."""

from __future__ import annotations

import os

import pytest

from postwell.config import ConfigError, listen_address, load_config
from postwell.config.master import MasterService, parse_master_cf, parse_master_line

STOCK = "/usr/share/postfix/master.cf.dist"


def test_fields_and_defaults():
    svc = parse_master_line("qmgr unix n - n 300 1 qmgr", "m", 3)
    assert (svc.name, svc.type, svc.private, svc.unpriv, svc.chroot) == (
        "qmgr", "unix", False, True, False)
    assert (svc.wakeup, svc.maxproc, svc.command, svc.line) == ("300", 1, "qmgr", 3)
    d = parse_master_line("x unix - - - - - cmd")
    assert (d.private, d.unpriv, d.chroot, d.wakeup, d.maxproc) == (True, True, False, "0", None)
    assert d.process_limit() == 100
    t = parse_master_line("tlsmgr unix - - y 1000? 1 tlsmgr")
    assert t.wakeup == "1000?" and t.wakeup_seconds == 1000 and t.chroot is True


def test_overrides_and_braced_arguments():
    text = ("submission inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/submission\n"
            "  -o { smtpd_client_restrictions = permit_sasl_authenticated, reject }\n"
            "  -o {smtpd_tls_security_level=encrypt} {an argument} plain\n")
    [svc] = parse_master_cf(text)
    assert svc.overrides == {
        "syslog_name": "postfix/submission",
        "smtpd_client_restrictions": "permit_sasl_authenticated, reject",
        "smtpd_tls_security_level": "encrypt"}
    assert svc.args[-2:] == ["an argument", "plain"]
    assert svc.line == 1


def test_comments_and_continuations():
    text = ("# header\n"
            "smtp inet n - n - - smtpd\n"
            "#  -o commented=out\n"
            "  -o smtpd_banner=hi\n"
            "\n"
            "pickup unix n - n 60 1 pickup\n")
    a, b = parse_master_cf(text)
    assert a.overrides == {"smtpd_banner": "hi"} and b.name == "pickup" and b.line == 6


@pytest.mark.parametrize("line,msg", [
    ("smtp inet n - n - smtpd", "bad field count"),
    ("smtp bogus n - n - - smtpd", 'invalid type field "bogus" in "smtp bogus n - n - - smtpd"'),
    ("smtp inet x - n - - smtpd", 'invalid private field "x" in "smtp inet x - n - - smtpd"'),
    ("smtp inet n - n abc - smtpd", 'invalid wakeup field "abc" in "smtp inet n - n abc - smtpd"'),
    ("smtp inet n - n - abc smtpd",
     'invalid process_limit field "abc" in "smtp inet n - n - abc smtpd"'),
    ("smtp inet n - n - - smtpd -o { a = b", "missing '}'"),
    ("smtp inet n - n - - smtpd -o {a}", "missing '=' after attribute name: \"a\""),
])
def test_bad_lines_name_file_and_line(tmp_path, line, msg):
    (tmp_path / "main.cf").write_text("")
    (tmp_path / "master.cf").write_text("# c\n" + line + "\n")
    with pytest.raises(ConfigError) as ei:
        load_config(str(tmp_path))
    assert ei.value.file == str(tmp_path / "master.cf") and ei.value.line == 2
    assert msg in ei.value.msg


@pytest.mark.parametrize("name,expected", [
    ("smtp", (None, 25)), ("2525", (None, 2525)), ("submission", (None, 587)),
    ("127.0.0.1:2525", ("127.0.0.1", 2525)), ("127.0.0.1:smtp", ("127.0.0.1", 25)),
    ("[::1]:2525", ("::1", 2525)), ("localhost:submission", ("localhost", 587)),
    ("smtps", (None, 465)), ("submissions", (None, 465)),
])
def test_listen_address(name, expected):
    assert listen_address(name) == expected
    svc = parse_master_line(f"{name} inet n - n - - smtpd")
    assert listen_address(svc) == expected


@pytest.mark.parametrize("name", ["nosuchservice", "1.2.3.4:0", "::1:25", "[::1]", "99999"])
def test_listen_address_errors(name):
    with pytest.raises(ConfigError):
        listen_address(MasterService(name, "inet", False, True, False, "0", None, "smtpd"))


@pytest.mark.skipif(not os.path.exists(STOCK), reason="no postfix package")
def test_stock_master_cf_parses_unchanged():
    with open(STOCK) as f:
        services = parse_master_cf(f.read(), STOCK)
    by_key = {s.key: s for s in services}
    assert by_key["smtp/inet"].command == "smtpd" and not by_key["smtp/inet"].private
    assert by_key["relay/unix"].overrides == {"syslog_name": "postfix/$service_name"}
    assert by_key["postlog/unix-dgram"].command == "postlogd"
    assert by_key["maildrop/unix"].args[:2] == ["flags=DRXhu", "user=vmail"]
    assert by_key["scalemail-backend/unix"].maxproc == 2
    assert by_key["qmgr/unix"].wakeup == "300" and by_key["qmgr/unix"].maxproc == 1
    assert listen_address(by_key["smtp/inet"]) == (None, 25)
