"""selfattn: exact, fast and memory-lean self-attention.

The public names of API.md: ``attention``, ``attention_weights``, ``explain``,
``available_backends``, ``UnsupportedInputs`` and the numpy specification ``selfattn.reference``.
"""

from . import reference
from .api import attention, attention_weights, available_backends, explain
from .spec import UnsupportedInputs

__version__ = "0.1.0"

__all__ = [
    "UnsupportedInputs",
    "__version__",
    "attention",
    "attention_weights",
    "available_backends",
    "explain",
    "reference",
]
