"""The transformation matrix: `jattn.dot_product_attention` under JAX's and Flax NNX's
transformations, in every backend that runs on a CPU, with every feature.

* Backends: ``dense``; ``chunked`` with small tiles (`BLOCKS`: several tiles, some
  emptied by the masks); ``pallas`` through the Pallas interpreter behind the public
  entry point (`_on_cpu`: it refuses what the GPU backend refuses for the same call in
  bfloat16 and runs the interpreter with 16-wide tiles).  What pallas refuses must be
  refused cleanly, and never chosen by auto (`test_pallas_refuses_cleanly`).
* Features come in bundles (`BUNDLES`) applied together; distinct sizes (T=21, S=27,
  H=5, Hv=7, several N and K) make a swapped axis fail.
* A cell is (backend, transformations, bundle) (`CELLS`).  Compiling dominates the
  cost, so a cell composes several transformations (a structure: vmap, vmap of
  unbatched calls, lax.scan, nnx.scan; a jax.checkpoint policy; config modes) around
  one order of jit and reverse mode; `test_matrix_covers_every_pair` checks that every
  (backend, transformation) and every (backend, feature) pair has a cell.  ``grad`` is
  jax.grad of the attention call itself: eager for dense, compiled (jit∘grad) elsewhere.
* Every cell compares its outputs, and gradients where it has them, with dense's
  float32 result for the same bundle and structure without the structure's own
  transformation (`_expected`: dense under ``jit(value_and_grad)``; a Python loop for
  scans).  That baseline is checked against the float64 NumPy reference
  (`test_dense_baseline_matches_float64_reference`) and against dense's eager,
  untransformed value and gradient (the ``dense-grad+debug_nans`` cell); x64 cells
  also compare their float64 outputs with the reference at float64 tolerances.
* Forward mode (jvp, linearize) must work and agree with dense (whose tangent is
  checked against central differences and its own reverse mode), or raise an error of
  jattn's own naming forward mode and the backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
from typing import Any, Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jattn
from jattn import dispatch, masks, positional, score_mods
from jattn import nnx as jattn_nnx
from jattn.backends import chunked, pallas
from tests.reference import reference_attention

B, T, S, H = 2, 21, 27, 5
HV = {"dense": 7, "chunked": 7, "pallas": 5}  # pallas needs Hv == H
BLOCKS = (8, 8)  # chunked: 3 x 4 tiles
TILES = pallas.Tiles(block_q=16, block_kv=16, block_q_dq=16, block_kv_dq=16, block_q_dkv=16, block_kv_dkv=16)
LAYERS = 2


# Feature data.  Per-example arrays have a leading B axis (vmap over unbatched calls
# slices them); rows with no allowed key come from lengths, windows, segments and the
# mask function.
OFFSETS = np.array([2, 5])
PREFIX = np.array([4, 0])
Q_LENS = np.array([T, T - 6])
KV_LENS = np.array([S - 9, S - 2])
Q_SEG = np.stack([np.arange(T) * 3 // T, np.arange(T) * 2 // T]).astype(np.int32)
Q_SEG[0, -3:] = 3  # a segment no key belongs to
KV_SEG = np.stack([np.arange(S) * 3 // S, np.arange(S) * 2 // S]).astype(np.int32)
WINDOW, BAND_OFFSET = (5, 2), 3
SOFTCAP = 1.5
RATE = 0.3


def _normal(seed: int, shape, scale: float = 1.0, dtype=np.float32) -> jax.Array:
    """Random data from NumPy (no JAX compile per shape)."""
    return jnp.asarray((scale * np.random.default_rng(seed).standard_normal(shape, np.float32)).astype(dtype))


def _mask_fn(i, j):
    """A mask_mod with no structure to exploit; rows 3, 10 and 17 attend nothing."""
    return ((i + 2 * j) % 5 != 1) & (i % 7 != 3)


def _feature(name: str, N: int):
    """``(jattn kwargs, b -> tests.reference kwargs of example b)`` of one feature."""
    offsets = jnp.asarray(OFFSETS, jnp.int32)
    if name in ("plain", "gqa"):  # gqa is a bundle's (N, K)
        return {}, lambda b: {}
    if name == "causal":  # a per-example (array) offset
        return ({"is_causal": True, "query_offset": offsets},
                lambda b: {"is_causal": True, "query_offset": int(OFFSETS[b])})
    if name == "causal_int":
        return ({"is_causal": True, "query_offset": BAND_OFFSET},
                lambda b: {"is_causal": True, "query_offset": BAND_OFFSET})
    if name == "window":
        return ({"local_window_size": WINDOW, "query_offset": BAND_OFFSET},
                lambda b: {"window": WINDOW, "query_offset": BAND_OFFSET})
    if name == "mask_obj":  # mask objects with array leaves
        prefix = jnp.asarray(PREFIX, jnp.int32)
        mask = masks.SlidingWindow(6, 1, offset=offsets) & masks.PrefixLM(prefix, offset=offsets)
        return ({"mask": mask},
                lambda b: {"window": (6, 1), "prefix_length": int(PREFIX[b]), "query_offset": int(OFFSETS[b])})
    if name == "mask_fn":
        return {"mask": _mask_fn}, lambda b: {"mask_fn": _mask_fn}
    if name == "alibi":  # a score_mod with an array leaf (its per-example offset)
        slopes = tuple(positional.alibi_slopes(N))

        def score_fn(b):
            return lambda score, n, t, s: score - slopes[n] * abs(t + int(OFFSETS[b]) - s)

        return {"score_mod": score_mods.ALiBi(slopes=slopes, offset=offsets)}, lambda b: {"score_fn": score_fn(b)}
    if name == "bias":  # broadcast over heads; the reference takes it from the args
        return {"bias": _normal(13, (B, 1, T, S), 0.5)}, lambda b: {}
    if name == "dropout":  # the reference's pattern comes from `_dropout_keep`
        return {"dropout_rate": RATE, "dropout_rng": jax.random.key(77)}, lambda b: {}
    if name == "segments":
        return ({"query_segment_ids": jnp.asarray(Q_SEG), "key_value_segment_ids": jnp.asarray(KV_SEG)},
                lambda b: {"q_segments": Q_SEG[b:b + 1], "kv_segments": KV_SEG[b:b + 1]})
    if name == "lengths":
        return ({"query_seq_lengths": jnp.asarray(Q_LENS, jnp.int32),
                 "key_value_seq_lengths": jnp.asarray(KV_LENS, jnp.int32)},
                lambda b: {"q_lengths": int(Q_LENS[b]), "kv_lengths": int(KV_LENS[b])})
    if name == "softcap":
        return {"logits_soft_cap": SOFTCAP}, lambda b: {"softcap": SOFTCAP}
    raise AssertionError(name)


FEATURES = ("plain", "causal", "causal_int", "window", "mask_obj", "mask_fn", "alibi", "bias", "dropout",
            "segments", "lengths", "softcap", "gqa")


@dataclasses.dataclass(frozen=True)
class Bundle:
    features: tuple[str, ...]
    N: int
    K: int


BUNDLES = {
    "plain": Bundle(("plain",), 3, 3),
    "masks": Bundle(("causal", "mask_obj", "lengths", "gqa"), 6, 2),
    "packed": Bundle(("segments", "window", "softcap", "gqa"), 4, 1),
    "mods": Bundle(("alibi", "bias", "mask_fn", "gqa"), 6, 2),
    "dropout": Bundle(("dropout", "gqa"), 4, 2),
    # What pallas serves: index masks with int offsets, lengths, segments, soft-capping,
    # and flex attention (mask objects, mask_mod, score_mod, bias, dropout).
    "band": Bundle(("causal_int", "window", "softcap", "gqa"), 6, 2),
    "flex": Bundle(("mask_obj", "dropout", "gqa"), 4, 2),
    "ragged": Bundle(("segments", "lengths", "gqa"), 4, 1),
}

# Features pallas refuses, and words its refusal must contain.
PALLAS_REFUSES = {"causal": "query_offset"}


def _merge(into: dict, new: dict, where: str):
    for name, value in new.items():
        if name in into and not (into[name] is value or (isinstance(value, (int, tuple)) and into[name] == value)):
            raise AssertionError(f"bundle {where}: features disagree on {name}")
        into[name] = value


@dataclasses.dataclass(frozen=True)
class Case:
    """One bundle's inputs: args (q, k, v[, bias]), the other kwargs, a cotangent for
    the output, per-example reference kwargs."""

    args: tuple
    kwargs: dict
    cot: Any
    refs: tuple


@functools.lru_cache(maxsize=None)
def _case(name: str, hv: int) -> Case:
    bundle = BUNDLES[name]
    kwargs, refs = {}, [{} for _ in range(B)]
    for feature in bundle.features:
        kw, ref = _feature(feature, bundle.N)
        _merge(kwargs, kw, name)
        for b in range(B):
            _merge(refs[b], ref(b), name)
    seed = 100 * list(BUNDLES).index(name) + hv
    args = (_normal(seed, (B, T, bundle.N, H)), _normal(seed + 1, (B, S, bundle.K, H)),
            _normal(seed + 2, (B, S, bundle.K, hv)))
    if "bias" in kwargs:
        args += (kwargs.pop("bias"),)
    return Case(args, kwargs, _normal(seed + 3, (B, T, bundle.N, hv)), tuple(refs))


# ------------------------------------------------------------------ running backends
@contextlib.contextmanager
def _on_cpu(backend: str):
    """Within: ``implementation="pallas"`` runs jattn's kernels in the Pallas
    interpreter on the CPU, refusing exactly what the GPU backend refuses for the same
    call in bfloat16 (the kernels' dtypes).  Other backends run as they are."""
    if backend != "pallas":
        yield
        return
    real = dispatch.BACKENDS["pallas"]

    def as_bf16(call):
        return dataclasses.replace(call, **{n: getattr(call, n).astype(jnp.bfloat16)
                                            for n in ("query", "key", "value")})

    def run(call, platform):
        return pallas.run(call, "cpu", tiles=TILES)

    if hasattr(real, "limits"):  # a jattn.backends.contract.Backend
        shim = dataclasses.replace(real, limits=lambda call, platform: real.limits(as_bf16(call), "gpu"), run=run)
    else:  # a backend module
        shim = types.SimpleNamespace(NAME="pallas", refusal=lambda call, platform: real.refusal(as_bf16(call), "gpu"),
                                     run=run)
    with mock.patch.dict(dispatch.BACKENDS, {"pallas": shim}):
        yield


NO_REMAT = object()
POLICIES = {"remat": None, "remat_dots": jax.checkpoint_policies.dots_saveable,
            "remat_nothing": jax.checkpoint_policies.nothing_saveable}


def _attend(backend: str, kwargs: dict, policy=NO_REMAT):
    """``f(q, k, v, bias, extra)``: attention with ``kwargs`` and the per-call ``extra``
    (arrays and mask / score_mod objects only: jax.checkpoint and vmap trace it)."""
    fixed = dict(kwargs, implementation=backend)
    if backend == "chunked":
        fixed["block_sizes"] = BLOCKS

    def f(q, k, v, bias, extra):
        return jattn.dot_product_attention(q, k, v, bias, **{**fixed, **extra})

    return f if policy is NO_REMAT else jax.checkpoint(f, policy=policy)


def _split_per_example(kwargs: dict):
    """(kwargs whose every leaf has a leading B axis, the rest)."""
    per, shared = {}, {}
    for name, value in kwargs.items():
        leaves = jax.tree_util.tree_leaves(value)
        batched = leaves and all(isinstance(x, jax.Array) and x.ndim >= 1 and x.shape[0] == B for x in leaves)
        (per if batched else shared)[name] = value
    return per, shared


def _bias(args):
    return args[3] if len(args) > 3 else None


def _cast(tree, dtype):
    """Float leaves to ``dtype``, on the host (an eager cast would compile per shape)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x).astype(dtype)) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@dataclasses.dataclass(frozen=True)
class Problem:
    """``build(make)`` -> a function of ``args`` around attention functions
    ``make(kwargs)``; ``cot`` is the cotangent of its output.  ``build(make,
    unrolled=True)`` is the same without the structure's own transformation (the scan
    as a Python loop)."""

    build: Callable
    args: tuple
    cot: Any


@functools.lru_cache(maxsize=None)
def _problem(name: str, hv: int, structure: str, x64: bool) -> Problem:
    c = _case(name, hv)
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        if structure == "plain":
            def build(make, unrolled=False):
                f = make(c.kwargs)
                return lambda *a: f(*a[:3], _bias(a), {})
            return Problem(build, _cast(c.args, dtype), _cast(c.cot, dtype))
        if structure in ("vmap", "vmap_unbatched"):
            assert "dropout_rng" not in c.kwargs, "dropout patterns depend on the batch index"
            per, shared = _split_per_example(c.kwargs)
        if structure == "vmap":
            # vmap over two batched calls: the bundle and the bundle with its examples
            # (data and per-example kwargs alike) in reverse order.
            both = lambda x: jnp.asarray(np.stack([np.asarray(x), np.asarray(x)[::-1]]))
            per2 = jax.tree_util.tree_map(both, per)

            def build(make, unrolled=False):
                f = make(shared)
                return lambda *a: jax.vmap(lambda pe, *x: f(*x[:3], _bias(x), pe))(per2, *a)
            return Problem(build, _cast(tuple(map(both, c.args)), dtype), _cast(both(c.cot), dtype))
        if structure == "vmap_unbatched":  # vmap over B of unbatched [T, N, H] calls
            def build(make, unrolled=False):
                f = make(shared)
                return lambda *a: jax.vmap(lambda pe, *x: f(*x[:3], _bias(x), pe))(per, *a)
            return Problem(build, _cast(c.args, dtype), _cast(c.cot, dtype))
        if structure == "scan":  # LAYERS layers; the carry is q; per-layer weights and dropout keys
            w = _normal(5, (LAYERS, hv, H), 0.3)
            layer_keys = jax.random.split(jax.random.key(6), LAYERS)
            uses_dropout = "dropout_rng" in c.kwargs

            def build(make, unrolled=False):
                f = make(c.kwargs)

                def layer(q, w, key, k, v, bias):
                    extra = {"dropout_rng": key} if uses_dropout else {}
                    return q + jnp.einsum("btnv,vh->btnh", f(q, k, v, bias, extra), w)

                def model(q, k, v, w, *bias):
                    bias = bias[0] if bias else None
                    if unrolled:
                        for i in range(LAYERS):
                            q = layer(q, w[i], layer_keys[i], k, v, bias)
                        return q
                    return lax.scan(lambda q, xs: (layer(q, *xs, k, v, bias), None), q, (w, layer_keys))[0]
                return model
            cot = _normal(7, (B, T, BUNDLES[name].N, H))
            return Problem(build, _cast(c.args[:3] + (w,) + c.args[3:], dtype), _cast(cot, dtype))
    raise AssertionError(structure)


def _loss_and_out(g, cot):
    def loss(*args):
        out = g(*args)
        return jnp.sum(out * cot), out
    return loss


def _argnums(args):
    return tuple(range(len(args)))


def _differentiate(g, args, cot, order: str):
    """``(out, grads or None)`` of ``g`` under one order of jit and reverse mode."""
    if order == "jit":
        return jax.jit(g)(*args), None
    if order == "grad":
        (_, out), grads = jax.value_and_grad(_loss_and_out(g, cot), _argnums(args), has_aux=True)(*args)
    elif order == "grad_jit":
        (_, out), grads = jax.value_and_grad(_loss_and_out(jax.jit(g), cot), _argnums(args), has_aux=True)(*args)
    elif order == "jit_grad":
        (_, out), grads = jax.jit(jax.value_and_grad(_loss_and_out(g, cot), _argnums(args), has_aux=True))(*args)
    elif order == "vjp_jit":
        out, pullback = jax.vjp(jax.jit(g), *args)
        grads = pullback(cot)
    else:
        raise AssertionError(order)
    return out, grads


@functools.lru_cache(maxsize=None)
def _dense_value_and_grad(name: str, hv: int, structure: str):
    """Dense's ``jit(value_and_grad)`` for the problem without its own transformation."""
    prob = _problem(name, hv, structure, False)
    g = prob.build(functools.partial(_attend, "dense"), unrolled=True)
    return jax.jit(jax.value_and_grad(_loss_and_out(g, prob.cot), _argnums(prob.args), has_aux=True))


