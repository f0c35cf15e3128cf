"""postwell.pickup: local submission through the maildrop (Postfix's postdrop + pickup).

How mail from ``sendmail`` reaches the queue, and why it is safe without
set-gid programs:

* ``$queue_directory/maildrop`` is mode 1733 and owned by mail_owner: every
  user may create files there (world-writable), nobody but mail_owner may
  list it (no read bit for others), and the sticky bit keeps users from
  removing or renaming files they do not own.
* ``sendmail`` runs as the invoking user (root and mail_owner too: one code
  path).  It writes the message to ``maildrop/.tmp.<128 random bits>``
  (mode 0644), streaming standard input, fsyncs it, renames it to its final
  unguessable name (32 hex digits), makes the rename durable and pokes the
  FIFO ``public/pickup`` (non-blocking, errors ignored).  Other users can
  neither find the name (no listing) nor guess it, so they cannot read it;
  pickup can, as mail_owner.  Users never write into the real queue
  directories (0700 mail_owner).
* The file's owner (st_uid) is the submitter's identity, as Postfix's
  postdrop records the uid; nothing in the file is trusted to say who sent it.
  Files with more than one hard link, symbolic links and non-regular files
  are refused, so nobody can pass off another user's file as theirs.
* ``pickup`` (this package, a child of the master running as mail_owner)
  validates each complete file strictly (format: ``maildrop.py``), enforces
  message_size_limit, feeds it through cleanup in the local rewriting
  context with a ``Received: by HOST (MAIL_NAME, from userid UID)`` header,
  and removes the maildrop file only after cleanup's durable commit (a crash
  in between can queue a message twice, never lose it).  A malformed file is
  logged and moved to ``corrupt/maildrop.<name>``; pickup carries on.
  Temporary files (dot names) are ignored, and removed after a day.

Entry points::

    serve(config)                  # the service; returns after SIGTERM
    pickup_once(config, log) -> int   # one scan (tests, tools)
    MaildropWriter, MaildropEnvelope, poke_pickup   # used by sendmail
"""

from .maildrop import (  # noqa: F401
    MaildropEnvelope, MaildropFile, MaildropFormatError, MaildropWriter, poke_pickup, read_maildrop,
)
from .acl import submit_denied  # noqa: F401

# The service (and cleanup, dsn, qmgr behind it) loads on first use (PEP 562):
# sendmail and postqueue need the maildrop format only.
_SERVICE = ("Pickup", "pickup_once", "prepare_public", "serve")


def __getattr__(name: str):
    if name in _SERVICE:
        from . import service
        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
