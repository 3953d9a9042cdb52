"""Through the real CLI: a stopped and restarted run equals an uninterrupted one, bit for bit.

One process (`python -m pingllm.main`) and a 2-process job (`launch/local.py`); plus what a
restart does with a corrupt newest step, a model that does not fit the checkpoint, a finished
run, LOAD_FULL_STATE_PATH and LOAD_PARAMETERS_PATH, and the restart metrics in TensorBoard.
Independent runs start together: they are separate processes and the machine has 2 cores.
"""

import shutil

import numpy as np
import pytest
import resume_helpers as rh

N = 20  # the stop is requested once the run has reached step N ...
STEPS = 2 * N  # ... of 2N
RUN = [f"STEPS = {STEPS}", "CHECKPOINT_PERIOD = 10", "MAX_NUM_CHECKPOINTS_TO_KEEP = None"]
MULTI = [*RUN, "StopConfig.check_every_steps = 2", *rh.PACKED_EMA]


def _copy_checkpoints(s, source: str, name: str) -> None:
    """A new run directory holding another run's checkpoints and progress (no events)."""
    src, dst = s.run_dir(source), s.run_dir(name)
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    shutil.copy(src / "progress.json", dst / "progress.json")


def _flip_byte(step_dir) -> tuple:
    """Flips one byte in the middle of the largest array-data file: (path, offset, new byte)."""
    files = [p for p in (step_dir / "items").rglob("*") if p.is_file() and "/d/" in str(p)]
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    offset = len(data) // 2
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return path, offset, data[offset]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """Every one-process run, started as soon as what it needs exists."""
    s = rh.shared(tmp_path_factory)
    ref = rh.start(s, "ref1", RUN)
    # Past its first step the compiled program is in the persistent cache: later runs load it.
    rh.wait_for_step(ref, s.run_dir("ref1"), 1)
    sig = rh.start(s, "sig1", RUN)
    stop_seen = rh.stop_at(sig, s.run_dir("sig1"), N)
    assert sig.wait() == 75, sig.tail()
    stopped = rh.checkpoint_steps(s.run_dir("sig1"))[-1]
    resumed = rh.start(s, "sig1", RUN, tag="_resume")
    assert ref.wait() == 0, ref.tail()

    _copy_checkpoints(s, "ref1", "bad1")
    flipped = _flip_byte(s.run_dir("bad1") / "checkpoints" / str(STEPS))
    _copy_checkpoints(s, "ref1", "shape1")
    ref20 = s.run_dir("ref1") / "checkpoints" / "20"
    ref40 = s.run_dir("ref1") / "checkpoints" / str(STEPS)
    later = {
        "bad": rh.start(s, "bad1", RUN),
        "shape": rh.start(s, "shape1", [*RUN, "ModelConfig.mlp_dim = 128"]),
        "done": rh.start(s, "ref1", RUN, tag="_again"),
        "full": rh.start(s, "full1", [*RUN, f'LOAD_FULL_STATE_PATH = "{ref20}"']),
        "params": rh.start(s, "params1", [*RUN[1:], "STEPS = 1",
                                          f'LOAD_PARAMETERS_PATH = "{ref40}"']),
    }
    for launch in [resumed, *later.values()]:
        launch.wait()
    return dict(s=s, stop_seen=stop_seen, stopped=stopped, sig=sig, resumed=resumed,
                flipped=flipped, **later)


def test_sigterm_at_n_then_restart_equals_uninterrupted_bitwise(one):
    s = one["s"]
    assert one["resumed"].rc == 0, one["resumed"].tail()
    # The stop was agreed right after the step where SIGTERM was seen, and saved there.
    assert N <= one["stop_seen"] <= one["stopped"] < STEPS, (one["stop_seen"], one["stopped"])
    assert f"saved step {one['stopped']}; exit 75" in one["sig"].log()
    assert rh.restored(one["resumed"].log())[:2] == (one["stopped"], "persistent")

    ref = rh.read_state(s.run_dir("ref1") / "checkpoints" / str(STEPS))
    got = rh.read_state(s.run_dir("sig1") / "checkpoints" / str(STEPS))
    leaves = rh.assert_trees_bitwise_equal(ref, got, "params+optimizer after resume")
    assert leaves > 10 and int(got["step"]) == STEPS

    ref_loss, got_loss = (rh.scalars(s.run_dir(n))["loss"] for n in ("ref1", "sig1"))
    assert sorted(ref_loss) == sorted(got_loss) == list(range(1, STEPS + 1))
    # Bitwise: the same float32 at every step (TensorBoard stores the float32 it was given).
    assert [ref_loss[k] for k in range(1, STEPS + 1)] == [got_loss[k] for k in range(1, STEPS + 1)]
    assert len(set(ref_loss.values())) > STEPS // 2  # dropout and data vary per step