@functools.lru_cache(maxsize=None)
def _expected(name: str, hv: int, structure: str):
    """Dense's float32 ``(out, grads)`` for the problem, as NumPy arrays: the baseline
    every cell compares with."""
    if structure in ("vmap", "vmap_unbatched"):
        out, grads = _expected(name, hv, "plain")
        if structure == "vmap_unbatched":  # example b alone = example b of the batch
            return out, grads
        both = lambda x: np.stack([x, x[::-1]])
        return both(out), tuple(map(both, grads))
    (_, out), grads = _dense_value_and_grad(name, hv, structure)(*_problem(name, hv, structure, False).args)
    return jax.device_get((out, grads))


@functools.lru_cache(maxsize=None)
def _dropout_keep(name: str, hv: int):
    """The dropout pattern [B, N, T, S] (True = kept): where dense's weights for the
    same inputs and dropout, without masks, are non-zero.  It is a function of (key,
    example, head, row, column) only."""
    c = _case(name, hv)
    q, k, v = c.args[:3]
    _, weights = jax.jit(functools.partial(
        jattn.dot_product_attention, implementation="dense", dropout_rate=RATE,
        dropout_rng=c.kwargs["dropout_rng"], return_weights=True))(q, k, v)
    keep = np.asarray(weights) != 0
    assert 0.6 < keep.mean() < 0.8, keep.mean()
    return keep


