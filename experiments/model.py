"""A decoder-only transformer built from jattn's NNX modules.

``tokens [B, T] -> embed (+ learned positions) -> L x [x + attn(norm(x));
x + mlp(norm(x))] -> norm -> head -> logits [B, T, V]``.

The attention layer is `jattn.nnx.SelfAttention` (backend chosen by
``model.attention.implementation``), or, with ``model.attention.module="flax"``,
``flax.nnx.MultiHeadAttention``: the same shapes, parameter names and no biases (with
RoPE applied to its q and k through its ``attention_fn``), so the two differ only in
the attention code; drawn from the same key, they start from identical weights (the
baseline for comparisons).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from experiments.config import ModelConfig
  >>> model = Transformer(ModelConfig(d_model=32, num_heads=4, mlp_dim=64),
  ...                     vocab_size=11, max_len=16, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 16), jnp.int32)).shape
  (2, 16, 11)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from experiments.config import ConfigError, ModelConfig
from jattn.cache import KVCache
from jattn.nnx import SelfAttention
from jattn.positional import apply_rope


class MLP(nnx.Module):
    """``x [B, T, D] -> down(gelu(up(x))) [B, T, D]``."""

    def __init__(self, d_model: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs):
        self.up = nnx.Linear(d_model, mlp_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(mlp_dim, d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD):
        return self.down(jax.nn.gelu(self.up(x_BTD)))


def rope_then_flax_attention(query, key, value, *args, **kwargs):
    """Flax's ``dot_product_attention`` after rotating q ``[B, T, N, H]`` and k
    ``[B, S, K, H]`` by their positions 0..T-1 (RoPE, `jattn.positional.apply_rope`):
    the baseline's ``attention_fn`` when ``model.positions='rope'``, so that both
    models compute the same function."""
    query = apply_rope(query, jnp.arange(query.shape[-3]))
    key = apply_rope(key, jnp.arange(key.shape[-3]))
    return nnx.dot_product_attention(query, key, value, *args, **kwargs)


def _attention(cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    a = cfg.attention
    if a.module == "flax":
        extra = {"attention_fn": rope_then_flax_attention} if cfg.positions == "rope" else {}
        return nnx.MultiHeadAttention(
            num_heads=cfg.num_heads, in_features=cfg.d_model, num_kv_heads=a.num_kv_heads,
            use_bias=False, dropout_rate=cfg.dropout, normalize_qk=a.qk_norm, decode=False,
            dtype=dtype, keep_rngs=False, rngs=rngs, **extra,
        )
    return SelfAttention(
        cfg.d_model, cfg.num_heads, num_kv_heads=a.num_kv_heads, use_bias=False, dtype=dtype,
        dropout_rate=cfg.dropout, qk_norm=a.qk_norm, use_rope=cfg.positions == "rope",
        implementation=a.implementation, keep_rngs=False, rngs=rngs,
    )


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.module = cfg.attention.module
        self.rope = cfg.positions == "rope"
        self.attn_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.attn = _attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg.d_model, cfg.mlp_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BTD, positions_BT, *, cache=None, deterministic=True, rngs=None,
                 return_weights=False):
        """``x [B, T, D] -> (x [B, T, D], new cache or None, weights [B, N, T, S] or None)``."""
        h_BTD = self.attn_norm(x_BTD)
        weights = new_cache = None
        if self.module == "flax":
            if cache is not None:
                raise ValueError("decoding with a KV cache needs model.attention.module='jattn'")
            def attend(attn, h_BTD):
                return attn(h_BTD, is_causal=True, deterministic=deterministic, rngs=rngs,
                            sow_weights=return_weights)

            if return_weights:  # Flax hands the weights out only as a sowed intermediate
                h_BTD, sowed = nnx.capture(attend, nnx.Intermediate)(self.attn, h_BTD)
                (weights,) = jax.tree.leaves(sowed["attention_weights"])
            else:
                h_BTD = attend(self.attn, h_BTD)
        else:
            out = self.attn(
                h_BTD, positions=positions_BT if self.rope else None, is_causal=True,
                cache=cache, deterministic=deterministic, rngs=rngs, return_weights=return_weights,
            )
            out = out if isinstance(out, tuple) else (out,)
            h_BTD, rest = out[0], list(out[1:])
            if cache is not None:
                new_cache = rest.pop(0)
            if return_weights:
                weights = rest.pop(0)
        x_BTD = x_BTD + self.dropout(h_BTD, deterministic=deterministic, rngs=rngs)
        h_BTD = self.mlp(self.mlp_norm(x_BTD))
        x_BTD = x_BTD + self.dropout(h_BTD, deterministic=deterministic, rngs=rngs)
        return x_BTD, new_cache, weights


class Transformer(nnx.Module):
    """The decoder-only language model of an experiment.

    Args:
      cfg: sizes and attention choice (`experiments.config.ModelConfig`).
      vocab_size: V, the number of token ids.
      max_len: the longest sequence (learned position embeddings; cache length).
      dtype: compute dtype (parameters stay float32).
      rngs: parameter initialisation (``nnx.Rngs(params=key)``).
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, max_len: int, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if cfg.attention.module == "jattn":
            check_implementation(cfg, max_len)
        self.cfg = cfg
        self.max_len = max_len
        self.embed = nnx.Embed(vocab_size, cfg.d_model, dtype=dtype, rngs=rngs)
        self.pos_embed = (
            nnx.Embed(max_len, cfg.d_model, dtype=dtype, rngs=rngs)
            if cfg.positions == "learned" else None
        )
        self.blocks = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, vocab_size, use_bias=False, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, tokens_BT, *, caches=None, deterministic=True, rngs=None,
                 return_weights=False):
        """``tokens int32[B, T]`` -> ``logits [B, T, V]`` (compute dtype).

        With ``caches`` (one `jattn.cache.KVCache` per layer, from `init_caches`) the
        tokens continue each cached sequence and ``(logits, new_caches)`` is returned;
        with ``return_weights`` also (or instead) the attention weights of every layer,
        a list of ``[B, N, T, S]``: ``(logits, [caches,] weights)``.
        """
        B, T = tokens_BT.shape
        start_B = caches[0].lengths if caches is not None else jnp.zeros((B,), jnp.int32)
        positions_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        x_BTD = self.embed(tokens_BT)
        if self.pos_embed is not None:
            x_BTD = x_BTD + self.pos_embed(positions_BT)
        x_BTD = self.dropout(x_BTD, deterministic=deterministic, rngs=rngs)
        new_caches, weights = [], []
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x_BTD, new_cache, w_BNTS = block(
                x_BTD, positions_BT, cache=cache, deterministic=deterministic, rngs=rngs,
                return_weights=return_weights,
            )
            new_caches.append(new_cache)
            weights.append(w_BNTS)
        logits_BTV = self.head(self.final_norm(x_BTD))
        out = (logits_BTV,)
        if caches is not None:
            out += (new_caches,)
        if return_weights:
            out += (weights,)
        return out if len(out) > 1 else logits_BTV

    def init_caches(self, batch_size: int, max_length: int | None = None, dtype=jnp.float32):
        """One empty KV cache per layer, for `__call__(..., caches=...)`."""
        if self.cfg.attention.module != "jattn":
            raise ValueError("decoding with a KV cache needs model.attention.module='jattn'")
        max_length = self.max_len if max_length is None else max_length
        kv_heads = self.cfg.attention.num_kv_heads or self.cfg.num_heads
        head_dim = self.cfg.d_model // self.cfg.num_heads
        return [
            KVCache.create(batch_size, max_length, kv_heads, head_dim, dtype=dtype)
            for _ in range(self.cfg.num_layers)
        ]


def check_implementation(cfg: ModelConfig, max_len: int) -> None:
    """Raise ConfigError, naming ``model.attention.implementation``, if jattn cannot
    serve this model's causal self-attention with that backend on this platform
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


def num_params(model: nnx.Module) -> int:
    """The number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
