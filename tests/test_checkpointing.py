"""Checkpointing on real Orbax checkpoints on disk, real processes for multi-host behaviour."""

import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from ckpt_worker import StepIterator, abstract_state, expected_leaves, make_state, mismatches
from jax.sharding import Mesh

from pingllm.checkpoint import manager as ck

WORKER = Path(__file__).with_name("ckpt_worker.py")
REPO = Path(__file__).resolve().parents[1]


def mesh_of(n: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), ("data",))


def save_steps(run_dir, steps, mesh, **config):
    cfg = ck.CheckpointConfig(**{"checkpoint_period": 1, **config})
    ckpt = ck.Checkpointer(cfg, run_dir)
    for s in steps:
        ckpt.maybe_save(s, make_state(s, mesh), StepIterator(s))
    ckpt.wait()
    metrics = ckpt.pop_save_metrics()
    ckpt.close()
    return metrics


def restore(run_dir, mesh, overrides=None, **config):
    ckpt = ck.Checkpointer(ck.CheckpointConfig(**config), run_dir)
    it = StepIterator(-1)
    try:
        result = ckpt.restore(abstract_state(mesh, overrides=overrides), it)
    finally:
        ckpt.close()
    return result, it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(mode, n_proc, devices, out, *args, timeout=90):
    """Runs a real n_proc-process JAX job of ckpt_worker.py; returns (exit codes, results)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), mode, "--out", str(out), "--num_processes", str(n_proc),
         "--process_id", str(i), "--port", str(port), "--devices", str(devices), *map(str, args)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(n_proc)]
    deadline = time.monotonic() + timeout
    try:
        logs = [p.communicate(timeout=max(deadline - time.monotonic(), 1))[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:  # stop the whole job together, then show what each had written
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        raise AssertionError(f"job timed out after {timeout}s:\n" + "\n".join(
            f"--- process {i}:\n{log[-3000:]}" for i, log in enumerate(logs))) from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [0] * n_proc, "\n".join(logs[i][-3000:] for i in range(n_proc))
    return [json.loads((Path(out) / f"result_{i}.json").read_text()) for i in range(n_proc)]


# ------------------------------------------------------------------------------------------------


def test_round_trip_layout_and_plain_orbax_restore(tmp_path):
    metrics = save_steps(tmp_path, [1, 2], mesh_of(8))
    step_dir = tmp_path / "checkpoints" / "2"
    for rel in ["_CHECKPOINT_METADATA", "items/_sharding", "items/ocdbt.process_0",
                "items/manifest.ocdbt", "items/array_metadatas/process_0",
                "iter/process_0-of-1.json", ck.CHECKSUM_FILE]:
        assert (step_dir / rel).exists(), rel
    assert json.loads((step_dir / "iter/process_0-of-1.json").read_text()) == {
        "step": 2, "process": 0}
    # Metrics: bytes are exactly what the checksum file lists.
    sums = ck.read_checksums(step_dir)
    assert [m.step for m in metrics] == [1, 2]
    assert metrics[1].bytes_written == sum(f["size"] for f in sums["files"].values())
    assert metrics[1].gb_per_second > 0 and metrics[1].blocking_seconds >= 0
    # Every file but the two Orbax rewrites after our hook is checksummed, and nothing else.
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
    assert set(sums["files"]) == on_disk - {"_CHECKPOINT_METADATA", "commit_success.txt",
                                             ck.CHECKSUM_FILE}
    assert ck.verify_step(step_dir) == []

    result, it = restore(tmp_path, mesh_of(8))
    assert (result.step, result.source, result.iter_restored, it.step) == (2, "persistent",
                                                                          True, 2)
    assert mismatches(result.state, 2) == []
    assert result.timings["restore_seconds"] > 0

    # Plain Orbax, no pingllm import, in a fresh process.
    script = textwrap.dedent(f"""
        import json, numpy as np, jax, orbax.checkpoint as ocp
        mngr = ocp.CheckpointManager({str(tmp_path / 'checkpoints')!r}, item_names=('items',))
        step = mngr.latest_step()
        meta = ocp.StandardCheckpointHandler().metadata(mngr.directory / str(step) / 'items').tree
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                meta)
        out = mngr.restore(step, args=ocp.args.Composite(items=ocp.args.StandardRestore(abstract)))
        s = out['items']
        it = json.load(open({str(step_dir / 'iter/process_0-of-1.json')!r}))
        print(json.dumps(dict(step=int(s['step']), keys=sorted(s), it=it['step'],
              w=np.asarray(s['params']['w']).tolist())))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=60, cwd="/", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["step"] == 2 and got["keys"] == ["opt_state", "params", "step"]
    assert got["it"] == 2
    np.testing.assert_array_equal(np.array(got["w"], np.float32), expected_leaves(2)["params.w"])


