"""local(8): delivery to the users of the local domains (mydestination).

For each recipient, in Postfix's order: alias_maps (recursively, lists,
``:include:``, ``|command``, ``/file``, owner-aliases), the user's
~/.forward (forward_path), the mailbox (mailbox_command, home_mailbox
Maildir or mbox, else $mail_spool_directory/USER), then luser_relay, else
``unknown user``.  Addresses that leave the local user set are re-injected
as one NEW queue file through cleanup ("forwarded as NEWID"); local ones are
delivered in the same run, keeping the original recipient.

Every user path is opened and every command run in a child process that
has become the responsible user first (local_exec.run_as).  An agent that
is not root either asks the root helper (local_helper) or, without one,
delivers only as its own uid and defers the rest with a clear reason.

The qmgr contract is one RecipientResult per request recipient.  Because
one recipient may expand into several deliveries (each of which Postfix
logs on its own line), the result also carries ``expanded``: the list of
per-destination RecipientResults (``recipient.address`` = final address,
``recipient.orig`` = the original one).  The aggregate status is
"deferred" if any part deferred, else "bounced" if any part bounced, else
"sent"; a qmgr that knows ``expanded`` should log and bounce-log those
instead of the aggregate.

DSN (RFC 3461 5.2.7, Postfix's alias.c/dotforward.c/forward.c): below an
alias, .forward or list NOTIFY loses SUCCESS, below a list ORCPT is dropped;
a forwarded copy's recipients carry what is left.  For a NOTIFY=SUCCESS
recipient the expanded alias or .forward is reported itself ("alias
expanded") by a part with ``logged = False`` and ``dsn_action`` set, and its
members' parts get ``dsn_action = None``; the qmgr records such a part for the
notices without a to=<...> log line (Postfix's trace_append, not sent()).
"""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass, replace

from .base import DeliveryAgent, DeliveryRequest, Recipient, RecipientResult, split_map_list
from .local_exec import (
    Identity, LocalCopy, NeedRoot, _identity_key, op_command, op_file, op_forward_lookup,
    op_forward_or_mailbox, op_mailbox, op_maildir_batch, op_read_file, run_as,
)
from .virtual import delivered_to_headers

try:
    from postwell.config.registry import register_implemented as _register
except ImportError:  # pragma: no cover
    def _register(*names):
        pass
_register("alias_maps", "forward_path", "home_mailbox", "mail_spool_directory", "mailbox_command",
          "mailbox_command_maps", "mailbox_size_limit", "mailbox_delivery_lock", "luser_relay",
          "allow_mail_to_commands", "allow_mail_to_files", "default_privs",
          "propagate_unmatched_extensions", "enable_original_recipient", "prepend_delivered_header",
          "owner_request_special", "expand_owner_alias", "command_time_limit", "local_command_shell",
          "export_environment", "command_expansion_filter", "forward_expansion_filter",
          "command_execution_directory", "strict_mailbox_ownership", "duplicate_filter_limit",
          "frozen_delivered_to", "recipient_delimiter")

RELAY = "local"
# Messages for one destination that wait for a delivery slot travel to the
# agent together (qmgr: DeliveryAgent.deliver_batch), at most this many and
# this much content per batch (bounded memory in the qmgr and the helper).
BATCH_LIMIT = 32
BATCH_BYTES = 1 << 20
# ... and recipients: the batch request is one line of at most
# helper.MAX_REQUEST for the helper (local_destination_recipient_limit > 1
# puts several in each message).
BATCH_RECIPIENTS = 500
# A batch's answer stays bounded (the qmgr reads it as one line of at most
# helper.MAX_REQUEST): once its messages made this many results (an alias
# makes one per member), the helper leaves the rest of the batch alone and
# the agent sends those messages again one by one.
BATCH_LEAVES = 1000
MAX_LEVEL = 100          # Postfix's nesting limit ("possible alias database loop")
MAX_NODES = 10000        # total expansion work per recipient: bounded CPU for any alias graph
DEFAULT_PATH = "/usr/bin:/bin"


@dataclass
class Leaf:
    """One final destination of a recipient's expansion."""
    address: str
    orig: str
    status: str = "sent"
    dsn: str = "2.0.0"
    reason: str = ""
    forward_sender: str | None = None     # not None: still to be re-injected with this sender
    delivered: str | None = None          # Delivered-To for the forwarded copy
    # What the expansion does to the recipient's DSN parameters (RFC 3461
    # 5.2.7): None at the top, "alias" below an alias or .forward (NOTIFY
    # without SUCCESS), "list" below a mailing list (no ORCPT either).  The
    # qmgr side applies it (dsn_for_leaves): the root helper, which expands,
    # is never told the recipient's NOTIFY or ORCPT.
    via: str | None = None
    # [action, address, orig]: Postfix's trace_append() of "alias expanded"
    # for the top-level alias or .forward that made this leaf (its last one),
    # action "expanded", or "delivered" for a list.  Reported (never logged)
    # when the recipient asked for NOTIFY=SUCCESS.  An expansion that left no
    # leaf carries it on a leaf of its own, with status TRACE.
    trace: list | None = None
    # Filled in by dsn_for_leaves(): what a forwarded copy carries.
    notify: str | None = None
    orcpt: str | None = None
    # A command's typed diagnostic (RFC 3464 2.3.6, "x-unix" and its output or
    # exit text, Postfix's dsb_unix()): the notice's Diagnostic-Code.
    diag_type: str | None = None
    diag_text: str | None = None

    def to_json(self) -> list:
        v = [self.address, self.orig, self.status, self.dsn, self.reason,
             self.forward_sender, self.delivered, self.via, self.trace,
             self.diag_type, self.diag_text]
        # The later fields only when set: the common leaf keeps its seven items.
        while len(v) > 7 and v[-1] is None:
            v.pop()
        return v

    @classmethod
    def from_json(cls, v) -> "Leaf":
        # 7 to 11 items: a helper of an older release sends fewer.
        leaf = cls(*[x if x is None else str(x) for x in v[:8]])
        if len(v) > 8 and v[8] is not None:
            if not isinstance(v[8], list) or len(v[8]) != 3:
                raise ValueError("bad trace")
            leaf.trace = [str(x) for x in v[8]]
        if len(v) > 9 and v[9] is not None:
            leaf.diag_type = str(v[9])
            leaf.diag_text = "" if len(v) < 11 or v[10] is None else str(v[10])
        return leaf


TRACE = "trace"     # Leaf.status of a leaf that only carries a trace


@dataclass
class Branch:
    """Postfix's msg_attr/usr_attr for one step of the expansion."""
    address: str
    orig: str
    delivered: str
    level: int = 0
    exp_type: str | None = None      # None (top), "alias", "forward", "include"
    exp_from: str | None = None      # alias/user being expanded (self-reference check)
    owner: str | None = None         # set: addresses go out in a new queue file, errors to owner
    ident: Identity | None = None    # rights for |command and /file (None: default_privs)
    unmatched: str | None = None     # extension to propagate (propagate_unmatched_extensions)
    sender: str = ""
    via: str | None = None           # Leaf.via for what is found below this step

    def child(self, **kw) -> "Branch":
        kw.setdefault("level", self.level + 1)
        return replace(self, **kw)


@dataclass
class PlainMaildir:
    """Expansion.plain_maildir()'s answer: one message's Maildir delivery,
    to be made together with others of the same ``key`` (user, home, forward
    files) by op_maildir_batch."""
    key: tuple
    ident: Identity
    home: str
    paths: list
    uid: int
    copy: LocalCopy
    content: object
    branch: Branch
    user: str


class DeferAll(Exception):
    """A temporary problem that stops this recipient's expansion (table trouble)."""

    def __init__(self, dsn, reason):
        super().__init__(reason)
        self.dsn, self.reason = dsn, reason


# ---------------------------------------------------------------- DSN

def _notify_items(notify: str | None) -> list[str]:
    return [x for x in dict.fromkeys(i.strip().upper() for i in (notify or "").split(",")) if x]


def wants_success(notify: str | None) -> bool:
    """NOTIFY asks for a success notice (RFC 3461 4.1; NEVER stands alone)."""
    items = _notify_items(notify)
    return "SUCCESS" in items and "NEVER" not in items


