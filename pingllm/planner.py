"""Plan a run without running it: compile the train step for a target mesh and read its memory.

The step is lowered on abstract inputs (ShapeDtypeStructs carrying their shardings) and compiled
ahead of time; nothing is allocated on any device. Memory comes from XLA's own accounting of the
compiled per-device program (`memory_analysis()`): arguments (state shard + batch shard), outputs,
the part of the outputs that aliases donated arguments, and temporaries (activations, gradients,
optimizer intermediates).

Targets: this process's devices, N fake CPU devices, or a TPU topology (e.g. v5e-256) whose
devices libtpu describes without any TPU attached: the program is then a real TPU executable and
its memory XLA's TPU accounting. The planning process keeps JAX_PLATFORMS=cpu, so it never opens
a TPU runtime (tpu_planning_env).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from pingllm import config as config_lib
from pingllm import model as model_lib
from pingllm import partitioning
from pingllm.checkpoint import format as checkpointing
from pingllm.checkpoint import reshard as reshard_lib
from pingllm.data import pipeline

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
GIB = 2**30


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


# ---- TPU topologies ----


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: how Cloud names it, its HBM and its dense bf16 peak (vendor figures)."""

    generation: str  # v4 | v5e | v5p | v6e
    topology_prefix: str  # libtpu's topology-name prefix
    accelerator_prefix: str  # Cloud accelerator type prefix (TPU_ACCELERATOR_TYPE)
    cores_per_chip: int  # v4/v5p names count TensorCores (2 per chip), v5e/v6e chips
    dims: int  # torus dimensions
    hbm_bytes: int
    peak_flops: float
    chip_config: str = "default"


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "v4", "v4", 2, 3, 32 * GIB, 275e12, "megacore"),
    "v5e": Chip("v5e", "v5e", "v5litepod", 1, 2, 16 * GIB, 197e12),
    "v5p": Chip("v5p", "v5p", "v5p", 2, 3, 95 * GIB, 459e12, "megacore"),
    "v6e": Chip("v6e", "v6e", "v6e", 1, 2, 32 * GIB, 918e12),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice (times num_slices) as libtpu's get_topology_desc takes it."""

    name: str  # as given: v5e-256 or v5e:16x16
    chip: Chip
    shape: tuple[int, ...]  # chips per torus axis
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The Cloud accelerator type of one slice, e.g. v5litepod-256, v4-32."""
        return f"{self.chip.accelerator_prefix}-{self.chips_per_slice * self.chip.cores_per_chip}"

    def desc_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"chip_config_name": self.chip.chip_config,
                                  "num_slices": self.num_slices}
        if self.chip.dims == 2 and self.chips_per_slice == 8:
            kwargs["chips_per_host_bounds"] = (2, 4, 1)  # v5e-8 / v6e-8: one host of 8 chips
        elif self.chip.dims == 2 and self.chips_per_slice < 4:
            kwargs["chips_per_host_bounds"] = (*self.shape, 1)  # v5e-1, v5e-2: a partial host
        return kwargs


class TopologyError(ValueError):
    """A topology name this planner cannot map to a TPU slice."""


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud's slice shapes: double the smallest axis (the last of equals) until it holds all."""
    shape = [1] * dims
    if dims == 3 and chips >= 4:
        shape = [2, 2, 1]
    while math.prod(shape) < chips:
        i = max(j for j in range(dims) if shape[j] == min(shape))
        shape[i] *= 2
    if math.prod(shape) != chips:
        raise TopologyError(f"{chips} chips is not a power-of-two slice")
    return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """v5e-256 (Cloud accelerator type) or v5e:16x16 (chips per torus axis), v4/v5e/v5p/v6e."""
    if num_slices < 1:
        raise TopologyError(f"--num_slices must be >= 1, got {num_slices}")
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)([-:])([0-9x]+)", name.strip().lower())
    if not m:
        raise TopologyError(f"topology {name!r}: expected <generation>-<size> or "
                            f"<generation>:<AxB[xC]>, generation one of {sorted(CHIPS)}")
    gen, sep, size = m.groups()
    chip = CHIPS["v5e" if gen == "v5litepod" else gen]
    if sep == ":":
        shape = tuple(int(x) for x in size.split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise TopologyError(f"topology {name!r}: {chip.generation} slices have {chip.dims} "
                                "torus axes")
        return Topology(name, chip, shape, num_slices)
    if "x" in size or int(size) % chip.cores_per_chip or int(size) < chip.cores_per_chip:
        unit = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
        raise TopologyError(f"topology {name!r}: {chip.generation}-N counts {unit}")
    try:
        shape = _torus_shape(int(size) // chip.cores_per_chip, chip.dims)
    except TopologyError as e:
        raise TopologyError(f"topology {name!r}: {e}; give the shape, e.g. "
                            f"{chip.generation}:{'x'.join(['2'] * chip.dims)}") from None
    return Topology(name, chip, shape, num_slices)


def tpu_planning_env(topology: Topology, base_env: Mapping[str, str]) -> dict[str, str]:
    """The environment a planning process needs on a host without TPUs.

    JAX stays on CPU (no TPU runtime is opened); libtpu, loaded only for its topology
    descriptions and compiler, gets the slice's accelerator type and a worker list (else it
    logs errors about them), skips the metadata-server query and the single-user lockfile.
    """
    env = dict(base_env)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "TPU_ACCELERATOR_TYPE": topology.accelerator_type,
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_WORKER_ID": "0",
        "TPU_SKIP_MDS_QUERY": "1",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
        "PINGLLM_PLAN_TOPOLOGY": f"{topology.name}/{topology.num_slices}",
    })
    return env


