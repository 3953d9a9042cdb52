"""The real CLI end to end: TensorBoard shows learning, multi-process equals single-process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "ModelConfig.num_layers = 2",
    "ModelConfig.emb_dim = 64",
    "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 32",
    "ModelConfig.mlp_dim = 128",
    "MAX_TARGET_LENGTH = 128",
    "GLOBAL_BATCH_SIZE = 8",
    "DataConfig.synthetic_rows = 20000",
    "EVAL_STEPS = 1",
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One dataset and one compilation cache for every run of this module."""
    root = tmp_path_factory.mktemp("e2e")
    return root


def _bindings(root: Path, run_name: str, extra=()) -> list[str]:
    return [
        *TINY,
        f'BASE_OUTPUT_DIRECTORY = "{root / "out"}"',
        f'DATASET_PATH = "{root / "tfds"}"',
        f'RunConfig.compilation_cache_dir = "{root / "jax_cache"}"',
        f'RUN_NAME = "{run_name}"',
        *extra,
    ]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _main(root, run_name, extra=(), devices=1, timeout=600) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pingllm.main", "--gin_file=gin/quickstart.gin"]
    args += [f"--gin_bindings={b}" for b in _bindings(root, run_name, extra)]
    return subprocess.run(args, cwd=REPO, env=_env(devices), capture_output=True, text=True,
                          timeout=timeout)


def _local(root, run_name, extra=(), processes=2, devices=2, timeout=900):
    args = [sys.executable, "launch/local.py", "--num_processes", str(processes),
            "--devices_per_process", str(devices), "--log_dir", str(root / f"logs_{run_name}"),
            "--", "--gin_file=gin/quickstart.gin"]
    args += [f"--gin_bindings={b}" for b in _bindings(root, run_name, extra)]
    return subprocess.run(args, cwd=REPO, env=_env(devices), capture_output=True, text=True,
                          timeout=timeout)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's event files, read with TensorBoard's own loader."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        values = [(e.step, np.asarray(_tensor(e.tensor_proto))) for e in acc.Tensors(tag)]
        if values and values[0][1].dtype.kind in "fiu":
            out[tag] = [(step, float(v)) for step, v in values]
        else:  # text summaries (the operative config) are kept as strings
            out[tag] = [(step, v.item().decode() if v.size == 1 else v) for step, v in values]
    return out


def _tensor(proto):
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(proto)


def _check(proc):
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])


@pytest.mark.slow
def test_quickstart_shape_learns_and_writes_tensorboard(shared):
    proc = _main(shared, "learn", ["STEPS = 40", "LOG_PERIOD = 5", "EVAL_INTERVAL = 20",
                                   "LEARNING_RATE = 3e-3", "WARMUP_STEPS = 5",
                                   "CHECKPOINT_PERIOD = 20"])
    _check(proc)
    run_dir = shared / "out" / "learn"
    assert (run_dir / "config.gin").read_text().count("ModelConfig.num_layers") >= 1
    assert "STEPS = 40" in (run_dir / "operative_config.gin").read_text() or (
        "RunConfig.steps = 40" in (run_dir / "operative_config.gin").read_text()
    )
    scalars = _scalars(run_dir)
    losses = [v for _, v in sorted(scalars["loss"])]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5, losses
    for tag in ("loss/address", "loss/result", "loss/time", "learning_rate", "grad_norm",
                "perf/tokens_per_sec", "perf/steps_per_sec", "perf/mfu",
                "startup/time_to_first_step_s", "eval/loss", "eval/loss/result",
                "loss/novel_result", "eval/loss/novel_result"):
        assert tag in scalars, (tag, sorted(scalars))
    assert [s for s, _ in scalars["eval/loss"]] == [20, 40]
    # Held-out RTT errors of the model next to the baselines' (evaluate.eval_rtt_metrics).
    for method in ("model", "vivaldi", "per_destination_median"):
        for metric in ("median_relative_error", "median_abs_error_ms", "within_25pct"):
            values = [v for _, v in scalars[f"eval/rtt/{method}/{metric}"]]
            assert len(values) == 2 and all(np.isfinite(values)), (method, metric, values)
    vivaldi = [v for _, v in scalars["eval/rtt/vivaldi/median_relative_error"]]
    assert vivaldi[0] == vivaldi[1] > 0  # fitted once on the training split: the same queries
    (_, operative), = scalars["config/operative"]
    assert "ModelConfig.num_layers = 2" in operative
    assert "model:" in proc.stderr and "parameters" in proc.stderr
    assert "ETA" in proc.stderr
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["20", "40"]