def strip_success(notify: str | None) -> str | None:
    """The NOTIFY an alias, .forward or list passes on: without SUCCESS, and
    NEVER when SUCCESS was all it asked for (RFC 3461 5.2.7: the alias itself
    is reported "expanded", as Postfix's local(8) does); no NOTIFY stays none
    (the default, FAILURE,DELAY)."""
    items = _notify_items(notify)
    if not items or "SUCCESS" not in items:
        return notify
    rest = [x for x in items if x != "SUCCESS"]
    return ",".join(rest) if rest else "NEVER"


def dsn_for_leaves(rc: Recipient, leaves: list[Leaf]) -> list[Leaf]:
    """Each leaf's NOTIFY and ORCPT from the queue recipient's (Postfix's
    alias.c, dotforward.c): kept at the top, SUCCESS taken off below an alias
    or .forward, ORCPT dropped below a list.  The "alias expanded" reports
    stay only for a recipient that asked for NOTIFY=SUCCESS."""
    success = wants_success(rc.notify)
    out = []
    for leaf in leaves:
        if not success and leaf.trace is not None:
            if leaf.status == TRACE:
                continue
            leaf.trace = None
        leaf.notify = (rc.notify if leaf.via is None else strip_success(rc.notify)) or None
        leaf.orcpt = None if leaf.via == "list" else (rc.orcpt or None)
        out.append(leaf)
    return out


# ---------------------------------------------------------------- parsing

def split_tokens(text: str) -> list[str]:
    """Split an alias value or .forward line into destinations (commas
    outside quotes, <> and comments); a fully quoted item loses its quotes."""
    out, cur, quote, depth, paren = [], [], False, 0, 0
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and i + 1 < len(text):
                cur.append(text[i:i + 2])
                i += 2
                continue
            if c == '"':
                quote = False
        elif paren:
            paren += {"(": 1, ")": -1}.get(c, 0)
            i += 1
            continue
        elif c == '"':
            quote = True
        elif c == "(" and not (cur and "".join(cur).lstrip().startswith(("|", "/"))):
            paren = 1
            i += 1
            continue
        elif c == "<":
            depth += 1
        elif c == ">" and depth:
            depth -= 1
        elif c == "," and not depth:
            out.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    out.append("".join(cur))
    tokens = []
    for t in out:
        t = t.strip()
        if not t:
            continue
        if len(t) >= 2 and t[0] == '"' and t[-1] == '"' and '"' not in _unescape(t[1:-1], keep=True):
            t = _unescape(t[1:-1])
        elif not t.startswith(("|", "/", ":include:")) and "<" in t and t.endswith(">"):
            t = t[t.rindex("<") + 1:-1].strip()
        tokens.append(t)
    return tokens


def _unescape(s: str, keep: bool = False) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append("" if keep else s[i + 1])
            i += 2
            continue
        out.append(s[i])
        i += 1
    return "".join(out)


_MACRO = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:([?:])(\{[^{}]*\}(?::\{[^{}]*\})?|[^}]*))?\}"
                    r"|([A-Za-z_][A-Za-z0-9_]*))")


def expand_template(template: str, attrs: dict[str, str | None], allowed: str):
    """local_expand(): $name, ${name}, ${name?value}, ${name:value},
    ${name?{a}:{b}}.  Returns (text, undefined_used, names_used); values are
    filtered (characters outside ``allowed`` become "_")."""
    undefined = False
    used: set[str] = set()

    def clean(v: str) -> str:
        return "".join(c if c in allowed else "_" for c in v)

    def sub(m):
        nonlocal undefined
        name = m.group(1) or m.group(4)
        value = attrs.get(name)
        defined = bool(value)
        op, arg = m.group(2), m.group(3)
        if op is None:
            if not defined:
                undefined = True
                return ""
            used.add(name)
            return clean(value)
        a, b = arg, ""
        if arg.startswith("{"):
            parts = re.fullmatch(r"\{([^{}]*)\}(?::\{([^{}]*)\})?", arg)
            if parts:
                a, b = parts.group(1), parts.group(2) or ""
        if op == "?":
            if defined:
                used.add(name)
            return a if defined else b
        return a if not defined else ""

    return _MACRO.sub(sub, template), undefined, used


# ---------------------------------------------------------------- settings

class Settings:
    def __init__(self, config):
        g = config.get
        self.config = config
        self.transport_default = "local"
        self.alias_specs = split_map_list(g("alias_maps"))
        self.forward_path = split_map_list(g("forward_path"))
        self.delimiter = g("recipient_delimiter") or ""
        self.propagate = {x.lower() for x in config.get_list("propagate_unmatched_extensions")}
        self.luser_relay = g("luser_relay")
        self.home_mailbox = g("home_mailbox")
        self.spool = g("mail_spool_directory")
        self.mailbox_command = g("mailbox_command")
        self.mailbox_command_maps = split_map_list(g("mailbox_command_maps"))
        self.size_limit = config.get_int("mailbox_size_limit")
        self.lock_methods = [m.lower() for m in config.get_list("mailbox_delivery_lock")]
        self.allow_commands = {x.lower() for x in config.get_list("allow_mail_to_commands")}
        self.allow_files = {x.lower() for x in config.get_list("allow_mail_to_files")}
        self.default_privs = g("default_privs")
        self.original_recipient = config.get_bool("enable_original_recipient")
        self.delivered_hdr = {x.lower() for x in config.get_list("prepend_delivered_header")}
        self.owner_special = config.get_bool("owner_request_special")
        self.expand_owner = config.get_bool("expand_owner_alias")
        self.time_limit = config.get_time("command_time_limit")
        self.shell = g("local_command_shell")
        self.export_env = config.get_list("export_environment")
        self.cmd_filter = g("command_expansion_filter")
        self.fwd_filter = g("forward_expansion_filter")
        self.exec_dir = g("command_execution_directory")
        self.exec_dir_filter = g("execution_directory_expansion_filter")
        self.strict_owner = config.get_bool("strict_mailbox_ownership")
        self.dup_limit = config.get_int("duplicate_filter_limit")
        self.myorigin = g("myorigin") or g("myhostname")
        self.myhostname = g("myhostname")
        self.mail_name = g("mail_name") or "postwell"
        self.queue_directory = g("queue_directory")
        self.hostname = socket.gethostname() or g("myhostname")
        message_limit = config.get_int("message_size_limit")
        if self.size_limit and message_limit and self.size_limit < message_limit:
            # Same start-up refusal as Postfix's local(8).
            raise ValueError("main.cf configuration error: mailbox_size_limit is smaller than "
                             "message_size_limit")


class AliasMaps:
    """alias_maps, each table with its owner uid (Postfix's dict_owner()).

    Tables come from tables.get_table(), which re-opens a table whose file
    changed, so a newaliases run is seen by the next delivery."""

    def __init__(self, specs, config, warn):
        self.config, self.warn = config, warn
        self.specs = []      # (spec, type, name)
        for spec in specs:
            typ, _, name = spec.partition(":")
            if typ in ("nis", "nisplus", "netinfo"):
                continue   # Debian's compiled-in default lists nis:mail.aliases; nothing serves it here
            if typ == "proxy":   # local(8) opens proxied alias tables directly
                spec = name
                typ, _, name = spec.partition(":")
            if typ in ("regexp", "pcre", "cidr"):
                # Pattern tables could hand out $1 substitutions as |commands:
                # local(8) refuses them (alias.c DICT_FLAG_FIXED).
                warn(f"invalid alias map type: {spec}")
                continue
            self.specs.append((spec, typ, name))

    @staticmethod
    def owner(typ: str, name: str) -> int:
        if typ in ("inline", "static", "unix"):
            return 0
        for path in (name + ".db", name + ".lmdb", name):
            try:
                return os.stat(path).st_uid
            except OSError:
                continue
        return 0

    def lookup(self, key: str):
        """(value, owner_uid) or None; DeferAll when a table cannot answer."""
        from postwell import tables
        for spec, typ, name in self.specs:
            try:
                v = tables.get_table(spec, self.config).lookup(key)
            except Exception as exc:
                self.warn(f"{spec}: {exc}")
                raise DeferAll("4.3.0", "alias database unavailable")
            if v is not None:
                return v, self.owner(typ, name)
        return None


