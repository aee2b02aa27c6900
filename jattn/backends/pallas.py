"""The Pallas backend: jattn's own fused flash-attention kernels on NVIDIA GPUs.

It serves what cuDNN's kernel cannot while keeping the fused kernel's speed: logits
soft-capping, segment ids, causal and sliding-window masks shifted by ``query_offset``
(decoding), any GQA ratio, head dims up to 256 that are not multiples of 8, and flex
attention: any ``score_mod`` (ALiBi, relative biases, ``.then`` chains, user
functions), mask objects and ``mask_mod`` functions, an additive ``bias`` and dropout,
all evaluated tile by tile inside the kernels.  The kernels live in
`jattn.backends.flash_kernels`; this module maps an `AttentionCall` onto them: it pads
T and S to whole tiles and the head dim to a power of two, turns key lengths into a
per-key validity vector, a mask object into per-example visit lists and the flex
functions into kernel inputs (`jattn.backends.flex_tiles`), and zeroes rows past the
query lengths.
A kernel runs on one device's arrays (``per_device=True``): inputs split over batch /
heads of an explicit mesh are run in `jax.shard_map` by `jattn.backends.per_device`.

Example (on a CPU the same kernels run through the Pallas interpreter):
  >>> import jax.numpy as jnp
  >>> from jattn.attention import make_call
  >>> q = jnp.ones((1, 40, 2, 24)); kv = jnp.ones((1, 40, 1, 24))
  >>> out, _, lse = run(make_call(q, kv, kv, is_causal=True), "cpu")
  >>> out.shape
  (1, 40, 2, 24)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jattn import ops as ops_lib
from jattn.backends import flash_kernels as fk
from jattn.backends import flex_tiles
from jattn.backends import heads as H
from jattn.backends.heads import pad_axis
from jattn.backends.contract import Backend
from jattn.call import AttentionCall

NAME = "pallas"

MAX_HEAD_DIM = 256


Tiles = fk.Tiles

# The best of the sweep in scripts/gpu_pallas.py on an H200 (docs/benchmarks.md): at
# T=16384, H=128, bf16 it gave 379-395 TFLOP/s forward and 361-371 forward+backward;
# 8 warps or 3 stages helped the forward at most 2% and cost the backward up to 50%.
DEFAULT_TILES = Tiles()


SUPPORTS = frozenset({
    "causal", "local_window", "query_offset", "query_seq_lengths", "key_value_seq_lengths",
    "segment_ids", "logits_soft_cap", "return_residual", "differentiable_residual",
    "bias", "mask_mod", "score_mod", "dropout",
    # Dropout at a global (example, head) origin: a slice of a call sharded over batch /
    # heads (jattn.backends.per_device); not a row / key origin (see _dropout_seeds).
    "dropout_origin",
})


def limits(call: AttentionCall, platform: str) -> str | None:
    """What the kernels cannot do beyond the features they lack."""
    s = call.shape
    if platform != "gpu":
        return f"its kernels are compiled by Triton for NVIDIA GPUs (platform is {platform})"
    if (missing := fk.missing_pieces()) is not None:
        # E.g. a JAX whose Pallas dropped the Triton lowering (docs/benchmarks.md).
        return f"{missing}, which its Triton kernels need"
    if call.query.dtype not in (jnp.bfloat16, jnp.float16):
        return (f"needs bfloat16 or float16 inputs; got {call.query.dtype} (Triton's float32 "
                "dots round to TF32; chunked keeps float32 accuracy)")
    if s["Hv"] != s["H"] or s["H"] > MAX_HEAD_DIM:
        return f"needs equal query/value head dims of at most {MAX_HEAD_DIM}; got H={s['H']}, Hv={s['Hv']}"
    if (why := _flex_refusal(call)) is not None:
        return why
    if (why := _dropout_origin_refusal(call)) is not None:
        return why
    return None


def _flex_refusal(call: AttentionCall) -> str | None:
    """Why the kernels cannot take the call's mask / score functions, or None."""
    s = call.shape
    functions = [("mask", call.user_mask, True)]
    if call.user_score_mod is not None:
        functions.append(("score_mod", call.index_score_mod(), False))
    for name, fn, is_mask in functions:
        if fn is None:
            continue
        try:
            kernel_fn, _ = flex_tiles.kernel_function(*fn.batch_in_axes(s["B"], s["T"], s["S"]), is_mask=is_mask)
        except Exception as e:  # the kernels trace it for scalar indices (elementwise by contract)
            return f"its {name} cannot be traced for scalar indices ({type(e).__name__}: {str(e)[:200]})"
        if not is_mask and flex_tiles.looks_up_differentiable(kernel_fn):
            return ("its score_mod reads elements of a float array it would differentiate (a learned "
                    "table or Bias leaf): that gradient is a scatter-add Triton cannot lower here "
                    "(pass a [.., T, S] bias as bias=, or a constant table)")
    return None


