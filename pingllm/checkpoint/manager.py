"""Checkpoints that never lose work: Orbax save/restore, two tiers, checksums, retention.

Layout of one step (persistent tier, `<run_dir>/checkpoints/<step>/`):
  _CHECKPOINT_METADATA, pingllm_checksums.json, items/ (train state, OCDBT),
  iter/process_<i>-of-<N>.json (data iterator state, one file per process).
The local tier (`<local_checkpoint_directory>/process_<i>/<step>/`) has the same layout but
each process writes only its own shards into its own directory. See docs/checkpoints.md.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as preservation_lib

from pingllm.checkpoint import format as fmt
from pingllm.checkpoint import storage
from pingllm.checkpoint.format import (  # noqa: F401 - part of this module's interface
    CHECKSUM_FILE,
    ITER_ITEM,
    METADATA_FILE,
    STATE_ITEM,
    RestoreMismatchError,
    StepInfo,
    check_compatible,
    list_steps,
    read_checksums,
    stored_tree_metadata,
    verify_step,
    write_checksums,
)

log = logging.getLogger(__name__)

_MAX_LOCAL_STEPS_AGREED = 16


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and where to checkpoint; field names follow MaxText's."""

    enable_checkpointing: bool = True
    checkpoint_period: int = 1000
    async_checkpointing: bool = True
    save_checkpoint_on_completion: bool = True
    # None keeps every step.
    max_num_checkpoints_to_keep: int | None = 3
    # Steps divisible by keep_period are kept forever (None: none).
    keep_period: int | None = None
    enable_emergency_checkpoint: bool = False
    local_checkpoint_directory: str = ""
    local_checkpoint_period: int = 0
    max_num_local_checkpoints_to_keep: int = 2
    # Durable-tier period when the emergency (two-tier) mode is on; 0 means checkpoint_period.
    persistent_checkpoint_period: int = 0
    load_full_state_path: str = ""
    load_parameters_path: str = ""
    verify_checksums: bool = True
    # zstd in OCDBT: float weights barely compress (0.92x) and it made saves ~5x slower on CPU.
    use_compression: bool = False

    def __post_init__(self):
        if self.enable_emergency_checkpoint and not self.local_checkpoint_directory:
            raise ValueError("enable_emergency_checkpoint needs local_checkpoint_directory")
        if self.enable_emergency_checkpoint and self.local_checkpoint_period <= 0:
            raise ValueError("enable_emergency_checkpoint needs local_checkpoint_period > 0")

    @property
    def persistent_period(self) -> int:
        if self.enable_emergency_checkpoint and self.persistent_checkpoint_period > 0:
            return self.persistent_checkpoint_period
        return self.checkpoint_period


