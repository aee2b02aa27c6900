"""What a trained run does, shown by its task (`Task.samples`).

    python -m experiments.sample runs/<name> [--prompt TEXT] [--length N]
                                             [--temperature T] [--num N] [--seed S]

For ``lm`` the prompt is text (bytes) and the sampled continuations are printed; for
``recall`` and ``sort`` held-out prompts are completed greedily and each completion is
printed with the true answer; other tasks print what their ``samples`` say (each
task's docstring).  Decoder tasks generate with the KV cache: the prompt is fed once
(prefill, filling each layer's `jattn.cache.KVCache`), then one token per step attends
to the cache, ``O(T)`` work per new token instead of re-running the whole sequence
(`experiments.model.generate`).
"""

from __future__ import annotations

import argparse
import pathlib

import jax

from experiments import run as run_lib
from experiments.tasks.base import SampleOptions


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m experiments.sample", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run folder, e.g. runs/lm")
    parser.add_argument("--prompt", default="def ", help="lm: the text to continue")
    parser.add_argument("--length", type=int, default=None, help="lm: bytes to generate (default: fill the context)")
    parser.add_argument("--temperature", type=float, default=0.8, help="lm: 0 is greedy")
    parser.add_argument("--num", type=int, default=4, help="how many samples / examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg, s, model, step = run_lib.restore_model(pathlib.Path(args.run))
    options = SampleOptions(num=args.num, prompt=args.prompt, length=args.length,
                            temperature=args.temperature, seed=args.seed)
    try:
        lines = s.task.samples(model, options, jax.random.key(args.seed))
    except ValueError as e:  # an option that does not fit the model
        raise SystemExit(str(e)) from None
    print(f"{cfg.name} (task {s.task.name}), step {step}:")
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()
