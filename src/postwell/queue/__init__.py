"""postwell.queue: the durable on-disk queue (format: see queue/format.py)."""

from .format import CorruptQueueFile, Recipient, is_queue_id, make_queue_id  # noqa: F401
from .store import (  # noqa: F401
    ALL_DIRS, HOLD_ATTRIBUTE, QUEUE_NAMES, IncomingMessage, QueuedMessage, QueueFileNotFound, QueueIOError,
    QMGR_FLUSH, QMGR_SCAN_INCOMING, QueueNoSpaceError, QueueStore, QueueWriteError, commit_executor,
    fsync_dir, notify_qmgr,
)
