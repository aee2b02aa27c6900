"""Config-driven training experiments and the benchmark, built on jattn.

One job per file:

- `experiments.schema`: the config mechanism (frozen pydantic sections, YAML, strict
  dotted ``key=value`` overrides, errors naming the key), shared with the benchmark;
- `experiments.config`: the training experiments' schema;
- `experiments.tasks`: the tasks, one module each, behind the `Task` protocol and its
  registry;
- `experiments.data`: batches and scores the tasks share;
- `experiments.model`: the transformer built from jattn's NNX modules, and the
  attention-module factory;
- `experiments.run`: the run library (keys, mesh, model, optimizer, step functions,
  checkpoints, the run folder);
- `experiments.train`: ``python -m experiments.train --config configs/X.yaml key=value``;
- `experiments.plot`: loss curves and attention heatmaps of a run folder;
- `experiments.sample`: what a trained run does (generation with the KV cache);
- `experiments.throughput`: training tokens/s of jattn against flax.nnx.MultiHeadAttention;
- `experiments.benchmark`: ``python -m experiments.benchmark --config configs/bench_X.yaml``.
"""
