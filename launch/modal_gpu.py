"""Train pingllm on a Modal GPU.

    modal run launch/modal_gpu.py::train --run-name lat1 [--steps 200000] [--batch-size 256] \
        [--gin-files gin/latency_network.gin] [--gin-bindings 'LEARNING_RATE=3e-4;EVAL_STEPS=20'] \
        [--gpu H100] [--measured]
    modal run launch/modal_gpu.py::inspect_checkpoints [--run-name lat1]
    modal run launch/modal_gpu.py::inspect_checkpoint --run-name lat1 --step 5000

Runs live on the Modal volume `ping-llm` (env PINGLLM_MODAL_VOLUME) mounted at /mnt, in
/mnt/outputs/latency_network/<run_name>/. A container may run at most 24 h, so the trainer gets
TIME_LIMIT_SECONDS a little below that: it saves and exits 75, the function fails on purpose, and
Modal's retries start a fresh container whose trainer resumes from the latest checkpoint; a
preempted or crashed container resumes the same way. Re-running the same command resumes too.

A run meant to be measured (throughput, MFU, time to first step) passes --measured: the GPU type
is then pinned (`H100!`: Modal may otherwise hand an H100 request an H200, silently changing the
figures; `B200+`, which may be a B300, is refused).

The command-building functions are plain Python and need no Modal; the app is defined only when
`modal` is importable.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

try:
    import modal
except ImportError:  # The pure functions below work without Modal (tests, docs).
    modal = None

VOLUME_NAME = os.environ.get("PINGLLM_MODAL_VOLUME", "ping-llm")
VOLUME_MOUNT = "/mnt"
BASE_OUTPUT_DIRECTORY = "/mnt/outputs/latency_network"
REMOTE_REPO = "/root/pingllm"
DEFAULT_GIN_FILES = ("gin/latency_network.gin",)
DEFAULT_GPU = "H100"
FUNCTION_TIMEOUT_S = 24 * 60 * 60  # Modal's longest allowed function timeout.
# Room for the final checkpoint save and volume commit after the trainer's time limit.
TIME_LIMIT_MARGIN_S = 10 * 60
TRAIN_TIME_LIMIT_S = FUNCTION_TIMEOUT_S - TIME_LIMIT_MARGIN_S
# Each retry is another (up to) 24 h segment of the same run; 10 is Modal's maximum.
MAX_RETRIES = 10
COMMIT_PERIOD_S = 5 * 60
RESUMABLE_EXIT = 75
_RUN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# Not shipped in the image: local environments, outputs, caches.
IMAGE_IGNORE = [
    ".git",
    ".venv",
    "**/__pycache__",
    "**/*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "outputs",
    "logs",
    "tpu_logs",
    "build",
]


class TrainerStopped(RuntimeError):
    """The trainer saved a checkpoint and stopped early (exit 75): a retry resumes it."""


class TrainerFailed(RuntimeError):
    """The trainer exited with an error."""


# GPU types Modal may upgrade: the pinned spelling, or None where no pinned one exists.
_UPGRADABLE = {"H100": "H100!", "B200+": None}


def gpu_request(gpu: str, *, measured: bool = False) -> str:
    """Modal's gpu= string; a measured run pins the type (H100 -> H100!) so it cannot be swapped."""
    kind, sep, count = gpu.strip().partition(":")
    if not kind or (sep and not count.isdigit()):
        raise ValueError(f"GPU must be TYPE or TYPE:COUNT (e.g. H100, H100:2), got {gpu!r}")
    if not measured:
        return gpu.strip()
    upper = kind.upper()
    if upper in _UPGRADABLE:
        pinned = _UPGRADABLE[upper]
        if pinned is None:
            raise ValueError(f"{kind} may run on another GPU type: name one type for a "
                             "measured run (e.g. B200)")
        kind = pinned
    return f"{kind}{sep}{count}"


