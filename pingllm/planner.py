"""Plan a run without running it: compile the train step for a target mesh and read its memory.

The step is lowered on abstract inputs (ShapeDtypeStructs carrying their shardings) and compiled
ahead of time; nothing is allocated on any device. Memory comes from XLA's own accounting of the
compiled per-device program (`memory_analysis()`): arguments (state shard + batch shard), outputs,
the part of the outputs that aliases donated arguments, and temporaries (activations, gradients,
optimizer intermediates).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from pingllm import config as config_lib
from pingllm import model as model_lib
from pingllm import partitioning
from pingllm.checkpoint import format as checkpointing
from pingllm.checkpoint import reshard as reshard_lib

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def fake_cpu_device_env(num_devices: int, base_env: Mapping[str, str]) -> dict[str, str]:
    """`base_env` with CPU-only JAX and exactly `num_devices` host devices."""
    env = dict(base_env)
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def has_fake_cpu_devices(num_devices: int, env: Mapping[str, str]) -> bool:
    return (env.get("JAX_PLATFORMS") == "cpu"
            and f"{DEVICE_COUNT_FLAG}={num_devices}" in env.get("XLA_FLAGS", "").split())


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes on one device."""

    params: int
    opt_state: int
    batch: int
    arguments: int  # XLA: state shard + batch shard + dropout key
    outputs: int
    aliased: int  # outputs written into donated argument buffers
    temp: int  # activations kept for the backward pass, gradients, intermediates
    generated_code: int

    @property
    def peak(self) -> int:
        """Live at once while the step runs: inputs, new outputs, temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temp


@dataclasses.dataclass(frozen=True)
class MeasuredStep:
    """Process memory around one real train step (Linux RSS, all devices of this process)."""

    num_devices: int
    baseline_rss: int  # after compiling, before the state exists
    state_rss: int  # state + batch placed on the devices
    peak_rss: int  # high-water mark while the step ran (VmHWM, reset just before it)

    @property
    def per_device_peak(self) -> int:
        return (self.peak_rss - self.baseline_rss) // self.num_devices

    @property
    def per_device_inputs(self) -> int:
        return (self.state_rss - self.baseline_rss) // self.num_devices


@dataclasses.dataclass(frozen=True)
class RunPlan:
    num_devices: int
    device_kind: str
    mesh: dict[str, int]
    params: int
    flops_per_token: float
    tokens_per_step: int
    flops_per_step: float
    memory: MemoryPlan
    compile_seconds: float
    checkpoint: str | None = None
    checkpoint_problems: tuple[str, ...] = ()
    measured: MeasuredStep | None = None

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["memory"]["peak"] = self.memory.peak
        if self.measured:
            out["measured"]["per_device_peak"] = self.measured.per_device_peak
        return out


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs/arrays (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(cfg: config_lib.Config, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of docs/CONTRACTS.md as ShapeDtypeStructs on the batch sharding."""
    shape = (cfg.data.global_batch_size, cfg.model.max_target_length)
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32,
              "segment_ids": jnp.int32, "fields": jnp.int32}
    return {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding) for k, d in dtypes.items()}


def checkpoint_problems(step_dir: epath.PathLike, abstract_state: Any) -> list[str]:
    """Why the checkpoint at step_dir cannot restore onto `abstract_state` (empty: it can).

    A full state is compared leaf by leaf; a parameters-only tree (LOAD_PARAMETERS_PATH) is
    compared with `abstract_state.params`. Each target-sharded dimension must divide evenly.
    """
    path = epath.Path(step_dir)
    items = path / checkpointing.STATE_ITEM if (path / checkpointing.STATE_ITEM).is_dir() else path
    stored = checkpointing.stored_tree_metadata(items)
    target = abstract_state
    if not (isinstance(stored, dict) and "opt_state" in stored):
        target = abstract_state.params
        if isinstance(stored, dict) and "params" in stored:
            stored, target = {"params": stored["params"]}, {"params": abstract_state.params}
    problems = []
    try:
        checkpointing.check_compatible(stored, target, where=str(items))
    except checkpointing.RestoreMismatchError as e:
        problems += [line.strip() for line in str(e).splitlines()[1:]]
    leaves, _ = jax.tree_util.tree_flatten_with_path(target)
    for p, leaf in leaves:
        problems += reshard_lib.indivisible(reshard_lib.leaf_name(p), leaf.shape, leaf.sharding)
    return problems


