"""The models package's user error (its own module so that the CIFAR zoo can raise it without import cycles)."""

from unikd._errors import UnikdError


class ModelError(UnikdError, ValueError):
    """A model name, layer, keyword or checkpoint the user gave does not fit; the message says what does."""
