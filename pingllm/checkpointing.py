"""Checkpoints that never lose work: Orbax save/restore, two tiers, checksums, retention.

Layout of one step (persistent tier, `<run_dir>/checkpoints/<step>/`):
  _CHECKPOINT_METADATA, pingllm_checksums.json, items/ (train state, OCDBT),
  iter/process_<i>-of-<N>.json (data iterator state, one file per process).
The local tier (`<local_checkpoint_directory>/process_<i>/<step>/`) has the same layout but
each process writes only its own shards into its own directory. See docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as preservation_lib

log = logging.getLogger(__name__)

CHECKSUM_FILE = "pingllm_checksums.json"
METADATA_FILE = "_CHECKPOINT_METADATA"
STATE_ITEM = "items"
ITER_ITEM = "iter"
# Orbax rewrites these two after the last moment we can hook (commit timestamp, commit marker),
# so they are checked for presence/parse but not checksummed.
_UNCHECKSUMMED = frozenset({METADATA_FILE, "commit_success.txt", CHECKSUM_FILE})
_TMP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
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
class StepInfo:
    step: int
    path: Path
    status: Literal["complete", "incomplete", "corrupt"]
    size: int
    files: int
    created: float | None  # Unix seconds (commit time when known, else mtime)
    verified: bool  # True when a checksum file was present and matched
    problems: tuple[str, ...] = ()


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


class RestoreMismatchError(ValueError):
    """The stored tree does not fit the target (shape, dtype or structure); names the leaves."""


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
# Integrity: checksums written inside the temporary step directory before Orbax's atomic rename,
# so a committed step always carries them.


def _step_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(step_dir: Path, extra: dict | None = None) -> int:
    """Records size and sha256 of every file under step_dir (atomically); returns total bytes."""
    step_dir = Path(step_dir)
    files = {}
    for path in _step_files(step_dir):
        rel = path.relative_to(step_dir).as_posix()
        if rel in _UNCHECKSUMMED:
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    body = {"version": 1, "files": files, **(extra or {})}
    tmp = step_dir / f".{CHECKSUM_FILE}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / CHECKSUM_FILE)
    return sum(v["size"] for v in files.values())


def read_checksums(step_dir: Path) -> dict | None:
    path = Path(step_dir) / CHECKSUM_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def verify_step(path: str | os.PathLike, *, check_hashes: bool = True) -> list[str]:
    """Problems found in one step directory (empty list: complete and, if recorded, intact)."""
    step_dir = Path(path)
    if _TMP_RE.match(step_dir.name):
        return [f"{step_dir}: incomplete (temporary directory of an unfinished save)"]
    if not step_dir.is_dir():
        return [f"{step_dir}: not a directory"]
    problems = []
    meta = step_dir / METADATA_FILE
    if not meta.exists():
        problems.append(f"{meta}: missing")
    else:
        try:
            json.loads(meta.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{meta}: unreadable ({e})")
    if not (step_dir / STATE_ITEM).is_dir():
        problems.append(f"{step_dir / STATE_ITEM}: missing")
    try:
        sums = read_checksums(step_dir)
    except (ValueError, UnicodeDecodeError) as e:
        return problems + [f"{step_dir / CHECKSUM_FILE}: unreadable ({e})"]
    if sums is None:
        return problems
    for rel, want in sorted(sums["files"].items()):
        file = step_dir / rel
        if not file.exists():
            problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != want["size"]:
            problems.append(f"{file}: size {size} != recorded {want['size']}")
        elif check_hashes and _sha256(file) != want["sha256"]:
            problems.append(f"{file}: sha256 differs from the recorded one")
    return problems


def _parse_step(name: str) -> int | None:
    return int(name) if name.isdigit() else None


def _created(step_dir: Path) -> float | None:
    try:
        meta = json.loads((step_dir / METADATA_FILE).read_text())
        ns = meta.get("commit_timestamp_nsecs") or meta.get("init_timestamp_nsecs")
        if ns:
            return ns / 1e9
    except (OSError, ValueError):
        pass
    try:
        return step_dir.stat().st_mtime
    except OSError:
        return None


def list_steps(directory: str | os.PathLike, *, verify: bool = True) -> list[StepInfo]:
    """Every step directory under `directory` (complete, incomplete or corrupt), oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    infos = []
    for child in root.iterdir():
        if not child.is_dir():
            continue
        step = _parse_step(child.name)
        tmp = _TMP_RE.match(child.name)
        if step is None and tmp is None:
            continue
        files = _step_files(child)
        size = sum(f.stat().st_size for f in files)
        if tmp:
            infos.append(StepInfo(int(tmp.group(1)), child, "incomplete", size, len(files),
                                  _created(child), False, (f"{child}: unfinished save",)))
            continue
        problems = tuple(verify_step(child, check_hashes=verify))
        sums_present = (child / CHECKSUM_FILE).exists()
        infos.append(StepInfo(step, child, "corrupt" if problems else "complete", size,
                              len(files), _created(child), sums_present and verify and not problems,
                              problems))
    return sorted(infos, key=lambda i: (i.step, i.status != "complete"))


