"""In-process GPU timings of the Pallas backend against its peers, for a short device
lease.  ``PYTHONPATH=. python3 scripts/gpu_pallas.py [budget_s] [--dry-run]`` (from the
repository root, or with jattn installed).

Shapes as issue 3's GPU target: bf16, B=1, N=16, H=128, plus decoding rows.  Each
row: jit, one warm-up call (compile), then the median of 5 samples timed as the
benchmark experiment times them (`experiments.benchmark.time_calls`: calls under
10 ms are looped within a sample).  FLOPs by the benchmark's convention
(`experiments.benchmark.attention_flops`: forward 4·B·N·T·S·H, halved when causal
self-attention; forward+backward 3.5x forward).  Rows print as they finish and in priority order, so a stopped run
still reports what matters most; a failing case is a row, not a crash.  The summary
at the end gives each jattn row's speed-up over jax.nn xla measured in the same run.

Flex rows first (issue 13): at T=4096, causal, the fused kernels against chunked on
plain causal attention and with ALiBi, a learned relative-position table (closed over
as a constant: its gradient is not taken), a document mask_mod, soft-capping and
dropout 0.1, forward and forward+backward.  The whole table, flex rows included, is
one markdown table; ``--flex`` stops after the flex rows.

``--dry-run`` (any machine): T=256 and the Pallas interpreter, to test the script.
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jattn
from experiments.benchmark import attention_flops, time_calls
from jattn.attention import make_call
from jattn.backends import pallas

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
DRY = "--dry-run" in sys.argv
FLEX_ONLY = "--flex" in sys.argv
BUDGET_S = float(ARGS[0]) if ARGS else 300.0
START = time.perf_counter()
B, N, H = 1, 16, 128
PLATFORM = "cpu" if DRY else "gpu"
SIZES = (256, 128, 512) if DRY else (16384, 4096, 1024)
LONG, MID, SHORT = SIZES


def attention_fn(impl, causal, tiles=None, **kw):
    """``f(q, k, v)`` for one implementation; ``kw`` are extra jattn arguments."""
    if impl in ("jax.nn xla", "jax.nn cudnn"):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl.split()[1])
    if impl == "jattn pallas":
        t = tiles or pallas.DEFAULT_TILES
        return lambda q, k, v: pallas.run(make_call(q, k, v, is_causal=causal, **kw), PLATFORM, tiles=t)[0]
    impl_arg = None if impl == "jattn auto" else impl.split()[1]
    return lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl_arg, **kw)


def flex_kwargs(name, T):
    """jattn arguments of a flex row (plain: none beyond causal)."""
    if name == "alibi":
        return {"score_mod": jattn.score_mods.ALiBi(num_heads=N)}
    if name == "relbias":  # a learned table (here a constant), 33 relative positions per head
        table = jnp.linspace(-1.0, 1.0, N * 33).reshape(N, 33)
        return {"score_mod": lambda s, h, i, j: s + table[h, jnp.clip(j - i, -16, 16) + 16]}
    if name == "document":  # packed documents of ~T/8 tokens, ids closed over by the mask_mod
        docs = jnp.arange(T, dtype=jnp.int32) * 8 // T
        return {"mask": lambda i, j: docs[i] == docs[j]}
    if name == "softcap":
        return {"logits_soft_cap": 30.0}
    if name == "dropout0.1":
        return {"dropout_rate": 0.1, "dropout_rng": jax.random.key(0)}
    assert name == "plain", name
    return {}


def _inputs(T, S=None, b=B, n=N, kv_heads=None):
    ks = jax.random.split(jax.random.key(T), 3)
    S = T if S is None else S
    kv_heads = n if kv_heads is None else kv_heads
    return (jax.random.normal(ks[0], (b, T, n, H), jnp.bfloat16),
            jax.random.normal(ks[1], (b, S, kv_heads, H), jnp.bfloat16),
            jax.random.normal(ks[2], (b, S, kv_heads, H), jnp.bfloat16))


def time_case(T, causal, mode, impl, tiles=None, softcap=None, shape=None):
    """(ms, TFLOP/s).  ``shape``: dict(S=, b=, n=, kv_heads=, offset=) for decoding rows,
    or dict(flex=name) for a flex row."""
    shape = dict(shape or {})
    offset = shape.pop("offset", 0)
    flex = shape.pop("flex", None)
    q, k, v = _inputs(T, **shape)
    kw = {} if softcap is None else {"logits_soft_cap": softcap}
    if flex is not None:
        kw.update(flex_kwargs(flex, T))
    if offset:
        kw["query_offset"] = offset
    f = attention_fn(impl, causal, tiles, **kw)
    if mode == "fwd":
        run = jax.jit(f)
    else:
        run = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
    ms = statistics.median(time_calls(run, (q, k, v), warmups=1, repeats=5)) * 1e3
    b, _, n, _ = q.shape
    S = k.shape[1]
    flops = attention_flops(B=b, N=n, T=T, S=S, H=H, causal=causal and S == T, mode=mode)
    return ms, flops / (ms * 1e-3) / 1e12


def agreement(T, causal):
    """max |pallas - cudnn| (|pallas - dense| in a dry run) on the forward output."""
    q, k, v = _inputs(T)
    ours = jax.jit(attention_fn("jattn pallas", causal))(q, k, v).astype(jnp.float32)
    peer = jax.jit(attention_fn("jattn dense" if DRY else "jax.nn cudnn", causal))(q, k, v).astype(jnp.float32)
    return float(jnp.max(jnp.abs(ours - peer))), float(jnp.max(jnp.abs(peer)))


TILE_SWEEP = [
    pallas.Tiles(128, 128, 64, 64, 64, 64, num_warps=8, num_stages=2),
    pallas.Tiles(128, 64, 64, 64, 64, 64, num_warps=8, num_stages=2),
    pallas.Tiles(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=3),
]
PEERS = ("jax.nn xla",) if DRY else ("jax.nn xla", "jax.nn cudnn")
# Decoding: 8 sequences, one (or 16 speculative) new queries after a cache of S keys, GQA 32/8.
DECODE_S = 1024 if DRY else 8192
DECODE = [(t, dict(S=DECODE_S, b=8, n=32, kv_heads=8, offset=DECODE_S - t)) for t in (1, 16)]

FLEX = ("plain", "alibi", "relbias", "document", "softcap", "dropout0.1")
FLEX_CASES = [(MID, True, m, impl, None, None, {"flex": name}) for name in FLEX for m in ("fwd", "fwd+bwd")
              for impl in ("jattn pallas", "jattn chunked")]

CASES = FLEX_CASES + ([] if FLEX_ONLY else [  # (T, causal, mode, impl, tiles, softcap, shape), in priority order
    # Re-measured with looped samples: the first run's T=4096 causal and T=1024 forward rows.
    *[(MID, True, "fwd", impl, None, None, None) for impl in ("jattn pallas", *PEERS)],
    *[(SHORT, c, m, impl, None, None, None) for c in (False, True) for m in ("fwd", "fwd+bwd")
      for impl in ("jattn pallas", "jattn dense", "jax.nn xla")],
    # Decoding: one program per (sequence, head) walks all S keys; dense spreads S.
    *[(t, True, "fwd", impl, None, None, d) for t, d in DECODE
      for impl in ("jattn pallas", "jattn dense", "jattn chunked")],
    # The long rows again (same run baseline) and tile variants.
    *[(LONG, c, m, impl, None, None, None) for c in (False, True) for m in ("fwd", "fwd+bwd")
      for impl in ("jattn pallas", *PEERS)],
    *[(LONG, False, m, "jattn pallas", t, None, None) for m in ("fwd", "fwd+bwd") for t in TILE_SWEEP],
])


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
    for T, causal, mode, impl, tiles, softcap, shape in CASES:
        mask = ("causal" if causal else "none") + (f"+softcap{softcap:g}" if softcap else "")
        if shape and "flex" in shape:
            mask += f"+{shape['flex']}"
        elif shape:
            mask += f" decode S={shape['S']} B={shape['b']} N={shape['n']} K={shape['kv_heads']}"
        label = "default" if tiles is None else f"{tiles.block_q}x{tiles.block_kv}/{tiles.block_q_dq}x{tiles.block_kv_dq}/{tiles.block_q_dkv}x{tiles.block_kv_dkv} w{tiles.num_warps} s{tiles.num_stages}"
        if time.perf_counter() - START > BUDGET_S:
            print(f"| {T} | {mask} | {mode} | {impl} | {label} | skipped (budget) | |", flush=True)
            continue
        try:
            ms, tflops = time_case(T, causal, mode, impl, tiles, softcap, shape)
            results[(T, mask, mode, impl, label)] = ms
            row = f"{ms:.3g} | {tflops:.0f}"
        except Exception as e:  # a failing case is a row, not a crash
            row = f"error: {type(e).__name__}: {str(e)[:300]} |"
        print(f"| {T} | {mask} | {mode} | {impl} | {label} | {row} |", flush=True)
    print("\nflex rows: pallas speed-up over chunked, same run (>1 is faster):", flush=True)
    for (T, mask, mode, impl, label), ms in results.items():
        base = results.get((T, mask, mode, "jattn chunked", label))
        if "+" in mask and impl == "jattn pallas" and base:
            print(f"  T={T:6d} {mask:20s} {mode:8s} {base / ms:5.2f}x", flush=True)
    print("\nspeed-up over jax.nn xla, same run (>1 is faster):", flush=True)
    for (T, mask, mode, impl, label), ms in results.items():
        base = results.get((T, mask, mode, "jax.nn xla", "default"))
        if base and impl != "jax.nn xla":
            print(f"  T={T:6d} {mask:8s} {mode:8s} {impl:13s} {label:30s} {base / ms:5.2f}x", flush=True)
    print(f"total {time.perf_counter() - START:.0f} s", flush=True)


if __name__ == "__main__":
    main()
