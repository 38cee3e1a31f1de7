"""Errors caused by user input. The CLIs print their message as one line and exit non-zero."""


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong, where, and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config file or override is invalid."""
