"""How a call is timed: compiled ahead, warmed up, then samples of back-to-back calls.

Also used by ``scripts/gpu_pallas.py``, so that its rows are timed as the
benchmark's are.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

# Shortest timed sample: faster calls are looped within one sample (see time_calls).
MIN_SAMPLE_S = 0.01


def time_calls(fn: Callable, args: tuple, warmups: int, repeats: int) -> list[float]:
    """Per-call seconds of ``repeats`` samples, after ``warmups`` untimed calls (at
    least one).  A sample loops enough calls to last `MIN_SAMPLE_S` (judged from the
    last warm-up) and waits for the last one, so sub-millisecond GPU calls are timed
    back to back, not through one host round trip each; a call longer than that is
    timed alone.

    Example:
      >>> import jax.numpy as jnp
      >>> times = time_calls(jnp.sin, (jnp.ones(4),), warmups=1, repeats=3)
      >>> len(times), min(times) > 0
      (3, True)
    """
    import jax

    for _ in range(max(warmups - 1, 0)):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(1, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return times


def timing_fields(times: list[float]) -> dict:
    """``times_ms``, ``median_ms`` and ``min_ms`` of per-call seconds."""
    return dict(
        times_ms=[t * 1e3 for t in times],
        median_ms=statistics.median(times) * 1e3,
        min_ms=min(times) * 1e3,
    )
