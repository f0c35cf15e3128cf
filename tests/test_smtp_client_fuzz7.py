"""A differential fuzzer for the smtp(8) client: postwell against Postfix 3.7.

Each case is a *script* for a loopback SMTP peer (greeting, EHLO answer and
features, a reply per command, where to hang up, replies cut into packets, lines
ending in a bare LF, lines that are no reply, STARTTLS) and a *message* (a few
recipients, optional DSN parameters, SMTPUTF8, 8-bit text with or without MIME,
long lines).  The same message goes through a reference Postfix and through
postwell, each relaying to its own peer (relayhost = [127.0.0.1]:peerport; the
domain tls.test goes through an smtp service with smtp_tls_security_level = may)
that plays the same script, and the test compares:

* the bytes each peer received, queue ids, dates and SIZE= values normalised
  (SIZE= must be the sender's own logged size=);
* the log trail of the message and of the notices it caused (status=, dsn=,
  relay=, the "host ... said" texts) and smtp(8)'s lines about the server, with
  delays, ids and ports normalised;
* the notices themselves (human text and delivery-status fields).

Only the first delivery attempt counts: the backoff is an hour.  CASES holds
what the fuzzer's differences were minimised to (each fixed in delivery/smtp.py);
ELSEWHERE_CASES are differences of other parts, kept as strict xfails naming
their cause, and left out of the fuzz comparison (``differences(lenient=True)``).
The bounded fuzz run uses a fixed seed; tools to hunt with other seeds are
``_fuzz_cases(seed, n)``, ``run_case`` and ``differences``.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import random
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import harness
from test_issue3_local_e2e import SMTP_SERVICE
from test_parity_delivery5 import _QID, _diff, _entries, _norm_line, _send, _trail

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(harness.reference_available() is not None,
                       reason=str(harness.reference_available())),
]

SENDER = "alice@virtual.test"       # notices come back to a virtual mailbox
DOMAIN = "remote.test"
TLS_DOMAIN = "tls.test"             # routed through an smtp service with TLS "may"
AUTH_DOMAIN = "auth.test"           # routed through an smtp service with SASL on
TIMEOUT = 30
PEER_IO_TIMEOUT = 20.0              # a peer session never outlives this without traffic
FUZZ_SEED = 7042
FUZZ_CASES = 15


# ------------------------------------------------------------------ scripts

@dataclass(frozen=True)
class Script:
    """What the peer says.  Replies are lists of lines ("250-..." / "250 ...")."""
    greeting: tuple[str, ...] = ("220 peer.test ESMTP",)
    greeting_delay: float = 0.0
    # None: EHLO accepted with ``features``; else the refusal (then HELO is answered)
    ehlo_reject: tuple[str, ...] | None = None
    features: tuple[str, ...] = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN")
    helo: tuple[str, ...] = ("250 peer.test",)
    mail: tuple[str, ...] = ("250 2.1.0 Ok",)
    rcpt: tuple[tuple[str, ...], ...] = ()          # per RCPT, in order; default 250
    data: tuple[str, ...] = ("354 End data with <CR><LF>.<CR><LF>",)
    dot: tuple[str, ...] = ("250 2.0.0 Ok: queued as PEER1",)
    # hang up on receiving this command ("greeting" = before it; "body" = first
    # message line; "rcptN" = the N-th RCPT, 0-based)
    hangup: str | None = None
    split: bool = False           # replies go out a few bytes per packet
    # a line that is no SMTP reply goes out before the reply at this stage
    # ("ehlo", "mail", "rcpt0", "data", "dot")
    junk: str | None = None
    # reply to STARTTLS (offer it in ``features``); a 220 starts the TLS handshake
    starttls: tuple[str, ...] = ("220 2.0.0 Ready to start TLS",)
    # final reply to AUTH (offer it in ``features``); LOGIN gets its two challenges
    auth: tuple[str, ...] = ("235 2.7.0 Authentication successful",)
    bare_lf: bool = False         # reply lines end in LF, not CRLF

    def rcpt_reply(self, i: int) -> tuple[str, ...]:
        return self.rcpt[i] if i < len(self.rcpt) and self.rcpt[i] else ("250 2.1.5 Ok",)


@dataclass(frozen=True)
class Message:
    rcpts: tuple[str, ...] = ("u1",)             # local parts; "u1 NOTIFY=..." carries params
    mail_params: str = ""                         # RET=/ENVID= on the submission
    eight_bit: str = ""                           # "", "plain" (no MIME) or "mime"
    sender: str = SENDER                          # "" is the null sender
    domain: str = DOMAIN                          # TLS_DOMAIN: STARTTLS is used
    long_lines: tuple[int, ...] = ()              # lengths of extra long body lines


@dataclass
class Session:
    received: bytearray = field(default_factory=bytearray)
    done: threading.Event = field(default_factory=threading.Event)


class FuzzPeer:
    """A loopback SMTP server that plays ``self.script`` to every connection and
    keeps what each connection sent.  Sessions are threads, bounded in time."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.script = Script()
        self.sessions: list[Session] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self, script: Script) -> None:
        with self.lock:
            self.script = script
            self.sessions = []

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            session = Session()
            with self.lock:
                self.conns.append(conn)
                self.sessions.append(session)
                script = self.script
            threading.Thread(target=self._session, args=(conn, script, session),
                             daemon=True).start()

    def _send(self, conn, script: Script, lines, stage: str = "") -> None:
        end = b"\n" if script.bare_lf else b"\r\n"
        if stage and stage == script.junk:
            lines = ["this is no SMTP reply", *lines]
        data = b"".join(ln.encode() + end for ln in lines)
        if not script.split:
            conn.sendall(data)
            return
        # A few bytes per packet, with pauses the client must wait through.
        for pos in range(0, len(data), 7):
            conn.sendall(data[pos:pos + 7])
            time.sleep(0.005)

    @staticmethod
    def _hang_up(conn, session: Session, buf: bytearray) -> None:
        # Half-close and read what the client still sends until it closes: a close
        # with unread data would be a reset, which races with the client's reads.
        # What comes now counts too (RSET, QUIT after the peer gave up).
        if isinstance(conn, ssl.SSLSocket):
            # In TLS: close_notify both ways; what follows is not recorded.
            with contextlib.suppress(OSError, ValueError):
                conn.settimeout(5)
                raw = conn.unwrap()
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(65536):
                    pass
            return
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + PEER_IO_TIMEOUT
            while time.monotonic() < deadline:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                session.received += chunk

    def _session(self, conn: socket.socket, s: Script, session: Session) -> None:
        conn.settimeout(PEER_IO_TIMEOUT)
        buf = bytearray()

        def line() -> bytes | None:
            while b"\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                session.received += chunk
                buf.extend(chunk)
            i = buf.index(b"\n")
            out = bytes(buf[:i + 1])
            del buf[:i + 1]
            return out
        try:
            if s.hangup == "greeting":
                return self._hang_up(conn, session, buf)
            if s.greeting_delay:
                time.sleep(s.greeting_delay)
            self._send(conn, s, s.greeting)
            if not s.greeting[-1].startswith("220"):
                # RFC 5321 3.1: after a refusing greeting, wait for QUIT
                got = line()
                if got is not None:
                    self._send(conn, s, ["221 2.0.0 Bye"] if got.upper().startswith(b"QUIT")
                               else ["503 5.5.1 Error: no service"])
                    if not got.upper().startswith(b"QUIT"):
                        line()
                return self._hang_up(conn, session, buf)
            in_data, nrcpt, accepted = False, 0, 0
            while True:
                got = line()
                if got is None:
                    return
                if in_data:
                    if s.hangup == "body":
                        return self._hang_up(conn, session, buf)
                    if got.rstrip(b"\r\n") == b".":
                        in_data = False
                        if s.hangup == "dot":
                            return self._hang_up(conn, session, buf)
                        self._send(conn, s, s.dot, "dot")
                    continue
                cmd = got.decode("latin-1").strip()
                verb = cmd.split(" ", 1)[0].split(":", 1)[0].upper()
                if verb == "EHLO":
                    if s.hangup == "ehlo":
                        return self._hang_up(conn, session, buf)
                    if s.ehlo_reject is not None:
                        self._send(conn, s, s.ehlo_reject)
                    else:
                        kw = ["peer.test", *s.features]
                        self._send(conn, s, [f"250{'-' if i < len(kw) - 1 else ' '}{k}"
                                             for i, k in enumerate(kw)], "ehlo")
                elif verb == "HELO":
                    if s.hangup == "helo":
                        return self._hang_up(conn, session, buf)
                    self._send(conn, s, s.helo)
                elif verb == "MAIL":
                    if s.hangup == "mail":
                        return self._hang_up(conn, session, buf)
                    self._send(conn, s, s.mail, "mail")
                    if s.mail[-1].startswith("421"):
                        return self._hang_up(conn, session, buf)
                elif verb == "RCPT":
                    if s.hangup == f"rcpt{nrcpt}":
                        return self._hang_up(conn, session, buf)
                    reply = s.rcpt_reply(nrcpt)
                    nrcpt += 1
                    accepted += reply[-1].startswith("2")
                    self._send(conn, s, reply, f"rcpt{nrcpt - 1}")
                    if reply[-1].startswith("421"):
                        return self._hang_up(conn, session, buf)
                elif verb == "DATA":
                    if s.hangup == "data":
                        return self._hang_up(conn, session, buf)
                    self._send(conn, s, s.data, "data")
                    in_data = s.data[-1].startswith("354")
                    if s.data[-1].startswith("421"):
                        return self._hang_up(conn, session, buf)
                elif verb == "STARTTLS" and "STARTTLS" in s.features and self.tls:
                    self._send(conn, s, s.starttls)
                    if s.starttls[-1].startswith("220"):
                        # RFC 3207 4.2: the handshake, then a fresh start in TLS
                        conn = self.tls.wrap_socket(conn, server_side=True)
                        session.received += b"<TLS>\r\n"
                        buf.clear()
                elif verb == "AUTH":
                    challenges = []
                    if cmd.split()[1:2] == ["LOGIN"] and len(cmd.split()) == 2:
                        challenges = ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"]
                    elif cmd.split()[1:2] == ["CRAM-MD5"]:
                        # RFC 2195 2: a fixed challenge, so the answer is the same twice
                        challenges = ["334 PDE4OTYuNjk3MTcwOTUyQHBlZXIudGVzdD4="]
                    if challenges:
                        for challenge in challenges:
                            self._send(conn, s, [challenge])
                            if line() is None:
                                return None
                    self._send(conn, s, s.auth, "auth")
                elif verb == "RSET":
                    self._send(conn, s, ["250 2.0.0 Ok"])
                elif verb == "QUIT":
                    self._send(conn, s, ["221 2.0.0 Bye"])
                    if isinstance(conn, ssl.SSLSocket):
                        # Wait for the client to go; what TLS says on the way out
                        # (close_notify or not) is no SMTP.
                        with contextlib.suppress(OSError, ValueError):
                            conn.settimeout(5)
                            while conn.recv(65536):
                                pass
                        return None
                    return self._hang_up(conn, session, buf)
                else:
                    self._send(conn, s, ["502 5.5.2 Error: command not recognized"])
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            session.done.set()

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()