def _reference(name: str, hv: int, args) -> np.ndarray:
    """The float64 NumPy reference of bundle ``name`` on ``args``, example by example."""
    c = _case(name, hv)
    q, k, v = (np.asarray(a, np.float64) for a in args[:3])
    bias = _bias(args)
    keep = _dropout_keep(name, hv) if "dropout_rng" in c.kwargs else None
    outs = []
    for b in range(B):
        ref = dict(c.refs[b])
        if bias is not None:
            ref["bias"] = np.asarray(bias[b:b + 1], np.float64)
        if keep is not None:
            ref.update(dropout_keep=keep[b:b + 1], dropout_rate=RATE)
        outs.append(reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], **ref)[0][0])
    return np.stack(outs)


# ---------------------------------------------------------------------- comparisons
def _close(actual, expected, what: str, rtol: float = 2e-5, atol: float = 2e-5):
    """assert_allclose with float32 tolerances (``atol`` scaled by the array's largest
    magnitude when that exceeds 1)."""
    actual = np.asarray(actual).astype(np.float64)
    expected = np.asarray(expected).astype(np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def _close_grads(grads, expected, what: str, structure: str = "plain", **tol):
    names = ["dq", "dk", "dv"] + (["dw"] if structure == "scan" else []) + ["dbias"]
    assert len(grads) == len(expected), (len(grads), len(expected))
    for label, g, w in zip(names, grads, expected):
        _close(g, w, f"{what} {label}", **tol)


# ------------------------------------------------------------------------ the cells
MODES = {
    "rank_raise": lambda: jax.numpy_rank_promotion("raise"),
    "dtype_strict": lambda: jax.numpy_dtype_promotion("strict"),
    "debug_nans": lambda: jax.debug_nans(True),
}
ORDERS = {"jit": "jit", "grad": "grad", "grad_jit": "grad_of_jit", "jit_grad": "jit_of_grad", "vjp_jit": "vjp_of_jit"}
TRANSFORMS = ("jit", "grad", "grad_of_jit", "jit_of_grad", "vjp_of_jit", "remat", "remat_dots", "remat_nothing",
              "scan", "nnx_scan_remat", "vmap", "vmap_unbatched", "eval_shape", "export", "jvp", "linearize",
              "rank_raise", "dtype_strict", "x64", "debug_nans")


@dataclasses.dataclass(frozen=True)
class Generic:
    """``structure`` (plain, vmap, vmap_unbatched, scan) around the attention call,
    jax.checkpoint-ed with ``remat`` (a key of POLICIES) if given, differentiated in
    ``order``, under config ``modes`` and, with ``x64``, `jax.enable_x64` (float64
    inputs, except for pallas, which keeps float32 ones)."""

    structure: str = "plain"
    remat: str | None = None
    order: str = "jit_grad"
    modes: tuple[str, ...] = ()
    x64: bool = False

    def covers(self) -> set[str]:
        covered = {ORDERS[self.order], *self.modes}
        if self.order == "jit_grad":  # jax.grad of the attention call itself (run compiled)
            covered.add("grad")
        if self.order in ("grad_jit", "vjp_jit"):
            covered.add("jit")
        if self.structure != "plain":
            covered.add(self.structure)
        if self.remat:
            covered.add(self.remat)
        if self.x64:
            covered.add("x64")
        return covered


@dataclasses.dataclass(frozen=True)
class Special:
    """A cell with its own code: eval_shape, export (+ eval_shape), jvp, linearize, nnx."""

    kind: str

    def covers(self) -> set[str]:
        return {
            "export": {"export", "jit", "eval_shape"},
            # nnx.scan is lax.scan, nnx.remat is jax.checkpoint.
            "nnx_scan_remat": {"nnx_scan_remat", "remat", "jit_of_grad", "grad"},
            "nnx_scan_remat_vjp_x64": {"nnx_scan_remat", "scan", "remat", "vjp_of_jit", "jit", "x64"},
        }.get(self.kind, {self.kind})


def _cells(plan):
    return [(backend, cell, spec, bundle) for backend, rows in plan.items() for cell, spec, bundle in rows]


CELLS = _cells({
    # Compiling dominates the cost, so a cell composes several transformations: per
    # backend one program for each order of jit and reverse mode, each with a structure
    # (vmap, vmap of unbatched calls, scan), a jax.checkpoint policy and config modes.
    "dense": [
        # eager (op by op), so it also checks the jitted baseline against the untransformed call
        ("grad+debug_nans", Generic(order="grad", modes=("debug_nans",)), "masks"),
        ("grad_of_jit+vmap+remat_nothing", Generic(structure="vmap", remat="remat_nothing", order="grad_jit"),
         "packed"),
        ("jit_of_grad+vmap_unbatched+remat_dots+x64",
         Generic(structure="vmap_unbatched", remat="remat_dots", x64=True), "mods"),
        ("vjp_of_jit+scan+rank_raise+dtype_strict",
         Generic(structure="scan", order="vjp_jit", modes=("rank_raise", "dtype_strict")), "dropout"),
        ("export+eval_shape", Special("export"), "plain"),
        ("jvp", Special("jvp"), "packed"),
        ("linearize", Special("linearize"), "mods"),
        ("nnx_scan_remat", Special("nnx_scan_remat"), None),
    ],
    "chunked": [
        ("grad_of_jit+vmap+remat_nothing+debug_nans",
         Generic(structure="vmap", remat="remat_nothing", order="grad_jit", modes=("debug_nans",)), "mods"),
        ("jit_of_grad+vmap_unbatched+remat_dots+x64",
         Generic(structure="vmap_unbatched", remat="remat_dots", x64=True), "masks"),
        ("vjp_of_jit+scan+rank_raise+dtype_strict",
         Generic(structure="scan", order="vjp_jit", modes=("rank_raise", "dtype_strict")), "dropout"),
        ("export+eval_shape", Special("export"), "packed"),
        ("jvp", Special("jvp"), "masks"),
        ("linearize", Special("linearize"), "plain"),
        ("nnx_scan_remat", Special("nnx_scan_remat"), None),
    ],
    "pallas": [
        ("grad_of_jit+vmap+remat_nothing+debug_nans",
         Generic(structure="vmap", remat="remat_nothing", order="grad_jit", modes=("debug_nans",)), "mods"),
        ("jit_of_grad+vmap_unbatched+remat_dots+rank_raise+dtype_strict",
         Generic(structure="vmap_unbatched", remat="remat_dots", modes=("rank_raise", "dtype_strict")), "band"),
        ("vjp_of_jit+nnx_scan_remat+x64", Special("nnx_scan_remat_vjp_x64"), None),
        ("export+eval_shape", Special("export"), "flex"),
        ("jvp", Special("jvp"), "plain"),
        ("linearize", Special("linearize"), "ragged"),
    ],
})


def _run_generic(backend: str, name: str, spec: Generic):
    hv = HV[backend]
    # Under x64, float64 inputs; pallas keeps float32 ones (it serves 16-bit inputs on a
    # GPU), its index arithmetic then runs in 64-bit mode.
    float64 = spec.x64 and backend != "pallas"
    prob = _problem(name, hv, spec.structure, float64)
    policy = POLICIES[spec.remat] if spec.remat else NO_REMAT
    with contextlib.ExitStack() as stack:
        stack.enter_context(_on_cpu(backend))
        if spec.x64:
            stack.enter_context(jax.enable_x64(True))
        for mode in spec.modes:
            stack.enter_context(MODES[mode]())
        g = prob.build(functools.partial(_attend, backend, policy=policy))
        out, grads = jax.device_get(_differentiate(g, prob.args, prob.cot, spec.order))
    # float64 results are compared with dense's float32 ones at float32 tolerances, and
    # their outputs with the float64 reference at float64 ones.
    want_out, want_grads = _expected(name, hv, spec.structure)
    assert out.dtype == (np.float64 if float64 else np.float32), out.dtype
    _close(out, want_out, f"{backend} out")
    if grads is not None:
        assert all(g_.dtype == out.dtype for g_ in grads), [g_.dtype for g_ in grads]
        _close_grads(grads, want_grads, backend, spec.structure)
    if float64 and spec.structure in ("plain", "vmap_unbatched"):
        _close(out, _reference(name, hv, prob.args), f"{backend} out vs the float64 reference", rtol=1e-9, atol=1e-9)


def _run_export(backend: str, name: str):
    """jax.eval_shape of the call and of its gradient, then jax.export of the jitted
    call, serialized with its VJP, deserialized and called back (value and gradient)."""
    hv = HV[backend]
    prob = _problem(name, hv, "plain", False)
    want_out, _ = _expected(name, hv, "plain")
    with _on_cpu(backend):
        g = prob.build(functools.partial(_attend, backend))
        shape = jax.eval_shape(g, *prob.args)
        (_, shape2), grad_shapes = jax.eval_shape(
            jax.value_and_grad(_loss_and_out(g, prob.cot), _argnums(prob.args), has_aux=True), *prob.args)
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in prob.args]
        exported = jax.export.export(jax.jit(g))(*specs)
    for got in (shape, shape2):
        assert (got.shape, got.dtype) == (want_out.shape, want_out.dtype), got
    for got, arg in zip(grad_shapes, prob.args):
        assert (got.shape, got.dtype) == (arg.shape, arg.dtype), got
    assert [a.shape for a in exported.in_avals] == [a.shape for a in prob.args]
    restored = jax.export.deserialize(exported.serialize(vjp_order=1))
    _close(restored.call(*prob.args), want_out, f"{backend} exported out")
    _, want_grads = _expected(name, hv, "plain")
    _, got_grads = jax.value_and_grad(_loss_and_out(restored.call, prob.cot), _argnums(prob.args), has_aux=True)(*prob.args)
    for got, want in zip(got_grads, want_grads):
        _close(got, want, f"{backend} exported gradient")


