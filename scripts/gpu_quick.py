"""In-process GPU timings for a short device lease: chunked tile sizes and the rows
the full benchmark could not fit.  ``python3 scripts/gpu_quick.py [budget_s]``.

Each row: jit, one warm-up call (compile), then the median of 5 samples timed as
the benchmark times them (`experiments.benchmark.time_calls`); FLOPs by the
benchmark's convention (`experiments.benchmark.attention_flops`: forward
4·B·N·T·S·H, halved when causal; forward+backward 3.5x forward).  Rows print as they finish, so a
stopped run still reports what it measured.
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jattn
from experiments.benchmark import attention_flops, time_calls

BUDGET_S = float(sys.argv[1]) if len(sys.argv) > 1 else 80.0
START = time.perf_counter()
B, N, H = 1, 16, 128


def fn_for(impl, causal, blocks):
    if impl == "jax.nn xla":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    if impl == "jax.nn cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    kw = {"implementation": None if impl == "jattn auto" else "chunked"}
    if blocks:
        kw["block_sizes"] = blocks
    return lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=causal, **kw)


def time_case(T, causal, mode, impl, blocks=None):
    ks = jax.random.split(jax.random.key(T), 3)
    q, k, v = (jax.random.normal(kk, (B, T, N, H), jnp.bfloat16) for kk in ks)
    f = fn_for(impl, causal, blocks)
    if mode == "fwd":
        run = jax.jit(f)
    else:
        run = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
    ms = statistics.median(time_calls(run, (q, k, v), warmups=1, repeats=5)) * 1e3
    flops = attention_flops(B=B, N=N, T=T, S=T, H=H, causal=causal, mode=mode)
    return ms, flops / (ms * 1e-3) / 1e12


CASES = [  # in priority order: a stopped run keeps the most useful rows
    # The chunked backend after the accumulator fix and the static schedule, by tile size.
    *[(16384, c, "fwd+bwd", "jattn chunked", b) for c in (True, False) for b in ((1024, 1024), (2048, 2048), (4096, 1024))],
    # Rows the full benchmark's time budget cut: T=4096 causal forward+backward.
    *[(4096, True, "fwd+bwd", impl, None) for impl in ("jax.nn xla", "jax.nn cudnn", "jattn auto", "jattn chunked")],
    # The baseline again, on this machine.
    (16384, True, "fwd+bwd", "jax.nn xla", None),
    *[(16384, c, "fwd", "jattn chunked", b) for c in (True, False) for b in ((1024, 1024), (2048, 2048), (4096, 1024))],
    (16384, False, "fwd+bwd", "jax.nn xla", None),
]

print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; B={B} N={N} H={H} bf16", flush=True)
print("| T | mask | mode | implementation | tiles | ms | TFLOP/s |\n|---|---|---|---|---|---|---|", flush=True)
for T, causal, mode, impl, blocks in CASES:
    if time.perf_counter() - START > BUDGET_S:
        print(f"| {T} | {'causal' if causal else 'none'} | {mode} | {impl} | {blocks or ''} | skipped (budget) | |", flush=True)
        continue
    try:
        ms, tflops = time_case(T, causal, mode, impl, blocks)
        row = f"{ms:.3g} | {tflops:.0f}"
    except Exception as e:  # a failing case is a row, not a crash
        row = f"error: {type(e).__name__}: {str(e)[:80]} |"
    print(f"| {T} | {'causal' if causal else 'none'} | {mode} | {impl} | {blocks or 'default'} | {row} |", flush=True)
