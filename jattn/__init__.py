"""jattn: self-attention for JAX and Flax.

Step functions for one head (`attention_scores`, `attention_weights`,
`context_vectors`, `head_attention`), one batched entry point
(`dot_product_attention`, a drop-in for `jax.nn.dot_product_attention`), the mask
algebra (`jattn.masks`), score modifiers (`jattn.score_mods`), position encodings
(`jattn.positional`) and the KV cache (`jattn.cache`).  The Flax modules live in
`jattn.nnx` and `jattn.linen` (imported explicitly, so `import jattn` needs no Flax).
"""

from jattn import cache, masks, positional, score_mods
from jattn.attention import dot_product_attention, explain
from jattn.dispatch import Explanation
from jattn.ops import (
    attention_scores,
    attention_weights,
    context_vectors,
    dropout_weights,
    head_attention,
)

__version__ = "0.1.0"

__all__ = [
    "Explanation",
    "attention_scores",
    "attention_weights",
    "cache",
    "context_vectors",
    "dot_product_attention",
    "dropout_weights",
    "explain",
    "head_attention",
    "masks",
    "positional",
    "score_mods",
]