def _tangents(args):
    return tuple(_normal(31 + n, a.shape, 0.5) for n, a in enumerate(args))


def _run_forward_mode(backend: str, name: str, kind: str):
    """``jit(jvp(f))`` / ``linearize(jit(f))`` must work and agree with dense, or raise
    jattn's own error naming forward mode and the backend, never one from deep inside
    JAX.  Dense's tangent is checked against central differences and against its
    reverse mode: ``<J·t, c> == <t, Jᵀ·c>``."""
    hv = HV[backend]
    prob = _problem(name, hv, "plain", False)
    tangents = _tangents(prob.args)
    with _on_cpu(backend):
        g = prob.build(functools.partial(_attend, backend))
        try:
            if kind == "jvp":
                out, t_out = jax.jit(lambda *a: jax.jvp(g, a, tangents))(*prob.args)
            else:
                out, linear = jax.linearize(jax.jit(g), *prob.args)
                t_out = linear(*tangents)
        except Exception as e:  # noqa: BLE001 - which error is the point
            message = str(e)
            # jattn refuses forward mode by name where it can see it (jvp traced inside
            # the call: the backend's refusal names the feature).  A jit traced first and
            # differentiated afterwards (linearize(jit(f))) hides the tangents from jattn;
            # there JAX itself refuses its custom VJP, with its own message.
            named_by_jattn = "forward-mode" in message.lower() and backend in message
            refused_by_jax = kind == "linearize" and "can't apply forward-mode autodiff (jvp) to a custom_vjp" in message
            if backend == "dense" or not (named_by_jattn or refused_by_jax):
                pytest.fail(f"{backend} {kind}: expected a result, or jattn's error naming forward-mode and "
                            f"'{backend}'; got {type(e).__name__}: {message.splitlines()[0][:300]}")
            return
    want_out, want_grads = _expected(name, hv, "plain")
    _close(out, want_out, f"{backend} {kind} primal")
    if backend != "dense":
        dense = prob.build(functools.partial(_attend, "dense"))
        _, want_t = jax.jit(lambda *a: jax.jvp(dense, a, tangents))(*prob.args)
        _close(t_out, want_t, f"{backend} {kind} tangent vs dense", rtol=5e-5, atol=5e-5)
        return
    eps = 1e-2
    value = _dense_value_and_grad(name, hv, "plain")
    shifted = [value(*(jnp.asarray(np.asarray(a) + s * eps * np.asarray(t)) for a, t in zip(prob.args, tangents)))
               [0][1] for s in (1, -1)]
    _close(t_out, (np.asarray(shifted[0]) - np.asarray(shifted[1])) / (2 * eps), "dense tangent vs central differences",
           rtol=2e-3, atol=2e-3)
    lhs = float(np.sum(np.asarray(t_out, np.float64) * np.asarray(prob.cot)))
    rhs = float(sum(np.sum(np.asarray(t) * w) for t, w in zip(tangents, want_grads)))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4 * (abs(rhs) + 1), err_msg="<J t, c> vs <t, J^T c>")


