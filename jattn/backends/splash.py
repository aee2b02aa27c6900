"""The splash backend: JAX's block-sparse splash attention kernels on TPUs.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) is a Pallas
Mosaic flash-attention kernel for TPUs that skips the blocks a static mask empties and
evaluates the mask only on the blocks it cuts.  This module maps an `AttentionCall`
onto it:

- the call's causal band, sliding window and mask object become one static splash
  mask (`jattn.backends.splash_masks`: never a ``[T, S]`` array except for ``Dense``),
  compiled once per (mask, shape, block sizes) with the kernels (``_kernels``);
- T and S are padded to whole blocks (multiples of 128, splash's lane width);
  padded keys are masked off, padded query rows are dropped;
- segment ids and key lengths are data: both become splash's per-example segment ids
  (a key past its example's length gets an id no query has);
- the query is multiplied by ``scale`` (splash applies none); GQA/MQA map query head
  ``n`` to kv head ``n // G`` as in jattn; soft-capping is splash's own;
- jattn's numerics policy, which splash does not keep: a row with no allowed key
  returns zeros, zero gradients and lse ``-inf`` (splash returns NaN or the mean of
  masked values there).  Which rows have a key is known statically from the mask and
  the key lengths (`splash_masks.first_allowed_keys`) when there are no segment ids;
  with segment ids, or when the log-sum-exp is asked for, it is read off splash's
  log-sum-exp (natural log, like jattn's), which is at most ``MASK_VALUE / 2`` there.

Splash's kernel that returns the log-sum-exp has no gradient, so that path wraps it in
a ``custom_vjp`` whose backward pass differentiates the plain kernel (one more forward
pass, in the backward only).  The returned lse carries no gradient (as
`jattn.dot_product_attention` returns it).

On a CPU the same kernels run through the Pallas interpreter (``run(call, "cpu")``),
which is how the tests check them; automatic dispatch uses splash on TPUs only.

Example:
  >>> import jax.numpy as jnp
  >>> from jattn.attention import make_call
  >>> q = jnp.ones((1, 40, 2, 8)); kv = jnp.ones((1, 40, 1, 8))
  >>> out, _, lse = run(make_call(q, kv, kv, is_causal=True, return_residual=True), "cpu")
  >>> out.shape, lse.shape
  ((1, 40, 2, 8), (1, 40, 2))
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jattn import masks as masks_lib
from jattn.backends.heads import pad_axis
from jattn.backends import splash_masks
from jattn.backends.contract import Backend
from jattn.call import AttentionCall

try:  # see splash_masks: guarded so that jattn imports without it
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sa_kernel
except ImportError:  # pragma: no cover
    sa = sa_kernel = None

NAME = "splash"

LANES = 128  # splash's blocks are whole multiples of the TPU lane width
DEFAULT_BLOCKS = (512, 512)  # (block_q, block_kv) before clipping to the sequences; unmeasured
# The logit of a masked pair inside the kernel (finite, as jattn's policy asks); a row
# whose log-sum-exp is below half of it attended no key.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
EMPTY_ROW_LSE = 0.5 * MASK_VALUE

SUPPORTS = frozenset({
    "causal", "local_window", "query_offset", "query_seq_lengths", "key_value_seq_lengths",
    "segment_ids", "mask_mod", "logits_soft_cap", "return_residual",
})

DTYPES = (jnp.float32, jnp.bfloat16)


def _round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def static_mask(call: AttentionCall):
    """The call's masks known at trace time (causal band, window, mask object) combined
    with ``&``; segment ids and lengths are data and stay out of it."""
    causal = window = None
    if call.is_causal:
        causal = masks_lib.Causal(call.query_offset)
    if call.local_window_size is not None:
        window = masks_lib.SlidingWindow(*call.local_window_size, offset=call.query_offset)
    return masks_lib.combine(causal, window, call.user_mask)


def serves(call: AttentionCall) -> str | None:
    """Why the kernels cannot serve ``call`` on any platform (the interpreter included),
    or None."""
    if sa is None:
        return "this jax has no splash attention (jax.experimental.pallas.ops.tpu.splash_attention)"
    if call.query.dtype not in DTYPES:
        return f"needs float32 or bfloat16 inputs; got {call.query.dtype}"
    if (why := splash_masks.why_not_static(static_mask(call))) is not None:
        return f"its mask must be known at trace time: {why}"
    return None


def limits(call: AttentionCall, platform: str) -> str | None:
    """What splash cannot do beyond the features it lacks."""
    if platform != "tpu":
        return f"its Mosaic kernels run on TPUs only (platform is {platform})"
    return serves(call)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about a splash call: the mask, the (padded) shape, the tiles.

    ``shape = (Tp, Sp)`` is padded to whole blocks; ``seq = (T, S)`` are the real lengths.
    """

    mask_key: tuple
    shape: tuple[int, int]
    seq: tuple[int, int]
    num_heads: int
    blocks: tuple[int, int]
    soft_cap: float | None
    interpret: bool


