"""The run library: what training, plotting, sampling and the throughput measurement
share -- a run's PRNG keys, mesh, model, optimizer, pure step functions, its folder,
metrics log and checkpoints.  `experiments.train` is the command line over it.

The training step is pure: ``state, batch -> state, metrics`` under ``jax.jit`` with
the state donated; its batch is ``task.train_batch(fold_in(keys["train_data"], step))``
and its dropout key ``fold_in(keys["dropout"], step)``, so a run resumed from a
checkpoint at step s repeats steps s+1... exactly as an uninterrupted run would.
Parallelism: the mesh has four named axes (``mesh.data``, ``mesh.fsdp``,
``mesh.tensor``, ``mesh.context``; `experiments.config.MeshConfig`).  The batch is
split over ``data`` and ``fsdp`` (and its sequence axis over ``context``); the
parameters are sharded through the logical axis names the modules declare
(`LOGICAL_AXIS_RULES`: ``embed`` over ``fsdp``, heads and the MLP's hidden axis over
``tensor``), their optimizer state alike, and the train state is created sharded
(``jit`` with ``out_shardings``); XLA inserts the collectives.  The default mesh
(``data: -1``) is data parallelism over every device with a replicated state.  Under
``jax.distributed`` (several processes), every process runs the same program and
feeds only its own rows of each batch (`BatchFeeder`).

Example:
  >>> from experiments import config
  >>> cfg = config.load("configs/sort.yaml", ["model.d_model=16", "model.num_heads=2"])
  >>> s = setup(cfg)
  >>> s.task.name, int(s.state.step)
  ('sort', 0)
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from experiments import config as config_lib
from experiments import tasks
from experiments.config import MESH_AXES, Config
from experiments import schema
from experiments.schema import ConfigError


class TrainState(NamedTuple):
    """Everything a step updates: step count, parameters and optimizer state (plain
    pytrees of arrays, so orbax saves and restores them as they are)."""

    step: jax.Array  # int32 scalar: steps taken
    params: Any
    opt_state: Any


def run_dir(cfg: Config) -> pathlib.Path:
    return pathlib.Path(cfg.runs_dir) / cfg.name


def keys(cfg: Config) -> dict[str, jax.Array]:
    """The run's PRNG keys, each from its own fold of the seed, never reused:
    ``params`` (init), ``train_data`` (folded with the step), ``eval_data``,
    ``dropout`` (folded with the step)."""
    root = jax.random.key(cfg.train.seed)
    return {name: jax.random.fold_in(root, i)
            for i, name in enumerate(("params", "train_data", "eval_data", "dropout"))}


# ------------------------------------------------------------------ processes, mesh


def start_processes(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, *, cpu_devices: int | None = None,
                    heartbeat_timeout_s: int = 30) -> None:
    """Join a multi-process run (``jax.distributed``) when a coordinator is given, by
    argument or by ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``; on CPUs the collectives between processes go through gloo.
    ``cpu_devices``: this process's number of (forced host) CPU devices.  Call before
    anything touches a JAX device.  A process that stops sending heartbeats for
    ``heartbeat_timeout_s`` seconds is declared dead and the others terminate (one that
    dies outright is noticed at once: its connection to the coordinator drops)."""
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator is None:
        if num_processes not in (None, 1):
            raise ConfigError(f"{num_processes} processes but no coordinator address "
                              "(--coordinator or JAX_COORDINATOR_ADDRESS)")
        return
    if num_processes is None or process_id is None:
        raise ConfigError("a multi-process run needs the coordinator address, the number of "
                          "processes and this process's id (--num-processes / JAX_NUM_PROCESSES, "
                          "--process-id / JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)


def is_main_process() -> bool:
    """Process 0 writes the run folder's files and prints; the others only compute."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# Logical axis names (declared by the modules' parameters: `experiments.model`,
