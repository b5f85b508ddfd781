"""User-facing errors.

A ``UnikdError`` is a mistake the user can fix (a bad argument, config key or file); the CLI prints its message on
one line and exits with status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


class UnikdError(Exception):
    """An error caused by user input; the message names the problem and the fix."""


class ConfigError(UnikdError, ValueError):
    """A config key, value or override is invalid; the message starts with the key path."""
