"""The Pallas backend's fused kernels, run on the CPU through the Pallas interpreter:
agreement with the float64 reference and with dense (outputs, lse, gradients — of the
bias and of the arrays a score_mod uses too) for every mask kind, score modifiers,
broadcasting biases and dropout; the block ranges and visit lists programs walk; the
dispatch rules and refusals (a JAX without the Triton lowering included); and that all
three kernels, band and flex, lower to Triton for CUDA.  tests/test_pallas_gpu.py
compiles and runs them on a GPU."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings

import jattn
from jattn import ops
from jattn.attention import make_call
from jattn.backends import dense, flex_tiles, pallas
from jattn.backends import flash_kernels as fk
from jattn.backends import heads as H_
from tests.checks import RTOL, assert_close, qkv
from tests.reference import reference_attention
from tests.strategies import draw_mask

# Small tiles so that short sequences span several blocks, unevenly; backward tiles
# differ from the forward's so every padding rule is exercised.
TILES = pallas.Tiles(block_q=16, block_kv=32, block_q_dq=32, block_kv_dq=16, block_q_dkv=16, block_kv_dkv=16)


def _run(kwargs, tiles=TILES):
    def fn(q, k, v):
        return pallas.run(make_call(q, k, v, **kwargs), "cpu", tiles=tiles)
    return fn


def _loss(fn):
    def loss(q, k, v):
        out = fn(q, k, v)[0]
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)))
    return loss


# ------------------------------------------------------------------ flex attention

SLOPES = tuple(0.5 ** (n + 1) for n in range(6))
SCORE_MODS = [None, "softcap", "alibi_table", "bias_leaf"]
RATE = 0.25


def _flex_kwargs(case, bias, table, bias_leaf):
    """jattn kwargs of a case; ``bias`` / ``table`` / ``bias_leaf`` are the arrays the
    gradients are taken with respect to (traced under jax.grad)."""
    (B, T, S, N, K, H), ours, _, mod, bias_shape, rate, seed = case
    kwargs = dict(ours)
    if bias_shape is not None:
        kwargs["bias"] = bias
    if mod == "softcap":
        kwargs["logits_soft_cap"] = 2.0
    elif mod == "alibi_table":  # ALiBi, then a learned relative-position table a function
        # closes over, then the soft-cap: a chain, the cap last
        relative = lambda s, h, i, j: s + table[h, jnp.clip(j - i, -4, 4) + 4]
        kwargs.update(score_mod=jattn.score_mods.ALiBi(slopes=SLOPES[:N]).then(relative), logits_soft_cap=3.0)
    elif mod == "bias_leaf":
        kwargs["score_mod"] = jattn.score_mods.Bias(bias_leaf)
    if rate:
        kwargs.update(dropout_rate=rate, dropout_rng=jax.random.key(seed))
    return kwargs


def _reference_kwargs(case, bias, table, bias_leaf):
    """The float64 reference's kwargs for the same case."""
    (B, T, S, N, K, H), _, ref, mod, bias_shape, rate, seed = case
    kwargs = dict(ref)
    if bias_shape is not None:
        kwargs["bias"] = np.asarray(bias)
    table, bias_leaf = np.asarray(table, np.float64), np.asarray(bias_leaf, np.float64)
    if mod == "softcap":
        kwargs["softcap"] = 2.0
    elif mod == "alibi_table":
        kwargs.update(score_fn=lambda x, n, t, s: x - SLOPES[n] * abs(t - s) + table[n, min(max(s - t, -4), 4) + 4],
                      softcap=3.0)
    elif mod == "bias_leaf":
        kwargs["score_fn"] = lambda x, n, t, s: x + bias_leaf[t, s]
    if rate:
        # The dropout pattern every backend draws: the hash of (head key, t, s).
        head_key = lambda b, n: H_.head_dropout_key(jax.random.key(seed), b, n)
        kwargs["dropout_keep"] = np.array([[ops.dropout_keep_mask(head_key(b, n), rate, np.arange(T)[:, None],
                                                                  np.arange(S)[None, :]) for n in range(N)]
                                           for b in range(B)])
        kwargs["dropout_rate"] = rate
    return kwargs


