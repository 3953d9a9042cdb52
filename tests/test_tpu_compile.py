"""The trainer's train step compiled by libtpu for real TPU slices, on a host without TPUs.

pingllm/cli/plan_run.py --topology runs in its own process (JAX_PLATFORMS=cpu, libtpu only describes
the topology and compiles), so this process's JAX is untouched. One compile of the research
config for a 4-host v5e slice is shared by the assertions on it; a model too large for one chip
is cheap (XLA refuses it early).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pingllm import config as config_lib
from pingllm import model as model_lib
from pingllm import planner
from pingllm.data import pipeline

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "pingllm" / "cli" / "plan_run.py"
RESEARCH = REPO / "gin" / "latency_network.gin"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[plan]')")


def tool(*args, gin=RESEARCH, bindings=()):
    argv = [sys.executable, str(TOOL), f"--gin_file={gin}",
            *(f"--gin_bindings={b}" for b in bindings), *map(str, args)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1200)


# ---- topology names (no libtpu needed) ----


@pytest.mark.parametrize("name,shape,chips,accelerator,kind", [
    ("v5e-256", (16, 16), 256, "v5litepod-256", "v5e"),
    ("v5e-16", (4, 4), 16, "v5litepod-16", "v5e"),
    ("v5litepod-8", (2, 4), 8, "v5litepod-8", "v5e"),
    ("v5e:4x4", (4, 4), 16, "v5litepod-16", "v5e"),
    ("v4-32", (2, 2, 4), 16, "v4-32", "v4"),  # v4 and v5p names count TensorCores
    ("v4-8", (2, 2, 1), 4, "v4-8", "v4"),
    ("v5p-128", (4, 4, 4), 64, "v5p-128", "v5p"),
    ("v5p-8", (2, 2, 1), 4, "v5p-8", "v5p"),
    ("v6e-64", (8, 8), 64, "v6e-64", "v6e"),
    ("v6e-8", (2, 4), 8, "v6e-8", "v6e"),
])
def test_topology_names(name, shape, chips, accelerator, kind):
    t = planner.parse_topology(name)
    assert (t.shape, t.num_chips, t.accelerator_type, t.chip.generation) == (
        shape, chips, accelerator, kind)
    assert planner.parse_topology(name, num_slices=2).num_chips == 2 * chips


def test_chip_figures_and_bad_names():
    gib = 2**30
    assert {g: (c.hbm_bytes // gib, c.peak_flops / 1e12) for g, c in planner.CHIPS.items()} == {
        "v4": (32, 275), "v5e": (16, 197), "v5p": (95, 459), "v6e": (32, 918)}
    for bad, message in [("v7x-8", "expected"), ("v4-12", "power-of-two"), ("v4-3", "2 per chip"),
                         ("v5e:4x4x4", "2 torus axes"), ("tpu", "expected")]:
        with pytest.raises(planner.TopologyError, match=message):
            planner.parse_topology(bad)
    with pytest.raises(planner.TopologyError, match="num_slices"):
        planner.parse_topology("v5e-16", num_slices=0)


def test_planning_environment_keeps_jax_off_the_tpu_runtime():
    env = planner.tpu_planning_env(planner.parse_topology("v5e-256"), {"JAX_PLATFORMS": "tpu",
                                                                       "KEEP": "1"})
    assert env["JAX_PLATFORMS"] == "cpu" and env["KEEP"] == "1"
    assert env["TPU_ACCELERATOR_TYPE"] == "v5litepod-256"
    assert env["TPU_WORKER_HOSTNAMES"] == "localhost" and env["TPU_SKIP_MDS_QUERY"] == "1"
    assert planner.has_tpu_planning_env(planner.parse_topology("v5e-256"), env)
    assert not planner.has_tpu_planning_env(planner.parse_topology("v5e-256", 2), env)


# ---- compiled by libtpu ----


@pytest.fixture(scope="module")
def research_on_v5e_4x4():
    """The research config's train step compiled for v5e:4x4 (16 chips, 4 hosts): ~100 s."""
    proc = tool("--topology", "v5e:4x4", "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@needs_libtpu
@pytest.mark.slow
def test_research_config_compiles_for_a_multi_host_tpu_slice(research_on_v5e_4x4):
    plan = research_on_v5e_4x4
    cfg = config_lib.load([str(RESEARCH)])
    tpu, mem = plan["tpu"], plan["memory"]
    # XLA's TPU analysis of a program for 16 v5e chips on 4 hosts.
    assert plan["device_kind"] == "TPU v5 lite" and plan["num_devices"] == 16
    assert tpu["num_hosts"] == 4 and tpu["accelerator_type"] == "v5litepod-16"
    assert plan["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
    assert plan["params"] == model_lib.param_count(cfg.model) == 111_928_960
    # Shards computed here: f32 parameters / 16, Adam's two moments, the pipeline's batch rows.
    assert 0.99 < mem["params"] * 16 / (4 * plan["params"]) < 1.01
    assert 0.99 < mem["opt_state"] / (2 * mem["params"]) < 1.01
    rows = cfg.data.global_batch_size // 16
    assert mem["batch"] == sum(rows * shape[1] * dtype.itemsize
                               for shape, dtype in pipeline.batch_spec(cfg.data).values())
    assert mem["temp"] > 10 * mem["arguments"]  # activations of 2 x 1024 tokens per chip
    # Fits v5e's 16 GiB, with the margin reported.
    assert tpu["hbm_bytes"] == 16 * 2**30
    assert 0 < mem["peak"] < tpu["hbm_bytes"] and tpu["fits"] and plan["fits"]
    assert tpu["margin_bytes"] == tpu["hbm_bytes"] - mem["peak"]
    # The roofline estimate: analytic FLOPs at 16 x 197 TFLOP/s.
    flops = model_lib.flops_per_token(cfg.model) * 32 * 1024
    assert plan["flops_per_step"] == flops
    assert math.isclose(tpu["est_step_seconds"], flops / (16 * 197e12))
    assert math.isclose(tpu["est_tokens_per_second"], 32 * 1024 / tpu["est_step_seconds"])
    assert plan["compile_seconds"] > 0
    print(f"v5e:4x4 peak {mem['peak'] / 2**30:.2f} GiB per chip, compiled in "
          f"{plan['compile_seconds']:.0f}s")


@needs_libtpu
@pytest.mark.slow
def test_a_model_too_large_for_the_chip_does_not_fit():
    huge = ["ModelConfig.num_layers=1", "ModelConfig.emb_dim=65536", "ModelConfig.mlp_dim=65536",
            "GLOBAL_BATCH_SIZE=1"]
    proc = tool("--topology", "v5e:1x1", "--json", gin=REPO / "gin" / "quickstart.gin",
                bindings=huge)
    assert proc.returncode == 3, proc.stderr[-4000:]
    plan = json.loads(proc.stdout)
    assert plan["fits"] is False and plan["tpu"]["fits"] is False
    assert plan["device_kind"] == "TPU v5 lite" and plan["num_devices"] == 1
    # XLA's TPU compiler itself refuses the program: more than v5e's HBM.
    assert "RESOURCE_EXHAUSTED" in plan["tpu"]["compile_error"]
    assert "HBM" in plan["tpu"]["compile_error"] and plan["memory"] is None


class _Device:
    def __init__(self, process_index):
        self.process_index = process_index


def test_fit_verdict_and_estimate_from_a_memory_plan():
    """Fits exactly up to the chip's HBM; the estimate is analytic FLOPs at the chips' peak."""
    topology = planner.parse_topology("v6e-8")
    devices = [_Device(i // 4) for i in range(8)]
    hbm = 32 * 2**30

    def fit(peak):
        memory = planner.MemoryPlan(params=0, opt_state=0, batch=0, arguments=peak, outputs=0,
                                    aliased=0, temp=0, generated_code=0)
        return planner._tpu_fit(topology, devices, memory, 8 * 918e12, 1000)

    assert fit(hbm).fits and fit(hbm).margin_bytes == 0
    short = fit(hbm + 1)
    assert not short.fits and short.margin_bytes == -1 and short.num_hosts == 2
    assert math.isclose(short.est_step_seconds, 1.0)
    assert math.isclose(short.est_tokens_per_second, 1000)
    refused = planner._tpu_fit(topology, devices, None, 1.0, 1, compile_error="RESOURCE_EXHAUSTED")
    assert not refused.fits and refused.margin_bytes is None
