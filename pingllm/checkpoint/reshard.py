"""Rewrite a checkpoint for another mesh, process layout, dtype or content, leaf group by group.

Only a bounded group of leaves is ever in memory: the output is one ordinary Orbax save whose
leaves are `_Deferred` placeholders; their type handler loads each group from the input (an
Orbax partial restore onto the target shardings, casting the dtype), hands it to Orbax's own
`ArrayHandler.serialize`, waits for the write and drops it before the next group. So the result
is the same layout the trainer writes (`items/` OCDBT, `_sharding` of the target mesh,
`array_metadatas/`, `_METADATA`, `_CHECKPOINT_METADATA`, checksums), and peak memory is about
twice the largest group (the array plus Orbax's host copy) instead of the whole state.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint._src.metadata import array_metadata_store  # no public path in 0.12.8

from pingllm.checkpoint import format as fmt

Content = Literal["full", "params", "no_iter"]
CONTENTS: tuple[str, ...] = ("full", "params", "no_iter")
PARAMS_PREFIX = "params."


class ReshardError(ValueError):
    """The input cannot be rewritten as asked (not a checkpoint, bad mesh, existing output)."""


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One array of the output: where it comes from and what it becomes."""

    name: str  # output name: 'params.layers.mlp.wo.kernel' ('layers.mlp.wo.kernel' params-only)
    source_name: str
    shape: tuple[int, ...]
    source_dtype: np.dtype
    dtype: np.dtype
    sharding: NamedSharding

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class ReshardResult:
    step_dir: epath.Path
    leaves: int
    array_bytes: int  # sum of the output arrays' bytes
    files_bytes: int  # bytes on disk (checksummed files)
    groups: int
    largest_group_bytes: int
    seconds: float
    verify_seconds: float


# ----------------------------------------------------------------------------------------------
# Names, shapes and target shardings.


def leaf_name(path: Sequence[Any]) -> str:
    """Orbax's parameter name of a key path ('opt_state.1.0.mu.token_embedding')."""
    return fmt.path_str(path)


def items_dir_of(step_dir: epath.Path) -> epath.Path:
    return step_dir / fmt.STATE_ITEM


def stored_leaves(items_dir: epath.Path) -> dict[str, Any]:
    """{name: ArrayMetadata} of a state item; raises ReshardError if it is not one."""
    if not (items_dir / "_METADATA").exists():
        raise ReshardError(f"{items_dir}: not an Orbax state item (no _METADATA)")
    try:
        tree = fmt.stored_tree_metadata(items_dir)
    except Exception as e:  # Orbax raises several types for unreadable metadata
        raise ReshardError(f"{items_dir}: unreadable checkpoint metadata ({e})") from e
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {leaf_name(p): leaf for p, leaf in leaves}


def saved_partition_spec(meta: Any) -> PartitionSpec:
    """The PartitionSpec the writer used (replicated when the checkpoint has no _sharding)."""
    sharding = getattr(meta, "sharding", None)
    spec = getattr(sharding, "partition_spec", None)
    if spec is None:
        return PartitionSpec()
    return PartitionSpec(*[tuple(s) if isinstance(s, list) else s for s in spec])


def spec_axes(entry: Any) -> tuple[str, ...]:
    """Mesh axes of one PartitionSpec entry ('fsdp' or ('data', 'fsdp'))."""
    return entry if isinstance(entry, tuple) else (entry,)


def indivisible(name: str, shape: Sequence[int], sharding: NamedSharding) -> list[str]:
    """Why `sharding` cannot hold an array of `shape` evenly (empty when it can)."""
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        return [f"{name}: partition spec {spec} has more entries than the {len(shape)} dims"]
    problems = []
    for dim, entry in enumerate(spec):
        if entry is None:
            continue
        axes = spec_axes(entry)
        n = math.prod(sharding.mesh.shape[a] for a in axes)
        if shape[dim] % n:
            problems.append(f"{name}: dim {dim} of size {shape[dim]} is not divisible by mesh "
                            f"axes {'x'.join(axes)} = {n}")
    return problems


def check_divisible(plans: Sequence[LeafPlan]) -> None:
    problems = [p for plan in plans for p in indivisible(plan.name, plan.shape, plan.sharding)]
    if problems:
        raise ReshardError("the target mesh does not divide these arrays:\n  "
                           + "\n  ".join(problems))