# ---------------------------------------------------------------- agent

class LocalAgent(DeliveryAgent):
    """local(8).  ``LocalAgent(config, log=None, clock=time.time, *, store=None,
    resolver=None, helper_socket=None)``; ``store`` (a QueueStore) is where
    forwarded mail is re-injected (default: $queue_directory)."""

    name = "local"
    batch_limit = BATCH_LIMIT
    batch_bytes = BATCH_BYTES
    batch_recipients = BATCH_RECIPIENTS

    def __init__(self, config, log=None, clock=time.time, *, store=None, resolver=None,
                 helper_socket: str | None = None):
        super().__init__(config, log, clock)
        self.settings = Settings(config)
        self._store = store
        self._resolver = resolver
        self._aliases: AliasMaps | None = None
        self._cmd_maps = None
        self.helper_socket = helper_socket
        self._helper = None
        # The root helper expands on a thread per qmgr connection, all with
        # this one agent: what is made on first use is made once.
        self._making = threading.Lock()

    # -- shared pieces -------------------------------------------------
    def _warn(self, text: str) -> None:
        if self.log:
            self.log.warning(text)

    def close(self) -> None:
        if self._helper is not None:
            self._helper.close()
        self._helper = None

    @property
    def resolver(self):
        if self._resolver is None:
            from postwell.policy.resolve import AddressResolver
            with self._making:
                if self._resolver is None:
                    self._resolver = AddressResolver(self.config)
        return self._resolver

    @property
    def aliases(self) -> AliasMaps:
        if self._aliases is None:
            with self._making:
                if self._aliases is None:
                    # Once: its start-up warnings (invalid alias map type) are logged once.
                    self._aliases = AliasMaps(self.settings.alias_specs, self.config, self._warn)
        return self._aliases

    def command_maps(self):
        if self._cmd_maps is None and self.settings.mailbox_command_maps:
            from .base import MapList
            with self._making:
                if self._cmd_maps is None:
                    self._cmd_maps = MapList(self.settings.mailbox_command_maps, self.config)
        return self._cmd_maps

    @property
    def store(self):
        if self._store is None:
            from postwell.queue import QueueStore
            self._store = QueueStore(self.settings.queue_directory)
        return self._store

    @property
    def queue_device(self) -> int | None:
        """st_dev of the queue's file system (virtual.maildir_name_ordered), once."""
        dev = self.__dict__.get("_queue_dev", False)
        if dev is False:
            dev = _device_of(self.settings.queue_directory)
            self._queue_dev = dev
        return dev

    def default_identity(self) -> Identity:
        try:
            pw = pwd.getpwnam(self.settings.default_privs)
        except KeyError:
            raise DeferAll("4.3.0", "mail system configuration error")
        if pw.pw_uid == 0:
            raise DeferAll("4.3.0", "mail system configuration error")
        return Identity.from_pwd(pw)

    # -- the qmgr entry point ------------------------------------------
    async def deliver(self, request: DeliveryRequest) -> list[RecipientResult]:
        if request.attributes.get("postwell_verify"):
            # A probe (verify(8) or sendmail -bv): say where the mail would go.
            return await asyncio.get_running_loop().run_in_executor(None, self.probe, request)
        # An explicit helper_socket always uses the helper ("" never does); else
        # the master's setting is used when this process cannot switch users itself.
        socket_path = self.helper_socket
        if socket_path is None:
            from . import local_helper
            socket_path = local_helper.HELPER_SOCKET if os.geteuid() != 0 else None
        loop = asyncio.get_running_loop()
        if socket_path:
            per_rcpt = await self._expand_via_helper(request, socket_path)
        else:
            per_rcpt = await loop.run_in_executor(None, self.expand_request, request)
        per_rcpt = [dsn_for_leaves(rc, leaves) for rc, leaves in zip(request.recipients, per_rcpt)]
        await self._forward(request, per_rcpt)
        return [self._aggregate(rc, leaves) for rc, leaves in zip(request.recipients, per_rcpt)]

    async def deliver_batch(self, requests: list[DeliveryRequest]) -> list[list[RecipientResult]]:
        """deliver() for several messages (issue 8): one helper request, and
        the Maildir deliveries of one user share one identity switch, one
        .forward check and one new/ fsync (expand_batch).  Each message gets
        its own results, as deliver() would give them."""
        if len(requests) == 1 or any(r.attributes.get("postwell_verify") for r in requests):
            return [await self.deliver(r) for r in requests]
        socket_path = self.helper_socket
        if socket_path is None:
            from . import local_helper
            socket_path = local_helper.HELPER_SOCKET if os.geteuid() != 0 else None
        if socket_path:
            per_request = await self._expand_batch_via_helper(requests, socket_path)
        else:
            per_request = await asyncio.get_running_loop().run_in_executor(
                None, self.expand_batch, requests)
        out = []
        for request, per_rcpt in zip(requests, per_request):
            if per_rcpt is None:
                # Left alone by the batch (see BATCH_LEAVES): on its own now.
                out.append(await self.deliver(request))
                continue
            per_rcpt = [dsn_for_leaves(rc, leaves) for rc, leaves in zip(request.recipients, per_rcpt)]
            await self._forward(request, per_rcpt)
            out.append([self._aggregate(rc, leaves)
                        for rc, leaves in zip(request.recipients, per_rcpt)])
        return out

    def expand_batch(self, requests: list[DeliveryRequest], max_leaves: int | None = None) -> list:
        """Blocking: expand_request() for each request.  Single-recipient
        messages to a plain user's Maildir (no alias, no mailbox_command;
        Expansion.plain_maildir) are gathered per user and delivered by one
        op_maildir_batch call as that user, unless the user has a .forward
        file; everything else, and a group that meets a .forward, is expanded
        one message at a time as before.  A message that is not plain and
        comes when the batch already has ``max_leaves`` (BATCH_LEAVES)
        results is not touched: None in its place."""
        if max_leaves is None:
            max_leaves = BATCH_LEAVES
        out: list = [None] * len(requests)
        groups: dict[tuple, list] = {}
        others = []
        users: dict = {}       # getpwnam() answers, shared by the batch's expansions
        forward_paths: dict = {}
        for i, request in enumerate(requests):
            if len(request.recipients) == 1:
                rc = request.recipients[0]
                try:
                    exp = Expansion(self, request, delivered_to_headers(request.open_content))
                    exp._users, exp._forward_paths = users, forward_paths
                    plan = exp.plain_maildir(rc)
                except Exception as exc:     # one message's trouble is its own
                    out[i] = self._broken(request, exc)
                    continue
                if plan is not None:
                    groups.setdefault(plan.key, []).append((i, exp, plan))
                    continue
                if exp.deferred is not None:
                    exp.failed(Branch(address=rc.address, orig=rc.orig or rc.address,
                                      delivered=rc.address), exp.deferred)
                    out[i] = [exp.leaves]
                    continue
            others.append(i)
        leaves = sum(len(members) for members in groups.values())
        for i in others:
            if leaves >= max_leaves:
                break
            try:
                out[i] = self.expand_request(requests[i])
            except Exception as exc:
                out[i] = self._broken(requests[i], exc)
            leaves += sum(len(x) for x in out[i])
        for members in groups.values():
            first = members[0][2]
            res = members[0][1]._call(first.ident, op_maildir_batch, first.home, first.paths,
                                      first.uid, [p.copy for _, _, p in members],
                                      [p.content for _, _, p in members])
            answers = res.get("mailbox") if isinstance(res, dict) else None
            if not isinstance(answers, list) or len(answers) != len(members):
                # One at a time: a .forward, a home directory problem, or a
                # failed call is met (and reported) by the usual expansion.
                for i, exp, _ in members:
                    try:
                        out[i] = [exp.run(requests[i].recipients[0])]
                    except Exception as exc:
                        out[i] = self._broken(requests[i], exc)
                continue
            for (i, exp, plan), answer in zip(members, answers):
                out[i] = [exp.plain_result(plan, answer)]
        return out

    def _broken(self, request, exc) -> list[list[Leaf]]:
        """A message whose expansion failed unexpectedly: deferred, as the
        helper answers a request that failed as a whole."""
        self._warn(f"local helper: {request.queue_id}: {exc}")
        return [[Leaf(rc.address, rc.orig or rc.address, "deferred", "4.3.0",
                      "mail system configuration error")] for rc in request.recipients]

    def expand_request(self, request: DeliveryRequest) -> list[list[Leaf]]:
        """Blocking: every recipient's deliveries (forwards left pending)."""
        delivered_to = None
        out = []
        for rc in request.recipients:
            if delivered_to is None:
                delivered_to = delivered_to_headers(request.open_content)
            out.append(Expansion(self, request, delivered_to).run(rc))
        return out

    def probe(self, request: DeliveryRequest) -> list[RecipientResult]:
        """Blocking: a probe's answers, one result per recipient whose parts are
        the destinations found (TraceExpansion; ``postwell_verify`` = "user" is
        sendmail -bv, anything else verify(8))."""
        mta = request.attributes.get("postwell_verify") != "user"
        out = []
        for rc in request.recipients:
            leaves = dsn_for_leaves(rc, TraceExpansion(self, request, set(), mta=mta).run(rc))
            out.append(self._aggregate(rc, leaves))
        return out

    async def _expand_via_helper(self, request, path) -> list[list[Leaf]]:
        self._helper_links(path)
        try:
            raw = await self._helper.deliver(request.queue_id, request.sender, request.nexthop,
                                             request.recipients)
        except (OSError, ConnectionError, ValueError) as exc:
            self._warn(f"local delivery helper: {exc}")
            raw = []
        return self._leaves_of(request, raw)

    async def _expand_batch_via_helper(self, requests, path) -> list[list[list[Leaf]]]:
        """One helper request for several messages (local_helper: "batch");
        None for a message the helper left alone (BATCH_LEAVES); a message
        a failed or short answer leaves out is deferred, as _expand_via_helper."""
        self._helper_links(path)
        try:
            raw = await self._helper.call({"batch": [
                {"queue_id": r.queue_id, "sender": r.sender, "nexthop": r.nexthop,
                 "recipients": [[rc.address, rc.orig] for rc in r.recipients]}
                for r in requests]})
        except (OSError, ConnectionError, ValueError) as exc:
            self._warn(f"local delivery helper: {exc}")
            raw = []
        if not isinstance(raw, list) or len(raw) != len(requests):
            if raw:
                self._warn("local delivery helper: answer does not match the batch")
            raw = [[]] * len(requests)
        return [None if one is None else self._leaves_of(request, one)
                for request, one in zip(requests, raw)]

    def _helper_links(self, path):
        if self._helper is None or self._helper.path != path:
            from .helper import HelperLinks
            from .local_helper import MAX_CONCURRENT
            if self._helper is not None:
                self._helper.close()
            # A connection per delivery in progress: the helper answers each on
            # the thread that read it (helper.serve_unix_threaded).
            self._helper = HelperLinks(path, MAX_CONCURRENT)
        return self._helper

    @staticmethod
    def _leaves_of(request, raw) -> list[list[Leaf]]:
        out = []
        for i, rc in enumerate(request.recipients):
            try:
                out.append([Leaf.from_json(v) for v in raw[i]])
            except (IndexError, TypeError, ValueError, KeyError):
                out.append([Leaf(rc.address, rc.orig or rc.address, "deferred", "4.3.0",
                                 "mail system configuration error")])
        return out

    async def _forward(self, request: DeliveryRequest, per_rcpt: list[list[Leaf]]) -> None:
        """Re-inject pending forwards: one new queue file per envelope sender."""
        groups: dict[str, list[Leaf]] = {}
        for leaves in per_rcpt:
            for leaf in leaves:
                if leaf.status == "pending":
                    groups.setdefault(leaf.forward_sender or "", []).append(leaf)
        for sender, leaves in groups.items():
            try:
                new_id = await self._inject(request, sender, leaves)
            except Exception as exc:
                self._warn(f"{request.queue_id}: cannot forward: {exc}")
                new_id = None
            for leaf in leaves:
                if new_id:
                    leaf.status, leaf.dsn, leaf.reason = "sent", "2.0.0", f"forwarded as {new_id}"
                else:
                    leaf.status, leaf.dsn, leaf.reason = ("deferred", "4.3.0",
                                                          "mail system configuration error")

    async def _inject(self, request, sender, leaves) -> str | None:
        from postwell.cleanup import Cleanup, mail_date
        cleanup = Cleanup(self.config, self.store, self._cleanup_log())
        cs = cleanup.open(rewrite_local=False)
        try:
            attrs = dict(request.attributes or {})
            # The qmgr hands the envelope's DSN parameters over among the
            # attributes; a forwarded copy keeps them as envelope parameters.
            dsn = {k: attrs.pop(k, None) for k in _ENVELOPE_PARAMS}
            cs.set_sender(sender, ret=dsn["ret"] or None, envid=dsn["envid"] or None,
                          smtputf8=str(dsn["smtputf8"] or "").lower() in ("1", "yes", "true"),
                          body_type=dsn["body"] or None)
            for name, value in attrs.items():
                cs.set_attribute(name, value)
            seen = set()
            for leaf in leaves:
                key = (leaf.address, leaf.orig, leaf.orcpt, leaf.notify)
                if key in seen:
                    continue
                seen.add(key)
                # Postfix's forward_append(): each address keeps its NOTIFY and
                # ORCPT (RFC 3461 5.2.7), none when a list reset them.
                cs.add_recipient(leaf.address, orig=leaf.orig, orcpt=leaf.orcpt or None,
                                 notify=leaf.notify or None)
            # As Postfix's forwarded copy: our own Received line, then the
            # Delivered-To that stops a forwarding loop (local(8) MAIL FORWARDING).
            cs.prepend_header(f"Received: by {self.settings.myhostname} ({self.settings.mail_name})\n"
                              f"\tid {cs.queue_id}; {mail_date(self.clock())}")
            delivered = leaves[0].delivered
            if delivered and "forward" in self.settings.delivered_hdr:
                cs.prepend_header(f"Delivered-To: {delivered}")
            for chunk in request.open_content():
                cs.write(chunk)
        except BaseException:
            cs.abort()
            raise
        reply = await cs.finish()
        if reply.code != 250:
            self._warn(f"{request.queue_id}: forward rejected by cleanup: {reply.code} {reply.text}"
                       if hasattr(reply, "text") else f"{request.queue_id}: forward rejected")
            return None
        return cs.queue_id

    def _cleanup_log(self):
        """cleanup's own lines (message-id=...) carry postfix/cleanup, as in Postfix."""
        if getattr(self, "_clog", None) is None:
            from postwell.log import MailLog, NullLog
            if self.log is None:
                self._clog = _NoLog()
            elif isinstance(self.log, NullLog):
                self._clog = self.log
            else:
                try:
                    self._clog = MailLog.from_config(self.config, "cleanup")
                except Exception:
                    self._clog = self.log
        return self._clog

    def _aggregate(self, rc: Recipient, leaves: list[Leaf]) -> RecipientResult:
        now = self.clock()
        parts, trace_parts, forward_parts = [], [], []
        forwards = set()
        # With NOTIFY=SUCCESS an expanded alias or .forward is reported itself
        # ("alias expanded"), its members and forwarded copies not (RFC 3461
        # 5.2.7).  That report is an unlogged part, which needs a qmgr that
        # honours ``logged``; without one the members report as before.
        traced = wants_success(rc.notify)
        for leaf in leaves:
            if leaf.trace is not None and traced:
                action, address, orig = leaf.trace
                r = RecipientResult(Recipient(address, orig=orig, orcpt=rc.orcpt, notify=rc.notify),
                                    "sent", "2.0.0", "alias expanded", RELAY)
                r.done_time = now
                r.dsn_action = action
                r.logged = False        # Postfix's trace_append(): no log line
                trace_parts.append(r)
            if leaf.status == TRACE:
                continue
            if leaf.forward_sender is not None:
                # Postfix logs a forward once per new queue file, under the
                # recipient being delivered (to=<alias>), not per forwarded address,
                # and after the other deliveries (when the new file is done).
                if (leaf.status, leaf.reason) in forwards:
                    continue
                forwards.add((leaf.status, leaf.reason))
                who = Recipient(rc.address, orig=rc.orig, orcpt=rc.orcpt, notify=rc.notify)
                into = forward_parts
            else:
                who = Recipient(leaf.address, orig=leaf.orig, orcpt=rc.orcpt, notify=rc.notify)
                into = parts
            r = RecipientResult(who, leaf.status, leaf.dsn, leaf.reason, RELAY)
            r.done_time = now
            if leaf.diag_type:
                # The qmgr's bounce/defer log keeps it for the notice (_diagnostic_of).
                r.diag_type, r.diag_text = leaf.diag_type, leaf.diag_text or ""
            if traced and (into is forward_parts or not wants_success(leaf.notify)):
                # Postfix's forward_send() takes SUCCESS off "forwarded as" too.
                r.dsn_action = None
            into.append(r)
        parts += trace_parts + forward_parts
        if not parts:   # everything was a duplicate of an earlier delivery
            res = RecipientResult.sent(rc, "delivered", RELAY)
        else:
            pick = next((p for p in parts if p.status == "deferred"), None) \
                or next((p for p in parts if p.status == "bounced"), None) or parts[0]
            res = RecipientResult(rc, pick.status, pick.dsn, pick.reason, RELAY)
            if getattr(pick, "diag_type", None):
                res.diag_type, res.diag_text = pick.diag_type, pick.diag_text
        res.done_time = now
        res.expanded = parts
        return res