def test_retention_keeps_latest_and_every_keep_period(tmp_path):
    save_steps(tmp_path, range(1, 11), mesh_of(2), max_num_checkpoints_to_keep=2, keep_period=4)
    assert sorted(i.step for i in ck.list_steps(tmp_path / "checkpoints")) == [4, 8, 9, 10]


def test_period_and_force(tmp_path):
    cfg = ck.CheckpointConfig(checkpoint_period=5)
    ckpt = ck.Checkpointer(cfg, tmp_path)
    mesh = mesh_of(1)
    started = [ckpt.maybe_save(s, make_state(s, mesh), StepIterator(s)) for s in range(1, 8)]
    started.append(ckpt.maybe_save(7, make_state(7, mesh), StepIterator(7), force=True))
    started.append(ckpt.maybe_save(7, make_state(7, mesh), StepIterator(7), force=True))
    ckpt.close()
    assert started == [False, False, False, False, True, False, False, True, False]
    assert [i.step for i in ck.list_steps(tmp_path / "checkpoints")] == [5, 7]


def test_relative_run_directory_saves_and_restores(tmp_path, monkeypatch):
    # Orbax's OCDBT paths must be absolute: a run directory relative to the working directory
    # (BASE_OUTPUT_DIRECTORY="outputs", --checkpoint outputs/run) is made absolute first.
    monkeypatch.chdir(tmp_path)
    save_steps("run", [1, 2], mesh_of(2))
    assert (tmp_path / "run/checkpoints/2/items/manifest.ocdbt").is_file()
    result, it = restore("run", mesh_of(2))
    assert (result.step, it.step, mismatches(result.state, 2)) == (2, 2, [])
    params = ck.restore_params("run/checkpoints/2", abstract_state(mesh_of(1))["params"])
    np.testing.assert_array_equal(np.asarray(params["w"]), expected_leaves(2)["params.w"])


def test_stale_tmp_dirs_are_listed_incomplete_then_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    stale = root / "3.orbax-checkpoint-tmp-1234"
    (stale / "items").mkdir(parents=True)
    (stale / "items" / "junk").write_bytes(b"x" * 10)
    infos = ck.list_steps(root)
    assert [(i.step, i.status) for i in infos] == [(3, "incomplete")]
    assert ck.verify_step(stale)[0].endswith("incomplete (temporary directory of an unfinished "
                                             "save)")
    result, _ = restore(tmp_path, mesh_of(1))  # nothing complete: fresh start
    assert (result.state, result.step, result.source) == (None, 0, None)
    save_steps(tmp_path, [3], mesh_of(1))  # same step as the stale one: no FileExistsError
    assert not stale.exists()
    assert [(i.step, i.status, i.verified) for i in ck.list_steps(root)] == [
        (3, "complete", True)]


