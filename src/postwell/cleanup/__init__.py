"""postwell.cleanup: Postfix's cleanup(8) as a library (header fix-ups, size
limit, virtual alias expansion, the durable queue write)."""

from .headers import ContentProcessor  # noqa: F401
from .service import (  # noqa: F401
    REPLY_ALIAS_ERROR, REPLY_TOO_BIG, REPLY_TOO_MANY_HOPS, REPLY_WRITE_ERROR, Cleanup,
    CleanupSession, mail_date,
)
from .virtual import AliasExpansionError, VirtualAliasExpander  # noqa: F401
