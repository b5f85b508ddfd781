"""User-facing errors.

A ``UnikdError`` is a mistake the user can fix (a bad argument, config key or file); the CLI prints its message on
one line and exits with status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


class UnikdError(Exception):
    """An error caused by user input; the message names the problem and the fix."""


class ConfigError(UnikdError, ValueError):
    """A config key, value or override is invalid; the message starts with the key path."""


class DataError(UnikdError):
    """A data file cannot be used (an unreadable or oversized image, a truncated archive); the message names it.

    Raised inside DataLoader workers too: torch re-raises a worker's exception in the main process as
    ``type(error)("Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...\\n...DataError: <msg>")``;
    the constructor keeps only ``<msg>``, so the user still reads one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)
