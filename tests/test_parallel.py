"""Context parallelism (`jattn.parallel`): a sequence split over a mesh axis of 2, 4 or
8 CPU devices gives the single-device call's outputs and gradients of q, k, v (fp32,
rtol 1e-5), for the ring and all-gather strategies, the contiguous and zig-zag
layouts, from `jax.jit` on a mesh and inside `jax.shard_map`, with causal / offset /
window bands, segment ids crossing shard boundaries, key lengths, GQA, soft-capping,
score modifiers and dropout (the same pattern as one device); Ulysses (heads split
by all-to-all) likewise.  Also: skipped ring
steps and the compiled program's collectives, zig-zag balance, errors, `explain`.

The device count must be set before JAX starts, so under a normal run this module
re-runs itself in a subprocess with ``JAX_NUM_CPU_DEVICES=8``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

DEVICES = 8

if len(jax.devices()) < DEVICES:

    def test_on_eight_cpu_devices():
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(DEVICES)}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
             os.path.abspath(__file__)],
            capture_output=True, text=True, env=env, timeout=900,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]

else:
    import jax.numpy as jnp
    from hypothesis import example, given, settings
    from hypothesis import strategies as st
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jattn
    from experiments import scaling
    from jattn import score_mods
    from jattn.attention import make_call
    from jattn.parallel import blocks, ring, unzigzag, zigzag

    def mesh_of(size: int, name: str = "seq"):
        return jax.make_mesh((size,), (name,), devices=jax.devices()[:size], axis_types=(AxisType.Explicit,))

    def inputs(B, T, S, N, K, H, seed=0):
        kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
        return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, S, K, H)),
                jax.random.normal(kv, (B, S, K, H)))

    def out_and_grads(fn, q, k, v):
        """``fn``'s output and the gradients of q, k, v of ``sum(out · cos)``, from one
        compiled program."""
        def weighted(q, k, v):
            out = fn(q, k, v)
            return (out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))).sum(), out
        (_, out), grads = jax.jit(jax.value_and_grad(weighted, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    def single_device(q, k, v, **kw):
        kw = {**kw, "implementation": "dense"}
        return out_and_grads(lambda q, k, v: jattn.dot_product_attention(q, k, v, **kw), q, k, v)

    def split_call(q, k, v, *, size, layout, **kw):
        """The call with the sequence split over a mesh of ``size`` devices (global
        mode, from jit), in natural order (laid out and back for the zig-zag layout)."""
        order = (lambda x: zigzag(x, size)) if layout == "zigzag" else (lambda x: x)
        back = (lambda x: unzigzag(x, size)) if layout == "zigzag" else (lambda x: x)
        arrays = {name: kw.pop(name) for name in ("query_segment_ids", "key_value_segment_ids") if name in kw}
        with jax.set_mesh(mesh_of(size)):
            def fn(q, k, v):
                extra = {n: order(a) for n, a in arrays.items()}
                return back(jattn.dot_product_attention(order(q), order(k), order(v), sequence_axis="seq",
                                                        sequence_layout=layout, **extra, **kw))
            return out_and_grads(fn, q, k, v)

    def assert_close(got, want):
        (out, grads), (want_out, want_grads) = got, want
        np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=2e-6)
        for name, g, w in zip("qkv", grads, want_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=2e-5, err_msg=f"d{name}")

    @st.composite
    def split_cases(draw):
        size = draw(st.sampled_from([2, 4]))  # 8 in the explicit examples (compiles cost)
        layout = draw(st.sampled_from(["contiguous", "zigzag"]))
        per = size * (2 if layout == "zigzag" else 1)
        T = per * draw(st.sampled_from([1, 2]))
        S = T if draw(st.booleans()) else per * draw(st.sampled_from([1, 3]))
        strategy = draw(st.sampled_from(["ring", "all_gather", "ulysses"]))
        # Ulysses splits the heads over the devices: K (and so N) a multiple of them.
        K = size * draw(st.sampled_from([1, 2])) if strategy == "ulysses" else draw(st.sampled_from([1, 2]))
        N = K * draw(st.sampled_from([1, 2]))
        B = draw(st.sampled_from([1, 2]))
        kw = {"sequence_strategy": strategy}
        if draw(st.booleans()):
            kw["is_causal"] = True
        if draw(st.booleans()):
            kw["local_window_size"] = (draw(st.integers(0, T)), draw(st.integers(0, T)))
        if ("is_causal" in kw or "local_window_size" in kw) and draw(st.booleans()):
            kw["query_offset"] = draw(st.integers(-2, 3))
        if draw(st.booleans()) and S == T:
            kw["query_segment_ids"] = jnp.asarray(np.sort(np.random.default_rng(T).integers(0, 3, (B, T)), axis=1))
        if draw(st.booleans()):
            kw["key_value_seq_lengths"] = jnp.asarray(np.random.default_rng(S).integers(0, S + 1, (B,)))
        if draw(st.booleans()):
            kw["logits_soft_cap"] = 2.0
        if draw(st.booleans()):
            kw["score_mod"] = score_mods.ALiBi(N)
        if draw(st.booleans()):
            kw.update(dropout_rate=0.3, dropout_rng=jax.random.key(7))
        return dict(B=B, T=T, S=S, N=N, K=K, size=size, layout=layout, kw=kw)

    @settings(max_examples=max(4, settings.default.max_examples // 2))
    @given(split_cases())
    @example(dict(B=2, T=16, S=16, N=4, K=2, size=8, layout="zigzag",
                  kw=dict(sequence_strategy="ring", is_causal=True, logits_soft_cap=2.0,
                          dropout_rate=0.3, dropout_rng=jax.random.key(3),
                          query_segment_ids=jnp.asarray(np.repeat(np.arange(4), 4)[None].repeat(2, 0))))).via("causal zig-zag ring")
    @example(dict(B=1, T=16, S=8, N=2, K=1, size=4, layout="contiguous",
                  kw=dict(sequence_strategy="all_gather", is_causal=True, query_offset=-3,
                          key_value_seq_lengths=jnp.asarray([5]), score_mod=score_mods.ALiBi(2)))).via("cross all-gather")
    @example(dict(B=1, T=32, S=32, N=2, K=1, size=2, layout="zigzag",
                  kw=dict(sequence_strategy="all_gather", is_causal=True, implementation="chunked",
                          block_sizes=(4, 4)))).via("all-gather over chunked tiles (a traced offset)")
    @example(dict(B=1, T=16, S=16, N=2, K=2, size=4, layout="contiguous",
                  kw=dict(sequence_strategy="ring", local_window_size=(3, 0)))).via("window skips steps")
    @example(dict(B=2, T=16, S=16, N=2, K=1, size=4, layout="zigzag",
                  kw=dict(sequence_strategy="ring", is_causal=True, local_window_size=(6, 2),
                          query_offset=jnp.asarray([2, -3])))).via("per-example offsets")
    @example(dict(B=2, T=32, S=32, N=16, K=8, size=8, layout="zigzag",
                  kw=dict(sequence_strategy="ulysses", is_causal=True, score_mod=score_mods.ALiBi(16),
                          dropout_rate=0.3, dropout_rng=jax.random.key(5), key_value_seq_lengths=jnp.asarray([29, 32]),
                          query_segment_ids=jnp.asarray(np.repeat(np.arange(4), 8)[None].repeat(2, 0))))).via(
        "zig-zag Ulysses: heads, segments, dropout")
    def test_split_equals_single_device(case):
        q, k, v = inputs(case["B"], case["T"], case["S"], case["N"], case["K"], 4)
        want = single_device(q, k, v, **case["kw"])
        got = split_call(q, k, v, size=case["size"], layout=case["layout"], **dict(case["kw"]))
        assert_close(got, want)

    def test_inside_shard_map_with_batch_and_heads_split_too():
        """Local mode: the user's shard_map over (data, seq); batch over data.  The
        automatic strategy (ring) and Ulysses (heads a multiple of the 4 devices)."""
        mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
        spec = P("data", "seq", None, None)
        for strategy, heads, kv_heads in ((None, 4, 2), ("ulysses", 8, 4)):
            q, k, v = inputs(2, 16, 16, heads, kv_heads, 8)
            kw = dict(is_causal=True, score_mod=score_mods.ALiBi(heads), logits_soft_cap=3.0)
            want = single_device(q, k, v, **kw)

            def local(q, k, v):
                return jattn.dot_product_attention(q, k, v, sequence_axis="seq", sequence_strategy=strategy, **kw)

            with jax.set_mesh(mesh):
                fn = jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec)
                put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
                out, grads = out_and_grads(fn, put(q), put(k), put(v))
            assert_close((out, grads), want)

    def test_automatic_split_from_the_inputs_sharding():
        """sequence_axis=None: q/k/v sharded along T over an explicit-axis mesh are split
        over that axis (batch over data and heads over model stay as they are)."""
        q, k, v = inputs(2, 16, 16, 4, 2, 8)
        # ALiBi: each head shard's blocks must see global head indices (Shifted.head_origin)
        kw = dict(is_causal=True, dropout_rate=0.2, dropout_rng=jax.random.key(1), score_mod=score_mods.ALiBi(4))
        want = single_device(q, k, v, **kw)
        mesh = jax.make_mesh((2, 2, 2), ("data", "seq", "model"), axis_types=(AxisType.Explicit,) * 3)
        spec = NamedSharding(mesh, P("data", "seq", "model", None))
        with jax.set_mesh(mesh):
            fn = lambda q, k, v: jattn.dot_product_attention(q, k, v, **kw)
            args = [jax.device_put(x, spec) for x in (q, k, v)]
            why = jattn.explain(*args, **kw)
            out, grads = out_and_grads(fn, *args)
            assert jax.typeof(out).sharding.spec == P("data", "seq", "model", None)
        assert why.sequence is not None and "'seq'" in why.sequence, str(why)
        assert_close((out, grads), want)
        # Ulysses splits each "model" shard's heads again (8 heads: 4 a shard, 2 a device)
        q, k, v = inputs(2, 16, 16, 8, 4, 8)
        kw["score_mod"] = score_mods.ALiBi(8)
        want = single_device(q, k, v, **kw)
        with jax.set_mesh(mesh):
            args = [jax.device_put(x, spec) for x in (q, k, v)]
            got = out_and_grads(lambda q, k, v: jattn.dot_product_attention(
                q, k, v, sequence_strategy="ulysses", **kw), *args)
        assert_close(got, want)

    def test_all_gather_returns_the_weights_of_one_device():
        """return_weights with a split sequence (all-gather; the ring refuses it): each
        device returns whole rows [B, N, T/P, S], keys in natural order."""
        q, k, v = inputs(1, 16, 16, 2, 1, 4)
        kw = dict(is_causal=True, dropout_rate=0.25, dropout_rng=jax.random.key(4), return_weights=True)
        want_out, want_w = jattn.dot_product_attention(q, k, v, implementation="dense", **kw)
        with jax.set_mesh(mesh_of(4)):
            out, w = jax.jit(lambda q, k, v: jattn.dot_product_attention(
                q, k, v, sequence_axis="seq", sequence_layout="zigzag", **kw))(zigzag(q, 4), zigzag(k, 4), zigzag(v, 4))
        np.testing.assert_allclose(np.asarray(unzigzag(w, 4, axis=2)), np.asarray(want_w), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(unzigzag(out, 4)), np.asarray(want_out), rtol=1e-5, atol=1e-6)

    def test_ring_blocks_on_the_fused_kernels(monkeypatch):
        """implementation="pallas" serves every block of a causal ring (the kernels
        differentiate their lse): outputs and gradients equal one device's.  On a CPU
        the kernels run through the Pallas interpreter (`pallas.run(call, "cpu")`),
        which their platform limit would otherwise refuse."""
        from jattn import dispatch

        pallas = dispatch.BACKENDS["pallas"]
        monkeypatch.setitem(dispatch.BACKENDS, "pallas", dataclasses.replace(pallas, limits=lambda call, platform: None))
        q, k, v = inputs(1, 64, 64, 2, 1, 16)
        want = single_device(q, k, v, is_causal=True, logits_soft_cap=4.0)
        got = split_call(q, k, v, size=2, layout="contiguous", is_causal=True, logits_soft_cap=4.0,
                         sequence_strategy="ring", implementation="pallas")
        assert_close(got, want)

    def test_composes_with_jax_transformations():
        """The ring, the all-gather and Ulysses under grad of jit, `jax.checkpoint`
        inside a `lax.scan` over two layers and `jax.vmap` over an extra leading axis,
        with rank promotion "raise" and strict dtype promotion: the one-device values
        and gradients."""

        def layers(q, k, v, **kw):
            def body(x, _):
                return x + jattn.dot_product_attention(x, k, v, is_causal=True, **kw), None
            return jax.lax.scan(jax.checkpoint(body), q, None, length=2)[0]

        def batched(q, k, v, **kw):  # vmap over a leading axis of 2 copies (the second scaled)
            stack = lambda x: jnp.stack([x, 0.5 * x])
            return jax.vmap(lambda q, k, v: layers(q, k, v, **kw))(stack(q), stack(k), stack(v)).sum(0)

        for strategy, heads, kv_heads in (("ring", 2, 1), ("all_gather", 2, 1), ("ulysses", 8, 4)):
            q, k, v = inputs(2, 16, 16, heads, kv_heads, 4)
            want = out_and_grads(lambda q, k, v: batched(q, k, v, implementation="dense"), q, k, v)
            with jax.set_mesh(mesh_of(4)), jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
                got = out_and_grads(lambda q, k, v: batched(q, k, v, sequence_axis="seq",
                                                            sequence_strategy=strategy), q, k, v)
            assert_close(got, want)

    def test_score_mod_leaves_get_the_single_device_gradient():
        """A learned bias table held by a score modifier (a pytree leaf, indexed at global
        positions) is shared by every device: its gradient sums over the ring steps
        and the devices."""
        T, N = 16, 2
        q, k, v = inputs(1, T, T, N, 1, 4)
        table = jax.random.normal(jax.random.key(5), (T, T))

        def total(table, **kw):
            out = jattn.dot_product_attention(q, k, v, is_causal=True, score_mod=score_mods.Bias(table), **kw)
            return (out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))).sum()

        want = jax.jit(jax.grad(lambda t: total(t, implementation="dense")))(table)
        with jax.set_mesh(mesh_of(4)):
            got = jax.jit(jax.grad(lambda t: total(t, sequence_axis="seq", sequence_strategy="ring")))(table)
        assert float(jnp.abs(want).max()) > 0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    def _compiled_text(fn, *args, mesh):
        """The compiled program of ``fn`` on ``args`` split along T over ``mesh``'s
        "seq" axis (as a context-parallel model holds them: the result stays split, so
        nothing is gathered back)."""
        split = NamedSharding(mesh, P(None, "seq"))
        args = [jax.device_put(x, split) for x in args]
        return jax.jit(fn).lower(*args).compile().as_text()

    def _count(op: str, text: str) -> int:
        return len(re.findall(rf"= [^=]*\b{op}(?:-start)?\(", text))

    @pytest.mark.parametrize("window,steps", [(None, 8), ((5, 0), 3)])
    def test_ring_sends_one_block_per_step_and_never_gathers(window, steps):
        """8 devices, 4 tokens each.  Steps 1.. of the ring are one loop whose body
        sends k and v once (two collective-permutes of one block, to the next device);
        the compiled loop runs 7 times (P - 1 sends), and 2 times with a window of 5
        keys back (3 steps).  No all-gather anywhere."""
        q, k, v = inputs(1, 32, 32, 2, 2, 4)
        kw = dict(is_causal=True, local_window_size=window, sequence_axis="seq", sequence_strategy="ring")
        call = make_call(q, k, v, is_causal=True, local_window_size=window)
        assert len(ring.steps(blocks.static_of(call, "seq", 8, "cpu", 32, 32))) == steps
        with jax.set_mesh(mesh := mesh_of(8)):
            text = _compiled_text(lambda q, k, v: jattn.dot_product_attention(q, k, v, **kw), q, k, v, mesh=mesh)
        sends = re.findall(r"= f32\[([\d,]+)\][^\n]* collective-permute(?:-start)?\(.*source_target_pairs=\{([^\n]*?)\}\}.*op_name=\"([^\"]*)\"", text)
        assert len(sends) == 2, sends
        # The bytes docs/scaling.md's model counts per step are what the program sends.
        sent = sum(4 * int(np.prod([int(d) for d in shape.split(",")])) for shape, _, _ in sends)
        assert sent == scaling.ring_step_bytes(batch=1, block=4, kv_heads=2, head_dim=4, itemsize=4), sends
        sends = [(pairs, where) for _, pairs, where in sends]
        ring_pairs = ",".join("{%d,%d}" % (i, (i + 1) % 8) for i in range(8))
        assert all(pairs + "}" == ring_pairs and "/while/body/" in where for pairs, where in sends), sends
        computation = lambda name: re.search(re.escape(name) + r" [^{]*\{(.*?)\n\}", text, re.S).group(1)
        loops = re.findall(r"while\([^)]*\), condition=%([\w.\-]+), body=%([\w.\-]+)", text)
        ring_loops = [cond for cond, body in loops if "collective-permute" in computation(body)]
        assert len(ring_loops) == 1, loops  # (the others: a step's pieces, chunked's tiles)
        trip = re.findall(r"s32\[\] constant\((\d+)\)", computation(ring_loops[0]))
        assert trip == [str(steps - 1)], computation(ring_loops[0])
        assert _count("all-gather", text) == 0

    @pytest.mark.xla_optimized  # memory as a user's program compiles
    def test_per_device_memory_is_at_most_one_and_a_half_shares():
        """The target docs/scaling.md records: XLA's memory analysis of a causal
        forward+backward at T = 32k split over 8 devices (a ring, both layouts) is at
        most 1.5/8 of the one-device chunked program's (arguments + outputs +
        temporaries)."""
        one = scaling.per_device_bytes(32768, 1)
        for layout in ("zigzag", "contiguous"):
            split = scaling.per_device_bytes(32768, 8, layout=layout)
            assert split <= 1.5 / 8 * one, f"{layout}: {split / 2**20:.1f} MiB per device = {split / one:.4f}"

    def test_ulysses_trades_the_split_with_four_all_to_alls():
        """q, k, v go to a head split and the output comes back: four all-to-alls (each
        sends a shard's eight head groups of [1, 4, 1, 4]), nothing gathered or sent
        round a ring (no segment ids here; the unused lse never travels)."""
        q, k, v = inputs(1, 32, 32, 8, 8, 4)
        with jax.set_mesh(mesh := mesh_of(8)):
            text = _compiled_text(lambda q, k, v: jattn.dot_product_attention(
                q, k, v, is_causal=True, sequence_axis="seq", sequence_strategy="ulysses"), q, k, v, mesh=mesh)
        exchanges = re.findall(r"^\s*%all-to-all[.\d]* = \(([^)]*)\) all-to-all\(", text, re.M)
        assert len(exchanges) == 4, exchanges
        assert all(re.sub(r"\{[\d,]+\}|/\*index=\d+\*/", "", e).replace(" ", "") == ",".join(["f32[1,4,1,4]"] * 8)
                   for e in exchanges), exchanges
        assert _count("all-gather", text) == 0 and _count("collective-permute", text) == 0

    def test_all_gather_gathers_only_keys_and_values():
        q, k, v = inputs(1, 32, 32, 4, 1, 4)
        with jax.set_mesh(mesh := mesh_of(8)):
            text = _compiled_text(lambda q, k, v: jattn.dot_product_attention(
                q, k, v, is_causal=True, sequence_axis="seq", sequence_strategy="all_gather"), q, k, v, mesh=mesh)
        gathered = re.findall(r"(\S+) all-gather(?:-start)?\(", text)
        assert gathered, "expected an all-gather of K/V"
        assert all("f32[1,32,1,4]" in shape for shape in gathered), gathered  # K/V [B, S, K, H], never q

    def test_zigzag_balances_causal_work():
        """Pieces (4 × 4 tokens) computed per device over the ring: 17 on every device
        under zig-zag; 4p + 3 under the contiguous layout (p blocks of 2 × 2 pieces,
        and the diagonal block's empty quarter skipped)."""
        q = jnp.zeros((1, 64, 1, 4))
        call = make_call(q, q, q, is_causal=True)
        work = {}
        for layout in ("contiguous", "zigzag"):
            call_ = dataclasses.replace(call, sequence_layout=layout)
            table = blocks.ring_table(blocks.static_of(call_, "seq", 8, "cpu", 64, 64))
            work[layout] = [int((table[p] != blocks.EMPTY).sum()) for p in range(8)]
        assert work["zigzag"] == [17] * 8, work
        assert work["contiguous"] == [4 * p + 3 for p in range(8)], work

    def test_bad_inputs_name_the_argument():
        q, k, v = inputs(1, 12, 12, 2, 2, 4)
        with jax.set_mesh(mesh_of(8)):
            with pytest.raises(ValueError, match=r"query: sequence length 12 is not a multiple of 8"):
                jattn.dot_product_attention(q, k, v, sequence_axis="seq")
            with pytest.raises(ValueError, match=r"sequence_axis: got 'ctx'.*axes \('seq',\)"):
                jattn.dot_product_attention(q, k, v, sequence_axis="ctx")
            q16, k16, v16 = inputs(1, 16, 16, 2, 2, 4)
            with pytest.raises(ValueError, match=r"sequence_strategy='ring' cannot serve.*weights"):
                jattn.dot_product_attention(q16, k16, v16, sequence_axis="seq", sequence_strategy="ring",
                                            return_weights=True)
            with pytest.raises(ValueError, match=r"bias: a \[B, N, T, S\] array cannot follow"):
                jattn.dot_product_attention(q16, k16, v16, bias=jnp.zeros((16, 16)), sequence_axis="seq")
            with pytest.raises(ValueError, match=r"sequence_strategy='ulysses' cannot serve.*N=2 query heads "
                                                 r"and K=2 key/value heads \(per head shard\) must both be multiples of the 8"):
                jattn.dot_product_attention(q16, k16, v16, sequence_axis="seq", sequence_strategy="ulysses")
        # 4 heads over 4 devices, but already split over "model": 2 heads a shard, too few
        mesh = jax.make_mesh((4, 2), ("seq", "model"), axis_types=(AxisType.Explicit,) * 2)
        with jax.set_mesh(mesh):
            q4 = jax.device_put(inputs(1, 16, 16, 4, 4, 4)[0], NamedSharding(mesh, P(None, "seq", "model", None)))
            with pytest.raises(ValueError, match=r"N=2 query heads and K=2 key/value heads \(per head shard\)"):
                jattn.dot_product_attention(q4, q4, q4, sequence_axis="seq", sequence_strategy="ulysses")
            with pytest.raises(ValueError, match=r"sequence_strategy: got 'ulises'; expected .*'ulysses'"):
                jattn.dot_product_attention(q16, k16, v16, sequence_axis="seq", sequence_strategy="ulises")
        with pytest.raises(ValueError, match=r"sequence_axis: got 'seq', but no mesh is set"):
            jattn.dot_product_attention(q, k, v, sequence_axis="seq")

    def test_explain_says_which_strategy_and_why():
        with jax.set_mesh(mesh_of(8)):
            q = jnp.zeros((1, 64, 8, 4))
            gqa = jnp.zeros((1, 64, 1, 4))
            few_kv = jattn.explain(q, gqa, gqa, is_causal=True, sequence_axis="seq")
            assert few_kv.sequence.startswith("all_gather") and "kv heads" in few_kv.sequence, few_kv
            windowed = jattn.explain(q, q, q, is_causal=True, local_window_size=(4, 0), sequence_axis="seq")
            assert windowed.sequence.startswith("ring") and "2 of 8 ring steps" in windowed.sequence, windowed
            many_kv = jattn.explain(q, q, q, sequence_axis="seq")
            assert many_kv.sequence.startswith("ring") and many_kv.backend in ("dense", "chunked"), many_kv
            weights = jattn.explain(q, q, q, sequence_axis="seq", return_weights=True)
            assert weights.sequence.startswith("all_gather") and weights.backend == "dense", weights
            heads = jattn.explain(q, q, q, is_causal=True, sequence_axis="seq", sequence_strategy="ulysses")
            assert heads.sequence.startswith("ulysses") and "requested" in heads.sequence, heads

    def test_modules_take_a_split_sequence_with_zigzag_positions():
        """jattn.nnx / jattn.linen SelfAttention (causal, RoPE) with the sequence split
        over 4 devices in zig-zag order and RoPE positions from `zigzag_positions`
        give the unsplit module's outputs, reordered."""
        from flax import nnx

        import jattn.linen
        import jattn.nnx
        from jattn.parallel import zigzag_positions

        x = jax.random.normal(jax.random.key(2), (2, 32, 16))
        split = dict(sequence_axis="seq", sequence_layout="zigzag")
        positions = jnp.asarray(zigzag_positions(32, 4))
        want = jattn.nnx.SelfAttention(16, 4, num_kv_heads=2, use_rope=True, rngs=nnx.Rngs(0))(x)
        layer = jattn.nnx.SelfAttention(16, 4, num_kv_heads=2, use_rope=True, rngs=nnx.Rngs(0), **split)
        linen = jattn.linen.SelfAttention(num_heads=4, num_kv_heads=2, use_rope=True)
        params = linen.init(jax.random.key(0), x)
        linen_want = linen.apply(params, x)
        with jax.set_mesh(mesh_of(4)):
            got = jax.jit(lambda x: layer(x, positions=positions))(zigzag(x, 4))
            linen_split = jattn.linen.SelfAttention(num_heads=4, num_kv_heads=2, use_rope=True, **split)
            linen_got = jax.jit(lambda x: linen_split.apply(params, x, positions=positions))(zigzag(x, 4))
        np.testing.assert_allclose(np.asarray(unzigzag(got, 4)), np.asarray(want), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(unzigzag(linen_got, 4)), np.asarray(linen_want), rtol=1e-5, atol=1e-5)