# ------------------------------------------------------------------ generator

def _enh(rng, code: int, detail: str) -> str:
    roll = rng.random()
    if roll < 0.06:
        return f"{7 - code // 100 if code >= 400 else 4}.{detail}"   # class mismatch
    return f"{code // 100}.{detail}" if roll < 0.7 else ""


def _reply(rng, code: int, detail: str, text: str, multi: bool | None = None) -> tuple[str, ...]:
    """A reply of ``code``: with or without an enhanced code, one or more lines."""
    enh = _enh(rng, code, detail)
    lead = f"{enh} " if enh else ""
    if multi is None:
        multi = rng.random() < 0.25
    if not multi:
        return (f"{code} {lead}{text}",)
    n = rng.randint(2, 3)
    return tuple(f"{code}{'-' if i < n - 1 else ' '}{lead}{text} ({i + 1}/{n})" for i in range(n))


_FEATURES = ("PIPELINING", "SIZE 10240000", "8BITMIME", "DSN", "SMTPUTF8", "STARTTLS",
             "AUTH PLAIN LOGIN", "CHUNKING", "ENHANCEDSTATUSCODES")
# Other spellings servers use for the same keywords.
_SPELLINGS = {"PIPELINING": "pipelining", "SIZE 10240000": "SIZE", "8BITMIME": "8bitmime",
              "AUTH PLAIN LOGIN": "AUTH=LOGIN PLAIN", "DSN": "dsn"}