def run_directory(run_name: str) -> PurePosixPath:
    return PurePosixPath(BASE_OUTPUT_DIRECTORY) / run_name


def _check_run_name(run_name: str) -> None:
    if not _RUN_NAME.match(run_name) or set(run_name) == {"."}:
        raise ValueError(f"run name must be letters, digits, '.', '_' or '-', got {run_name!r}")


def split_gin_files(text: str) -> list[str]:
    """'a.gin,b.gin' -> ['a.gin', 'b.gin'] (the CLI takes one string)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def split_gin_bindings(text: str) -> list[str]:
    """Splits bindings separated by ';' or newlines, leaving separators inside quotes alone."""
    bindings, current, quote = [], [], None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in ";\n":
            bindings.append("".join(current))
            current = []
            continue
        current.append(char)
    bindings.append("".join(current))
    return [b.strip() for b in bindings if b.strip()]


def train_command(
    run_name: str,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    gin_files: Sequence[str] = DEFAULT_GIN_FILES,
    gin_bindings: Sequence[str] = (),
    time_limit_seconds: int = TRAIN_TIME_LIMIT_S,
    base_output_directory: str = BASE_OUTPUT_DIRECTORY,
    python: str = "python",
) -> list[str]:
    """The trainer's argv; the launcher's bindings come last, so they win over the user's."""
    _check_run_name(run_name)
    if not gin_files:
        raise ValueError("at least one gin file is needed")
    command = [python, "-m", "pingllm.main"]
    command += [f"--gin_file={f}" for f in gin_files]
    command += [f"--gin_bindings={b}" for b in gin_bindings]
    if steps is not None:
        command.append(f"--gin_bindings=STEPS={int(steps)}")
    if batch_size is not None:
        command.append(f"--gin_bindings=GLOBAL_BATCH_SIZE={int(batch_size)}")
    command += [
        f"--gin_bindings=TIME_LIMIT_SECONDS={int(time_limit_seconds)}",
        f'--gin_bindings=BASE_OUTPUT_DIRECTORY="{base_output_directory}"',
        f'--gin_bindings=RUN_NAME="{run_name}"',
    ]
    return command


def inspect_command(
    run_name: str | None = None,
    step: int | None = None,
    *,
    base_output_directory: str = BASE_OUTPUT_DIRECTORY,
    python: str = "python",
) -> list[str]:
    """argv of pingllm/cli/inspect_checkpoints.py for all runs, one run, or one step of one run."""
    command = [python, "pingllm/cli/inspect_checkpoints.py", base_output_directory]
    if run_name:
        _check_run_name(run_name)
        command += ["--run", run_name]
    if step is not None:
        if not run_name:
            raise ValueError("a step needs a run name")
        command += ["--step", str(int(step))]
    return command


def check_exit(status: int) -> None:
    """Raises unless the trainer finished; raising is what makes Modal retry (and resume)."""
    if status == RESUMABLE_EXIT:
        raise TrainerStopped(
            "trainer saved a checkpoint and stopped early (exit 75); the retry resumes it"
        )
    if status != 0:
        raise TrainerFailed(f"trainer exited with status {status}")


def run_trainer(
    command: Sequence[str],
    *,
    cwd: str,
    commit: Callable[[], None],
    commit_period_s: float = COMMIT_PERIOD_S,
    stop_grace_s: float = TIME_LIMIT_MARGIN_S / 2,
    env: dict[str, str] | None = None,
) -> int:
    """Runs the trainer, commits the volume every `commit_period_s` and at the end, forwards
    SIGINT/SIGTERM (Modal's preemption notice is SIGINT) once, stops it (SIGTERM, then SIGKILL
    after `stop_grace_s`) if this call is interrupted; returns its exit status."""
    # Own session: a signal sent to our process group is forwarded exactly once, by us.
    child = subprocess.Popen(list(command), cwd=cwd, env=env, start_new_session=True)
    previous = {}

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, forward)
    done = threading.Event()

    def commit_periodically():
        while not done.wait(commit_period_s):
            try:
                commit()
            except Exception as e:  # noqa: BLE001 - a failed mid-run commit must not stop training
                print(f"[modal_gpu] periodic volume commit failed: {e}", file=sys.stderr)

    committer = threading.Thread(target=commit_periodically, daemon=True)
    committer.start()
    try:
        returncode = child.wait()
    except BaseException:
        # Modal cancels an input by raising in this thread: let the trainer save, then go.
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=stop_grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        raise
    finally:
        done.set()
        committer.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        commit()
    return 128 - returncode if returncode < 0 else returncode


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


