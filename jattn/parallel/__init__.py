"""Context parallelism: attention over a sequence split across a mesh axis.

`jattn.dot_product_attention` routes a call here when its sequence is split
(``sequence_axis=``, or q/k/v sharded along the sequence over an explicit-axis
mesh); see `jattn.parallel.split`.  Public helpers for the zig-zag layout, which
balances causal work across devices:

  >>> import numpy as np
  >>> from jattn import parallel
  >>> parallel.zigzag_positions(8, 2).tolist()
  [0, 1, 6, 7, 2, 3, 4, 5]
"""

from jattn.parallel.layout import unzigzag, zigzag, zigzag_positions

__all__ = ["unzigzag", "zigzag", "zigzag_positions"]
