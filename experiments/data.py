"""The tasks: byte-level language modelling (``lm``), associative recall (``recall``)
and sorting (``sort``).

Every task gives next-token examples as a `Batch` of ``inputs int32[B, T]``,
``targets int32[B, T]`` (the inputs shifted by one) and ``weights float32[B, T]``
(1 where a target is scored).  Tasks are pytrees (`flax.struct.dataclass`) whose
arrays (the LM corpus) are leaves, so ``jax.jit(lambda task, key: task.train_batch(
key, B))`` passes the corpus as an argument instead of baking it into the program.
A batch is a pure function of its PRNG key, which makes runs reproducible and
resumable: step ``s`` trains on ``train_batch(fold_in(key, s), B)``.

Example:
  >>> import jax
  >>> task = RecallTask(num_pairs=2, num_keys=4, num_values=4)
  >>> b = task.train_batch(jax.random.key(0), 3)
  >>> b.inputs.shape, task.vocab_size   # k v k v SEP q -> v(q)
  ((3, 6), 9)
  >>> b.weights[0].tolist()             # only the answer is scored
  [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
"""

from __future__ import annotations

import math
import pathlib
import sysconfig
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from experiments.config import ConfigError, DataConfig


class Batch(NamedTuple):
    """Next-token examples: ``inputs``/``targets`` int32[B, T], ``weights`` float32[B, T]."""

    inputs: jax.Array
    targets: jax.Array
    weights: jax.Array


def _shift(tokens_BL: jax.Array, scored_from: int) -> Batch:
    """A batch from whole sequences ``[B, T+1]``: targets from position ``scored_from``
    (a target index) on carry weight 1."""
    tokens_BL = tokens_BL.astype(jnp.int32)
    T = tokens_BL.shape[1] - 1
    weights_T = (jnp.arange(T) >= scored_from).astype(jnp.float32)
    weights_BT = jnp.broadcast_to(weights_T, (tokens_BL.shape[0], T))
    return Batch(tokens_BL[:, :-1], tokens_BL[:, 1:], weights_BT)


# ------------------------------------------------------------------------- synthetic


@struct.dataclass
class RecallTask:
    """Associative recall: ``k1 v1 k2 v2 ... kn vn SEP q1 v(q1) ... qm v(qm)``.

    Keys are ``n`` distinct tokens of ``[0, num_keys)``, values tokens of
    ``[num_keys, num_keys + num_values)`` drawn with replacement, the ``m`` queries
    distinct keys; only the answers ``v(q)`` are scored, and an example counts as
    solved (exact match) when all its answers are right.  No fixed weights can solve
    it: the model must find each query among the keys and copy the token after it,
    which is what attention does.  Held-out examples are drawn from a different key
    than training examples.
    """

    num_pairs: int = struct.field(pytree_node=False)
    num_keys: int = struct.field(pytree_node=False)
    num_values: int = struct.field(pytree_node=False)
    num_queries: int = struct.field(pytree_node=False, default=1)
    name = "recall"
    metrics = ("loss", "accuracy", "exact_match")

    @property
    def sep(self) -> int:
        return self.num_keys + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.num_pairs + 2 * self.num_queries

    @property
    def answer_length(self) -> int:
        return 1

    def sequences(self, key: jax.Array, n: int) -> jax.Array:
        """``n`` whole examples, int32 ``[n, seq_len + 1]``."""

        def one(k):
            k_keys, k_values, k_query = jax.random.split(k, 3)
            keys_P = jax.random.permutation(k_keys, self.num_keys)[: self.num_pairs]
            values_P = jax.random.randint(
                k_values, (self.num_pairs,), self.num_keys, self.num_keys + self.num_values
            )
            q_Q = jax.random.permutation(k_query, self.num_pairs)[: self.num_queries]
            pairs = jnp.stack([keys_P, values_P], axis=1).reshape(-1)
            queries = jnp.stack([keys_P[q_Q], values_P[q_Q]], axis=1).reshape(-1)
            return jnp.concatenate([pairs, jnp.array([self.sep]), queries]).astype(jnp.int32)

        return jax.vmap(one)(jax.random.split(key, n))

    def train_batch(self, key: jax.Array, batch_size: int) -> Batch:
        batch = _shift(self.sequences(key, batch_size), 0)
        # scored: the targets after each query, at input positions 2n + 1 + 2j
        t = jnp.arange(self.seq_len)
        answer_T = (t > 2 * self.num_pairs) & ((t - 2 * self.num_pairs) % 2 == 1)
        return batch._replace(weights=jnp.broadcast_to(answer_T.astype(jnp.float32), batch.weights.shape))

    def eval_set(self, key: jax.Array, n: int) -> Batch:
        return self.train_batch(key, n)

    def token_label(self, t: int) -> str:
        t = int(t)
        if t < self.num_keys:
            return f"k{t}"
        return f"v{t - self.num_keys}" if t < self.sep else "?"


