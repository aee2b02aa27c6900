"""The keyword options of `jattn.dot_product_attention`, declared once.

Every keyword option of the entry point — its name, default, type and documentation —
is one `Option` in `OPTIONS`.  `dot_product_attention`, `explain`, `make_call`,
`jattn.cache.decode_attention` and the Flax modules derive their keyword arguments
from this table instead of restating them (``tests/test_options.py`` fails if one of
them drifts).  Adding an option touches this table, the validation in `jattn.call`,
and the backends that implement it; nothing else.

``role`` says who usually sets the option in a model:

- ``"call"``: data of one call — masks, lengths, offsets, segment ids, a score
  modifier; a Flax module takes these at call time.
- ``"config"``: how attention is computed — the backend, soft-capping, tiles,
  precision; a Flax module takes these in its constructor.
- ``"managed"``: a Flax module supplies these itself (dropout keys from its ``rngs``,
  what it returns).

Example:
  >>> from jattn import options
  >>> options.DEFAULTS["is_causal"], options.OPTIONS_BY_NAME["scale"].role
  (False, 'call')
  >>> options.complete({"is_causal": True}, where="f")["implementation"] is None
  True
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Iterable, Literal

Role = Literal["call", "config", "managed"]


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option: ``name``, ``default``, a type for signatures, ``doc`` (one
    paragraph, as in an Args section) and ``role`` (see the module docstring)."""

    name: str
    default: Any
    annotation: str
    doc: str
    role: Role


OPTIONS: tuple[Option, ...] = (
    Option("scale", None, "float | None", "multiplies Q·Kᵀ; default ``1/sqrt(H)``.", "call"),
    Option("is_causal", False, "bool",
           "row i attends keys ``j <= i + query_offset`` (jax.nn's alignment when "
           "``query_offset == 0``).", "call"),
    Option("query_seq_lengths", None, "Array | None",
           "int ``[B]``: rows past a query length come out as zeros.", "call"),
    Option("key_value_seq_lengths", None, "Array | None",
           "int ``[B]``: keys past a key length are ignored.", "call"),
    Option("local_window_size", None, "int | tuple[int, int] | None",
           "``w`` or ``(left, right)``: row i attends keys "
           "``i + query_offset - left <= j <= i + query_offset + right``.", "call"),
    Option("implementation", None, "str | None",
           "None (automatic), a backend name from `jattn.backends.registry` "
           "(``\"dense\"`` — alias ``\"xla\"`` —, ``\"chunked\"``, ``\"cudnn\"``, "
           "``\"pallas\"``); see `jattn.explain`.", "config"),
    Option("return_residual", False, "bool",
           "also return the log-sum-exp of each row ``[B, T, N]`` in the input dtype, "
           "without gradient (-inf for a fully masked row), as jax.nn does.", "managed"),
    Option("query_segment_ids", None, "Array | None",
           "int ``[B, T]`` for packed sequences: attend only within the same segment id.",
           "call"),
    Option("key_value_segment_ids", None, "Array | None",
           "int ``[B, S]``, the keys' segment ids (default: ``query_segment_ids``, "
           "when T == S).", "call"),
    Option("query_offset", 0, "int | Array",
           "int or int ``[B]``: the position of query row 0 among the keys (decoding "
           "after a cache of length L uses L).", "call"),
    Option("logits_soft_cap", None, "float | None",
           "``c``: scores become ``c · tanh(score / c)`` (after ``score_mod``).", "config"),
    Option("score_mod", None, "Callable | None",
           "a `jattn.score_mods.ScoreMod` or ``score_mod(score, head, q_idx, kv_idx) "
           "-> score``.", "call"),
    Option("dropout_rate", 0.0, "float",
           "dropout on the attention weights; the pattern is a function of (key, "
           "example, head, row, column) only, the same in every backend.", "config"),
    Option("dropout_rng", None, "Array | None",
           "the `jax.random.key` for dropout.", "managed"),
    Option("return_weights", False, "bool",
           "also return the attention weights ``[B, N, T, S]`` (after dropout; forces "
           "the dense backend).", "managed"),
    Option("block_sizes", None, "tuple[int, int] | None",
           "``(block_q, block_kv)`` for the tiled backends.", "config"),
    Option("precision", None, "Any",
           "`jax.lax.Precision` (or a pair) of the two matmuls, as in `jax.numpy.einsum`; "
           "None is the platform default.  Accumulation is float32 either way.", "config"),
    Option("sequence_axis", None, "str | None",
           "the mesh axis the sequence (T and S) is split over (context parallelism, "
           "`jattn.parallel`).  Inside `jax.shard_map` over that axis the arrays are the "
           "local shards; under `jax.jit` with a mesh set they are global arrays and jattn "
           "splits them.  None: found from the inputs' sharding (an explicit-axis mesh), "
           "else no split.", "config"),
    Option("sequence_strategy", None, "str | None",
           "how a split sequence is served: ``\"ring\"`` (K/V blocks passed around the "
           "axis, merged by log-sum-exp), ``\"all_gather\"`` (every device gathers K/V), "
           "``\"ulysses\"`` (all-to-alls trade the sequence split for a head split; "
           "only when asked) or None (automatic; see `jattn.explain`).", "config"),
    Option("sequence_layout", "contiguous", "str",
           "the order of the tokens on the sequence axis: ``\"contiguous\"`` (device p "
           "holds chunk p) or ``\"zigzag\"`` (device p holds chunks p and 2P-1-p, "
           "which balances causal work; `jattn.parallel.zigzag` reorders a batch).",
           "config"),
)

