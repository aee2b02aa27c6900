"""The transformer of the experiments, built from jattn's NNX modules.

``tokens [B, T] -> embed (+ learned positions) -> L x [x + attn(norm(x));
x + mlp(norm(x))] -> norm -> head -> logits [B, T, V]``: a decoder (causal) or an
encoder (bidirectional, with padding given by ``lengths``).  Tasks build their models
from these parts (`experiments.tasks`).

The attention layer of every block comes from `make_attention`, a factory keyed by
``model.attention.module``: ``"jattn"`` is `jattn.nnx.SelfAttention` (backend chosen by
``model.attention.implementation``); ``"flax"`` is ``flax.nnx.MultiHeadAttention``
with the same shapes, parameter names and no biases (RoPE applied to its q and k
through its ``attention_fn``), so the two differ only in the attention code: drawn
from the same key, they start from identical weights (the baseline for comparisons).
Both expose one method, ``attend``, which returns an `AttentionOutput`; a block calls
it without knowing which module it holds.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> model = Transformer(ModelConfig(d_model=32, num_heads=4, mlp_dim=64),
  ...                     vocab_size=11, max_len=16, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 16), jnp.int32)).shape
  (2, 16, 11)
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import model_validator

import jattn
import jattn.nnx
from experiments.schema import ConfigError, Float, PositiveInt, Section
from jattn.positional import apply_rope


class AttentionOutput(NamedTuple):
    """What an attention layer's ``attend`` returns: ``out [B, T, D]``, the new KV
    cache (None without a cache) and the weights ``[B, N, T, S]`` (None unless asked)."""

    out: jax.Array
    cache: Any
    weights: jax.Array | None


def unpack_jattn(result, *, with_cache: bool, with_weights: bool) -> AttentionOutput:
    """The return value of a jattn module call as an `AttentionOutput`.

    jattn's modules return by one rule: ``out``, then the new cache if a cache was
    passed, then the weights if ``return_weights=True``; a tuple when more than one.
    So the caller's own arguments say what came back.

    >>> unpack_jattn(("o", "w"), with_cache=False, with_weights=True)
    AttentionOutput(out='o', cache=None, weights='w')
    """
    if not (with_cache or with_weights):
        return AttentionOutput(result, None, None)
    out, *rest = result
    cache = rest.pop(0) if with_cache else None
    weights = rest.pop(0) if with_weights else None
    return AttentionOutput(out, cache, weights)


class JattnAttention(jattn.nnx.SelfAttention):
    """`jattn.nnx.SelfAttention` as the attention layer of a block."""

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, max_len: int, dtype, rngs: nnx.Rngs) -> JattnAttention:
        check_implementation(cfg, max_len)
        a = cfg.attention
        return cls(
            in_features=cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=a.num_kv_heads, use_bias=False, dtype=dtype,
            dropout_rate=cfg.dropout, qk_norm=a.qk_norm, use_rope=cfg.positions == "rope",
            implementation=a.implementation, keep_rngs=False, rngs=rngs,
            **({"sequence_axis": a.sequence_axis} if a.sequence_axis else {}),
        )

    def attend(self, x_BTD, *, causal: bool, positions_BT=None, lengths_B=None, cache=None,
               deterministic: bool = True, rngs=None, return_weights: bool = False) -> AttentionOutput:
        result = self(
            x_BTD, positions=positions_BT, is_causal=causal, lengths=lengths_B, cache=cache,
            deterministic=deterministic, rngs=rngs, return_weights=return_weights,
        )
        return unpack_jattn(result, with_cache=cache is not None, with_weights=return_weights)


def rope_then_flax_attention(query, key, value, *args, **kwargs):
    """Flax's ``dot_product_attention`` after rotating q ``[B, T, N, H]`` and k
    ``[B, S, K, H]`` by their positions 0..T-1 (RoPE, `jattn.positional.apply_rope`):
    the baseline's ``attention_fn`` when ``model.positions='rope'``, so that both
    models compute the same function."""
    query = apply_rope(query, jnp.arange(query.shape[-3]))
    key = apply_rope(key, jnp.arange(key.shape[-3]))
    return nnx.dot_product_attention(query, key, value, *args, **kwargs)


class FlaxAttention(nnx.MultiHeadAttention):
    """``flax.nnx.MultiHeadAttention`` as the attention layer of a block: the baseline."""

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, max_len: int, dtype, rngs: nnx.Rngs) -> FlaxAttention:
        del max_len
        a = cfg.attention
        extra = {"attention_fn": rope_then_flax_attention} if cfg.positions == "rope" else {}
        return cls(
            num_heads=cfg.num_heads, in_features=cfg.d_model, num_kv_heads=a.num_kv_heads,
            use_bias=False, dropout_rate=cfg.dropout, normalize_qk=a.qk_norm, decode=False,
            dtype=dtype, keep_rngs=False, rngs=rngs, kernel_metadata=logical_axes("embed", "heads", "head_dim"),
            out_kernel_metadata=logical_axes("heads", "head_dim", "embed"), **extra,
        )

    def create_cache(self, batch_size: int, max_length: int, dtype=None):
        raise ValueError("decoding with a KV cache needs model.attention.module='jattn'")

    def attend(self, x_BTD, *, causal: bool, positions_BT=None, lengths_B=None, cache=None,
               deterministic: bool = True, rngs=None, return_weights: bool = False) -> AttentionOutput:
        del positions_BT  # RoPE, if any, rotates by 0..T-1 in the attention_fn
        if cache is not None:
            raise ValueError("decoding with a KV cache needs model.attention.module='jattn'")
        mask = None
        if lengths_B is not None:
            valid_BT = jnp.arange(x_BTD.shape[1])[None, :] < lengths_B[:, None]
            mask = nnx.make_attention_mask(valid_BT, valid_BT)

        def call(attn, h_BTD):
            return attn(h_BTD, mask=mask, is_causal=causal, deterministic=deterministic, rngs=rngs,
                        sow_weights=return_weights)

        if not return_weights:
            return AttentionOutput(call(self, x_BTD), None, None)
        # Flax hands the weights out only as a sowed intermediate.
        out, sowed = nnx.capture(call, nnx.Intermediate)(self, x_BTD)
        (weights,) = jax.tree.leaves(sowed["attention_weights"])
        return AttentionOutput(out, None, weights)


# The attention modules a block can hold, by the name ``model.attention.module`` takes.
ATTENTION_MODULES = {"jattn": JattnAttention, "flax": FlaxAttention}


class AttentionConfig(Section):
    """The attention layer of every block.

    ``module="jattn"`` uses `jattn.nnx.SelfAttention` with backend ``implementation``
    (None: automatic, see `jattn.explain`); ``module="flax"`` swaps in
    ``flax.nnx.MultiHeadAttention``, the baseline for comparisons.
    """

    module: Literal[tuple(ATTENTION_MODULES)] = "jattn"
    implementation: str | None = None
    num_kv_heads: PositiveInt | None = None  # None: as many as query heads (no GQA)
    qk_norm: bool = False  # jattn: RMSNorm of q and k over H; flax: its LayerNorm (normalize_qk)
    # Context parallelism: the mesh axis the activations' sequence is split over, which
    # jattn's attention then serves by ring / all-gather attention.  Leave it null: the
    # run sets it to "context" when mesh.context > 1 (an explicit mesh axis).
    sequence_axis: Literal["context"] | None = None


class ModelConfig(Section):
    """Sizes of the transformer (see `experiments.model`)."""

    num_layers: PositiveInt = 2
    d_model: PositiveInt = 64
    num_heads: PositiveInt = 4
    mlp_dim: PositiveInt = 256
    positions: Literal["learned", "rope"] = "learned"
    dropout: Float = 0.0
    attention: AttentionConfig = AttentionConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        a = self.attention
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be a multiple of model.num_heads ({self.num_heads})")
        if a.num_kv_heads is not None and self.num_heads % a.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                             f"model.attention.num_kv_heads ({a.num_kv_heads})")
        if self.positions == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"model.positions='rope' needs an even head dim; model.d_model / "
                             f"model.num_heads = {self.d_model // self.num_heads}")
        if a.module == "flax" and a.implementation is not None:
            raise ValueError(f"model.attention.implementation={a.implementation!r} applies to module='jattn' "
                             "only; flax.nnx.MultiHeadAttention has no backend choice (set it to null)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1); got {self.dropout}")
        return self


def make_attention(cfg: ModelConfig, *, max_len: int, dtype, rngs: nnx.Rngs):
    """The attention layer ``model.attention.module`` names (see `ATTENTION_MODULES`)."""
    return ATTENTION_MODULES[cfg.attention.module].from_config(cfg, max_len=max_len, dtype=dtype, rngs=rngs)


def check_implementation(cfg: ModelConfig, max_len: int) -> None:
    """Raise ConfigError, naming ``model.attention.implementation``, if jattn cannot
    serve this model's self-attention with that backend on this platform
    (`jattn.explain` says why)."""
    if cfg.attention.implementation is None:
        return
    N, K = cfg.num_heads, cfg.attention.num_kv_heads or cfg.num_heads
    H = cfg.d_model // cfg.num_heads
    q, kv = jnp.zeros((1, max_len, N, H)), jnp.zeros((1, max_len, K, H))  # explain computes nothing
    try:
        jattn.explain(q, kv, kv, is_causal=True, implementation=cfg.attention.implementation)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"model.attention.implementation={cfg.attention.implementation!r} cannot run this "
            f"model here: {e}"
        ) from None


def embed_continuing(model: nnx.Module, tokens_BT, caches, *, deterministic: bool, rngs):
    """``tokens int32[B, T]`` -> ``(x [B, T, D], positions int32[B, T])``: ``model.embed``
    of the tokens plus, when ``model.pos_embed`` is not None, learned positions that
    continue each cached sequence (``caches[0].lengths``; from 0 without caches), then ``model.dropout``.
    Shared by the decoder stacks (`Transformer`, the translate task's decoder)."""
    B, T = tokens_BT.shape
    start_B = caches[0].lengths if caches is not None else jnp.zeros((B,), jnp.int32)
    positions_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    x_BTD = model.embed(tokens_BT)
    if model.pos_embed is not None:
        x_BTD = x_BTD + model.pos_embed(positions_BT)
    return model.dropout(x_BTD, deterministic=deterministic, rngs=rngs), positions_BT


def logical_axes(*names: str) -> dict:
    """Parameter metadata naming its axes (``embed`` D, ``mlp`` the MLP's hidden axis,
    ``vocab`` V, ``positions`` the learned positions' table), as jattn's modules name
    theirs (``heads``, ``kv_heads``, ``head_dim``): `experiments.run` maps the names to
    mesh axes.  Nothing is sharded when the parameter is created (``eager_sharding``
    off): the run creates the train state under ``jit`` with its shardings."""
    return {"out_sharding": names, "eager_sharding": False}


class MLP(nnx.Module):
    """``x [B, T, D] -> down(gelu(up(x))) [B, T, D]``."""

    def __init__(self, d_model: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs):
        self.up = nnx.Linear(d_model, mlp_dim, use_bias=False, dtype=dtype, rngs=rngs,
                             kernel_metadata=logical_axes("embed", "mlp"))
        self.down = nnx.Linear(mlp_dim, d_model, use_bias=False, dtype=dtype, rngs=rngs,
                               kernel_metadata=logical_axes("mlp", "embed"))

    def __call__(self, x_BTD):
        return self.down(jax.nn.gelu(self.up(x_BTD)))


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, *, max_len: int, dtype, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs, scale_metadata=logical_axes("embed"))
        self.attn = make_attention(cfg, max_len=max_len, dtype=dtype, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs, scale_metadata=logical_axes("embed"))
        self.mlp = MLP(cfg.d_model, cfg.mlp_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BTD, positions_BT, *, causal: bool = True, lengths_B=None, cache=None,
                 deterministic=True, rngs=None, return_weights=False):
        """``x [B, T, D] -> (x [B, T, D], new cache or None, weights [B, N, T, S] or None)``."""
        a = self.attn.attend(
            self.attn_norm(x_BTD), causal=causal, positions_BT=positions_BT, lengths_B=lengths_B,
            cache=cache, deterministic=deterministic, rngs=rngs, return_weights=return_weights,
        )
        x_BTD = x_BTD + self.dropout(a.out, deterministic=deterministic, rngs=rngs)
        h_BTD = self.mlp(self.mlp_norm(x_BTD))
        x_BTD = x_BTD + self.dropout(h_BTD, deterministic=deterministic, rngs=rngs)
        return x_BTD, a.cache, a.weights