def _band(call: AttentionCall) -> tuple[int | None, int | None]:
    """(left, right) of ``-left <= kv - (q + offset) <= right``; None is unbounded."""
    left = right = None
    if call.local_window_size is not None:
        left, right = call.local_window_size
    if call.is_causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _clip(tiles: Tiles, s) -> Tiles:
    """Tiles clipped to the sequences (a 40-row query uses 64-row tiles, not 128)."""
    clip_q, clip_kv = _pow2_at_least(s["T"]), _pow2_at_least(s["S"])
    return dataclasses.replace(
        tiles,
        block_q=min(tiles.block_q, clip_q), block_kv=min(tiles.block_kv, clip_kv),
        block_q_dq=min(tiles.block_q_dq, clip_q), block_kv_dq=min(tiles.block_kv_dq, clip_kv),
        block_q_dkv=min(tiles.block_q_dkv, clip_q), block_kv_dkv=min(tiles.block_kv_dkv, clip_kv),
    )


def spec_for(call: AttentionCall, tiles: Tiles = DEFAULT_TILES, *, interpret: bool = False,
             mask_fn=None, score_fn=None) -> fk.FlashSpec:
    """The kernels' static configuration for ``call`` (``mask_fn`` / ``score_fn``:
    its flex functions, from `flex_inputs`)."""
    s = call.shape
    left, right = _band(call)
    return fk.FlashSpec(
        scale=float(call.scale),
        offset=int(call.query_offset) if isinstance(call.query_offset, int) else 0,
        left=left, right=right, softcap=None if score_fn is not None else call.logits_soft_cap,
        seq_q=s["T"], seq_kv=s["S"], tiles=_clip(tiles, s), interpret=interpret,
        mask_fn=mask_fn, score_fn=score_fn, rate=float(call.dropout_rate),
    )


def _padded_bias(call: AttentionCall, Tp: int, Sp: int):
    """The bias as ``[1|B, 1|N, Tp, Sp]``: broadcast along T and S, zero-padded."""
    if call.bias is None:
        return None
    s = call.shape
    b, n = call.bias.shape[:2]
    bias = jnp.broadcast_to(call.bias, (b, n, s["T"], s["S"]))
    return pad_axis(pad_axis(bias, 2, Tp), 3, Sp)


def _dropout_origin_refusal(call: AttentionCall) -> str | None:
    """The kernels hash rows and keys from 0: a dropout origin may move the example and
    head indices only (what `jattn.backends.per_device` sets for a slice)."""
    origin = call.dropout_origin
    if call.dropout_rate == 0.0 or origin is None:
        return None
    if all(isinstance(o, int) and o == 0 for o in origin[2:]):
        return None
    return "its dropout hashes rows and keys from 0 (a dropout_origin with a row or key offset)"


def _dropout_seeds(call: AttentionCall):
    """uint32 ``[B, N]``: the `jattn.ops.dropout_seed` of every (example, head) key."""
    if call.dropout_rate == 0.0:
        return None
    s = call.shape
    b, n = jnp.arange(s["B"]), jnp.arange(s["N"])
    if call.dropout_origin is not None:  # a slice of a larger call: global indices
        if (why := _dropout_origin_refusal(call)) is not None:
            raise ValueError(f"implementation='pallas' cannot serve this call: {why}")
        b, n = b + call.dropout_origin[0], n + call.dropout_origin[1]
    seed = lambda b, n: ops_lib.dropout_seed(H.head_dropout_key(call.dropout_rng, b, n))
    return jax.vmap(jax.vmap(seed, in_axes=(None, 0)), in_axes=(0, None))(b, n)


