"""pingllm-reshard-checkpoint on a real 2-process checkpoint: 2x2 -> 1x8 -> bf16 params only.

Each output is resumed (or started from) by the real trainer CLI and restored by plain Orbax in a
subprocess that imports no pingllm code; values are compared bitwise with the source, read with
plain Orbax as NumPy. The memory bound is checked with the benchmark at CI size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import resume_helpers as rh

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "pingllm" / "cli" / "reshard_checkpoint.py"
pytestmark = pytest.mark.slow


def named(tree) -> dict[str, np.ndarray]:
    """{Orbax leaf name ('params.layers.mlp.wo.kernel'): value as NumPy}."""
    import jax

    from pingllm.checkpoint.reshard import leaf_name

    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {leaf_name(p): np.asarray(v) for p, v in leaves}


def tool(*args, check=True, cwd=REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# Restores a step with plain Orbax onto 8 CPU devices (shardings laid out from scratch, no
# pingllm import) and prints {leaf: [dtype, float sum]}.
PLAIN_ORBAX = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np, orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    assert not any(m.startswith("pingllm") for m in sys.modules)
    step_dir = sys.argv[1]
    root, step = os.path.dirname(step_dir), int(os.path.basename(step_dir))
    mesh = Mesh(np.array(jax.devices()), ("x",))
    mngr = ocp.CheckpointManager(root, item_names=("items",))
    meta = mngr.item_metadata(step)["items"]
    meta = getattr(meta, "tree", meta)
    def target(m):
        spec = PartitionSpec("x") if m.shape and m.shape[0] % 8 == 0 else PartitionSpec()
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(mesh, spec))
    abstract = jax.tree.map(target, meta)
    out = mngr.restore(step, args=ocp.args.Composite(items=ocp.args.StandardRestore(abstract)))
    flat, _ = jax.tree_util.tree_flatten_with_path(out["items"])
    sums = {jax.tree_util.keystr(p): [str(v.dtype), float(np.asarray(v, np.float64).sum())]
            for p, v in flat}
    print(json.dumps(sums))
""")