# nnx: a stack of LAYERS SelfAttention layers built with nnx.vmap (nnx.split_rngs),
# run by nnx.scan over nnx.remat-ed layers.  One setup every backend serves.
NNX_D, NNX_N, NNX_K = 12, 4, 2
NNX_CALL = {"is_causal": True, "segment_ids": jnp.asarray(Q_SEG), "lengths": jnp.asarray(Q_LENS - 4, jnp.int32),
            "local_window_size": (6, 0)}


def _cheap_init(key, shape, dtype=jnp.float32):
    """A deterministic, key-dependent initialiser without random-number kernels
    (Flax's default ones cost seconds of compiling in eager mode)."""
    phase = (jax.random.key_data(key)[..., -1] % 1024).astype(jnp.float32)
    size = int(np.prod(shape))
    values = jnp.sin(jnp.arange(size, dtype=jnp.float32) * 0.731 + phase) / np.sqrt(shape[0])
    return values.reshape(shape).astype(dtype)


def _nnx_stack(implementation: str):
    extra = {}
    if implementation == "chunked" and "block_sizes" in inspect.signature(jattn_nnx.SelfAttention.__init__).parameters:
        extra["block_sizes"] = BLOCKS

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return jattn_nnx.SelfAttention(NNX_D, NNX_N, num_kv_heads=NNX_K, head_dim=H, logits_soft_cap=SOFTCAP,
                                       implementation=implementation, kernel_init=_cheap_init, rngs=rngs, **extra)
    return make(nnx.Rngs(3))


