"""pingllm/cli/inspect_checkpoints.py on checkpoints written by real (tiny) trainer runs.

Three runs under one base directory: 'clean' (steps 2 and 4 complete), 'flipped' (a copy of
'clean' with one byte of step 2's array data flipped: corrupt) and 'killed' (a run SIGKILLed
while Orbax was writing a step: its `<step>.orbax-checkpoint-tmp*` directory is left behind).
Sizes and file counts are checked against os.walk; statuses against checkpointing.list_steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import resume_helpers as rh

from pingllm.checkpoint import manager as checkpointing

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "pingllm" / "cli" / "inspect_checkpoints.py"
pytestmark = pytest.mark.slow


def named(tree) -> dict[str, np.ndarray]:
    """{Orbax leaf name ('params.layers.mlp.wo.kernel'): value as NumPy}."""
    import jax

    from pingllm.checkpoint.reshard import leaf_name

    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {leaf_name(p): np.asarray(v) for p, v in leaves}


def tool(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def walk(path: Path) -> tuple[int, int]:
    """(bytes, files) under path, as os.walk sees them."""
    size = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            size += os.path.getsize(os.path.join(root, name))
            files += 1
    return size, files


def _holds_a_file(directory: Path) -> bool:
    try:
        return any(p.is_file() for p in directory.rglob("*"))
    except OSError:  # renamed away while we looked: that save committed
        return False


def kill_during_save(s, out: Path, name: str, attempts: int = 3) -> Path:
    """Runs `name` and SIGKILLs it while a step's temporary directory exists; returns that dir."""
    for attempt in range(attempts):
        launch = rh.start(s, name, [f'BASE_OUTPUT_DIRECTORY = "{out}"', "STEPS = 400",
                                    "CHECKPOINT_PERIOD = 2", "MAX_NUM_CHECKPOINTS_TO_KEEP = None"],
                          tag=str(attempt))
        ckpts = out / name / "checkpoints"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and launch.popen.poll() is None:
            tmp = list(ckpts.glob("*.orbax-checkpoint-tmp*")) if ckpts.is_dir() else []
            # A save that wrote something (an empty temporary directory holds no object: on a
            # bucket it does not exist, and the listing is the same on disk), after a complete step.
            tmp = [t for t in tmp if _holds_a_file(t)]
            if tmp and rh.checkpoint_steps(out / name):
                launch.kill()
                launch.popen.wait()
                if tmp[0].exists():
                    return tmp[0]
                break
            time.sleep(0.002)
        launch.kill()
        launch.popen.wait()
    pytest.fail(f"could not interrupt a save of {name} in {attempts} attempts")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    s = rh.shared(tmp_path_factory)
    out = s.root / "inspect_base"  # only this module's runs: the listing is exact
    shutil.rmtree(out, ignore_errors=True)
    clean = rh.start(s, "clean", [f'BASE_OUTPUT_DIRECTORY = "{out}"', "STEPS = 4",
                                  "CHECKPOINT_PERIOD = 2"])
    tmp = kill_during_save(s, out, "killed")
    assert clean.wait() == 0, clean.tail()
    shutil.copytree(out / "clean", out / "flipped")
    data = [p for p in (out / "flipped" / "checkpoints" / "2" / "items").rglob("d/*")
            if p.is_file()]
    target = max(data, key=lambda p: p.stat().st_size)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    return out, tmp


def test_listing_statuses_sizes_and_totals(base):
    out, tmp = base
    report = json.loads(tool(out, "--json").stdout)
    runs = {r["name"]: r for r in report["runs"]}
    status = {name: {(st["step"], Path(st["path"]).name): st["status"]
                     for st in runs[name]["steps"]}
              for name in ("clean", "flipped", "killed")}
    assert status["clean"] == {(2, "2"): "complete", (4, "4"): "complete"}
    assert status["flipped"] == {(2, "2"): "corrupt", (4, "4"): "complete"}
    killed = status["killed"]
    assert killed[(int(tmp.name.split(".")[0]), tmp.name)] == "incomplete"
    assert sorted(v for k, v in killed.items() if k[1] != tmp.name) == \
        ["complete"] * (len(killed) - 1)
    flipped_2 = next(st for st in runs["flipped"]["steps"] if st["step"] == 2)
    assert any("crc32c" in p for p in flipped_2["problems"])

    for run in report["runs"]:
        for st in run["steps"]:
            assert (st["size"], st["files"]) == walk(Path(st["path"])), st["path"]
        assert run["size"] == sum(st["size"] for st in run["steps"])
        assert run["files"] == sum(st["files"] for st in run["steps"])
    assert report["size"] == sum(r["size"] for r in report["runs"])
    assert report["files"] == sum(r["files"] for r in report["runs"])
    assert runs["clean"]["latest"] == 4 and runs["flipped"]["latest"] == 4

    # Same judgement as the trainer's own listing.
    for name in ("clean", "flipped", "killed"):
        theirs = {(i.step, i.path.name): i.status
                  for i in checkpointing.list_steps(out / name / "checkpoints")}
        assert theirs == status[name]


