"""The engine's table hooks: smtpd_reject_footer_maps and smtpd_command_filter reach the
sans-IO engine as plain callables (ServerConfig.footer_lookup / .command_filter) that the
smtpd builds from its tables (postwell.smtpd.server.table_lookups).  The engine is driven
here with stubs, without any table; the builder is checked on its own with real tables.
Side-by-side parity with Postfix for both parameters is in test_dialogue_sweep9.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from postwell.smtp.server import Info, ServerConfig, Warning
from test_smtp_engine import Driver


def _driver(**cfg) -> Driver:
    return Driver(ServerConfig(hostname="mx.example.test", error_sleep_time=0, **cfg))


class Stub:
    """A hook that answers from a dict and records its keys."""

    def __init__(self, answers=None, error=None):
        self.answers = answers or {}
        self.error = error
        self.keys: list[str] = []

    def __call__(self, key: str):
        self.keys.append(key)
        if self.error is not None:
            raise self.error
        return self.answers.get(key)


# ---- footer_lookup ------------------------------------------------------------------

def test_footer_hook_gets_the_whole_reply_and_only_rejects():
    hook = Stub({"500 5.5.2 Error: command not recognized": "\\c (see the FAQ)"})
    d = _driver(reject_footer="plain", footer_lookup=hook)
    assert d.feed(b"EHLO a.example\r\n").startswith("250-mx.example.test")
    assert d.feed(b"NOOP\r\n") == "250 2.0.0 Ok\r\n"
    assert d.feed(b"FOO\r\n") == "500 5.5.2 Error: command not recognized (see the FAQ)\r\n"
    # No entry: smtpd_reject_footer, on a line of its own.
    assert d.feed(b"HELO\r\n") == "501-Syntax: HELO hostname\r\n501 plain\r\n"
    assert hook.keys == ["500 5.5.2 Error: command not recognized", "501 Syntax: HELO hostname"]


def test_footer_hook_without_plain_footer_and_macros():
    hook = Stub({"501 Syntax: HELO hostname": "ask $server_name about $client_address\\nbye"})
    d = _driver(footer_lookup=hook)
    assert d.feed(b"FOO\r\n") == "500 5.5.2 Error: command not recognized\r\n"
    assert d.feed(b"HELO\r\n") == ("501-Syntax: HELO hostname\r\n"
                                    "501-ask mx.example.test about 127.0.0.1\r\n501 bye\r\n")


@pytest.mark.parametrize("entry", ["", "   "])
def test_footer_hook_empty_entry_leaves_plain_footer(entry):
    d = _driver(reject_footer="plain", footer_lookup=Stub({"501 Syntax: HELO hostname": entry}))
    assert d.feed(b"HELO\r\n") == "501-Syntax: HELO hostname\r\n501 plain\r\n"
    d = _driver(footer_lookup=Stub({"501 Syntax: HELO hostname": entry}))
    assert d.feed(b"HELO\r\n") == "501 Syntax: HELO hostname\r\n"


def test_footer_hook_failure_is_a_warning_and_the_plain_footer():
    d = _driver(reject_footer="plain", footer_lookup=Stub(error=OSError("map gone")))
    assert d.feed(b"HELO\r\n") == "501-Syntax: HELO hostname\r\n501 plain\r\n"
    assert [e.text for e in d.events if isinstance(e, Warning)] == ["map gone"]


def test_hook_failure_text_is_one_warning_per_line():
    d = _driver(reject_footer="plain", footer_lookup=Stub(error=LookupError("first\nsecond")),
                command_filter=Stub(error=LookupError("one\ntwo")))
    assert d.feed(b"HELO\r\n") == "501-Syntax: HELO hostname\r\n501 plain\r\n"
    assert [e.text for e in d.events if isinstance(e, Warning)] == ["one", "two", "first",
                                                                     "second"]


def test_footer_hook_multiline_reply_key_is_one_line():
    # str(Reply): the lines of a multi-line reply joined by blanks, as Postfix's lookup key.
    hook = Stub()
    d = _driver(footer_lookup=hook)
    d.feed(b"HELO\r\n")
    d.feed(b"BDAT x\r\n")
    assert all("\n" not in k for k in hook.keys) and len(hook.keys) == 2


# ---- command_filter -----------------------------------------------------------------

def test_command_filter_replaces_and_logs():
    hook = Stub({"NOOP x": "RSET"})
    d = _driver(command_filter=hook)
    d.feed(b"EHLO a.example\r\n")
    assert d.feed(b" \tNOOP x\r\n") == "250 2.0.0 Ok\r\n"
    assert "rset=1" in d.conn.counters_text() and "noop" not in d.conn.counters_text()
    assert hook.keys == ["EHLO a.example", "NOOP x"]      # leading blanks skipped
    assert [e.text for e in d.events if isinstance(e, Info)] == [
        'unknown[127.0.0.1]: replacing command " \tNOOP x" with "RSET"']


def test_command_filter_log_cuts_both_at_100():
    d = _driver(command_filter=Stub({"NOOP " + "a" * 120: "NOOP " + "b" * 200}))
    assert d.feed(b"NOOP " + b"a" * 120 + b"\r\n") == "250 2.0.0 Ok\r\n"
    (info,) = [e.text for e in d.events if isinstance(e, Info)]
    assert info == (f'unknown[127.0.0.1]: replacing command "{("NOOP " + "a" * 120)[:100]}" '
                    f'with "{("NOOP " + "b" * 200)[:100]}"')


def test_command_filter_miss_and_failure_keep_the_command():
    d = _driver(command_filter=Stub())
    assert d.feed(b"NOOP\r\n") == "250 2.0.0 Ok\r\n"
    assert not [e for e in d.events if isinstance(e, (Info, Warning))]
    d = _driver(command_filter=Stub(error=RuntimeError('pcre:x lookup error for "NOOP"')))
    assert d.feed(b"NOOP\r\n") == "250 2.0.0 Ok\r\n"
    assert [e.text for e in d.events if isinstance(e, Warning)] == [
        'pcre:x lookup error for "NOOP"']


def test_command_filter_empty_result_is_an_empty_line():
    d = _driver(command_filter=Stub({"NOOP": ""}))
    assert d.feed(b"NOOP\r\n") == "500 5.5.2 Error: bad syntax\r\n"


def test_command_filter_not_asked_in_auth_or_data():
    hook = Stub()
    d = _driver(command_filter=hook)
    d.feed(b"EHLO a.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    d.feed(b"DATA\r\n")
    d.feed(b"NOOP in data\r\n.\r\n")
    assert "NOOP in data" not in hook.keys and hook.keys[-1] == "DATA"


# ---- the engine stays free of tables --------------------------------------------------

def test_engine_imports_no_tables():
    code = (
        "import sys\n"
        "from postwell.smtp.server import ServerConfig, ServerConnection, NEED_DATA\n"
        "from postwell.smtp.reply import Reply\n"
        "c = ServerConnection(ServerConfig(reject_footer='f', footer_lookup=lambda k: None,\n"
        "                                  command_filter=lambda k: 'RSET'))\n"
        "c.send_greeting(Reply(220, 'x'))\n"
        "c.receive_data(b'FOO\\r\\nBAR\\r\\n')\n"
        "while c.next_event() is not NEED_DATA:\n"
        "    pass\n"
        "out = c.data_to_send()\n"
        "assert out == b'220 x\\r\\n' + b'250 2.0.0 Ok\\r\\n' * 2, out\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('postwell.tables', "
        "'postwell.smtpd', 'postwell.config', 'postwell.policy')))\n"
        "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr


def test_from_config_reads_no_table_specs():
    from postwell.config.main import Config
    cfg = Config("/nonexistent", {"smtpd_reject_footer_maps": "inline:{{a=b}}",
                                  "smtpd_command_filter": "inline:{{a=b}}"}, {}, [])
    sc = ServerConfig.from_config(cfg)
    assert sc.footer_lookup is None and sc.command_filter is None
    hook = Stub()
    assert ServerConfig.from_config(cfg, command_filter=hook).command_filter is hook


# ---- the smtpd's builder ------------------------------------------------------------

def _config(**params):
    from postwell.config.main import Config
    return Config("/nonexistent", params, {}, [])


def test_table_specs_keep_inline_tables_whole():
    from postwell.smtpd.server import table_specs
    assert table_specs("hash:/a, inline:{{a=b c}, {d=e}}  pcre:{{/x y/ z}},regexp:/r") == [
        "hash:/a", "inline:{{a=b c}, {d=e}}", "pcre:{{/x y/ z}}", "regexp:/r"]
    assert table_specs("") == [] and table_specs(None) == []


def test_table_lookups_only_configured_hooks():
    from postwell.smtpd.server import table_lookups
    assert table_lookups(_config()) == {}
    assert set(table_lookups(_config(smtpd_command_filter="pcre:{{/^x/ NOOP}}"))) == \
        {"command_filter"}


def test_table_lookups_footer_first_entry_decides(tmp_path):
    from postwell.smtpd.server import TableHookError, table_lookups
    first = tmp_path / "first"
    first.write_text("/^550 / \\c (first)\n/^501 /\n")
    hooks = table_lookups(_config(smtpd_reject_footer_maps=f"regexp:{first}, "
                                  "pcre:{{/^501 / second}, {/^452 / second}}"))
    look = hooks["footer_lookup"]
    assert look("550 5.1.1 <a@b>: no") == "\\c (first)"
    with pytest.raises(TableHookError) as exc:           # empty entry: the search stops
        look("501 Syntax: HELO hostname")
    assert str(exc.value).split("\n") == [
        "smtpd_reject_footer_maps lookup of 501 Syntax: HELO hostname returns an empty string "
        "result", "smtpd_reject_footer_maps should return NO RESULT in case of NOT FOUND"]
    assert look("452 4.5.3 Error: too many recipients") == "second"
    assert look("421 4.7.0 bye") is None


def test_table_lookups_failures_carry_the_warning_text(tmp_path):
    from postwell.smtpd.server import TableHookError, table_lookups
    missing = tmp_path / "missing"
    hooks = table_lookups(_config(smtpd_reject_footer_maps=f"regexp:{missing}",
                                  smtpd_command_filter=f"regexp:{missing}"))
    with pytest.raises(TableHookError) as exc:
        hooks["footer_lookup"]("500 5.5.2 x")
    assert str(exc.value).startswith(f"smtpd_reject_footer_maps: regexp:{missing}: lookup error: ")
    with pytest.raises(TableHookError) as exc:
        hooks["command_filter"]("NOOP " + "z" * 150)
    assert str(exc.value).startswith(f'regexp:{missing} lookup error for "NOOP {"z" * 95}": ')


def test_table_lookups_command_filter_through_the_engine(tmp_path):
    from postwell.smtpd.server import table_lookups
    table = tmp_path / "filter"
    table.write_text("/^NOOP x/ RSET\n/^VRFY bob/ VRFY carol\n")
    d = _driver(**table_lookups(_config(smtpd_command_filter=f"regexp:{table}")))
    d.feed(b"EHLO a.example\r\n")
    assert d.feed(b" NOOP x\r\n") == "250 2.0.0 Ok\r\n"
    assert [e.text for e in d.events if isinstance(e, Info)][-1] == \
        'unknown[127.0.0.1]: replacing command " NOOP x" with "RSET"'


def test_smtpd_server_passes_the_hooks(tmp_path):
    from postwell.config import load_config
    from postwell.log import NullLog
    from postwell.smtpd import SmtpdServer
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(
        f"queue_directory = {tmp_path / 'q'}\nmyhostname = mx.example.test\n"
        "smtpd_reject_footer_maps = pcre:{{/^5/ five}}\n"
        "smtpd_command_filter = pcre:{{/^x/ NOOP}}\n")

    class NoCleanup:
        pass
    srv = SmtpdServer(load_config(str(etc)), log=NullLog("smtpd"), cleanup=NoCleanup())
    sc = srv.server_config
    assert sc.footer_lookup("550 5.1.1 x") == "five" and sc.command_filter("xyz") == "NOOP"


# ---- DATA fast path: one scan for LF "." and bare LF ------------------------------------

def _data_session(chunks, **cfg):
    """Replies, content and DataEnd of one DATA transaction fed in ``chunks``."""
    from postwell.smtp.reply import Reply
    from postwell.smtp.server import NEED_DATA, DataChunk, DataEnd, ServerConnection
    c = ServerConnection(ServerConfig(hostname="mx", error_sleep_time=0, **cfg))
    c.send_greeting(Reply(220, "mx ESMTP"))
    c.receive_data(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    content, ends, out = [], [], []

    def pump():
        while True:
            ev = c.next_event()
            if ev is NEED_DATA or c.closed and not c._events:
                out.append(c.data_to_send())
                return
            if isinstance(ev, DataChunk):
                content.append(ev.data)
            elif isinstance(ev, DataEnd):
                ends.append((ev.size, ev.too_big, ev.bare_lf))
            if c._pending is not None:
                c.send_reply(None)
    pump()
    for ch in chunks:
        c.receive_data(ch)
        pump()
    return b"".join(out), b"".join(content), ends, c.counters_text()


@pytest.mark.parametrize("mode", ["normalize", "reject"])
@pytest.mark.parametrize("seed", range(3))
def test_data_fast_path_equals_line_by_line(mode, seed):
    import random
    rnd = random.Random(seed)
    pieces = [b"x" * 70 + b"\r\n", b"hello\r\n", b".dot\r\n", b"..two\r\n", b"\r\n", b"\n",
              b"bare\n", b"cr\rmid\r\n", b".\n", b"\n.\n", b"a.b\r\n", b" .\r\n", b"\r",
              b"." * 3 + b"\r\n", b"y" * 3000 + b"\r\n", b"\r\n.x\r\n"]
    for _ in range(40):
        body = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 25)))
        wire = body + b"\r\n.\r\nNOOP\r\nQUIT\r\n"
        whole = _data_session([wire], forbid_bare_newline=mode, line_length_limit=2048)
        cut = rnd.randint(1, len(wire) - 1)
        halves = _data_session([wire[:cut], wire[cut:]], forbid_bare_newline=mode,
                               line_length_limit=2048)
        per_byte = _data_session([wire[i:i + 1] for i in range(len(wire))],
                                 forbid_bare_newline=mode, line_length_limit=2048)
        assert whole == halves == per_byte, (body, cut)


def test_data_fast_path_terminator_and_pipelined_tail():
    out, content, ends, counters = _data_session(
        [b"Subject: a\r\n\r\nline\r\n.\r\nNOOP\r\nQUIT\r\n"])
    assert content == b"Subject: a\r\n\r\nline\r\n" and ends == [(len(content), False, False)]
    assert out.endswith(b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n")
    # A "." after a bare LF ends nothing (RFC 5321 4.1.1.4); the real end comes later.
    out, content, ends, _ = _data_session([b"a\n.\r\nb\r\n.\r\nQUIT\r\n"])
    assert content == b"a\r\nb\r\n" and len(ends) == 1
    # Dot-stuffed lines between plain ones: unstuffed, nothing ends early.
    _, content, ends, _ = _data_session([b"a\r\n..b\r\n.c\r\nd\r\n.\r\nQUIT\r\n"])
    assert content == b"a\r\n.b\r\nc\r\nd\r\n" and len(ends) == 1


def test_smtpd_footer_and_filter_over_loopback(tmp_path):
    # The whole path: main.cf -> SmtpdServer's hooks -> engine -> wire and maillog.
    import socket
    from test_smtpd import Running
    footer = tmp_path / "footer"
    footer.write_text("/^500 / \\c (see the FAQ)\n")
    r = Running(tmp_path, {"smtpd_reject_footer_maps": f"regexp:{footer}, "
                                                       f"regexp:{tmp_path / 'missing'}",
                           "smtpd_reject_footer": "plain",
                           "smtpd_command_filter": "pcre:{{/^NOOP x/ RSET}}"})
    try:
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220 ")
            s.sendall(b"FOO\r\n")
            assert f.readline() == b"500 5.5.2 Error: command not recognized (see the FAQ)\r\n"
            s.sendall(b"HELO\r\n")     # no entry in the first map, the second fails
            assert [f.readline(), f.readline()] == [b"501-Syntax: HELO hostname\r\n",
                                                    b"501 plain\r\n"]
            s.sendall(b"NOOP x\r\nQUIT\r\n")
            assert f.readline() == b"250 2.0.0 Ok\r\n" and f.readline().startswith(b"221 ")
        r.wait_log(r"disconnect from .* rset=1 quit=1")
        lines = r.lines()
        missing = tmp_path / "missing"
        assert (f"warning: smtpd_reject_footer_maps: regexp:{missing}: lookup error: "
                f"open {missing}: No such file or directory") in lines
        assert any(line.endswith('replacing command "NOOP x" with "RSET"') for line in lines)
    finally:
        r.stop()


# ---- side by side with the reference Postfix ----------------------------------------------
# Edges of both parameters that test_dialogue_sweep9.py does not reach: an empty footer
# entry (Postfix's maps_find() warns twice and keeps smtpd_reject_footer), the footer of
# the 421 after smtpd_hard_error_limit, filter results that are lower case, padded, empty,
# a syntax error, or made from the pattern's match.

_PARITY_MAIN_CF = {
    "smtpd_error_sleep_time": "0", "notify_classes": "", "smtpd_soft_error_limit": "100",
    "smtpd_hard_error_limit": "6",
    "smtpd_reject_footer": "plain $client_address",
    "smtpd_reject_footer_maps":
        "pcre:{{/^500 / }, {/^421 / \\c hard ($server_name)}}, "
        "pcre:{{/^500 / second}, {/^501 / two\\nlines}, {/^550/ fivefifty}}",
    "smtpd_command_filter":
        "pcre:{{/^noop a/ rset}, {/^NOOP b/   NOOP   spaced}, "
        "{/^NOOP c/ MAIL FROM:<bad address>}, {/^NOOP d/ }, {/^xx (.*)/ NOOP $1}}"}
_EHLO = "EHLO client.example.org"
_PARITY = {
    "footer_edges": [_EHLO, "FOO", "HELO", "MAIL FROM:<a b>", "MAIL FROM:<s@example.org>",
                     "RCPT TO:<nobody@virtual.test>", "BAR", "BAZ", "QUX", "QUUX", "X1", "X2"],
    "filter_edges": [_EHLO, "noop a", "NOOP b", "NOOP c", "NOOP d", "xx hello", "  xx tab",
                     "QUIT"],
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    import harness
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    with harness.variant_pairs(tmp_path_factory, "engine9", lambda v: _PARITY_MAIN_CF) as get:
        yield get


@pytest.mark.postfix
@pytest.mark.xdist_group("engine9-parity")
@pytest.mark.parametrize("name", list(_PARITY))
def test_hooks_match_reference(pairs, name):
    import harness
    from test_dialogue_sweep9 import _run
    from test_parity_sweep import _reply_texts, _table
    ref, pw = pairs("main")
    (want_r, want_log), (got_r, got_log) = harness.run_side_by_side(_run, ref, pw,
                                                                    _PARITY[name], 10)
    assert len(want_r) >= 1, "the reference did not answer"
    want_t, got_t = _reply_texts(want_r, False), _reply_texts(got_r, False)
    assert got_t == want_t, f"replies differ in {name!r}:\n{_table(want_t, got_t)}"
    assert got_log == want_log, f"smtpd log differs in {name!r}:\n{_table(want_log, got_log)}"
