"""Splitting one call of the torch-op engine across CPU threads.

torch parallelises each op internally, with a fork/join per op; at these tile sizes that costs
much of the second core, and collapses when the machine is busy. Instead each worker thread
runs whole parts of the problem with single-threaded ops (torch releases the GIL inside ops),
the way fused CPU kernels split work: by (batch, key/value head) when there are enough of them,
else by bands of query rows balanced by their visible keys.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..rules import key_spans
from .problem import Problem

__all__ = ["MIN_PARALLEL_SCORES", "Rect", "head_slices", "in_worker", "run_jobs", "split"]

MIN_PARALLEL_SCORES = 1 << 24  # below this many scores a call runs in the calling thread
# Key/value heads a worker computes together (one batched GEMM): fewer keep a tile of scores in
# the core's own cache, more amortise the per-op Python cost.
KV_HEADS_PER_PART = 8

Rect = tuple[int, int, int, int, int, int]  # b0, b1, kh0, kh1, r0, r1

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0  # a forked child inherits the pool object but none of its threads
_pool_lock = threading.Lock()
_worker = threading.local()


def _init_worker() -> None:
    torch.set_num_threads(1)  # per-thread setting (OpenMP/MKL thread-local): others keep theirs
    _worker.active = True


def in_worker() -> bool:
    """Whether the calling thread is one of the engine's workers."""
    return getattr(_worker, "active", False)


def run_jobs(fn: Callable[[Any], Any], jobs: list) -> list:
    """Run ``fn(job)`` for every job on the worker pool and return the results in order."""
    global _pool, _pool_size, _pool_pid
    with _pool_lock:
        if _pool is None or len(jobs) > _pool_size or os.getpid() != _pool_pid:
            _pool = ThreadPoolExecutor(
                len(jobs), thread_name_prefix="selfattn", initializer=_init_worker
            )
            _pool_size, _pool_pid = len(jobs), os.getpid()
        pool = _pool
    futures = [pool.submit(fn, job) for job in jobs]
    return [f.result() for f in futures]


def split(prob: Problem, nk: int) -> tuple[list[list[Rect]], bool] | None:
    """Per-thread lists of parts, and whether parts share key/value heads (a row split).

    None when the call should run in the calling thread.
    """
    spec = prob.spec
    threads = torch.get_num_threads()
    b, hkv, m = spec.B, spec.Hkv, spec.Nq
    if threads < 2 or in_worker():
        return None
    if b * spec.Hq * m * nk < MIN_PARALLEL_SCORES:
        return None
    units = b * hkv
    # By heads when they divide evenly and give each op several heads' worth of rows; else by
    # bands of rows, so each op still spans every head (a window over 4 heads: +15%).
    row_blocks = -(-m // prob.block_m())
    per_thread = units * spec.group // threads
    even = units >= threads and (units % threads == 0 or units >= 4 * threads)
    if even and (per_thread >= 4 or row_blocks < 2 * threads):
        jobs: list[list[Rect]] = []
        for t in range(threads):
            lo, hi = t * units // threads, (t + 1) * units // threads
            rects = []
            u = lo
            while u < hi:  # cut the run of units at batch boundaries
                bi, kh = divmod(u, hkv)
                end = min(hi, (bi + 1) * hkv, u + KV_HEADS_PER_PART)
                rects.append((bi, bi + 1, kh, kh + end - u, 0, m))
                u = end
            jobs.append(rects)
        return jobs, False
    # bands of rows with equal numbers of visible keys (causal bands are not equal in height)
    bm = prob.block_m()
    starts = list(range(0, m, bm))
    work = [sum(j1 - j0 for j0, j1, _ in key_spans(spec, i, min(i + bm, m), nk)) for i in starts]
    total = sum(work)
    if total == 0 or len(starts) < threads:
        return None
    jobs, acc, r0, t = [], 0, 0, 1
    for i, w in zip(starts, work):
        acc += w
        if acc >= total * t / threads and t < threads:
            end = min(i + bm, m)
            jobs.append([(0, b, 0, hkv, r0, end)])
            r0, t = end, t + 1
    jobs.append([(0, b, 0, hkv, r0, m)])
    jobs = [j for j in jobs if j[0][4] < j[0][5]]
    return (jobs, True) if len(jobs) > 1 else None


def head_slices(rect: Rect, g: int) -> tuple[slice, slice, slice, slice]:
    """Batch, query-head, key/value-head and row slices of a part."""
    b0, b1, kh0, kh1, r0, r1 = rect
    return slice(b0, b1), slice(kh0 * g, kh1 * g), slice(kh0, kh1), slice(r0, r1)