@st.composite
def _flex_cases(draw):
    B = draw(st.integers(1, 2))
    K = draw(st.integers(1, 2))
    N = K * draw(st.sampled_from([1, 2]))
    T, S = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    H = draw(st.sampled_from([8, 24]))
    kind = draw(st.sampled_from(["causal", "window", "segments", "lengths", "prefix", "fn", "none"]))
    ours, ref = draw_mask(draw, kind, B, T, S, offset=draw(st.integers(-3, 20)), max_window=12)
    if kind == "prefix" and draw(st.booleans()):  # per example, as an array: a run-time tile table
        prefix = np.array(draw(st.lists(st.integers(0, S), min_size=B, max_size=B)))
        ours, ref = {"mask": jattn.masks.PrefixLM(jnp.asarray(prefix))}, {"prefix_length": prefix}
    bias_shape = draw(st.sampled_from([None, (1, N, T, S), (B, 1, 1, S), (1, 1, T, 1)]))
    return ((B, T, S, N, K, H), ours, ref, draw(st.sampled_from(SCORE_MODS)), bias_shape,
            draw(st.sampled_from([0.0, RATE])), draw(st.integers(0, 999)))


def _flex_outputs(case, run):
    """One jitted program: (out, lse) and the gradients of a loss with respect to q,
    k, v, the bias, the relative-position table and the Bias leaf."""
    (B, T, S, N, K, H), _, _, _, bias_shape, _, seed = case
    q, k, v = qkv(seed, B, T, S, N, K, H)
    keys = jax.random.split(jax.random.key(seed + 1), 3)
    bias = None if bias_shape is None else jax.random.normal(keys[0], bias_shape)
    table = jax.random.normal(keys[1], (N, 9))
    bias_leaf = jax.random.normal(keys[2], (T, S))

    def attend(q, k, v, bias, table, bias_leaf):
        call = make_call(q, k, v, return_residual=True, **_flex_kwargs(case, bias, table, bias_leaf))
        out, _, lse = run(call)
        return out, lse

    def loss(*args):
        out, lse = attend(*args)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(out * weights), (out, lse)

    args = (q, k, v, bias, table, bias_leaf)
    grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))(*args)
    return args, out, lse, grads


def _must_cover(dims, ours, ref, mod, bias_shape, rate, seed=3):
    return (dims, ours, ref, mod, bias_shape, rate, seed)


