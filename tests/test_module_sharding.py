"""Sharding: the modules' parameters carry logical axis names, so on a (data, model)
mesh of 8 CPU devices heads go over "model" and batch over "data"; the sharded module
(NNX and Linen, and decoding with a sharded cache) computes what the unsharded one does.

The check runs in a subprocess because the device count must be set before JAX
initialises (`jax_num_cpu_devices`).  Suite time: it compiles with most XLA passes off,
as the suite's own process does (tests/conftest.py), through
``JAX_DISABLE_MOST_OPTIMIZATIONS`` in its environment: compiling is most of its time,
and the SPMD partitioning it checks is not among the passes turned off."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import CHEAP_COMPILES

SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_default_matmul_precision", "highest")
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import jattn.linen
    import jattn.nnx
    from jattn.cache import KVCache

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    rules = jattn.nnx.LOGICAL_AXIS_RULES
    B, T, D, N, K, H = 4, 5, 12, 4, 2, 4
    opts = dict(num_kv_heads=K, head_dim=H, use_rope=True, qk_norm=True, use_bias=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    lengths = np.array([5, 2, 3, 4], np.int32)
    batch = NamedSharding(mesh, P("data", None, None))

    def close(got, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)

    # --- NNX: parameters created sharded under the mesh -------------------------
    forward = nnx.jit(lambda m, x: m(x))
    prefill = nnx.jit(lambda m, x, c, n: m(x, cache=c, lengths=n))
    plain = jattn.nnx.SelfAttention(D, N, **opts, rngs=nnx.Rngs(0))
    want = forward(plain, x)
    cache = KVCache.create(B, 8, K, H)
    want_p, want_cache = prefill(plain, x, cache, lengths)
    with jax.set_mesh(mesh):
        layer = jattn.nnx.SelfAttention(D, N, **opts, sharding_rules=rules, rngs=nnx.Rngs(0))
        assert layer.query.kernel[...].sharding.spec == P(None, "model", None), layer.query.kernel[...].sharding
        assert layer.key.kernel[...].sharding.spec == P(None, "model", None)
        assert layer.value.bias[...].sharding.spec == P("model", None)
        assert layer.out.kernel[...].sharding.spec == P("model", None, None)
        assert layer.query.kernel[...].addressable_shards[0].data.shape == (D, N // 2, H)
        close(layer.query.kernel[...], plain.query.kernel[...])   # same values, split up
        xs = jax.device_put(x, batch)
        got = forward(layer, xs)
        assert len(got.sharding.device_set) == 8
        close(got, want)

        # Decoding with a cache sharded like the parameters (batch, kv heads).
        specs = {f: nn.logical_to_mesh_axes(a, rules) for f, a in KVCache.logical_axes.items()}
        assert specs["keys"] == P("data", None, "model", None), specs
        cache_s = jax.tree.map(
            lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), cache, KVCache(**specs),
        )
        got_p, got_cache = prefill(layer, xs, cache_s, jnp.asarray(lengths))
        close(got_p, want_p)
        close(got_cache.keys, want_cache.keys)
        np.testing.assert_array_equal(got_cache.lengths, want_cache.lengths)

    # --- NNX: an unsharded state moved onto the mesh with get_partition_spec --------
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = nnx.state(plain)
        shardings = nnx.get_named_sharding(state, mesh)
        assert shardings["query"]["kernel"].get_value().spec == P(None, "model", None)
        moved = nnx.merge(nnx.graphdef(plain), jax.device_put(state, shardings))
        close(forward(moved, jax.device_put(x, batch)), want)

    # --- Linen: shardings from the boxed logical names --------------------------
    lin = jattn.linen.SelfAttention(num_heads=N, **opts)
    key = jax.random.key(1)
    unsharded = nn.meta.unbox(jax.jit(lin.init)(key, x))
    apply = jax.jit(lin.apply)
    want = apply(unsharded, x)
    with jax.set_mesh(mesh):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(lin.init, key, x)), mesh, rules)
        variables = jax.jit(lin.init, out_shardings=shardings)(key, x)
        kernel = variables["params"]["query"]["kernel"].value
        assert kernel.sharding.spec == P(None, "model", None), kernel.sharding
        close(kernel, unsharded["params"]["query"]["kernel"])
        got = apply(variables, jax.device_put(x, batch))
        assert len(got.sharding.device_set) == 8
        close(got, want)
    print("OK")
    """
)


def test_sharded_modules_match_unsharded_on_8_cpu_devices():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if CHEAP_COMPILES:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-6000:]}"
    assert result.stdout.strip().endswith("OK")