OPTIONS_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
DEFAULTS: dict[str, Any] = {o.name: o.default for o in OPTIONS}


def names(role: Role | None = None) -> tuple[str, ...]:
    """The option names, all or those of one role, in table order."""
    return tuple(o.name for o in OPTIONS if role is None or o.role == role)


def unknown_names_error(given: Iterable[str], known: Iterable[str], *, where: str) -> TypeError | None:
    """A TypeError naming each unknown keyword (with the closest known name), or None."""
    known = list(known)
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return None
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TypeError(f"{where}: unknown keyword argument {', '.join(parts)}; expected some of {sorted(known)}")


def complete(given: dict[str, Any], *, where: str, allowed: Iterable[str] | None = None,
             defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``given`` with every ``allowed`` option it lacks at its default (``defaults``
    overrides some, for a caller whose natural default differs); an unknown name
    raises a TypeError that names it (and the closest option)."""
    allowed = names() if allowed is None else tuple(allowed)
    if (error := unknown_names_error(given, allowed, where=where)) is not None:
        raise error
    base = {**DEFAULTS, **(defaults or {})}
    return {**{n: base[n] for n in allowed}, **given}


def parameters(selected: Iterable[str] | None = None, defaults: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """Keyword-only `inspect.Parameter`s of the options (all, or ``selected``)."""
    selected = names() if selected is None else tuple(selected)
    base = {**DEFAULTS, **(defaults or {})}
    return [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=base[n],
                          annotation=OPTIONS_BY_NAME[n].annotation)
        for n in selected
    ]


def args_doc(selected: Iterable[str] | None = None, indent: int = 6) -> str:
    """The Args-section lines of the options (all, or ``selected``)."""
    selected = names() if selected is None else tuple(selected)
    pad = " " * indent
    return "\n".join(f"{pad}{n}: {OPTIONS_BY_NAME[n].doc}" for n in selected)


def with_options_signature(fn: Callable, selected: Iterable[str] | None = None, *,
                           defaults: dict[str, Any] | None = None, doc_marker: str = "{options}") -> Callable:
    """Give ``fn`` (declared ``def fn(<positional...>, **options)``) a signature whose
    keyword-only parameters are the options (``selected``, default all; ``defaults``
    overriding some defaults), and fill ``doc_marker`` in its docstring with their
    documentation.  Returns ``fn``."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    fn.__signature__ = sig.replace(parameters=params + parameters(selected, defaults))
    if fn.__doc__ and doc_marker in fn.__doc__:
        fn.__doc__ = fn.__doc__.replace(doc_marker, args_doc(selected).lstrip())
    return fn
