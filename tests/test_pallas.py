"""The Pallas backend's fused kernels, run on the CPU through the Pallas interpreter:
agreement with the float64 reference and with dense (outputs, lse, gradients), the
block ranges each program visits, the dispatch rules, and that all three kernels lower
to Triton for CUDA.  tests/test_pallas_gpu.py compiles and runs them on a GPU."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jattn
from jattn.attention import make_call
from jattn.backends import dense, pallas
from jattn.backends import flash_kernels as fk
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


@st.composite
def _cases(draw):
    B = draw(st.integers(1, 2))
    K = draw(st.integers(1, 2))
    N = K * draw(st.sampled_from([1, 3]))
    T = draw(st.integers(1, 70))
    S = draw(st.integers(1, 70))
    H = draw(st.sampled_from([8, 20, 32]))
    kind = draw(st.sampled_from(["causal", "window", "segments", "lengths", "none"]))
    offset = draw(st.integers(-3, 40))
    ours, ref = draw_mask(draw, kind, B, T, S, offset=offset, max_window=20)
    if draw(st.booleans()):
        ours, ref = {**ours, "logits_soft_cap": 3.0}, {**ref, "softcap": 3.0}
    return (B, T, S, N, K, H), ours, ref, draw(st.integers(0, 999))


# Half the profile's examples, at least 6 (6 in CI, 100 thorough): each interprets three kernels
# forward and backward (~10 s); the transformation matrix covers the features again.
@settings(max_examples=max(6, settings.default.max_examples // 2), deadline=None)
@given(case=_cases())
def test_pallas_agrees_with_reference_and_dense(case):
    dims, ours, ref, seed = case
    q, k, v = qkv(seed, *dims)
    out, _, lse = _run({**ours, "return_residual": True})(q, k, v)
    ref_out, _, ref_lse = reference_attention(q, k, v, **ref)
    assert_close(out, ref_out, 1e-5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    dense_fn = lambda q, k, v: dense.run(make_call(q, k, v, **ours), "cpu")
    grads = jax.grad(_loss(_run(ours)), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(_loss(dense_fn), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", grads, want):
        assert_close(g, w, 2e-5, atol=1e-6, err_msg=f"d{name}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_against_float64_reference(dtype):
    q, k, v = qkv(7, 2, 50, 61, 4, 2, 32, dtype=dtype)
    kwargs = dict(is_causal=True, query_offset=11, logits_soft_cap=5.0)
    out = _run(kwargs)(q, k, v)[0]
    assert out.dtype == dtype
    ref_out, _, _ = reference_attention(q, k, v, is_causal=True, query_offset=11, softcap=5.0)
    assert_close(out, ref_out, RTOL[dtype])
    grads = jax.grad(_loss(_run(kwargs)), argnums=(0, 1, 2))(q, k, v)
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
    out, _, lse = _run({**kwargs, "return_residual": True})(q, k, v)
    assert float(jnp.abs(out[0, :30]).max()) == 0.0 and float(jnp.abs(out[1]).max()) == 0.0
    assert bool(jnp.all(jnp.isneginf(lse[0, :30]))) and bool(jnp.all(jnp.isneginf(lse[1])))
    assert float(jnp.abs(out[0, 30:]).min()) > 0.0
    grads = jax.grad(_loss(_run(kwargs)), argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert float(jnp.abs(grads[0][0, :30]).max()) == 0.0 and float(jnp.abs(grads[1][1]).max()) == 0.0


def test_jit_and_head_dim_padding():
    """A head dim that is no power of two (H=24 → 32 inside) under jit, GQA G=3."""
    q, k, v = qkv(9, 1, 33, 47, 6, 2, 24)
    out = jax.jit(lambda q, k, v: _run({"is_causal": True})(q, k, v)[0])(q, k, v)
    ref_out, _, _ = reference_attention(q, k, v, is_causal=True)
    assert out.shape == (1, 33, 6, 24)
    assert_close(out, ref_out, 1e-5)


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


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(dtype=jnp.float32), "float32"),
        (dict(bias=True), "bias"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
        (dict(is_causal=True, query_offset=jnp.array([3])), "query_offset"),
        (dict(mask=jattn.masks.PrefixLM(3)), "mask object"),
    ],
)
def test_pallas_refusals_name_the_reason(kwargs, reason):
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", jnp.bfloat16)
    q = jnp.zeros((1, 64, 2, 64), dtype)
    if kwargs.pop("bias", False):
        kwargs["bias"] = jnp.zeros((1, 2, 64, 64), dtype)
    why = jattn.explain(q, q, q, platform="gpu", **kwargs)
    assert why.backend != "pallas"
    assert reason in why.refused["pallas"], why.refused["pallas"]
    with pytest.raises(ValueError, match="implementation='pallas' cannot serve"):
        jattn.explain(q, q, q, platform="gpu", implementation="pallas", **kwargs)


def test_pallas_needs_a_gpu():
    q = jnp.zeros((1, 16, 1, 16), jnp.bfloat16)
    assert "NVIDIA" in jattn.explain(q, q, q, platform="cpu").refused["pallas"]


def test_kernels_lower_to_triton_for_cuda():
    """Cross-lowering for CUDA on any machine: every primitive in the three kernels has
    a Triton lowering and every load/store has a power-of-two size (what a GPU's
    compile would reject first).  The Triton-to-PTX step itself needs the GPU."""
    from jax import export

    def attend(q, k, v):
        call = make_call(q, k, v, is_causal=True, logits_soft_cap=30.0, key_value_seq_lengths=jnp.array([1400]),
                         query_segment_ids=jnp.zeros((1, 1500), jnp.int32),
                         key_value_segment_ids=jnp.zeros((1, 1500), jnp.int32))
        return pallas.run(call, "gpu")[0]

    def grads(q, k, v):
        return jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2))(q, k, v)

    q = jax.ShapeDtypeStruct((1, 1500, 8, 80), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1500, 2, 80), jnp.bfloat16)
    allow_triton = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(jax.jit(grads), platforms=["cuda"], disabled_checks=allow_triton)(q, kv, kv).mlir_module()
    for kernel in ("jattn_flash_forward", "jattn_flash_dq", "jattn_flash_dkv"):
        assert kernel in text


def test_vmap_of_unbatched_calls_and_its_gradient():
    """jax.vmap over unbatched (T, N, H) calls batches the pallas_call (its grid grows
    an axis); outputs and gradients equal dense's."""
    q, k, v = qkv(10, 3, 40, 40, 4, 2, 16, unbatched=False)

    def batched(run):
        return jax.vmap(lambda q, k, v: run(make_call(q, k, v, is_causal=True, logits_soft_cap=4.0))[0])

    ours = batched(lambda c: pallas.run(c, "cpu", tiles=TILES))
    want = batched(lambda c: dense.run(c, "cpu"))
    assert_close(ours(q, k, v), want(q, k, v), 1e-5)
    loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
    for g, w in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(want), argnums=(0, 1, 2))(q, k, v)):
        assert_close(g, w, 2e-5, atol=1e-6)