# Half the profile's examples, at least 4 (4 in CI), after two must-cover cases: each
# interprets three kernels forward and backward in one compiled program.
@settings(max_examples=max(4, settings.default.max_examples // 2), deadline=None)
@given(case=_flex_cases())
@example(case=_must_cover(  # a run-time tile table, ALiBi then a closed-over learned table, a per-head bias, dropout
    (2, 37, 29, 2, 1, 8), {"mask": jattn.masks.PrefixLM(jnp.array([5, 20])), "is_causal": True},
    {"prefix_length": [5, 20], "is_causal": True}, "alibi_table", (1, 2, 37, 29), RATE))
@example(case=_must_cover(  # a static mask_mod (documents), a Bias leaf, a key bias, GQA G=3, H=24
    (1, 33, 40, 6, 2, 24), {"mask": lambda i, j: i // 8 == j // 8, "key_value_seq_lengths": jnp.array([35])},
    {"mask_fn": lambda t, s: t // 8 == s // 8, "kv_lengths": [35]}, "bias_leaf", (1, 1, 1, 40), 0.0))
def test_flex_agrees_with_reference_and_dense(case):
    """Outputs and lse against the float64 reference; gradients (q, k, v, bias, the
    table a score_mod closes over, a Bias leaf) against dense — every mask kind,
    score modifiers, broadcasting biases, dropout, through the interpreter."""
    (B, T, S, N, K, H), _, _, mod, bias_shape, rate, _ = case
    args, out, lse, grads = _flex_outputs(case, lambda call: pallas.run(call, "cpu", tiles=TILES))
    ref_out, _, ref_lse = reference_attention(*args[:3], **_reference_kwargs(case, *args[3:]))
    assert_close(out, ref_out, 1e-5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    _, _, _, want = _flex_outputs(case, lambda call: dense.run(call, "cpu"))
    for name, g, w in zip(["dq", "dk", "dv", "dbias", "dtable", "dbias_leaf"], grads, want):
        if w is not None:
            assert_close(g, w, 2e-5, atol=1e-6, err_msg=name)
    if mod == "alibi_table":
        assert float(jnp.abs(want[4]).max()) > 0  # the closed-over table did get a gradient
    if mod == "bias_leaf":
        assert float(jnp.abs(want[5]).max()) > 0  # so did the Bias leaf


def test_visit_lists_list_exactly_the_non_empty_tiles():
    """Per example and row of tiles: the non-empty tiles, in order, FULL ones marked;
    a traced mask gives the same lists as a static one."""
    B, T, S, bq, bk = 2, 37, 50, 8, 16
    static = jattn.masks.Causal(3) | jattn.masks.Lengths(kv_length=np.array([4, 40]))
    kinds = flex_tiles.tile_table(*static.batch_in_axes(B, T, S), B, T, S, bq, bk, (5, 4))
    traced = jattn.masks.Causal(3) | jattn.masks.Lengths(kv_length=jnp.array([4, 40]))
    kinds_traced = flex_tiles.tile_table(*traced.batch_in_axes(B, T, S), B, T, S, bq, bk, (5, 4))
    np.testing.assert_array_equal(np.asarray(kinds_traced), kinds)
    shared = jattn.masks.Causal(jnp.int32(3)) | jattn.masks.Lengths(kv_length=jnp.int32(40))  # traced, no batch axis
    kinds_shared = flex_tiles.tile_table(*shared.batch_in_axes(B, T, S), B, T, S, bq, bk, (5, 4))
    np.testing.assert_array_equal(np.asarray(kinds_shared)[0], kinds[1])
    visits, counts = flex_tiles.visit_lists(kinds)
    assert visits.shape == (B, 5, 4)
    for b in range(B):
        for i in range(5):
            listed = [(int(e) // 2, int(e) % 2 == 1) for e in visits[b, i, :counts[b, i]]]
            want = [(j, kinds[b, i, j] == jattn.masks.FULL) for j in range(4) if kinds[b, i, j] != jattn.masks.EMPTY]
            assert listed == want
    # The last kv tile holds padded keys (S = 50 < 64): never FULL.
    assert not np.any(kinds[:, :, 3] == jattn.masks.FULL)


def _out_and_grads(fn):
    """One jitted program: ``fn(q, k, v)`` (out, weights, lse) and the gradients of
    the `_loss` of its output with respect to q, k, v."""
    def loss(*args):
        result = fn(*args)
        out = result[0]
        cos = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(out.astype(jnp.float32) * cos), result

    return jax.jit(lambda q, k, v: jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)[::-1])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_against_float64_reference(dtype):
    q, k, v = qkv(7, 2, 50, 61, 4, 2, 32, dtype=dtype)
    kwargs = dict(is_causal=True, query_offset=11, logits_soft_cap=5.0)
    (out, _, _), grads = _out_and_grads(_run(kwargs))(q, k, v)
    assert out.dtype == dtype
    ref_out, _, _ = reference_attention(q, k, v, is_causal=True, query_offset=11, softcap=5.0)
    assert_close(out, ref_out, RTOL[dtype])
    f64 = lambda q, k, v: dense.run(make_call(q, k, v, **kwargs), "cpu")
    with jax.enable_x64(True):
        want = jax.grad(_loss(f64), argnums=(0, 1, 2))(*(x.astype(jnp.float64) for x in (q, k, v)))
    for name, g, w in zip("qkv", grads, want):
        assert g.dtype == dtype
        assert_close(g, w, 3 * RTOL[dtype], err_msg=f"d{name}")


def test_rows_without_keys_are_zero_with_zero_gradients():
    q, k, v = qkv(8, 2, 40, 40, 2, 1, 16)
    # Row t sees keys t - 35 .. t - 30: rows below 30 see none.
    kwargs = dict(local_window_size=(5, 0), query_offset=-30, key_value_seq_lengths=jnp.array([40, 0]))
    (out, _, lse), grads = _out_and_grads(_run({**kwargs, "return_residual": True}))(q, k, v)
    assert float(jnp.abs(out[0, :30]).max()) == 0.0 and float(jnp.abs(out[1]).max()) == 0.0
    assert bool(jnp.all(jnp.isneginf(lse[0, :30]))) and bool(jnp.all(jnp.isneginf(lse[1])))
    assert float(jnp.abs(out[0, 30:]).min()) > 0.0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert float(jnp.abs(grads[0][0, :30]).max()) == 0.0 and float(jnp.abs(grads[1][1]).max()) == 0.0


def _allowed(spec, rows, cols):
    d = cols[None, :] - rows[:, None] - spec.offset
    ok = np.ones(d.shape, bool)
    if spec.right is not None:
        ok &= d <= spec.right
    if spec.left is not None:
        ok &= d >= -spec.left
    return ok


@settings(max_examples=60, deadline=None)
@given(
    offset=st.integers(-70, 70), left=st.one_of(st.none(), st.integers(0, 50)),
    right=st.one_of(st.none(), st.integers(0, 50)), seq_q=st.integers(1, 100), seq_kv=st.integers(1, 100),
    bq=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]),
)
def test_block_ranges_are_exact(offset, left, right, seq_q, seq_kv, bq, bk):
    """Visited blocks are exactly those the band reaches; 'full' ones need no mask."""
    spec = fk.FlashSpec(scale=1.0, offset=offset, left=left, right=right, softcap=None, seq_q=seq_q, seq_kv=seq_kv)
    nq, nk = -(-seq_q // 32), -(-seq_kv // 32)
    nq, nk = nq * 32 // bq, nk * 32 // bk  # padded to the largest tile, as `pallas.run` does
    for i in range(nq):
        lo, full_lo, full_hi, hi = (int(x) for x in fk.kv_block_range(spec, jnp.int32(i), bq, bk, nk))
        rows = i * bq + np.arange(bq)
        rows = rows[rows < seq_q]  # padded rows are computed but discarded
        for j in range(nk):
            cols = j * bk + np.arange(bk)
            ok = _allowed(spec, rows, cols) & (cols < seq_kv)[None, :]
            assert (lo <= j < hi) == bool(ok.any()), (i, j, lo, hi)
            assert (full_lo <= j < full_hi) == bool(ok.size and ok.all()), (i, j, full_lo, full_hi)
    for j in range(nk):
        lo, full_lo, full_hi, hi = (int(x) for x in fk.q_block_range(spec, jnp.int32(j), bq, bk, nq))
        cols = j * bk + np.arange(bk)
        for i in range(nq):
            rows = i * bq + np.arange(bq)
            rows = rows[rows < seq_q]
            ok = _allowed(spec, rows, cols) & (cols < seq_kv)[None, :]
            assert (lo <= i < hi) == bool(ok.any()), (i, j, lo, hi)
            assert (full_lo <= i < full_hi) == bool(ok.size and ok.all()), (i, j, full_lo, full_hi)


def test_dispatch_prefers_cudnn_then_pallas_on_gpu():
    q = jnp.zeros((1, 4096, 8, 128), jnp.bfloat16)
    assert jattn.explain(q, q, q, is_causal=True, platform="gpu").backend == "cudnn"
    why = jattn.explain(q, q, q, is_causal=True, logits_soft_cap=30.0, platform="gpu")
    assert why.backend == "pallas", str(why)
    assert "soft-capping" in why.refused["cudnn"]
    assert "pallas" in str(jattn.explain(q, q, q, query_segment_ids=jnp.zeros((1, 4096), jnp.int32),
                                         key_value_segment_ids=jnp.zeros((1, 4096), jnp.int32), platform="gpu"))
    # Flex calls: the fused kernels, not chunked.
    flex = [dict(score_mod=jattn.score_mods.ALiBi(num_heads=8), is_causal=True),
            dict(mask=lambda i, j: i // 512 == j // 512),
            dict(is_causal=True, dropout_rate=0.1, dropout_rng=jax.random.key(0)),
            dict(bias=jnp.zeros((1, 8, 4096, 4096), jnp.bfloat16), mask=jattn.masks.PrefixLM(jnp.array([7])))]
    for kwargs in flex:
        assert jattn.explain(q, q, q, platform="gpu", **kwargs).backend == "pallas", kwargs


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(dtype=jnp.float32), "float32"),
        (dict(mask=jnp.ones((1, 1, 64, 64), bool)), "boolean mask array"),
        (dict(is_causal=True, query_offset=jnp.array([3])), "query_offset"),
        (dict(score_mod=lambda s, h, i, j: s + i.shape[0]), "cannot be traced for scalar indices"),  # not elementwise
        (dict(score_mod=jattn.score_mods.Bias(jnp.zeros((64, 64)) + jnp.float32(0))), None),
    ],
)
def test_pallas_refusals_name_the_reason(kwargs, reason):
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", jnp.bfloat16)
    q = jnp.zeros((1, 64, 2, 64), dtype)
    if reason is None:  # a Bias leaf that takes a gradient: refused under jit (traced), served eagerly
        assert jattn.explain(q, q, q, platform="gpu", **kwargs).backend == "pallas"
        seen = []
        jax.jit(lambda b: seen.append(jattn.explain(q, q, q, platform="gpu", score_mod=jattn.score_mods.Bias(b))))(
            kwargs["score_mod"].bias)
        why = seen[0]
        assert why.backend != "pallas" and "scatter-add" in why.refused["pallas"], why.refused["pallas"]
        return
    why = jattn.explain(q, q, q, platform="gpu", **kwargs)
    assert why.backend != "pallas"
    assert reason in why.refused["pallas"], why.refused["pallas"]
    with pytest.raises(ValueError, match="implementation='pallas' cannot serve"):
        jattn.explain(q, q, q, platform="gpu", implementation="pallas", **kwargs)


def test_a_jax_without_the_triton_lowering_is_refused_by_name(monkeypatch):
    """Whatever the kernels need and a JAX lacks (the Triton lowering is deprecated in
    favour of Mosaic GPU) makes the backend refuse, naming it; importing the kernels'
    module without it still works."""
    import importlib.util
    import sys

    import jax.experimental.pallas as pallas_pkg

    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    monkeypatch.delattr(fk.pl_triton, "dot")
    why = jattn.explain(q, q, q, is_causal=True, logits_soft_cap=30.0, platform="gpu")
    assert why.backend != "pallas" and "lacks dot" in why.refused["pallas"], why.refused["pallas"]
    monkeypatch.undo()
    # No jax.experimental.pallas.triton at all: the module imports (a fresh copy of it,
    # so the module every other test uses keeps its classes), and the backend refuses.
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
    monkeypatch.delattr(pallas_pkg, "triton", raising=False)
    spec = importlib.util.spec_from_file_location("flash_kernels_without_triton", fk.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)  # its dataclasses look their module up
    spec.loader.exec_module(fresh)
    assert fresh.pl_triton is None and "no jax.experimental.pallas.triton" in fresh.missing_pieces()
    monkeypatch.undo()
    monkeypatch.setattr(fk, "pl_triton", None)
    why = jattn.explain(q, q, q, is_causal=True, logits_soft_cap=30.0, platform="gpu")
    assert why.backend != "pallas"
    assert "no jax.experimental.pallas.triton" in why.refused["pallas"], why.refused["pallas"]
    monkeypatch.undo()
    assert fk.pl_triton is not None


def test_pallas_needs_a_gpu():
    q = jnp.zeros((1, 16, 1, 16), jnp.bfloat16)
    assert "NVIDIA" in jattn.explain(q, q, q, platform="cpu").refused["pallas"]


def test_kernels_lower_to_triton_for_cuda():
    """Cross-lowering for CUDA on any machine: every primitive in the three kernels has
    a Triton lowering and every load/store has a power-of-two size (what a GPU's
    compile would reject first) — the band kernels, and the flex ones (a traced mask
    object's visit lists, a mask_mod, ALiBi's per-head slopes and a relative-position
    table read element by element, a bias, dropout).  The Triton-to-PTX step itself
    needs the GPU."""
    from jax import export

    table = jnp.linspace(-1.0, 1.0, 8 * 9).reshape(8, 9)  # a constant table: looked up, not differentiated
    flex = dict(
        mask=jattn.masks.PrefixLM(jnp.array([300])) & jattn.masks.FromFunction(lambda i, j: i // 256 == j // 256),
        score_mod=jattn.score_mods.ALiBi(num_heads=8).then(lambda s, h, i, j: s + table[h, jnp.clip(j - i, -4, 4) + 4]),
        logits_soft_cap=30.0, dropout_rate=0.1, dropout_rng=jax.random.key(0),
    )
    band = dict(is_causal=True, logits_soft_cap=30.0, key_value_seq_lengths=jnp.array([1400]),
                query_segment_ids=jnp.zeros((1, 1500), jnp.int32), key_value_segment_ids=jnp.zeros((1, 1500), jnp.int32))

    def grads(kwargs):
        def attend(q, k, v, bias):
            extra = {} if bias is None else {"bias": bias}
            return pallas.run(make_call(q, k, v, **kwargs, **extra), "gpu")[0]
        return lambda q, k, v, bias: jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32) ** 2),
                                              argnums=(0, 1, 2) if bias is None else (0, 1, 2, 3))(q, k, v, bias)

    q = jax.ShapeDtypeStruct((1, 1500, 8, 80), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1500, 2, 80), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, 8, 1500, 1500), jnp.bfloat16)
    allow_triton = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for kwargs, b in ((band, None), (flex, bias)):
        lowered = export.export(jax.jit(grads(kwargs)), platforms=["cuda"], disabled_checks=allow_triton)
        text = lowered(q, kv, kv, b).mlir_module()
        for kernel in ("jattn_flash_forward", "jattn_flash_dq", "jattn_flash_dkv"):
            assert kernel in text


def test_vmap_of_unbatched_calls_and_its_gradient():
    """jax.vmap over unbatched (T, N, H) calls batches the pallas_call (its grid grows
    an axis); outputs and gradients equal dense's."""
    q, k, v = qkv(10, 3, 40, 40, 4, 2, 16, unbatched=False)

    def batched(run):
        return jax.vmap(lambda q, k, v: run(make_call(q, k, v, is_causal=True, logits_soft_cap=4.0))[0])

    def out_and_grads(f):
        def loss(*a):
            out = f(*a)
            return jnp.sum(out ** 2), out
        return jax.jit(lambda *a: jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(*a)[::-1])

    ours, grads = out_and_grads(batched(lambda c: pallas.run(c, "cpu", tiles=TILES)))(q, k, v)
    want, want_grads = out_and_grads(batched(lambda c: dense.run(c, "cpu")))(q, k, v)
    assert_close(ours, want, 1e-5)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, 2e-5, atol=1e-6)