def generate(rng: random.Random) -> tuple[Script, Message]:
    n = rng.randint(1, 3)
    stage = rng.choice(["ok", "ok", "ok", "greeting", "ehlo", "mail", "rcpt", "data", "dot",
                        "hangup", "odd"])
    kw: dict = {}
    features = tuple(f for f in _FEATURES if rng.random() < 0.6)
    if rng.random() < 0.15:
        features = tuple(_SPELLINGS.get(f, f) for f in features)
    if rng.random() < 0.05:
        features = tuple("SIZE abc" if f.startswith("SIZE") else f for f in features)
    if rng.random() < 0.1:
        features = tuple(f if not f.startswith("SIZE") else "SIZE 300" for f in features)
    kw["features"] = features
    if rng.random() < 0.25:
        kw["greeting"] = ("220-peer.test ESMTP welcome", "220-second line", "220 peer.test")
    if rng.random() < 0.15:
        kw["greeting_delay"] = 0.4
    if rng.random() < 0.1:
        kw["ehlo_reject"] = _reply(rng, rng.choice([500, 502, 550]), "5.2",
                                   "Error: command not recognized")
    kw["split"] = rng.random() < 0.2
    kw["bare_lf"] = rng.random() < 0.15
    if rng.random() < 0.1:
        kw["junk"] = rng.choice(["ehlo", "mail", "rcpt0", "data", "dot"])
    if stage == "greeting":
        code = rng.choice([421, 450, 554, 521])
        kw["greeting"] = _reply(rng, code, "3.2", "peer.test Service not available")
    elif stage == "ehlo":
        kw["ehlo_reject"] = _reply(rng, rng.choice([421, 451, 554]), "7.0", "go away")
        if not kw["ehlo_reject"][-1].startswith("421"):
            kw["helo"] = _reply(rng, rng.choice([250, 451, 554]), "7.0", "helo answer")
            if kw["helo"][-1].startswith("250"):
                kw["helo"] = ("250 peer.test",)
    elif stage == "mail":
        kw["mail"] = _reply(rng, rng.choice([421, 451, 452, 550, 553]), "1.8",
                            "<alice@virtual.test>: Sender address rejected")
    elif stage == "rcpt":
        rc = []
        for i in range(n):
            if rng.random() < 0.6:
                code = rng.choice([450, 451, 452, 550, 551, 553, 421])
                rc.append(_reply(rng, code, "1.1", f"<u{i + 1}@{DOMAIN}>: Recipient address "
                                 "rejected"))
            elif rng.random() < 0.2:
                rc.append(rng.choice([("251 2.1.5 will forward",), ("252 2.1.5 cannot verify",),
                                      ("250",), ("250-2.1.5 first", "251 2.1.5 second")]))
            else:
                rc.append(())
        kw["rcpt"] = tuple(rc)
    elif stage == "data":
        kw["data"] = _reply(rng, rng.choice([421, 451, 554, 503]), "5.1", "Error: no thanks")
    elif stage == "dot":
        kw["dot"] = _reply(rng, rng.choice([421, 451, 452, 552, 554]), "3.4",
                           "Message rejected")
    elif stage == "odd":
        # replies of an unexpected class, over-long ones, odd characters
        where = rng.choice(["mail", "rcpt", "data", "dot"])
        reply = rng.choice([("354 go ahead",), ("250 2.0.0 fine",), ("334 what",),
                            ("355 go ahead",), ("550 5.7.1 " + "long text " * 300,),
                            tuple(f"550-5.7.1 line {i} " + "x" * 70 for i in range(40))
                            + ("550 5.7.1 last",),
                            ("550 5.7.1 tab\there \x01ctl caf\u00e9",), ("550",),
                            ("450 4.7.1 trailing blanks   ",)])
        if where == "rcpt":
            kw["rcpt"] = (reply,)
        elif where == "data" and reply[0].startswith(("250", "354")):
            kw["data"] = ("550 5.5.1 no",) if reply[0].startswith("354") else reply
        else:
            kw[where] = reply
    elif stage == "hangup":
        kw["hangup"] = rng.choice(["greeting", "ehlo", "mail", "rcpt0", f"rcpt{n - 1}", "data",
                                   "body", "dot"])
        if kw["hangup"] == "ehlo" and kw.get("ehlo_reject"):
            kw["hangup"] = "helo"
    if rng.random() < 0.2 and stage not in ("dot",):
        kw["dot"] = rng.choice([_reply(rng, 250, "0.0", "Ok: queued as PEER2", multi=True),
                                ("250",), ("250-first", "251 second")])
    rcpts = []
    for i in range(n):
        params = []
        if rng.random() < 0.3:
            params.append("NOTIFY=" + rng.choice(["SUCCESS", "FAILURE", "SUCCESS,FAILURE",
                                                  "NEVER", "DELAY,FAILURE"]))
        if rng.random() < 0.25:
            params.append(f"ORCPT=rfc822;orig{i + 1}@{DOMAIN}")
        rcpts.append(" ".join([f"u{i + 1}", *params]))
    mparams = []
    if rng.random() < 0.3:
        mparams.append("RET=" + rng.choice(["FULL", "HDRS"]))
    if rng.random() < 0.3:
        mparams.append("ENVID=env7-" + str(rng.randint(1, 999)))
    eight = rng.choice(["", "", "plain", "mime", "multipart", "nested"])
    if eight:
        mparams.append("BODY=8BITMIME")
    if rng.random() < 0.1:
        mparams.append("SMTPUTF8")
        if rng.random() < 0.5:
            rcpts[0] = "\u00fc" + rcpts[0]          # a UTF-8 local part
    sender = "" if rng.random() < 0.08 else SENDER
    domain = DOMAIN
    if rng.random() < 0.15 and not kw.get("hangup"):
        domain = TLS_DOMAIN
        if "STARTTLS" not in kw["features"]:
            kw["features"] = (*kw["features"], "STARTTLS")
        kw["starttls"] = rng.choice([("220 2.0.0 Ready to start TLS",)] * 3 +
                                    [("454 4.7.0 TLS not available due to local problem",),
                                     ("502 5.5.2 Error: command not recognized",)])
    elif rng.random() < 0.12 and not kw.get("hangup"):
        domain = AUTH_DOMAIN
        kw["features"] = (*[f for f in kw["features"] if not f.startswith(("AUTH", "auth"))],
                          rng.choice(["AUTH PLAIN LOGIN", "AUTH LOGIN", "AUTH=LOGIN PLAIN",
                                      "AUTH CRAM-MD5 PLAIN"]))
        kw["auth"] = rng.choice([("235 2.7.0 Authentication successful",)] * 3 +
                                [("535 5.7.8 Error: authentication failed",),
                                 ("454 4.7.0 Temporary authentication failure",),
                                 ("535-5.7.8 bad", "535 5.7.8 credentials")])
    long_lines = () if rng.random() < 0.85 else rng.choice(
        [(1500, 2500, 1001), (997,), (998,), (999,), (998, 1996, 2049)])
    return Script(**kw), Message(tuple(rcpts), " ".join(mparams), eight, sender, domain,
                                 long_lines)


