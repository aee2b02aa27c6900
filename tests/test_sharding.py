"""dot_product_attention under an explicit-axis mesh (jax.make_mesh's default): batch
sharded over `data`, heads over `model`, on 8 CPU devices.

One subprocess (``jax_num_cpu_devices`` must be set before JAX starts) runs every
check and prints a line per check; the tests below read those lines.

- dense and chunked partition through their vmaps: sharded == unsharded;
- the per-device backends (`jattn.backends.per_device`): the Pallas kernels, through
  the Pallas interpreter, run in jax.shard_map on each device's slice: outputs, lse
  and gradients equal to the unsharded call (dropout's pattern too), and the compiled
  program gathers nothing;
  splash's kernels likewise (against unsharded dense);
- every kind of operand is sliced alike (bias, mask arrays, lengths, array offsets,
  mask / score-mod leaves with a batch axis) and dropout draws the unsharded pattern:
  dense declared per-device for the test, against plain dense;
- what the per-device path refuses (a score_mod with heads split, dropout where the
  backend cannot draw at global indices, a sharded
  sequence, heads that do not split by whole GQA groups, key/value split unlike the
  query), and what explain says for the GPU (cuDNN, Pallas) and TPU (splash).
"""

import functools
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import dataclasses
    from unittest import mock

    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_disable_most_optimizations", True)  # compiling dominates (see conftest)
    import jax.numpy as jnp, numpy as np, jattn
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jattn import dispatch, masks, score_mods
    from jattn.attention import make_call
    from jattn.backends import contract, pallas, splash

    B, T, N, K, H = 4, 16, 4, 2, 8
    kq, kk, kv, kb = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, T, N, H)); k = jax.random.normal(kk, (B, T, K, H)); v = jax.random.normal(kv, (B, T, K, H))
    seg = jnp.repeat(jnp.arange(2)[None], B, 0).repeat(8, 1)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    BTNH = P("data", None, "model", None)

    def put(spec, *xs):
        return [jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]

    def close(got, want, what):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=what)

    def value_and_grads(impl, kwargs, argnums=(0, 1, 2)):
        # One compiled program: (loss, (out, lse)) and the gradients.
        def loss(q, k, v, bias=None):
            out = jattn.dot_product_attention(q, k, v, bias, implementation=impl, **kwargs)
            out, lse = out if isinstance(out, tuple) else (out, None)
            return (out ** 2).sum(), (out, lse)
        return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))

    # dense and chunked: XLA partitions their vmaps.
    kwargs = dict(is_causal=True, query_segment_ids=seg, dropout_rate=0.2, dropout_rng=jax.random.key(1),
                  block_sizes=(8, 8))
    for impl in ("dense", "chunked"):
        want = value_and_grads(impl, kwargs)(q, k, v)
        with jax.set_mesh(mesh):
            got = value_and_grads(impl, kwargs)(*put(BTNH, q, k, v))
            assert jax.typeof(got[0][1][0]).sharding.spec == BTNH, jax.typeof(got[0][1][0]).sharding
        close(got, want, impl)
        print(impl, "sharded == unsharded")

    # Pallas, per device: the kernels through the interpreter with 8-wide tiles.
    tiles = pallas.Tiles(block_q=8, block_kv=8, block_q_dq=8, block_kv_dq=8, block_q_dkv=8, block_kv_dkv=8)
    interpreted = dataclasses.replace(dispatch.BACKENDS["pallas"], limits=lambda call, platform: None,
                                      run=lambda call, platform: pallas.run(call, "cpu", tiles=tiles))
    kwargs = dict(is_causal=True, query_segment_ids=seg, key_value_seq_lengths=jnp.array([16, 9, 3, 12]),
                  logits_soft_cap=5.0, return_residual=True, dropout_rate=0.2, dropout_rng=jax.random.key(4))
    with mock.patch.dict(dispatch.BACKENDS, {"pallas": interpreted}):
        want = value_and_grads("pallas", kwargs)(q, k, v)
        with jax.set_mesh(mesh):
            qs, ks, vs = put(BTNH, q, k, v)
            why = jattn.explain(qs, ks, vs, implementation="pallas", **kwargs)
            assert "runs per device in jax.shard_map (batch over 'data', heads over 'model')" in why.reason, why
            compiled = value_and_grads("pallas", kwargs).lower(qs, ks, vs).compile()
            got = compiled(qs, ks, vs)
            (_, (out, lse)), _ = got
            assert jax.typeof(out).sharding.spec == BTNH and jax.typeof(lse).sharding.spec == P("data", None, "model")
        close(got, want, "pallas")
        print("pallas per device == unsharded, dropout pattern too")
        hlo = compiled.as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo, [l for l in hlo.splitlines() if "all-" in l]
        assert f"f32[{B // 4},{T},{N // 2},{H}]" in hlo  # each device holds its (batch, heads) slice
        print("pallas per device: no all-gather")

    # Splash, per device, through the interpreter: against unsharded dense (cheaper than splash twice).
    interpreted = dataclasses.replace(dispatch.BACKENDS["splash"], limits=lambda call, platform: splash.serves(call),
                                      run=lambda call, platform: splash.run(call, "cpu"))
    kwargs = dict(is_causal=True, key_value_seq_lengths=jnp.array([16, 9, 3, 12]))
    want = value_and_grads("dense", kwargs)(q, k, v)
    with mock.patch.dict(dispatch.BACKENDS, {"splash": interpreted}), jax.set_mesh(mesh):
        got = value_and_grads("splash", kwargs)(*put(BTNH, q, k, v))
    close(got, want, "splash")
    print("splash per device == unsharded")

    # Every kind of operand sliced alike: dense declared per-device, against plain dense.
    per_device_dense = dataclasses.replace(dispatch.BACKENDS["dense"], per_device=True)
    bias = jax.random.normal(kb, (1, N, T, T))  # shared by the batch (its gradient sums over 'data')
    heads_and_batch = dict(is_causal=True, query_offset=jnp.array([0, 2, 1, 3]), query_seq_lengths=jnp.array([16, 5, 9, 12]),
                           mask=masks.PrefixLM(jnp.array([3, 0, 6, 2])), dropout_rate=0.3, dropout_rng=jax.random.key(2))
    batch_only = dict(mask=jnp.arange(T)[None, None, None, :] < jnp.array([16, 7, 2, 11])[:, None, None, None],
                      score_mod=score_mods.ALiBi(num_heads=N, offset=jnp.array([1, 0, 4, 2])))
    want = [value_and_grads("dense", kw, argnums=(0, 1, 2, 3))(q, k, v, bias) for kw in (heads_and_batch, batch_only)]
    with mock.patch.dict(dispatch.BACKENDS, {"dense": per_device_dense}), jax.set_mesh(mesh):
        # Key and value replicated over 'model': each device takes its kv heads locally.
        got = value_and_grads("dense", heads_and_batch, argnums=(0, 1, 2, 3))(
            *put(BTNH, q), *put(P("data"), k, v), *put(P(None, "model"), bias))
        close(got, want[0], "batch and heads")
        BT = P("data")
        got = value_and_grads("dense", batch_only, argnums=(0, 1, 2, 3))(*put(BT, q, k, v), bias)
        close(got, want[1], "batch only")
        assert "batch over 'data')" in jattn.explain(*put(BT, q, k, v), implementation="dense", **batch_only).reason
        print("operands sliced alike, dropout pattern as unsharded")

        # Refused: a score_mod would see the shard's local head index.
        try:
            jattn.dot_product_attention(*put(BTNH, q, k, v), implementation="dense", **batch_only)
            raise AssertionError("not refused")
        except ValueError as e:
            assert "score_mod on inputs sharded over 'model'" in str(e), e
        # Dropout with a backend that cannot draw at global indices (no dropout_origin).
        no_origin = dataclasses.replace(per_device_dense, supports=per_device_dense.supports - {"dropout_origin"})
        with mock.patch.dict(dispatch.BACKENDS, {"dense": no_origin}):
            why = contract.refusal(no_origin, make_call(*put(BTNH, q, k, v), dropout_rate=0.1, dropout_rng=jax.random.key(3)), "cpu")
            assert "dropout on inputs sharded over batch over 'data', heads over 'model'" in why, why
    print("per device refuses a score_mod with heads split, dropout without dropout_origin")

    # What explain says for the real backends (bfloat16, as the GPU kernels take).
    bf = lambda *xs: [x.astype(jnp.bfloat16) for x in xs]
    with jax.set_mesh(mesh):
        qs, ks, vs = put(BTNH, *bf(q, k, v))
        why = jattn.explain(qs, ks, vs, is_causal=True, platform="gpu")
        assert why.backend == "cudnn" and "runs per device in jax.shard_map" in why.reason, why
        why = jattn.explain(qs, ks, vs, is_causal=True, logits_soft_cap=30.0, platform="gpu")
        assert why.backend == "pallas" and "heads over 'model'" in why.reason, why
        long = [jax.ShapeDtypeStruct((B, 2048, N, H), jnp.float32, sharding=NamedSharding(mesh, BTNH))] * 3
        why = jattn.explain(*long, is_causal=True, platform="tpu")
        assert why.backend == "splash" and "runs per device in jax.shard_map" in why.reason, why
        # A sharded sequence is jattn.parallel's (sequence parallelism); the per-device path refuses it.
        call = make_call(*put(P("data", "model"), *bf(q, k, v)), is_causal=True)
        for name in ("cudnn", "pallas"):
            assert "sequence axis T is sharded" in contract.refusal(dispatch.BACKENDS[name], call, "gpu"), name
        call = make_call(qs, *put(P("data", "model"), *bf(k, v)), is_causal=True)
        assert "sequence axis S is sharded" in contract.refusal(dispatch.BACKENDS["cudnn"], call, "gpu")
        why = jattn.explain(qs, *put(P("model"), *bf(k, v)), is_causal=True, platform="gpu")
        assert "shard query, key and value alike" in why.refused["cudnn"], why
    wide = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(wide):
        # N = 4 query heads split over 4 devices; K = 2 key/value heads (replicated) cannot be.
        qs, ks, vs = [jax.device_put(x, NamedSharding(wide, spec)) for x, spec in zip(bf(q, k, v), (BTNH, P("data"), P("data")))]
        why = jattn.explain(qs, ks, vs, is_causal=True, logits_soft_cap=30.0, platform="gpu")
        assert why.backend != "pallas" and "whole GQA groups" in why.refused["pallas"], why
    print("explain says per device")
    """
)


@functools.cache
def _run() -> str:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize("line", [
    "dense sharded == unsharded",
    "chunked sharded == unsharded",
    "pallas per device == unsharded, dropout pattern too",
    "pallas per device: no all-gather",
    "splash per device == unsharded",
    "operands sliced alike, dropout pattern as unsharded",
    "per device refuses a score_mod with heads split, dropout without dropout_origin",
    "explain says per device",
])
def test_explicit_mesh_sharded(line):
    assert line in _run()