# Keys of DeliveryRequest.attributes that are envelope parameters, not attributes.
_ENVELOPE_PARAMS = ("ret", "envid", "smtputf8", "body")


class _NoLog:
    def info(self, *a):
        pass

    warning = error = fatal = info


# ---------------------------------------------------------------- expansion

class Expansion:
    """One top-level recipient: aliases -> .forward -> mailbox, recursively."""

    def __init__(self, agent: LocalAgent, request: DeliveryRequest, delivered_to: set[str]):
        self.agent = agent
        self.s = agent.settings
        self.request = request
        self.delivered_to = delivered_to
        self.leaves: list[Leaf] = []
        self.seen: set[tuple] = set()
        self.forward_active: set[str] = set()
        self.premade: dict[str, dict] = {}   # user -> mailbox result from the .forward call
        self.nodes = 0
        self._users: dict[str, object] = {}  # getpwnam() answers of this expansion
        self.deferred: DeferAll | None = None   # see plain_maildir
        self._forward_paths: dict | None = None  # plain_maildir's, shared by a batch

    def getpwnam(self, user: str):
        """pwd.getpwnam() once per user and expansion (KeyError when unknown):
        the .forward lookup and the mailbox delivery both need the entry, and
        each look-up reads the passwd database again."""
        try:
            pw = self._users[user]
        except KeyError:
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                pw = None
            self._users[user] = pw
        if pw is None:
            raise KeyError(user)
        return pw

    # -- the batched plain case (LocalAgent.expand_batch) ----------------
    def plain_maildir(self, rc: Recipient) -> "PlainMaildir | None":
        """What run(rc) would do when it reaches the user's forward files
        and then, finding none, the Maildir written with the user's own
        rights -- no alias, no mailbox_command, no loop, no mbox -- else None.
        Nothing is recorded here (no leaf, no warning, no "seen" entry): for
        None, or a user who turns out to have a .forward, run(rc) starts
        from the beginning on this same expansion -- unless an alias table
        failed, which leaves its DeferAll in ``deferred``."""
        address = rc.address
        self.deferred = None
        if address.lower() in self.delivered_to:
            return None
        local = address.rpartition("@")[0] if "@" in address else address
        if "/" in local:
            return None          # split() would warn about an extension: leave it to run()
        local_l, user, ext, domain = self.split(address)
        if not user:
            return None
        for name in (local_l, user if ext is not None else None):
            if name is None:
                continue
            if name in ("mailer-daemon", "postmaster"):
                return None      # alias() answers for these even when no table has them
            try:
                if self.agent.aliases.lookup(name) is not None:
                    return None
            except DeferAll as exc:
                # What run() would meet at the same lookup (its warning is
                # logged already): the caller takes this answer as it is.
                self.deferred = exc
                return None
        try:
            pw = self.getpwnam(user)
        except KeyError:
            return None
        b = Branch(address=address, orig=rc.orig or address, delivered=address,
                   sender=self.request.sender)
        ident = Identity.from_pwd(pw)
        # The forward_path names depend on nothing but the address and the
        # passwd entry: a batch of mail for one address expands them once.
        memo = self._forward_paths
        paths = memo.get(address) if memo is not None else None
        if paths is None:
            attrs = self._attrs(b, user, ext, domain, pw)
            paths = []
            for template in self.s.forward_path:
                path, undefined, _ = expand_template(template, attrs, self.s.fwd_filter)
                if not undefined and path:
                    paths.append(path)
            if memo is not None:
                memo[address] = paths
        mailbox = self._mailbox_next(b, user, pw, ident)
        if mailbox is None or mailbox[0].maildir is not True:
            return None
        key = (_identity_key(ident), pw.pw_dir, tuple(paths), pw.pw_uid)
        return PlainMaildir(key, ident, pw.pw_dir, paths, pw.pw_uid, mailbox[0], mailbox[-1], b,
                            user)

    def plain_result(self, plan: "PlainMaildir", answer) -> list[Leaf]:
        """The leaves run() gives once op_mailbox answered ``answer``."""
        self.been_here(("recipient", 0, plan.branch.address))
        self.been_here(("mailbox", plan.user))
        if not isinstance(answer, dict) or not (
                "error" in answer or {"status", "dsn", "reason"} <= answer.keys()):
            answer = {"error": "malformed delivery answer"}
        self._record(plan.branch, answer)
        return self.leaves

    # -- helpers -------------------------------------------------------
    def leaf(self, b: Branch, dsn: str, reason: str) -> None:
        status = "sent" if dsn[0] == "2" else "bounced" if dsn[0] == "5" else "deferred"
        self.leaves.append(Leaf(b.address, b.orig, status, dsn, reason, via=b.via))

    def expanded(self, b: Branch, action: str, before: int) -> None:
        """Postfix's trace_append() of "alias expanded" for a top-level alias or
        .forward: with NOTIFY=SUCCESS its members had SUCCESS taken off, so
        this is the sender's one success report (dsn_for_leaves keeps it then).
        It rides on the expansion's last leaf: the leaves of a recipient
        without NOTIFY=SUCCESS stay what they are."""
        if b.via is not None:
            return
        info = [action, b.address, b.orig]
        if len(self.leaves) > before:
            self.leaves[-1].trace = info
        else:
            self.leaves.append(Leaf(b.address, b.orig, TRACE, "2.0.0", "alias expanded",
                                    trace=info))

    def been_here(self, key: tuple) -> bool:
        if key in self.seen:
            return True
        if not self.s.dup_limit or len(self.seen) < self.s.dup_limit:
            self.seen.add(key)
        return False

    def split(self, address: str):
        local, _, domain = address.rpartition("@") if "@" in address else (address, "", "")
        local_l = local.lower()
        user, ext = local_l, None
        delim = self.s.delimiter
        if delim:
            idx = min((i for i in (local_l.find(c) for c in delim) if i > 0), default=-1)
            if idx > 0:
                special = self.s.owner_special and "-" in delim and (
                    local_l.startswith("owner-") or local_l.endswith("-request"))
                if not special:
                    user, ext = local_l[:idx], local_l[idx + 1:]
                    if "/" in ext:
                        # An extension never names a path (.forward+EXT): dropped, as Postfix.
                        self.agent._warn(f"{self.request.queue_id}: address with illegal extension: "
                                         f"{local_l}")
                        ext = None
        return local_l, user, ext, domain

    def run(self, rc: Recipient) -> list[Leaf]:
        address = rc.address
        top = Branch(address=address, orig=rc.orig or address, delivered=address,
                     sender=self.request.sender)
        try:
            self.recipient(top)
        except DeferAll as exc:
            self.failed(top, exc)
        return self.leaves

    def failed(self, top: Branch, exc: DeferAll) -> None:
        # Nothing of a failed expansion goes out: the retry redoes all of it.
        self.leaves = [l for l in self.leaves
                       if l.forward_sender is None and l.status not in ("sent", TRACE)]
        for leaf in self.leaves:
            leaf.trace = None
        status = "bounced" if exc.dsn.startswith("5") else "deferred"
        self.leaves.append(Leaf(top.address, top.orig, status, exc.dsn, exc.reason))

    # -- the recipient switch (Postfix's deliver_recipient/deliver_switch) --
    def recipient(self, b: Branch, mailbox_only: bool = False) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise DeferAll("5.4.6", f"alias database loop for {b.address}")
        if self.been_here(("recipient", b.level, b.address)):
            return
        if b.address.lower() in self.delivered_to:
            # local(8) MAIL FORWARDING: this recipient's Delivered-To is already there.
            self.leaf(b, "5.4.6", f"mail forwarding loop for {b.address}")
            return
        local_l, user, ext, domain = self.split(b.address)
        if not user:
            self.leaf(b, "5.1.3", f"null username in {b.address}")
            return
        if not mailbox_only:
            if self.alias(b, local_l, None):
                return
            if ext is not None and self.alias(b, user, ext):
                return
        # Mail aliased or forwarded on behalf of someone else (an owner- alias, a
        # .forward of another user) or listed in an :include: file goes out as a
        # new queue file, so it gets its own status records and error recipient.
        if b.level and ((b.owner is not None and b.owner.lower() != user) or b.exp_type == "include"):
            self.forward(b, b.address)
            return
        if not mailbox_only and self.dotforward(b, user, ext, domain):
            return
        if self.mailbox(b, user, ext, domain):
            return
        if self.s.luser_relay:
            attrs = self._attrs(b, user, ext, domain, None)
            target, _, _ = expand_template(self.s.luser_relay, attrs, self.s.cmd_filter + "@")
            if target:
                self.address(b.child(), target)
                return
        self.leaf(b, "5.1.1", f'unknown user: "{user}"')

    def _warn(self, text):
        self.agent._warn(text)

    # -- aliases ---------------------------------------------------------
    def alias(self, b: Branch, name: str, unmatched: str | None) -> bool:
        if b.exp_from is not None and b.exp_from.lower() == name:
            return False   # an alias that lists itself means the user
        if b.level > MAX_LEVEL:
            self._warn(f"alias database loop for {name}")
            self.leaf(b, "5.4.6", f"alias database loop for {name}")
            return True
        found = self.agent.aliases.lookup(name)
        if found is None:
            if name in ("mailer-daemon", "postmaster"):
                self._warn(f"required alias not found: {name}")
                self.leaf(b, "2.0.0", "discarded")
                return True
            return False
        value, owner_uid = found
        ident = None
        if owner_uid != 0:
            try:
                ident = Identity.from_pwd(pwd.getpwuid(owner_uid))
            except KeyError:
                self._warn("cannot find alias database owner")
                self.leaf(b, "4.3.0", "cannot find alias database owner")
                return True
        owner = None
        sender = b.sender
        if self.s.owner_special and not name.startswith("owner-"):
            got = self.agent.aliases.lookup("owner-" + name)
            if got is not None:
                owner = got[0] if self.s.expand_owner else "owner-" + name
                if "@" not in owner:
                    owner = f"{owner}@{self.s.myorigin}"
                sender = owner
        prop = unmatched if "alias" in self.s.propagate else None
        # RFC 3461 5.2.7: the members get NOTIFY without SUCCESS; a mailing list
        # (new envelope sender) passes neither the original recipient nor ORCPT
        # on (no orig_to for its members), as Postfix's alias.c.  Postfix keeps
        # the message's ENVID and RET for the list's copy (checked against 3.7).
        child = b.child(exp_type="alias", exp_from=name, ident=ident, owner=owner, sender=sender,
                        unmatched=prop, orig="" if owner is not None else b.orig,
                        via="list" if owner is not None or b.via == "list" else "alias")
        before = len(self.leaves)
        if not self.tokens(child, split_tokens(value)):
            # "name: ," lists nobody: Postfix defers rather than drop the mail.
            self._warn(f"no recipient in alias lookup result for {name}")
            self.leaf(b, "4.3.0", "alias database unavailable")
            return True
        self.expanded(b, "delivered" if owner is not None else "expanded", before)
        return True

    # -- tokens ----------------------------------------------------------
    def tokens(self, b: Branch, items: list[str]) -> int:
        count = 0
        for tok in items:
            count += 1
            if tok.startswith("|"):
                self.command_token(b, tok[1:].strip())
            elif tok.lower().startswith(":include:"):
                self.include(b, tok[9:].strip())
            elif tok.startswith("/"):
                self.file_token(b, tok)
            elif tok.startswith("\\"):
                # \user: that user's own mailbox, no alias or .forward expansion.
                self.address(b, tok[1:], mailbox_only=True)
            else:
                self.address(b, tok)
        return count

    def _ident_for(self, b: Branch) -> Identity:
        ident = b.ident
        if ident is None or ident.uid == 0:
            return self.agent.default_identity()
        return ident

    def command_token(self, b: Branch, command: str) -> None:
        if (b.exp_type or "") not in self.s.allow_commands:
            self.leaf(b, "5.7.1", "mail to command is restricted")
            return
        ident = self._ident_for(b)
        if self.been_here(("command", ident.uid, command)):
            return
        self.run_command(b, ident, command)

    def file_token(self, b: Branch, path: str) -> None:
        if (b.exp_type or "") not in self.s.allow_files:
            self.leaf(b, "5.7.1", "mail to file is restricted")
            return
        ident = self._ident_for(b)
        if self.been_here(("file", path)):
            return
        copy = self._copy(b, path, path.endswith("/"), "file")
        copy.lock_methods = [m for m in self.s.lock_methods if m != "dotlock"]
        self._do(b, ident, op_file, copy, self.request.open_content)

    def include(self, b: Branch, path: str) -> None:
        if not path.startswith("/"):
            self.leaf(b, "5.3.5", f":include: path must be absolute: {path}")
            return
        if self.been_here(("include", b.level, path)):
            return
        reader = b.ident if b.ident is not None else Identity(0, 0, "root")
        res = self._call(reader, op_read_file, path, reader.uid, "include")
        if "error" in res:
            self.leaf(b, "4.3.0", res["error"])
            return
        problem = res.get("defer") or res.get("bounce")
        if res.get("missing"):
            problem = f"unable to lookup :include: file {path}: No such file or directory"
        if problem:
            # As Postfix: the details go to the log, the sender sees a generic text.
            self._warn(problem)
            self.leaf(b, "5.3.5", "mail system configuration error")
            return
        owner_uid = res.get("owner", 0)
        ident, owner = b.ident, b.owner
        if owner_uid != 0:
            # Deliveries on behalf of a user's include file use that user's rights,
            # never the alias owner's or default_privs (alias.c DELIVERY RIGHTS).
            try:
                pw = pwd.getpwuid(owner_uid)
            except KeyError:
                self.leaf(b, "4.3.0", "cannot find include file owner")
                return
            ident = Identity.from_pwd(pw)
            if owner is None:
                owner = f"{pw.pw_name}@{self.s.myorigin}"
        items = []
        for line in res["text"].splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                items.extend(split_tokens(line))
        self.tokens(b.child(exp_type="include", ident=ident, owner=owner,
                            sender=owner or b.sender), items)

    # -- addresses ---------------------------------------------------------
    def address(self, b: Branch, addr: str, mailbox_only: bool = False) -> None:
        addr = addr.strip()
        if not addr:
            # A quoted empty destination ("") is the null address, which the
            # resolver turns into MAILER-DAEMON, as Postfix's trivial-rewrite.
            addr = "MAILER-DAEMON"
        if "@" not in addr:
            addr = f"{addr}@{self.s.myorigin}"
        if b.unmatched and self.s.delimiter:
            local, _, domain = addr.rpartition("@")
            if self.s.delimiter[0] not in local:
                addr = f"{local}{self.s.delimiter[0]}{b.unmatched}@{domain}"
        try:
            res = self.agent.resolver.resolve(addr)
        except Exception:
            raise DeferAll("4.3.0", "address resolver failure")
        if getattr(res, "failed", False):
            raise DeferAll("4.3.0", "address resolver failure")
        target = getattr(res, "recipient", None) or addr
        if res.transport == (self.request.transport or "local"):
            self.recipient(b.child(address=target, unmatched=None), mailbox_only=mailbox_only)
            return
        self.forward(b, target)

    def forward(self, b: Branch, target: str) -> None:
        if self.been_here(("forward", target.lower(), b.sender)):
            return
        self.leaves.append(Leaf(target, b.orig, "pending", "4.3.0", "forward pending",
                                forward_sender=b.sender, delivered=b.delivered, via=b.via))

    # -- .forward -------------------------------------------------------
    def dotforward(self, b: Branch, user: str, ext: str | None, domain: str) -> bool:
        try:
            pw = self.getpwnam(user)
        except KeyError:
            return False
        ident = Identity.from_pwd(pw)
        attrs = self._attrs(b, user, ext, domain, pw)
        candidates = []
        for template in self.s.forward_path:
            path, undefined, used = expand_template(template, attrs, self.s.fwd_filter)
            if not undefined and path:
                candidates.append((path, "extension" in used))
        # One child, as the user: the home directory check, then the first
        # forward_path file that exists.
        paths = [c[0] for c in candidates]
        mailbox = self._mailbox_next(b, user, pw, ident)
        if mailbox is not None:
            # Without a .forward file local(8) goes on to the mailbox, which the
            # same worker writes as the same user: one round trip, not two.
            res = self._call(ident, op_forward_or_mailbox, pw.pw_dir, paths, pw.pw_uid, *mailbox)
            if "mailbox" in res:
                self.premade[user] = res.pop("mailbox")
        else:
            res = self._call(ident, op_forward_lookup, pw.pw_dir, paths, pw.pw_uid)
        if "error" in res:
            raise DeferAll("4.3.0", res["error"])
        if "home_error" in res:
            # local(8): no home directory, no delivery (the admin must fix it).
            self.leaf(b, "4.3.0", f"cannot access home directory {pw.pw_dir}: {res['home_error']}")
            return True
        if "path" not in res:
            return False
        path = res["path"]
        if path in self.forward_active:
            return False      # back in the same .forward: deliver to the mailbox
        if "warn" in res:
            self._warn(res["warn"])
            return False
        items = []
        for line in res["text"].splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                items.extend(split_tokens(line))
        if not items:
            return False       # an empty .forward means: no forwarding
        ext_matched = dict(candidates).get(path, False)
        unmatched = ext if (ext and not ext_matched and "forward" in self.s.propagate) else None
        self.forward_active.add(path)
        before = len(self.leaves)
        try:
            # RFC 3461 5.2.7: a .forward is an alias, SUCCESS is reported for it.
            self.tokens(b.child(exp_type="forward", exp_from=user, ident=ident, owner=user,
                                unmatched=unmatched, via=b.via or "alias"), items)
        finally:
            self.forward_active.discard(path)
        # Postfix's dotforward.c: "alias expanded" only when nothing was deferred.
        if not any(leaf.status == "deferred" for leaf in self.leaves[before:]):
            self.expanded(b, "expanded", before)
        return True

    def _mailbox_next(self, b: Branch, user: str, pw, ident: Identity) -> tuple | None:
        """op_mailbox's arguments when, should the user have no .forward file,
        mailbox() would next write the mailbox with ``ident``'s own rights;
        else None (a command, another identity, a mailbox already done)."""
        if ("mailbox", user) in self.seen:
            return None
        try:
            plan = self._mailbox_plan(b, user, pw, ident)
        except DeferAll:
            return None     # mailbox() meets the same trouble in its own turn
        if plan[0] != "mailbox" or _identity_key(plan[1]) != _identity_key(ident):
            return None
        return plan[2]

    # -- mailbox -------------------------------------------------------
    def mailbox(self, b: Branch, user: str, ext: str | None, domain: str) -> bool:
        premade = self.premade.pop(user, None)
        if premade is not None:
            # Already written in the .forward lookup's worker call (see dotforward).
            self.been_here(("mailbox", user))
            self._record(b, premade)
            return True
        try:
            pw = self.getpwnam(user)
        except KeyError:
            return False
        if self.been_here(("mailbox", user)):
            return True
        ident = Identity.from_pwd(pw)
        plan = self._mailbox_plan(b, user, pw, ident)
        if plan[0] == "command":
            self.run_command(b, plan[1], plan[2], pw=pw)
            return True
        _, act, args = plan
        self._do(b, act, op_mailbox, *args)
        return True

    def _mailbox_plan(self, b: Branch, user: str, pw, ident: Identity) -> tuple:
        """("command", identity, command) or ("mailbox", identity, op_mailbox args)."""
        command = None
        maps = self.agent.command_maps()
        if maps:
            try:
                command = maps.lookup(user)
            except Exception:
                raise DeferAll("4.3.0", "mailbox_command_maps lookup failure")
        command = command or self.s.mailbox_command
        if command:
            # As root the command runs as default_privs (local(8) MAILBOX DELIVERY).
            run_ident = ident if ident.uid != 0 else self.agent.default_identity()
            return "command", run_ident, command
        chown_to = None
        if self.s.home_mailbox:
            path = os.path.join(pw.pw_dir, self.s.home_mailbox)
            maildir = self.s.home_mailbox.endswith("/")
            act = ident
        else:
            maildir = self.s.spool.endswith("/")
            path = os.path.join(self.s.spool, user) + ("/" if maildir else "")
            act = ident
            try:
                st = os.stat(self.s.spool)
            except OSError:
                st = None
            if st is not None and not maildir and not st.st_mode & 0o002:
                if st.st_mode & 0o020:
                    # Group-writable spool (Debian: root:mail 2775): the user with the spool group.
                    act = Identity(ident.uid, st.st_gid, ident.name, ident.home, ident.shell)
                elif ident.uid != 0:
                    # Root-only spool: create as root, chown, as Postfix does.
                    act = Identity(0, 0, "root")
                    chown_to = (ident.uid, ident.gid)
        copy = self._copy(b, path, maildir, "file")
        return "mailbox", act, (copy, user, ident.uid, self.s.strict_owner, chown_to,
                                self.request.open_content)

    # -- doing things --------------------------------------------------
    def _copy(self, b: Branch, path: str, maildir: bool, kind: str) -> LocalCopy:
        copy = LocalCopy(path=path, maildir=maildir, sender=self.request.sender, recipient=b.address,
                         orig=b.orig, delivered=b.delivered, limit=self.s.size_limit,
                         lock_methods=self.s.lock_methods, hostname=self.s.hostname,
                         want_orig=self.s.original_recipient,
                         want_delivered=kind in self.s.delivered_hdr)
        copy.queue_dev = self.agent.queue_device
        return copy

    def _call(self, ident: Identity, func, *args) -> dict:
        try:
            return run_as(ident, func, *args)
        except NeedRoot as exc:
            return {"error": str(exc)}

    def _do(self, b: Branch, ident: Identity, func, *args) -> None:
        try:
            res = run_as(ident, func, *args)
        except NeedRoot as exc:
            self.leaf(b, "4.3.0", f"mail system configuration error: {exc}")
            return
        self._record(b, res)

    def _record(self, b: Branch, res: dict) -> None:
        if "error" in res:
            self.leaf(b, "4.3.0", f"local delivery failed: {res['error']}")
            return
        if res.get("ignored_dsn"):
            # A command's 2.x code taken as a failure (5.0.0): Postfix's
            # bounce_append() says so (checked against 3.7's local(8)).
            self._warn(f"bounce_append: ignoring dsn code \"{res['ignored_dsn']}\"")
        self.leaves.append(Leaf(b.address, b.orig, res["status"], res["dsn"], res["reason"],
                                via=b.via, diag_type=res.get("diag_type"),
                                diag_text=res.get("diag_text")))

    def _attrs(self, b: Branch, user, ext, domain, pw) -> dict:
        local = b.address.rpartition("@")[0] if "@" in b.address else b.address
        return {"user": user, "home": pw.pw_dir if pw else None, "shell": pw.pw_shell if pw else None,
                "recipient": b.address, "extension": ext, "domain": domain, "local": local,
                "recipient_delimiter": self.s.delimiter[:1] if self.s.delimiter else None}

    def run_command(self, b: Branch, ident: Identity, command: str, pw=None) -> None:
        local_l, user, ext, domain = self.split(b.address)
        f = self.s.cmd_filter

        def clean(v):
            return "".join(c if c in f else "_" for c in (v or ""))

        env = {"PATH": DEFAULT_PATH}
        for name in self.s.export_env:
            if name in os.environ:
                env[name] = os.environ[name]
        # USER/LOGNAME: the bare recipient name; HOME/SHELL: whose rights the command has.
        env.update({
            "USER": clean(user), "LOGNAME": clean(user),
            "SENDER": clean(self.request.sender), "RECIPIENT": clean(b.address),
            "LOCAL": clean(b.address.rpartition("@")[0] if "@" in b.address else b.address),
            "DOMAIN": clean(domain), "ORIGINAL_RECIPIENT": clean(b.orig),
        })
        # HOME and SHELL only with a user context (.forward, mailbox_command, an
        # alias database or include file owned by a user): none for root's aliases.
        if pw is not None:
            env["HOME"], env["SHELL"] = pw.pw_dir, pw.pw_shell
        elif b.ident is not None:
            env["HOME"], env["SHELL"] = b.ident.home, b.ident.shell
        if ext:
            env["EXTENSION"] = clean(ext)
        attrs = self.request.attributes or {}
        for key, var in (("client_address", "CLIENT_ADDRESS"), ("helo_name", "CLIENT_HELO"),
                         ("client_name", "CLIENT_HOSTNAME"), ("protocol", "CLIENT_PROTOCOL"),
                         ("sasl_method", "SASL_METHOD"), ("sasl_sender", "SASL_SENDER"),
                         ("sasl_username", "SASL_USERNAME")):
            if attrs.get(key):
                env[var] = clean(str(attrs[key]))
        cwd = "/"
        if self.s.exec_dir:
            cwd, undefined, _ = expand_template(self.s.exec_dir,
                                                self._attrs(b, user, ext, domain, pw),
                                                self.s.exec_dir_filter)
        elif self.s.queue_directory and os.path.isdir(self.s.queue_directory):
            cwd = self.s.queue_directory
        copy = self._copy(b, "", False, "command")
        self._do(b, ident, _command_in_dir, command, env, cwd, self.s.time_limit, self.s.shell,
                 copy, self.request.open_content, bool(self.s.exec_dir))


