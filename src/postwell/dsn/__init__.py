"""Delivery status notifications (bounces).  Minimal now; RFC 3464-shaped."""

from .notice import build_bounce  # noqa: F401