@dataclasses.dataclass(frozen=True)
class SaveMetrics:
    """One committed save, for TensorBoard."""

    step: int
    tier: Literal["persistent", "local"]
    blocking_seconds: float  # time maybe_save held the loop (incl. waiting for the previous save)
    write_seconds: float | None  # save start -> all files written (before checksumming)
    bytes_written: int | None  # None on processes that do not see the whole step
    gb_per_second: float | None


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    state: Any | None
    step: int
    iter_restored: bool
    source: Literal["local", "persistent", "load_full_state", "load_parameters"] | None
    timings: dict[str, float]
    params: Any | None = None  # set for load_parameters (state is None then)
    skipped: tuple[tuple[str, str], ...] = ()  # (step path, first problem) of rejected steps


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, I/O error); earlier steps are untouched."""


# ----------------------------------------------------------------------------------------------
# The iterator item: one JSON file per process, the same file names Grain's own handler uses, so
# `grain.checkpoint.CheckpointRestore` can read what we write (for DatasetIterator states).


class IteratorHandler(ocp.CheckpointHandler):
    """Writes `get_state()` of any iterator (dict or bytes) as iter/process_<i>-of-<N>.json."""

    def save(self, directory: epath.Path, args: IteratorSave):
        state = args.item.get_state()
        text = state.decode() if isinstance(state, bytes) else json.dumps(state, indent=4)
        (epath.Path(directory) / _iter_file_name()).write_text(text)

    def restore(self, directory: epath.Path, args: IteratorRestore | None = None) -> str | None:
        """The stored text for this process layout, or None when that file is absent."""
        path = epath.Path(directory) / _iter_file_name()
        return path.read_text() if path.exists() else None

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
    pass


def _iter_file_name() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _set_iterator_state(iterator: Any, text: str) -> None:
    # Grain's DataLoaderIterator speaks bytes, dataset iterators and ours speak dicts.
    if isinstance(iterator.get_state(), bytes):
        iterator.set_state(text.encode())
    else:
        iterator.set_state(json.loads(text))


# ----------------------------------------------------------------------------------------------
# Shard layout of one process, so a local-tier step is only used by the layout that wrote it.


def layout_fingerprint(tree: Any) -> str:
    """Hash of (process count, leaf names, global shapes, this process's device->index map)."""
    parts = [f"processes={jax.process_count()}", f"process={jax.process_index()}"]
    for name, leaf in sorted(fmt.flat_by_name(tree).items()):
        sharding = getattr(leaf, "sharding", None)
        shape = tuple(leaf.shape)
        if sharding is None:
            parts.append(f"{name}:{shape}:unsharded")
            continue
        idx = sharding.addressable_devices_indices_map(shape)
        shards = sorted((d.id, tuple((s.start, s.stop) for s in i)) for d, i in idx.items())
        parts.append(f"{name}:{shape}:{shards}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Agreement across processes (same code with one process).


def _allgather_ints(values: Sequence[int], width: int) -> np.ndarray:
    """[process_count, width] of each process's values padded with -1."""
    row = np.full((width,), -1, np.int64)
    row[: len(values)] = values[:width]
    if jax.process_count() == 1:
        return row[None]
    return np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), width)


def _any_process(flag: bool) -> bool:
    return bool(_allgather_ints([int(flag)], 1).max() > 0)


def _all_processes(flag: bool) -> bool:
    return bool(_allgather_ints([int(flag)], 1).min() > 0)


# ----------------------------------------------------------------------------------------------
# Retention.


@dataclasses.dataclass
class _Retention(preservation_lib.PreservationPolicy):
    """Latest `keep` good steps, plus multiples of `keep_period`, plus pinned (corrupt) steps."""

    keep: int | None
    keep_period: int | None
    pinned: set[int]

    def should_preserve(self, checkpoints, *, context):
        good = [c.step for c in checkpoints if c.step not in self.pinned]
        latest = set(good if self.keep is None else good[max(0, len(good) - self.keep):])
        return [
            c.step in self.pinned
            or c.step in latest
            or bool(self.keep_period and c.step % self.keep_period == 0)
            for c in checkpoints
        ]


# ----------------------------------------------------------------------------------------------
# One tier = one plain Orbax CheckpointManager.


@dataclasses.dataclass
class _Pending:
    step: int
    start: float
    blocking: float = 0.0
    layout: str | None = None
    write_seconds: float | None = None
    bytes_written: int | None = None


def _remove_stale_tmp_directories(directory: epath.Path) -> None:
    """Deletes unfinished saves of an earlier run (local disk) before Orbax starts.

    Instead of Orbax's cleanup_tmp_directories, which could still be deleting a stale
    `<step>.orbax-checkpoint-tmp-*` in the background when a save of the same step started and
    cleared it too: under load the two rmtree calls raced and the save failed with ENOENT.
    On a bucket nothing is removed: an unfinished `<step>/` (no commit_success.txt) cannot be
    told apart from a save still running elsewhere; it is never restored, and kept (moved
    aside by `_Tier._set_aside_unfinished` only when this run saves that step itself).
    """
    if storage.is_remote(directory) or not directory.is_dir():
        return
    for child in directory.iterdir():
        parsed = fmt.parse_step_name(child.name)
        if parsed and parsed[1] and child.is_dir():
            log.warning("removing %s: an unfinished save of an earlier run", child)
            child.rmtree(missing_ok=True)


