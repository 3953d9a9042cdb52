"""Stop requests: real signals to real (1- and 2-process) jobs that save, agree and exit 75."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_checkpointing import WORKER, free_port

from pingllm import preemption
from pingllm.checkpoint import manager as ck

EXIT = preemption.EXIT_STOPPED_AFTER_SAVE


def start_job(n_proc, run_dir, out, *args):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    logs = [Path(out) / f"log_{i}.txt" for i in range(n_proc)]
    Path(out).mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), "train", "--run_dir", str(run_dir), "--out", str(out),
         "--num_processes", str(n_proc), "--process_id", str(i), "--port", str(port),
         "--devices", "2", *map(str, args)],
        env=env, stdout=logs[i].open("w"), stderr=subprocess.STDOUT)
        for i in range(n_proc)]
    return procs, logs


def wait_for_line(log: Path, line: str, procs, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if line in log.read_text().splitlines():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    raise AssertionError(f"{line!r} not seen in {log}:\n{log.read_text()[-3000:]}")


def finish(procs, logs, timeout=90):
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # the whole job stops together
            if p.poll() is None:
                p.kill()
    return codes, "\n".join(log.read_text()[-2000:] for log in logs)


def results(out, n):
    return [json.loads((Path(out) / f"result_{i}.json").read_text()) for i in range(n)]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_both_save_same_step_and_exit_75(tmp_path):
    run = tmp_path / "run"
    procs, logs = start_job(2, run, tmp_path / "o1", "--period", 1000)
    wait_for_line(logs[1], "STEP 5", procs)
    procs[1].send_signal(signal.SIGTERM)
    codes, text = finish(procs, logs)
    assert codes == [EXIT, EXIT], text
    r = results(tmp_path / "o1", 2)
    assert r[0]["stopped_at"] == r[1]["stopped_at"] >= 5
    assert {x["reason"] for x in r} == {"SIGTERM"}
    step = r[0]["stopped_at"]
    assert [(i.step, i.status) for i in ck.list_steps(run / "checkpoints")] == [(step,
                                                                                  "complete")]
    # The same command resumes from that step on both processes.
    procs, logs = start_job(2, run, tmp_path / "o2", "--period", 1000, "--total_steps", step + 2)
    codes, text = finish(procs, logs)
    assert codes == [0, 0], text
    assert [x["restored_step"] for x in results(tmp_path / "o2", 2)] == [step, step]


def test_sigint_single_process_saves_and_exits_75(tmp_path):
    run = tmp_path / "run"
    procs, logs = start_job(1, run, tmp_path / "o", "--period", 1000)
    wait_for_line(logs[0], "STEP 3", procs)
    procs[0].send_signal(signal.SIGINT)
    codes, text = finish(procs, logs)
    assert codes == [EXIT], text
    (r,) = results(tmp_path / "o", 1)
    assert r["reason"] == "SIGINT" and r["stopped_at"] >= 3
    assert [i.step for i in ck.list_steps(run / "checkpoints")] == [r["stopped_at"]]
    it = json.loads((run / "checkpoints" / str(r["stopped_at"]) / "iter" /
                     "process_0-of-1.json").read_text())
    assert it == {"step": r["stopped_at"], "process": 0}


def test_time_limit_stops_with_a_save(tmp_path):
    run = tmp_path / "run"
    procs, logs = start_job(1, run, tmp_path / "o", "--period", 1000, "--time_limit", 1.0)
    codes, text = finish(procs, logs)
    assert codes == [EXIT], text
    (r,) = results(tmp_path / "o", 1)
    assert r["reason"] == "time_limit"
    assert [i.step for i in ck.list_steps(run / "checkpoints")] == [r["stopped_at"]]


# ------------------------------------------------------------------------------------------------
# In-process behaviour of StopSignal.


def test_flag_only_then_second_sigint_raises():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    stop = preemption.StopSignal(preemption.StopConfig(check_every_steps=1)).install()
    try:
        assert stop.should_stop(1) is None
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # let the interpreter run the handler
        assert stop.local_reason() == "SIGINT"
        assert stop.should_stop(2) == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_checks_only_every_n_steps_and_first_reason_wins():
    now = [0.0]
    stop = preemption.StopSignal(
        preemption.StopConfig(time_limit_seconds=100.0, time_limit_margin_seconds=10.0,
                              check_every_steps=4), clock=lambda: now[0])
    now[0] = 89.0
    assert [stop.should_stop(s) for s in range(1, 5)] == [None] * 4
    now[0] = 90.0
    assert [stop.should_stop(s) for s in (5, 6, 7, 8)] == [None, None, None, "time_limit"]
    stop.request("SIGTERM")  # a later signal does not rename the stop
    assert stop.should_stop(12) == "time_limit"
    with pytest.raises(ValueError):
        stop.request("SIGKILL")