def test_restart_metrics_in_tensorboard(one):
    """Time to first step split up, save cost, steps lost: in the events after a resume."""
    s, stopped = one["s"], one["stopped"]
    tb = rh.scalars(s.run_dir("sig1"))
    first = stopped + 1  # the resumed run writes its start-up metrics at its first step
    for tag in ("startup/time_to_first_step_s", "startup/restore_s", "startup/compile_s",
                "startup/first_batch_s"):
        assert tag in tb and first in tb[tag] and tb[tag][first] > 0, (tag, tb.get(tag))
    assert tb["startup/time_to_first_step_s"][first] > tb["startup/restore_s"][first]
    # SIGTERM saved the step it stopped at: nothing to redo.
    assert tb["startup/steps_lost_since_last_save"] == {1: 0.0, first: 0.0}
    # Saves of both runs: 10, 20, the stop step, 30, 40 (blocking time, bytes, GB/s).
    saved = sorted({10, 20, stopped, 30, STEPS})
    for tag in ("blocking_s", "write_s", "bytes", "gb_per_s"):
        values = tb[f"checkpoint/persistent/{tag}"]
        assert sorted(values) == saved and all(v > 0 for v in values.values()), (tag, values)
    # The state (35k parameters + 2 Adam moments, float32) is ~420 kB; OCDBT adds metadata.
    assert all(400_000 < v < 600_000 for v in tb["checkpoint/persistent/bytes"].values())

    # The corrupt-newest-step restart lost the steps between step 30 and the recorded 40.
    bad = rh.scalars(s.run_dir("bad1"))
    assert bad["startup/steps_lost_since_last_save"] == {31: 10.0}


def test_corrupt_newest_step_is_named_skipped_and_kept(one):
    s, bad = one["s"], one["bad"]
    path, offset, value = one["flipped"]
    log = bad.log()
    assert bad.rc == 0, bad.tail()
    step_dir = s.run_dir("bad1") / "checkpoints" / str(STEPS)
    assert f"checkpoint {step_dir} failed verification, skipping it (kept on disk)" in log
    assert f"skipped checkpoint {step_dir} (left on disk): {path}: crc32c differs" in log
    assert rh.restored(log)[:2] == (30, "persistent")
    # Not deleted, not overwritten by the rerun's step 40.
    assert path.read_bytes()[offset] == value
    assert f"checkpoint {step_dir} already exists: not overwriting it" in log
    assert rh.checkpoint_steps(s.run_dir("bad1")) == [10, 20, 30, STEPS]
    # The rerun of steps 31..40 computed what the original did.
    ref_loss, bad_loss = (rh.scalars(s.run_dir(n))["loss"] for n in ("ref1", "bad1"))
    assert sorted(bad_loss) == list(range(31, STEPS + 1))
    assert all(bad_loss[k] == ref_loss[k] for k in bad_loss)


def test_model_shape_mismatch_names_the_parameter_and_both_shapes(one):
    shape = one["shape"]
    log = shape.log()
    assert shape.rc not in (0, 75), shape.tail()
    assert "RestoreMismatchError" in log
    lines = [line for line in log.splitlines() if "checkpoint shape" in line]
    mlp = [line for line in lines if line.strip().startswith("params.")]
    assert mlp, log[-3000:]
    # e.g. params.decoder.layers.mlp.wi_0.kernel: checkpoint shape (32, 1, 64) != target ...
    for line in mlp:
        assert "64" in line.split("!=")[0] and "128" in line.split("!=")[1], line
    # The optimizer moments of the same parameters are named too.
    assert any(line.strip().startswith("opt_state.") for line in lines)
    assert rh.checkpoint_steps(one["s"].run_dir("shape1")) == [10, 20, 30, STEPS]


