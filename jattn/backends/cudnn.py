"""The cuDNN backend: `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA's
fused flash-attention kernel, used where the request fits what it supports.

jattn's promises are kept around it: rows that no key may attend (padded queries,
empty key sets) come out as zeros, as in every jattn backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.backends.contract import Backend
from jattn.call import AttentionCall

NAME = "cudnn"

# What jax.nn's cuDNN path accepts (jax/_src/cudnn/fused_attention_stablehlo.py):
# fp16/bf16, head dim a multiple of 8 and at most 128 (256 on Hopper; we keep the
# bound that holds on every GPU), equal q/k/v head dims.
MAX_HEAD_DIM = 128


SUPPORTS = frozenset({
    "bias", "causal", "local_window", "query_seq_lengths", "key_value_seq_lengths",
    "return_residual",
})


def limits(call: AttentionCall, platform: str) -> str | None:
    """What jax.nn's cuDNN path cannot do beyond the features it lacks."""
    s = call.shape
    if platform != "gpu":
        return f"needs an NVIDIA GPU (platform is {platform})"
    if call.query.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs bfloat16 or float16 inputs; got {call.query.dtype}"
    if s["H"] % 8 or s["H"] > MAX_HEAD_DIM or s["Hv"] != s["H"]:
        return (f"needs a head dim that is a multiple of 8, at most {MAX_HEAD_DIM}, and the "
                f"same for values; got H={s['H']}, Hv={s['Hv']}")
    if call.local_window_size is not None:
        left, right = call.local_window_size
        if right != 0 and not call.is_causal:
            return "its sliding window has no right side unless the mask is also causal"
        if s["T"] - 1 - left >= s["S"]:
            return "rows past S + left would have no key; cuDNN's result there is undefined"
    if call.bias is not None:
        _, _, bT, bS = call.bias.shape
        if (bT, bS) != (s["T"], s["S"]):
            return f"its bias must span [T, S] = {(s['T'], s['S'])}, not broadcast from {(bT, bS)}"
        if s["T"] % 2 or s["S"] % 2:
            return "with a bias it needs even T and S"
    return None


def run(call: AttentionCall, platform: str):
    """``(out, None, lse | None)`` from jax.nn's cuDNN kernel."""
    result = jax.nn.dot_product_attention(
        call.query, call.key, call.value, call.bias, None, scale=call.scale,
        is_causal=call.is_causal, query_seq_lengths=call.query_seq_lengths,
        key_value_seq_lengths=call.key_value_seq_lengths,
        local_window_size=call.local_window_size, implementation="cudnn",
        return_residual=call.return_residual,
    )
    out, lse = result if call.return_residual else (result, None)
    if call.query_seq_lengths is not None or call.key_value_seq_lengths is not None:
        # Rows without any key give zeros, as everywhere in jattn.
        B, T = out.shape[:2]
        row = jnp.arange(T)[None, :]
        has_key = jnp.ones((B, T), bool)
        if call.query_seq_lengths is not None:
            has_key &= row < call.query_seq_lengths[:, None]
        if call.key_value_seq_lengths is not None:
            has_key &= (call.key_value_seq_lengths > 0)[:, None]
        out = jnp.where(has_key[:, :, None, None], out, 0).astype(out.dtype)
        if lse is not None:
            lse = jnp.where(has_key[:, :, None], lse, -jnp.inf)
    return out, None, lse


BACKEND = Backend(
    name=NAME, supports=SUPPORTS, limits=limits, run=run,
    description="jax.nn.dot_product_attention(implementation='cudnn'): NVIDIA's fused kernel",
    lacks="jax.nn's cuDNN path has no {features}",
    # Under an explicit-axis mesh run in jax.shard_map like the Pallas kernels (jax.nn's
    # custom_partitioning rule serves GSPMD-sharded inputs, which types do not show).
    per_device=True,
)
