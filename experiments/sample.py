"""Generate from a trained run with the KV cache.

    python -m experiments.sample runs/<name> [--prompt TEXT] [--length N]
                                             [--temperature T] [--num N] [--seed S]

For ``lm`` the prompt is text (bytes) and the continuation is printed; for
``recall`` and ``sort`` the prompts are held-out examples, the model completes each
answer greedily and every completion is printed with the true answer.

The prompt is fed once (prefill, filling each layer's `jattn.cache.KVCache`), then
one token per step attends to the cache: ``O(T)`` work per new token instead of
re-running the whole sequence.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import train as train_lib


def generate(graphdef, params, prompt_BP: jax.Array, length: int, key: jax.Array,
             temperature: float = 0.0) -> jax.Array:
    """``length`` new tokens after each prompt, int32 ``[B, length]``.

    ``temperature == 0`` is greedy decoding; otherwise token ``i`` is drawn from
    ``softmax(logits / temperature)`` with ``fold_in(key, i)``.

    Example:
      >>> from experiments.config import ModelConfig
      >>> from experiments.model import Transformer
      >>> model = Transformer(ModelConfig(d_model=16, num_heads=2, mlp_dim=32), vocab_size=7,
      ...                     max_len=8, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(model, nnx.Param)
      >>> generate(graphdef, params, jnp.array([[1, 2, 3]]), 4, jax.random.key(0)).shape
      (1, 4)
    """
    B, P = prompt_BP.shape

    def pick(logits_BV, i):
        if temperature == 0.0:
            return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        return jax.random.categorical(jax.random.fold_in(key, i), logits_BV.astype(jnp.float32) / temperature).astype(jnp.int32)

    @jax.jit
    def run(params, prompt_BP):
        model = nnx.merge(graphdef, params)
        caches = model.init_caches(B, P + length)
        logits_BPV, caches = model(prompt_BP, caches=caches)
        first_B = pick(logits_BPV[:, -1], 0)

        def step(carry, i):
            token_B, caches = carry
            logits_B1V, caches = model(token_B[:, None], caches=caches)
            nxt_B = pick(logits_B1V[:, 0], i)
            return (nxt_B, caches), token_B

        (last_B, _), tokens_LB = jax.lax.scan(step, (first_B, caches), jnp.arange(1, length))
        return jnp.concatenate([tokens_LB.T, last_B[:, None]], axis=1)

    return run(params, prompt_BP.astype(jnp.int32))


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m experiments.sample", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run folder, e.g. runs/lm")
    parser.add_argument("--prompt", default="def ", help="lm: the text to continue")
    parser.add_argument("--length", type=int, default=None, help="lm: bytes to generate (default: fill the context)")
    parser.add_argument("--temperature", type=float, default=0.8, help="lm: 0 is greedy")
    parser.add_argument("--num", type=int, default=4, help="how many samples / examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    run = pathlib.Path(args.run)
    cfg, s, params, step = train_lib.restore_params(run)
    task, max_len = s.task, s.task.seq_len
    key = jax.random.key(args.seed)
    lines = []
    if task.name == "lm":
        prompt = args.prompt.encode()
        if not 0 < len(prompt) < max_len:
            raise SystemExit(f"--prompt: {len(prompt)} bytes; expected 1 to {max_len - 1} (the model's context is {max_len})")
        length = args.length or max_len - len(prompt)
        if cfg.model.positions == "learned" and len(prompt) + length > max_len:
            raise SystemExit(
                f"--length {length}: prompt ({len(prompt)} bytes) + length exceeds the {max_len} "
                f"positions the model learned"
            )
        prompt_BP = jnp.tile(jnp.asarray(np.frombuffer(prompt, np.uint8), jnp.int32), (args.num, 1))
        tokens = np.asarray(generate(s.graphdef, params, prompt_BP, length, key, args.temperature))
        for row in tokens:
            text = prompt + bytes(row.astype(np.uint8).tolist())
            lines.append(text.decode("utf-8", errors="replace"))
            print(f"--- sample (step {step}, temperature {args.temperature})\n{lines[-1]}")
        return lines
    examples = task.sequences(jax.random.fold_in(key, 1), args.num)
    P = examples.shape[1] - task.answer_length
    tokens = np.asarray(generate(s.graphdef, params, examples[:, :P], task.answer_length, key, 0.0))
    right = 0
    for ex, out in zip(np.asarray(examples), tokens):
        words = lambda ts: " ".join(task.token_label(t) for t in ts)
        ok = bool(np.all(out == ex[P:]))
        right += ok
        lines.append(f"{words(ex[:P])}  ->  {words(out)}   (answer {words(ex[P:])}: {'right' if ok else 'WRONG'})")
        print(lines[-1])
    print(f"{right}/{len(tokens)} right (greedy decoding with the KV cache, step {step})")
    return lines


if __name__ == "__main__":
    main()