class TraceExpansion(Expansion):
    """local(8) for a trace-only request: every destination is reported instead
    of used ("forwards to ADDR", "delivers to mailbox" / "delivers to maildir",
    "delivers to command: CMD", "delivers to file: PATH"); nothing is written, run
    or re-injected (checked against 3.7).

    sendmail -bv (DEL_REQ_FLAG_USR_VRFY) expands aliases, .forward and :include:
    files as for mail.  A verify(8) probe (``mta``, DEL_REQ_FLAG_MTA_VRFY) stops
    at an alias ("aliased to VALUE", alias.c) or a user's forward_path file
    ("forward via file: PATH", dotforward.c: found with lstat, not read)."""

    def __init__(self, agent, request, delivered_to, mta: bool = False):
        super().__init__(agent, request, delivered_to)
        self.mta = mta

    def alias(self, b: Branch, name: str, unmatched: str | None) -> bool:
        if not self.mta:
            return super().alias(b, name, unmatched)
        if b.exp_from is not None and b.exp_from.lower() == name:
            return False
        found = self.agent.aliases.lookup(name)
        if found is None:
            if name in ("mailer-daemon", "postmaster"):
                self._warn(f"required alias not found: {name}")
                self.leaf(b, "2.0.0", "discarded")
                return True
            return False
        self._report(b, f"aliased to {str(found[0]).strip()}")
        return True

    def dotforward(self, b: Branch, user: str, ext: str | None, domain: str) -> bool:
        if not self.mta:
            return super().dotforward(b, user, ext, domain)
        try:
            pw = self.getpwnam(user)
        except KeyError:
            return False
        attrs = self._attrs(b, user, ext, domain, pw)
        paths = []
        for template in self.s.forward_path:
            path, undefined, _ = expand_template(template, attrs, self.s.fwd_filter)
            if path and not undefined:
                paths.append(path)
        if not paths:
            return False
        res = self._call(Identity.from_pwd(pw), op_forward_lookup, pw.pw_dir, paths, pw.pw_uid)
        if not res.get("path"):
            return False
        self._report(b, f"forward via file: {res['path']}")
        return True

    def _mailbox_next(self, b, user, pw, ident):
        return None         # the .forward lookup must not write the mailbox

    def _call(self, ident: Identity, func, *args) -> dict:
        try:
            return run_as(ident, func, *args)
        except NeedRoot as exc:
            # An unprivileged qmgr reads with its own rights what it may: the
            # user's own .forward (op_read_file's owner checks still apply) and
            # the :include: files of root's aliases (fewer rights than root's).
            # An :include: named by a user must be read with that user's rights,
            # never with ours.
            if func is op_forward_lookup or (func is op_read_file and ident.uid == 0):
                return func(*args)
            return {"error": str(exc)}

    def _report(self, b: Branch, reason: str, address: str | None = None) -> None:
        self.leaves.append(Leaf(address or b.address, b.orig, "sent", "2.0.0", reason, via=b.via))

    def forward(self, b: Branch, target: str) -> None:
        if self.been_here(("forward", target.lower(), b.sender)):
            return
        self._report(b, f"forwards to {target}", target)

    def mailbox(self, b: Branch, user: str, ext: str | None, domain: str) -> bool:
        try:
            pw = self.getpwnam(user)
        except KeyError:
            return False
        if self.been_here(("mailbox", user)):
            return True
        plan = self._mailbox_plan(b, user, pw, Identity.from_pwd(pw))
        if plan[0] == "command":
            self.run_command(b, plan[1], plan[2], pw=pw)
        else:
            self._report(b, "delivers to maildir" if plan[2][0].maildir else "delivers to mailbox")
        return True

    def run_command(self, b: Branch, ident: Identity, command: str, pw=None) -> None:
        self._report(b, f"delivers to command: {command}")

    def file_token(self, b: Branch, path: str) -> None:
        if (b.exp_type or "") not in self.s.allow_files:
            self.leaf(b, "5.7.1", "mail to file is restricted")
            return
        if self.been_here(("file", path)):
            return
        self._report(b, f"delivers to file: {path}")


