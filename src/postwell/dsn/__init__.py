"""Delivery status notifications (RFC 3464): bounces, delay warnings,
success reports and postmaster copies, rendered as Postfix renders them and
posted through cleanup from the null sender."""

from .notice import (  # noqa: F401
    DELAY, FAILURE, SUCCESS, DsnRecipient, FailedRecipient, build_bounce, diagnostic,
    render_notice, wrap_line,
)
from .submit import (  # noqa: F401
    NoticeError, double_bounce_address, is_double_bounce, notify_classes, post_notice, wants,
)
