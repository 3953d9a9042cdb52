"""launch/tpu_vm.sh: the gcloud commands it runs (a recording fake gcloud first on PATH), and its
worker-side half (worker-run/-stop/-status) run for real on this machine."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "tpu_vm.sh"
LOC = ["--zone=us-central2-b", "--project=my-proj"]
SSH_ALL = ["compute", "tpus", "tpu-vm", "ssh", "tp", *LOC, "--worker=all", "--quiet"]

FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
for arg in sys.argv[1:]:  # keep local files it is asked to copy (they are temporary)
    if os.path.isfile(arg) and os.environ.get("FAKE_GCLOUD_KEEP"):
        shutil.copy(arg, os.environ["FAKE_GCLOUD_KEEP"])
if os.environ.get("FAKE_GCLOUD_OUTPUT"):
    print(os.environ["FAKE_GCLOUD_OUTPUT"])
"""


class Tpu:
    """Runs tpu_vm.sh with a fake gcloud and reads back what gcloud was asked to do."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
        gcloud.chmod(0o755)
        self.log = tmp_path / "gcloud_calls.jsonl"
        self.keep = tmp_path / "kept"
        self.keep.mkdir()
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp_path / "home"),
            "STATE_DIR": str(tmp_path / "state"),
            "FAKE_GCLOUD_LOG": str(self.log),
            "FAKE_GCLOUD_KEEP": str(self.keep),
            "TPU_NAME": "tp",
            "ZONE": "us-central2-b",
            "PROJECT": "my-proj",
        }

    def run(self, *args, expect=0, **env):
        proc = subprocess.run(
            ["bash", str(SCRIPT), *args],
            env={**self.env, **env},
            cwd=self.tmp,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == expect, proc.stderr
        return proc

    def calls(self):
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return calls


@pytest.fixture
def tpu(tmp_path):
    return Tpu(tmp_path)


def remote_argv(call):
    """The --command of a recorded `gcloud ... ssh` call, split as a POSIX shell would."""
    (command,) = [a for a in call if a.startswith("--command=")]
    return shlex.split(command.removeprefix("--command="))


BINDING_WITH_QUOTES = """NOTE="a b'c" """.strip()
EXPECTED_TRAINER = [
    ".venv/bin/python",
    "-m",
    "pingllm.main",
    "--gin_file=gin/a.gin",
    "--gin_file=gin/b b.gin",
    "--gin_bindings=STEPS=10",
    f"--gin_bindings={BINDING_WITH_QUOTES}",
    "--gin_bindings=LIST=[1, 2]",
    '--gin_bindings=BASE_OUTPUT_DIRECTORY="gs://bk/outputs/latency_network"',
    '--gin_bindings=RUN_NAME="r1"',
    "--extra=x y",
]
TRAIN_ARGS = [
    "train",
    "--run-name",
    "r1",
    "--bucket",
    "bk",
    "--gin_file",
    "gin/a.gin",
    "--gin_file=gin/b b.gin",
    "--gin_bindings",
    "STEPS=10",
    f"--gin_bindings={BINDING_WITH_QUOTES}",
    "--gin_bindings",
    "LIST=[1, 2]",
    "--",
    "--extra=x y",
]


# ---- create / delete ----


def test_create_tpu_vm_with_flags_and_environment(tpu):
    tpu.run("create", "--accelerator-type", "v4-32", "--spot", RUNTIME_VERSION="v2-alpha-tpuv5")
    assert tpu.calls() == [
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "tp",
            *LOC,
            "--accelerator-type=v4-32",
            "--version=v2-alpha-tpuv5",
            "--spot",
        ]
    ]
    tpu.run("create", "--preemptible", "--zone=europe-west4-a", ACCELERATOR_TYPE="v5litepod-16")
    assert tpu.calls() == [
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "tp",
            "--zone=europe-west4-a",
            "--project=my-proj",
            "--accelerator-type=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite",
            "--preemptible",
        ]
    ]


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v6e-64", "v2-alpha-tpuv6e")])
def test_runtime_version_follows_the_accelerator_type(tpu, accelerator, runtime):
    tpu.run("create", "--accelerator-type", accelerator)
    (call,) = tpu.calls()
    assert call[-2:] == [f"--accelerator-type={accelerator}", f"--version={runtime}"]
    tpu.run("create", "--queued", f"--accelerator-type={accelerator}")
    (call,) = tpu.calls()
    assert call[-1] == f"--runtime-version={runtime}"
    # An explicit version still wins (flag or environment).
    tpu.run("create", "--accelerator-type", accelerator, "--runtime-version", "my-image")
    assert tpu.calls()[0][-1] == "--version=my-image"
    tpu.run("create", "--accelerator-type", accelerator, RUNTIME_VERSION="env-image")
    assert tpu.calls()[0][-1] == "--version=env-image"


def test_unknown_accelerator_needs_an_explicit_runtime_version(tpu):
    proc = tpu.run("create", "--accelerator-type", "v9x-8", expect=2)
    assert "give --runtime-version" in proc.stderr and tpu.calls() == []
    tpu.run("create", "--accelerator-type", "v9x-8", "--runtime-version", "v9-image")
    assert tpu.calls()[0][-1] == "--version=v9-image"


def test_create_without_project_lets_gcloud_pick_its_default(tpu):
    tpu.run("create", PROJECT="")
    assert tpu.calls() == [
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "tp",
            "--zone=us-central2-b",
            "--accelerator-type=v4-8",
            "--version=tpu-ubuntu2204-base",
        ]
    ]


def test_create_queued_resource(tpu):
    tpu.run(
        "create",
        "--queued",
        "--spot",
        "--accelerator-type=v6e-8",
        "--runtime-version=v2-alpha-tpuv6e",
    )
    assert tpu.calls() == [
        [
            "compute",
            "tpus",
            "queued-resources",
            "create",
            "tp",
            *LOC,
            "--node-id=tp",
            "--accelerator-type=v6e-8",
            "--runtime-version=v2-alpha-tpuv6e",
            "--spot",
        ]
    ]
    tpu.run("create", "--queued", "--preemptible", expect=2)
    assert tpu.calls() == []


def test_missing_settings_fail_before_any_gcloud_call(tpu):
    proc = tpu.run("create", expect=2, TPU_NAME="")
    assert "TPU_NAME is not set" in proc.stderr
    proc = tpu.run("train", "--bucket", "bk", expect=2)
    assert "RUN_NAME is not set" in proc.stderr
    proc = tpu.run("train", "--run-name", "r", "--output-dir", "/tmp/out", expect=2)
    assert "gs://" in proc.stderr
    for bad in ["a/b", "..", 'a"b']:
        tpu.run("train", "--run-name", bad, "--bucket", "bk", expect=2)
    tpu.run("frobnicate", expect=2)
    tpu.run("create", "--no-such-flag", expect=2)
    assert tpu.calls() == []


def test_delete(tpu):
    tpu.run("delete")
    tpu.run("delete", QUEUED="1")
    assert tpu.calls() == [
        ["compute", "tpus", "tpu-vm", "delete", "tp", *LOC, "--quiet"],
        ["compute", "tpus", "queued-resources", "delete", "tp", *LOC, "--force", "--quiet"],
    ]


# ---- setup ----


def test_setup_copies_the_checkout_and_installs_the_tpu_extra(tpu):
    tpu.run("setup")
    scp, ssh = tpu.calls()
    tarball = scp[4]
    assert scp == [
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        tarball,
        "tp:pingllm-src.tgz",
        *LOC,
        "--worker=all",
        "--quiet",
    ]
    assert not Path(tarball).exists()  # the local temporary is cleaned up
    with tarfile.open(tpu.keep / "pingllm-src.tgz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "launch/tpu_vm.sh", "pingllm/__init__.py"} <= names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)
    assert ssh[:-1] == SSH_ALL
    remote = remote_argv(ssh)
    assert _contains(remote, ["tar", "-xzf", "pingllm-src.tgz", "-C", "pingllm"])
    assert _contains(remote, ["uv", "venv", "--python", "3.11", ".venv;"])
    assert _contains(
        remote, ["uv", "pip", "install", "--python", ".venv/bin/python", "-e", ".[tpu]"]
    )


def test_setup_can_git_clone_instead(tpu):
    tpu.run(
        "setup",
        "--repo-url",
        "https://example.com/p.git",
        "--repo-ref",
        "v1",
        "--remote-dir",
        "code",
    )
    (ssh,) = tpu.calls()
    remote = remote_argv(ssh)
    assert _contains(remote, ["git", "clone", "--quiet", "https://example.com/p.git", "code"])
    assert _contains(remote, ["git", "-C", "code", "checkout", "--quiet", "v1;"])
    assert _contains(remote, ["cd", "code", "&&"])


def _contains(seq, sub):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


# ---- train / resume ----


def test_train_runs_the_exact_trainer_command_on_every_worker(tpu):
    tpu.run(*TRAIN_ARGS)
    (ssh,) = tpu.calls()
    assert ssh[:-1] == SSH_ALL
    assert remote_argv(ssh) == [
        "cd",
        "pingllm",
        "&&",
        "bash",
        "launch/tpu_vm.sh",
        "worker-run",
        "r1",
        "--",
        *EXPECTED_TRAINER,
    ]


def test_train_command_survives_a_real_shell_on_the_worker(tpu, tmp_path):
    """Runs the --command with bash in a fake worker home: the trainer gets the exact argv."""
    tpu.run("train", "--env", "SOME_FLAG=a b", *TRAIN_ARGS[1:])
    (ssh,) = tpu.calls()
    (command,) = [a.removeprefix("--command=") for a in ssh if a.startswith("--command=")]
    home = tmp_path / "worker_home"
    checkout = home / "pingllm"
    (checkout / "launch").mkdir(parents=True)
    shutil.copy(SCRIPT, checkout / "launch" / "tpu_vm.sh")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    stub = checkout / ".venv" / "bin" / "python"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'flag': os.environ.get('SOME_FLAG')}))\n"
        "sys.exit(75)\n"
    )
    stub.chmod(0o755)
    proc = subprocess.run(
        ["bash", "-c", command],
        cwd=home,
        env={**os.environ, "WORKER_ID": "3"},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 75, proc.stderr
    log = (checkout / "logs" / "r1" / "worker-3.log").read_text()
    (line,) = [ln for ln in log.splitlines() if ln.startswith("{")]
    assert json.loads(line) == {"argv": EXPECTED_TRAINER[1:], "flag": "a b"}
    assert f"[worker 3] {line}" in proc.stdout  # streamed back through the ssh session
    assert (checkout / "logs" / "r1" / "worker-3.status").read_text() == "75\n"


def test_train_detached_returns_at_once(tpu):
    tpu.run("train", "--run-name", "r1", "--output-dir", "gs://b/o", "--detach")
    (ssh,) = tpu.calls()
    remote = remote_argv(ssh)
    assert remote[:9] == [
        "cd",
        "pingllm",
        "&&",
        "nohup",
        "setsid",
        "bash",
        "launch/tpu_vm.sh",
        "worker-run",
        "--no-follow",
    ]
    assert remote[-4:] == [">/dev/null", "2>&1", "</dev/null", "&"]
    assert "--gin_file=gin/latency_network.gin" in remote
    assert '--gin_bindings=BASE_OUTPUT_DIRECTORY="gs://b/o"' in remote


def test_resume_repeats_the_saved_train_arguments(tpu):
    tpu.run(*TRAIN_ARGS)
    (train_call,) = tpu.calls()
    tpu.run("resume", "--run-name", "r1", "--bucket", "bk")
    assert tpu.calls() == [train_call]
    proc = tpu.run("resume", "--run-name", "other", "--bucket", "bk", expect=2)
    assert "no saved arguments" in proc.stderr


def test_resume_recreate_rebuilds_the_vm_then_trains(tpu):
    tpu.run(*TRAIN_ARGS)
    (train_call,) = tpu.calls()
    tpu.run("resume", "--run-name", "r1", "--bucket", "bk", "--recreate", "--spot")
    delete, create, scp, setup, train = tpu.calls()
    assert delete == ["compute", "tpus", "tpu-vm", "delete", "tp", *LOC, "--quiet"]
    assert create[:4] == ["compute", "tpus", "tpu-vm", "create"] and "--spot" in create
    assert scp[3] == "scp" and "setup" not in scp
    assert _contains(remote_argv(setup), ["uv", "pip", "install"])
    assert train == train_call


def test_resume_recreate_queued_waits_until_active(tpu):
    tpu.run(*TRAIN_ARGS)
    tpu.calls()
    tpu.run(
        "resume",
        "--run-name",
        "r1",
        "--bucket",
        "bk",
        "--recreate",
        "--queued",
        FAKE_GCLOUD_OUTPUT="ACTIVE",
    )
    calls = tpu.calls()
    assert [c[:4] for c in calls[:3]] == [
        ["compute", "tpus", "queued-resources", "delete"],
        ["compute", "tpus", "queued-resources", "create"],
        ["compute", "tpus", "queued-resources", "describe"],
    ]
    assert calls[2] == [
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        "tp",
        *LOC,
        "--format=value(state.state)",
    ]


# ---- stop / status / logs / ssh ----


def test_stop_status_logs_ssh(tpu):
    tpu.run("stop", "--run-name", "r1")
    tpu.run("status")
    tpu.run("status", "--queued", "--run-name", "r1")
    tpu.run("logs", "--run-name", "r1")
    tpu.run("logs", "--run-name", "r1", "--tail", "20")
    tpu.run("ssh")
    tpu.run("ssh", "--worker", "all", "--", "ls", "/tmp/a b")
    calls = tpu.calls()
    assert calls[0][:-1] == SSH_ALL
    assert remote_argv(calls[0]) == [
        "cd",
        "pingllm",
        "&&",
        "bash",
        "launch/tpu_vm.sh",
        "worker-stop",
        "r1",
    ]
    assert calls[1] == ["compute", "tpus", "tpu-vm", "describe", "tp", *LOC]
    assert calls[2] == ["compute", "tpus", "queued-resources", "describe", "tp", *LOC]
    assert calls[3] == ["compute", "tpus", "tpu-vm", "describe", "tp", *LOC]
    assert remote_argv(calls[4])[-2:] == ["worker-status", "r1"]
    assert calls[5] == [
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        "--recurse",
        "tp:pingllm/logs/r1",
        "tpu_logs/tp",
        *LOC,
        "--worker=all",
        "--quiet",
    ]
    assert (tpu.tmp / "tpu_logs" / "tp").is_dir()
    assert remote_argv(calls[6]) == ["tail", "-n", "20", "pingllm/logs/r1/worker-*.log"]
    assert calls[7] == ["compute", "tpus", "tpu-vm", "ssh", "tp", *LOC, "--worker=0"]
    assert calls[8][:-1] == ["compute", "tpus", "tpu-vm", "ssh", "tp", *LOC, "--worker=all"]
    assert remote_argv(calls[8]) == ["ls", "/tmp/a b"]


# ---- DRY_RUN ----


@pytest.mark.parametrize(
    "args",
    [
        ["create", "--queued", "--spot"],
        TRAIN_ARGS,
        ["logs", "--run-name", "r1"],
        ["delete"],
    ],
)
def test_dry_run_prints_the_commands_instead(tpu, args):
    real = tpu.run(*args)
    expected = [["gcloud", *c] for c in tpu.calls()]
    dry = tpu.run(*args, DRY_RUN="1")
    assert tpu.calls() == []
    assert [shlex.split(line) for line in dry.stdout.splitlines()] == expected
    assert real.stdout == ""


def test_dry_run_flag_and_setup(tpu):
    dry = tpu.run("setup", "--dry-run")
    assert tpu.calls() == []
    scp, ssh = [shlex.split(line) for line in dry.stdout.splitlines()]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert ssh[:10] == ["gcloud", *SSH_ALL]


# ---- worker side, for real ----


# bash cannot trap a signal that was ignored when it started, as SIGINT and SIGHUP are when
# pytest itself runs under nohup or as a background job: the worker starts through an exec that
# gives it the dispositions an ssh session has (no preexec_fn: forking a JAX process is unsafe).
_DEFAULT_SIGNALS_EXEC = (
    "import os, signal, sys\n"
    "for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):\n"
    "    signal.signal(s, signal.SIG_DFL)\n"
    "os.execvp('bash', ['bash', *sys.argv[1:]])\n"
)


def _worker(tmp_path, *args, worker_id="1"):
    return subprocess.Popen(
        [sys.executable, "-c", _DEFAULT_SIGNALS_EXEC, str(SCRIPT), *args],
        cwd=tmp_path,
        env={**os.environ, "WORKER_ID": worker_id},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


SLEEPER = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda s, f: (print('saved', flush=True), sys.exit(75)))\n"
    "print('training', flush=True)\n"
    "time.sleep(60)\n"
    "sys.exit(9)\n"
)


def _wait_for_text(path, text, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.05)


def test_worker_run_keeps_log_pid_and_status(tmp_path):
    proc = _worker(
        tmp_path,
        "worker-run",
        "r",
        "--",
        sys.executable,
        "-c",
        "import sys; print('hello'); sys.exit(4)",
        worker_id="5",
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    log = (tmp_path / "logs" / "r" / "worker-5.log").read_text()
    assert "hello\n" in log
    assert "worker 5: exit status 4" in log
    assert "[worker 5] hello" in out
    assert (tmp_path / "logs" / "r" / "worker-5.status").read_text() == "4\n"
    assert not (tmp_path / "logs" / "r" / "worker-5.pid").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_worker_run_turns_signals_into_one_sigterm_for_the_trainer(tmp_path, signum):
    proc = _worker(tmp_path, "worker-run", "r", "--", sys.executable, "-c", SLEEPER)
    log = tmp_path / "logs" / "r" / "worker-1.log"
    _wait_for_text(log, "\ntraining\n")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert "saved" in log.read_text()
    assert "checkpoint saved" in log.read_text()


def test_worker_stop_status_and_no_second_run(tmp_path):
    proc = _worker(tmp_path, "worker-run", "--no-follow", "r", "--", sys.executable, "-c", SLEEPER)
    log = tmp_path / "logs" / "r" / "worker-1.log"
    _wait_for_text(log, "\ntraining\n")
    status = _worker(tmp_path, "worker-status", "r").communicate(timeout=30)[0]
    pid = (tmp_path / "logs" / "r" / "worker-1.pid").read_text().strip()
    assert status.splitlines()[0] == f"worker 1: running (pid {pid})"
    second = _worker(tmp_path, "worker-run", "r", "--", "true")
    _, err = second.communicate(timeout=30)
    assert second.returncode == 2 and "already running" in err
    stop = _worker(tmp_path, "worker-stop", "r").communicate(timeout=30)[0]
    assert stop.strip() == f"worker 1: sent SIGTERM to pid {pid}"
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75
    assert out == ""  # --no-follow: nothing streamed
    status = _worker(tmp_path, "worker-status", "r").communicate(timeout=30)[0]
    assert status.splitlines()[0] == "worker 1: exited with status 75"
    assert _worker(tmp_path, "worker-stop", "r").communicate(timeout=30)[0].strip() == (
        "worker 1: run r is not running"
    )


# ---- lint ----


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_help_documents_every_environment_setting():
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--help"], check=False, capture_output=True, text=True
    )
    assert proc.returncode == 0
    for name in [
        "TPU_NAME",
        "ZONE",
        "PROJECT",
        "ACCELERATOR_TYPE",
        "RUNTIME_VERSION",
        "SPOT",
        "QUEUED",
        "RUN_NAME",
        "BASE_OUTPUT_DIRECTORY",
        "BUCKET",
        "DRY_RUN",
    ]:
        assert f"[{name}" in proc.stdout, name
