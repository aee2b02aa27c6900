"""Encoder-decoder translation (``data.task=translate``): transliterate a string into
another alphabet, reversed.

A source of ``min_length`` to ``max_length`` latin letters (``a``, ``b``, ...; padded
to ``max_length``) becomes its letters mapped to greek ones by a fixed permutation
(drawn from ``seed``) in reverse order: ``abc -> γβα`` when a->α, b->β, c->γ.  An
encoder (bidirectional, with the source's padding mask) reads the source; a decoder
with causal self-attention and cross-attention to the encoder's outputs
(`jattn.nnx.MultiHeadAttention`, the padded source positions masked) writes ``BOS
y1 ... yL`` and predicts ``y1 ... yL EOS``.  Reversal makes the cross-attention
alignment an anti-diagonal (``attention.png``).

Greedy decoding (`EncoderDecoder.greedy`) runs the encoder once, computes each
layer's cross-attention keys and values from its output once, and feeds one token
per step through the decoder, whose self-attention keeps a jattn KV cache
(``cache=`` of `jattn.nnx.SelfAttention`).  Held-out exact match is scored with
teacher forcing, which is the same event as greedy decoding reproducing the whole
target (`experiments.data.score`); `samples` decodes for real.

Example:
  >>> import jax
  >>> task = TranslateTask(min_length=2, max_length=4, num_symbols=3, mapping=(0, 1, 2))
  >>> b = task.train_batch(jax.random.key(0), 1)
  >>> n = int(b.source_lengths[0])
  >>> src, out = b.source[0, :n], b.targets[0, :n]
  >>> [task.token_label(t) for t in src][::-1] == [task.token_label(t - 3) for t in out]
  True
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from pydantic import model_validator

import jattn
import jattn.nnx
from experiments import data
from experiments.model import MLP, Transformer, embed_continuing, make_attention, unpack_jattn
from experiments.schema import PositiveInt, Section
from experiments.tasks.base import AttentionFigure, AttentionRow, LossPlot, SampleOptions, register

PAD, BOS, EOS, FIRST = 0, 1, 2, 3
SOURCE_LETTERS = "abcdefghijklmnopqrstuvwx"
TARGET_LETTERS = "αβγδεζηθικλμνξοπρστυφχψω"


class TranslateConfig(Section):
    """Encoder-decoder translation (task ``translate``): ``min_length`` to
    ``max_length`` letters of ``num_symbols``, transliterated by a permutation drawn
    from ``seed`` and, if ``reverse``, reversed."""

    min_length: PositiveInt = 3
    max_length: PositiveInt = 10
    num_symbols: PositiveInt = 16
    reverse: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> TranslateConfig:
        if self.min_length > self.max_length:
            raise ValueError(f"data.translate.min_length ({self.min_length}) must be at most "
                             f"data.translate.max_length ({self.max_length})")
        if self.num_symbols > len(SOURCE_LETTERS):
            raise ValueError(f"data.translate.num_symbols ({self.num_symbols}) must be at most "
                             f"{len(SOURCE_LETTERS)} (the letters it prints)")
        return self


class TranslateBatch(NamedTuple):
    """``source int32[B, S]`` (padded with 0) and ``source_lengths int32[B]``; the
    decoder's ``inputs``/``targets`` int32[B, T] and ``weights`` float32[B, T]
    (T = S + 1: ``BOS y1..yL`` -> ``y1..yL EOS``, padding unscored)."""

    source: jax.Array
    source_lengths: jax.Array
    inputs: jax.Array
    targets: jax.Array
    weights: jax.Array


class Memory(NamedTuple):
    """What the decoder attends to: the encoder's outputs ``states [B, S, D]``, the
    source lengths, and (decoding) each layer's cross-attention ``(k, v)`` computed
    once from the states, or None."""

    states: jax.Array | None
    lengths: jax.Array
    kv: list | None = None


class CrossAttention(nnx.Module):
    """Attention from the decoder to the encoder's outputs: `jattn.nnx.MultiHeadAttention`
    with the padded source positions masked (``key_value_seq_lengths``).

    Teacher forcing calls the module on the encoder's outputs; decoding projects them to
    keys and values once (`memory_kv`) and reuses them every step (`attend_kv`),
    with the module's own projections.
    """

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        a = cfg.attention
        self.attn = jattn.nnx.MultiHeadAttention(
            num_heads=cfg.num_heads, in_features=cfg.d_model, num_kv_heads=a.num_kv_heads, use_bias=False,
            dtype=dtype, dropout_rate=cfg.dropout, implementation=a.implementation, keep_rngs=False, rngs=rngs,
        )

    def __call__(self, x_BTD, memory: Memory, *, deterministic=True, rngs=None, return_weights=False):
        """``(out [B, T, D], weights [B, N, T, S] or None)``."""
        result = self.attn(x_BTD, memory.states, key_value_seq_lengths=memory.lengths,
                           deterministic=deterministic, rngs=rngs, return_weights=return_weights)
        out = unpack_jattn(result, with_cache=False, with_weights=return_weights)
        return out.out, out.weights

    def memory_kv(self, states_BSD):
        """The keys and values of the encoder's outputs, ``[B, S, K, H]`` each."""
        return self.attn.key(states_BSD), self.attn.value(states_BSD)

    def attend_kv(self, x_BTD, kv, lengths_B):
        """The module's attention with precomputed keys and values."""
        k_BSKH, v_BSKH = kv
        q_BTNH = self.attn.query(x_BTD)
        out_BTNH = jattn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, key_value_seq_lengths=lengths_B,
                                               implementation=self.attn.implementation)
        return self.attn.out(out_BTNH)


