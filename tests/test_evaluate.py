"""Evaluation: exact metric values and reliability table, held-out sampling, and the CLI end to
end on the session's tiny checkpoint (JSON of every method, PNGs, TensorBoard images)."""

import json
import os

import numpy as np
import pytest

# The session fixtures of test_predict.py: one tiny training run serves both files.
from test_predict import tiny_run  # noqa: F401

from pingllm.cli import evaluate as evaluate_cli
from pingllm.eval import heldout as evaluate


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


def test_adaptive_calibration_bins_hold_enough_queries():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.2, 1000)
    failed = rng.random(1000) < p
    rows = evaluate.adaptive_calibration_table(p, failed, min_count=100)
    assert len(rows) == 10 and all(r["count"] == 100 for r in rows)
    assert all(a["bin_hi"] <= b["bin_lo"] for a, b in zip(rows, rows[1:]))
    # A constant predictor is one bin (ties never split), its observed rate the base rate.
    const = evaluate.adaptive_calibration_table(np.full(1000, 0.03), failed, min_count=100)
    assert len(const) == 1 and const[0]["observed_rate"] == pytest.approx(failed.mean())
    # 250 queries: two bins of at least 100, not bins of 1 and 3.
    few = evaluate.adaptive_calibration_table(p[:250], failed[:250], min_count=100)
    assert [r["count"] for r in few] == [125, 125]
    # Half the predictions tied at 0: the tie stays whole, the rest splits.
    p_tied = np.where(np.arange(1000) < 500, 0.0, p)
    tied = evaluate.adaptive_calibration_table(p_tied, failed, min_count=100)
    assert tied[0]["count"] == 500 and tied[0]["bin_hi"] == 0.0
    assert sum(r["count"] for r in tied) == 1000


def test_distribution_scores_reward_sharp_and_calibrated_distributions():
    rng = np.random.default_rng(1)
    true = np.exp(rng.normal(np.log(50.0), 0.5, 2000))
    centre = np.full(2000, 50.0)
    right = rng.normal(0, 0.5, 4000)  # the true spread of ln(true / centre)
    m = evaluate.baseline_distribution_metrics(centre, true, right)
    assert m["p10_p90_coverage"] == pytest.approx(0.8, abs=0.03)
    # CRPS of N(0, s) at its own draws is s / sqrt(pi) (Gneiting and Raftery 2007).
    assert m["crps_log_rtt"] == pytest.approx(0.5 / np.sqrt(np.pi), rel=0.05)
    narrow = evaluate.baseline_distribution_metrics(centre, true, right * 0.2)
    wide = evaluate.baseline_distribution_metrics(centre, true, right * 5)
    assert narrow["p10_p90_coverage"] < 0.3 and wide["p10_p90_coverage"] > 0.99
    for other in (narrow, wide):
        assert other["crps_log_rtt"] > m["crps_log_rtt"]
        assert other["rtt_log_score"] < m["rtt_log_score"]


def test_model_distribution_scores_from_first_byte_probabilities():
    from pingllm.data import tokens

    true = np.array([3.0, 40.0, 300.0])
    b1 = tokens.encode_rtt(true).astype(np.int64) >> 8
    exact = np.zeros((3, 256))
    exact[np.arange(3), b1] = 1.0
    m = evaluate.model_distribution_metrics(exact, true)
    assert m["rtt_log_score"] == pytest.approx(0.0)
    # All mass in the right bin: CRPS at most the bin's width in ln RTT (< 0.23).
    assert 0 < m["crps_log_rtt"] < 0.23
    off = np.roll(exact, 8, axis=1)  # one octave too high
    m_off = evaluate.model_distribution_metrics(off, true)
    assert m_off["rtt_log_score"] < -20 and m_off["crps_log_rtt"] > 0.5
    # The baseline scoring agrees on a shared case: a point mass inside the measured bin.
    point = evaluate.baseline_distribution_metrics(true, true, np.zeros(100))
    assert point["rtt_log_score"] == pytest.approx(0.0, abs=1e-6)
    assert point["crps_log_rtt"] < 0.01


def test_comparison_names_the_best_baseline_and_the_bars():
    metrics = {
        "model": {"median_relative_error": 0.4, "median_abs_error_ms": 10.0,
                  "p_fail_brier": 0.027, "p_fail_brier_base_rate": 0.03,
                  "p10_p90_coverage": 0.8},
        "vivaldi": {"median_relative_error": 0.6, "median_abs_error_ms": 30.0},
        "nearest_neighbour": {"median_relative_error": 0.45, "median_abs_error_ms": 9.0},
        "floor": {"median_relative_error": 0.01, "median_abs_error_ms": 0.1},
    }
    c = evaluate.comparison(metrics)
    assert c["best_baseline"] == "nearest_neighbour"  # the floor is not a baseline
    assert c["x_best_baseline"] == pytest.approx(0.4 / 0.45)
    assert c["x_vivaldi"] == pytest.approx(0.4 / 0.6)
    assert c["brier_x_base_rate"] == pytest.approx(0.9)
    assert c["bars"] == {"rel_error <= 0.65x vivaldi": False,
                         "rel_error <= 0.8x best baseline": False,
                         "abs_error below every baseline": False,
                         "brier <= 0.9x base rate": True,
                         "p10-p90 coverage in [0.75, 0.85]": True}
    assert "MISSED" in evaluate.format_comparison(c)


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
    assert evaluate_cli.main(["--checkpoint", tiny_run, "--max_queries", "24", "--output_json",
                          str(out_json), "--eval_batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "median_relative_error" in printed and "vivaldi" in printed
    metrics = json.loads(out_json.read_text())
    for method in ("model", "model_window_context", "vivaldi", "per_destination_median",
                   "global_median", "floor", "matrix_factorisation", "dmfsgd",
                   "nearest_neighbour"):
        assert 0 <= metrics[method]["median_relative_error"] < 100, method
        assert metrics[method]["n_queries"] == 24
        assert metrics[method]["p_fail_brier_base_rate"] >= 0
    for method in ("model", "model_window_context", "vivaldi", "matrix_factorisation",
                   "nearest_neighbour"):  # every method with a distribution is scored
        assert metrics[method]["crps_log_rtt"] > 0 and metrics[method]["rtt_log_score"] < 0
        assert 0 <= metrics[method]["p10_p90_coverage"] <= 1
    assert "crps_log_rtt" not in metrics["floor"] and "n/a" in printed  # point-only
    comp = json.loads((tmp_path / "metrics_comparison.json").read_text())
    assert comp["best_baseline"] in metrics and set(comp["bars"]) >= {
        "rel_error <= 0.8x best baseline", "brier <= 0.9x base rate"}
    assert "best baseline:" in printed
    assert metrics["model"]["loss"] > 0 and metrics["model"]["loss/result"] > 0
    assert 0 <= metrics["model"]["p10_p90_coverage"] <= 1
    # On synthetic data the generator's truth is nearly exact (only queueing noise remains).
    assert metrics["floor"]["median_relative_error"] < 0.1
    calib = json.loads((tmp_path / "metrics_calibration.json").read_text())
    assert sum(r["count"] for r in calib["model"]) == 24
    assert len(calib["model"]) == 1  # 24 queries: one bin (at least 100 per bin, or all)
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

    from pingllm.eval import predictor as predict

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
