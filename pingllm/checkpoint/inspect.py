"""What is on disk: runs, their checkpoints (size, files, status, creation time), one step.

Paths go through etils `epath`, so a bucket works like a local directory. A step's status:
'complete' (committed and, when it carries checksums, every byte matches), 'incomplete' (a
save that never committed: `<step>.orbax-checkpoint-tmp*` on disk, `<step>/` without
commit_success.txt on a bucket) or 'corrupt' (a file missing, resized or changed, or
metadata that does not parse). All of it is decided by `pingllm.checkpoint.format`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from typing import Any, Literal

import numpy as np
from etils import epath

from pingllm.checkpoint import format as fmt

Status = Literal["complete", "incomplete", "corrupt"]
Kind = Literal["base", "run", "checkpoints", "step"]
CHECKPOINTS = fmt.CHECKPOINTS
MB = 2**20


class InspectError(ValueError):
    """The path is missing or holds no checkpoints."""


@dataclasses.dataclass(frozen=True)
class StepRow:
    step: int
    path: str
    status: Status
    size: int  # bytes of every file under the step directory
    files: int
    created: float | None  # Unix seconds: commit time, else the directory's mtime
    problems: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RunReport:
    name: str
    path: str
    steps: tuple[StepRow, ...]

    @property
    def size(self) -> int:
        return sum(s.size for s in self.steps)

    @property
    def files(self) -> int:
        return sum(s.files for s in self.steps)

    @property
    def latest(self) -> StepRow | None:
        """The newest complete step: where a restart resumes."""
        complete = [s for s in self.steps if s.status == "complete"]
        return complete[-1] if complete else None


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    partition_spec: tuple | None  # as saved in items/_sharding
    mesh: dict[str, int] | None  # axis sizes of the saving mesh
    mesh_devices: int | None
    write_shape: tuple[int, ...] | None  # per-shard chunk written (array_metadatas)


@dataclasses.dataclass(frozen=True)
class StepDetail:
    row: StepRow
    arrays: tuple[ArrayInfo, ...]
    param_count: int
    array_bytes: int
    iterator: dict[str, Any]  # file name -> parsed state
    metadata: dict[str, Any]  # timestamps and item handlers from _CHECKPOINT_METADATA
    checksums: dict[str, Any]  # the checksum file's header (step, tier, process_count, ...)


# ----------------------------------------------------------------------------------------------
# Files and status.


def _read_json(path: epath.Path) -> Any:
    return json.loads(path.read_text())


def _row(info: fmt.StepInfo) -> StepRow:
    return StepRow(info.step, str(info.path), info.status, info.size, info.files, info.created,
                   info.problems)


def step_row(step_dir: epath.Path, *, check_hashes: bool = True) -> StepRow:
    return _row(fmt.step_info(step_dir, verify=check_hashes))


def _is_step_name(name: str) -> bool:
    return fmt.parse_step_name(name) is not None


def step_rows(checkpoints_dir: epath.Path, *, check_hashes: bool = True) -> list[StepRow]:
    """Every step directory (committed or not) under `checkpoints_dir`, oldest first."""
    rows = [_row(i) for i in fmt.list_steps(checkpoints_dir, verify=check_hashes)]
    return sorted(rows, key=lambda r: (r.step, r.status != "incomplete"))


# ----------------------------------------------------------------------------------------------
# Which kind of directory a path is.


def classify(path: epath.Path) -> Kind:
    """'step', 'checkpoints', 'run' or 'base'; raises InspectError for anything else."""
    if not path.exists():
        raise InspectError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise InspectError(f"{path}: not a directory (expected a base output, run or step "
                           "directory)")
    if _is_step_name(path.name) and (
            (path / fmt.STATE_ITEM).exists()
            or (path / fmt.METADATA_FILE).exists()
            or path.parent.name == CHECKPOINTS):
        return "step"
    if path.name == CHECKPOINTS:
        return "checkpoints"
    if (path / CHECKPOINTS).is_dir():
        return "run"
    if any((d / CHECKPOINTS).is_dir() for d in path.iterdir() if d.is_dir()):
        return "base"
    raise InspectError(f"{path}: not a checkpoint, run or base output directory (no "
                       f"'{CHECKPOINTS}/' in it or in its subdirectories)")


def run_report(run_dir: epath.Path, *, check_hashes: bool = True) -> RunReport:
    return RunReport(run_dir.name, str(run_dir),
                     tuple(step_rows(run_dir / CHECKPOINTS, check_hashes=check_hashes)))


def scan(path: epath.PathLike, *, run: str | None = None,
         check_hashes: bool = True) -> list[RunReport]:
    """The runs under a base directory (or the one run a run/checkpoints path names)."""
    path = epath.Path(path)
    kind = classify(path)
    if kind == "step":
        raise InspectError(f"{path} is one step: use step_detail")
    if kind == "checkpoints":
        path, kind = path.parent, "run"
    if kind == "run":
        if run and run != path.name:
            raise InspectError(f"{path} is run {path.name!r}, not {run!r}")
        return [run_report(path, check_hashes=check_hashes)]
    if run:
        run_dir = path / run
        if not (run_dir / CHECKPOINTS).is_dir():
            raise InspectError(f"{run_dir}: no such run (no '{CHECKPOINTS}/' directory)")
        return [run_report(run_dir, check_hashes=check_hashes)]
    runs = sorted(d for d in path.iterdir() if d.is_dir() and (d / CHECKPOINTS).is_dir())
    return [run_report(d, check_hashes=check_hashes) for d in runs]


def resolve_step(path: epath.PathLike, *, run: str | None, step: int | None) -> epath.Path:
    """The step directory that (path, --run, --step) name."""
    path = epath.Path(path)
    kind = classify(path)
    if kind == "step":
        if step is not None and fmt.TMP_RE.sub(r"\1", path.name) != str(step):
            raise InspectError(f"{path} is step {path.name}, not {step}")
        return path
    if step is None:
        raise InspectError(f"{path}: give --step N to see one checkpoint")
    reports = scan(path, run=run, check_hashes=False)
    if len(reports) != 1:
        names = ", ".join(r.name for r in reports)
        raise InspectError(f"{path} holds {len(reports)} runs ({names}): give --run")
    rows = [r for r in reports[0].steps if r.step == step]
    if not rows:
        have = ", ".join(str(r.step) for r in reports[0].steps) or "none"
        raise InspectError(f"run {reports[0].name} has no step {step} (steps: {have})")
    # Prefer the committed directory over a leftover temporary one of the same step.
    return epath.Path(sorted(rows, key=lambda r: r.status == "incomplete")[0].path)


# ----------------------------------------------------------------------------------------------
# One step in detail.


def _array_info(name: str, meta: Any) -> ArrayInfo:
    shape = tuple(int(s) for s in meta.shape)
    dtype = np.dtype(meta.dtype)
    sharding = getattr(meta, "sharding", None)
    spec = mesh = devices = None
    if sharding is not None and getattr(sharding, "partition_spec", None) is not None:
        spec = tuple(tuple(s) if isinstance(s, (list, tuple)) else s
                     for s in sharding.partition_spec)
        names = list(getattr(sharding, "axis_names", []) or [])
        sizes = np.asarray(getattr(sharding, "shape", [])).tolist()
        mesh = {str(n): int(s) for n, s in zip(names, sizes)}
        devices = math.prod(mesh.values()) if mesh else None
    storage = getattr(meta, "storage", None)
    write = getattr(storage, "write_shape", None)
    return ArrayInfo(name, shape, dtype.name, math.prod(shape) * dtype.itemsize, spec, mesh,
                     devices, tuple(int(s) for s in write) if write is not None else None)


def _iso(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def step_detail(step_dir: epath.PathLike) -> StepDetail:
    """Every array (path, shape, dtype, bytes, saved sharding), iterator state, metadata."""
    import jax  # only the detail view needs Orbax's metadata reader

    step_dir = epath.Path(step_dir)
    row = step_row(step_dir)
    if row.status == "incomplete":
        raise InspectError(f"{step_dir}: incomplete save (never committed); nothing to read")
    items = step_dir / fmt.STATE_ITEM
    try:
        tree = fmt.stored_tree_metadata(items)
    except Exception as e:  # Orbax raises various types for unreadable metadata
        raise InspectError(f"{items}: unreadable checkpoint metadata ({e})") from e
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    arrays = tuple(_array_info(fmt.path_str(p), m) for p, m in leaves)
    params_only = not any(a.name.startswith(("params.", "opt_state.")) for a in arrays)
    param_count = sum(math.prod(a.shape) for a in arrays
                      if params_only or a.name.startswith("params."))
    iterator = {}
    iter_dir = step_dir / fmt.ITER_ITEM
    if iter_dir.is_dir():
        for f in sorted(iter_dir.glob("process_*.json")):
            try:
                iterator[f.name] = _read_json(f)
            except ValueError:
                iterator[f.name] = f.read_text()
    metadata = {}
    try:
        raw = _read_json(step_dir / fmt.METADATA_FILE)
        for key in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
            if raw.get(key):
                metadata[key] = raw[key]
                metadata[key.replace("_nsecs", "")] = _iso(raw[key] / 1e9)
        metadata["item_handlers"] = raw.get("item_handlers")
    except (OSError, ValueError):
        pass
    checksums = {}
    try:
        sums = _read_json(step_dir / fmt.CHECKSUM_FILE)
        checksums = {k: v for k, v in sums.items() if k != "files"}
        checksums["files_recorded"] = len(sums.get("files", {}))
    except (OSError, ValueError):
        pass
    return StepDetail(row, arrays, param_count, sum(a.bytes for a in arrays), iterator,
                      metadata, checksums)


# ----------------------------------------------------------------------------------------------
# Text and JSON.


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + " | ".join(cells).rstrip())
        if n == 0:
            out.append("  " + "-+-".join("-" * w for w in widths))
    return out


def format_runs(reports: list[RunReport]) -> str:
    lines = []
    for rep in reports:
        lines.append(f"Run: {rep.name}  ({rep.path})")
        if not rep.steps:
            lines += ["  (no checkpoints)", ""]
            continue
        rows = [["Step", "Size (MB)", "Files", "Status", "Created"]]
        rows += [[str(s.step), f"{s.size / MB:.2f}", str(s.files), s.status.capitalize(),
                  _iso(s.created)] for s in rep.steps]
        lines += _table(rows, right={0, 1, 2})
        lines.append(f"  Total: {len(rep.steps)} checkpoints, {rep.size / MB:.2f} MB, "
                     f"{rep.files} files")
        latest = rep.latest
        lines.append(f"  Latest complete: step {latest.step} ({latest.size / MB:.2f} MB, "
                     f"{latest.files} files)" if latest else "  Latest complete: none")
        for s in rep.steps:
            if s.status == "corrupt":
                lines.append(f"  step {s.step} corrupt: {s.problems[0]}")
        lines.append("")
    steps = sum(len(r.steps) for r in reports)
    size = sum(r.size for r in reports)
    files = sum(r.files for r in reports)
    lines.append(f"Grand total: {len(reports)} runs, {steps} checkpoints, {size / MB:.2f} MB, "
                 f"{files} files")
    return "\n".join(lines)


def _spec_str(spec: tuple | None) -> str:
    if spec is None:
        return "-"
    return "(" + ", ".join("None" if s is None else "x".join(s) if isinstance(s, tuple) else str(s)
                           for s in spec) + ")"


def format_detail(d: StepDetail) -> str:
    r = d.row
    lines = [f"Checkpoint: {r.path}", f"  step {r.step}, {r.status}, {r.size / MB:.2f} MB in "
             f"{r.files} files, created {_iso(r.created)}"]
    lines += [f"  problem: {p}" for p in r.problems]
    meshes = {json.dumps(a.mesh) for a in d.arrays if a.mesh}
    lines.append(f"  saved mesh: {', '.join(sorted(meshes)) or 'not recorded'}")
    for key in ("init_timestamp", "commit_timestamp"):
        if key in d.metadata:
            lines.append(f"  {key.replace('_', ' ')}: {d.metadata[key]}")
    if d.checksums:
        lines.append(f"  checksums: {d.checksums}")
    lines.append(f"  parameters: {d.param_count:,} ({d.param_count / 1e6:.2f}M); arrays: "
                 f"{len(d.arrays)}, {d.array_bytes / MB:.2f} MB")
    lines.append("")
    rows = [["Array", "Shape", "Dtype", "Bytes", "Sharding", "Write shape"]]
    rows += [[a.name, str(a.shape), a.dtype, f"{a.bytes:,}", _spec_str(a.partition_spec),
              str(a.write_shape) if a.write_shape is not None else "-"] for a in d.arrays]
    lines += _table(rows, right={3})
    lines.append("")
    if d.iterator:
        for name, state in d.iterator.items():
            lines.append(f"  iterator {name}: {json.dumps(state, sort_keys=True)}")
    else:
        lines.append("  iterator: none saved")
    return "\n".join(lines)


def runs_json(reports: list[RunReport]) -> dict:
    return {
        "runs": [{
            "name": r.name, "path": r.path, "size": r.size, "files": r.files,
            "latest": r.latest.step if r.latest else None,
            "steps": [{**dataclasses.asdict(s), "created_iso": _iso(s.created)} for s in r.steps],
        } for r in reports],
        "size": sum(r.size for r in reports),
        "files": sum(r.files for r in reports),
    }


def detail_json(d: StepDetail) -> dict:
    return {
        **dataclasses.asdict(d.row), "created_iso": _iso(d.row.created),
        "arrays": [dataclasses.asdict(a) for a in d.arrays],
        "param_count": d.param_count, "array_bytes": d.array_bytes,
        "iterator": d.iterator, "metadata": d.metadata, "checksums": d.checksums,
    }
