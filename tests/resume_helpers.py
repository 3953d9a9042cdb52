"""Shared by the resume tests: run the real CLI, read what it wrote with other people's readers.

Runs: `python -m pingllm.main` (one process) or `launch/local.py` (a jax.distributed job) on a
tiny model. Outputs are read independently of pingllm: TensorBoard's `EventAccumulator` for
event files, plain Orbax for checkpoints, NumPy for the fingerprints the trainer logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Milliseconds per step on a CPU core; dropout on so that resumed dropout keys matter.
TINY = (
    "ModelConfig.num_layers = 1",
    "ModelConfig.emb_dim = 32",
    "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 16",
    "ModelConfig.mlp_dim = 64",
    "ModelConfig.dropout_rate = 0.1",
    "MAX_TARGET_LENGTH = 64",
    "GLOBAL_BATCH_SIZE = 8",
    "DataConfig.synthetic_rows = 20000",
    "LOG_PERIOD = 1",
    "EVAL_INTERVAL = 0",
    # Warmup > STEPS: the learning rate grows every step, so every step changes the weights.
    "LEARNING_RATE = 1e-2",
    "WARMUP_STEPS = 100",
    "LEARNING_RATE_SCHEDULE_STEPS = 1000",
)

# The 2-process jobs (test_resume, test_kill_restart: they share the reference run "ref2")
# also pack two windows per row and keep a moving average of the parameters, so both must
# survive stops, restarts and kill -9 bit for bit as well.
PACKED_EMA = ("DataConfig.windows_per_row = 2", "OptimizerConfig.ema_decay = 0.9")


@dataclasses.dataclass(frozen=True)
class Shared:
    """What every run of a test session shares: one dataset, one compilation cache."""

    root: Path

    @property
    def out(self) -> Path:
        return self.root / "out"

    def run_dir(self, name: str) -> Path:
        return self.out / name

    def bindings(self, name: str, extra=()) -> list[str]:
        return [
            *TINY,
            f'BASE_OUTPUT_DIRECTORY = "{self.out}"',
            f'DATASET_PATH = "{self.root / "tfds"}"',
            f'RunConfig.compilation_cache_dir = "{self.root / "jax_cache"}"',
            f'RUN_NAME = "{name}"',
            *extra,
        ]

    def data_config(self, extra=()):
        from pingllm import config as config_lib

        return config_lib.load([str(REPO / "gin/quickstart.gin")],
                               self.bindings("data", extra)).data


def shared(tmp_path_factory) -> Shared:
    """The session's shared root (same path from every test module); builds the dataset once."""
    root = tmp_path_factory.getbasetemp() / "resume_shared"
    root.mkdir(exist_ok=True)
    s = Shared(root)
    marker = root / "tfds.ready"
    if not marker.exists():
        from pingllm.data import pipeline

        pipeline.prepare(s.data_config())  # before any run: concurrent runs would race on it
        marker.write_text("ok")
    return s