# `jattn.nnx`) -> mesh axes.  A name left out, or mapped to None, is not sharded.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", None),
    ("positions", None),
)
BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: Config, devices=None) -> Mesh:
    """The ``(data, fsdp, tensor, context)`` mesh of ``cfg.mesh`` over the first
    devices (all of them when several processes run); checks that the batches split.
    ``devices``: the devices to use (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    processes = jax.process_count()
    what = "local devices" if processes == 1 else f"devices ({processes} processes)"
    sizes = cfg.mesh.sizes(len(devices), what)
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    n = math.prod(shape)
    if n != len(devices) and len({d.process_index for d in devices}) > 1:
        raise ConfigError(f"the mesh ({' x '.join(f'mesh.{a}={sizes[a]}' for a in MESH_AXES)}) uses {n} "
                          f"of the {len(devices)} devices of the {processes} processes: a multi-process "
                          "run uses them all (set one axis to -1)")
    split = sizes["data"] * sizes["fsdp"]
    for key, value in (("train.batch_size", cfg.train.batch_size), ("eval.batch_size", cfg.eval.batch_size)):
        if value % split:
            raise ConfigError(f"{key}={value} must be a multiple of mesh.data x mesh.fsdp = {split} "
                              "(the batch is split over both)")
    # data, fsdp and tensor are Auto axes (XLA partitions the model); context, when the
    # sequence is split by jattn, is Explicit: it is in the activations' types, where
    # jattn.dot_product_attention sees it and serves the split (ring / all-gather).
    split = sizes.get("context", 1) > 1 and cfg.model.attention.module == "jattn"
    types = tuple(AxisType.Explicit if a == "context" and split else AxisType.Auto for a in MESH_AXES)
    return Mesh(np.array(devices[:n]).reshape(shape), MESH_AXES, axis_types=types)


def splits_sequence(mesh: Mesh) -> bool:
    """Whether jattn splits the sequence over the mesh's ``context`` axis (context
    parallelism): an Explicit axis of more than one device, which `make_mesh` makes
    when ``mesh.context`` > 1 with jattn's attention.  (With
    ``model.attention.module=flax`` it is an Auto axis: the batch's sequence axis is
    sharded over it and XLA partitions the attention as it can.)"""
    i = mesh.axis_names.index("context")
    return mesh.axis_types[i] == AxisType.Explicit and mesh.devices.shape[i] > 1


def model_config(cfg: Config, mesh: Mesh):
    """``cfg.model`` as the model is built: with ``attention.sequence_axis="context"``
    when the sequence is split (`splits_sequence`)."""
    if splits_sequence(mesh):
        return schema.updated(cfg.model, {"attention.sequence_axis": "context"})
    return cfg.model


def describe_devices(mesh: Mesh) -> str:
    d = mesh.devices.reshape(-1)
    text = f"{len(d)} x {d[0].device_kind} ({d[0].platform})"
    processes = len({x.process_index for x in d})
    if processes > 1:
        text = f"{processes} processes, {text}"
    if any(mesh.shape[a] > 1 for a in MESH_AXES if a != "data"):  # more than data parallelism
        text += ", mesh " + " x ".join(f"{a} {mesh.shape[a]}" for a in MESH_AXES if mesh.shape[a] > 1)
    return text


def logical_spec(names, shape, mesh: Mesh) -> P:
    """The PartitionSpec of an array whose axes have the logical ``names``
    (`LOGICAL_AXIS_RULES`); a mesh axis of size 1, already used, or not dividing the
    array's axis is left out (that axis is then not split)."""
    rules = dict(LOGICAL_AXIS_RULES)
    used, spec = set(), []
    for name, size in zip(names or (), shape):
        axes = rules.get(name)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def param_shardings(abstract_params, mesh: Mesh):
    """The NamedSharding of each parameter (an ``nnx.State`` of ``nnx.Param``, e.g.
    abstract from ``nnx.eval_shape``) from the logical names in its ``out_sharding``
    metadata, as a pure dict like ``nnx.to_pure_dict(params)``."""

    def sharding(v):
        names = v.get_metadata().get("out_sharding")
        return NamedSharding(mesh, logical_spec(names, v.get_value().shape, mesh))

    tree = jax.tree.map(sharding, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def state_shardings(abstract_params, tx, mesh: Mesh) -> TrainState:
    """The shardings of a train state: the parameters' from their logical names
    (`param_shardings`), the optimizer state's moments like their parameters
    (``optax.tree_map_params``), everything else (step, counts) replicated."""
    replicated = NamedSharding(mesh, P())
    params = param_shardings(abstract_params, mesh)
    opt_state = optax.tree_map_params(
        tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_params)), params,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(replicated, params, opt_state)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """A batch array ``[B, ...]``: B over ``data`` and ``fsdp``; the next axis (the
    sequence) over ``context`` when it is an Auto axis (`splits_sequence`: else the
    model splits its activations after the embedding)."""
    spec = [BATCH_AXES] + [None] * (len(shape) - 1)
    if len(shape) >= 2 and mesh.shape["context"] > 1:
        if shape[1] % mesh.shape["context"]:
            raise ConfigError(f"mesh.context={mesh.shape['context']} must divide the sequence length of the "
                              f"batch; got an array of shape {tuple(shape)}")
        if not splits_sequence(mesh):  # else the model splits its activations (the tokens stay whole)
            spec[1] = "context"
    return NamedSharding(mesh, P(*spec))


