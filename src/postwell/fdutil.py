"""Small file-descriptor helpers shared by the poll-loop daemons (pickup, anvil)."""

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
