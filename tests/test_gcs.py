"""gs:// run directories against a real fake-gcs-server on 127.0.0.1 (tests/gcs_emulator.py).

A 2-process job trains with BASE_OUTPUT_DIRECTORY on the bucket; one of its processes gets
SIGKILL while an async save is in flight (a `<step>/` without commit_success.txt); the rerun
restores the newest committed step and ends bit-equal to an uninterrupted run. The same
bucket is then read by the inspector (Complete / Incomplete / Corrupt), by plain Orbax in a
process that imports no pingllm code, by one process on another mesh, by the reshard tool
(gs:// -> gs://), and by predict / evaluate. Nothing may create a local `gs:` directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import resume_helpers as rh
from etils import epath
from test_predict import tiny_run, world_rows  # noqa: F401 - session fixtures

from pingllm.checkpoint import format as fmt

STEPS = 40
# test_kill_restart's settings: its uninterrupted 2-process reference "ref2" is reused.
BASE = [f"STEPS = {STEPS}", "MAX_NUM_CHECKPOINTS_TO_KEEP = None",
        "StopConfig.check_every_steps = 2", *rh.PACKED_EMA]
BUCKET = "pingllm-test"


@pytest.fixture(scope="module")
def bucket(gcs_emulator) -> str:
    return gcs_emulator.create_bucket(BUCKET)


def _no_local_gs_dirs(*roots) -> None:
    for root in roots:
        assert not any(p.name.startswith("gs:") for p in epath.Path(root).iterdir()), root


def _trainer_pids(launch: rh.Launch) -> list[int]:
    return launch.pids()[1:]


def _save_in_flight(emulator, prefix: str, after: int) -> int | None:
    """A step > after with objects on the bucket but no commit_success.txt yet."""
    objects = emulator.objects(BUCKET, prefix)
    steps: dict[int, bool] = {}
    for name in objects:
        m = re.match(re.escape(prefix) + r"(\d+)/(.*)$", name)
        if m:
            steps[int(m.group(1))] = steps.get(int(m.group(1)), False) or (
                m.group(2) == "commit_success.txt")
    pending = [s for s, done in steps.items() if not done and s > after]
    return max(pending) if pending else None


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, gcs_emulator, bucket):
    """The 2-process gs:// run, killed once during an async save, then run to the end."""
    s = rh.shared(tmp_path_factory)
    ref = s.run_dir("ref2") / "checkpoints" / str(STEPS)
    if not ref.is_dir():
        rh.run(s, "ref2", [*BASE, "CHECKPOINT_PERIOD = 10"], processes=2, devices=2)
    out = f"{bucket}/out"
    extra = [*BASE, "CHECKPOINT_PERIOD = 4", f'BASE_OUTPUT_DIRECTORY = "{out}"']
    run_dir = epath.Path(f"{out}/gcs2")
    prefix = "out/gcs2/checkpoints/"
    first = rh.start(s, "gcs2", extra, processes=2, devices=2, tag="_kill")
    killed_step = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.popen.poll() is None:
        killed_step = _save_in_flight(gcs_emulator, prefix, after=8)
        if killed_step is not None:
            os.kill(_trainer_pids(first)[-1], signal.SIGKILL)  # one process only
            break
        time.sleep(0.002)
    first.wait(300)
    assert killed_step is not None, f"no save in flight was seen:\n{first.tail()}"
    objects_after_kill = gcs_emulator.objects(BUCKET, f"{prefix}{killed_step}/")
    second = rh.run(s, "gcs2", extra, processes=2, devices=2, tag="_rerun")
    return {"s": s, "ref": ref, "run_dir": run_dir, "out": out, "killed_step": killed_step,
            "committed_at_kill": f"{prefix}{killed_step}/commit_success.txt"
            in objects_after_kill, "objects_after_kill": objects_after_kill, "first": first,
            "second": second, "prefix": prefix}