# ---- running the CLI ---------------------------------------------------------------------------


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclasses.dataclass
class Launch:
    """One started command: a single trainer process or a launch/local.py job."""

    name: str
    popen: subprocess.Popen
    log_paths: list[Path]  # process 0's log first
    started: float
    rc: int | None = None

    def wait(self, timeout: float = 600) -> int:
        try:
            self.rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not finish in {timeout}s:\n{self.tail()}") from None
        return self.rc

    def log(self, process: int = 0) -> str:
        path = self.log_paths[process]
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self, n: int = 4000) -> str:
        return "\n".join(f"--- {p} ---\n{self.log(i)[-n:]}" for i, p in enumerate(self.log_paths))

    def pids(self) -> list[int]:
        """The launcher (if any) and every trainer process it started."""
        pids = [self.popen.pid]
        children = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children")
        try:
            pids += [int(p) for p in children.read_text().split()]
        except OSError:
            pass
        return pids

    def kill(self) -> None:
        """SIGKILL the whole job at once (trainers first: the launcher would SIGTERM them)."""
        for pid in reversed(self.pids()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.rc = self.popen.wait()


def start(s: Shared, name: str, extra=(), *, processes: int = 1, devices: int = 1,
          tag: str = "", grace_seconds: float = 10.0) -> Launch:
    """Starts run `name` (resumes if its directory has checkpoints); logs under root/logs."""
    logs = s.root / "logs" / f"{name}{tag}_{time.monotonic_ns()}"
    logs.mkdir(parents=True)
    trainer_args = ["--gin_file=gin/quickstart.gin",
                    *(f"--gin_bindings={b}" for b in s.bindings(name, extra))]
    if processes == 1:
        argv = [sys.executable, "-m", "pingllm.main", *trainer_args]
        log_paths = [logs / "process_0.log"]
        out = open(log_paths[0], "wb")
    else:
        argv = [sys.executable, "launch/local.py", "--num_processes", str(processes),
                "--devices_per_process", str(devices), "--log_dir", str(logs), "--quiet",
                "--grace_seconds", str(grace_seconds), "--", *trainer_args]
        log_paths = [logs / f"process_{i}.log" for i in range(processes)]
        out = open(logs / "launcher.log", "wb")
    with out:
        popen = subprocess.Popen(argv, cwd=REPO, env=_env(devices), stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Launch(name, popen, log_paths, time.monotonic())


def run(s: Shared, name: str, extra=(), *, expect: int | None = 0, timeout: float = 600,
        **kwargs) -> Launch:
    launch = start(s, name, extra, **kwargs)
    rc = launch.wait(timeout)
    if expect is not None:
        assert rc == expect, f"{name}: exit {rc}, expected {expect}\n{launch.tail()}"
    return launch


def progress_step(run_dir: Path) -> int:
    """The last step the trainer recorded as reached (progress.json), -1 if none yet."""
    try:
        return int(json.loads((run_dir / "progress.json").read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return -1


def wait_for_step(launch: Launch, run_dir: Path, step: int, timeout: float = 600,
                  poll: float = 0.01) -> int:
    """Polls progress.json until it shows >= step; fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached = progress_step(run_dir)
        if reached >= step:
            return reached
        if launch.popen.poll() is not None:
            raise AssertionError(f"{launch.name} exited {launch.popen.returncode} before step "
                                 f"{step}:\n{launch.tail()}")
        time.sleep(poll)
    raise AssertionError(f"{launch.name} did not reach step {step} in {timeout}s")


def stop_at(launch: Launch, run_dir: Path, step: int, signum=signal.SIGTERM) -> int:
    """Sends `signum` once the run has reached `step`; returns the step seen when it was sent."""
    seen = wait_for_step(launch, run_dir, step)
    launch.popen.send_signal(signum)
    return seen


# ---- reading what the trainer wrote ------------------------------------------------------------


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every event file of the run, via TensorBoard's EventAccumulator.

    A step written by several runs (a restart replays steps after a crash) keeps the value with
    the latest wall time, which is what the restarted run computed.
    """
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"),
        size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["tensors"]:
        events = sorted(acc.Tensors(tag), key=lambda e: e.wall_time)
        values = {}
        for e in events:
            array = tensor_util.make_ndarray(e.tensor_proto)
            if array.dtype.kind in "fiu":
                values[e.step] = array.item()
        if values:
            out[tag] = values
    return out


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Committed steps: directories under their final (numeric) name."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def read_state(step_dir: Path) -> dict:
    """A step's whole train state as NumPy arrays, with plain Orbax (no pingllm code)."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    items = epath.Path(step_dir) / "items"  # a local or gs:// step
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(items)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(items, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def flat(tree) -> dict[str, np.ndarray]:
    import jax

    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def assert_trees_bitwise_equal(a, b, what: str = "") -> int:
    """Every leaf has the same dtype, shape and bytes; returns the number of leaves compared."""
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb), f"{what}: different leaves"
    for name in fa:
        x, y = fa[name], fb[name]
        assert x.dtype == y.dtype and x.shape == y.shape, (what, name, x.dtype, y.dtype)
        if x.tobytes() != y.tobytes():
            diff = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))
            raise AssertionError(f"{what}: leaf {name} differs (max abs diff {diff})")
    return len(fa)


def fingerprint(tree) -> str:
    """NumPy twin of trainer.tree_fingerprint: sum(bits * (2654435761 * i + 1)) mod 2**32."""
    import jax

    words = []
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(leaf)
        bits = leaf.view(f"<u{leaf.dtype.itemsize}").reshape(-1).astype(np.uint64)
        weights = (np.arange(bits.size, dtype=np.uint64) * np.uint64(2654435761)
                   + np.uint64(1)) & np.uint64(0xFFFFFFFF)
        words.append(int(np.sum((bits * weights) & np.uint64(0xFFFFFFFF)) & 0xFFFFFFFF))
    return hashlib.sha256(np.asarray(words, dtype="<u4").tobytes()).hexdigest()[:16]


def batch_digest(batch: dict[str, np.ndarray]) -> str:
    """The same digest the trainer logs for its first batch (every key, sorted by name)."""
    digest = hashlib.sha256()
    for key in sorted(batch):
        value = np.ascontiguousarray(batch[key])
        digest.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


# ---- reading the log ---------------------------------------------------------------------------

RESTORED = re.compile(r"restored step (\d+) from the (\w+) tier; params fingerprint ([0-9a-f]+)")
FIRST_BATCH = re.compile(
    r"first batch: step (\d+), process (\d+) of (\d+), rows \[(\d+), (\d+)\), digest ([0-9a-f]+)")


def restored(log: str) -> tuple[int, str, str] | None:
    """(step, tier, params fingerprint) of the restore this log reports, None if none."""
    m = RESTORED.search(log)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


def first_batch(log: str) -> tuple[int, int, int, int, int, str]:
    """(step, process, processes, row start, row stop, digest) of the first batch logged."""
    m = FIRST_BATCH.search(log)
    assert m, "no first-batch line in the log"
    return (*(int(g) for g in m.groups()[:5]), m.group(6))