def plan_for(call: AttentionCall, *, interpret: bool) -> Plan:
    """The `Plan` of ``call``: tiles from ``call.block_sizes`` (default `DEFAULT_BLOCKS`),
    rounded up to multiples of 128 and clipped to the padded sequences."""
    s = call.shape
    want_q, want_kv = call.block_sizes or DEFAULT_BLOCKS
    block_q = min(_round_up(want_q, LANES), _round_up(s["T"], LANES))
    block_kv = min(_round_up(want_kv, LANES), _round_up(s["S"], LANES))
    return Plan(
        mask_key=splash_masks.static_key(static_mask(call)),
        shape=(_round_up(s["T"], block_q), _round_up(s["S"], block_kv)),
        seq=(s["T"], s["S"]),
        num_heads=s["N"],
        blocks=(block_q, block_kv),
        soft_cap=call.logits_soft_cap,
        interpret=interpret,
    )


@functools.lru_cache(maxsize=64)
def _kernels(plan: Plan):
    """``(plain, with_lse)``: splash kernels for one example ``q [N, Tp, H]``,
    ``k [K, Sp, H]``, ``v [K, Sp, Hv]``; ``plain`` has splash's gradient, ``with_lse``
    also returns the log-sum-exp ``[N, Tp]`` and has none.  Built (the mask read block
    by block, three times: forward, dQ, dK/dV) once per plan."""
    T, S = plan.seq
    mask = splash_masks.to_splash(plan.mask_key, plan.shape)
    if splash_masks.sees_keys_beyond(mask, T, S):
        mask = mask & splash_masks.IndexBox(plan.shape, None, S)
    bq, bkv = plan.blocks
    # One tile shape for all three kernels: a row block that the forward pass skips
    # entirely (its output NaN) is then skipped by the backward passes too.
    blocks = sa.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
        block_q_dq=bq, block_kv_dq=bkv,
    )
    # Concrete mask tables even when first built inside a jit (they are cached).
    with jax.ensure_compile_time_eval():
        plain = sa.make_splash_mha_single_device(
            sa.MultiHeadMask([mask] * plan.num_heads), block_sizes=blocks, save_residuals=False,
            mask_value=MASK_VALUE, attn_logits_soft_cap=plan.soft_cap, interpret=plan.interpret,
        )
    with_lse = sa_kernel.SplashAttentionKernel(
        plain.fwd_mask_info, None, None, **{**plain.kwargs, "save_residuals": True}
    )
    return plain, with_lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend_with_lse(plan: Plan, q, k, v, segment_ids):
    """Batched ``(out [B, N, Tp, Hv], lse [B, N, Tp])``; differentiable in q, k, v."""
    _, with_lse = _kernels(plan)
    out, (lse,) = jax.vmap(with_lse)(q, k, v, segment_ids)
    return out, lse


def _attend_with_lse_fwd(plan, q, k, v, segment_ids):
    return _attend_with_lse(plan, q, k, v, segment_ids), (q, k, v, segment_ids)


def _attend_with_lse_bwd(plan, residuals, cotangents):
    q, k, v, segment_ids = residuals
    d_out, _ = cotangents  # the lse is returned without gradient
    plain, _ = _kernels(plan)
    _, vjp = jax.vjp(lambda q, k, v: jax.vmap(plain)(q, k, v, segment_ids), q, k, v)
    return (*vjp(d_out), None)


_attend_with_lse.defvjp(_attend_with_lse_fwd, _attend_with_lse_bwd)


