"""postwell: a Postfix-compatible mail transfer agent in Python."""

__version__ = "0.1.0"
