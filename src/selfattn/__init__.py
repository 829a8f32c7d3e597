"""selfattn: exact, fast and memory-lean self-attention.

The public names of docs/api.md: ``attention``, ``attention_weights``, ``attention_stats``,
``attention_with_stats``, ``explain``, ``available_backends``, ``UnsupportedInputs``,
``quantize_kv`` / ``QuantizedKV``, the numpy specification ``selfattn.reference``, the layers and
positional encodings, ``selfattn.models`` and ``selfattn.distributed``.
"""

from . import distributed, models, reference
from .api import attention, attention_weights, available_backends, explain
from .kv_cache import KVCache
from .layers import MultiHeadSelfAttention, TransformerBlock
from .positional import RotaryEmbedding, alibi_slopes, sinusoidal_positions
from .quant import QuantizedKV, quantize_kv
from .spec import UnsupportedInputs
from .stats import attention_stats, attention_with_stats

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "MultiHeadSelfAttention",
    "QuantizedKV",
    "RotaryEmbedding",
    "TransformerBlock",
    "UnsupportedInputs",
    "__version__",
    "alibi_slopes",
    "attention",
    "attention_stats",
    "attention_weights",
    "attention_with_stats",
    "available_backends",
    "distributed",
    "explain",
    "models",
    "quantize_kv",
    "reference",
    "sinusoidal_positions",
]