@struct.dataclass
class SortTask:
    """Sorting as a prompt and its answer: ``x1 ... xL SEP sorted(x1 ... xL)``.

    Symbols are drawn with replacement from ``[0, num_symbols)``; the ``L`` answer
    targets are scored, and an example counts as solved only if all of them are
    right (exact match).
    """

    length: int = struct.field(pytree_node=False)
    num_symbols: int = struct.field(pytree_node=False)
    name = "sort"
    metrics = ("loss", "accuracy", "exact_match")

    @property
    def sep(self) -> int:
        return self.num_symbols

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.length

    @property
    def answer_length(self) -> int:
        return self.length

    def sequences(self, key: jax.Array, n: int) -> jax.Array:
        """``n`` whole examples, int32 ``[n, seq_len + 1]``."""
        x_NL = jax.random.randint(key, (n, self.length), 0, self.num_symbols)
        sep_N1 = jnp.full((n, 1), self.sep)
        return jnp.concatenate([x_NL, sep_N1, jnp.sort(x_NL, axis=1)], axis=1).astype(jnp.int32)

    def train_batch(self, key: jax.Array, batch_size: int) -> Batch:
        return _shift(self.sequences(key, batch_size), self.length)

    def eval_set(self, key: jax.Array, n: int) -> Batch:
        return self.train_batch(key, n)

    def token_label(self, t: int) -> str:
        t = int(t)
        return ">" if t == self.sep else str(t)


# --------------------------------------------------------------------------------- lm

# Folders of the standard library left out of the default corpus: tests (much of it
# generated data) and installed third-party packages.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    """The running interpreter's standard-library ``.py`` files, sorted by path
    (tests and site-packages excluded): the default corpus, no download needed."""
    root = pathlib.Path(sysconfig.get_path("stdlib"))
    files = [
        p for p in root.rglob("*.py")
        if p.is_file() and not set(p.relative_to(root).parts[:-1]) & _EXCLUDED_DIRS
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _text_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Files under ``folder`` that look like text (no NUL byte in the first 8 KiB),
    hidden ones excluded, sorted by path."""
    files = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            with open(p, "rb") as f:
                if b"\0" not in f.read(8192):
                    files.append(p)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def is_validation_file(relative_path: str, val_fraction: float) -> bool:
    """Whether a file belongs to the validation split: a CRC32 of its relative path,
    so the split of a file never changes when other files come or go.

    >>> is_validation_file("json/decoder.py", 0.05), is_validation_file("json/decoder.py", 0.999)
    (False, True)
    """
    return zlib.crc32(relative_path.encode()) % 10_000 < val_fraction * 10_000


