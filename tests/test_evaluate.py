"""Evaluation: exact metric values and reliability table, held-out sampling, and the CLI end to
end on the session's tiny checkpoint (JSON of every method, PNGs, TensorBoard images)."""

import json
import os

import numpy as np
import pytest

# The session fixtures of test_predict.py: one tiny training run serves both files.
from test_predict import tiny_run  # noqa: F401

from pingllm import evaluate


def test_rtt_metrics_exact_values():
    pred = np.array([10.0, 22.0, 100.0, 5.0, 50.0])
    true = np.array([10.0, 20.0, 200.0, -1.0, 40.0])
    p_fail = np.array([0.0, 0.1, 0.1, 0.5, 0.0])
    ver = np.array([4, 4, 6, 6, 6])
    m = evaluate.rtt_metrics(pred, true, p_fail, ver)
    # relative errors of the 4 replies: 0, 0.1, 0.5, 0.25
    assert m["median_relative_error"] == pytest.approx(0.175)
    assert m["median_abs_error_ms"] == pytest.approx(6.0)  # |0|, 2, 100, 10
    assert m["within_10pct"] == 0.5 and m["within_25pct"] == 0.75
    assert m["n_rtt"] == 4 and m["n_queries"] == 5
    assert m["median_relative_error/ipv4"] == pytest.approx(0.05)
    assert m["median_relative_error/ipv6"] == pytest.approx(0.375)
    assert m["n_rtt/10-50ms"] == 3
    assert m["n_rtt/>=150ms"] == 1 and m["median_relative_error/>=150ms"] == 0.5
    assert m["p_fail_brier"] == pytest.approx((0 + 0.01 + 0.01 + 0.25 + 0) / 5)
    assert m["observed_fail_rate"] == 0.2


def test_calibration_table_bins():
    p = np.array([0.0, 0.005, 0.03, 0.04, 0.3, 0.9, 1.0])
    failed = np.array([0, 0, 1, 0, 0, 1, 1], bool)
    rows = evaluate.calibration_table(p, failed)
    assert [(r["bin_lo"], r["count"]) for r in rows] == [(0.0, 2), (0.02, 2), (0.2, 1), (0.5, 2)]
    assert rows[1]["observed_rate"] == 0.5 and rows[1]["mean_predicted"] == pytest.approx(0.035)
    assert rows[3]["observed_rate"] == 1.0


def test_sample_held_out_is_seeded_and_positions_index_the_records():
    recs = [{"src_addr": np.full(16, i, np.uint8), "ip_version": np.int8(4),
             "dst_addr": np.arange(n * 16, dtype=np.uint8).reshape(n, 16) % 200,
             "event_time": np.arange(n) + 100 * i, "rtt_ms": np.arange(n, dtype=np.float32)}
            for i, n in enumerate([3, 5, 2])]
    a = evaluate.sample_held_out(recs, 6, seed=3)
    b = evaluate.sample_held_out(recs, 6, seed=3)
    assert np.array_equal(a.record, b.record) and np.array_equal(a.position, b.position)
    assert len(a) == 6
    for k in range(6):
        r, p = int(a.record[k]), int(a.position[k])
        assert a.event_time[k] == recs[r]["event_time"][p]
        assert a.src_addr[k][0] == r
    ctx = evaluate.window_context(recs[1], 3)
    assert ctx["event_time"].tolist() == [100, 101, 102] and ctx["ip_version"] == 4
    assert len(evaluate.sample_held_out(recs, 100)) == 10


def test_cli_end_to_end(tiny_run, tmp_path, capsys):  # noqa: F811
    out_json = tmp_path / "metrics.json"
    assert evaluate.main(["--checkpoint", tiny_run, "--max_queries", "24", "--output_json",
                          str(out_json), "--eval_batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "median_relative_error" in printed and "vivaldi" in printed
    metrics = json.loads(out_json.read_text())
    for method in ("model", "model_window_context", "vivaldi", "per_destination_median",
                   "global_median", "floor"):
        assert 0 <= metrics[method]["median_relative_error"] < 100, method
        assert metrics[method]["n_queries"] == 24
    assert metrics["model"]["loss"] > 0 and metrics["model"]["loss/result"] > 0
    assert 0 <= metrics["model"]["p10_p90_coverage"] <= 1
    # On synthetic data the generator's truth is nearly exact (only queueing noise remains).
    assert metrics["floor"]["median_relative_error"] < 0.1
    calib = json.loads((tmp_path / "metrics_calibration.json").read_text())
    assert sum(r["count"] for r in calib["model"]) == 24
    for name in ("pred_vs_true.png", "calibration.png"):
        with open(os.path.join(tiny_run, "eval", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = [f for f in os.listdir(os.path.join(tiny_run, "tensorboard"))
              if f.startswith("events.out.tfevents")]
    assert events
    blob = b"".join(open(os.path.join(tiny_run, "tensorboard", f), "rb").read() for f in events)
    assert b"eval/pred_vs_true" in blob and b"eval/calibration" in blob


def test_eval_rtt_metrics_for_the_trainer_with_sharded_params(tiny_run):  # noqa: F811
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from pingllm import predict

    cfg, params, _ = predict.load_checkpoint(tiny_run)
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    # Shard every matrix's leading axis over the devices when it divides, as the trainer might.
    def place(x):
        spec = PartitionSpec("fsdp") if x.ndim >= 2 and x.shape[0] % len(jax.devices()) == 0 \
            else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    sharded = jax.tree.map(place, params)
    got = evaluate.eval_rtt_metrics(cfg, sharded, max_queries=8)
    again = evaluate.eval_rtt_metrics(cfg, params, max_queries=8)
    assert set(got) == {f"rtt/{m}/{k}" for m in ("model", "vivaldi", "per_destination_median")
                        for k in ("median_relative_error", "median_abs_error_ms",
                                  "within_25pct", "p_fail_brier")}
    assert got["rtt/vivaldi/median_relative_error"] == again["rtt/vivaldi/median_relative_error"]
    assert got["rtt/model/median_relative_error"] == pytest.approx(
        again["rtt/model/median_relative_error"], rel=1e-3)