class Transformer(nnx.Module):
    """A stack of blocks over embedded tokens: a causal decoder (language model) or,
    with ``causal=False``, a bidirectional encoder.

    Args:
      cfg: sizes and attention choice (`ModelConfig`).
      vocab_size: V, the number of token ids.
      max_len: the longest sequence (learned position embeddings; cache length).
      num_outputs: the head's output size (default V: next-token logits); 0: no head,
        for a model used through `features` only.
      causal: a decoder (True) or an encoder (False).
      dtype: compute dtype (parameters stay float32).
      rngs: parameter initialisation (``nnx.Rngs(params=key)``).
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, max_len: int, num_outputs: int | None = None,
                 causal: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.max_len = max_len
        self.causal = causal
        self.embed = nnx.Embed(vocab_size, cfg.d_model, dtype=dtype, rngs=rngs,
                               embedding_metadata=logical_axes("vocab", "embed"))
        self.pos_embed = (
            nnx.Embed(max_len, cfg.d_model, dtype=dtype, rngs=rngs, embedding_metadata=logical_axes("positions", "embed"))
            if cfg.positions == "learned" else None
        )
        self.blocks = nnx.List([Block(cfg, max_len=max_len, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs, scale_metadata=logical_axes("embed"))
        num_outputs = vocab_size if num_outputs is None else num_outputs
        self.head = (nnx.Linear(cfg.d_model, num_outputs, use_bias=False, dtype=dtype, rngs=rngs,
                                kernel_metadata=logical_axes("embed", "vocab"))
                     if num_outputs else None)
        self.dropout = nnx.Dropout(cfg.dropout)

    def features(self, tokens_BT, *, lengths_B=None, caches=None, deterministic=True, rngs=None,
                 return_weights=False):
        """``(x [B, T, D] after the final norm, new caches or None, weights)``: the
        stack without the head; weights is a list over layers of ``[B, N, T, S]``
        (None entries unless ``return_weights``)."""
        x_BTD, positions_BT = embed_continuing(self, tokens_BT, caches, deterministic=deterministic, rngs=rngs)
        axis = self.cfg.attention.sequence_axis
        if axis is not None and caches is None:  # context parallel: the activations' T split over the axis
            x_BTD = jax.sharding.reshard(x_BTD, jax.sharding.PartitionSpec(None, axis, None))
        new_caches, weights = [], []
        for i, block in enumerate(self.blocks):
            x_BTD, new_cache, w_BNTS = block(
                x_BTD, positions_BT, causal=self.causal, lengths_B=lengths_B,
                cache=None if caches is None else caches[i], deterministic=deterministic,
                rngs=rngs, return_weights=return_weights,
            )
            new_caches.append(new_cache)
            weights.append(w_BNTS)
        return self.final_norm(x_BTD), (new_caches if caches is not None else None), weights

    def __call__(self, tokens_BT, *, lengths_B=None, caches=None, deterministic=True, rngs=None,
                 return_weights=False):
        """``tokens int32[B, T]`` -> ``logits [B, T, num_outputs]`` (compute dtype).

        With ``caches`` (one `jattn.cache.KVCache` per layer, from `init_caches`) the
        tokens continue each cached sequence and ``(logits, new_caches)`` is returned;
        with ``return_weights`` also (or instead) the attention weights of every layer,
        a list of ``[B, N, T, S]``: ``(logits, [caches,] weights)`` -- the same rule
        as jattn's modules.  ``lengths_B``: real tokens per sequence (padding after).
        """
        x_BTD, new_caches, weights = self.features(
            tokens_BT, lengths_B=lengths_B, caches=caches, deterministic=deterministic, rngs=rngs,
            return_weights=return_weights,
        )
        if self.head is None:
            raise ValueError("this Transformer has no head (num_outputs=0); call features()")
        out = (self.head(x_BTD),)
        if caches is not None:
            out += (new_caches,)
        if return_weights:
            out += (weights,)
        return out if len(out) > 1 else out[0]

    def init_caches(self, batch_size: int, max_length: int | None = None):
        """One empty KV cache per layer, for `__call__(..., caches=...)`."""
        max_length = self.max_len if max_length is None else max_length
        return [block.attn.create_cache(batch_size, max_length) for block in self.blocks]


def generate(graphdef, params, prompt_BP: jax.Array, length: int, key: jax.Array,
             temperature: float = 0.0) -> jax.Array:
    """``length`` new tokens after each prompt from a decoder `Transformer` (split into
    ``graphdef, params``), int32 ``[B, length]``, with the KV cache: the prompt is fed
    once (prefill), then one token per step attends to the cache.

    ``temperature == 0`` is greedy decoding; otherwise token ``i`` is drawn from
    ``softmax(logits / temperature)`` with ``fold_in(key, i)``.

    Example:
      >>> model = Transformer(ModelConfig(d_model=16, num_heads=2, mlp_dim=32), vocab_size=7,
      ...                     max_len=8, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(model, nnx.Param)
      >>> generate(graphdef, params, jnp.array([[1, 2, 3]]), 4, jax.random.key(0)).shape
      (1, 4)
    """
    B, P = prompt_BP.shape

    def pick(logits_BV, i):
        if temperature == 0.0:
            return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        logits_BV = logits_BV.astype(jnp.float32) / temperature
        return jax.random.categorical(jax.random.fold_in(key, i), logits_BV).astype(jnp.int32)

    @jax.jit
    def run(params, prompt_BP):
        model = nnx.merge(graphdef, params)
        caches = model.init_caches(B, P + length)
        logits_BPV, caches = model(prompt_BP, caches=caches)
        first_B = pick(logits_BPV[:, -1], 0)

        def step(carry, i):
            token_B, caches = carry
            logits_B1V, caches = model(token_B[:, None], caches=caches)
            return (pick(logits_B1V[:, 0], i), caches), token_B

        (last_B, _), tokens_LB = jax.lax.scan(step, (first_B, caches), jnp.arange(1, length))
        return jnp.concatenate([tokens_LB.T, last_B[:, None]], axis=1)

    return run(params, prompt_BP.astype(jnp.int32))


def num_params(model: nnx.Module) -> int:
    """The number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
