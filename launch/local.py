"""Run an N-process JAX job on this machine: `python -m pingllm.main` once per process.

    python launch/local.py --num_processes 2 --devices_per_process 2 -- \
        --gin_file=gin/quickstart.gin --gin_bindings='RUN_NAME="local2"'

Each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i`,
`JAX_PLATFORMS=cpu` and K fake CPU devices, and writes its own log file. The job lives and
dies together: SIGTERM/SIGINT are forwarded to every process, and when one process fails the
others are stopped (SIGTERM, then SIGKILL after a grace period), because JAX peers of a dead
process otherwise hang until the coordination heartbeat times out (~90 s).

Exit status: 0 when every process exits 0; 75 (the trainer's "stopped after saving, rerun to
resume") when every process exits 0 or 75; otherwise the first other failure (a process killed
by signal S counts as 128 + S).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

RESUMABLE_EXIT = 75
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_command(
    *,
    python: str,
    module: str,
    process_id: int,
    num_processes: int,
    port: int,
    trainer_args: list[str],
) -> list[str]:
    return [
        python,
        "-m",
        module,
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={process_id}",
        *trainer_args,
    ]


def child_env(base_env: dict[str, str], devices_per_process: int) -> dict[str, str]:
    """`base_env` with CPU-only JAX and exactly `devices_per_process` host devices."""
    env = dict(base_env)
    # Drop any inherited device count (pytest's conftest sets 8) so ours is the only one.
    xla_flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*xla_flags, f"{DEVICE_COUNT_FLAG}={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell exit status (killed by signal S -> 128 + S)."""
    return 128 - returncode if returncode < 0 else returncode


def job_status(statuses_in_exit_order: list[int]) -> int:
    """The job's exit status from its processes' exit statuses, in the order they exited."""
    for status in statuses_in_exit_order:
        if status not in (0, RESUMABLE_EXIT):
            return status
    return RESUMABLE_EXIT if RESUMABLE_EXIT in statuses_in_exit_order else 0


@dataclasses.dataclass
class Child:
    process_id: int
    popen: subprocess.Popen
    log_path: Path
    log_start: int  # bytes already in the log before this run (logs append across resumes)
    status: int | None = None


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child if the launcher dies (SIGTERM: the trainer saves)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Job:
    """N child processes that are started, signalled and stopped together."""

    def __init__(self, commands: list[list[str]], env: dict[str, str], log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.exit_order: list[int] = []
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        for process_id, command in enumerate(commands):
            log_path = log_dir / f"process_{process_id}.log"
            log_start = log_path.stat().st_size if log_path.exists() else 0
            with open(log_path, "ab") as log:
                popen = subprocess.Popen(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Own session: a terminal Ctrl-C reaches only the launcher, which forwards it
                    # exactly once.
                    start_new_session=True,
                    preexec_fn=preexec,  # noqa: PLW1509 - no threads yet: the echo starts later
                )
            self.children.append(Child(process_id, popen, log_path, log_start))

    def running(self) -> list[Child]:
        return [c for c in self.children if c.status is None]

    def poll(self) -> None:
        for child in self.running():
            returncode = child.popen.poll()
            if returncode is not None:
                child.status = exit_status(returncode)
                self.exit_order.append(child.status)
                print(
                    f"[launch] process {child.process_id} exited with {child.status}",
                    file=sys.stderr,
                    flush=True,
                )

    def send(self, signum: int) -> None:
        for child in self.running():
            try:
                child.popen.send_signal(signum)
            except ProcessLookupError:
                pass

    def wait_all(self, timeout_s: float) -> bool:
        """Polls until every child has exited or `timeout_s` passed; True if all exited."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            if not self.running():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop(self, grace_s: float) -> None:
        """SIGTERM the children still running, then SIGKILL whatever outlives `grace_s`."""
        self.send(signal.SIGTERM)
        if not self.wait_all(grace_s):
            self.send(signal.SIGKILL)
            self.wait_all(float("inf"))


def _follow(path: Path, start: int, stop: threading.Event) -> None:
    """Copies a growing log file to stdout until `stop` is set and the file is drained."""
    with open(path, "rb") as log:
        log.seek(start)
        while True:
            chunk = log.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            elif stop.is_set():
                return
            else:
                time.sleep(0.1)


def run_job(
    job: Job,
    *,
    grace_s: float,
    exit_grace_s: float,
    signals: list[int],
) -> int:
    """Supervises `job` to the end; `signals` is filled by the signal handler as they arrive."""
    handled_signals = 0
    first_exit_at: float | None = None
    while job.running():
        job.poll()
        if len(signals) > handled_signals:
            if handled_signals == 0:
                job.send(signals[0])
            else:  # A second Ctrl-C means "now": no more waiting for checkpoints.
                job.send(signal.SIGKILL)
            handled_signals = len(signals)
        failed = [s for s in job.exit_order if s not in (0, RESUMABLE_EXIT)]
        if failed:
            job.stop(grace_s)
            break
        if job.exit_order and first_exit_at is None:
            first_exit_at = time.monotonic()
        # A peer that finished or saved-and-stopped: the others should follow within moments
        # (they agree on the step); if they don't, they are stuck in a collective.
        if first_exit_at is not None and time.monotonic() - first_exit_at > exit_grace_s:
            job.stop(grace_s)
            break
        time.sleep(0.05)
    job.poll()
    return job_status(job.exit_order)


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        split = argv.index("--")
        own, trainer_args = argv[:split], argv[split + 1 :]
    else:
        own, trainer_args = argv, []
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--log_dir", type=Path, default=Path("logs/local"))
    parser.add_argument("--module", default="pingllm.main", help="python -m MODULE per process")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--grace_seconds",
        type=float,
        default=30.0,
        help="after SIGTERM to the survivors of a failure, wait this long before SIGKILL",
    )
    parser.add_argument(
        "--exit_grace_seconds",
        type=float,
        default=300.0,
        help="after one process exits 0/75, how long the others may take to follow",
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo process 0's log")
    args = parser.parse_args(own)
    args.trainer_args = trainer_args
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    port = args.port or free_port()
    commands = [
        child_command(
            python=args.python,
            module=args.module,
            process_id=i,
            num_processes=args.num_processes,
            port=port,
            trainer_args=args.trainer_args,
        )
        for i in range(args.num_processes)
    ]
    signals: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _frame: signals.append(s))
    print(
        f"[launch] {args.num_processes} processes x {args.devices_per_process} CPU devices, "
        f"coordinator 127.0.0.1:{port}, logs in {args.log_dir}/process_<i>.log",
        file=sys.stderr,
        flush=True,
    )
    job = Job(commands, child_env(dict(os.environ), args.devices_per_process), args.log_dir)
    stop_echo = threading.Event()
    echo = None
    if not args.quiet:
        echo = threading.Thread(
            target=_follow, args=(job.children[0].log_path, job.children[0].log_start, stop_echo)
        )
        echo.start()
    try:
        status = run_job(
            job, grace_s=args.grace_seconds, exit_grace_s=args.exit_grace_seconds, signals=signals
        )
    finally:
        job.stop(args.grace_seconds)
        stop_echo.set()
        if echo is not None:
            echo.join()
    print(f"[launch] job exit status {status}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
