"""launch/local.py: real multi-process jobs of a JAX stand-in target (trainer jobs: test_resume)."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local.py"
PY = sys.executable


def _load_launcher():
    spec = importlib.util.spec_from_file_location("launch_local", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


local = _load_launcher()


def _launch(tmp_path, launcher_args, target_args, **popen_kwargs):
    command = [
        PY,
        str(LAUNCHER),
        "--log_dir",
        str(tmp_path / "logs"),
        "--quiet",
        *launcher_args,
        "--",
        *target_args,
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kwargs,
    )


def _target(tmp_path, *args):
    return ["--module", "tests.launch_target"], ["--out_dir", str(tmp_path), *args]


def _wait_for(paths, timeout_s, proc=None):
    """Waits until every path exists; fails early if `proc` (the launcher) ends first."""
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"launcher exited {proc.returncode} before {paths}:\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {paths}")
        time.sleep(0.1)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too; /proc says so on Linux.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


# ---- pure parts ----


def test_child_command_passes_coordinator_flags_then_trainer_args():
    command = local.child_command(
        python="py",
        module="pingllm.main",
        process_id=1,
        num_processes=2,
        port=4321,
        trainer_args=["--gin_file=gin/quickstart.gin", '--gin_bindings=RUN_NAME="a b"'],
    )
    assert command == [
        "py",
        "-m",
        "pingllm.main",
        "--coordinator_address=127.0.0.1:4321",
        "--num_processes=2",
        "--process_id=1",
        "--gin_file=gin/quickstart.gin",
        '--gin_bindings=RUN_NAME="a b"',
    ]


def test_child_env_replaces_device_count_and_forces_cpu():
    env = local.child_env(
        {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "HOME": "/h"}, 3
    )
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=3"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["HOME"] == "/h"
    assert local.child_env({}, 2)["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


@pytest.mark.parametrize(
    "statuses, expected",
    [
        ([0, 0], 0),
        ([75, 75], 75),
        ([75, 0], 75),
        ([3, 137], 3),
        ([137, 3], 137),
        ([75, 1], 1),
        ([0, 143], 143),
    ],
)
def test_job_status(statuses, expected):
    assert local.job_status(statuses) == expected


def test_exit_status_of_signal_death_is_128_plus_signal():
    assert local.exit_status(-9) == 137
    assert local.exit_status(-15) == 143
    assert local.exit_status(75) == 75


def test_free_port_can_be_bound():
    port = local.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_trainer_args_are_everything_after_double_dash():
    args = local.parse_args(["--num_processes", "3", "--", "--gin_file=x.gin", "--num_processes=9"])
    assert args.num_processes == 3
    assert args.trainer_args == ["--gin_file=x.gin", "--num_processes=9"]
    assert args.module == "pingllm.main"


# ---- real 2-process jobs with the stand-in target ----


@pytest.mark.slow
def test_two_processes_join_one_jax_job_and_psum(tmp_path):
    own, target = _target(tmp_path, "--mode", "psum")
    proc = _launch(tmp_path, ["--num_processes", "2", "--devices_per_process", "2", *own], target)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    seen = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
    for i, s in enumerate(seen):
        assert s["process_id"] == i
        assert s["process_count"] == 2
        assert s["device_count"] == 4
        assert s["local_device_count"] == 2
        assert s["platform"] == "cpu"
        assert s["psum"] == 1 + 2 + 3 + 4
    assert seen[0]["pid"] != seen[1]["pid"]
    for i in range(2):
        assert f"process {i}: " in (tmp_path / "logs" / f"process_{i}.log").read_text()
    assert "job exit status 0" in err


@pytest.mark.slow
def test_one_failure_stops_the_other_promptly(tmp_path):
    own, target = _target(tmp_path, "--mode", "fail", "--fail_process", "1", "--fail_status", "3")
    started = time.monotonic()
    proc = _launch(tmp_path, ["--num_processes", "2", "--grace_seconds", "2", *own], target)
    _, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, err
    survivor = json.loads((tmp_path / "process_0.json").read_text())
    assert not _alive(survivor["pid"])
    # JAX swallows SIGTERM once distributed is up, so the survivor needs the SIGKILL.
    assert "process 1 exited with 3" in err
    assert "process 0 exited with 137" in err
    # Without the launcher the survivor would wait ~90 s for the coordination heartbeat.
    assert elapsed < 40, elapsed


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_to_every_process(tmp_path, signum):
    own, target = _target(tmp_path, "--mode", "wait_for_signal")
    proc = _launch(tmp_path, ["--num_processes", "2", *own], target)
    _wait_for([tmp_path / "process_0.ready", tmp_path / "process_1.ready"], timeout_s=120)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    for i in range(2):
        assert (tmp_path / f"process_{i}.signal").read_text() == str(int(signum))


# The real trainer under this launcher (a 2-process job trained to the end, SIGTERM forwarded,
# exit 75, the same command resuming bit for bit, a rerun of the finished job a no-op) is
# tests/test_resume.py::test_two_process_job_sigterm_restart_equals_uninterrupted_bitwise.