class DecoderBlock(nnx.Module):
    """``x + self_attn(norm(x))`` (causal, cached when decoding), ``x +
    cross(norm(x), memory)``, ``x + mlp(norm(x))``."""

    def __init__(self, cfg, *, max_len: int, dtype, rngs: nnx.Rngs):
        self.self_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.self_attn = make_attention(cfg, max_len=max_len, dtype=dtype, rngs=rngs)
        self.cross_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.cross = CrossAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg.d_model, cfg.mlp_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BTD, positions_BT, memory: Memory, kv=None, *, cache=None, deterministic=True,
                 rngs=None, return_weights=False):
        """``(x, new cache or None, self-attention weights, cross-attention weights)``."""
        a = self.self_attn.attend(self.self_norm(x_BTD), causal=True, positions_BT=positions_BT, cache=cache,
                                  deterministic=deterministic, rngs=rngs, return_weights=return_weights)
        x_BTD = x_BTD + self.dropout(a.out, deterministic=deterministic, rngs=rngs)
        h_BTD = self.cross_norm(x_BTD)
        if kv is None:
            c_BTD, cross_w = self.cross(h_BTD, memory, deterministic=deterministic, rngs=rngs,
                                        return_weights=return_weights)
        else:
            c_BTD, cross_w = self.cross.attend_kv(h_BTD, kv, memory.lengths), None
        x_BTD = x_BTD + self.dropout(c_BTD, deterministic=deterministic, rngs=rngs)
        x_BTD = x_BTD + self.dropout(self.mlp(self.mlp_norm(x_BTD)), deterministic=deterministic, rngs=rngs)
        return x_BTD, a.cache, a.weights, cross_w


