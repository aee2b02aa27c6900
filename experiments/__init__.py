"""Config-driven training experiments built on jattn.

One idea per file:

- `experiments.config`: the frozen-dataclass schema, YAML loading, strict
  ``key=value`` overrides;
- `experiments.data`: the tasks (byte-level ``lm``, synthetic ``recall`` and ``sort``);
- `experiments.model`: a decoder-only transformer built from jattn's NNX modules;
- `experiments.train`: ``python -m experiments.train --config configs/X.yaml key=value``;
- `experiments.plot`: loss curves and attention heatmaps of a run folder;
- `experiments.sample`: generation with the KV cache from a run folder;
- `experiments.throughput`: training tokens/s of jattn against flax.nnx.MultiHeadAttention.
"""