def _visit_tables(call: AttentionCall, tiles: Tiles, Tp: int, Sp: int):
    """Visit lists of the forward, dQ and dK/dV kernels from the call's whole mask."""
    s = call.shape
    mask, axes = call.index_mask().batch_in_axes(s["B"], s["T"], s["S"])
    tables = []
    for bq, bk, transpose in ((tiles.block_q, tiles.block_kv, False), (tiles.block_q_dq, tiles.block_kv_dq, False),
                              (tiles.block_q_dkv, tiles.block_kv_dkv, True)):
        kinds = flex_tiles.tile_table(mask, axes, s["B"], s["T"], s["S"], bq, bk, (Tp // bq, Sp // bk))
        tables.append(flex_tiles.visit_lists(kinds.swapaxes(1, 2) if transpose else kinds))
    return tuple(tables)


def flex_inputs(call: AttentionCall, tiles: Tiles, Tp: int, Sp: int):
    """``(fk.Flex, mask_fn, score_fn)``: the call's bias, flex functions, dropout seeds
    and (with a mask object) visit lists, as kernel inputs."""
    s = call.shape
    mask_fn = score_fn = None
    mask_args = score_args = ()
    if call.user_score_mod is not None:
        score_mod, axes = call.index_score_mod().batch_in_axes(s["B"], s["T"], s["S"])
        score_fn, score_args = flex_tiles.kernel_function(score_mod, axes, is_mask=False)
    tables = None
    if call.user_mask is not None:
        mask, axes = call.user_mask.batch_in_axes(s["B"], s["T"], s["S"])
        mask_fn, mask_args = flex_tiles.kernel_function(mask, axes, is_mask=True)
        tables = _visit_tables(call, tiles, Tp, Sp)
    flex = fk.Flex(bias=_padded_bias(call, Tp, Sp), mask_args=mask_args, score_args=score_args,
                   seeds=_dropout_seeds(call), tables=tables)
    return flex, mask_fn, score_fn


def run(call: AttentionCall, platform: str, *, tiles: Tiles = DEFAULT_TILES, interpret: bool | None = None):
    """``(out [B, T, N, Hv], None, lse [B, T, N] | None)`` from the fused kernels.
    ``interpret`` defaults to True off a GPU (the Pallas interpreter, for tests)."""
    interpret = platform != "gpu" if interpret is None else interpret
    s = call.shape
    B, T, S, H = s["B"], s["T"], s["S"], s["H"]
    t = _clip(tiles, s)
    q_multiple = max(t.block_q, t.block_q_dq, t.block_q_dkv)  # all powers of two
    kv_multiple = max(t.block_kv, t.block_kv_dq, t.block_kv_dkv)
    Tp, Sp = -(-T // q_multiple) * q_multiple, -(-S // kv_multiple) * kv_multiple
    Hp = _pow2_at_least(H)
    flex, mask_fn, score_fn = flex_inputs(call, t, Tp, Sp)
    spec = spec_for(call, tiles, interpret=interpret, mask_fn=mask_fn, score_fn=score_fn)

    q = pad_axis(pad_axis(call.query, 1, Tp), 3, Hp)
    k = pad_axis(pad_axis(call.key, 1, Sp), 3, Hp)
    v = pad_axis(pad_axis(call.value, 1, Sp), 3, Hp)
    q_seg = kv_seg = kv_valid = None
    if call.segment_ids is not None:
        q_seg = pad_axis(jnp.broadcast_to(call.segment_ids[0], (B, T)).astype(jnp.int32), 1, Tp)
        kv_seg = pad_axis(jnp.broadcast_to(call.segment_ids[1], (B, S)).astype(jnp.int32), 1, Sp)
    if call.key_value_seq_lengths is not None:
        # Also 0 on padded keys, whatever the (possibly traced) lengths say.
        real_length = jnp.minimum(call.key_value_seq_lengths, S)
        kv_valid = (jnp.arange(Sp)[None, :] < real_length[:, None]).astype(jnp.int32)

    out, lse = fk.flash_attention(q, k, v, q_seg, kv_seg, kv_valid, flex, spec)
    out = out[:, :T, :, :H]
    lse = lse[:, :, :T].transpose(0, 2, 1)
    if call.query_seq_lengths is not None:
        # Rows past a query length attend nothing: zeros, as in every jattn backend.
        has_row = (jnp.arange(T)[None, :] < call.query_seq_lengths[:, None])[:, :, None]
        out = jnp.where(has_row[..., None], out, 0).astype(out.dtype)
        lse = jnp.where(has_row, lse, -jnp.inf)
    if call.return_residual and not call.differentiable_residual:
        lse = jax.lax.stop_gradient(lse)
    return out, None, (lse if call.return_residual else None)


BACKEND = Backend(
    name=NAME, supports=SUPPORTS, limits=limits, run=run,
    description="jattn's fused Pallas (Triton) flash-attention kernels for NVIDIA GPUs",
    lacks="its kernels have no {features} (chunked has)", per_device=True,
)