def has_tpu_planning_env(topology: Topology, env: Mapping[str, str]) -> bool:
    return env.get("PINGLLM_PLAN_TOPOLOGY") == f"{topology.name}/{topology.num_slices}"


def topology_devices(topology: Topology) -> list:
    """The topology's devices (every host's): compile targets only, nothing runs on them."""
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology.topology_name, "tpu",
                                            **topology.desc_kwargs())
    except Exception as e:  # RuntimeError without libtpu; JaxRuntimeError for a bad shape
        raise TopologyError(f"topology {topology.name!r} ({topology.topology_name}): libtpu "
                            f"cannot describe it: {e}") from e
    return list(desc.devices)


# ---- the plan ----


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
class TpuFit:
    """The plan against one TPU chip: HBM fit and a roofline throughput estimate."""

    topology: str
    topology_name: str
    accelerator_type: str
    num_slices: int
    num_hosts: int
    hbm_bytes: int
    peak_flops_per_chip: float
    fits: bool
    margin_bytes: int | None  # HBM minus the planned peak (negative: short); None: XLA refused
    # Roofline ESTIMATE: the step's analytic FLOPs at 100% of the chips' bf16 peak (an upper
    # bound on speed; real runs reach a fraction of it, their MFU).
    est_step_seconds: float
    est_tokens_per_second: float
    compile_error: str | None = None  # XLA refused the program (e.g. out of HBM)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    num_devices: int
    device_kind: str
    mesh: dict[str, int]
    params: int
    flops_per_token: float
    tokens_per_step: int
    flops_per_step: float
    memory: MemoryPlan | None
    compile_seconds: float
    checkpoint: str | None = None
    checkpoint_problems: tuple[str, ...] = ()
    measured: MeasuredStep | None = None
    tpu: TpuFit | None = None

    @property
    def fits(self) -> bool:
        """Fits the chip's HBM (always True off TPU: there is no budget to compare with)."""
        return self.tpu is None or self.tpu.fits

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if self.memory:
            out["memory"]["peak"] = self.memory.peak
        if self.measured:
            out["measured"]["per_device_peak"] = self.measured.per_device_peak
        out["fits"] = self.fits
        return out


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs/arrays (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(cfg: config_lib.Config, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The global train batch the pipeline yields (pipeline.batch_spec) on the batch sharding."""
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in pipeline.batch_spec(cfg.data).items()}


def checkpoint_problems(step_dir: epath.PathLike, abstract_state: Any) -> list[str]:
    """Why the checkpoint at step_dir cannot restore onto `abstract_state` (empty: it can).

    A full state is compared leaf by leaf; a parameters-only tree (LOAD_PARAMETERS_PATH) is
    compared with `abstract_state.params`. Each target-sharded dimension must divide evenly.
    """
    path = epath.Path(step_dir)
    state_dir = path / checkpointing.STATE_ITEM
    items = state_dir if state_dir.is_dir() else path
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


def _memory_plan(compiled: Any, abstract_state: Any, batch: Any) -> MemoryPlan:
    stats = compiled.memory_analysis()
    return MemoryPlan(
        params=per_device_bytes(abstract_state.params),
        opt_state=per_device_bytes(abstract_state.opt_state),
        batch=per_device_bytes(batch),
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        generated_code=int(stats.generated_code_size_in_bytes),
    )


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _tpu_fit(topology: Topology, devices: Sequence, memory: MemoryPlan | None,
             flops_per_step: float, tokens_per_step: int,
             compile_error: str | None = None) -> TpuFit:
    chip = topology.chip
    step_s = flops_per_step / (len(devices) * chip.peak_flops)
    margin = chip.hbm_bytes - memory.peak if memory else None
    return TpuFit(
        topology=topology.name, topology_name=topology.topology_name,
        accelerator_type=topology.accelerator_type, num_slices=topology.num_slices,
        num_hosts=len({d.process_index for d in devices}), hbm_bytes=chip.hbm_bytes,
        peak_flops_per_chip=chip.peak_flops, fits=margin is not None and margin >= 0,
        margin_bytes=margin, est_step_seconds=step_s,
        est_tokens_per_second=tokens_per_step / step_s, compile_error=compile_error)


def plan(cfg: config_lib.Config, *, checkpoint: str | None = None, measure: bool = False,
         topology: Topology | None = None) -> RunPlan:
    """Compiles the train step of `cfg` for this process's devices (or `topology`'s) and reports
    its needs.

    `measure=True` also runs that compiled step once on these (CPU) devices: `measure_step`.
    With a TPU `topology` the step is compiled by libtpu for that slice's devices; a program XLA
    refuses for lack of HBM is reported as not fitting (memory None).
    """
    from pingllm import trainer  # the step exactly as the trainer builds it

    if topology is not None and measure:
        raise ValueError("--measure runs the step on this host's devices: not with a TPU topology")
    devices = topology_devices(topology) if topology is not None else jax.devices()
    with partitioning.target_devices(devices):
        setup = trainer.build(cfg)
    leaves, _ = jax.tree_util.tree_flatten_with_path(setup.abstract_state)
    uneven = [x for p, leaf in leaves
              for x in reshard_lib.indivisible(reshard_lib.leaf_name(p), leaf.shape, leaf.sharding)]
    if uneven:
        raise ValueError(f"the mesh {dict(setup.mesh.shape)} does not divide these arrays:\n  "
                         + "\n  ".join(uneven))
    batch_sharding = partitioning.batch_sharding(setup.mesh, setup.rules)
    rows = batch_sharding.shard_shape((cfg.data.global_batch_size * len(devices),))[0]
    shards = cfg.data.global_batch_size * len(devices) // rows  # row blocks of the batch
    if cfg.data.global_batch_size % shards:
        raise ValueError(f"the global batch of {cfg.data.global_batch_size} rows does not split "
                         f"over the mesh's {shards} batch shards {dict(setup.mesh.shape)}: set "
                         f"GLOBAL_BATCH_SIZE to a multiple of {shards}")
    batch = abstract_batch(cfg, batch_sharding)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=partitioning.replicated(setup.mesh))
    tokens = cfg.data.global_batch_size * cfg.model.max_target_length
    per_token = model_lib.flops_per_token(cfg.model)
    t = time.perf_counter()
    compile_error = None
    try:
        compiled = setup.train_step.lower(setup.abstract_state, batch, key).compile()
        memory = _memory_plan(compiled, setup.abstract_state, batch)
    except Exception as e:  # XLA's TPU compiler refuses programs larger than HBM
        if topology is None or not _out_of_memory(e):
            raise
        compiled, memory, compile_error = None, None, str(e).strip().splitlines()[0][:2000]
    compile_s = time.perf_counter() - t
    problems: tuple[str, ...] = ()
    if checkpoint:
        problems = tuple(checkpoint_problems(checkpoint, setup.abstract_state))
    measured = measure_step(cfg, setup, compiled, batch) if measure else None
    tpu = None
    if topology is not None:
        tpu = _tpu_fit(topology, devices, memory, per_token * tokens, tokens, compile_error)
    return RunPlan(
        num_devices=len(devices), device_kind=devices[0].device_kind,
        mesh={k: int(v) for k, v in setup.mesh.shape.items()},
        params=model_lib.param_count(cfg.model), flops_per_token=per_token,
        tokens_per_step=tokens, flops_per_step=per_token * tokens, memory=memory,
        compile_seconds=compile_s, checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_problems=problems, measured=measured, tpu=tpu)


def format_plan(p: RunPlan) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    gib = lambda b: f"{b / GIB:,.2f} GiB"
    m = p.memory
    lines = [
        f"devices: {p.num_devices} x {p.device_kind}, mesh {p.mesh}",
        f"parameters: {p.params:,} ({p.params / 1e6:.1f}M)",
        f"FLOPs per token: {p.flops_per_token:.4g}; tokens per step: {p.tokens_per_step:,}; "
        f"FLOPs per step: {p.flops_per_step:.4g}",
    ]
    if p.tpu:
        t = p.tpu
        lines.insert(0, f"topology: {t.topology} = {t.topology_name} x {t.num_slices} slice(s) "
                        f"({t.accelerator_type}), {t.num_hosts} hosts; compiled by libtpu")
    if m:
        lines += [
            "per-device memory (XLA memory_analysis of the compiled step):",
            f"  parameters        {mib(m.params):>14}",
            f"  optimizer state   {mib(m.opt_state):>14}",
            f"  batch             {mib(m.batch):>14}",
            f"  arguments         {mib(m.arguments):>14}  (state + batch + key)",
            f"  outputs           {mib(m.outputs):>14}  ({mib(m.aliased)} aliased to donated "
            "inputs)",
            f"  temporaries       {mib(m.temp):>14}  (activations, gradients, intermediates)",
            f"  peak              {mib(m.peak):>14}  (arguments + new outputs + temporaries)",
        ]
    if p.tpu:
        t = p.tpu
        if m:
            verdict = "FITS" if t.fits else "DOES NOT FIT"
            lines.append(f"HBM per chip {gib(t.hbm_bytes)}: {verdict}, peak {gib(m.peak)} = "
                         f"{m.peak / t.hbm_bytes:.0%} of HBM, margin {gib(t.margin_bytes)}")
        else:
            lines.append(f"HBM per chip {gib(t.hbm_bytes)}: DOES NOT FIT (XLA refused the "
                         f"program: {t.compile_error})")
        tflops = t.peak_flops_per_chip / 1e12
        lines.append(f"ESTIMATE (roofline: analytic FLOPs at 100% of {tflops:g} TFLOP/s bf16 per "
                     f"chip; an upper bound): {t.est_step_seconds * 1e3:,.2f} ms per step, "
                     f"{t.est_tokens_per_second:,.0f} tokens/s")
    lines.append(f"compiled in {p.compile_seconds:.1f}s")
    if p.measured and m:
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
    host = {k: (rng.integers(1, cfg.model.vocab_size, v.shape, dtype=np.int32)
                if v.dtype == np.int32 else np.ones(v.shape, v.dtype)) for k, v in abstract.items()}
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