def _flip_one_byte(path: Path, offset: int = 0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_named_skipped_and_kept(tmp_path, caplog):
    save_steps(tmp_path, [1, 2], mesh_of(4), max_num_checkpoints_to_keep=2)
    root = tmp_path / "checkpoints"
    victim = max((p for p in (root / "2" / "items").rglob("*") if p.is_file()
                  and "/d/" in p.as_posix()), key=lambda p: p.stat().st_size)
    _flip_one_byte(victim, victim.stat().st_size // 2)
    bad_bytes = victim.read_bytes()
    problems = ck.verify_step(root / "2")
    assert problems == [f"{victim}: crc32c differs from the recorded one"]
    assert [(i.step, i.status) for i in ck.list_steps(root)] == [(1, "complete"),
                                                                  (2, "corrupt")]

    with caplog.at_level(logging.ERROR, logger="pingllm.checkpoint.manager"):
        result, it = restore(tmp_path, mesh_of(4))
    assert (result.step, result.source, it.step) == (1, "persistent", 1)
    assert mismatches(result.state, 1) == []
    assert result.skipped == ((str(root / "2"), problems[0]),)
    assert str(root / "2") in caplog.text and str(victim) in caplog.text

    # The run goes on from step 1: step 2 exists (corrupt) and is never overwritten or deleted,
    # even when retention would otherwise drop it.
    ckpt = ck.Checkpointer(ck.CheckpointConfig(checkpoint_period=1,
                                               max_num_checkpoints_to_keep=2), tmp_path)
    ckpt.restore(abstract_state(mesh_of(4)), StepIterator())
    mesh = mesh_of(4)
    with caplog.at_level(logging.WARNING, logger="pingllm.checkpoint.manager"):
        assert ckpt.maybe_save(2, make_state(2, mesh), StepIterator(2)) is False
    assert "not overwriting" in caplog.text
    for s in (3, 4, 5):
        assert ckpt.maybe_save(s, make_state(s, mesh), StepIterator(s))
    ckpt.close()
    assert victim.read_bytes() == bad_bytes
    assert [(i.step, i.status) for i in ck.list_steps(root)] == [(2, "corrupt"), (4, "complete"),
                                                                  (5, "complete")]


def test_corrupt_step_that_orbax_cannot_read_is_skipped_before_it_is_read(tmp_path, caplog):
    # A flipped first byte of the OCDBT root manifest makes Orbax's own read fail (DATA_LOSS,
    # already when reading the tree's metadata): verification must reject the step first, so
    # the restore falls back to step 1 instead of aborting.
    save_steps(tmp_path, [1, 2], mesh_of(4), max_num_checkpoints_to_keep=2)
    root = tmp_path / "checkpoints"
    manifest = root / "2" / "items" / "manifest.ocdbt"
    _flip_one_byte(manifest, 0)
    with pytest.raises(ValueError, match="DATA_LOSS"):
        restore(tmp_path, mesh_of(4), verify_checksums=False)
    problems = ck.verify_step(root / "2")
    assert problems == [f"{manifest}: crc32c differs from the recorded one"]
    with caplog.at_level(logging.ERROR, logger="pingllm.checkpoint.manager"):
        result, it = restore(tmp_path, mesh_of(4))
    assert (result.step, result.source, it.step) == (1, "persistent", 1)
    assert mismatches(result.state, 1) == []
    assert result.skipped == ((str(root / "2"), problems[0]),)
    assert str(manifest) in caplog.text


def test_shape_and_dtype_mismatch_name_the_parameter(tmp_path):
    save_steps(tmp_path, [1], mesh_of(2))
    with pytest.raises(ck.RestoreMismatchError) as e:
        restore(tmp_path, mesh_of(2), overrides={"params.w": ((16, 4), np.float32)})
    assert "params.w: checkpoint shape (16, 8) != target shape (16, 4)" in str(e.value)
    with pytest.raises(ck.RestoreMismatchError) as e:
        restore(tmp_path, mesh_of(2), overrides={"params.b": ((8,), np.float16)})
    assert "params.b: checkpoint dtype float32 != target dtype float16" in str(e.value)


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE variant runs")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _fill(directory: Path):
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # ENOSPC: the disk is full now
        pass
    finally:
        os.close(fd)


def _full_disk_save_fails_and_keeps_step_1(run_dir: Path, make_disk_full):
    mesh = mesh_of(2)
    ckpt = ck.Checkpointer(ck.CheckpointConfig(checkpoint_period=1), run_dir)
    ckpt.maybe_save(1, make_state(1, mesh), StepIterator(1))
    ckpt.wait()
    make_disk_full()
    with pytest.raises(ck.CheckpointSaveError, match="step 2"):
        ckpt.maybe_save(2, make_state(2, mesh), StepIterator(2))
        ckpt.wait()
    try:
        ckpt.close()
    except ck.CheckpointSaveError:
        pass
    root = run_dir / "checkpoints"
    assert ck.verify_step(root / "1") == []
    assert [i.step for i in ck.list_steps(root) if i.status == "complete"] == [1]


def test_full_disk_tmpfs(small_tmpfs):
    _full_disk_save_fails_and_keeps_step_1(small_tmpfs, lambda: _fill(small_tmpfs))
    (small_tmpfs / "filler").unlink()
    result, _ = restore(small_tmpfs, mesh_of(2))
    assert result.step == 1 and mismatches(result.state, 1) == []


def test_full_disk_rlimit_fsize(tmp_path):
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, old[1]))

    try:
        _full_disk_save_fails_and_keeps_step_1(tmp_path, limit)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)
    result, _ = restore(tmp_path, mesh_of(2))
    assert result.step == 1 and mismatches(result.state, 1) == []


def test_load_full_state_and_load_parameters(tmp_path):
    save_steps(tmp_path / "a", [6], mesh_of(4))
    step_dir = tmp_path / "a" / "checkpoints" / "6"
    result, it = restore(tmp_path / "b", mesh_of(2), load_full_state_path=str(step_dir))
    assert (result.source, result.step, result.iter_restored, it.step) == (
        "load_full_state", 6, True, 6)
    assert mismatches(result.state, 6) == []
    # The run's own checkpoints win over load_full_state_path once they exist.
    save_steps(tmp_path / "b", [7], mesh_of(2))
    result, _ = restore(tmp_path / "b", mesh_of(2), load_full_state_path=str(step_dir))
    assert (result.source, result.step) == ("persistent", 7)

    result, it = restore(tmp_path / "c", mesh_of(8), load_parameters_path=str(step_dir))
    assert (result.source, result.step, result.state, result.iter_restored, it.step) == (
        "load_parameters", 0, None, False, -1)
    assert sorted(result.params) == ["b", "emb", "w"]
    want = expected_leaves(6)
    for name in ("w", "b", "emb"):
        arr = result.params[name]
        assert arr.sharding == abstract_state(mesh_of(8))["params"][name].sharding
        np.testing.assert_array_equal(np.asarray(arr), want[f"params.{name}"])