class _Tier:
    def __init__(self, name: Literal["persistent", "local"], directory: epath.Path, *,
                 keep: int | None, keep_period: int | None, verify_checksums: bool,
                 use_compression: bool):
        self.name = name
        self.directory = fmt.as_path(directory)
        self.verify_checksums = verify_checksums
        self.pinned: set[int] = set()
        self._pending: _Pending | None = None
        self._last_saved: int | None = None
        self._failed = False
        self._metrics: list[SaveMetrics] = []
        self.deferred: dict[int, list] = {}
        handler_kwargs = {}
        extra = {}
        mp = ocp.options.MultiprocessingOptions()
        if name == "local":
            # Every process owns its directory and writes all of its shards (replicas included);
            # no primary host, barriers scoped to this tier.
            mp = ocp.options.MultiprocessingOptions(primary_host=None,
                                                    barrier_sync_key_prefix="pingllm_local")
            array_handler = ocp.type_handlers.ArrayHandler(primary_host=None, replica_id=None,
                                                           use_replica_parallel=False)
            registry = ocp.type_handlers.create_type_handler_registry((jax.Array, array_handler))
            handler_kwargs["type_handler_registry"] = registry
            extra = {"enable_per_process_directory_creation": True, "save_root_metadata": False}
        state_handler = ocp.PyTreeCheckpointHandler(
            use_ocdbt=True, use_compression=use_compression, multiprocessing_options=mp,
            **handler_kwargs)
        options = ocp.CheckpointManagerOptions(
            cleanup_tmp_directories=False,  # _remove_stale_tmp_directories does it, race-free
            enable_async_checkpointing=True,
            preservation_policy=_Retention(keep, keep_period, self.pinned),
            multiprocessing_options=mp,
            async_options=ocp.AsyncOptions(
                post_finalization_callback=self._before_commit,
                # The iterator item is written synchronously by every process into the
                # directory the primary host creates: with asynchronous creation (Orbax's
                # default) another process could write before it existed (seen 1 save in 3
                # with 2 processes; tests/test_checkpointing.py two-tier job). Created, and
                # agreed by barrier, before any item is written.
                create_directories_asynchronously=name == "local"),
            **extra,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(STATE_ITEM, ocp.args.PyTreeSave, state_handler)
        registry.add(STATE_ITEM, ocp.args.PyTreeRestore, state_handler)
        registry.add(ITER_ITEM, IteratorSave, IteratorHandler())
        registry.add(ITER_ITEM, IteratorRestore, IteratorHandler())
        if name == "local" or jax.process_index() == 0:
            _remove_stale_tmp_directories(self.directory)
        # The first listing pays fsspec's lazy imports and the bucket session (~0.2 s): here,
        # not inside the first save's blocking time.
        fmt.step_exists(self.directory, 0)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             handler_registry=registry)

    # Runs in Orbax's finalize thread on the writing host(s), after every process has written
    # and OCDBT has been merged, just before the atomic rename.
    def _before_commit(self) -> None:
        pending = self._pending
        if pending is None:
            return
        written = time.time()
        # Local disk: the temporary directory; a bucket: the final one (no rename there).
        # On a bucket a `<step>.orbax-checkpoint-tmp-*` is an unfinished save set aside, never
        # this one.
        step_dir = fmt.step_path(self.directory, pending.step)
        if not storage.is_remote(step_dir):
            tmp = sorted(self.directory.glob(f"{pending.step}{fmt.TMP_MARKER}*"))
            step_dir = tmp[0] if tmp else step_dir
        if self.verify_checksums:
            extra = {"step": pending.step, "tier": self.name,
                     "process_count": jax.process_count()}
            if pending.layout is not None:
                extra["layout"] = pending.layout
                extra["process_index"] = jax.process_index()
            nbytes = write_checksums(step_dir, extra)
        else:
            nbytes = sum(f.size for f in fmt.listing(step_dir).values())
        pending.write_seconds = written - pending.start
        pending.bytes_written = nbytes

    def step_exists(self, step: int) -> bool:
        # A decision every process must share: otherwise the save barriers would diverge.
        return _any_process(fmt.step_exists(self.directory, step))

    def _set_aside_unfinished(self, step: int) -> bool:
        """Moves a bucket's uncommitted `<step>/` (a killed save) out of this save's way.

        It becomes `<step>.orbax-checkpoint-tmp-unfinished-<unix time>`: kept, listed as
        Incomplete, never restored; without the move the run could never save this step again
        (a rerun of a run killed in its final save would end without its completion save).
        False (and nothing moved) for a committed step, or on local disk, where only the atomic
        rename gives a step its final name.
        """
        step_dir = fmt.step_path(self.directory, step)
        unfinished = storage.is_remote(step_dir) and not fmt.is_committed(
            step_dir, fmt.listing(step_dir))
        if not _all_processes(unfinished):
            return False
        if jax.process_index() == 0:
            aside = self.directory / f"{step}{fmt.TMP_MARKER}-unfinished-{int(time.time())}"
            log.warning("moving %s aside to %s: an unfinished save of an earlier run (kept)",
                        step_dir, aside)
            fs, path = storage.filesystem(step_dir)
            # Copy then delete (a bucket has no rename); listings cached by any client go stale.
            fs.copy(path, storage.filesystem(aside)[1], recursive=True)
            fs.rm(path, recursive=True)
        _any_process(False)  # every process waits for the move
        storage.forget_cached_listings(storage.filesystem(step_dir)[0])
        return True

    def save(self, step: int, state: Any, iterator: Any, layout: str | None) -> bool:
        t0 = time.perf_counter()
        self.finish()
        if step == self._last_saved:  # e.g. the completion save right after a period save
            return False
        if self.step_exists(step) and not self._set_aside_unfinished(step):
            log.warning("checkpoint %s already exists: not overwriting it, skipping this save",
                        self.directory / str(step))
            return False
        self._pending = _Pending(step, time.time(), layout=layout)
        state_args = ocp.args.PyTreeSave(state)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                **{STATE_ITEM: state_args, ITER_ITEM: IteratorSave(iterator)}), force=True)
        except Exception as e:
            self._pending, self._failed = None, True
            raise CheckpointSaveError(
                f"saving step {step} to {self.directory} failed: {e}") from e
        self._pending.blocking = time.perf_counter() - t0
        self._last_saved = step
        return True

    def finish(self) -> None:
        """Waits for the save in flight; records its metrics or raises CheckpointSaveError."""
        pending = self._pending
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._pending, self._failed = None, True
            step = pending.step if pending else "?"
            raise CheckpointSaveError(
                f"saving step {step} to {self.directory} failed: {e}") from e
        if pending is None:
            return
        self._pending = None
        step_dir = fmt.step_path(self.directory, pending.step)
        if not fmt.is_committed(step_dir, fmt.listing(step_dir)) or not step_dir.exists():
            raise CheckpointSaveError(f"step {pending.step} was not committed in {self.directory}")
        gbps = None
        if pending.bytes_written is not None and pending.write_seconds:
            gbps = pending.bytes_written / pending.write_seconds / 1e9
        self._metrics.append(SaveMetrics(pending.step, self.name, pending.blocking,
                                         pending.write_seconds, pending.bytes_written, gbps))

    def pop_metrics(self) -> list[SaveMetrics]:
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.finish()
        out, self._metrics = self._metrics, []
        return out

    def good_steps(self, *, layout: str | None, limit: int,
                   exclude: frozenset = frozenset(),
                   defer: bool = False) -> tuple[list[int], list[tuple]]:
        """Newest-first committed steps of this process's view that verify (at most `limit`).

        defer: the crc32c of array data files on local disk is left in `self.deferred[step]`,
        checked by `Checkpointer.restore` while Orbax reads those bytes (one read, not two).
        """
        good, bad = [], []
        self.deferred = {}
        for step in fmt.committed_steps(self.directory):
            if len(good) >= limit:
                break
            if step in exclude:
                continue
            path = self.directory / str(step)
            deferred: list | None = [] if defer else None
            problems = verify_step(path, check_hashes=self.verify_checksums, deferred=deferred)
            self.deferred[step] = deferred or []
            if not problems and layout is not None:
                sums = read_checksums(path) or {}
                if sums.get("layout") != layout:
                    problems = [f"{path}: written by another process/shard layout"]
            if problems:
                if not problems[0].endswith("written by another process/shard layout"):
                    log.error("checkpoint %s failed verification, skipping it (kept on disk): %s",
                              path, problems[0])
                    self.pinned.add(step)
                bad.append((str(path), problems[0]))
                continue
            good.append(step)
        return good, bad

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, str | None]:
        state_args = ocp.args.PyTreeRestore(item=abstract_state,
                                            restore_args=_restore_args(abstract_state))
        out = self.manager.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: state_args, ITER_ITEM: IteratorRestore()}))
        return out[STATE_ITEM], out[ITER_ITEM]

    def close(self) -> None:
        try:
            self.finish()
        finally:
            try:
                self.manager.close()
            except Exception as e:
                # Orbax re-raises the failure of a save we already reported; keep it in the log.
                if not self._failed:
                    raise CheckpointSaveError(f"closing {self.directory} failed: {e}") from e
                log.warning("closing %s after a failed save: %s", self.directory, e)