def plain_orbax_sums(step_dir: Path) -> dict[str, list]:
    proc = subprocess.run([sys.executable, "-c", PLAIN_ORBAX, str(step_dir)], capture_output=True,
                          text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sharding_mesh(step_dir: Path) -> set[str]:
    raw = json.loads((step_dir / "items" / "_sharding").read_text())
    return {json.dumps(json.loads(v)["shape"]) for v in raw.values()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """rs2: 2 processes x 2 devices, steps to 4; then its step 4 resharded twice."""
    s = rh.shared(tmp_path_factory)
    job = rh.run(s, "rs2", ["STEPS = 4", "CHECKPOINT_PERIOD = 2"], processes=2, devices=2,
                 timeout=900)
    assert job.rc == 0
    src = s.run_dir("rs2") / "checkpoints" / "4"
    full = tool("--input", src, "--output", s.run_dir("rs8"), "--num_devices", 8,
                "--mesh", "fsdp=4,tensor=2", "--max_buffer_mb", 0.01, "--json")
    dst = s.run_dir("rs8") / "checkpoints" / "4"
    params_dir = s.out / "rs8_params_bf16" / "checkpoints" / "4"
    # Paths relative to the working directory (Orbax needs absolute ones: the tool makes them so).
    params = tool("--input", dst.relative_to(s.out), "--output", params_dir.relative_to(s.out),
                  "--num_devices", 8, "--content", "params", "--param_dtype", "bfloat16", "--json",
                  cwd=s.out)
    return s, src, dst, params_dir, json.loads(full.stdout), json.loads(params.stdout)


def test_full_state_on_one_process_of_eight_devices(chain):
    s, src, dst, _, summary, _ = chain
    assert summary["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert summary["groups"] > 5  # a 10 KB buffer: written group by group
    assert sharding_mesh(src) == {"[1, 4, 1]"}  # 2 processes x 2 devices, all on fsdp
    assert sharding_mesh(dst) == {"[1, 4, 2]"}
    a, b = named(rh.read_state(src)), named(rh.read_state(dst))
    assert rh.assert_trees_bitwise_equal(a, b, "resharded") == len(a)
    # The iterator files of both writing processes are carried over verbatim.
    names = sorted(p.name for p in (dst / "iter").glob("process_*.json"))
    assert names == ["process_0-of-2.json", "process_1-of-2.json"]
    for name in names:
        assert (dst / "iter" / name).read_text() == (src / "iter" / name).read_text()
    sums = plain_orbax_sums(dst)
    want = {k: [str(v.dtype), float(np.asarray(v, np.float64).sum())]
            for k, v in rh.flat(rh.read_state(src)).items()}
    assert sums == want

    # The trainer (1 process, 8 devices) resumes it and continues to step 6.
    run = rh.run(s, "rs8", ["STEPS = 6", "CHECKPOINT_PERIOD = 2"], devices=8, timeout=900)
    log = run.log()
    assert "restored step 4 from the persistent tier" in log, run.tail()
    assert rh.checkpoint_steps(s.run_dir("rs8")) == [4, 6]


def test_params_only_bfloat16(chain):
    s, _, dst, params_dir, _, summary = chain
    full = named(rh.read_state(dst))
    got = named(rh.read_state(params_dir))
    want = {k[len("params."):]: v for k, v in full.items() if k.startswith("params.")}
    assert set(got) == set(want) and summary["leaves"] == len(want)
    for name, value in want.items():
        assert got[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(got[name].view(np.uint16),
                                      value.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert not (params_dir / "iter").exists()
    sums = plain_orbax_sums(params_dir)
    assert len(sums) == len(want) and {d for d, _ in sums.values()} == {"bfloat16"}

    # A new run starts from these parameters (fresh optimizer, step 0).
    run = rh.run(s, "from_bf16", ["STEPS = 2", "CHECKPOINT_PERIOD = 2",
                                  f'LOAD_PARAMETERS_PATH = "{params_dir}"',
                                  'ModelConfig.param_dtype = "bfloat16"'], devices=8, timeout=900)
    assert f"starting from parameters of {params_dir}" in run.log(), run.tail()
    assert rh.checkpoint_steps(s.run_dir("from_bf16")) == [2]


def test_refuses_overwrite_and_bad_inputs(chain, tmp_path):
    s, src, dst, _, _, _ = chain
    before = (dst / "pingllm_checksums.json").read_text()
    proc = tool("--input", src, "--output", s.run_dir("rs8"), "--num_devices", 8, check=False)
    assert proc.returncode == 2 and "already exists: refusing to overwrite" in proc.stderr
    assert (dst / "pingllm_checksums.json").read_text() == before

    cases = [
        (["--input", tmp_path / "nope", "--output", tmp_path / "o"], "no such directory"),
        (["--input", s.run_dir("rs2"), "--output", tmp_path / "o"], "not a checkpoint step"),
        # emb 32 / heads 2: a tensor axis of 3 divides neither.
        (["--input", src, "--output", tmp_path / "o", "--mesh", "tensor=3"],
         "is not divisible by mesh axes tensor = 3"),
        (["--input", src, "--output", tmp_path / "o", "--mesh", "model=2"], "expected comma"),
    ]
    procs = [subprocess.Popen([sys.executable, str(TOOL), *map(str, args)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args, _ in cases]
    for proc, (_, message) in zip(procs, cases):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2 and message in err, err[-2000:]
    assert not (tmp_path / "o").exists()


def test_no_iter_keeps_an_empty_iterator_item(chain):
    s, src, _, _, _, _ = chain
    out = s.out / "rs_no_iter"
    summary = json.loads(tool("--input", src, "--output", out, "--content", "no_iter",
                              "--num_devices", 2, "--json").stdout)
    step = out / "checkpoints" / "4"
    assert summary["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert (step / "iter").is_dir() and not list((step / "iter").glob("process_*.json"))
    assert rh.assert_trees_bitwise_equal(named(rh.read_state(src)),
                                         named(rh.read_state(step)), "no_iter") > 0


def test_peak_memory_bound_ci_size(tmp_path):
    """CI-size version of benchmarks/bench_reshard_memory.py: 300 MB, bound 2 x largest + 600 MB."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_reshard_memory.py"), "--gb", "0.3",
         "--arrays", "6", "--slack_mb", "600", "--max_buffer_mb", "64", "--workdir",
         str(tmp_path), "--json"], capture_output=True, text=True, timeout=900, cwd=REPO)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["checkpoint_bytes"] >= 300 * 2**20
    assert report["reshard"]["groups"] == 6  # one array at a time (the step scalar rides along)
    assert report["peak_rss_bytes"] <= report["bound_bytes"], report
    assert proc.returncode == 0