def test_restore_onto_other_meshes_in_process(tmp_path):
    save_steps(tmp_path, [3], mesh_of(8))
    for n in (1, 4, 8):
        result, it = restore(tmp_path, mesh_of(n))
        assert result.step == 3 and it.step == 3 and mismatches(result.state, 3) == [], n
        assert result.state["params"]["w"].sharding.mesh.devices.size == n


def test_grain_dataset_iterator_round_trips(tmp_path):
    import grain

    mesh = mesh_of(1)
    it = iter(grain.MapDataset.range(100).batch(4))
    for _ in range(3):
        next(it)
    ckpt = ck.Checkpointer(ck.CheckpointConfig(checkpoint_period=1), tmp_path)
    ckpt.maybe_save(1, make_state(1, mesh), it)
    ckpt.close()
    fresh = iter(grain.MapDataset.range(100).batch(4))
    reader = ck.Checkpointer(ck.CheckpointConfig(), tmp_path)
    assert reader.restore(abstract_state(mesh), fresh).iter_restored
    reader.close()
    assert next(fresh).tolist() == next(it).tolist() == [12, 13, 14, 15]


# ------------------------------------------------------------------------------------------------
# Real multi-process jobs (2 processes x 2 CPU devices, jax.distributed over gloo).


@pytest.mark.slow
def test_topology_2x2_to_1x8_1x4_1x1_and_back(tmp_path):
    run = tmp_path / "run"
    results = run_job("save", 2, 2, tmp_path / "o1", "--run_dir", run, "--steps", 3,
                      "--period", 1)
    assert [r["process_count"] for r in results] == [2, 2]
    step_dir = run / "checkpoints" / "3"
    for rel in ["items/ocdbt.process_0", "items/ocdbt.process_1", "iter/process_0-of-2.json",
                "iter/process_1-of-2.json", "items/array_metadatas/process_1"]:
        assert (step_dir / rel).exists(), rel
    assert ck.verify_step(step_dir) == []
    for n in (8, 4, 1):
        result, it = restore(run, mesh_of(n))
        # A different process count has no iterator file: the caller re-derives it from the step.
        assert (result.step, result.iter_restored, it.step) == (3, False, -1)
        assert mismatches(result.state, 3) == []
    # Back: written by 1 x 8, read by 2 x 2.
    run2 = tmp_path / "run2"
    save_steps(run2, [5], mesh_of(8))
    results = run_job("restore", 2, 2, tmp_path / "o2", "--run_dir", run2)
    for r in results:
        assert (r["step"], r["source"], r["iter_restored"], r["mismatches"]) == (
            5, "persistent", False, [])


@pytest.mark.slow
def test_two_tiers_local_newer_then_local_missing_on_one_process(tmp_path):
    run, local = tmp_path / "run", tmp_path / "local"
    tiers = ["--run_dir", run, "--period", 4, "--local_dir", local, "--local_period", 1]
    run_job("save", 2, 2, tmp_path / "o1", *tiers, "--steps", *range(1, 7))
    assert [i.step for i in ck.list_steps(run / "checkpoints")] == [4]
    for p in (0, 1):
        assert [i.step for i in ck.list_steps(local / f"process_{p}")] == [5, 6]
        assert (local / f"process_{p}" / "6" / "items" / f"ocdbt.process_{p}").exists()
    results = run_job("restore", 2, 2, tmp_path / "o2", *tiers)
    assert [(r["step"], r["source"], r["iter_step"], r["mismatches"]) for r in results] == [
        (6, "local", 6, [])] * 2
    # Process 1 lost its local disk (another host): the newest step complete everywhere is the
    # persistent one.
    shutil.rmtree(local / "process_1")
    results = run_job("restore", 2, 2, tmp_path / "o3", *tiers)
    assert [(r["step"], r["source"], r["iter_step"], r["mismatches"]) for r in results] == [
        (4, "persistent", 4, [])] * 2
    # A local tier written by another process layout is never used (1 process here).
    result, _ = restore(run, mesh_of(4), enable_emergency_checkpoint=True,
                        local_checkpoint_directory=str(local), local_checkpoint_period=1)
    assert (result.step, result.source) == (4, "persistent")
    assert all("written by another process/shard layout" in why for _, why in result.skipped)