def load_corpus(path: str | None, val_fraction: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(train uint8[N], validation uint8[M], info)`` from a text file, a folder of
    text files, or (``path=None``) the standard library's sources.

    A folder is split by file (`is_validation_file`), its files joined with a newline
    in path order; a single file, or a folder whose file split leaves a side empty,
    is split by bytes: the last ``val_fraction`` is validation.
    """
    if path is None:
        root, files = stdlib_files()
        source = f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} stdlib at {root}"
    else:
        root = pathlib.Path(path).expanduser()
        if root.is_file():
            files, source = [root], str(root)
        elif root.is_dir():
            files, source = _text_files(root), str(root)
        else:
            raise ConfigError(f"data.path={path!r} is neither a file nor a folder")
        if not files:
            raise ConfigError(f"data.path={path!r} holds no text files")
    if len(files) > 1:
        rel = [p.relative_to(root).as_posix() for p in files]
        val = [is_validation_file(r, val_fraction) for r in rel]
        if any(val) and not all(val):
            train_b = b"\n".join(p.read_bytes() for p, v in zip(files, val) if not v)
            val_b = b"\n".join(p.read_bytes() for p, v in zip(files, val) if v)
            info = dict(source=source, split="by file", train_files=val.count(False),
                        val_files=val.count(True))
            return _as_array(train_b), _as_array(val_b), info | _sizes(train_b, val_b)
    data = b"\n".join(p.read_bytes() for p in files)
    cut = len(data) - int(round(len(data) * val_fraction))
    info = dict(source=source, split="by bytes", files=len(files))
    return _as_array(data[:cut]), _as_array(data[cut:]), info | _sizes(data[:cut], data[cut:])


def _as_array(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).copy()


def _sizes(train_b: bytes, val_b: bytes) -> dict:
    return dict(train_bytes=len(train_b), val_bytes=len(val_b))


def bigram_bits_per_byte(train_N: np.ndarray, inputs: np.ndarray, targets: np.ndarray,
                         alpha: float = 0.5) -> float:
    """Bits per byte of a bigram model ``p(next | previous)`` counted on ``train_N``
    (additive smoothing ``alpha``), scored on the pairs ``(inputs, targets)``: the
    reference the LM must beat.

    >>> train = np.frombuffer(b"abababab", np.uint8)
    >>> round(bigram_bits_per_byte(train, np.array([97]), np.array([98]), alpha=0.0), 6)
    0.0
    """
    train_N = np.asarray(train_N, dtype=np.int64)
    counts = np.bincount(train_N[:-1] * 256 + train_N[1:], minlength=256 * 256)
    counts = counts.reshape(256, 256).astype(np.float64) + alpha
    with np.errstate(divide="ignore", invalid="ignore"):  # alpha=0: unseen pairs are -inf
        log_p = np.log2(counts) - np.log2(counts.sum(axis=1, keepdims=True))
    inputs, targets = np.asarray(inputs).reshape(-1), np.asarray(targets).reshape(-1)
    return float(-log_p[inputs, targets].mean())


def _windows(data_N: jax.Array, starts_B: jax.Array, length: int) -> jax.Array:
    """``data[s : s + length]`` for each start, ``[B, length]``."""
    return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(data_N, s, length))(starts_B)


@struct.dataclass
class LMTask:
    """Byte-level language modelling: predict each next byte of a text corpus.

    Training windows of ``seq_len + 1`` bytes start at random offsets of the train
    split; the held-out set is ``n`` windows spread evenly over the validation split
    (the same every run).  Metrics: loss (nats/byte) and bits per byte; the bigram
    reference is scored on the very same held-out windows.
    """

    train_N: jax.Array
    val_M: jax.Array
    seq_len: int = struct.field(pytree_node=False)
    name = "lm"
    metrics = ("loss", "bpb", "bigram_bpb", "bpb_ratio")
    vocab_size = 256

    def train_batch(self, key: jax.Array, batch_size: int) -> Batch:
        n = self.train_N.shape[0]
        starts_B = jax.random.randint(key, (batch_size,), 0, n - self.seq_len)
        return _shift(_windows(self.train_N, starts_B, self.seq_len + 1), 0)

    def eval_set(self, key: jax.Array, n: int) -> Batch:
        del key  # evenly spaced windows: deterministic
        m = self.val_M.shape[0]
        starts = np.linspace(0, m - self.seq_len - 1, n).round().astype(np.int32)
        return _shift(_windows(self.val_M, jnp.asarray(starts), self.seq_len + 1), 0)

    def token_label(self, t: int) -> str:
        c = chr(int(t))
        return {"\n": "\\n", "\t": "\\t", " ": "·"}.get(c, c if c.isprintable() else f"x{int(t):02x}")


Task = RecallTask | SortTask | LMTask


def make_task(cfg: DataConfig) -> tuple[Task, dict]:
    """The task a data config names, and a description of its data (for ``lm``: the
    corpus source and split sizes, read here; ``{}`` for the synthetic tasks)."""
    if cfg.task == "recall":
        r = cfg.recall
        task = RecallTask(num_pairs=r.num_pairs, num_keys=r.num_keys, num_values=r.num_values,
                          num_queries=r.num_queries)
        return task, {}
    if cfg.task == "sort":
        return SortTask(length=cfg.sort.length, num_symbols=cfg.sort.num_symbols), {}
    train_N, val_M, info = load_corpus(cfg.path, cfg.lm.val_fraction)
    for split, arr in (("train", train_N), ("validation", val_M)):
        if arr.shape[0] < cfg.lm.seq_len + 2:
            raise ConfigError(
                f"data.lm.seq_len={cfg.lm.seq_len} needs at least {cfg.lm.seq_len + 2} bytes "
                f"in the {split} split; data.path={cfg.path!r} gives {arr.shape[0]}"
            )
    task = LMTask(train_N=jnp.asarray(train_N), val_M=jnp.asarray(val_M), seq_len=cfg.lm.seq_len)
    return task, info


# --------------------------------------------------------------------------- metrics


def score(logits_BTV: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Sums over a batch, to be added up over held-out batches and turned into
    metrics by `summarize`: weighted cross-entropy, scored targets, correct argmax
    predictions, and examples whose every scored target is right.

    With teacher forcing, "every scored target right under argmax" is the same event
    as "greedy decoding of the prompt reproduces the whole answer", so exact match
    needs no decoding loop.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, batch.targets[..., None], axis=-1)[..., 0]
    right_BT = jnp.argmax(logits_BTV, axis=-1) == batch.targets
    scored_BT = batch.weights > 0
    return dict(
        nll=jnp.sum(nll_BT * batch.weights),
        weight=jnp.sum(batch.weights),
        correct=jnp.sum(right_BT * batch.weights),
        exact=jnp.sum(jnp.all(right_BT | ~scored_BT, axis=-1)),
        examples=jnp.asarray(batch.inputs.shape[0], jnp.float32),
    )


def summarize(task: Task, sums: dict, reference: dict | None = None) -> dict[str, float]:
    """The task's metrics from summed `score` outputs (``reference``: e.g. the
    ``bigram_bpb`` of `reference_metrics`)."""
    loss = float(sums["nll"]) / float(sums["weight"])
    if task.name == "lm":
        out = dict(loss=loss, bpb=loss / math.log(2))
        if reference:
            out |= dict(bigram_bpb=reference["bigram_bpb"], bpb_ratio=out["bpb"] / reference["bigram_bpb"])
        return out
    return dict(
        loss=loss,
        accuracy=float(sums["correct"]) / float(sums["weight"]),
        exact_match=float(sums["exact"]) / float(sums["examples"]),
    )


def reference_metrics(task: Task, eval_set: Batch) -> dict[str, float]:
    """Fixed references on the held-out set: for ``lm`` the bigram bits per byte."""
    if task.name != "lm":
        return {}
    return dict(bigram_bpb=bigram_bits_per_byte(
        np.asarray(task.train_N), np.asarray(eval_set.inputs), np.asarray(eval_set.targets)))
