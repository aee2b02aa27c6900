"""Batches and scores shared by the tasks (`experiments.tasks`); nothing here knows a
task by name.

A next-token `Batch` holds ``inputs int32[B, T]``, ``targets int32[B, T]`` (the
inputs shifted by one) and ``weights float32[B, T]`` (1 where a target is scored).
`score` sums what held-out metrics need over one batch; the sums of all eval batches
are added up and turned into metrics by `token_metrics` (or a task's own summary).

Example:
  >>> import jax.numpy as jnp
  >>> b = shift(jnp.array([[5, 6, 7, 8]]), scored_from=2)
  >>> b.inputs.tolist(), b.targets.tolist(), b.weights.tolist()
  ([[5, 6, 7]], [[6, 7, 8]], [[0.0, 0.0, 1.0]])
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Batch(NamedTuple):
    """Next-token examples: ``inputs``/``targets`` int32[B, T], ``weights`` float32[B, T]."""

    inputs: jax.Array
    targets: jax.Array
    weights: jax.Array


def shift(tokens_BL: jax.Array, scored_from: int) -> Batch:
    """A batch from whole sequences ``[B, T+1]``: targets from position ``scored_from``
    (a target index) on carry weight 1."""
    tokens_BL = tokens_BL.astype(jnp.int32)
    T = tokens_BL.shape[1] - 1
    weights_T = (jnp.arange(T) >= scored_from).astype(jnp.float32)
    weights_BT = jnp.broadcast_to(weights_T, (tokens_BL.shape[0], T))
    return Batch(tokens_BL[:, :-1], tokens_BL[:, 1:], weights_BT)


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Cross-entropy of each target, float32 ``[B, T]`` whatever the compute dtype."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def weighted_loss(logits_BTV: jax.Array, batch: Batch) -> jax.Array:
    """Mean cross-entropy over the scored targets (the training loss)."""
    nll_BT = token_nll(logits_BTV, batch.targets)
    return jnp.sum(nll_BT * batch.weights) / jnp.maximum(jnp.sum(batch.weights), 1.0)


def score(logits_BTV: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Sums over a batch, to be added up over held-out batches: weighted
    cross-entropy, scored targets, correct argmax predictions, and examples whose
    every scored target is right.

    With teacher forcing, "every scored target right under argmax" is the same event
    as "greedy decoding of the prompt reproduces the whole answer", so exact match
    needs no decoding loop.
    """
    nll_BT = token_nll(logits_BTV, batch.targets)
    right_BT = jnp.argmax(logits_BTV, axis=-1) == batch.targets
    scored_BT = batch.weights > 0
    return dict(
        nll=jnp.sum(nll_BT * batch.weights),
        weight=jnp.sum(batch.weights),
        correct=jnp.sum(right_BT * batch.weights),
        exact=jnp.sum(jnp.all(right_BT | ~scored_BT, axis=-1)),
        examples=jnp.asarray(batch.inputs.shape[0], jnp.float32),
    )


def token_metrics(sums: dict) -> dict[str, float]:
    """``loss`` (nats per scored token), ``accuracy`` (per scored token) and
    ``exact_match`` (per example) from summed `score` outputs."""
    return dict(
        loss=float(sums["nll"]) / float(sums["weight"]),
        accuracy=float(sums["correct"]) / float(sums["weight"]),
        exact_match=float(sums["exact"]) / float(sums["examples"]),
    )