def shardings_from_saved_specs(stored: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """Each leaf keeps the writer's PartitionSpec, laid onto `mesh` (whose axis names it uses)."""
    out = {}
    for name, meta in stored.items():
        spec = saved_partition_spec(meta)
        unknown = [a for e in spec if e is not None for a in spec_axes(e) if a not in mesh.shape]
        if unknown:
            raise ReshardError(f"{name}: saved partition spec {spec} names mesh axes {unknown} "
                               f"that the target mesh {dict(mesh.shape)} lacks")
        out[name] = NamedSharding(mesh, spec)
    return out


def plan_leaves(
    stored: Mapping[str, Any],
    shardings: Mapping[str, NamedSharding],
    *,
    content: Content = "full",
    param_dtype: str | None = None,
    target_dtypes: Mapping[str, Any] | None = None,
) -> list[LeafPlan]:
    """The output arrays: which leaves (content), their dtype and their target sharding.

    `target_dtypes` (e.g. from a config's abstract state) sets each leaf's dtype; `param_dtype`
    then overrides the dtype of floating-point parameters.
    """
    if content not in CONTENTS:
        raise ReshardError(f"content must be one of {CONTENTS}, got {content!r}")
    plans = []
    for name, meta in stored.items():
        is_param = name.startswith(PARAMS_PREFIX)
        if content == "params" and not is_param:
            continue
        if name not in shardings:
            raise ReshardError(f"{name}: no target sharding for this leaf")
        src = np.dtype(meta.dtype)
        dtype = np.dtype(target_dtypes[name]) if target_dtypes and name in target_dtypes else src
        if param_dtype and is_param and jax.numpy.issubdtype(src, jax.numpy.floating):
            dtype = np.dtype(jax.numpy.dtype(param_dtype))
        out_name = name[len(PARAMS_PREFIX):] if content == "params" else name
        plans.append(LeafPlan(out_name, name, tuple(meta.shape), src, dtype, shardings[name]))
    if not plans:
        raise ReshardError("nothing to write: the checkpoint has no leaves for content "
                           f"{content!r}")
    check_divisible(plans)
    return plans


def groups(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Consecutive index groups whose sizes sum to at most max_bytes (a larger item goes alone)."""
    out: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if current and total + size > max_bytes:
            out.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        out.append(current)
    return out


# ----------------------------------------------------------------------------------------------
# Reading a group of leaves from a checkpoint onto target shardings.


def read_group(items_dir: epath.Path, structure: Any, wanted: Mapping[str, LeafPlan],
               *, by_source: bool) -> dict[str, jax.Array]:
    """{plan name: array} of the `wanted` leaves, restored onto their target sharding and dtype.

    `structure` is the stored tree (ArrayMetadata leaves); every other leaf is an Orbax
    PLACEHOLDER, so nothing else is read.
    """
    key = (lambda p: p.source_name) if by_source else (lambda p: p.name)
    by_name = {key(p): p for p in wanted.values()}

    def item_leaf(path, meta):
        plan = by_name.get(leaf_name(path))
        if plan is None:
            return ocp.PLACEHOLDER
        return jax.ShapeDtypeStruct(plan.shape, plan.dtype, sharding=plan.sharding)

    def restore_arg(path, meta):
        plan = by_name.get(leaf_name(path))
        if plan is None:
            return ocp.RestoreArgs()
        return ocp.ArrayRestoreArgs(sharding=plan.sharding, global_shape=plan.shape,
                                    dtype=plan.dtype)

    is_leaf = lambda x: isinstance(x, ocp.metadata.ArrayMetadata)
    item = jax.tree_util.tree_map_with_path(item_leaf, structure, is_leaf=is_leaf)
    args = jax.tree_util.tree_map_with_path(restore_arg, structure, is_leaf=is_leaf)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(items_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
    flat, _ = jax.tree_util.tree_flatten_with_path(out)
    got = {leaf_name(p): v for p, v in flat if isinstance(v, jax.Array)}
    return {by_name[n].name: got[n] for n in by_name}


def shard_digests(arrays: Mapping[str, jax.Array]) -> dict[str, str]:
    """sha256 of each array over (device, index, bytes) of its shards; no host copy is made."""
    out = {}
    for name, x in arrays.items():
        digest = hashlib.sha256(f"{x.shape}{x.dtype}".encode())
        for shard in sorted(x.addressable_shards, key=lambda s: (s.device.id, repr(s.index))):
            data = np.ascontiguousarray(np.asarray(shard.data))
            digest.update(f"{shard.device.id}{shard.index}".encode())
            digest.update(memoryview(data.view(np.uint8).reshape(-1)))
        out[name] = digest.hexdigest()
    return out


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# Writing: one Orbax save whose leaves materialise group by group.


class _Deferred:
    """An output leaf that exists only while its group is being written."""

    def __init__(self, plan: LeafPlan):
        self.plan = plan


class _StreamingArrayHandler(ocp.type_handlers.ArrayHandler):
    """Loads `_Deferred` leaves in bounded groups and serializes them as ordinary jax.Arrays."""

    def __init__(self, load: Callable[[list[LeafPlan]], dict[str, jax.Array]], max_bytes: int):
        super().__init__(array_metadata_store=array_metadata_store.Store())
        self._load = load
        self._max_bytes = max_bytes
        self.group_sizes: list[int] = []

    async def serialize(self, values, infos, args=None):
        args = list(args or [ocp.SaveArgs()] * len(values))
        plans = [v.plan for v in values]
        for idx in groups([p.nbytes for p in plans], self._max_bytes):
            group = [plans[i] for i in idx]
            # The load runs Orbax's own (synchronous) restore: off this event loop's thread.
            arrays = await asyncio.to_thread(self._load, group)
            values_g = [arrays[p.name] for p in group]
            futures = await super().serialize(values_g, [infos[i] for i in idx],
                                              [args[i] for i in idx])
            # serialize() has copied the group to host buffers: drop the device arrays before
            # the write, so at most two copies of a group are alive at any moment.
            del arrays, values_g
            await asyncio.to_thread(lambda fs=futures: [f.result() for f in fs])
            del futures
            _release_memory()
            self.group_sizes.append(sum(p.nbytes for p in group))
        return []


class _FilesHandler(ocp.CheckpointHandler):
    """Writes given files verbatim (the iterator item copied from the input)."""

    def save(self, directory: epath.Path, args: FilesSave):
        for name, text in args.files.items():
            (epath.Path(directory) / name).write_text(text)

    def restore(self, directory: epath.Path, args: Any = None) -> None:
        raise NotImplementedError("read iterator files with manager.IteratorHandler")

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(_FilesHandler, for_save=True)
@dataclasses.dataclass
class FilesSave(ocp.args.CheckpointArgs):
    files: dict[str, str]


def output_step_dir(output: epath.Path, step: int) -> epath.Path:
    """`output` when it is a step directory (numeric name), else `<run>/checkpoints/<step>`."""
    if output.name.isdigit():
        return output
    return output / "checkpoints" / str(step)


def _nest(plans: Sequence[LeafPlan], structure: Any, content: Content) -> Any:
    """The output tree: the stored structure (or its params subtree) with `_Deferred` leaves."""
    by_source = {p.source_name: p for p in plans}
    is_leaf = lambda x: isinstance(x, ocp.metadata.ArrayMetadata)
    prefix = ("params",) if content == "params" else ()
    tree = structure["params"] if content == "params" else structure
    return jax.tree_util.tree_map_with_path(
        lambda path, m: _Deferred(by_source[leaf_name(prefix + tuple(path))]), tree,
        is_leaf=is_leaf)


def iterator_files(step_dir: epath.Path) -> dict[str, str]:
    """The input's iterator states {file name: text} (one per writing process)."""
    iter_dir = step_dir / fmt.ITER_ITEM
    if not iter_dir.is_dir():
        return {}
    return {p.name: p.read_text() for p in sorted(iter_dir.iterdir())
            if p.name.startswith("process_") and p.name.endswith(".json")}


def return_large_allocations_to_os(threshold: int = 1 << 20) -> None:
    """Makes glibc serve allocations >= threshold with mmap, so a freed group leaves RSS at once.

    By default glibc raises its mmap threshold after the first large free (up to 32 MiB), after
    which shard buffers come from per-thread arenas that are never trimmed: RSS then grows with
    every group although each group is freed (measured: +40 MiB per 51 MiB array).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, threshold)


def reshard(
    input_step: epath.PathLike,
    output: epath.PathLike,
    plans: Sequence[LeafPlan],
    *,
    content: Content = "full",
    max_buffer_bytes: int = 256 << 20,
    verify: bool = True,
) -> ReshardResult:
    """Writes `plans` of the checkpoint at `input_step` as a new step; returns what it wrote.

    Refuses an existing output step. `content='params'` writes the parameter tree alone (what
    LOAD_PARAMETERS_PATH accepts); 'no_iter' keeps an empty `iter/` item so the trainer can still
    resume it (it then derives the data position from the step); 'full' copies the iterator files.
    """
    t0 = time.perf_counter()
    return_large_allocations_to_os()
    src = fmt.as_path(input_step)  # Orbax's OCDBT paths must be absolute
    problems = fmt.verify_step(src)
    if problems:
        raise ReshardError(f"input {src} is not a complete checkpoint: {problems[0]}")
    step = int(src.name)
    dst = output_step_dir(fmt.as_path(output), step)
    if dst.exists() or list(dst.parent.glob(f"{dst.name}.orbax-checkpoint-tmp*")):
        raise ReshardError(f"output {dst} already exists: refusing to overwrite it")
    src_items = items_dir_of(src)
    structure = fmt.stored_tree_metadata(src_items)
    plans = list(plans)

    def load(group: list[LeafPlan]) -> dict[str, jax.Array]:
        return read_group(src_items, structure, {p.name: p for p in group}, by_source=True)

    handler = _StreamingArrayHandler(load, max_buffer_bytes)
    registry = ocp.type_handlers.create_type_handler_registry(
        (_Deferred, handler),
        (jax.Array, ocp.type_handlers.ArrayHandler(
            array_metadata_store=array_metadata_store.Store())),
    )
    state_handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_compression=False,
                                                type_handler_registry=registry)
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    handlers.add(fmt.STATE_ITEM, ocp.args.PyTreeSave, state_handler)
    items = {fmt.STATE_ITEM: ocp.args.PyTreeSave(_nest(plans, structure, content))}
    if content != "params":
        handlers.add(fmt.ITER_ITEM, FilesSave, _FilesHandler())
        files = iterator_files(src) if content == "full" else {}
        items[fmt.ITER_ITEM] = FilesSave(files)

    def before_commit() -> None:
        tmp = sorted(dst.parent.glob(f"{dst.name}.orbax-checkpoint-tmp*"))
        fmt.write_checksums(tmp[0] if tmp else dst, {
            "step": step, "tier": "reshard", "source": str(src), "content": content})

    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=before_commit))
    with ocp.CheckpointManager(dst.parent, options=options, handler_registry=handlers) as mngr:
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()
    seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    if verify:
        verify_written(dst, src, plans, max_buffer_bytes)
    sums = fmt.read_checksums(dst) or {"files": {}}
    return ReshardResult(
        step_dir=dst, leaves=len(plans), array_bytes=sum(p.nbytes for p in plans),
        files_bytes=sum(v["size"] for v in sums["files"].values()),
        groups=len(handler.group_sizes), largest_group_bytes=max(handler.group_sizes, default=0),
        seconds=seconds, verify_seconds=time.perf_counter() - t1)


def verify_written(step_dir: epath.Path, source_step: epath.Path, plans: Sequence[LeafPlan],
                   max_buffer_bytes: int) -> None:
    """Checksums of every file, then each array re-read (in groups) equals the source's, bitwise.

    The source is read onto the same target sharding and dtype, so a cast is compared with the
    same cast.
    """
    problems = fmt.verify_step(step_dir)
    if problems:
        raise ReshardError(f"written checkpoint {step_dir} fails verification: {problems[0]}")
    items = items_dir_of(step_dir)
    stored = stored_leaves(items)
    missing = sorted({p.name for p in plans} - set(stored))
    if missing:
        raise ReshardError(f"written checkpoint {step_dir} lacks leaves {missing}")
    structure = fmt.stored_tree_metadata(items)
    src_items = items_dir_of(source_step)
    src_structure = fmt.stored_tree_metadata(src_items)
    for idx in groups([p.nbytes for p in plans], max_buffer_bytes):
        group = {plans[i].name: plans[i] for i in idx}
        for name, plan in group.items():
            if np.dtype(stored[name].dtype) != plan.dtype:
                raise ReshardError(f"{name}: written dtype {stored[name].dtype} != {plan.dtype}")
        # One group in memory at a time: hash the source's, then the written copy's.
        want = shard_digests(read_group(src_items, src_structure, group, by_source=True))
        _release_memory()
        got = shard_digests(read_group(items, structure, group, by_source=False))
        for name in group:
            if got[name] != want[name]:
                raise ReshardError(f"{name}: re-read values differ from the source's")
        _release_memory()