# ------------------------------------------------------------------ running one case

_PARAMS = {
    "mail_name": "Postfix",              # same Received header on both sides
    "smtp_connection_cache_on_demand": "no",
    "smtp_helo_timeout": "5s", "smtp_mail_timeout": "5s", "smtp_rcpt_timeout": "5s",
    "smtp_data_init_timeout": "5s", "smtp_data_done_timeout": "5s",
    "queue_run_delay": "1h", "minimal_backoff_time": "1h", "maximal_backoff_time": "2h",
}


_TLS_SERVICE = ("smtptls   unix  -       -       n       -       -       smtp\n"
                "  -o smtp_tls_security_level=may\n"
                "smtpauth  unix  -       -       n       -       -       smtp\n"
                "  -o smtp_sasl_auth_enable=yes -o smtp_sasl_security_options=noanonymous\n")


def _peer_tls() -> ssl.SSLContext | None:
    """A server context with a throw-away self-signed certificate (openssl CLI)."""
    if not shutil.which("openssl"):
        return None
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", f"{d}/k.pem", "-out", f"{d}/c.pem", "-days", "2",
                        "-subj", "/CN=peer.test"], check=True, capture_output=True, timeout=60)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(f"{d}/c.pem", f"{d}/k.pem")
    return ctx


class Pair:
    def __init__(self, base: Path) -> None:
        tls = _peer_tls()
        self.peers = {"postfix": FuzzPeer(tls), "postwell": FuzzPeer(tls)}
        ports = {k: p.port for k, p in self.peers.items()}

        def params(kind):
            return dict(_PARAMS, relayhost=f"[127.0.0.1]:{ports[kind]}",
                        transport_maps="texthash:$config_directory/transport",
                        smtp_sasl_password_maps="texthash:$config_directory/sasl_passwd")
        self.ref = harness.ReferencePostfix(base, params("postfix"), name="pf-fuzz7",
                                            master_cf_extra=_TLS_SERVICE)
        self.pw = harness.PostwellInstance(base, params("postwell"), name="pw-fuzz7")
        self.pw.master_cf = self.pw.default_master_cf() + SMTP_SERVICE + _TLS_SERVICE
        self.pw.write_config()
        for inst in (self.ref, self.pw):
            (inst.config_dir / "transport").write_text(
                f"{TLS_DOMAIN} smtptls:[127.0.0.1]:{ports[inst.kind]}\n"
                f"{AUTH_DOMAIN} smtpauth:[127.0.0.1]:{ports[inst.kind]}\n")
            (inst.config_dir / "sasl_passwd").write_text(
                f"[127.0.0.1]:{ports[inst.kind]} user7:secret7\n")
        harness.start_side_by_side(self.ref, self.pw)

    def stop(self) -> None:
        harness.stop_side_by_side([self.ref, self.pw])
        for p in self.peers.values():
            p.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = None
    try:
        p = Pair(tmp_path_factory.mktemp("smtp-fuzz7"))
        yield p
    finally:
        if p is not None:
            p.stop()