@pytest.mark.slow
def test_two_processes_match_one_process(shared):
    extra = ["STEPS = 6", "LOG_PERIOD = 1", "EVAL_INTERVAL = 0", "CHECKPOINT_PERIOD = 100",
             "ModelConfig.dropout_rate = 0.1", "ICI_FSDP_PARALLELISM = 2",
             "ICI_DATA_PARALLELISM = 2"]
    one = _main(shared, "one_proc", extra, devices=4)
    _check(one)
    two = _local(shared, "two_proc", extra, processes=2, devices=2)
    _check(two)
    l1 = sorted(_scalars(shared / "out" / "one_proc")["loss"])
    l2 = sorted(_scalars(shared / "out" / "two_proc")["loss"])
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in l1], [v for _, v in l2], rtol=2e-5)


def test_state_is_initialised_sharded():
    """eval_shape -> shardings -> jitted init: every leaf lands in its own layout, split."""
    import jax

    from pingllm import config as config_lib
    from pingllm import train_state, trainer

    cfg = config_lib.load([str(REPO / "gin/quickstart.gin")],
                          [*TINY, "ICI_FSDP_PARALLELISM = 4", "ICI_TENSOR_PARALLELISM = 2"])
    setup = trainer.build(cfg)
    assert dict(setup.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    state = train_state.init_train_state(cfg.model, setup.optimizer, setup.mesh, setup.rules)
    leaves = jax.tree.leaves(state)
    shardings = jax.tree.leaves(setup.state_shardings)
    assert len(leaves) == len(shardings)
    split = 0
    for leaf, sharding in zip(leaves, shardings):
        assert leaf.sharding == sharding
        shard_shape = leaf.addressable_shards[0].data.shape
        if shard_shape != leaf.shape:
            split += 1
            assert np.prod(shard_shape) * 2 <= np.prod(leaf.shape)
    # Every matrix of params and both Adam moments is split; only scalars/norms are not.
    # 9 kernels (embedding, q, k, v, out, wi_0, wi_1, wo — scanned over layers — and logits),
    # plus the quickstart's field-slot embedding, each with its two Adam moments; norm scales
    # and counters stay replicated.
    assert cfg.model.field_slot_embedding
    assert split == 3 * 10


@pytest.mark.slow
def test_latency_network_builds_and_steps_on_cpu(shared):
    """The original 20x640 shape: parameter count at start, one real step with batch 1."""
    args = [sys.executable, "-m", "pingllm.main", "--gin_file=gin/latency_network.gin",
            "--gin_bindings=STEPS = 1", "--gin_bindings=GLOBAL_BATCH_SIZE = 1",
            "--gin_bindings=EVAL_INTERVAL = 0", "--gin_bindings=ENABLE_CHECKPOINTING = False",
            "--gin_bindings=DataConfig.synthetic_rows = 20000",
            f"--gin_bindings=BASE_OUTPUT_DIRECTORY = '{shared / 'out'}'",
            f"--gin_bindings=DATASET_PATH = '{shared / 'tfds'}'",
            "--gin_bindings=RUN_NAME = 'full_shape'"]
    proc = subprocess.run(args, cwd=REPO, env=_env(1), capture_output=True, text=True,
                          timeout=900)
    _check(proc)
    assert "model: 111," in proc.stderr or "model: 112," in proc.stderr, proc.stderr[-3000:]
    scalars = _scalars(shared / "out" / "full_shape")
    (step, loss), = scalars["loss"]
    assert step == 1 and 4.0 < loss < 7.0  # ~ln(267) at initialisation
