"""unikd: knowledge distillation for image classification (NKD and USKD, ICCV 2023, with their baselines)."""

from unikd._errors import ConfigError, DataError, UnikdError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "UnikdError", "__version__"]