def _nnx_forward(graphdef, scanned: bool):
    def forward(state, x):
        stack = nnx.merge(graphdef, state)
        if scanned:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            @nnx.remat
            def body(h, layer):
                return h + layer(h, **NNX_CALL)
            return body(x, stack)
        layers_def, layers = nnx.split(stack)
        for i in range(LAYERS):
            layer = nnx.merge(layers_def, jax.tree_util.tree_map(lambda a: a[i], layers))
            x = x + layer(x, **NNX_CALL)
        return x
    return forward


NNX_COT = _normal(22, (B, T, NNX_D))


@functools.lru_cache(maxsize=None)
def _nnx_expected():
    """Dense's layers one by one in a Python loop, under jit(value_and_grad)."""
    graphdef, state = nnx.split(_nnx_stack("dense"))
    loss = _loss_and_out(_nnx_forward(graphdef, scanned=False), NNX_COT)
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, _normal(21, (B, T, NNX_D)))
    return jax.device_get((state, y, grads))


def _run_nnx(backend: str, order: str = "jit_grad", x64: bool = False):
    """Under x64 the parameters and inputs stay float32 (64-bit index arithmetic)."""
    blocks = {"cpu": BLOCKS} if backend == "chunked" else {}
    graphdef, state = nnx.split(_nnx_stack(backend))
    with _on_cpu(backend), mock.patch.dict(chunked.DEFAULT_BLOCK_SIZES, blocks), jax.enable_x64(x64):
        forward = _nnx_forward(graphdef, scanned=True)
        y, (d_state, d_x) = jax.device_get(
            _differentiate(forward, (state, _normal(21, (B, T, NNX_D))), NNX_COT, order))
    want_state, want_y, (want_d_state, want_d_x) = _nnx_expected()
    for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(want_state)):
        np.testing.assert_array_equal(got, want, err_msg="the stacks start from the same parameters")
    assert y.dtype == np.float32, y.dtype
    _close(y, want_y, f"{backend} nnx out")
    _close(d_x, want_d_x, f"{backend} nnx dx")
    got_leaves, got_tree = jax.tree_util.tree_flatten(d_state)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want_d_state)
    assert got_tree == want_tree
    for n, (got, want) in enumerate(zip(got_leaves, want_leaves)):
        _close(got, want, f"{backend} nnx dparams[{n}]")


