"""The on-storage format of a run's checkpoints, the same on local disk and on gs://.

Layout: `<run_dir>/checkpoints/<step>/` holding _CHECKPOINT_METADATA, pingllm_checksums.json,
items/ (train state, OCDBT) and iter/process_<i>-of-<N>.json. Completeness follows Orbax
0.12.8 (`_src/path/atomicity.py`): on local disk a save is written to
`<step>.orbax-checkpoint-tmp*` and renamed when done (AtomicRenameTemporaryPath); on gs://
there is no rename, the step is written under its final name and is finished once
`<step>/commit_success.txt` exists (CommitFileTemporaryPath). The integrity record
(pingllm_checksums.json, written before that commit) holds each file's size and crc32c: on a
bucket the server's own crc32c of every object comes with the listing, so verifying a step
reads no data. Every path goes through etils epath / fsspec: no pathlib, os.path or open().
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from etils import epath

from pingllm.checkpoint import storage

CHECKPOINTS = "checkpoints"
CHECKSUM_FILE = "pingllm_checksums.json"
METADATA_FILE = "_CHECKPOINT_METADATA"
COMMIT_FILE = "commit_success.txt"
STATE_ITEM = "items"
ITER_ITEM = "iter"
# Orbax writes these (step level) after the last moment we can hook (commit timestamp, commit
# marker), so they are checked for presence/parse but not checksummed.
_UNCHECKSUMMED_NAMES = frozenset({METADATA_FILE, COMMIT_FILE, CHECKSUM_FILE})
TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax's temporary step directories: <step><marker>-<id>
TMP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
_CHUNK = 8 << 20

Status = Literal["complete", "incomplete", "corrupt"]


@dataclasses.dataclass(frozen=True)
class FileEntry:
    size: int
    crc32c: str | None  # base64 big-endian, as GCS reports it; None when not known yet


@dataclasses.dataclass(frozen=True)
class StepInfo:
    step: int
    path: epath.Path
    status: Status
    size: int
    files: int
    created: float | None  # Unix seconds (commit time when known, else mtime)
    verified: bool  # True when an integrity record was present and matched
    problems: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------
# Paths.


def as_path(path: epath.PathLike) -> epath.Path:
    """An absolute epath (Orbax's OCDBT paths must be absolute); gs:// paths unchanged."""
    if storage.is_remote(path):
        return epath.Path(path)
    return epath.Path(path).expanduser().absolute()


def step_path(root: epath.PathLike, step: int) -> epath.Path:
    return epath.Path(root) / str(step)


def parse_step_name(name: str) -> tuple[int, bool] | None:
    """(step, is_temporary) for a step directory name, None for anything else."""
    if name.isdigit():
        return int(name), False
    m = TMP_RE.match(name)
    return (int(m.group(1)), True) if m else None


# ----------------------------------------------------------------------------------------------
# Listing: one recursive listing per directory (one request per 1000 objects on a bucket).


def listing(directory: epath.PathLike) -> dict[str, FileEntry]:
    """Every file under `directory` by relative posix path (empty when it does not exist)."""
    fs, root = storage.filesystem(directory)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    root = root.rstrip("/")
    out = {}
    for name, info in found.items():
        if info.get("type") == "directory" or name.endswith("/"):
            continue  # a bucket's directory placeholder object
        rel = name[len(root):].lstrip("/")
        out[rel] = FileEntry(int(info.get("size") or 0), info.get("crc32c"))
    return out


def _split(files: dict[str, FileEntry]) -> dict[str, dict[str, FileEntry]]:
    by_child: dict[str, dict[str, FileEntry]] = {}
    for rel, entry in files.items():
        child, _, rest = rel.partition("/")
        if rest:
            by_child.setdefault(child, {})[rest] = entry
    return by_child


def is_committed(step_dir: epath.PathLike, files: dict[str, FileEntry]) -> bool:
    """Orbax's own rule (step.is_path_finalized) for a directory under its final step name."""
    if storage.is_remote(step_dir):
        return COMMIT_FILE in files
    return True  # on local disk only the atomic rename gives a step its final name


# ----------------------------------------------------------------------------------------------
# Integrity record.


def _crc32c_b64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def crc32c_of(path: epath.Path) -> str:
    import google_crc32c

    digest = google_crc32c.Checksum()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def _sha256_of(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded(rel: str) -> bool:
    return rel not in _UNCHECKSUMMED_NAMES and not rel.startswith(".")


def _crcs(step_dir: epath.Path, files: dict[str, FileEntry], rels: Sequence[str]) -> dict:
    """crc32c of each rel: the server's on a bucket, computed (4 threads) on local disk."""
    known = {r: files[r].crc32c for r in rels if files[r].crc32c}
    todo = [r for r in rels if r not in known]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        known.update(zip(todo, pool.map(lambda r: crc32c_of(step_dir / r), todo)))
    return known


def write_checksums(step_dir: epath.PathLike, extra: dict | None = None) -> int:
    """Records size and crc32c of every file under step_dir; returns total bytes."""
    step_dir = epath.Path(step_dir)
    files = listing(step_dir)
    rels = sorted(r for r in files if _recorded(r))
    crcs = _crcs(step_dir, files, rels)
    record = {r: {"size": files[r].size, "crc32c": crcs[r]} for r in rels}
    body = {"version": 2, "files": record, **(extra or {})}
    # Inside a step that is not committed yet: a crash here leaves an incomplete step.
    (step_dir / CHECKSUM_FILE).write_text(json.dumps(body, indent=1, sort_keys=True))
    return sum(v["size"] for v in record.values())


def read_checksums(step_dir: epath.PathLike) -> dict | None:
    path = epath.Path(step_dir) / CHECKSUM_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _json_problem(path: epath.Path, present: bool) -> str | None:
    if not present:
        return f"{path}: missing"
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return f"{path}: unreadable ({e})"
    return None


def is_array_data(rel: str) -> bool:
    """An OCDBT data file (the array bytes), as opposed to manifests and metadata."""
    return "/d/" in f"/{rel}"


def verify_step(path: epath.PathLike, *, check_hashes: bool = True,
                files: dict[str, FileEntry] | None = None,
                deferred: list | None = None) -> list[str]:
    """Problems found in one step directory (empty list: complete and, if recorded, intact).

    deferred: when a list, the crc32c of array data files that must be computed locally is not
    checked here but appended as (path, recorded crc32c) for `check_deferred`, so that it can
    run while Orbax reads the same bytes; everything else (structure, sizes, metadata and
    manifest hashes, any crc the bucket listing reports) is still checked now.
    """
    step_dir = as_path(path)
    parsed = parse_step_name(step_dir.name)
    if parsed and parsed[1]:
        return [f"{step_dir}: incomplete (temporary directory of an unfinished save)"]
    files = listing(step_dir) if files is None else files
    if not files:
        return [f"{step_dir}: not a directory"]
    if parsed and not is_committed(step_dir, files):
        return [f"{step_dir}: incomplete (no {COMMIT_FILE}: the save never finished)"]
    problems = [p for p in (
        _json_problem(step_dir / METADATA_FILE, METADATA_FILE in files),
        _json_problem(step_dir / STATE_ITEM / "_METADATA", f"{STATE_ITEM}/_METADATA" in files),
    ) if p]
    if CHECKSUM_FILE not in files:
        return problems
    try:
        sums = read_checksums(step_dir)
    except (ValueError, UnicodeDecodeError) as e:
        return problems + [f"{step_dir / CHECKSUM_FILE}: unreadable ({e})"]
    recorded = sums.get("files", {})
    present = []
    for rel, want in sorted(recorded.items()):
        if rel not in files:
            problems.append(f"{step_dir / rel}: missing")
        elif files[rel].size != want["size"]:
            problems.append(f"{step_dir / rel}: size {files[rel].size} != recorded "
                            f"{want['size']}")
        else:
            present.append(rel)
    if not check_hashes:
        return problems
    if sums.get("version", 1) >= 2:
        if deferred is not None:
            later = [r for r in present if is_array_data(r) and not files[r].crc32c]
            deferred += [(step_dir / r, recorded[r]["crc32c"]) for r in later]
            present = [r for r in present if r not in set(later)]
        got = _crcs(step_dir, files, present)
        problems += [f"{step_dir / r}: crc32c differs from the recorded one"
                     for r in present if got[r] != recorded[r]["crc32c"]]
    else:  # records written before version 2 carry sha256
        problems += [f"{step_dir / r}: sha256 differs from the recorded one"
                     for r in present if _sha256_of(step_dir / r) != recorded[r]["sha256"]]
    return problems


def check_deferred(deferred: Sequence[tuple[epath.Path, str]]) -> list[str]:
    """The crc32c checks `verify_step(..., deferred=...)` left for later (4 threads)."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda item: crc32c_of(item[0]), deferred))
    return [f"{path}: crc32c differs from the recorded one"
            for (path, want), crc in zip(deferred, got) if crc != want]


def _created(step_dir: epath.Path, files: dict[str, FileEntry]) -> float | None:
    if METADATA_FILE in files:
        try:
            meta = json.loads((step_dir / METADATA_FILE).read_text())
            ns = meta.get("commit_timestamp_nsecs") or meta.get("init_timestamp_nsecs")
            if ns:
                return ns / 1e9
        except (OSError, ValueError, AttributeError):
            pass
    try:
        st = step_dir.stat()
        return float(getattr(st, "mtime", None) or getattr(st, "st_mtime", None) or 0) or None
    except (OSError, AttributeError):
        return None


def step_info(step_dir: epath.PathLike, *, verify: bool = True,
              files: dict[str, FileEntry] | None = None) -> StepInfo:
    """Status, size, file count and creation time of one step directory."""
    step_dir = as_path(step_dir)
    files = listing(step_dir) if files is None else files
    size = sum(f.size for f in files.values())
    parsed = parse_step_name(step_dir.name)
    step = parsed[0] if parsed else -1
    if (parsed and parsed[1]) or (parsed and files and not is_committed(step_dir, files)):
        why = ("temporary directory of a save that never committed" if parsed[1]
               else f"no {COMMIT_FILE}: a save that never committed")
        return StepInfo(step, step_dir, "incomplete", size, len(files),
                        _created(step_dir, files), False, (f"{step_dir}: {why}",))
    problems = tuple(verify_step(step_dir, check_hashes=verify, files=files))
    return StepInfo(step, step_dir, "corrupt" if problems else "complete", size, len(files),
                    _created(step_dir, files), CHECKSUM_FILE in files and verify and not problems,
                    problems)


def list_steps(directory: epath.PathLike, *, verify: bool = True) -> list[StepInfo]:
    """Every step directory under `directory` (complete, incomplete or corrupt), oldest first."""
    root = as_path(directory)
    by_child = _split(listing(root))
    for child in _empty_subdirectories(root, by_child):
        by_child[child] = {}  # e.g. a save killed right after it created its temporary directory
    infos = []
    for child, files in by_child.items():
        if parse_step_name(child) is not None:
            infos.append(step_info(root / child, verify=verify, files=files))
    return sorted(infos, key=lambda i: (i.step, i.status != "complete"))


def _empty_subdirectories(root: epath.Path, with_files: dict) -> list[str]:
    """Names of the directories directly under `root` that hold no file (local disk only).

    A bucket has no empty directories (only objects), so only local disk can have one.
    """
    if storage.is_remote(root):
        return []
    fs, path = storage.filesystem(root)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
             if e.get("type") == "directory")
    return [n for n in names if n not in with_files]


def committed_steps(root: epath.PathLike) -> list[int]:
    """Step numbers whose directory is committed (Orbax's rule), newest first."""
    root = as_path(root)
    steps = []
    for child, files in _split(listing(root)).items():
        parsed = parse_step_name(child)
        if parsed and not parsed[1] and is_committed(root / child, files):
            steps.append(parsed[0])
    return sorted(steps, reverse=True)


def step_exists(root: epath.PathLike, step: int) -> bool:
    """Whether anything (committed or not) already sits under the step's final name."""
    return bool(listing(step_path(as_path(root), step)))


def resolve_step(path: epath.PathLike) -> tuple[epath.Path, epath.Path]:
    """(run_dir, step_dir) of a run directory, its checkpoints/ directory or a step directory.

    A run or checkpoints directory resolves to its newest complete step.
    """
    p = as_path(path)
    if (p / STATE_ITEM).is_dir():
        return p.parent.parent, p
    run_dir = p.parent if p.name == CHECKPOINTS else p
    if not (run_dir / CHECKPOINTS).is_dir():
        raise FileNotFoundError(f"no checkpoint at {p}: expected a run directory (with "
                                f"{CHECKPOINTS}/), its {CHECKPOINTS}/ directory or a step "
                                "directory")
    steps = [s for s in list_steps(run_dir / CHECKPOINTS) if s.status == "complete"]
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint step under {run_dir / CHECKPOINTS}")
    return run_dir, max(steps, key=lambda s: s.step).path


# ----------------------------------------------------------------------------------------------
# The stored tree, and its compatibility with a target, named leaf by leaf.


class RestoreMismatchError(ValueError):
    """The stored tree does not fit the target (shape, dtype or structure); names the leaves."""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    return ".".join(_key_name(k) for k in path)


def flat_by_name(tree: Any) -> dict[str, Any]:
    import jax

    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): leaf for p, leaf in leaves}


def stored_tree_metadata(items_dir: epath.PathLike) -> Any:
    """Orbax's metadata tree (ArrayMetadata leaves: shape, dtype, sharding) of a state item."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointHandler().metadata(as_path(items_dir))
    return getattr(meta, "tree", meta)


def check_compatible(stored: Any, target: Any, *, where: str = "") -> None:
    """Raises RestoreMismatchError naming every leaf whose shape/dtype/presence differs."""
    got = flat_by_name(stored)
    want = flat_by_name(target)
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