# ----------------------------------------------------------------------------------------------


def _restore_args(abstract: Any) -> Any:
    """Target sharding/shape/dtype of every leaf: always the current mesh, never the saved one."""
    return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                       dtype=x.dtype), abstract)


def _field(tree: Any, name: str) -> Any:
    return tree[name] if isinstance(tree, dict) else getattr(tree, name)


class Checkpointer:
    """Saves and restores the train state and the data iterator of one run."""

    def __init__(self, config: CheckpointConfig, run_dir: epath.PathLike):
        self.config = config
        self.directory = fmt.as_path(run_dir) / fmt.CHECKPOINTS
        self._persistent = None
        self._local = None
        self._layout: str | None = None
        if not config.enable_checkpointing:
            return
        self._persistent = _Tier("persistent", self.directory,
                                 keep=config.max_num_checkpoints_to_keep,
                                 keep_period=config.keep_period,
                                 verify_checksums=config.verify_checksums,
                                 use_compression=config.use_compression)
        if config.enable_emergency_checkpoint:
            local_dir = (fmt.as_path(config.local_checkpoint_directory)
                         / f"process_{jax.process_index()}")
            self._local = _Tier("local", local_dir,
                                keep=config.max_num_local_checkpoints_to_keep, keep_period=None,
                                verify_checksums=config.verify_checksums,
                                use_compression=config.use_compression)

    @property
    def tiers(self) -> list[_Tier]:
        return [t for t in (self._local, self._persistent) if t is not None]

    def maybe_save(self, step: int, state: Any, iterator: Any, *, force: bool = False) -> bool:
        """Saves on the period (durable tier, else local tier) or when forced; True if started."""
        if self._persistent is None:
            return False
        period = self.config.persistent_period
        started = False
        if force or (period > 0 and step % period == 0):
            started = self._persistent.save(step, state, iterator, layout=None)
        elif self._local is not None and step % self.config.local_checkpoint_period == 0:
            if self._layout is None:
                self._layout = layout_fingerprint(state)
            started = self._local.save(step, state, iterator, layout=self._layout)
        if started and not self.config.async_checkpointing:
            self.wait()
        return started

    def wait(self) -> None:
        """Blocks until every save in flight is committed (raises CheckpointSaveError if not)."""
        for tier in self.tiers:
            tier.finish()

    def pop_save_metrics(self) -> list[SaveMetrics]:
        """Metrics of saves committed since the last call (polls without blocking)."""
        return [m for t in self.tiers for m in t.pop_metrics()]

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def latest_complete_step(self) -> int | None:
        if self._persistent is None:
            return None
        good, _ = self._persistent.good_steps(layout=None, limit=1)
        return good[0] if good else None

    def restore(self, abstract_state: Any, iterator: Any | None) -> RestoreResult:
        """Newest step complete on every process from either tier, onto abstract_state's shardings.

        Falls back, in order, to load_full_state_path and load_parameters_path; returns
        source=None (state None, step 0) when there is nothing to start from.
        """
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        skipped: list[tuple[str, str]] = []
        rejected: set[tuple[str, int]] = set()  # (tier, step) that failed the deferred check
        while True:
            before = len(rejected)
            found = self._restore_newest(abstract_state, iterator, t0, timings, skipped,
                                         rejected)
            if found is not None:
                return found
            if len(rejected) == before:  # no step left in either tier
                break
        if self.config.load_full_state_path:
            return self._restore_full_state(abstract_state, iterator, t0, timings, skipped)
        if self.config.load_parameters_path:
            return self._restore_parameters(abstract_state, t0, timings, skipped)
        timings["total_seconds"] = time.perf_counter() - t0
        return RestoreResult(None, 0, False, None, timings, skipped=tuple(skipped))

    def _restore_newest(self, abstract_state, iterator, t0, timings, skipped, rejected):
        """Restores the newest good step of either tier; None when there is none (or when the
        chosen one failed its deferred data check: it is then in `rejected`, retry)."""
        persistent_step = local_step = -1
        if self._persistent is not None:
            good, bad = self._persistent.good_steps(
                layout=None, limit=1, defer=True,
                exclude=frozenset(s for t, s in rejected if t == "persistent"))
            skipped += [b for b in bad if b not in skipped]
            # Process 0's view decides (its verification covers the whole shared step).
            persistent_step = int(_broadcast_int(good[0] if good else -1))
        if self._local is not None:
            layout = layout_fingerprint(abstract_state)
            self._layout = layout
            good, bad = self._local.good_steps(
                layout=layout, limit=_MAX_LOCAL_STEPS_AGREED, defer=True,
                exclude=frozenset(s for t, s in rejected if t == "local"))
            skipped += [b for b in bad if b not in skipped]
            everyone = _allgather_ints(good, _MAX_LOCAL_STEPS_AGREED)
            common = set(everyone[0].tolist())
            for row in everyone[1:]:
                common &= set(row.tolist())
            common.discard(-1)
            local_step = max(common, default=-1)
        timings["select_seconds"] = time.perf_counter() - t0

        if local_step >= 0 and local_step >= persistent_step:
            tier, step, source = self._local, local_step, "local"
        elif persistent_step >= 0:
            tier, step, source = self._persistent, persistent_step, "persistent"
        else:
            tier = None
        if tier is not None:
            t1 = time.perf_counter()
            items_dir = tier.directory / str(step) / STATE_ITEM
            check_compatible(stored_tree_metadata(items_dir), abstract_state,
                             where=str(items_dir))
            deferred = tier.deferred.get(step, [])
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                # The data files' crc32c is computed while Orbax reads the same files; the state
                # is handed out only if every byte matched.
                check = pool.submit(fmt.check_deferred, deferred) if deferred else None
                try:
                    state, iter_text, error = *tier.restore(step, abstract_state), None
                except Exception as e:  # a corrupt file can make Orbax fail: verdict first
                    state, iter_text, error = None, None, e
                problems = check.result() if check is not None else []
            if _any_process(bool(problems)):
                path = tier.directory / str(step)
                first = problems[0] if problems else f"{path}: failed verification elsewhere"
                log.error("checkpoint %s failed verification, skipping it (kept on disk): %s",
                          path, first)
                tier.pinned.add(step)
                skipped.append((str(path), first))
                rejected.add((tier.name, step))
                del state
                return None
            if error is not None:
                raise error
            iter_restored = self._apply_iter(iterator, iter_text)
            timings["restore_seconds"] = time.perf_counter() - t1
            timings["total_seconds"] = time.perf_counter() - t0
            log.info("restored step %d from the %s tier (%s) in %.2fs", step, source,
                     tier.directory / str(step), timings["restore_seconds"])
            return RestoreResult(state, step, iter_restored, source, timings,
                                 skipped=tuple(skipped))
        return None

    def _apply_iter(self, iterator: Any | None, text: str | None) -> bool:
        if iterator is None or text is None:
            if iterator is not None:
                log.warning("no iterator state for this process layout (%s): the caller "
                            "re-derives the data position from state.step", _iter_file_name())
            return False
        _set_iterator_state(iterator, text)
        return True

    def _restore_full_state(self, abstract_state, iterator, t0, timings, skipped):
        step_dir = fmt.as_path(self.config.load_full_state_path)
        problems = verify_step(step_dir, check_hashes=self.config.verify_checksums)
        if problems:
            raise ValueError(f"load_full_state_path {step_dir} failed verification: "
                             f"{problems[0]}")
        t1 = time.perf_counter()
        items_dir = step_dir / STATE_ITEM
        check_compatible(stored_tree_metadata(items_dir), abstract_state, where=str(items_dir))
        with ocp.PyTreeCheckpointer() as ckptr:
            state = ckptr.restore(items_dir, args=ocp.args.PyTreeRestore(
                item=abstract_state, restore_args=_restore_args(abstract_state)))
        iter_file = step_dir / ITER_ITEM / _iter_file_name()
        text = iter_file.read_text() if iter_file.exists() else None
        iter_restored = self._apply_iter(iterator, text)
        step = int(np.asarray(jax.device_get(_field(state, "step"))))
        timings["restore_seconds"] = time.perf_counter() - t1
        timings["total_seconds"] = time.perf_counter() - t0
        return RestoreResult(state, step, iter_restored, "load_full_state", timings,
                             skipped=tuple(skipped))

    def _restore_parameters(self, abstract_state, t0, timings, skipped):
        t1 = time.perf_counter()
        params = restore_params(self.config.load_parameters_path,
                                _field(abstract_state, "params"))
        timings["restore_seconds"] = time.perf_counter() - t1
        timings["total_seconds"] = time.perf_counter() - t0
        return RestoreResult(None, 0, False, "load_parameters", timings, params=params,
                             skipped=tuple(skipped))


def restore_params(path: epath.PathLike, abstract_params: Any, *,
                   prefer_ema: bool = False) -> Any:
    """The parameters of a step directory, its items/ directory or a params-only checkpoint
    (e.g. from pingllm/cli/reshard_checkpoint.py), onto abstract_params.

    prefer_ema: a train state's moving average ('ema_params') when it has one, else 'params'.
    """
    path = fmt.as_path(path)  # Orbax's OCDBT paths must be absolute
    items_dir = path / STATE_ITEM if (path / STATE_ITEM).is_dir() else path
    stored = stored_tree_metadata(items_dir)
    field = None  # a params-only checkpoint is the parameter tree itself
    if isinstance(stored, dict):
        if prefer_ema and stored.get("ema_params"):
            field = "ema_params"
        elif "params" in stored:
            field = "params"
    target = {field: abstract_params} if field else abstract_params
    check_compatible({field: stored[field]} if field else stored, target, where=str(items_dir))
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(items_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=_restore_args(target), partial_restore=True))
    return out[field] if field else out


def _broadcast_int(value: int) -> int:
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))
