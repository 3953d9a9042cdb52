"""Chaos check: kill -9 a 2-process training job at random moments, restart it, many times.

    python tools/kill_restart_loop.py --kills 50 [--workdir /tmp/pingllm_chaos] [--seed 0]

Each cycle starts `launch/local.py` (2 processes x 2 CPU devices, a tiny model), kills it with
SIGKILL at a random moment - during start-up, while training, while an async save is in flight
(a `<step>.orbax-checkpoint-tmp*` directory exists), or only one of its processes (the launcher
must then stop the other) - and checks:
  - every step listed as committed at any kill is still listed and verifies (checksums);
  - the restart restores the newest listed step, with exactly its parameters (fingerprint);
  - the restart reports the steps lost since that save (progress at the kill - saved step);
  - a run that reaches STEPS ends with parameters bit-equal to an uninterrupted run's, and
    every step ever listed still restores with plain Orbax.
Prints one line per kill and a summary; exit 0 iff every check held. Every restart imports the
code afresh: while others edit the tree, run it from a frozen copy
(`git archive HEAD | tar -x -C /tmp/snap && cd /tmp/snap && python tools/kill_restart_loop.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = (
    "ModelConfig.num_layers = 1", "ModelConfig.emb_dim = 32", "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 16", "ModelConfig.mlp_dim = 64", "ModelConfig.dropout_rate = 0.1",
    "MAX_TARGET_LENGTH = 64", "GLOBAL_BATCH_SIZE = 8", "DataConfig.synthetic_rows = 20000",
    "LOG_PERIOD = 1", "EVAL_INTERVAL = 0", "LEARNING_RATE = 1e-2", "WARMUP_STEPS = 100",
    "LEARNING_RATE_SCHEDULE_STEPS = 1000",
)
# Every step is kept (a kill must never lose one) and saves are frequent (kills hit them).
CHAOS = ("MAX_NUM_CHECKPOINTS_TO_KEEP = None", "StopConfig.check_every_steps = 2")
MODES = ("startup", "training", "saving", "one_process")

RESTORED = re.compile(r"restored step (\d+) from the (\w+) tier; params fingerprint ([0-9a-f]+)")
LOST = re.compile(r"steps lost since the last save: (\d+)")


class CheckFailed(AssertionError):
    pass


def fingerprint(tree) -> str:
    """NumPy twin of pingllm.trainer.tree_fingerprint."""
    import jax

    words = []
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(leaf)
        bits = leaf.view(f"<u{leaf.dtype.itemsize}").reshape(-1).astype(np.uint64)
        weights = (np.arange(bits.size, dtype=np.uint64) * np.uint64(2654435761)
                   + np.uint64(1)) & np.uint64(0xFFFFFFFF)
        words.append(int(np.sum((bits * weights) & np.uint64(0xFFFFFFFF)) & 0xFFFFFFFF))
    return hashlib.sha256(np.asarray(words, dtype="<u4").tobytes()).hexdigest()[:16]


def read_state(step_dir: Path) -> dict:
    """A step's train state as NumPy arrays, with plain Orbax."""
    import jax
    import orbax.checkpoint as ocp

    items = Path(step_dir) / "items"
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(items)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(items, args=ocp.args.PyTreeRestore(restore_args=args))


def states_equal(a, b) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() ==
        np.asarray(y).tobytes() for x, y in zip(la, lb))


def progress_step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def committed(run_dir: Path) -> dict[int, list[str]]:
    """{step: problems} of every committed step (problems empty when it verifies)."""
    from pingllm.checkpoint import manager as checkpointing

    return {i.step: list(i.problems) for i in checkpointing.list_steps(run_dir / "checkpoints")
            if i.status != "incomplete"}


def unfinished_saves(run_dir: Path) -> set[tuple[str, int, int]]:
    """(name, inode, ctime) of `<step>.orbax-checkpoint-tmp` directories: saves in flight, or
    left by a kill. Orbax reuses the name for the same step, the inode and ctime tell them apart.
    """
    out = set()
    try:
        for p in (run_dir / "checkpoints").iterdir():
            if ".orbax-checkpoint-tmp" in p.name:
                st = p.stat()
                out.add((p.name, st.st_ino, st.st_ctime_ns))
    except OSError:  # listed, then removed or renamed
        pass
    return out