def test_table_text(base):
    out, _ = base
    text = tool(out).stdout
    for name in ("clean", "flipped", "killed"):
        assert f"Run: {name}  ({out / name})" in text
    assert "  Step | Size (MB) | Files | Status   | Created" in text
    size, files = walk(out / "clean" / "checkpoints" / "4")
    block = text.split("Run: clean")[1].split("Run: ")[0]
    row = next(line for line in block.splitlines() if line.strip().startswith("4 |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[:4] == ["4", f"{size / 2**20:.2f}", str(files), "Complete"]
    total_size, total_files = (sum(x) for x in zip(walk(out / "clean" / "checkpoints" / "2"),
                                                   (size, files)))
    assert f"  Total: 2 checkpoints, {total_size / 2**20:.2f} MB, {total_files} files" in block
    assert f"  Latest complete: step 4 ({size / 2**20:.2f} MB, {files} files)" in block
    assert "Corrupt" in text.split("Run: flipped")[1].split("Run: ")[0]
    assert "Incomplete" in text.split("Run: killed")[1].split("Run: ")[0]
    assert "Grand total: " in text.splitlines()[-1]


def test_detail_lists_every_array(base):
    out, _ = base
    step_dir = out / "clean" / "checkpoints" / "4"
    detail = json.loads(tool(out, "--run", "clean", "--step", "4", "--json").stdout)
    state = named(rh.read_state(step_dir))  # plain Orbax, every leaf as NumPy
    arrays = {a["name"]: a for a in detail["arrays"]}
    assert set(arrays) == set(state)
    for name, value in state.items():
        a = arrays[name]
        assert tuple(a["shape"]) == value.shape and a["dtype"] == value.dtype.name, name
        assert a["bytes"] == value.nbytes
        assert a["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert arrays["params.token_embedding"]["partition_spec"] == ["tensor", "fsdp"]
    from pingllm import config as config_lib
    from pingllm import model as model_lib

    model_cfg = config_lib.load([str(REPO / "gin/quickstart.gin")],
                                rh.Shared(out.parent).bindings("clean")).model
    assert detail["param_count"] == model_lib.param_count(model_cfg)
    assert detail["param_count"] == sum(v.size for k, v in state.items() if k.startswith("params."))
    assert detail["iterator"] == {
        "process_0-of-1.json": json.loads((step_dir / "iter" / "process_0-of-1.json").read_text())}
    meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    assert detail["metadata"]["commit_timestamp_nsecs"] == meta["commit_timestamp_nsecs"]
    assert detail["status"] == "complete"
    assert (detail["size"], detail["files"]) == walk(step_dir)

    text = tool(step_dir).stdout  # a step directory alone is detected as one step
    for name in state:
        assert f"  {name} " in text
    assert "saved mesh: {\"data\": 1, \"fsdp\": 1, \"tensor\": 1}" in text
    assert f"parameters: {detail['param_count']:,}" in text
    assert int(np.sum([a["bytes"] for a in detail["arrays"]])) == detail["array_bytes"]


def test_corrupt_step_detail_and_run_dir(base):
    out, _ = base
    detail = json.loads(tool(out / "flipped", "--step", "2", "--json").stdout)
    assert detail["status"] == "corrupt"
    only = json.loads(tool(out / "flipped" / "checkpoints", "--json").stdout)
    assert [r["name"] for r in only["runs"]] == ["flipped"]


def test_errors_exit_2(base, tmp_path):
    out, _ = base
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = {
        tmp_path / "missing": "no such file or directory",
        tmp_path / "empty": "not a checkpoint, run or base output directory",
        tmp_path / "file.txt": "not a directory",
    }
    procs = {p: subprocess.Popen([sys.executable, str(TOOL), str(p)], cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for p in cases}
    for path, message in cases.items():
        _, err = procs[path].communicate(timeout=300)
        assert procs[path].returncode == 2 and message in err, (path, err)
    proc = tool(out, "--run", "clean", "--step", "99", check=False)
    assert proc.returncode == 2 and "has no step 99 (steps: 2, 4)" in proc.stderr
    proc = tool(out, "--run", "nope", check=False)
    assert proc.returncode == 2 and "no such run" in proc.stderr


def test_empty_temporary_directory_is_listed_incomplete(base, tmp_path):
    """A save killed right after it created its temporary directory leaves it empty."""
    out, _ = base
    run = tmp_path / "runs" / "emptytmp"
    shutil.copytree(out / "clean", run)
    empty = run / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
    empty.mkdir()
    (run / "checkpoints" / "notes").mkdir()  # not a step name: ignored
    steps = {(i.step, i.path.name): (i.status, i.files)
             for i in checkpointing.list_steps(run / "checkpoints")}
    assert steps[(6, empty.name)] == ("incomplete", 0)
    assert sorted(steps) == [(2, "2"), (4, "4"), (6, empty.name)]
    report = json.loads(tool(tmp_path / "runs", "--json").stdout)
    listed = {st["step"]: st for st in report["runs"][0]["steps"]}
    assert listed[6]["status"] == "incomplete" and listed[6]["files"] == 0
    assert report["runs"][0]["latest"] == 4
