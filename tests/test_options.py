"""The option schema (`jattn.options`) is the one place the keyword options of
`dot_product_attention` are declared: every function that takes them derives its
signature from it, and validation takes exactly them."""

import inspect

import jax

import jax.numpy as jnp
import pytest

import jattn
from jattn import cache, options
from jattn.attention import explain, make_call
from jattn.call import validate


def _keyword_only(fn) -> dict:
    return {
        name: p.default for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


@pytest.mark.parametrize("fn", [jattn.dot_product_attention, make_call], ids=lambda f: f.__name__)
def test_entry_points_take_exactly_the_schema(fn):
    assert _keyword_only(fn) == options.DEFAULTS
    positional = [n for n, p in inspect.signature(fn).parameters.items()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == ["query", "key", "value", "bias", "mask"]  # jax.nn's order


def test_entry_point_keeps_jax_nn_signature():
    """Every parameter of jax.nn.dot_product_attention exists with the same default."""
    ours = inspect.signature(jattn.dot_product_attention).parameters
    for name, p in inspect.signature(jax.nn.dot_product_attention).parameters.items():
        assert name in ours, name
        assert ours[name].default == p.default, name
        assert ours[name].kind == p.kind, name


def test_explain_takes_the_schema_and_platform():
    kw = _keyword_only(explain)
    assert kw.pop("platform") is None
    assert kw == options.DEFAULTS


def test_decode_attention_takes_the_schema_less_what_the_cache_sets():
    kw = _keyword_only(cache.decode_attention)
    for own in ("num_new", "bias", "mask"):
        kw.pop(own)
    expected = {n: options.DEFAULTS[n] for n in cache.DECODE_OPTIONS}
    expected["is_causal"] = True
    assert kw == expected
    assert "query_offset" not in kw and "key_value_seq_lengths" not in kw


def test_validate_takes_exactly_the_schema():
    assert set(_keyword_only(validate)) == set(options.names())


def test_docstrings_document_every_option():
    for fn, names in ((jattn.dot_product_attention, options.names()), (cache.decode_attention, cache.DECODE_OPTIONS)):
        for name in names:
            assert f"      {name}: {options.OPTIONS_BY_NAME[name].doc}" in fn.__doc__, (fn.__name__, name)
        assert "{options}" not in fn.__doc__


def test_unknown_option_is_named_with_a_suggestion():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(TypeError, match=r"dot_product_attention: unknown keyword argument 'is_casual' \(did you mean 'is_causal'\?\)"):
        jattn.dot_product_attention(q, q, q, is_casual=True)
    with pytest.raises(TypeError, match="decode_attention: unknown keyword argument 'query_offset'"):
        c = cache.KVCache.create(batch_size=1, max_length=4, num_kv_heads=1, head_dim=8)
        cache.decode_attention(q[:, :1], q[:, :1], q[:, :1], c, query_offset=3)


def test_roles_partition_the_options():
    roles = {o.role for o in options.OPTIONS}
    assert roles == {"call", "config", "managed"}
    assert sorted(options.names("call") + options.names("config") + options.names("managed")) == sorted(options.names())


def test_flax_modules_take_the_schema_options():
    """Constructor: the "config" options with the schema's defaults; call: the "call"
    options likewise (NNX and Linen), so a new option reaches the modules unchanged."""
    import dataclasses

    import jattn.linen
    import jattn.nnx

    init = inspect.signature(jattn.nnx.MultiHeadAttention.__init__).parameters
    linen_fields = {f.name: f.default for f in dataclasses.fields(jattn.linen.MultiHeadAttention)}
    for name in options.names("config"):
        assert init[name].default == options.DEFAULTS[name], name
        assert linen_fields[name] == options.DEFAULTS[name], name
    for module in (jattn.nnx.MultiHeadAttention, jattn.linen.MultiHeadAttention):
        call = inspect.signature(module.__call__).parameters
        for name in options.names("call"):
            assert call[name].default == options.DEFAULTS[name], (module, name)