if modal is not None:
    app = modal.App("pingllm")
    # Dependencies first (cached across code edits), then the code and its editable install.
    image = (
        modal.Image.debian_slim(python_version="3.11")
        .pip_install_from_pyproject(
            str(_repo_root() / "pyproject.toml"), optional_dependencies=["cuda"]
        )
        .add_local_dir(_repo_root(), REMOTE_REPO, copy=True, ignore=IMAGE_IGNORE)
        .run_commands(f"python -m pip install --no-deps -e {REMOTE_REPO}")
        .env({"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"})
    )
    volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)

    @app.function(
        image=image,
        gpu=DEFAULT_GPU,
        volumes={VOLUME_MOUNT: volume},
        timeout=FUNCTION_TIMEOUT_S,
        retries=modal.Retries(max_retries=MAX_RETRIES, backoff_coefficient=1.0, initial_delay=10.0),
    )
    def train_remote(
        run_name: str,
        steps: int | None,
        batch_size: int | None,
        gin_files: list[str],
        gin_bindings: list[str],
    ) -> str:
        """One container's segment of a run: resume, train until done or time limit, save."""
        command = train_command(
            run_name,
            steps=steps,
            batch_size=batch_size,
            gin_files=gin_files,
            gin_bindings=gin_bindings,
            python=sys.executable,
        )
        print("[modal_gpu] " + " ".join(command), flush=True)
        status = run_trainer(command, cwd=REMOTE_REPO, commit=volume.commit)
        check_exit(status)
        return f"run {run_name} complete in {run_directory(run_name)}"

    @app.function(image=image, volumes={VOLUME_MOUNT: volume}, timeout=30 * 60)
    def inspect_remote(run_name: str | None, step: int | None) -> str:
        volume.reload()  # See what running trainers committed since this container started.
        result = subprocess.run(
            inspect_command(run_name, step, python=sys.executable),
            cwd=REMOTE_REPO,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
            check=False,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"inspect_checkpoints failed:\n{result.stderr}")
        return result.stdout

    @app.local_entrypoint()
    def train(
        run_name: str,
        steps: int | None = None,
        batch_size: int | None = None,
        gin_files: str = ",".join(DEFAULT_GIN_FILES),
        gin_bindings: str = "",
        gpu: str = DEFAULT_GPU,
        measured: bool = False,
    ):
        """Train (or resume) RUN_NAME on a GPU chosen here, e.g. --gpu A100-80GB or H100:2;
        --measured pins the GPU type (H100!) so the figures come from the GPU asked for."""
        request = gpu_request(gpu, measured=measured)
        print(f"[modal_gpu] gpu={request}", flush=True)
        print(
            train_remote.with_options(gpu=request).remote(
                run_name,
                steps,
                batch_size,
                split_gin_files(gin_files),
                split_gin_bindings(gin_bindings),
            )
        )

    @app.local_entrypoint()
    def inspect_checkpoints(run_name: str = ""):
        """Checkpoints of every run, or of one run."""
        print(inspect_remote.remote(run_name or None, None))

    @app.local_entrypoint()
    def inspect_checkpoint(run_name: str, step: int):
        """One checkpoint of one run."""
        print(inspect_remote.remote(run_name, step))