def global_array(x, sharding: NamedSharding) -> jax.Array:
    """A host array, the same in every process, as a global array of ``sharding``
    (each process places only its own devices' shards)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class BatchFeeder:
    """``step -> the global training batch of that step``, sharded over the mesh.

    One process: the batch is generated under ``jit`` straight into its shardings.
    Several processes: each generates the step's batch on its own first device (the
    batch is a pure function of the step's key, so every process draws the same
    one) and feeds only its own rows (and, with ``context``, sequence block) to
    ``jax.make_array_from_process_local_data``; no process places another's data.
    """

    def __init__(self, task, mesh: Mesh, key: jax.Array, batch_size: int):
        draw = lambda task, step: task.train_batch(jax.random.fold_in(key, step), batch_size)  # noqa: E731
        shapes = jax.eval_shape(draw, task, 0)
        self.shardings = jax.tree.map(lambda x: batch_sharding(mesh, x.shape), shapes)
        self.task, self.multiprocess = task, jax.process_count() > 1
        if self.multiprocess:
            self._draw = jax.jit(draw)
            self._local = jax.tree.map(lambda x, sh: _local_box(sh, x.shape), shapes, self.shardings)
        else:
            self._draw = jax.jit(draw, out_shardings=self.shardings)

    def __call__(self, step: int):
        if not self.multiprocess:
            return self._draw(self.task, step)
        batch = jax.device_get(self._draw(self.task, step))
        return jax.tree.map(
            lambda x, sh, box: jax.make_array_from_process_local_data(sh, x[box], x.shape),
            batch, self.shardings, self._local,
        )


def _local_box(sharding: NamedSharding, shape) -> tuple[slice, ...]:
    """The block of a global array that this process's devices hold (the union of
    their shards' index ranges, axis by axis)."""
    indices = sharding.addressable_devices_indices_map(tuple(shape)).values()
    box = []
    for axis, size in enumerate(shape):
        ranges = [idx[axis].indices(size)[:2] for idx in indices]
        box.append(slice(min(r[0] for r in ranges), max(r[1] for r in ranges)))
    return tuple(box)


