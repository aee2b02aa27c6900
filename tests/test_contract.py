"""The backend contract fails closed: a backend serves only the features it declares,
and one registry is the only list of backends."""

import ast
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import pytest

import jattn
from jattn import call as call_lib
from jattn import dispatch
from jattn.attention import make_call
from jattn.backends import contract, registry


@dataclasses.dataclass(frozen=True)
class CallWithNewField(call_lib.AttentionCall):
    """What a developer adds next: a new field on the call, not yet declared."""

    made_up: int = 1


def _new_field_call(**kwargs):
    q = jnp.ones((1, 5, 2, 4))
    base = make_call(q, q, q, **kwargs)
    return CallWithNewField(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})


def test_every_call_field_declares_its_features():
    fields = {f.name for f in dataclasses.fields(call_lib.AttentionCall)}
    assert fields == set(call_lib.FIELD_FEATURES)
    declared = set().union(*(f(make_call(jnp.ones((1, 3, 1, 2)), jnp.ones((1, 3, 1, 2)), jnp.ones((1, 3, 1, 2)),
                                         is_causal=True)) for f in call_lib.FIELD_FEATURES.values()))
    assert declared <= set(call_lib.FEATURES)


def test_an_undeclared_field_is_refused_by_every_backend():
    call = _new_field_call()
    assert "made_up" in call.features()
    for name, backend in registry.BACKENDS.items():
        why = contract.refusal(backend, call, "cpu")
        assert why is not None and "'made_up'" in why, (name, why)
    with pytest.raises(ValueError, match="no backend can serve this call on cpu.*made_up"):
        dispatch.choose(call, "cpu")


def test_only_the_backend_that_declares_a_feature_serves_it(monkeypatch):
    monkeypatch.setitem(call_lib.FIELD_FEATURES, "made_up", lambda c: {"made_up_feature"} if c.made_up else set())
    monkeypatch.setitem(call_lib.FEATURES, "made_up_feature", "a made-up feature")
    dense = registry.BACKENDS["dense"]
    fake = dataclasses.replace(dense, name="fake", supports=dense.supports | {"made_up_feature"})
    monkeypatch.setitem(registry.BACKENDS, "fake", fake)

    call = dataclasses.replace(_new_field_call(), implementation="fake")
    choice = dispatch.choose(call, "cpu")
    assert choice.backend == "fake"
    for name in ("dense", "chunked", "cudnn", "pallas"):
        assert "a made-up feature" in contract.refusal(registry.BACKENDS[name], call, "cpu"), name
    with pytest.raises(ValueError, match="implementation='chunked' cannot serve this call: .*a made-up feature"):
        dispatch.choose(dataclasses.replace(call, implementation="chunked"), "cpu")
    # With the field at its neutral value nothing is asked of the backends.
    plain = dataclasses.replace(call, made_up=0, implementation=None)
    assert dispatch.choose(plain, "cpu").backend == "dense"


def test_explain_names_the_missing_feature():
    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    why = jattn.explain(q, q, q, platform="gpu", mask=jnp.ones((1, 1, 64, 64), bool))
    assert "boolean mask array" in why.refused["cudnn"] and "boolean mask array" in why.refused["pallas"]


def test_features_of_a_call():
    q = jnp.ones((2, 5, 2, 4))
    call = make_call(q, q, q, is_causal=True, query_offset=jnp.array([1, 2]), logits_soft_cap=5.0)
    assert call.features() == {"causal", "query_offset_array", "logits_soft_cap"}
    # An offset without a causal or window band changes nothing, so it is no feature.
    assert make_call(q, q, q, query_offset=3).features() == frozenset()


def test_implementation_values_come_from_the_registry():
    q = jnp.ones((1, 5, 2, 4))
    with pytest.raises(ValueError, match="expected one of None, 'xla', 'dense', 'chunked', 'cudnn', 'pallas'"):
        make_call(q, q, q, implementation="flash")


def test_no_backend_imports_another_backend():
    backend_modules = {b.run.__module__.rsplit(".", 1)[-1] for b in registry.BACKENDS.values()}
    folder = pathlib.Path(jattn.__file__).parent / "backends"
    for path in folder.glob("*.py"):
        if path.stem == "registry":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "jattn.backends":
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jattn.backends."):
                imported.add(node.module.rsplit(".", 1)[-1])
        others = (imported & backend_modules) - {path.stem}
        assert not others, f"{path.name} imports backend module(s) {sorted(others)}"


def test_forward_mode_is_a_feature_the_fused_backends_lack():
    """Under jax.jvp auto passes over the custom-VJP kernels (cuDNN, Pallas) on a GPU."""
    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    seen = []

    def f(q):
        seen.append(jattn.explain(q, q, q, is_causal=True, query_offset=3, platform="gpu"))
        return q

    jax.jvp(f, (q,), (q,))
    (why,) = seen
    assert why.backend == "dense", str(why)
    assert "forward-mode" in why.refused["pallas"] and "forward-mode" in why.refused["cudnn"]
    assert jattn.explain(q, q, q, is_causal=True, query_offset=3, platform="gpu").backend == "pallas"


def test_the_fused_kernels_run_per_device():
    """cuDNN, Pallas and splash compute on one device's arrays; on sharded inputs
    `jattn.backends.per_device` runs them in jax.shard_map (tests/test_sharding.py)."""
    per_device = {name for name, backend in registry.BACKENDS.items() if backend.per_device}
    assert per_device == {"cudnn", "pallas", "splash"}


def test_per_device_knows_every_field_that_holds_arrays():
    """The per-device path slices the arrays of the fields it knows and refuses a
    sharded call with arrays anywhere else; a call using every option holds arrays in
    exactly those fields."""
    from jattn import masks, score_mods
    from jattn.backends import per_device

    q = jnp.ones((2, 6, 2, 4))
    ids, lengths = jnp.zeros((2, 6), jnp.int32), jnp.array([6, 3])
    call = make_call(q, q, q, jnp.ones((1, 2, 6, 6)), masks.PrefixLM(jnp.array([1, 2])), is_causal=True,
                     query_offset=jnp.array([0, 1]), query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                     query_segment_ids=ids, score_mod=score_mods.ALiBi(num_heads=2, offset=jnp.array([0, 1])),
                     dropout_rate=0.1, dropout_rng=jax.random.key(0))
    call = dataclasses.replace(call, dropout_origin=(jnp.int32(1), 0, 0, 0))  # set by jattn for a block / slice
    holding = {f.name for f in dataclasses.fields(call) if per_device._arrays_in(getattr(call, f.name))}
    dense_mask = make_call(q, q, q, None, jnp.ones((6, 6), bool)).dense_mask
    assert holding | {"dense_mask"} == set(per_device.KNOWN_ARRAY_FIELDS) and dense_mask is not None
    assert per_device.plan(call) is None  # one device: nothing split, the backend runs as it is


def test_pallas_dropout_origin_moves_examples_and_heads_only():
    """A per-device slice moves the dropout hash's example and head; the kernels hash
    rows and keys from 0, so a row / key origin is refused."""
    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    call = make_call(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    pallas = registry.BACKENDS["pallas"]
    assert contract.refusal(pallas, dataclasses.replace(call, dropout_origin=(2, 4, 0, 0)), "gpu") is None
    why = contract.refusal(pallas, dataclasses.replace(call, dropout_origin=(0, 0, 64, 0)), "gpu")
    assert "row or key offset" in why, why
