"""Index functions: the common base of masks and score modifiers.

A mask (``mask(q_idx, kv_idx) -> bool``) or a score modifier
(``score_mod(score, head, q_idx, kv_idx) -> score``) is written for ONE example and
ONE head, as a function of integer indices.  Some close over per-example data —
segment ids, sequence lengths, per-sequence decoding offsets — which they hold as
pytree leaves.  Such a leaf has a declared per-example shape (``()`` for a length,
``("T",)`` for query segment ids, ...); given with one more leading axis it is a batch
of them.  `batch_in_axes` tells `jax.vmap` which leaves to slice, so the batched entry
point slices the data and the object code never sees the batch axis.

Subclasses are frozen dataclasses decorated with `index_function`; a data field is
declared with ``leaf(example_shape)``, every other field is static (hashable).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

_EXAMPLE_SHAPE = "jattn_example_shape"


def leaf(example_shape: tuple[str | int, ...], default: Any = dataclasses.MISSING):
    """Declare a data field: an int or array whose shape for ONE example is
    ``example_shape`` (letters "T" and "S" stand for the query / key lengths)."""
    return dataclasses.field(default=default, metadata={_EXAMPLE_SHAPE: example_shape})


def child():
    """Declare a field holding another index function (a pytree child)."""
    return dataclasses.field(metadata={_EXAMPLE_SHAPE: "child"})


def index_function(cls):
    """Make ``cls`` a frozen dataclass registered as a pytree (data = leaves)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data, meta = [], []
    for f in dataclasses.fields(cls):
        (data if _EXAMPLE_SHAPE in f.metadata else meta).append(f.name)
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def is_static(value: Any) -> bool:
    """True for concrete Python / NumPy values (known when the program is traced)."""
    return isinstance(value, (bool, int, float, np.integer, np.floating, np.ndarray))


class IndexFunction:
    """Base class: shape checking and batch slicing of the data leaves."""

    def _data_fields(self):
        for f in dataclasses.fields(self):
            if _EXAMPLE_SHAPE in f.metadata:
                yield f.name, f.metadata[_EXAMPLE_SHAPE], getattr(self, f.name)

    def batch_in_axes(self, batch_size: int, num_q: int, num_kv: int):
        """Check every data leaf against its per-example shape and return
        ``(obj, in_axes)`` for `jax.vmap` over the batch.

        A leaf of the per-example shape is shared by all examples (axis None); one
        with a leading axis of size ``batch_size`` is sliced (axis 0); a leading axis of
        size 1 is squeezed and shared.  Anything else raises a ValueError that names
        the class, the field, what was given and what was expected.
        """
        values, axes = {}, {}
        sizes = {"T": num_q, "S": num_kv}
        for name, example_shape, value in self._data_fields():
            if example_shape == "child":
                values[name], axes[name] = value.batch_in_axes(batch_size, num_q, num_kv)
                continue
            if value is None:
                values[name], axes[name] = None, None
                continue
            expected = tuple(sizes.get(d, d) for d in example_shape)
            shape = tuple(np.shape(value))
            if shape == expected:
                values[name], axes[name] = value, None
            elif shape == (batch_size, *expected):
                values[name], axes[name] = value, 0
            elif shape == (1, *expected):
                values[name], axes[name] = value[0], None
            else:
                letters = "".join(str(d) for d in example_shape)
                raise ValueError(
                    f"{type(self).__name__}.{name}: got shape {shape}; expected the "
                    f"per-example shape {expected} ({letters or 'a scalar'}) or a batch "
                    f"of them {(batch_size, *expected)}"
                )
        return dataclasses.replace(self, **values), dataclasses.replace(self, **axes)

    def is_static(self) -> bool:
        """True when no data leaf is a JAX array (so structure is known at trace time)."""
        for _, example_shape, value in self._data_fields():
            if example_shape == "child":
                if not value.is_static():
                    return False
            elif value is not None and not is_static(value):
                return False
        return True
