"""Byte-level language modelling (``data.task=lm``) on a text corpus: by default the
running interpreter's standard-library sources, so no download is needed.

Metrics: loss (nats/byte), bits per byte, and the bits per byte of a bigram model
counted on the train split and scored on the very same held-out windows.
"""

from __future__ import annotations

import math
import pathlib
import sys
import sysconfig
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from pydantic import model_validator

from experiments import data
from experiments.model import generate
from experiments.schema import ConfigError, Float, PositiveInt, Section
from experiments.tasks.base import LossPlot, NextTokenTask, SampleOptions, register


class LMConfig(Section):
    """Byte-level language modelling (task ``lm``; the text is ``data.path``)."""

    seq_len: PositiveInt = 128
    val_fraction: Float = 0.05  # of the files (or bytes, for one file) held out

    @model_validator(mode="after")
    def _consistent(self) -> LMConfig:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.lm.val_fraction must be in (0, 1); got {self.val_fraction}")
        return self


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
        source = f"Python {'.'.join(map(str, sys.version_info[:3]))} stdlib at {root}"
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
    text = b"\n".join(p.read_bytes() for p in files)
    cut = len(text) - int(round(len(text) * val_fraction))
    info = dict(source=source, split="by bytes", files=len(files))
    return _as_array(text[:cut]), _as_array(text[cut:]), info | _sizes(text[:cut], text[cut:])


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


@register
@struct.dataclass
class LMTask(NextTokenTask):
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
    Config = LMConfig
    metrics = ("loss", "bpb", "bigram_bpb", "bpb_ratio")
    vocab_size = 256
    loss_plot = LossPlot(ylabel="bits per byte", scale=1 / math.log(2), reference="bigram_bpb",
                         reference_label="bigram (held-out)", ratio_target="bpb_ratio", panel=())
    caption = "a held-out window of bytes"

    @classmethod
    def from_config(cls, data_cfg) -> tuple[LMTask, dict]:
        lm = data_cfg.lm
        train_N, val_M, info = load_corpus(data_cfg.path, lm.val_fraction)
        for split, arr in (("train", train_N), ("validation", val_M)):
            if arr.shape[0] < lm.seq_len + 2:
                raise ConfigError(
                    f"data.lm.seq_len={lm.seq_len} needs at least {lm.seq_len + 2} bytes "
                    f"in the {split} split; data.path={data_cfg.path!r} gives {arr.shape[0]}"
                )
        return cls(train_N=jnp.asarray(train_N), val_M=jnp.asarray(val_M), seq_len=lm.seq_len), info

    def describe(self, info: dict) -> str:
        return f"{info.get('train_bytes', 0):,} train / {info.get('val_bytes', 0):,} val bytes, T={self.seq_len}"

    def train_batch(self, key: jax.Array, batch_size: int) -> data.Batch:
        n = self.train_N.shape[0]
        starts_B = jax.random.randint(key, (batch_size,), 0, n - self.seq_len)
        return data.shift(_windows(self.train_N, starts_B, self.seq_len + 1), 0)

    def eval_set(self, key: jax.Array, n: int) -> data.Batch:
        del key  # evenly spaced windows: deterministic
        m = self.val_M.shape[0]
        starts = np.linspace(0, m - self.seq_len - 1, n).round().astype(np.int32)
        return data.shift(_windows(self.val_M, jnp.asarray(starts), self.seq_len + 1), 0)

    def summarize(self, sums: dict, reference: dict) -> dict[str, float]:
        loss = float(sums["nll"]) / float(sums["weight"])
        out = dict(loss=loss, bpb=loss / math.log(2))
        if reference:
            out |= dict(bigram_bpb=reference["bigram_bpb"], bpb_ratio=out["bpb"] / reference["bigram_bpb"])
        return out

    def reference_metrics(self, eval_set: data.Batch) -> dict[str, float]:
        return dict(bigram_bpb=bigram_bits_per_byte(
            np.asarray(self.train_N), np.asarray(eval_set.inputs), np.asarray(eval_set.targets)))

    def token_label(self, t: int) -> str:
        c = chr(int(t))
        return {"\n": "\\n", "\t": "\\t", " ": "·"}.get(c, c if c.isprintable() else f"x{int(t):02x}")

    def samples(self, model, options: SampleOptions, key: jax.Array) -> list[str]:
        """``options.num`` continuations of ``options.prompt`` (text), sampled at
        ``options.temperature`` (0: greedy)."""
        prompt, max_len = options.prompt.encode(), self.seq_len
        if not 0 < len(prompt) < max_len:
            raise ValueError(f"--prompt: {len(prompt)} bytes; expected 1 to {max_len - 1} "
                             f"(the model's context is {max_len})")
        length = options.length or max_len - len(prompt)
        if model.pos_embed is not None and len(prompt) + length > max_len:
            raise ValueError(f"--length {length}: prompt ({len(prompt)} bytes) + length exceeds the "
                             f"{max_len} positions the model learned")
        prompt_BP = jnp.tile(jnp.asarray(np.frombuffer(prompt, np.uint8), jnp.int32), (options.num, 1))
        graphdef, params = nnx.split(model, nnx.Param)
        tokens = np.asarray(generate(graphdef, params, prompt_BP, length, key, options.temperature))
        return [f"--- sample {i + 1} (temperature {options.temperature:g})\n"
                + (prompt + bytes(row.astype(np.uint8).tolist())).decode("utf-8", errors="replace")
                for i, row in enumerate(tokens)]
