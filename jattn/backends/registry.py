"""The one list of backends.  Dispatch, the validation of ``implementation=`` and the
benchmark read it; nothing else names the backends.

Order matters: it is the order in which `jattn.dispatch` reports refusals.  To add a
backend, write its module (a `jattn.backends.contract.Backend` called ``BACKEND``)
and list it here; then say in `jattn.dispatch.choose` when auto should prefer it.

Example:
  >>> from jattn.backends import registry
  >>> list(registry.BACKENDS)
  ['dense', 'chunked', 'cudnn', 'pallas', 'splash']
"""

from __future__ import annotations

from jattn.backends import chunked, cudnn, dense, pallas, splash
from jattn.backends.contract import Backend

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    dense.BACKEND, chunked.BACKEND, cudnn.BACKEND, pallas.BACKEND, splash.BACKEND,
)}