def _body(msg: Message, tag: str) -> list[str]:
    head = ["From: Alice <alice@virtual.test>", f"To: <u1@{DOMAIN}>",
            f"Subject: fuzz7 {tag}", f"Message-ID: <{tag}@client.test>",
            "Date: Mon, 30 Nov 2026 00:00:00 +0000"]
    if msg.eight_bit == "mime":
        head += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                 "Content-Transfer-Encoding: 8bit"]
    eight = ["caf\u00e9 na\u00efve \u00fcber", "x" * 90 + "\u00e9=" * 10, "trailing blank\u00e9 ",
             "..dot \u00e9"]
    if msg.eight_bit in ("multipart", "nested"):
        head += ["MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="b7"']
        body = ["preamble", "--b7", "Content-Type: text/plain; charset=utf-8",
                "Content-Transfer-Encoding: 8bit", "", *eight, "--b7"]
        if msg.eight_bit == "nested":
            body += ["Content-Type: message/rfc822", "Content-Transfer-Encoding: 8bit", "",
                     "Subject: inner", "Content-Type: text/plain",
                     "Content-Transfer-Encoding: 8bit", "", *eight, "--b7"]
        body += ["Content-Type: text/plain", "", "plain part", "--b7--", "epilogue"]
        return head + [""] + body
    text = ["hello", "..leading dot", ""]
    if msg.eight_bit:
        text += eight
    text += ["L" * n for n in msg.long_lines]
    return head + [""] + text + ["bye"]


_DATE = re.compile(r"\w{3}, [ \d]?\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4} \(\w+\)")


def _wire(inst, received: bytes, sizes: set[str]) -> str:
    """A peer's received bytes, ready to compare: the queue id, the Received date and
    a SIZE= that equals the sender's logged size= normalised."""
    text = received.decode("utf-8", "surrogateescape")
    text = re.sub(r"\bid [0-9A-F]{10,12}\b", "id QID", text)
    text = _DATE.sub("DATE", text)
    text = re.sub(r"SIZE=(\d+)", lambda m: "SIZE=SIZE" if m.group(1) in sizes else m.group(0),
                  text)
    return text


def _notice(raw: bytes, inst) -> dict:
    """A notice's parts, normalised (queue ids, ports, the instance directory, and
    "message size N" when N is the size= the qmgr logged for the message)."""
    sizes = getattr(inst, "sizes", set())

    def sized(text: str) -> str:
        return re.sub(r"message size (\d+) exceeds", lambda m: "message size SIZE exceeds"
                      if m.group(1) in sizes else m.group(0), text)
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    parts = msg.get_payload()
    human = parts[0].get_payload(decode=True).decode("utf-8", "replace")
    human = sized(re.sub(r"\]:\d+", "]:PORT", _QID.sub("QID", human)))
    status = parts[1].get_payload()
    if isinstance(status, list):
        fields = [{k: sized(re.sub(r"\s+", " ", str(v))) for k, v in block.items()
                   if k not in ("Arrival-Date", "X-Postfix-Queue-ID")} for block in status]
    else:       # message/global-delivery-status: not parsed into blocks by the library
        fields = [re.sub(r"(?m)^(Arrival-Date|X-Postfix-Queue-ID):.*\n?", "",
                         status if isinstance(status, str) else "")]
    head = {k: str(msg[k]) for k in ("Subject", "From", "To", "Auto-Submitted")}
    return {"head": head, "types": [p.get_content_type() for p in parts],
            "human": human.replace(str(inst.root), "INSTANCE"), "status": fields}


def _notices(inst, seen: set) -> list[Path]:
    return [f for f in inst.maildir_messages("alice") if f not in seen]


def _one_side(inst, peer: FuzzPeer, script: Script, msg: Message, tag: str):
    peer.reset(script)
    seen = set(inst.maildir_messages("alice"))
    sender = msg.sender + (" " + msg.mail_params if msg.mail_params else "")
    rcpts = [r.replace(" ", f"@{msg.domain} ", 1) if " " in r else f"{r}@{msg.domain}"
             for r in msg.rcpts]
    before, qid = _send(inst, sender, rcpts, _body(msg, tag))
    trail = _trail(inst, before, qid)
    # smtp(8)'s lines without a queue id (about the server, not the message)
    trail += [f"{prog}: {_norm_line(text, inst)}" for prog, text in _entries(inst, before)
              if prog == "smtp" and not _QID.search(text)]
    notices = sorted(_notices(inst, seen), key=lambda f: f.stat().st_mtime_ns)
    # The message has settled, but a peer thread may still be reading the
    # client's last bytes (QUIT): wait for every session to end.
    sessions = list(peer.sessions)
    harness.wait_for(lambda: all(s.done.is_set() for s in sessions), PEER_IO_TIMEOUT + 5, 0.02,
                     f"{inst.kind}'s peer sessions to end")
    wire = [_wire(inst, bytes(s.received), inst.sizes) for s in sessions]
    return trail, wire, notices


def run_case(pair: Pair, script: Script, msg: Message, tag: str) -> dict:
    def side(inst):
        return _one_side(inst, pair.peers[inst.kind], script, msg, tag)
    # _send waits until the message and every notice it caused have settled.
    ref, pw = harness.run_side_by_side(side, pair.ref, pair.pw)
    out = {}
    for kind, (trail, wire, notices), inst in (("postfix", ref, pair.ref),
                                               ("postwell", pw, pair.pw)):
        out[kind] = {"trail": trail, "wire": wire,
                     "notices": [_notice(f.read_bytes(), inst) for f in notices]}
    return out


# Differences that belong to other parts of postwell (not the smtp client), left
# out of the fuzz comparison; the regression cases below keep each one visible as
# a strict xfail naming its cause.
ELSEWHERE = {
}


def _lenient(side: dict) -> dict:
    wire = [re.sub(r"with UTF8SMTP(S?A?)\b", r"with ESMTP\1", w) for w in side["wire"]]
    notices = []
    for n in side["notices"]:
        n = dict(n)
        glob = any("global" in t for t in n["types"])
        n["types"] = [{"message/global-delivery-status": "message/delivery-status",
                       "message/global": "message/rfc822",
                       "message/global-headers": "text/rfc822-headers"}.get(t, t)
                      for t in n["types"]]
        if glob:
            n["status"] = None
        if n["head"]["Subject"] == "Successful Mail Delivery Report":
            n["types"] = n["types"][:2]
        head, sep, paras = n["human"].partition("The mail system\n\n")
        n["human"] = head + sep + "\n\n".join(sorted(paras.strip("\n").split("\n\n")))
        if not n["human"].isascii():
            n["human"] = re.sub(r"\s+", " ", n["human"])
        if n["status"]:
            n["status"] = n["status"][:1] + sorted(n["status"][1:], key=repr)
            if "Protocol error: " in n["human"]:
                n["status"] = [{k: v for k, v in b.items() if k != "Remote-MTA"}
                               for b in n["status"]]
        notices.append(n)
    # A log record over ~2000 bytes is cut at a length that counts the pid and delay
    # digits (different from run to run, in both MTAs): compare the head only.
    trail = [t[:1800] for t in side["trail"] if not t.startswith(
        "bounce: Q: not sending trace/success notification for single-bounce")]
    return {"trail": trail, "wire": wire, "notices": notices}


def _notice_kind(n: dict) -> tuple:
    return (str(n["head"].get("Subject") or ""), repr(n.get("types")))


def differences(got: dict, lenient: bool = False) -> list[str]:
    want, have = got["postfix"], got["postwell"]
    if lenient:
        want, have = _lenient(want), _lenient(have)
        if any(n["status"] is None for n in want["notices"] + have["notices"]):
            for n in want["notices"] + have["notices"]:
                n["status"] = None
    out = []
    if have["trail"] != want["trail"]:
        out.append("log trail:\n" + _diff(want["trail"], have["trail"]))
    if have["wire"] != want["wire"]:
        out.append("peer received:\n" + _diff(
            [ln for s in want["wire"] for ln in s.splitlines() + ["--- session end"]],
            [ln for s in have["wire"] for ln in s.splitlines() + ["--- session end"]]))
    if len(have["notices"]) != len(want["notices"]):
        out.append(f"notices: postfix {len(want['notices'])}, postwell {len(have['notices'])}")
    else:
        # Paired by kind, not by arrival: a message's failure and success notices are two
        # queue files that either MTA may deliver in either order.
        for a, b in zip(sorted(want["notices"], key=_notice_kind),
                        sorted(have["notices"], key=_notice_kind)):
            if a != b:
                out.append(f"notice differs:\n{a}\n--- postwell:\n{b}")
    return out


# ------------------------------------------------------------------ tests

def _fuzz_cases(seed: int, count: int):
    rng = random.Random(seed)
    return [generate(rng) for _ in range(count)]


def test_fuzz_smtp_client_against_postfix(pair):
    """A bounded run of generated scripts (fixed seed): every difference is listed."""
    deadline = time.monotonic() + 55
    problems = []
    for i, (script, msg) in enumerate(_fuzz_cases(FUZZ_SEED, FUZZ_CASES)):
        if time.monotonic() > deadline:
            break
        got = run_case(pair, script, msg, f"fz{i}")
        for d in differences(got, lenient=True):
            problems.append(f"case {i}: {script} {msg}\n{d}")
    assert not problems, "\n\n".join(problems)


# ------------------------------------------------------------------ minimised cases
#
# What the fuzzer's differences were minimised to (each was a difference once,
# fixed in delivery/smtp.py), plus the shapes it must keep getting right.

_PIPE = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN")
_NOPIPE = ("8BITMIME", "ENHANCEDSTATUSCODES", "DSN")
CASES: dict[str, tuple[Script, Message]] = {
    # NOTIFY words in Postfix's order (dsn_notify_str)
    "notify_words_reordered": (Script(), Message(("u1 NOTIFY=DELAY,FAILURE",
                                                  "u2 NOTIFY=DELAY,SUCCESS"))),
    # no SIZE= when the content may be converted to 7 bits (no 8BITMIME)
    "size_left_out_before_downgrade": (Script(features=("SIZE 10240000", "DSN")), Message()),
    "size_sent_for_declared_7bit": (Script(features=("SIZE 10240000",)),
                                    Message(mail_params="BODY=7BIT")),
    # a server with SMTPUTF8 but not 8BITMIME is taken as 8BITMIME (logged)
    "smtputf8_implies_8bitmime": (Script(features=("SIZE 10240000", "SMTPUTF8")),
                                  Message(mail_params="BODY=8BITMIME", eight_bit="mime")),
    # quoted-printable downgrade wrapped as Postfix wraps it
    "downgrade_line_wrapping": (Script(features=("PIPELINING",)),
                                Message(mail_params="BODY=8BITMIME", eight_bit="mime")),
    "downgrade_multipart": (Script(features=("PIPELINING",)),
                            Message(mail_params="BODY=8BITMIME", eight_bit="multipart")),
    "downgrade_nested_message": (Script(features=("PIPELINING",)),
                                 Message(mail_params="BODY=8BITMIME", eight_bit="nested")),
    "long_lines_broken": (Script(), Message(long_lines=(1500, 2500, 1001))),
    "line_of_998": (Script(), Message(long_lines=(998,))),
    "line_of_999": (Script(), Message(long_lines=(999,))),
    "long_lines_downgraded": (Script(features=("PIPELINING",)),
                              Message(mail_params="BODY=8BITMIME", eight_bit="mime",
                                      long_lines=(1500, 2500, 1001))),
    # after MAIL was refused the pipelined DATA got 354: a lone ".", then QUIT, no RSET
    "mail_refused_then_354": (Script(features=_PIPE, mail=("452 4.3.1 Insufficient storage",)),
                              Message(("u1", "u2"))),
    "all_rcpts_refused_then_354": (Script(features=_PIPE, rcpt=(("550 5.1.1 no",), ("550 no",))),
                                   Message(("u1", "u2"))),
    # a refused DATA: RSET and (pipelining, no cache) QUIT in one write
    "data_refused_rset_quit": (Script(features=_PIPE, data=("554 5.5.1 no valid recipients",)),
                               Message()),
    # QUIT pipelined behind the "." (the peer hangs up after the "." and still gets it)
    "quit_behind_dot": (Script(features=_PIPE, hangup="dot"), Message()),
    "quit_after_dot_reply": (Script(features=_NOPIPE, hangup="dot"), Message()),
    # 421 is one more 4xx to Postfix: it says what the state calls for next
    "mail_421_rset": (Script(features=_NOPIPE, mail=("421 4.3.2 shutting down",)), Message()),
    "mail_421_pipelined": (Script(features=_PIPE, mail=("421 4.3.2 shutting down",)),
                           Message(("u1", "u2"))),
    "rcpt_421_first_of_three": (Script(features=_PIPE, rcpt=(("421 4.3.2 shutting down",),)),
                                Message(("u1", "u2", "u3"))),
    "rcpt_421_not_pipelined": (Script(features=_NOPIPE, rcpt=((), ("421 shutting down",))),
                               Message(("u1", "u2", "u3"))),
    "data_421_pipelined": (Script(features=_PIPE, data=("421 4.3.2 shutting down",)), Message()),
    "dot_421_quit": (Script(features=_NOPIPE, dot=("421 4.3.2 shutting down",)), Message()),
    # the message is too big for the server: no MAIL, and no QUIT either
    "size_limit_no_quit": (Script(features=("PIPELINING", "SIZE 300", "8BITMIME")), Message()),
    # SMTPUTF8 is checked first (at EHLO time, with a QUIT), the size after
    "smtputf8_before_size_limit": (Script(features=("SIZE 300", "8BITMIME")),
                                   Message(("\u00fcu1", "u2"), "SMTPUTF8")),
    # recipients go out sorted as Postfix's qmgr sorts them
    "rcpt_order_sorted": (Script(), Message(("u3", "u1", "U2"))),
    # SMTPUTF8 after the DSN parameters
    "smtputf8_after_dsn_params": (Script(features=("SMTPUTF8", "DSN", "8BITMIME")),
                                  Message(mail_params="RET=HDRS ENVID=e7 SMTPUTF8")),
    # a line that is no reply: part of the next reply's text without pipelining
    "junk_before_rcpt_reply": (Script(features=_NOPIPE, junk="rcpt0",
                                      rcpt=(("553 5.1.1 <u1@remote.test>: rejected",),)),
                               Message(("u1", "u2"))),
    "junk_before_dot_reply": (Script(features=_NOPIPE, junk="dot"), Message()),
    "junk_pipelined": (Script(features=_PIPE, junk="rcpt0"), Message(("u1", "u2"))),
    "junk_pipelined_before_dot_reply": (Script(features=_PIPE, junk="dot"), Message()),
    "junk_pipelined_before_refusal": (Script(features=_PIPE, junk="rcpt0",
                                             rcpt=(("550 5.1.1 unknown",),)),
                                      Message(("u1", "u2"))),
    "junk_before_ehlo_reply": (Script(junk="ehlo"), Message()),
    # the rest of the shapes the task lists
    "greeting_multiline_slow": (Script(greeting=("220-peer.test ESMTP", "220 ready"),
                                       greeting_delay=0.4), Message()),
    "greeting_554": (Script(greeting=("554-peer.test no", "554 5.3.2 go away")), Message()),
    "greeting_421": (Script(greeting=("421 4.3.2 peer.test busy",)), Message()),
    "ehlo_refused_helo": (Script(ehlo_reject=("502 5.5.2 Error: command not recognized",)),
                          Message(mail_params="RET=HDRS", eight_bit="plain")),
    "ehlo_421": (Script(ehlo_reject=("421 4.7.0 go away",)), Message()),
    "helo_refused": (Script(ehlo_reject=("500 what",), helo=("550 5.7.1 no HELO either",)),
                     Message()),
    "split_bare_lf_multiline": (Script(split=True, bare_lf=True,
                                       rcpt=(("250-2.1.5 first", "250 2.1.5 Ok"),),
                                       dot=("250-2.0.0 part one", "250 2.0.0 queued")),
                                Message(("u1", "u2"))),
    "enhanced_code_class_mismatch": (Script(rcpt=(("550 4.1.1 odd class",), ("450 5.2.2 full",)),
                                            dot=("250 4.0.0 queued",)),
                                     Message(("u1", "u2", "u3"))),
    "no_enhanced_codes": (Script(features=("PIPELINING",), rcpt=(("550 no such user",),),
                                 dot=("554 Transaction failed",)), Message(("u1", "u2"))),
    "dsn_params_passed_on": (Script(), Message(("u1 NOTIFY=SUCCESS ORCPT=rfc822;o1@remote.test",
                                                "u2 NOTIFY=NEVER"),
                                               mail_params="RET=HDRS ENVID=env+2B7")),
    # quoting (smtp_quote_rfc821_envelope) and xtext in ORCPT (RFC 3461 4)
    "quoted_and_xtext_addresses": (Script(), Message(("u+tag", "a=b", "d.",
                                                      "c NOTIFY=NEVER ORCPT=rfc822;o+2Bp@remote.test"),
                                                     sender='"al..ice"@virtual.test')),
    "dsn_relayed_without_dsn": (Script(features=("PIPELINING", "8BITMIME")),
                                Message(("u1 NOTIFY=SUCCESS",))),
    # replies of a class the command does not expect (Postfix: "Protocol error", 5.5.0)
    "mail_answered_354": (Script(mail=("354 go ahead",)), Message()),
    "greeting_250": (Script(greeting=("250 peer.test hello",)), Message()),
    "rcpt_answered_354": (Script(rcpt=(("354 go ahead",),)), Message(("u1", "u2"))),
    "data_answered_250": (Script(data=("250 2.0.0 fine",)), Message()),
    "data_answered_355": (Script(features=_NOPIPE, data=("355 go ahead",)), Message()),
    "dot_answered_354": (Script(dot=("354 more please",)), Message()),
    "rcpt_answered_bare_550": (Script(rcpt=(("550",),)), Message(("u1", "u2"))),
    # an EHLO SIZE that is no number: a warning, no limit
    "ehlo_size_not_a_number": (Script(features=("PIPELINING", "SIZE abc", "8BITMIME")),
                               Message()),
    "ehlo_keyword_equals": (Script(features=("PIPELINING", "SIZE=300", "8BITMIME=yes")),
                            Message()),
    # over-long replies: one line (cut at 2048) and many lines (cut after 2048)
    "reply_line_too_long": (Script(rcpt=(("550 5.7.1 " + "long text " * 300,),)),
                            Message(("u1", "u2"))),
    "reply_line_too_long_all_refused": (Script(rcpt=(("550 5.7.1 " + "long text " * 300,),)),
                                        Message()),
    "reply_too_many_lines": (Script(rcpt=(tuple(f"550-5.7.1 line {i} " + "x" * 70
                                                for i in range(40)) + ("550 5.7.1 last",),)),
                             Message(("u1", "u2"))),
    "reply_odd_characters": (Script(rcpt=(("550 5.7.1 tab\there \x01ctl caf\u00e9",),)),
                             Message(("u1", "u2"))),
    # STARTTLS with smtp_tls_security_level = may: TLS, or plain text after a refusal
    "starttls_may": (Script(features=(*_PIPE, "STARTTLS")), Message(("u1", "u2"),
                                                                    domain=TLS_DOMAIN)),
    "starttls_may_refused": (Script(features=(*_NOPIPE, "STARTTLS"),
                                    starttls=("454 4.7.0 TLS not available",)),
                             Message(domain=TLS_DOMAIN)),
    "starttls_may_then_rcpt_refused": (Script(features=(*_PIPE, "STARTTLS"),
                                              rcpt=(("550 5.1.1 unknown",),)),
                                       Message(("u1", "u2"), domain=TLS_DOMAIN)),
    "starttls_may_smtputf8_missing": (Script(features=(*_PIPE, "STARTTLS")),
                                      Message(("\u00fcu1", "u2"), "SMTPUTF8",
                                              domain=TLS_DOMAIN)),
    "starttls_may_mail_421": (Script(features=(*_PIPE, "STARTTLS"),
                                     mail=("421 4.3.2 shutting down",)),
                              Message(domain=TLS_DOMAIN)),
    # SASL (smtp_sasl_auth_enable = yes): the mechanism chosen, refusals
    "auth_plain": (Script(features=(*_PIPE, "AUTH PLAIN LOGIN")), Message(domain=AUTH_DOMAIN)),
    "auth_login_only": (Script(features=(*_PIPE, "AUTH LOGIN")), Message(domain=AUTH_DOMAIN)),
    "auth_refused": (Script(features=(*_PIPE, "AUTH PLAIN"),
                            auth=("535 5.7.8 Error: authentication failed",)),
                     Message(domain=AUTH_DOMAIN)),
    "auth_tempfail": (Script(features=(*_NOPIPE, "AUTH=LOGIN PLAIN"),
                             auth=("454 4.7.0 Temporary authentication failure",)),
                      Message(domain=AUTH_DOMAIN)),
    "auth_not_offered": (Script(), Message(domain=AUTH_DOMAIN)),
    "auth_cram_md5": (Script(features=(*_PIPE, "AUTH CRAM-MD5 PLAIN LOGIN")),
                      Message(domain=AUTH_DOMAIN)),
    "auth_multiline_refusal": (Script(features=(*_PIPE, "AUTH PLAIN"),
                                      auth=("535-5.7.8 bad", "535 5.7.8 credentials")),
                               Message(domain=AUTH_DOMAIN)),
    "hangup_in_body": (Script(hangup="body"), Message()),
    "hangup_at_ehlo": (Script(hangup="ehlo"), Message()),
    "hangup_at_greeting": (Script(hangup="greeting"), Message()),
}

# Cases that show a difference of another part (see ELSEWHERE), compared strictly.
ELSEWHERE_CASES: dict[str, tuple[Script, Message, str]] = {
    "utf8smtp_received": (Script(features=("SMTPUTF8", "8BITMIME")),
                          Message(mail_params="SMTPUTF8"), "smtpd_utf8smtp_received"),
    "global_notice": (Script(features=("8BITMIME",)), Message(("\u00fcu1",), "SMTPUTF8"),
                      "dsn_global_notice"),
    "success_ret_full": (Script(features=("8BITMIME",)),
                         Message(("u1 NOTIFY=SUCCESS",), "RET=FULL"), "dsn_success_ret_full"),
    "null_sender_success": (Script(), Message(("u1 NOTIFY=SUCCESS",), sender=""),
                            "dsn_null_sender_success"),
    "protocol_error_notice": (Script(data=("250 2.0.0 fine",)), Message(),
                              "dsn_protocol_error_remote_mta"),
    # 79 characters, 80 bytes up to "(in": Postfix breaks before "(in"
    "notice_wrap_utf8": (Script(data=("550 5.7.1 caf\u00e9 " + "x" * 10,)),
                         Message(), "dsn_wrap_counts_bytes"),
    "default_orcpt_quoted": (Script(), Message(('".e"', '"h(i)"', '"d."', "m.n", '"x..y"')),
                             "smtpd_default_orcpt"),
    "notice_recipient_order": (Script(rcpt=(("550 5.1.1 a",), ("550 5.1.1 b",))),
                               Message(("u3", "u1")), "qmgr_recipient_order"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_minimised_case_matches_postfix(pair, name):
    script, msg = CASES[name]
    got = run_case(pair, script, msg, name.replace("_", "-"))
    problems = differences(got, lenient=True)
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=ELSEWHERE[c[2]])
                 if c[2] in ELSEWHERE else ())   # a cause fixed: compared strictly
    for n, c in sorted(ELSEWHERE_CASES.items())])
def test_other_parts_differences_still_there(pair, name):
    script, msg, _cause = ELSEWHERE_CASES[name]
    got = run_case(pair, script, msg, name.replace("_", "-"))
    problems = differences(got)
    assert not problems, "\n\n".join(problems)
