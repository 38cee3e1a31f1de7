"""Errors caused by user input. The CLIs print their message as one line and exit non-zero."""

import argparse
import sys


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong, where, and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config file or override is invalid."""


class OneLineParser(argparse.ArgumentParser):
    """argparse for the CLIs: a usage mistake raises UserError (one line, exit 2 in `main`)
    instead of printing the usage block."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


class NumericalError(RuntimeError):
    """The latents stopped being finite (t2v.pipeline.text_to_video raises it)."""


def fail(exc: Exception) -> int:
    """A CLI's ending for `exc`: its message as one line on stderr, and the exit code: 2 for a
    user mistake (UserError, ConfigError), 1 for a run that failed (NumericalError)."""
    print(f"error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, UserError) else 1
