"""Small file-descriptor helpers shared by the daemons (pickup, anvil, showq, verify)."""

from __future__ import annotations

import os


def drain(fd: int, rounds: int = 64) -> None:
    """Empty a non-blocking wake-up pipe or FIFO: the bytes only say "look again",
    so they are read and dropped (bounded, so a writer that never stops cannot
    hold the loop)."""
    for _ in range(rounds):
        try:
            if not os.read(fd, 4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return


def unlink_if_ours(path: str, ino: int) -> None:
    """Remove the socket name a daemon bound, unless a newer instance (after a
    reload) has bound the name again since: then it is not ours to remove."""
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass
