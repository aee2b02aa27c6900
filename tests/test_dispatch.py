"""Backend choice as a pure function of the call and the platform (tested on CPU)."""

import jax
import jax.numpy as jnp
import pytest

import jattn
from jattn import dispatch, masks


def _inputs(T, S=None, dtype=jnp.bfloat16, H=64, N=8, K=8, B=1):
    S = T if S is None else S
    return jnp.zeros((B, T, N, H), dtype), jnp.zeros((B, S, K, H), dtype), jnp.zeros((B, S, K, H), dtype)


def test_cpu_short_sequences_take_dense_long_ones_chunked():
    short = jattn.explain(*_inputs(512), is_causal=True, platform="cpu")
    assert short.backend == "dense" and "short" in short.reason
    assert "cudnn" in short.refused and "GPU" in short.refused["cudnn"]
    long = jattn.explain(*_inputs(4096), is_causal=True, platform="cpu")
    assert long.backend == "chunked" and "O(T) memory" in long.reason
    assert "materialising" in long.refused["dense"]


def test_many_short_sequences_still_bound_dense_memory():
    # 1024 heads of 512x512 float32 scores is 1 GiB: dense; 4096 heads is 4 GiB: chunked.
    assert jattn.explain(*_inputs(512, B=128), platform="cpu").backend == "dense"
    crowded = jattn.explain(*_inputs(512, B=512), platform="cpu")
    assert crowded.backend == "chunked" and "GiB" in crowded.refused["dense"]


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_threshold_is_on_scores_per_head(platform):
    limit = dispatch.DENSE_MAX_SCORES[platform]
    # float32 keeps cuDNN out of the GPU case, float16 splash out of the TPU case.
    dtype = dict(dtype=jnp.float16 if platform == "tpu" else jnp.float32)
    at = jattn.explain(*_inputs(256, limit // 256, N=1, K=1, **dtype), platform=platform)
    over = jattn.explain(*_inputs(256, limit // 256 + 8, N=1, K=1, **dtype), platform=platform)
    assert (at.backend, over.backend) == ("dense", "chunked")


def test_gpu_prefers_cudnn_when_it_fits():
    choice = jattn.explain(*_inputs(4096), is_causal=True, platform="gpu")
    assert choice.backend == "cudnn"
    assert "chunked" in choice.refused and "dense" in choice.refused
    lengths = jnp.array([100], jnp.int32)
    assert jattn.explain(*_inputs(4096), query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                         platform="gpu").backend == "cudnn"
    assert jattn.explain(*_inputs(4096, N=8, K=2), local_window_size=(128, 0), platform="gpu").backend == "cudnn"


@pytest.mark.parametrize(
    "change, reason, fallback",
    [
        (dict(dtype=jnp.float32), "bfloat16 or float16", "dense"),
        (dict(H=96 + 4), "multiple of 8", "pallas"),
        (dict(H=256), "at most 128", "pallas"),
        (dict(kwargs=dict(dropout_rate=0.1, dropout_rng=jax.random.key(0))), "no dropout", "pallas"),
        (dict(kwargs=dict(logits_soft_cap=30.0)), "soft-capping", "pallas"),
        (dict(kwargs=dict(query_segment_ids=jnp.zeros((1, 4096), jnp.int32))), "segment ids", "pallas"),
        (dict(kwargs=dict(is_causal=True, query_offset=5)), "query_offset", "pallas"),
        (dict(kwargs=dict(local_window_size=(4, 4))), "right side", "pallas"),
        (dict(kwargs=dict(mask=masks.PrefixLM(10))), "mask object", "pallas"),
        (dict(kwargs=dict(mask=jnp.ones((1, 1, 4096, 4096), bool))), "boolean mask array", "dense"),
        (dict(kwargs=dict(score_mod=lambda s, h, i, j: s)), "score_mod", "pallas"),
        (dict(kwargs=dict(bias=jnp.zeros((1, 1, 1, 4096), jnp.bfloat16))), "span [T, S]", "pallas"),
    ],
)
def test_gpu_refuses_cudnn_with_the_reason(change, reason, fallback):
    kwargs = change.pop("kwargs", {})
    choice = jattn.explain(*_inputs(4096, **change), platform="gpu", **kwargs)
    assert choice.backend == fallback, str(choice)
    assert reason in choice.refused["cudnn"], choice.refused["cudnn"]


def test_return_weights_always_dense():
    for platform in ("cpu", "gpu", "tpu"):
        choice = jattn.explain(*_inputs(8192), return_weights=True, platform=platform)
        assert choice.backend == "dense" and "return_weights" in choice.reason


def test_explicit_implementation_is_obeyed_or_refused_with_reason():
    assert jattn.explain(*_inputs(64), implementation="chunked", platform="cpu").backend == "chunked"
    assert jattn.explain(*_inputs(64), implementation="xla", platform="cpu").backend == "dense"
    with pytest.raises(ValueError, match="'cudnn' cannot serve this call: needs bfloat16 or float16"):
        jattn.explain(*_inputs(64, dtype=jnp.float32), implementation="cudnn", platform="gpu")


def test_explanation_prints_every_backend():
    text = str(jattn.explain(*_inputs(4096), platform="cpu"))
    assert text.splitlines()[0].startswith("backend: chunked")
    assert "not cudnn:" in text and "not dense:" in text


def test_explain_rejects_unknown_arguments():
    with pytest.raises(TypeError, match="explain: unknown keyword argument 'causal' \\(did you mean 'is_causal'\\?\\)"):
        jattn.explain(*_inputs(64), causal=True)


def test_unsharded_inputs_say_nothing_of_shard_map():
    """Only inputs split over a mesh run per device (tests/test_sharding.py covers them)."""
    for platform, dtype in (("gpu", jnp.bfloat16), ("tpu", jnp.float32)):
        why = jattn.explain(*_inputs(4096, dtype=dtype), is_causal=True, platform=platform)
        assert why.backend in ("cudnn", "splash") and "shard_map" not in why.reason, why
