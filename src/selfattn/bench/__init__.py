"""The benchmark room: FLOP counts and a timer (:mod:`.timing`), peak-memory measurement
(:mod:`.memory`); the sweep behind ``selfattn bench`` is :mod:`selfattn.bench.sweep`."""

from .memory import peak_memory_growth, peak_rss_bytes, reset_peak, rss_bytes
from .timing import Timing, attention_flops, time_fn

__all__ = [
    "Timing",
    "attention_flops",
    "peak_memory_growth",
    "peak_rss_bytes",
    "reset_peak",
    "rss_bytes",
    "time_fn",
]