def plan(cfg: config_lib.Config, *, checkpoint: str | None = None,
         measure: bool = False) -> RunPlan:
    """Compiles the train step of `cfg` for this process's devices and reports its needs.

    `measure=True` also runs that compiled step once on these (CPU) devices: `measure_step`.
    """
    from pingllm import trainer  # the step exactly as the trainer builds it

    devices = jax.devices()
    setup = trainer.build(cfg)
    leaves, _ = jax.tree_util.tree_flatten_with_path(setup.abstract_state)
    uneven = [x for p, leaf in leaves
              for x in reshard_lib.indivisible(reshard_lib.leaf_name(p), leaf.shape, leaf.sharding)]
    if uneven:
        raise ValueError(f"the mesh {dict(setup.mesh.shape)} does not divide these arrays:\n  "
                         + "\n  ".join(uneven))
    batch = abstract_batch(cfg, partitioning.batch_sharding(setup.mesh, setup.rules))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=partitioning.replicated(setup.mesh))
    t = time.perf_counter()
    compiled = setup.train_step.lower(setup.abstract_state, batch, key).compile()
    compile_s = time.perf_counter() - t
    stats = compiled.memory_analysis()
    memory = MemoryPlan(
        params=per_device_bytes(setup.abstract_state.params),
        opt_state=per_device_bytes(setup.abstract_state.opt_state),
        batch=per_device_bytes(batch),
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        generated_code=int(stats.generated_code_size_in_bytes),
    )
    tokens = cfg.data.global_batch_size * cfg.model.max_target_length
    per_token = model_lib.flops_per_token(cfg.model)
    problems: tuple[str, ...] = ()
    if checkpoint:
        problems = tuple(checkpoint_problems(checkpoint, setup.abstract_state))
    measured = measure_step(cfg, setup, compiled, batch) if measure else None
    return RunPlan(
        num_devices=len(devices), device_kind=devices[0].device_kind,
        mesh={k: int(v) for k, v in setup.mesh.shape.items()},
        params=model_lib.param_count(cfg.model), flops_per_token=per_token,
        tokens_per_step=tokens, flops_per_step=per_token * tokens, memory=memory,
        compile_seconds=compile_s, checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_problems=problems, measured=measured)


def format_plan(p: RunPlan) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    m = p.memory
    lines = [
        f"devices: {p.num_devices} x {p.device_kind}, mesh {p.mesh}",
        f"parameters: {p.params:,} ({p.params / 1e6:.1f}M)",
        f"FLOPs per token: {p.flops_per_token:.4g}; tokens per step: {p.tokens_per_step:,}; "
        f"FLOPs per step: {p.flops_per_step:.4g}",
        "per-device memory (XLA memory_analysis of the compiled step):",
        f"  parameters        {mib(m.params):>14}",
        f"  optimizer state   {mib(m.opt_state):>14}",
        f"  batch             {mib(m.batch):>14}",
        f"  arguments         {mib(m.arguments):>14}  (state + batch + key)",
        f"  outputs           {mib(m.outputs):>14}  ({mib(m.aliased)} aliased to donated inputs)",
        f"  temporaries       {mib(m.temp):>14}  (activations, gradients, intermediates)",
        f"  peak              {mib(m.peak):>14}  (arguments + new outputs + temporaries)",
        f"compiled in {p.compile_seconds:.1f}s",
    ]
    if p.measured:
        ms = p.measured
        lines.append(f"measured one real step on these {ms.num_devices} CPU devices (RSS): peak "
                     f"{mib(ms.per_device_peak)} per device = {ms.per_device_peak / m.peak:.3f} "
                     "x the planned peak")
    if p.checkpoint:
        if p.checkpoint_problems:
            lines.append(f"checkpoint {p.checkpoint}: CANNOT restore onto this mesh:")
            lines += [f"  {x}" for x in p.checkpoint_problems]
        else:
            lines.append(f"checkpoint {p.checkpoint}: restores onto this mesh "
                         "(shapes, dtypes and divisibility checked)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Checking the plan against a real step on this host's (CPU) devices.


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _release_free_memory() -> None:
    """Hands freed heap pages back to the OS so RSS measures live buffers only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_step(cfg: config_lib.Config, setup: Any, compiled: Any,
                 abstract: dict[str, jax.ShapeDtypeStruct]) -> MeasuredStep:
    """Runs the compiled train step once on this process's CPU devices; measures its memory.

    CPU devices share the process's memory and report no `memory_stats()`, so RSS is the honest
    meter: the baseline is taken after compiling, before the state exists; the peak is VmHWM,
    reset (via /proc/self/clear_refs) just before the step; the difference is split evenly over
    the devices. Only meaningful on CPU devices, on Linux.
    """
    from pingllm import train_state as state_lib

    batch_sharding = partitioning.batch_sharding(setup.mesh, setup.rules)
    key_sharding = partitioning.replicated(setup.mesh)
    _release_free_memory()
    baseline = _proc_status_kib("VmRSS") * 1024
    state = state_lib.init_train_state(cfg.model, setup.optimizer, setup.mesh, setup.rules,
                                       seed=cfg.run.seed, ema=cfg.optimizer.ema_decay > 0)
    rng = np.random.default_rng(0)
    shape = (cfg.data.global_batch_size, cfg.model.max_target_length)
    host = {k: (rng.integers(1, cfg.model.vocab_size, shape, dtype=np.int32) if v.dtype == jnp.int32
                else np.ones(shape, np.float32)) for k, v in abstract.items()}
    batch = {k: jax.device_put(v, batch_sharding) for k, v in host.items()}
    dropout_key = jax.device_put(jax.random.key(cfg.run.seed + 1), key_sharding)
    jax.block_until_ready((state, batch, dropout_key))
    del host
    _release_free_memory()
    with_state = _proc_status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    with jax.set_mesh(setup.mesh):
        out = compiled(state, batch, dropout_key)
    jax.block_until_ready(out)
    peak = _proc_status_kib("VmHWM") * 1024
    return MeasuredStep(jax.device_count(), baseline, with_state, peak)