def _splash_segment_ids(segment_ids, kv_lengths, plan: Plan):
    """Splash's per-example ``SegmentIds(q [B, Tp], kv [B, Sp])`` for the call's segment
    ids (``([B, T], [B, S])`` or None) and key lengths (``[B]`` or None), or None.  A
    key at or past its example's length gets an id that no query of that example has:
    one below the smallest query id (one above the largest when the smallest is the
    int32 minimum)."""
    if segment_ids is None and kv_lengths is None:
        return None
    (Tp, Sp), S = plan.shape, plan.seq[1]
    if segment_ids is None:
        B = kv_lengths.shape[0]
        q_ids, kv_ids = jnp.zeros((B, Tp), jnp.int32), jnp.zeros((B, Sp), jnp.int32)
        real = q_ids
    else:
        real = segment_ids[0].astype(jnp.int32)
        q_ids = pad_axis(real, 1, Tp)
        kv_ids = pad_axis(segment_ids[1].astype(jnp.int32), 1, Sp)
    if kv_lengths is not None:
        low, high = real.min(axis=1), real.max(axis=1)
        unused = jnp.where(low > jnp.iinfo(jnp.int32).min, low - 1, high + 1)
        valid = jnp.arange(Sp)[None, :] < jnp.minimum(kv_lengths, S)[:, None]
        kv_ids = jnp.where(valid, kv_ids, unused[:, None])
    return sa.SegmentIds(q_ids, kv_ids)


@functools.partial(jax.jit, static_argnames=("plan", "scale", "return_residual"))
def _run_planned(plan: Plan, query, key, value, segment_ids, kv_lengths, q_lengths, *,
                 scale: float, return_residual: bool):
    """`run` after planning, as one jitted function: the NaN splash computes for a row
    block without keys never leaves it (so ``jax_debug_nans`` sees none outside jit
    either).  Shapes as `run`'s; ``segment_ids`` a pair ``([B, T], [B, S])`` or None,
    the lengths ``[B]`` or None."""
    (T, S), (Tp, Sp) = plan.seq, plan.shape
    dtype = query.dtype
    q = (query.astype(jnp.float32) * scale).astype(dtype)
    q = pad_axis(q.transpose(0, 2, 1, 3), 2, Tp)  # [B, N, Tp, H]
    k = pad_axis(key.transpose(0, 2, 1, 3), 2, Sp)  # [B, K, Sp, H]
    v = pad_axis(value.transpose(0, 2, 1, 3), 2, Sp)  # [B, K, Sp, Hv]
    splash_ids = _splash_segment_ids(segment_ids, kv_lengths, plan)

    if return_residual or segment_ids is not None:
        out, lse = _attend_with_lse(plan, q, k, v, splash_ids)
        lse = jax.lax.stop_gradient(lse[:, :, :T].transpose(0, 2, 1))  # [B, T, N]
        has_key = lse > EMPTY_ROW_LSE  # False for NaN too
    else:
        plain, _ = _kernels(plan)
        out = jax.vmap(plain)(q, k, v, splash_ids)
        first = splash_masks.first_allowed_keys(plan.mask_key, plan.shape, S)[:T]
        limit = S if kv_lengths is None else jnp.minimum(kv_lengths, S)[:, None]
        has_key = (jnp.asarray(first)[None, :] < limit)[:, :, None]  # [B or 1, T, 1]
    if q_lengths is not None:
        has_key = has_key & (jnp.arange(T)[None, :] < q_lengths[:, None])[:, :, None]
    out = out[:, :, :T].transpose(0, 2, 1, 3)  # [B, T, N, Hv]
    out = jnp.where(has_key[..., None], out, 0).astype(dtype)
    if not return_residual:
        return out, None
    return out, jnp.where(has_key, lse, -jnp.inf)


def run(call: AttentionCall, platform: str, *, interpret: bool | None = None):
    """``(out [B, T, N, Hv], None, lse [B, T, N] | None)`` from splash's kernels.
    ``interpret`` defaults to True off a TPU (the Pallas interpreter, for tests)."""
    if (why := serves(call)) is not None:
        raise ValueError(f"implementation='splash' cannot serve this call: {why}")
    interpret = platform != "tpu" if interpret is None else interpret
    out, lse = _run_planned(
        plan_for(call, interpret=interpret), call.query, call.key, call.value, call.segment_ids,
        call.key_value_seq_lengths, call.query_seq_lengths, scale=call.scale,
        return_residual=call.return_residual,
    )
    return out, None, lse


BACKEND = Backend(
    name=NAME, supports=SUPPORTS, limits=limits, run=run,
    description="JAX's block-sparse splash attention kernels (Pallas Mosaic) for TPUs",
    lacks="splash does not support {features} (chunked does)",
    per_device=True,  # a pallas_call has no partitioning rule
)
