"""Errors caused by user input. The CLIs print their message as one line and exit non-zero."""

import argparse


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong, where, and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config file or override is invalid."""


class OneLineParser(argparse.ArgumentParser):
    """argparse for the CLIs: a usage mistake raises UserError (one line, exit 2 in `main`)
    instead of printing the usage block."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")