@pytest.mark.slow
def test_killed_save_is_never_restored_nor_deleted_and_rerun_is_bitwise(killed_run,
                                                                          gcs_emulator):
    k = killed_run
    log = k["second"].log()
    step, tier, fingerprint = rh.restored(log)
    assert tier == "persistent" and step % 4 == 0
    if not k["committed_at_kill"]:
        assert step < k["killed_step"], log[-3000:]
        # Kept, still incomplete, every object moved aside: the rerun saved that step anew.
        listed = {i.path.name: i.status for i in fmt.list_steps(k["run_dir"] / "checkpoints")}
        aside = [n for n in listed
                 if n.startswith(f"{k['killed_step']}.orbax-checkpoint-tmp-unfinished-")]
        assert len(aside) == 1 and listed[aside[0]] == "incomplete", listed
        assert listed[str(k["killed_step"])] == "complete"
        assert fmt.step_info(k["run_dir"] / "checkpoints" / str(k["killed_step"])).verified
        moved = gcs_emulator.objects(BUCKET, f"{k['prefix']}{aside[0]}/")
        assert {n.split("/", 4)[-1]: size for n, size in moved.items()} == {
            n.split("/", 4)[-1]: size for n, size in k["objects_after_kill"].items()}
    restored_state = rh.read_state(k["run_dir"] / "checkpoints" / str(step))
    assert fingerprint == rh.fingerprint(restored_state["params"])
    final = rh.read_state(k["run_dir"] / "checkpoints" / str(STEPS))
    assert rh.assert_trees_bitwise_equal(final, rh.read_state(k["ref"]), "gs:// vs local") > 0
    # Run files on the bucket: configs, progress, TensorBoard events (copied from the mirror).
    for name in ("config.gin", "operative_config.gin", "progress.json"):
        assert (k["run_dir"] / name).exists(), name
    events = gcs_emulator.objects(BUCKET, "out/gcs2/tensorboard/")
    assert events and all("events.out.tfevents" in n for n in events)
    _no_local_gs_dirs(rh.REPO, k["s"].root)


