"""Splitting a pytree (a score modifier, say) into the leaves that take gradients and
the rest, for custom VJPs that differentiate only the float leaves.

Example:
  >>> import jax.numpy as jnp
  >>> leaves, rebuild = split_differentiable({"slopes": jnp.ones(2), "offset": jnp.int32(3)})
  >>> [x.shape for x in leaves], rebuild([jnp.zeros(2)])["slopes"].tolist()
  ([(2,)], [0.0, 0.0])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_differentiable(leaf) -> bool:
    """A float (inexact) array: the leaves a gradient flows to."""
    return isinstance(leaf, jax.Array | np.ndarray) and jnp.issubdtype(leaf.dtype, jnp.inexact)


def split_differentiable(tree):
    """``(float leaves, rebuild)``: ``rebuild(new_float_leaves)`` is ``tree`` with them
    substituted (every other leaf unchanged).  ``tree`` None gives ``([], -> None)``."""
    if tree is None:
        return [], lambda leaves: None
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    diff_positions = [n for n, leaf in enumerate(leaves) if is_differentiable(leaf)]

    def rebuild(diff_leaves):
        new = list(leaves)
        for n, leaf in zip(diff_positions, diff_leaves):
            new[n] = leaf
        return jax.tree_util.tree_unflatten(treedef, new)

    return [leaves[n] for n in diff_positions], rebuild


def cotangent_tree(tree, diff_grads):
    """A cotangent for ``tree`` (as a custom VJP returns it): ``diff_grads`` at its
    float leaves, None (zero) at the others (ints, keys, static values)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    grads = iter(diff_grads)
    return jax.tree_util.tree_unflatten(treedef, [next(grads) if is_differentiable(x) else None for x in leaves])