class EncoderDecoder(nnx.Module):
    """An encoder (`experiments.model.Transformer`, bidirectional) and a decoder of
    `DecoderBlock` s, sizes from one `experiments.model.ModelConfig`."""

    def __init__(self, cfg, *, vocab_size: int, source_len: int, target_len: int, dtype, rngs: nnx.Rngs):
        self.target_len = target_len
        self.encoder = Transformer(cfg, vocab_size=vocab_size, max_len=source_len, num_outputs=0, causal=False,
                                   dtype=dtype, rngs=rngs)
        self.embed = nnx.Embed(vocab_size, cfg.d_model, dtype=dtype, rngs=rngs)
        self.pos_embed = (nnx.Embed(target_len, cfg.d_model, dtype=dtype, rngs=rngs)
                          if cfg.positions == "learned" else None)
        self.blocks = nnx.List([DecoderBlock(cfg, max_len=target_len, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, vocab_size, use_bias=False, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def encode(self, source_BS, lengths_B, *, deterministic=True, rngs=None, return_weights=False):
        """``(Memory, encoder self-attention weights per layer)``."""
        states, _, weights = self.encoder.features(source_BS, lengths_B=lengths_B, deterministic=deterministic,
                                                   rngs=rngs, return_weights=return_weights)
        return Memory(states, lengths_B), weights

    def memory_kv(self, memory: Memory) -> Memory:
        """``memory`` with every layer's cross-attention keys and values (once)."""
        return memory._replace(kv=[block.cross.memory_kv(memory.states) for block in self.blocks])

    def init_caches(self, batch_size: int, max_length: int | None = None):
        """One empty self-attention KV cache per decoder layer."""
        max_length = self.target_len if max_length is None else max_length
        return [block.self_attn.create_cache(batch_size, max_length) for block in self.blocks]

    def decode(self, tokens_BT, memory: Memory, *, caches=None, deterministic=True, rngs=None,
               return_weights=False):
        """``(logits [B, T, V], new caches or None, self weights, cross weights)``: the
        decoder on ``tokens`` (continuing the cached sequences when ``caches``)."""
        x_BTD, positions_BT = embed_continuing(self, tokens_BT, caches, deterministic=deterministic, rngs=rngs)
        new_caches, self_w, cross_w = [], [], []
        for i, block in enumerate(self.blocks):
            x_BTD, cache, sw, cw = block(
                x_BTD, positions_BT, memory, None if memory.kv is None else memory.kv[i],
                cache=None if caches is None else caches[i], deterministic=deterministic, rngs=rngs,
                return_weights=return_weights,
            )
            new_caches.append(cache)
            self_w.append(sw)
            cross_w.append(cw)
        logits_BTV = self.head(self.final_norm(x_BTD))
        return logits_BTV, (new_caches if caches is not None else None), self_w, cross_w

    def __call__(self, batch: TranslateBatch, *, deterministic=True, rngs=None, return_weights=False):
        """Teacher forcing: ``logits [B, T, V]``; with ``return_weights`` also a dict of
        per-layer weights ``encoder``, ``decoder`` (self) and ``cross``."""
        memory, enc_w = self.encode(batch.source, batch.source_lengths, deterministic=deterministic, rngs=rngs,
                                    return_weights=return_weights)
        logits, _, self_w, cross_w = self.decode(batch.inputs, memory, deterministic=deterministic, rngs=rngs,
                                                 return_weights=return_weights)
        if return_weights:
            return logits, dict(encoder=enc_w, decoder=self_w, cross=cross_w)
        return logits

    def greedy(self, source_BS, lengths_B, steps: int):
        """Greedy decoding with the KV cache: ``(tokens int32[B, steps], logits [B,
        steps, V])``, starting from BOS; the encoder and the cross-attention keys and
        values are computed once."""
        B = source_BS.shape[0]
        memory, _ = self.encode(source_BS, lengths_B)
        memory = self.memory_kv(memory)

        def step(carry, _):
            token_B, caches = carry
            logits_B1V, caches, _, _ = self.decode(token_B[:, None], memory, caches=caches)
            nxt_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32)
            return (nxt_B, caches), (nxt_B, logits_B1V[:, 0])

        start = (jnp.full((B,), BOS, jnp.int32), self.init_caches(B, steps))
        _, (tokens_LB, logits_LBV) = jax.lax.scan(step, start, None, length=steps)
        return tokens_LB.T, jnp.swapaxes(logits_LBV, 0, 1)


def greedy_decode(model: EncoderDecoder, source_BS, lengths_B, steps: int):
    """`EncoderDecoder.greedy` compiled once per shape."""
    graphdef, params = nnx.split(model, nnx.Param)
    return _greedy(graphdef, params, source_BS, lengths_B, steps)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy(graphdef, params, source_BS, lengths_B, steps):
    return nnx.merge(graphdef, params).greedy(source_BS, lengths_B, steps)


@register
@struct.dataclass
class TranslateTask:
    """Transliterate and reverse a string with an encoder-decoder (see the module)."""

    min_length: int = struct.field(pytree_node=False)
    max_length: int = struct.field(pytree_node=False)
    num_symbols: int = struct.field(pytree_node=False)
    mapping: tuple[int, ...] = struct.field(pytree_node=False)  # source symbol -> target symbol
    reverse: bool = struct.field(pytree_node=False, default=True)
    name = "translate"
    Config = TranslateConfig
    metrics = ("loss", "accuracy", "exact_match")
    loss_plot = LossPlot()

    @classmethod
    def from_config(cls, data_cfg) -> tuple[TranslateTask, dict]:
        c = data_cfg.translate
        mapping = tuple(int(x) for x in np.random.default_rng(c.seed).permutation(c.num_symbols))
        task = cls(min_length=c.min_length, max_length=c.max_length, num_symbols=c.num_symbols,
                   mapping=mapping, reverse=c.reverse)
        return task, dict(mapping=" ".join(f"{task.token_label(FIRST + s)}{task.token_label(FIRST + c.num_symbols + t)}"
                                           for s, t in enumerate(mapping)))

    @property
    def vocab_size(self) -> int:
        return FIRST + 2 * self.num_symbols

    @property
    def tokens_per_example(self) -> int:
        return 2 * self.max_length + 1  # source + decoder inputs

    def describe(self, info: dict) -> str:
        order = "reversed" if self.reverse else "in order"
        return f"{self.num_symbols} letters, lengths {self.min_length}-{self.max_length}, {order}"

    def examples(self, key: jax.Array, n: int) -> TranslateBatch:
        S, A = self.max_length, self.num_symbols
        mapping = jnp.asarray(self.mapping, jnp.int32)

        def one(k):
            k_len, k_sym = jax.random.split(k)
            length = jax.random.randint(k_len, (), self.min_length, S + 1)
            src_S = jax.random.randint(k_sym, (S,), 0, A)
            valid_S = jnp.arange(S) < length
            order_S = jnp.clip(length - 1 - jnp.arange(S), 0, S - 1) if self.reverse else jnp.arange(S)
            target_S = jnp.where(valid_S, mapping[src_S[order_S]] + FIRST + A, PAD)
            seq = jnp.concatenate([jnp.array([BOS]), target_S, jnp.array([PAD])]).at[length + 1].set(EOS)
            weights = (jnp.arange(S + 1) <= length).astype(jnp.float32)
            source = jnp.where(valid_S, src_S + FIRST, PAD)
            return source, length, seq[:-1], seq[1:], weights

        source, lengths, inputs, targets, weights = jax.vmap(one)(jax.random.split(key, n))
        i32 = jnp.int32
        return TranslateBatch(source.astype(i32), lengths.astype(i32), inputs.astype(i32), targets.astype(i32), weights)

    def train_batch(self, key: jax.Array, batch_size: int) -> TranslateBatch:
        return self.examples(key, batch_size)

    def eval_set(self, key: jax.Array, n: int) -> TranslateBatch:
        return self.examples(key, n)

    def build_model(self, cfg, *, dtype, rngs) -> EncoderDecoder:
        return EncoderDecoder(cfg, vocab_size=self.vocab_size, source_len=self.max_length,
                              target_len=self.max_length + 1, dtype=dtype, rngs=rngs)

    def loss(self, model, batch: TranslateBatch, *, deterministic: bool, rngs) -> jax.Array:
        return data.weighted_loss(model(batch, deterministic=deterministic, rngs=rngs), batch)

    def eval_sums(self, model, batch: TranslateBatch) -> dict[str, jax.Array]:
        return data.score(model(batch), batch)

    def summarize(self, sums: dict, reference: dict) -> dict[str, float]:
        return data.token_metrics(sums)

    def reference_metrics(self, eval_set) -> dict[str, float]:
        return {}

    def token_label(self, t: int) -> str:
        t = int(t)
        if t < FIRST:
            return ("·", ">", "$")[t]
        s = t - FIRST
        return SOURCE_LETTERS[s] if s < self.num_symbols else TARGET_LETTERS[s - self.num_symbols]

    def words(self, tokens) -> str:
        return "".join(self.token_label(t) for t in np.asarray(tokens).tolist())

    def attention_figure(self, model, example: TranslateBatch) -> AttentionFigure:
        """Each decoder layer's cross-attention on one held-out example (real tokens
        only): rows are the decoder's inputs, columns the source; each title gives the
        mean weight a row puts on the source letter it must write next."""
        ex = jax.tree.map(lambda x: x[:1], example)
        _, weights = nnx.jit(lambda m, b: m(b, return_weights=True))(model, ex)
        n = int(ex.source_lengths[0])
        queries = [self.token_label(t) for t in np.asarray(ex.inputs[0, : n + 1])]
        keys = [self.token_label(t) for t in np.asarray(ex.source[0, :n])]
        aligned = [(t, n - 1 - t if self.reverse else t) for t in range(n)]
        rows = []
        for i, w in enumerate(weights["cross"]):
            w_NTS = np.asarray(w[0, :, : n + 1, :n], np.float32)
            notes = [f"on the aligned letter: {np.mean([w_NTS[h, t, s] for t, s in aligned]):.2f}"
                     for h in range(w_NTS.shape[0])]
            rows.append(AttentionRow(f"cross-attn layer {i + 1}", w_NTS, queries, keys, notes))
        order = "reversed, so the alignment is the anti-diagonal" if self.reverse else "in order"
        return AttentionFigure(rows, f"decoder inputs ('>' = BOS) against the source; the output is {order}")

    def samples(self, model, options: SampleOptions, key: jax.Array) -> list[str]:
        """Held-out sources decoded greedily with the KV cache, with the true target."""
        batch = jax.jit(self.examples, static_argnums=1)(jax.random.fold_in(key, 1), options.num)
        tokens, _ = greedy_decode(model, batch.source, batch.source_lengths, self.max_length + 1)
        lines = []
        for src, n, target, got in zip(*(np.asarray(x) for x in (batch.source, batch.source_lengths,
                                                                 batch.targets, tokens))):
            ok = bool(np.all(got[: n + 1] == target[: n + 1]))
            out = got[: int(np.argmax(got == EOS))] if (got == EOS).any() else got
            lines.append(f"{self.words(src[:n])}  ->  {self.words(out)}   "
                         f"(answer {self.words(target[:n])}: {'right' if ok else 'WRONG'})")
        right = sum(line.endswith("right)") for line in lines)
        return lines + [f"{right}/{len(lines)} right (greedy decoding with the KV cache)"]
