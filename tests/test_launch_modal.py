"""launch/modal_gpu.py: command construction, volume layout, the trainer runner (real
subprocesses, no Modal), and, when modal is installed, that the app builds offline."""

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "launch" / "modal_gpu.py"
HAS_MODAL = importlib.util.find_spec("modal") is not None
# Any Modal network call would go here and fail at once: "builds offline" means it never tries.
OFFLINE_ENV = {"MODAL_SERVER_URL": "http://127.0.0.1:9", "HOME": "/nonexistent-home"}


def _load():
    spec = importlib.util.spec_from_file_location("modal_gpu", MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mg = _load()


# ---- layout and command construction ----


def test_runs_live_on_the_volume_in_the_seed_layout():
    assert mg.VOLUME_NAME == "ping-llm"
    assert mg.VOLUME_MOUNT == "/mnt"
    assert mg.run_directory("lat1") == PurePosixPath("/mnt/outputs/latency_network/lat1")
    assert PurePosixPath(mg.BASE_OUTPUT_DIRECTORY).is_relative_to(mg.VOLUME_MOUNT)


def test_time_limit_leaves_room_below_the_function_timeout():
    assert mg.FUNCTION_TIMEOUT_S == 24 * 3600
    assert mg.TRAIN_TIME_LIMIT_S == 24 * 3600 - 600
    assert 0 < mg.TRAIN_TIME_LIMIT_S < mg.FUNCTION_TIMEOUT_S
    assert "--gin_bindings=TIME_LIMIT_SECONDS=85800" in mg.train_command("r")


def test_train_command_defaults():
    assert mg.train_command("lat1") == [
        "python",
        "-m",
        "pingllm.main",
        "--gin_file=gin/latency_network.gin",
        "--gin_bindings=TIME_LIMIT_SECONDS=85800",
        '--gin_bindings=BASE_OUTPUT_DIRECTORY="/mnt/outputs/latency_network"',
        '--gin_bindings=RUN_NAME="lat1"',
    ]


def test_train_command_with_everything():
    command = mg.train_command(
        "lat2",
        steps=1000,
        batch_size=64,
        gin_files=["gin/a.gin", "gin/b.gin"],
        gin_bindings=["LEARNING_RATE=3e-4", 'NOTE="x; y"'],
        time_limit_seconds=600,
        python="/usr/bin/python3",
    )
    assert command == [
        "/usr/bin/python3",
        "-m",
        "pingllm.main",
        "--gin_file=gin/a.gin",
        "--gin_file=gin/b.gin",
        "--gin_bindings=LEARNING_RATE=3e-4",
        '--gin_bindings=NOTE="x; y"',
        "--gin_bindings=STEPS=1000",
        "--gin_bindings=GLOBAL_BATCH_SIZE=64",
        "--gin_bindings=TIME_LIMIT_SECONDS=600",
        '--gin_bindings=BASE_OUTPUT_DIRECTORY="/mnt/outputs/latency_network"',
        '--gin_bindings=RUN_NAME="lat2"',
    ]


@pytest.mark.parametrize("bad", ["", "a/b", 'a"b', "a b", "..", "."])
def test_train_command_rejects_unsafe_run_names(bad):
    with pytest.raises(ValueError):
        mg.train_command(bad)


def test_inspect_command():
    base = ["python", "pingllm/cli/inspect_checkpoints.py", "/mnt/outputs/latency_network"]
    assert mg.inspect_command() == base
    assert mg.inspect_command("lat1") == [*base, "--run", "lat1"]
    assert mg.inspect_command("lat1", 500) == [*base, "--run", "lat1", "--step", "500"]
    with pytest.raises(ValueError):
        mg.inspect_command(None, 5)


def test_cli_string_splitting():
    assert mg.split_gin_files("gin/a.gin, gin/b.gin,") == ["gin/a.gin", "gin/b.gin"]
    assert mg.split_gin_bindings("") == []
    assert mg.split_gin_bindings("STEPS=10;LR=1e-3\nNOTE='a;b'; X=\"c;d\"") == [
        "STEPS=10",
        "LR=1e-3",
        "NOTE='a;b'",
        'X="c;d"',
    ]


def test_measured_runs_pin_the_gpu_type():
    assert mg.gpu_request("H100") == "H100"  # may become an H200: fine for a run not measured
    assert mg.gpu_request("H100", measured=True) == "H100!"
    assert mg.gpu_request("h100:2", measured=True) == "H100!:2"
    assert mg.gpu_request("H100!", measured=True) == "H100!"
    assert mg.gpu_request("A100-80GB:4", measured=True) == "A100-80GB:4"  # never swapped
    with pytest.raises(ValueError, match="name one type"):
        mg.gpu_request("B200+", measured=True)
    for bad in ("", ":2", "H100:x"):
        with pytest.raises(ValueError, match="TYPE:COUNT"):
            mg.gpu_request(bad)


def test_check_exit():
    mg.check_exit(0)
    with pytest.raises(mg.TrainerStopped):
        mg.check_exit(75)
    with pytest.raises(mg.TrainerFailed, match="status 1"):
        mg.check_exit(1)


# ---- the runner, with real processes ----


def test_run_trainer_commits_periodically_and_at_the_end(tmp_path):
    commits = []
    status = mg.run_trainer(
        [sys.executable, "-c", "import time, sys; time.sleep(1.0); sys.exit(75)"],
        cwd=str(tmp_path),
        commit=lambda: commits.append(time.monotonic()),
        commit_period_s=0.2,
    )
    assert status == 75
    assert len(commits) >= 3  # periodic ones, then the final one


def test_run_trainer_survives_a_failed_periodic_commit(tmp_path):
    calls = []

    def commit():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("volume busy")

    status = mg.run_trainer(
        [sys.executable, "-c", "import time; time.sleep(0.6)"],
        cwd=str(tmp_path),
        commit=commit,
        commit_period_s=0.2,
    )
    assert status == 0
    assert len(calls) >= 2


def test_run_trainer_reports_signal_deaths_like_a_shell(tmp_path):
    status = mg.run_trainer(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
        cwd=str(tmp_path),
        commit=lambda: None,
    )
    assert status == 128 + 9


TRAINER_WAITING_FOR_SIGNAL = textwrap.dedent(
    """
    import pathlib, signal, sys, time
    seen = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda n, f: seen.append(n))
    pathlib.Path("ready").write_text("")
    while not seen:
        time.sleep(0.02)
    time.sleep(0.3)  # a second, duplicated signal would arrive in this window
    pathlib.Path("seen").write_text(",".join(map(str, seen)))
    sys.exit(75)
    """
)


def _start_runner(tmp_path, setup=""):
    """A process that runs run_trainer on TRAINER_WAITING_FOR_SIGNAL, once that is ready."""
    runner = textwrap.dedent(
        f"""
        import importlib.util, pathlib, signal, sys
        spec = importlib.util.spec_from_file_location("modal_gpu", {str(MODULE)!r})
        mg = importlib.util.module_from_spec(spec)
        sys.modules["modal_gpu"] = mg
        spec.loader.exec_module(mg)
        {setup}
        commit = lambda: pathlib.Path("committed").write_text("yes")
        trainer = [sys.executable, "-c", {TRAINER_WAITING_FOR_SIGNAL!r}]
        sys.exit(mg.run_trainer(trainer, cwd=".", commit=commit))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", runner], cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_trainer_forwards_the_preemption_signal_once(tmp_path, signum):
    """Modal preempts with SIGINT: the trainer must see it (once), save, and exit 75."""
    proc = _start_runner(tmp_path)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 75
    assert (tmp_path / "seen").read_text() == str(int(signum))
    assert (tmp_path / "committed").read_text() == "yes"


def test_run_trainer_stops_the_trainer_when_the_call_is_cancelled(tmp_path):
    """Modal cancels a sync input by raising in the main thread (SIGUSR1 -> exception)."""

    setup = (
        "def cancel(*_): raise RuntimeError('input cancelled')\n"
        "signal.signal(signal.SIGUSR1, cancel)"
    )
    proc = _start_runner(tmp_path, setup=textwrap.indent(setup, " " * 8).lstrip())
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 1
    assert "input cancelled" in proc.stderr.read().decode()
    assert (tmp_path / "seen").read_text() == str(int(signal.SIGTERM))
    assert (tmp_path / "committed").read_text() == "yes"


# ---- import with and without modal ----


def test_pure_functions_import_without_modal():
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.modules["modal"] = None  # makes `import modal` raise ImportError
        spec = importlib.util.spec_from_file_location("modal_gpu", {str(MODULE)!r})
        mg = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mg)
        assert mg.modal is None and not hasattr(mg, "app")
        print(mg.train_command("x")[-1])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '--gin_bindings=RUN_NAME="x"'


@pytest.mark.skipif(not HAS_MODAL, reason="modal is not installed (pip install '.[modal]')")
def test_app_builds_offline():
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("modal_gpu", {str(MODULE)!r})
        mg = importlib.util.module_from_spec(spec)
        sys.modules["modal_gpu"] = mg
        spec.loader.exec_module(mg)
        import modal
        assert isinstance(mg.app, modal.App) and mg.app.name == "pingllm"
        assert isinstance(mg.volume, modal.Volume) and isinstance(mg.image, modal.Image)
        for fn in (mg.train_remote, mg.inspect_remote):
            assert isinstance(fn, modal.Function)
        assert isinstance(mg.train_remote.with_options(gpu="A100-80GB"), modal.Function)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **OFFLINE_ENV},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(not HAS_MODAL, reason="modal is not installed (pip install '.[modal]')")
@pytest.mark.parametrize(
    "entrypoint, options",
    [
        (
            "train",
            ["--run-name", "--steps", "--batch-size", "--gin-files", "--gin-bindings", "--gpu",
             "--measured"],
        ),
        ("inspect_checkpoints", ["--run-name"]),
        ("inspect_checkpoint", ["--run-name", "--step"]),
    ],
)
def test_modal_run_cli_offers_the_documented_options(entrypoint, options):
    modal_cli = Path(sys.executable).parent / "modal"
    out = subprocess.run(
        [str(modal_cli), "run", f"launch/modal_gpu.py::{entrypoint}", "--help"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **OFFLINE_ENV},
    )
    assert out.returncode == 0, out.stderr
    for option in options:
        assert option in out.stdout, option
