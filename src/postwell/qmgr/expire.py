"""Forced expiry (``postsuper -e`` / ``-f``, Postfix 3.5+): the on-disk mark.

The mark is the queue file's group-execute permission bit (``S_IXGRP``, mode
0710 instead of 0700), the same bit Postfix uses (MAIL_QUEUE_STAT_EXPIRE).
Why a mode bit: chmod(2) is atomic and needs no rewrite of the file, the bit
survives every queue move (rename), and the owner-execute "complete" marker
that ``QueueStore.scan`` checks is left alone.  Queue files are created 0600
and committed 0700, so no ordinary message ever carries the bit.

Who does what:

- ``postsuper -e ID`` sets the bit (and fsyncs the file so the mark survives
  a crash), logs ``ID: expired`` and, for a deferred message, moves it to
  incoming/ and wakes the qmgr, so it is handled at once rather than at its
  retry time.  ``-f`` also releases a held message the same way; with ``-e``
  a held message stays held (and expired) until ``-f`` or ``-H``.
- The qmgr, when a message with the bit becomes active, delivers nothing:
  every pending recipient is returned to the sender, with the reason of its
  last deferral when the message was deferred, otherwise ``4.7.0 message is
  administratively expired``; it logs ``ID: from=<S>, status=force-expired,
  returned to sender`` (Postfix's words) and sends the usual non-delivery
  notice.  A deferred message with the bit is due at once at any scan.
- ``postqueue -j`` reports the bit as ``"forced_expire": true``.
"""

from __future__ import annotations

import os
import stat

EXPIRE_BIT = stat.S_IXGRP
ADMIN_EXPIRED_DSN = "4.7.0"
ADMIN_EXPIRED_REASON = "message is administratively expired"


def mode_expired(mode: int) -> bool:
    return bool(mode & EXPIRE_BIT)


def path_expired(path: str) -> bool:
    try:
        return mode_expired(os.stat(path).st_mode)
    except OSError:
        return False


def message_expired(qm) -> bool:
    """The mark on an open QueuedMessage (fstat of its descriptor: right even
    if postsuper set the bit after the file was opened)."""
    fd = getattr(qm, "_fd", None)
    try:
        if fd is not None:
            return mode_expired(os.fstat(fd).st_mode)
    except OSError:
        pass
    path = getattr(qm, "path", None)
    return path_expired(path) if path else False


def mark_expired(path: str) -> None:
    """Set the mark durably; raises OSError (FileNotFoundError when the
    message left that queue meanwhile)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(22, f"{path}: not a regular file")
        if not mode_expired(st.st_mode):
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | EXPIRE_BIT)
            os.fsync(fd)
    finally:
        os.close(fd)
