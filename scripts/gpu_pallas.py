"""In-process GPU timings of the Pallas backend against its peers, for a short device
lease.  ``python3 scripts/gpu_pallas.py [budget_s] [--dry-run]``.

Shapes as issue 3's GPU target: bf16, B=1, N=16, H=128.  Each row: jit, one warm-up
call (compile), then the median of 5 timed calls with block_until_ready.  FLOPs as in
experiments/benchmark.py (forward 4·B·N·T·S·H, halved when causal; forward+backward
3.5x forward).  Rows print as they finish and in priority order, so a stopped run
still reports what matters most; a failing case is a row, not a crash.  The summary
at the end gives each jattn row's speed-up over jax.nn xla measured in the same run.

``--dry-run`` (any machine): T=256 and the Pallas interpreter, to test the script.
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jattn
from jattn.attention import make_call
from jattn.backends import pallas

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
DRY = "--dry-run" in sys.argv
BUDGET_S = float(ARGS[0]) if ARGS else 300.0
START = time.perf_counter()
B, N, H = 1, 16, 128
PLATFORM = "cpu" if DRY else "gpu"
SIZES = (256, 128, 512) if DRY else (16384, 4096, 1024)
LONG, MID, SHORT = SIZES


def attention_fn(impl, causal, tiles=None, softcap=None):
    kw = {} if softcap is None else {"logits_soft_cap": softcap}
    if impl in ("jax.nn xla", "jax.nn cudnn"):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl.split()[1])
    if impl == "jattn pallas":
        t = tiles or pallas.DEFAULT_TILES
        return lambda q, k, v: pallas.run(make_call(q, k, v, is_causal=causal, **kw), PLATFORM, tiles=t)[0]
    impl_arg = None if impl == "jattn auto" else impl.split()[1]
    return lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl_arg, **kw)


def time_case(T, causal, mode, impl, tiles=None, softcap=None):
    ks = jax.random.split(jax.random.key(T), 3)
    q, k, v = (jax.random.normal(kk, (B, T, N, H), jnp.bfloat16) for kk in ks)
    f = attention_fn(impl, causal, tiles, softcap)
    if mode == "fwd":
        run = jax.jit(f)
    else:
        run = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
    jax.block_until_ready(run(q, k, v))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(run(q, k, v))
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    flops = 4 * B * N * T * T * H / (2 if causal else 1) * (3.5 if mode == "fwd+bwd" else 1.0)
    return ms, flops / (ms * 1e-3) / 1e12


def agreement(T, causal):
    """max |pallas - cudnn| (|pallas - dense| in a dry run) on the forward output."""
    ks = jax.random.split(jax.random.key(T), 3)
    q, k, v = (jax.random.normal(kk, (B, T, N, H), jnp.bfloat16) for kk in ks)
    ours = jax.jit(attention_fn("jattn pallas", causal))(q, k, v).astype(jnp.float32)
    peer = jax.jit(attention_fn("jattn dense" if DRY else "jax.nn cudnn", causal))(q, k, v).astype(jnp.float32)
    return float(jnp.max(jnp.abs(ours - peer))), float(jnp.max(jnp.abs(peer)))


TILE_SWEEP = [
    pallas.Tiles(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=2),
    pallas.Tiles(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=3),
    pallas.Tiles(128, 128, 64, 64, 64, 64, num_warps=8, num_stages=2),
    pallas.Tiles(64, 64, 64, 64, 64, 64, num_warps=4, num_stages=2),
    pallas.Tiles(128, 64, 128, 32, 32, 128, num_warps=8, num_stages=2),
    pallas.Tiles(128, 64, 64, 32, 32, 64, num_warps=4, num_stages=3),
    pallas.Tiles(128, 64, 128, 64, 64, 128, num_warps=8, num_stages=2),
]
PEERS = ("jax.nn xla",) if DRY else ("jax.nn xla", "jax.nn cudnn")

CASES = [  # (T, causal, mode, impl, tiles, softcap), in priority order
    *[(T, c, m, impl, None, None) for T in (LONG, MID) for c in (False, True) for m in ("fwd", "fwd+bwd")
      for impl in ("jattn pallas", *PEERS)],
    *[(LONG, False, "fwd", "jattn pallas", t, None) for t in TILE_SWEEP[1:4]],
    *[(LONG, False, "fwd+bwd", "jattn pallas", t, None) for t in TILE_SWEEP[4:]],
    *[(SHORT, c, m, impl, None, None) for c in (False, True) for m in ("fwd", "fwd+bwd")
      for impl in ("jattn pallas", "jattn dense", "jax.nn xla")],
    # Soft-capping (Gemma-style): cuDNN cannot; auto picks pallas, chunked is the alternative.
    *[(8192 if not DRY else LONG, True, "fwd+bwd", impl, None, 30.0) for impl in ("jattn auto", "jattn chunked")],
    (LONG, True, "fwd+bwd", "jattn chunked", None, None),
    *[(MID, True, "fwd+bwd", "jattn pallas", t, None) for t in TILE_SWEEP[4:]],
]


def main():
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; B={B} N={N} H={H} bf16", flush=True)
    for T, causal in ((MID, True), (MID, False)):
        try:
            err, scale = agreement(T, causal)
            print(f"agreement T={T} causal={causal}: max|pallas - peer| = {err:.3g} (max|peer| = {scale:.3g})", flush=True)
        except Exception as e:
            print(f"agreement T={T} causal={causal}: error {type(e).__name__}: {str(e)[:400]}", flush=True)
    print("| T | mask | mode | implementation | tiles | ms | TFLOP/s |\n|---|---|---|---|---|---|---|", flush=True)
    results = {}
    for T, causal, mode, impl, tiles, softcap in CASES:
        mask = ("causal" if causal else "none") + (f"+softcap{softcap:g}" if softcap else "")
        label = "default" if tiles is None else f"{tiles.block_q}x{tiles.block_kv}/{tiles.block_q_dq}x{tiles.block_kv_dq}/{tiles.block_q_dkv}x{tiles.block_kv_dkv} w{tiles.num_warps} s{tiles.num_stages}"
        if time.perf_counter() - START > BUDGET_S:
            print(f"| {T} | {mask} | {mode} | {impl} | {label} | skipped (budget) | |", flush=True)
            continue
        try:
            ms, tflops = time_case(T, causal, mode, impl, tiles, softcap)
            results[(T, mask, mode, impl, label)] = ms
            row = f"{ms:.3g} | {tflops:.0f}"
        except Exception as e:  # a failing case is a row, not a crash
            row = f"error: {type(e).__name__}: {str(e)[:300]} |"
        print(f"| {T} | {mask} | {mode} | {impl} | {label} | {row} |", flush=True)
    print("\nspeed-up over jax.nn xla, same run (>1 is faster):", flush=True)
    for (T, mask, mode, impl, label), ms in results.items():
        base = results.get((T, mask, mode, "jax.nn xla", "default"))
        if base and impl != "jax.nn xla":
            print(f"  T={T:6d} {mask:8s} {mode:8s} {impl:13s} {label:30s} {base / ms:5.2f}x", flush=True)
    print(f"total {time.perf_counter() - START:.0f} s", flush=True)


if __name__ == "__main__":
    main()
