"""A small attention example, step by step: ``python -m jattn.demo`` (``make demo``).

Four tokens with 3-dimensional embeddings go through the five steps of the textbook
explainer: scores, normalised scores, weights, context vectors, and the update of the
sequence (the residual step inside a Transformer block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jattn import ops


def main() -> None:
    # Local print options: a caller's (or a test session's) NumPy settings stay as they were.
    with np.printoptions(precision=3, suppress=True):
        _walk_through()


def _walk_through() -> None:
    tokens = ["the", "cat", "sat", "down"]
    x = jnp.array([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # [T, D]
    k_q, k_k, k_v, k_o = jax.random.split(jax.random.key(0), 4)
    D = x.shape[1]
    w_q, w_k, w_v, w_o = (jax.random.normal(k, (D, D)) / np.sqrt(D) for k in (k_q, k_k, k_v, k_o))
    # The projections belong to the inputs: Q = X·W^Q, K = X·W^K, V = X·W^V.
    q, k, v = x @ w_q, x @ w_k, x @ w_v

    print("tokens:", tokens)
    scores = ops.attention_scores(q, k)
    print("\n1. attention scores  Q·Kᵀ/√d_k  [T, S]\n", np.asarray(scores))
    causal = lambda i, j: j <= i
    weights = ops.attention_weights(scores, causal)
    print("\n2-3. normalised scores = attention weights, causal softmax per row [T, S]\n", np.asarray(weights))
    print("     row sums:", np.asarray(weights.sum(-1)))
    context = ops.context_vectors(weights, v)
    print("\n4. context vectors  weights·V  [T, D]\n", np.asarray(context))
    updated = x + context @ w_o
    print("\n5. updated sequence  X + context·W^O  [T, D]\n", np.asarray(updated))

if __name__ == "__main__":
    main()
