"""The in-training held-out RTT evaluation (pingllm/rtt_eval.py) on the training mesh.

- one process: the mesh evaluator gives what the evaluation CLI's own path (evaluate.py) gives;
- two processes (gloo): a 2-process run restoring a checkpoint logs the same eval/rtt/... (and
  eval/loss) as the 1-process run that wrote it, within float tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pingllm import config as config_lib
from pingllm import optimizer as optimizer_lib
from pingllm import partitioning
from pingllm import train_state as state_lib
from pingllm.eval import heldout as evaluate_lib
from pingllm.eval import in_loop as rtt_eval

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "ModelConfig.num_layers = 1", "ModelConfig.emb_dim = 32", "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 16", "ModelConfig.mlp_dim = 64", "MAX_TARGET_LENGTH = 128",
    "GLOBAL_BATCH_SIZE = 4", 'DataConfig.source = "synthetic_memory"',
    "DataConfig.synthetic_rows = 3000", "EVAL_RTT_QUERIES = 12", "EVAL_STEPS = 1",
    # float32: an untrained model's quantiles sit near bin edges, where bf16 passes partitioned
    # differently moved one of 12 p50s across a bin (median abs error 1.3% apart).
    'ModelConfig.dtype = "float32"',
]


# bf16 forward passes partitioned differently (rows sharded here, replicated there) differ in the
# last bits; the model's RTT quantiles move by ~1e-4 relative. Baselines do not run the model.
MODEL_REL = 2e-3


@pytest.mark.slow
def test_mesh_evaluator_matches_the_evaluation_module():
    cfg = config_lib.load([str(REPO / "gin/quickstart.gin")], TINY)
    mesh = partitioning.make_mesh(cfg.mesh)  # fsdp over this process's 8 devices
    tx, _ = optimizer_lib.make_optimizer(cfg.optimizer)
    state = state_lib.init_train_state(cfg.model, tx, mesh, cfg.mesh.logical_axis_rules, seed=3)
    got = rtt_eval.rtt_metrics(cfg, state.params, mesh, cfg.mesh.logical_axis_rules,
                               max_queries=12)
    want = evaluate_lib.eval_rtt_metrics(cfg, state.params, max_queries=12)
    assert set(got) == set(want) and "rtt/model/median_relative_error" in got
    for key in want:
        rel = MODEL_REL if key.startswith("rtt/model/") else 1e-12
        assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-6), key


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"),
                                             size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["tensors"]:
        values = [(e.step, np.asarray(tensor_util.make_ndarray(e.tensor_proto)))
                  for e in acc.Tensors(tag)]
        if values and values[0][1].dtype.kind in "fiu":
            out[tag] = {step: float(v) for step, v in values}
    return out


def _bindings(root: Path, run_name: str, extra=()) -> list[str]:
    # Learning rate 0: the one train step leaves the parameters as loaded, so both runs
    # evaluate exactly the checkpoint's parameters.
    return [*TINY, f'BASE_OUTPUT_DIRECTORY = "{root}"', f'RUN_NAME = "{run_name}"', "STEPS = 1",
            "LEARNING_RATE = 0.0", "OptimizerConfig.ema_decay = 0.0", "EVAL_INTERVAL = 1",
            "CHECKPOINT_PERIOD = 1", "ASYNC_CHECKPOINTING = False", *extra]


@pytest.mark.slow
def test_two_processes_log_the_rtt_eval_of_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    gin = ["--gin_file=gin/quickstart.gin"]
    one = subprocess.run(
        [sys.executable, "-m", "pingllm.main", *gin,
         *(f"--gin_bindings={b}" for b in _bindings(tmp_path, "one"))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-4000:]
    checkpoint = tmp_path / "one" / "checkpoints" / "1"
    assert checkpoint.is_dir()
    two = subprocess.run(
        [sys.executable, "launch/local.py", "--num_processes", "2", "--devices_per_process", "1",
         "--log_dir", str(tmp_path / "logs_two"), "--", *gin,
         *(f"--gin_bindings={b}" for b in _bindings(
             tmp_path, "two", [f'LOAD_PARAMETERS_PATH = "{checkpoint}"']))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs_two").glob("*")))
    assert two.returncode == 0, (two.stderr[-3000:], logs[-4000:])
    s1, s2 = _scalars(tmp_path / "one"), _scalars(tmp_path / "two")
    rtt = sorted(k for k in s1 if k.startswith("eval/rtt/"))
    assert {f"eval/rtt/{m}/median_relative_error"
            for m in ("model", "vivaldi", "per_destination_median")} <= set(rtt)
    assert "RTT metrics skipped" not in logs
    for key in [*rtt, "eval/loss"]:
        assert key in s2, (key, sorted(s2))
        assert s2[key][1] == pytest.approx(s1[key][1], rel=1e-4, abs=1e-6), key
