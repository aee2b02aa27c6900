"""dot_product_attention under an explicit-axis mesh (jax.make_mesh's default): batch
sharded over `data`, heads over `model`, on 8 CPU devices in a subprocess."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp, numpy as np, jattn
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    B, T, N, K, H = 4, 24, 4, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H)); k = jax.random.normal(kk, (B, T, K, H)); v = jax.random.normal(kv, (B, T, K, H))
    seg = jnp.repeat(jnp.arange(3)[None], B, 0).repeat(8, 1)
    kwargs = dict(is_causal=True, query_segment_ids=seg, dropout_rate=0.2, dropout_rng=jax.random.key(1))

    def run(impl, q, k, v):
        fn = lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation=impl, block_sizes=(8, 8), **kwargs)
        out = jax.jit(fn)(q, k, v)
        grads = jax.jit(jax.grad(lambda *a: (fn(*a) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)
        return out, grads

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    spec = NamedSharding(mesh, P("data", None, "model", None))
    for impl in ("dense", "chunked"):
        want_out, want_grads = run(impl, q, k, v)
        with jax.set_mesh(mesh):
            got_out, got_grads = run(impl, *(jax.device_put(x, spec) for x in (q, k, v)))
            assert jax.typeof(got_out).sharding.spec == P("data", None, "model", None), jax.typeof(got_out).sharding
        np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), rtol=1e-5, atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        print(impl, "sharded == unsharded")
    with jax.set_mesh(mesh):
        qs = jax.device_put(q.astype(jnp.bfloat16), spec)
        why = jattn.explain(qs, qs, qs, is_causal=True, logits_soft_cap=30.0, platform="gpu")
        assert why.backend != "pallas" and "shard_map" in why.refused["pallas"], why
    print("pallas refuses sharded inputs")
    """
)


def test_explicit_mesh_sharded_equals_unsharded():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dense sharded == unsharded" in result.stdout and "chunked sharded == unsharded" in result.stdout
    assert "pallas refuses sharded inputs" in result.stdout