def _cli(args, timeout=600, **kw):
    return subprocess.run([sys.executable, *args], cwd=rh.REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"), **kw)


@pytest.mark.slow
def test_inspector_tells_complete_incomplete_and_corrupt_apart_on_the_bucket(killed_run,
                                                                             gcs_emulator):
    k = killed_run
    import fsspec

    # Flip one byte of one object of a complete step (a copy of the run: the others stay good).
    fs = fsspec.filesystem("gs")
    fs.cp(f"{BUCKET}/out/gcs2", f"{BUCKET}/flip/gcs2", recursive=True)
    victim_step = 8
    victims = sorted(n for n, size in gcs_emulator.objects(
        BUCKET, f"flip/gcs2/checkpoints/{victim_step}/items/").items()
        if "/d/" in n and size > 0)
    data = bytearray(fs.cat_file(f"{BUCKET}/{victims[0]}"))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(f"{BUCKET}/{victims[0]}", bytes(data))

    proc = _cli(["pingllm/cli/inspect_checkpoints.py", f"gs://{BUCKET}/flip", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {r["step"]: r for r in json.loads(proc.stdout)["runs"][0]["steps"]}
    assert steps[victim_step]["status"] == "corrupt"
    assert "crc32c differs" in steps[victim_step]["problems"][0]
    assert steps[STEPS]["status"] == "complete" and steps[4]["status"] == "complete"
    if not k["committed_at_kill"]:  # the killed save, set aside; the rerun's save of the step
        by_name = {Path(r["path"]).name: r["status"] for r in
                   json.loads(proc.stdout)["runs"][0]["steps"] if r["step"] == k["killed_step"]}
        assert sorted(by_name.values()) == ["complete", "incomplete"], by_name
        assert by_name[str(k["killed_step"])] == "complete"
    table = _cli(["pingllm/cli/inspect_checkpoints.py", f"gs://{BUCKET}/flip"])
    assert "Corrupt" in table.stdout and "Complete" in table.stdout, table.stdout
    detail = _cli(["pingllm/cli/inspect_checkpoints.py", f"gs://{BUCKET}/flip/gcs2", "--step",
                   str(STEPS)])
    assert detail.returncode == 0 and "params." in detail.stdout, detail.stderr[-2000:]
    # Orbax's own finalization rule agrees with the inspector on every step.
    from orbax.checkpoint._src.path import step as step_lib

    for row in json.loads(proc.stdout)["runs"][0]["steps"]:
        finalized = step_lib.is_path_finalized(epath.Path(row["path"]))
        assert finalized == (row["status"] != "incomplete"), (row["path"], row["status"])


@pytest.mark.slow
def test_plain_orbax_restores_a_step_from_the_bucket(killed_run):
    k = killed_run
    code = (
        "import sys, json, numpy as np\n"
        f"sys.path.insert(0, {str(rh.REPO / 'tests')!r})\n"
        "import resume_helpers as rh\n"
        f"state = rh.read_state({str(k['run_dir'] / 'checkpoints' / str(STEPS))!r})\n"
        "assert not [m for m in sys.modules if m.startswith('pingllm')]\n"
        "print(json.dumps(rh.fingerprint(state['params'])))\n")
    proc = _cli(["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == rh.fingerprint(
        rh.read_state(k["ref"])["params"])


@pytest.mark.slow
def test_two_process_bucket_checkpoint_restores_on_one_process_and_another_mesh(killed_run):
    import jax

    from pingllm import config as config_lib
    from pingllm import trainer
    from pingllm.checkpoint import manager

    k = killed_run
    cfg = config_lib.load([str(rh.REPO / "gin/quickstart.gin")],
                          k["s"].bindings("gcs2", [*BASE, f'BASE_OUTPUT_DIRECTORY = "{k["out"]}"',
                                                   "ICI_FSDP_PARALLELISM = -1"]))
    setup = trainer.build(cfg)
    assert jax.process_count() == 1 and len(jax.devices()) == 8  # saved by 2 x 2
    result = manager.Checkpointer(cfg.checkpoint, cfg.run.run_dir).restore(
        setup.abstract_state, None)
    assert result.step == STEPS and result.source == "persistent"
    saved = rh.read_state(k["ref"])
    rh.assert_trees_bitwise_equal(jax.device_get(result.state.params), saved["params"],
                                  "1 x 8 restore")


@pytest.mark.slow
def test_reshard_from_bucket_to_bucket(killed_run):
    k = killed_run
    src = k["run_dir"] / "checkpoints" / str(STEPS)
    dst = f"gs://{BUCKET}/resharded/run"
    proc = _cli(["pingllm/cli/reshard_checkpoint.py", "--input", str(src), "--output", dst,
                 "--content", "params"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    from pingllm.checkpoint import format as fmt

    out = epath.Path(dst) / "checkpoints" / str(STEPS)
    assert fmt.verify_step(out) == []
    rh.assert_trees_bitwise_equal(rh.read_state(out), rh.read_state(k["ref"])["params"],
                                  "resharded on gs://")


@pytest.mark.slow
def test_two_tiers_local_disk_fast_tier_and_bucket_durable_tier(gcs_emulator, bucket, tmp_path):
    import shutil

    from test_checkpointing import run_job

    from pingllm.checkpoint import format as fmt

    run, local = f"{bucket}/two_tier", tmp_path / "local"
    tiers = ["--run_dir", run, "--period", 4, "--local_dir", local, "--local_period", 1]
    run_job("save", 2, 2, tmp_path / "o1", *tiers, "--steps", *range(1, 7), timeout=600)
    assert [i.step for i in fmt.list_steps(f"{run}/checkpoints")] == [4]
    for p in (0, 1):
        assert [i.step for i in fmt.list_steps(local / f"process_{p}")] == [5, 6]
    results = run_job("restore", 2, 2, tmp_path / "o2", *tiers, timeout=600)
    assert [(r["step"], r["source"], r["iter_step"], r["mismatches"]) for r in results] == [
        (6, "local", 6, [])] * 2
    shutil.rmtree(local / "process_1")  # one host lost its disk: the bucket's step is used
    results = run_job("restore", 2, 2, tmp_path / "o3", *tiers, timeout=600)
    assert [(r["step"], r["source"], r["iter_step"], r["mismatches"]) for r in results] == [
        (4, "persistent", 4, [])] * 2


def _to_bucket(local_run: str, name: str) -> str:
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.put(local_run, f"{BUCKET}/{name}", recursive=True)
    return f"gs://{BUCKET}/{name}"


def test_predict_and_evaluate_read_a_bucket_checkpoint(tiny_run, world_rows, bucket,  # noqa: F811
                                                       gcs_emulator, capsys, tmp_path,
                                                       monkeypatch):
    from pingllm.cli import evaluate, predict

    remote = _to_bucket(tiny_run, "tiny")
    _, table = world_rows
    src, dst = table["src_addr"][0].as_py(), table["dst_addr"][0].as_py()
    args = ["--src", src, "--dst", dst, "--time", "2025-03-03T12:00:00Z"]
    assert predict.main(["--checkpoint", tiny_run, *args]) == 0
    local_line = capsys.readouterr().out.strip()
    monkeypatch.chdir(tmp_path)
    assert predict.main(["--checkpoint", remote, *args]) == 0
    assert capsys.readouterr().out.strip() == local_line  # the same parameters, read from gs://
    assert evaluate.main(["--checkpoint", f"{remote}/checkpoints", "--max_queries", "8",
                          "--eval_batches", "1"]) == 0
    assert "median_relative_error" in capsys.readouterr().out
    pngs = gcs_emulator.objects(BUCKET, "tiny/eval/")
    assert {n.rsplit("/", 1)[-1] for n in pngs} >= {"pred_vs_true.png", "calibration.png"}
    _no_local_gs_dirs(tmp_path, rh.REPO)


def test_in_process_save_retention_incomplete_and_corrupt_on_the_bucket(gcs_emulator, bucket,
                                                                         caplog):
    """Save / retention / restore through pingllm.checkpoint.manager on gs:// (fast)."""
    import fsspec
    import jax
    from ckpt_worker import StepIterator, abstract_state, make_state, mismatches
    from jax.sharding import Mesh

    from pingllm.checkpoint import format as fmt
    from pingllm.checkpoint import manager as ck

    run = f"{bucket}/inproc"
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    cfg = ck.CheckpointConfig(checkpoint_period=1, max_num_checkpoints_to_keep=2)
    ckpt = ck.Checkpointer(cfg, run)
    for step in (1, 2, 3):
        assert ckpt.maybe_save(step, make_state(step, mesh), StepIterator(step))
    ckpt.close()
    root = epath.Path(run) / "checkpoints"
    assert [(i.step, i.status, i.verified) for i in fmt.list_steps(root)] == [
        (2, "complete", True), (3, "complete", True)]  # retention deleted step 1 on the bucket
    # A killed save: step 5's objects without commit_success.txt (a copy of step 3, uncommitted).
    fs = fsspec.filesystem("gs")
    fs.cp(f"{BUCKET}/inproc/checkpoints/3", f"{BUCKET}/inproc/checkpoints/5", recursive=True)
    fs.rm_file(f"{BUCKET}/inproc/checkpoints/5/commit_success.txt")
    # One flipped byte in an object of step 3.
    victim = max((n for n in gcs_emulator.objects(BUCKET, "inproc/checkpoints/3/items/")
                  if "/d/" in n), key=lambda n: gcs_emulator.objects(BUCKET, n)[n])
    data = bytearray(fs.cat_file(f"{BUCKET}/{victim}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{BUCKET}/{victim}", bytes(data))
    assert [(i.step, i.status) for i in fmt.list_steps(root)] == [
        (2, "complete"), (3, "corrupt"), (5, "incomplete")]
    assert fmt.verify_step(root / "3") == [
        f"gs://{BUCKET}/{victim}: crc32c differs from the recorded one"]
    ckpt = ck.Checkpointer(cfg, run)
    it = StepIterator(-1)
    result = ckpt.restore(abstract_state(mesh), it)
    assert (result.step, result.source, it.step) == (2, "persistent", 2)
    assert mismatches(result.state, 2) == []
    unfinished = gcs_emulator.objects(BUCKET, "inproc/checkpoints/5/")
    with caplog.at_level(logging.WARNING, logger="pingllm.checkpoint.manager"):
        # The killed save's step is saved again: its objects are moved aside, not overwritten.
        assert ckpt.maybe_save(5, make_state(5, mesh), StepIterator(5))
    assert "an unfinished save of an earlier run (kept)" in caplog.text
    for step in (6, 7):
        assert ckpt.maybe_save(step, make_state(step, mesh), StepIterator(step))
    # A committed step is never overwritten.
    with caplog.at_level(logging.WARNING, logger="pingllm.checkpoint.manager"):
        assert ckpt.maybe_save(6, make_state(-6, mesh), StepIterator(-6)) is False
    assert "not overwriting" in caplog.text
    ckpt.close()
    # The corrupt step is pinned, the unfinished one kept (aside, every object, same sizes);
    # retention removed step 2 then 5 (3 pinned; keep 2: 6 and 7).
    listed = [(i.step, i.status, i.path.name) for i in fmt.list_steps(root)]
    aside = next(name for step, status, name in listed if status == "incomplete")
    assert aside.startswith("5.orbax-checkpoint-tmp-unfinished-")
    assert [(s, st) for s, st, _ in listed] == [
        (3, "corrupt"), (5, "incomplete"), (6, "complete"), (7, "complete")]
    moved = gcs_emulator.objects(BUCKET, f"inproc/checkpoints/{aside}/")
    assert {n.split(aside + "/", 1)[1]: size for n, size in moved.items()} == {
        n.split("checkpoints/5/", 1)[1]: size for n, size in unfinished.items()}
    again = ck.Checkpointer(cfg, run)
    result = again.restore(abstract_state(mesh), StepIterator(-1))
    again.close()
    assert result.step == 7 and mismatches(result.state, 7) == []
    # LOAD_FULL_STATE_PATH / LOAD_PARAMETERS_PATH on the bucket start a new (local) run.
    for field, source in (("load_full_state_path", "load_full_state"),
                          ("load_parameters_path", "load_parameters")):
        fresh = ck.Checkpointer(ck.CheckpointConfig(**{field: f"{run}/checkpoints/7"}),
                                f"{bucket}/fresh_{source}")
        result = fresh.restore(abstract_state(mesh), StepIterator(-1))
        fresh.close()
        assert result.source == source
        if source == "load_full_state":
            assert result.step == 7 and mismatches(result.state, 7) == []
        else:
            assert result.state is None
            assert mismatches({"params": result.params}, 7) == []


def test_missing_bucket_is_a_clear_error_within_seconds(gcs_emulator, tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pingllm.main", f"--gin_file={rh.REPO}/gin/quickstart.gin",
         '--gin_bindings=BASE_OUTPUT_DIRECTORY = "gs://no-such-bucket/out"',
         '--gin_bindings=RUN_NAME = "r"'],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(rh.REPO)))
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "gs://no-such-bucket/out/r" in proc.stderr and "does not exist" in proc.stderr
    assert seconds < 60, seconds  # includes the interpreter's start-up and imports
    _no_local_gs_dirs(tmp_path)


def test_unreachable_storage_is_a_clear_error_not_a_hang(gcs_emulator, monkeypatch):
    import gcs_emulator as emulator_lib

    from pingllm.checkpoint import storage

    closed = f"http://127.0.0.1:{emulator_lib.free_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", closed)
    import fsspec

    fsspec.filesystem("gs").clear_instance_cache()
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match="gs://pingllm-test/x"):
        storage.check_writable("gs://pingllm-test/x", timeout=5)
    assert time.monotonic() - t0 < 10
    fsspec.filesystem("gs").clear_instance_cache()