def test_finished_run_exits_zero_and_says_so(one):
    done = one["done"]
    assert done.rc == 0, done.tail()
    assert f"run ref1 already complete at step {STEPS} (STEPS={STEPS}); nothing to do" in done.log()


def test_load_full_state_path_continues_another_runs_step(one):
    s, full = one["s"], one["full"]
    assert full.rc == 0, full.tail()
    assert rh.restored(full.log())[:2] == (20, "load_full_state")
    # Step, optimizer and data position all came along: the result is ref1's step 40.
    ref = rh.read_state(s.run_dir("ref1") / "checkpoints" / str(STEPS))
    got = rh.read_state(s.run_dir("full1") / "checkpoints" / str(STEPS))
    rh.assert_trees_bitwise_equal(ref, got, "LOAD_FULL_STATE_PATH run")
    assert rh.checkpoint_steps(s.run_dir("full1")) == [30, STEPS]
    assert rh.checkpoint_steps(s.run_dir("ref1")) == [10, 20, 30, STEPS]  # source untouched


def test_load_parameters_path_takes_parameters_only(one):
    s, params = one["s"], one["params"]
    assert params.rc == 0, params.tail()
    ref = rh.read_state(s.run_dir("ref1") / "checkpoints" / str(STEPS))
    got = rh.read_state(s.run_dir("params1") / "checkpoints" / "1")
    assert f"params fingerprint {rh.fingerprint(ref['params'])}" in params.log()
    assert rh.first_batch(params.log())[0] == 0  # from step 0 of the data
    assert int(got["step"]) == 1
    # Learning rate of step 0 is 0 (warmup): the one step left the loaded weights as they were.
    rh.assert_trees_bitwise_equal(ref["params"], got["params"], "params")
    counts = [int(v) for k, v in rh.flat(got["opt_state"]).items() if "count" in k]
    assert counts and set(counts) == {1}  # a fresh optimizer, one update old (ref1's: 40)
    ref_counts = [int(v) for k, v in rh.flat(ref["opt_state"]).items() if "count" in k]
    assert set(ref_counts) == {STEPS}


@pytest.mark.slow
def test_two_process_job_sigterm_restart_equals_uninterrupted_bitwise(tmp_path_factory):
    s = rh.shared(tmp_path_factory)
    job = dict(processes=2, devices=2)
    ref = rh.start(s, "ref2", MULTI, **job)
    rh.wait_for_step(ref, s.run_dir("ref2"), 1)  # compiled and cached: sig2 loads it
    sig = rh.start(s, "sig2", MULTI, **job)
    stop_seen = rh.stop_at(sig, s.run_dir("sig2"), N)  # to launch/local.py: it forwards it
    assert sig.wait() == 75, sig.tail()
    stopped = rh.checkpoint_steps(s.run_dir("sig2"))[-1]
    assert N <= stop_seen <= stopped < STEPS and stopped % 2 == 0
    for p in (0, 1):
        assert f"saved step {stopped}; exit 75" in sig.log(p)
    resumed = rh.run(s, "sig2", MULTI, tag="_resume", **job)
    assert ref.wait() == 0, ref.tail()
    assert rh.restored(resumed.log())[:2] == (stopped, "persistent")
    # The same command once more: the job is complete, every process says so and exits 0.
    again = rh.run(s, "sig2", MULTI, tag="_again", **job)
    for p in (0, 1):
        assert f"run sig2 already complete at step {STEPS}" in again.log(p), again.tail()

    a = rh.read_state(s.run_dir("ref2") / "checkpoints" / str(STEPS))
    b = rh.read_state(s.run_dir("sig2") / "checkpoints" / str(STEPS))
    rh.assert_trees_bitwise_equal(a, b, "2-process job after resume")
    assert rh.flat(a["ema_params"]).keys() == rh.flat(a["params"]).keys()
    assert not np.array_equal(*(next(iter(rh.flat(a[k]).values()))
                                for k in ("ema_params", "params")))
    la, lb = (rh.scalars(s.run_dir(n))["loss"] for n in ("ref2", "sig2"))
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    assert [la[k] for k in sorted(la)] == [lb[k] for k in sorted(lb)]