def _device_of(path: str | None) -> int | None:
    try:
        return os.stat(path).st_dev if path else None
    except OSError:
        return None


def _reachable_directory(path: str) -> None:
    """Raise the OSError chdir(2) would give for ``path``, without changing
    the working directory: it belongs to the whole process, and an
    unprivileged qmgr runs this on one of its threads (run_as calls the
    operation directly when no user switch is needed), where a chdir would
    move every other thread's relative paths and the next command's check."""
    st = os.stat(path)       # ENOENT, ENOTDIR, EACCES of the components
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    # the effective ids: a thread of the root helper runs with the user's
    # effective uid only (per-thread setresuid keeps root's real uid)
    if not os.access(path, os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)


def _command_in_dir(command, env, cwd, time_limit, shell, copy, open_content, strict_cwd):
    """Runs as the user (a forked child, or this thread of a process that is
    the user already): the working directory must be reachable as the user.
    The command's child enters it (op_command's cwd), never this process."""
    try:
        _reachable_directory(cwd)
    except OSError as exc:
        if strict_cwd:
            return {"status": "deferred", "dsn": "4.3.0",
                    "reason": f"mail system configuration error: cannot change directory to {cwd}: "
                              f"{exc.strerror}"}
        cwd = "/"
    return op_command(command, env, cwd, time_limit, shell, copy, open_content)