def _committed_steps(root: Path) -> list[int]:
    """Step numbers whose directory is under its final name, newest first."""
    if not root.is_dir():
        return []
    steps = [_parse_step(p.name) for p in root.iterdir() if p.is_dir()]
    return sorted((s for s in steps if s is not None), reverse=True)


# ----------------------------------------------------------------------------------------------
# Compatibility of a stored tree with the target, named leaf by leaf.


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(path: Sequence[Any]) -> str:
    return ".".join(_key_name(k) for k in path)


def _flat_by_name(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(p): leaf for p, leaf in leaves}


def stored_tree_metadata(items_dir: str | os.PathLike) -> Any:
    """Orbax's metadata tree (ArrayMetadata leaves: shape, dtype, sharding) of a state item."""
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(items_dir).absolute())
    return getattr(meta, "tree", meta)


def check_compatible(stored: Any, target: Any, *, where: str = "") -> None:
    """Raises RestoreMismatchError naming every leaf whose shape/dtype/presence differs."""
    got = _flat_by_name(stored)
    want = _flat_by_name(target)
    problems = []
    for name, leaf in want.items():
        if name not in got:
            problems.append(f"{name}: missing in checkpoint")
            continue
        s = got[name]
        if tuple(s.shape) != tuple(leaf.shape):
            problems.append(f"{name}: checkpoint shape {tuple(s.shape)} != "
                            f"target shape {tuple(leaf.shape)}")
        elif np.dtype(s.dtype) != np.dtype(leaf.dtype):
            problems.append(f"{name}: checkpoint dtype {np.dtype(s.dtype).name} != "
                            f"target dtype {np.dtype(leaf.dtype).name}")
    problems += [f"{name}: in checkpoint but not in target" for name in got if name not in want]
    if problems:
        raise RestoreMismatchError(
            f"checkpoint {where} does not match the model:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------
# Shard layout of one process, so a local-tier step is only used by the layout that wrote it.


def layout_fingerprint(tree: Any) -> str:
    """Hash of (process count, leaf names, global shapes, this process's device->index map)."""
    parts = [f"processes={jax.process_count()}", f"process={jax.process_index()}"]
    for name, leaf in sorted(_flat_by_name(tree).items()):
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


def _remove_stale_tmp_directories(directory: Path) -> None:
    """Deletes unfinished saves of an earlier run before Orbax starts.

    Instead of Orbax's cleanup_tmp_directories, which could still be deleting a stale
    `<step>.orbax-checkpoint-tmp-*` in the background when a save of the same step started and
    cleared it too: under load the two rmtree calls raced and the save failed with ENOENT.
    """
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.is_dir() and _TMP_RE.match(child.name):
            log.warning("removing %s: an unfinished save of an earlier run", child)
            shutil.rmtree(child, ignore_errors=True)


class _Tier:
    def __init__(self, name: Literal["persistent", "local"], directory: Path, *,
                 keep: int | None, keep_period: int | None, verify_checksums: bool,
                 use_compression: bool):
        self.name = name
        self.directory = Path(directory).absolute()  # Orbax's OCDBT paths must be absolute
        self.verify_checksums = verify_checksums
        self.pinned: set[int] = set()
        self._pending: _Pending | None = None
        self._last_saved: int | None = None
        self._failed = False
        self._metrics: list[SaveMetrics] = []
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
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             handler_registry=registry)

    # Runs in Orbax's finalize thread on the writing host(s), after every process has written
    # and OCDBT has been merged, just before the atomic rename.
    def _before_commit(self) -> None:
        pending = self._pending
        if pending is None:
            return
        written = time.time()
        tmp = sorted(glob.glob(str(self.directory / f"{pending.step}.orbax-checkpoint-tmp*")))
        step_dir = Path(tmp[0]) if tmp else self.directory / str(pending.step)
        if self.verify_checksums:
            extra = {"step": pending.step, "tier": self.name,
                     "process_count": jax.process_count()}
            if pending.layout is not None:
                extra["layout"] = pending.layout
                extra["process_index"] = jax.process_index()
            nbytes = write_checksums(step_dir, extra)
        else:
            nbytes = sum(f.stat().st_size for f in _step_files(step_dir))
        pending.write_seconds = written - pending.start
        pending.bytes_written = nbytes

    def step_exists(self, step: int) -> bool:
        # A decision every process must share: otherwise the save barriers would diverge.
        return _any_process((self.directory / str(step)).exists())

    def save(self, step: int, state: Any, iterator: Any, layout: str | None) -> bool:
        t0 = time.perf_counter()
        self.finish()
        if step == self._last_saved:  # e.g. the completion save right after a period save
            return False
        if self.step_exists(step):
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
        if not (self.directory / str(pending.step)).exists():
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

    def good_steps(self, *, layout: str | None, limit: int) -> tuple[list[int], list[tuple]]:
        """Newest-first committed steps of this process's view that verify (at most `limit`)."""
        good, bad = [], []
        for step in _committed_steps(self.directory):
            if len(good) >= limit:
                break
            path = self.directory / str(step)
            problems = verify_step(path) if self.verify_checksums else verify_step(
                path, check_hashes=False)
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

    def __init__(self, config: CheckpointConfig, run_dir: str | os.PathLike):
        self.config = config
        self.directory = Path(run_dir) / "checkpoints"
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
            local_dir = Path(config.local_checkpoint_directory) / f"process_{jax.process_index()}"
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
        persistent_step = local_step = -1
        if self._persistent is not None:
            good, bad = self._persistent.good_steps(layout=None, limit=1)
            skipped += bad
            # Process 0's view decides (its verification covers the whole shared step).
            persistent_step = int(_broadcast_int(good[0] if good else -1))
        if self._local is not None:
            layout = layout_fingerprint(abstract_state)
            self._layout = layout
            good, bad = self._local.good_steps(layout=layout, limit=_MAX_LOCAL_STEPS_AGREED)
            skipped += bad
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
            state, iter_text = tier.restore(step, abstract_state)
            iter_restored = self._apply_iter(iterator, iter_text)
            timings["restore_seconds"] = time.perf_counter() - t1
            timings["total_seconds"] = time.perf_counter() - t0
            log.info("restored step %d from the %s tier (%s) in %.2fs", step, source,
                     tier.directory / str(step), timings["restore_seconds"])
            return RestoreResult(state, step, iter_restored, source, timings,
                                 skipped=tuple(skipped))
        if self.config.load_full_state_path:
            return self._restore_full_state(abstract_state, iterator, t0, timings, skipped)
        if self.config.load_parameters_path:
            return self._restore_parameters(abstract_state, t0, timings, skipped)
        timings["total_seconds"] = time.perf_counter() - t0
        return RestoreResult(None, 0, False, None, timings, skipped=tuple(skipped))

    def _apply_iter(self, iterator: Any | None, text: str | None) -> bool:
        if iterator is None or text is None:
            if iterator is not None:
                log.warning("no iterator state for this process layout (%s): the caller "
                            "re-derives the data position from state.step", _iter_file_name())
            return False
        _set_iterator_state(iterator, text)
        return True

    def _restore_full_state(self, abstract_state, iterator, t0, timings, skipped):
        step_dir = Path(self.config.load_full_state_path).absolute()
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


def restore_params(path: str | os.PathLike, abstract_params: Any, *,
                   prefer_ema: bool = False) -> Any:
    """The parameters of a step directory, its items/ directory or a params-only checkpoint
    (e.g. from tools/reshard_checkpoint.py), onto abstract_params.

    prefer_ema: a train state's moving average ('ema_params') when it has one, else 'params'.
    """
    path = Path(path).absolute()  # Orbax's OCDBT paths must be absolute
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