@pytest.mark.parametrize("backend, cell, spec, bundle", CELLS,
                         ids=[f"{b}-{c}" + (f"-{bu}" if bu else "") for b, c, _, bu in CELLS])
def test_transform(backend, cell, spec, bundle):
    if isinstance(spec, Generic):
        _run_generic(backend, bundle, spec)
    elif spec.kind == "export":
        _run_export(backend, bundle)
    elif spec.kind in ("jvp", "linearize"):
        _run_forward_mode(backend, bundle, spec.kind)
    elif spec.kind == "nnx_scan_remat":
        _run_nnx(backend)
    elif spec.kind == "nnx_scan_remat_vjp_x64":
        _run_nnx(backend, order="vjp_jit", x64=True)
    else:
        raise AssertionError(spec)


def test_matrix_covers_every_pair():
    """Every (backend, transformation) and every (backend, feature) pair has a cell
    (pallas: or a refusal test)."""
    for backend in HV:
        cells = [(spec, bundle) for b, _, spec, bundle in CELLS if b == backend]
        transforms = set().union(*(spec.covers() for spec, _ in cells))
        assert transforms == set(TRANSFORMS), (backend, set(TRANSFORMS) ^ transforms)
        features = {f for _, bundle in cells if bundle for f in BUNDLES[bundle].features}
        if backend == "pallas":
            features |= set(PALLAS_REFUSES)
        assert features >= set(FEATURES) - {"causal_int"}, (backend, set(FEATURES) - features)


@pytest.mark.parametrize("bundle, backend", [("plain", "dense"), ("masks", "dense"), ("packed", "dense"),
                                              ("mods", "dense"), ("dropout", "dense"), ("band", "pallas"),
                                              ("ragged", "pallas")])
def test_dense_baseline_matches_float64_reference(bundle, backend):
    """The baseline every cell compares with (dense under jit(value_and_grad)), for
    each bundle with the value head dim of ``backend``, against the float64 reference."""
    hv = HV[backend]
    out, _ = _expected(bundle, hv, "plain")
    _close(out, _reference(bundle, hv, _case(bundle, hv).args), f"dense {bundle} vs float64 reference",
           rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature", sorted(PALLAS_REFUSES))
def test_pallas_refuses_cleanly(feature):
    """A feature pallas lacks: an explicit choice raises a ValueError naming it (for a
    GPU, and through the CPU interpreter), auto never picks pallas, explain says why."""
    kwargs, _ = _feature(feature, 4)
    q = jnp.zeros((B, T, 4, H), jnp.bfloat16)
    kv = jnp.zeros((B, S, 2, H), jnp.bfloat16)
    bias = kwargs.pop("bias", None)
    bias = None if bias is None else bias.astype(jnp.bfloat16)
    words = PALLAS_REFUSES[feature]
    with pytest.raises(ValueError, match=words):
        jattn.explain(q, kv, kv, bias, platform="gpu", implementation="pallas", **kwargs)
    why = jattn.explain(q, kv, kv, bias, platform="gpu", **kwargs)
    assert why.backend != "pallas", str(why)
    assert words in why.refused["pallas"], why.refused["pallas"]
    with _on_cpu("pallas"), pytest.raises(ValueError, match=words):
        jattn.dot_product_attention(q, kv, kv, bias, implementation="pallas", **kwargs)


@functools.lru_cache(maxsize=None)
def _residual_inputs(dtype, with_bias: bool):
    """Inputs, kwargs and jax.nn's (out, lse) for `test_return_residual_matches_jax_nn`."""
    N, K = 4, 2
    q = _normal(41, (B, T, N, H), dtype=dtype)
    k = _normal(42, (B, S, K, H), dtype=dtype)
    v = _normal(43, (B, S, K, H), dtype=dtype)
    bias = _normal(44, (B, 1, T, S), 0.5, dtype) if with_bias else None
    kwargs = dict(is_causal=True, local_window_size=(6, 3), query_seq_lengths=jnp.asarray(Q_LENS, jnp.int32),
                  key_value_seq_lengths=jnp.asarray(RESIDUAL_KV_LENS, jnp.int32))
    want = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="xla", return_residual=True,
                                  **kwargs))(q, k, v, bias)
    return (q, k, v, bias), kwargs, jax.device_get(want)