@dataclasses.dataclass
class Job:
    popen: subprocess.Popen
    log_dir: Path

    def trainers(self) -> list[int]:
        path = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def log(self) -> str:
        path = self.log_dir / "process_0.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill_all(self) -> None:
        for pid in [*self.trainers(), self.popen.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait()


def start_job(trainer_args: list[str], log_dir: Path, processes: int, devices: int) -> Job:
    log_dir.mkdir(parents=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "launch/local.py", "--num_processes", str(processes),
            "--devices_per_process", str(devices), "--log_dir", str(log_dir), "--quiet",
            "--grace_seconds", "5", "--", *trainer_args]
    with open(log_dir / "launcher.log", "wb") as out:
        popen = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
    return Job(popen, log_dir)


@dataclasses.dataclass
class Report:
    kills: int = 0
    by_mode: dict = dataclasses.field(default_factory=lambda: {m: 0 for m in MODES})
    during_save: int = 0  # kills with a save in flight (a tmp directory present)
    restores_checked: int = 0
    steps_lost: list = dataclasses.field(default_factory=list)
    episodes_finished: int = 0
    steps_verified: int = 0  # committed steps restored with plain Orbax at episode ends
    seconds: float = 0.0


def _wait(job: Job, until, timeout: float, poll: float = 0.01) -> bool:
    """Polls `until()` while the job runs; False when the job ended (or timed out) first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return True
        if job.popen.poll() is not None:
            return False
        time.sleep(poll)
    return False


def run_loop(*, kills: int, bindings, run_dir, gin_file: str, reference: Path | None,
             work: Path, processes: int = 2, devices: int = 2, seed: int = 0,
             modes: tuple[str, ...] = (), say=print) -> Report:
    """Kills and restarts runs until `kills` kills happened; raises CheckFailed on a violation.

    bindings(run_name) -> gin bindings of one run; run_dir(run_name) -> its directory;
    reference: the final step directory of an uninterrupted run with the same bindings;
    modes: kill modes to take in turn (default: drawn at random from MODES).
    """
    rng = random.Random(seed)
    report = Report()
    t0 = time.monotonic()
    episode, cycle = 0, 0
    name = f"chaos{episode}"
    ever: set[int] = set()
    # (step to restore, 0 = none; steps lost) that the next start must report.
    expect: tuple[int, int] | None = None
    while True:
        rdir = run_dir(name)
        args = [f"--gin_file={gin_file}", *(f"--gin_bindings={b}" for b in bindings(name))]
        job = start_job(args, work / "logs" / f"{name}_{cycle:03d}", processes, devices)
        cycle += 1
        mode = None
        if report.kills < kills:
            mode = modes[report.kills % len(modes)] if modes else rng.choice(MODES)
        before = progress_step(rdir)
        stale = unfinished_saves(rdir)  # left by the last kill; this start removes them

        def saving_now(rdir=rdir, stale=stale) -> bool:  # a save of this start is in flight
            return bool(unfinished_saves(rdir) - stale)

        floor = max(before, expect[0] if expect else -1)

        def started(rdir=rdir, floor=floor) -> bool:  # training got past where it restarted
            return progress_step(rdir) > floor

        hit = False
        if mode == "startup":
            time.sleep(rng.uniform(0.0, 20.0))
            hit = job.popen.poll() is None
        elif mode in ("training", "one_process"):
            hit = _wait(job, started, 600) and (time.sleep(rng.uniform(0.0, 1.5)) or True)
            hit = hit and job.popen.poll() is None
        elif mode == "saving":
            hit = _wait(job, started, 600) and _wait(job, saving_now, 60, 0.002)
            if hit:
                time.sleep(rng.uniform(0.0, 0.05))
        in_save = saving_now()
        if hit and mode == "one_process":
            victims = job.trainers()
            os.kill(rng.choice(victims), signal.SIGKILL)
            try:  # the launcher must stop the survivor itself (SIGTERM, then SIGKILL)
                rc = job.popen.wait(60)
            except subprocess.TimeoutExpired:
                job.kill_all()
                raise CheckFailed(f"{job.log_dir}: the launcher left a process running") from None
            if rc in (0, 75):
                raise CheckFailed(f"{job.log_dir}: job with a killed process exited {rc}")
        elif hit:
            job.kill_all()
        else:
            rc = job.popen.wait(900)
        log = job.log()

        # What this start reported about its restore (when it got that far).
        m = RESTORED.search(log)
        fresh = "no checkpoint: initialising" in log
        if expect is not None and (m or fresh):
            step, lost = expect
            if step == 0 and not fresh:  # killed before the first commit: nothing to restore
                raise CheckFailed(f"{job.log_dir}: restored {m.group(1)}, nothing was listed")
            if step > 0 and (fresh or int(m.group(1)) != step):
                raise CheckFailed(f"{job.log_dir}: restored {m and m.group(1)} (fresh: {fresh}),"
                                  f" newest listed was {step}")
            if step > 0:
                want = fingerprint(read_state(rdir / "checkpoints" / str(step))["params"])
                if m.group(3) != want:
                    raise CheckFailed(f"{job.log_dir}: restored params {m.group(3)} != "
                                      f"saved {want}")
            got_lost = LOST.search(log)
            if got_lost and int(got_lost.group(1)) != lost:
                raise CheckFailed(f"{job.log_dir}: steps lost {got_lost.group(1)} != {lost}")
            report.restores_checked += 1
            report.steps_lost.append(lost)

        listed = committed(rdir)
        bad = {s: p for s, p in listed.items() if p}
        if bad:
            raise CheckFailed(f"committed steps that fail verification: {bad}")
        missing = ever - set(listed)
        if missing:
            raise CheckFailed(f"committed steps lost: {sorted(missing)} (listed: {sorted(listed)})")
        ever |= set(listed)

        if hit:
            report.kills += 1
            report.by_mode[mode] += 1
            report.during_save += in_save
            newest = max(listed, default=0)  # 0: the restart must start fresh
            lost = max(0, progress_step(rdir) - newest)
            expect = (newest, lost)
            say(f"kill {report.kills:3d} [{mode:11s}] {'in save ' if in_save else ''}"
                f"progress {progress_step(rdir)} listed {sorted(listed)[-4:]} "
                f"-> restart must restore {newest}, lose {lost} ({time.monotonic() - t0:.0f}s)")
            continue

        if rc != 0:
            raise CheckFailed(f"{job.log_dir}: exited {rc} without being killed:\n{log[-3000:]}")
        final = max(listed)
        state = read_state(rdir / "checkpoints" / str(final))
        if reference is not None and not states_equal(state, read_state(reference)):
            first = next((k for k in sorted(ever) if (reference.parent / str(k)).is_dir() and
                          not states_equal(read_state(rdir / "checkpoints" / str(k)),
                                           read_state(reference.parent / str(k)))), None)
            raise CheckFailed(f"{name}: final state at step {final} differs from the "
                              f"uninterrupted run's {reference}; first differing step: {first} "
                              "(the code changed under the loop? run it from a frozen copy)")
        for step in sorted(ever):  # every committed step still restores
            read_state(rdir / "checkpoints" / str(step))
        report.steps_verified += len(ever)
        report.episodes_finished += 1
        say(f"episode {episode} finished at step {final}: state bit-equal to the uninterrupted "
            f"run: {reference is not None}; {len(ever)} committed steps all restore")
        if report.kills >= kills:
            report.seconds = time.monotonic() - t0
            return report
        episode += 1
        name, ever, expect = f"chaos{episode}", set(), None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoint_period", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/pingllm_chaos"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    def bindings(name):
        return [*TINY, *CHAOS, f"STEPS = {args.steps}",
                f"CHECKPOINT_PERIOD = {args.checkpoint_period}",
                f'BASE_OUTPUT_DIRECTORY = "{work / "out"}"',
                f'DATASET_PATH = "{work / "tfds"}"',
                f'RunConfig.compilation_cache_dir = "{work / "jax_cache"}"', f'RUN_NAME = "{name}"']

    ref_dir = work / "out" / "reference"
    if not (ref_dir / "checkpoints" / str(args.steps)).is_dir():
        print("reference: an uninterrupted run ...", flush=True)
        job = start_job(["--gin_file=gin/quickstart.gin",
                         *(f"--gin_bindings={b}" for b in bindings("reference"))],
                        work / "logs" / f"reference_{time.time_ns()}", 2, 2)
        if job.popen.wait() != 0:
            print(job.log()[-3000:])
            return 1
    try:
        report = run_loop(kills=args.kills, bindings=bindings,
                          run_dir=lambda n: work / "out" / n, gin_file="gin/quickstart.gin",
                          reference=ref_dir / "checkpoints" / str(args.steps), work=work,
                          seed=args.seed, say=lambda s: print(s, flush=True))
    except CheckFailed as e:
        print(f"FAILED: {e}")
        return 1
    print(f"OK: {report.kills} kills ({report.by_mode}; {report.during_save} with a save in "
          f"flight), {report.restores_checked} restores checked (steps lost "
          f"{sorted(report.steps_lost)}), {report.episodes_finished} runs finished bit-equal "
          f"to the uninterrupted run, {report.steps_verified} committed steps restored; "
          f"{report.seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