def compute_dtype(cfg: Config):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.train.dtype]


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on matrices only) after global-norm clipping, with linear warmup
    over ``warmup_fraction`` of the steps, then cosine decay to
    ``learning_rate * min_lr_ratio`` at the last step."""
    t = cfg.train
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=round(t.warmup_fraction * t.steps),
        decay_steps=t.steps, end_value=t.learning_rate * t.min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def make_train_step(task, graphdef, tx, schedule, dropout_key: jax.Array, dropout: float):
    """The pure step ``(state, batch) -> (state, metrics)`` on ``task.loss``; jit it
    with the state donated."""

    def train_step(state: TrainState, batch):
        rngs = nnx.Rngs(dropout=jax.random.fold_in(dropout_key, state.step))

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            return task.loss(model, batch, deterministic=dropout == 0.0, rngs=rngs)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(task, graphdef):
    """``(params, batch) -> task.eval_sums`` on one held-out batch."""

    def eval_step(params, batch):
        return task.eval_sums(nnx.merge(graphdef, params), batch)

    return eval_step


class Setup(NamedTuple):
    """A run ready to train: built once, shared by training, plots, samples and the
    throughput measurement."""

    cfg: Config
    task: Any
    task_info: dict
    mesh: Mesh
    graphdef: Any
    state: TrainState
    tx: Any
    schedule: Any
    local_task: Any = None  # the task as this process built it (for per-process batches)


def setup(cfg: Config, devices=None) -> Setup:
    """Task, mesh, model and a fresh train state for ``cfg``, created sharded: the
    model is built abstractly (``nnx.eval_shape``) to read its parameters' logical
    axis names, then for real under ``jit`` with the state's shardings as
    ``out_shardings``, so no device ever holds more than its shards.  ``devices``:
    as `make_mesh`."""
    task, task_info = tasks.build(cfg.data)
    mesh = make_mesh(cfg, devices)
    dtype, key = compute_dtype(cfg), keys(cfg)["params"]
    tx, schedule = make_optimizer(cfg)

    def build():
        return task.build_model(model_config(cfg, mesh), dtype=dtype, rngs=nnx.Rngs(params=key))

    graphdef, abstract = nnx.split(nnx.eval_shape(build), nnx.Param)
    replicated = NamedSharding(mesh, P())

    def init() -> TrainState:
        params = nnx.to_pure_dict(nnx.split(build(), nnx.Param)[1])
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    state = jax.jit(init, out_shardings=state_shardings(abstract, tx, mesh))()
    placed = jax.tree.map(lambda x: global_array(x, replicated), task)
    return Setup(cfg, placed, task_info, mesh, graphdef, state, tx, schedule, task)


def eval_batches(s: Setup) -> tuple[list, dict]:
    """The held-out set (generated once from ``keys["eval_data"]``, in every process
    alike) split into eval batches sharded like training batches, and the task's
    reference metrics on it."""
    cfg = s.cfg
    eval_set = jax.device_get(jax.jit(lambda t: t.eval_set(keys(cfg)["eval_data"], cfg.eval.examples))(s.local_task))
    reference = s.local_task.reference_metrics(eval_set)
    size = cfg.eval.batch_size
    batches = []
    for i in range(cfg.eval.examples // size):
        part = jax.tree.map(lambda x: x[i * size:(i + 1) * size], eval_set)
        batches.append(jax.tree.map(lambda x: global_array(x, batch_sharding(s.mesh, x.shape)), part))
    return batches, reference


def held_out_example(s: Setup):
    """The first held-out example as a batch of one (for plots)."""
    return jax.jit(lambda t: t.eval_set(keys(s.cfg)["eval_data"], 1))(s.local_task)


# ------------------------------------------------------------------- folders, restore


def _serial_cpu_saves() -> None:
    """On CPU devices, orbax's replica-parallel saving (each replica of a replicated
    array writes a slice of it) costs a compiled slice per array and device -- about 4 s
    of compiling for the tiny models here on 8 devices -- and gains nothing when the
    devices share the host's memory: save each array from one replica instead.  (What
    is written is the same; orbax already does this on GPUs.)"""
    global _SERIAL_CPU_SAVES
    if jax.default_backend() == "cpu" and not _SERIAL_CPU_SAVES:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
        _SERIAL_CPU_SAVES = True


_SERIAL_CPU_SAVES = False


def checkpoint_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    _serial_cpu_saves()
    # Synchronous saves: the next step donates the state's buffers, so a background
    # writer must not still be reading them.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def abstract_state(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_params(run: pathlib.Path, step: int | None = None):
    """``(cfg, setup, params, step)`` of a run folder's latest (or given) checkpoint."""
    run = pathlib.Path(run)
    one_device = [f"mesh.{a}=1" for a in MESH_AXES]
    cfg = config_lib.load(run / "config.yaml", [f"runs_dir={run.parent}", f"name={run.name}", *one_device])
    s = setup(cfg, jax.local_devices()[:1])
    with checkpoint_manager(run / "checkpoints", cfg.checkpoint.keep) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {run / 'checkpoints'}")
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state(s.state)))
    return cfg, s, state.params, step


def restore_model(run: pathlib.Path, step: int | None = None):
    """``(cfg, setup, model, step)``: the run's model with its checkpointed weights."""
    cfg, s, params, step = restore_params(run, step)
    return cfg, s, nnx.merge(s.graphdef, params), step


class MetricsLog:
    """``metrics.jsonl``: appends one JSON object a line; on resume, drops the lines
    written after the checkpoint being resumed from.  ``path=None`` (processes other
    than 0): the rows of this run are kept in memory, nothing is written."""

    def __init__(self, path: pathlib.Path | None, resume_step: int | None):
        self.path, self._rows = path, []
        if path is None:
            return
        if resume_step is None:
            path.write_text("")
        else:
            kept = [line for line in self.rows() if line["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def rows(self) -> list[dict]:
        return list(self._rows) if self.path is None else read_metrics(self.path)

    def write(self, row: dict) -> None:
        if self.path is None:
            self._rows.append(row)
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (a half-written last line, left by a kill
    mid-write, is dropped)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return rows


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "attention.png", "checkpoints")


def clear_run_folder(out: pathlib.Path) -> None:
    """Delete what an earlier run wrote into ``out``; refuse a folder that is not a
    run folder (so ``runs_dir=. name=jattn`` cannot delete the sources)."""
    entries = {p.name for p in out.iterdir()}
    if entries and not {"config.yaml", "metrics.jsonl"} & entries:
        raise ConfigError(
            f"{out} exists and is not a run folder (no config.yaml or metrics.jsonl); "
            "choose another name= or runs_dir="
        )
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