RESIDUAL_KV_LENS = np.array([S - 9, 4])


@pytest.mark.parametrize("backend, dtype", [("dense", jnp.float32), ("chunked", jnp.bfloat16),
                                            ("pallas", jnp.bfloat16)],
                         ids=["dense-float32", "chunked-bfloat16", "pallas-bfloat16"])
def test_return_residual_matches_jax_nn(backend, dtype):
    """``return_residual=True``: the lse has jax.nn's dtype (the input dtype) and layout
    [B, T, N], equals jax.nn's on every row that has a key to attend (jattn gives -inf
    on the others, jax.nn a finite filler), and carries no gradient (dense, chunked)."""
    (q, k, v, bias), kwargs, (want_out, want_lse) = _residual_inputs(dtype, backend != "pallas")
    t, s = np.arange(T)[:, None], np.arange(S)[None, :]
    allowed = (((s <= t) & (s >= t - 6))[None] & (t[None] < Q_LENS[:, None, None])
               & (s[None] < RESIDUAL_KV_LENS[:, None, None]))
    defined = np.broadcast_to(allowed.any(-1)[:, :, None], want_lse.shape)
    assert defined.any() and not defined.all()
    extra = {"block_sizes": BLOCKS} if backend == "chunked" else {}

    def lse_only(q, k, v):
        out, lse = jattn.dot_product_attention(q, k, v, bias, implementation=backend, return_residual=True,
                                               **kwargs, **extra)
        return jnp.sum(jnp.where(defined, lse.astype(jnp.float32), 0.0)), (out, lse)

    with _on_cpu(backend):
        if backend == "pallas":  # forward only (its kernels' VJP ignores the lse anyway): cheaper
            _, (out, lse) = jax.jit(lse_only)(q, k, v)
            grads = ()
        else:
            (_, (out, lse)), grads = jax.jit(jax.value_and_grad(lse_only, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert lse.dtype == want_lse.dtype == dtype, (lse.dtype, want_lse.dtype)
    assert lse.shape == want_lse.shape == (B, T, 4), lse.shape
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    lse32 = np.asarray(lse).astype(np.float32)
    _close(lse32[defined], want_lse.astype(np.float32)[defined], "lse", rtol=tol, atol=tol)
    assert np.all(np.isneginf(lse32[~defined])), "rows with no key to attend: lse = -inf"
    rows = np.broadcast_to(defined[..., None], want_out.shape)  # jax.nn averages the values on rows without keys
    _close(np.asarray(out)[rows], want_out[rows], "out", rtol=tol, atol=tol)
    for name, grad in zip("qkv", grads):
        assert float(jnp.max(jnp.abs(grad.astype(jnp.float32)))) == 0.0, f"d lse / d{name} must be zero"


def test_explain_abstract():
    """explain on jax.ShapeDtypeStruct inputs, and on tracers inside jax.eval_shape,
    gives what it gives for concrete arrays."""
    q = jax.ShapeDtypeStruct((1, 1024, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 16), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    abstract = jattn.explain(q, kv, kv, platform="cpu", is_causal=True, query_segment_ids=seg,
                             key_value_segment_ids=seg)
    zeros = lambda x: jnp.zeros(x.shape, x.dtype)
    concrete = jattn.explain(zeros(q), zeros(kv), zeros(kv), platform="cpu", is_causal=True,
                             query_segment_ids=zeros(seg), key_value_segment_ids=zeros(seg))
    assert abstract.backend == concrete.backend == "chunked"
    assert abstract == concrete

    seen = []

    def attend(q, k, v):
        seen.append(jattn.explain(q, k, v, platform="cpu", is_causal=True))
        return jattn.dot_product_attention(q, k, v, is_causal=True)

    out = jax.eval_shape(attend, q, kv, kv)
    assert (out.shape, out.dtype) == (q.shape, q.dtype)
    assert seen and seen[0] == jattn.explain(zeros(q), zeros(kv), zeros(kv), platform="cpu", is_causal=True), seen
    half = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.bfloat16)
    offsets = jax.ShapeDtypeStruct((1,), jnp.int32)  # a per-example offset: the kernels take an int only
    gpu = jattn.explain(half, half, half, platform="gpu", is_causal=True, query_offset=offsets)
    assert gpu.backend != "pallas" and "query_offset" in gpu.refused["pallas"], str(gpu)
