"""Held-out evaluation: the model's RTT predictions against baselines on pairs never trained on.

The command is `pingllm-evaluate` (pingllm/cli/evaluate.py).

Queries are measurements of the test split (pairs never in training), sampled uniformly with a
fixed seed. The model's prompt for a query is a context of the same source, then the query's
source, destination and time (predict.py reads the answer). Contexts:

- `train` (default, the headline): the source's training-split measurements before the query
  time (other destinations only, since the query's pair is held out) - what the predictor uses
  and the same information Vivaldi's source coordinate is fitted from;
- `window`: the measurements preceding the query in its test window, as in training. In the
  synthetic data most of them are earlier pings of the very same pair, so this mostly measures
  in-context copying, not learned latency structure; reported as `model_window_context`.

Baselines (baselines.py: medians, Vivaldi, matrix factorisation, DMFSGD, nearest known
neighbour) are fitted on the training split's measurements; on synthetic data `floor` is the
generator's own noise-free latency used as a predictor. The table ends with the model against
the best baseline. Every method with a distribution (the model's own; a baseline's point times
its out-of-fold error distribution) gets p10-p90 coverage, the CRPS of ln RTT and the log score
of the measured RTT's first-byte bin; P(fail) gets equal-count reliability bins and the Brier
score of the training failure rate beside its own (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import numpy as np

from pingllm.eval import baselines as baselines_lib
from pingllm.eval import predictor as predict_lib

RTT_RANGES_MS = ((0.0, 10.0), (10.0, 50.0), (50.0, 150.0), (150.0, np.inf))
CALIBRATION_BINS = np.array([0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
HEADLINE = ("median_relative_error", "median_abs_error_ms", "within_10pct", "within_25pct",
            "p_fail_brier", "n_rtt")
# What `pingllm-evaluate` prints: point errors, P(fail) against the base rate, and
# the distribution scores (n/a for a method without a distribution).
TABLE_COLUMNS = ("median_relative_error", "median_abs_error_ms", "within_25pct", "p_fail_brier",
                 "p_fail_brier_base_rate", "p10_p90_coverage", "crps_log_rtt", "rtt_log_score",
                 "n_rtt")


# ---- metrics (pure numpy) ----


def _range_name(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}ms" if np.isfinite(hi) else f">={lo:g}ms"


def point_metrics(pred_ms: np.ndarray, true_ms: np.ndarray) -> dict[str, float]:
    """Point-estimate errors over successful measurements (true_ms > 0)."""
    pred_ms, true_ms = np.asarray(pred_ms, np.float64), np.asarray(true_ms, np.float64)
    if len(true_ms) == 0:
        return {"n_rtt": 0}
    abs_err = np.abs(pred_ms - true_ms)
    rel = abs_err / np.maximum(true_ms, 1e-6)
    return {
        "median_abs_error_ms": float(np.median(abs_err)),
        "median_relative_error": float(np.median(rel)),
        "within_10pct": float(np.mean(rel <= 0.10)),
        "within_25pct": float(np.mean(rel <= 0.25)),
        "n_rtt": int(len(true_ms)),
    }


def calibration_table(p_fail: np.ndarray, failed: np.ndarray,
                      edges: np.ndarray = CALIBRATION_BINS) -> list[dict[str, float]]:
    """Reliability table: per bin of predicted p_fail, mean prediction vs observed failure rate."""
    p_fail, failed = np.asarray(p_fail, np.float64), np.asarray(failed, bool)
    which = np.clip(np.searchsorted(edges, p_fail, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.any():
            rows.append({"bin_lo": float(edges[b]), "bin_hi": float(edges[b + 1]),
                         "count": int(sel.sum()), "mean_predicted": float(p_fail[sel].mean()),
                         "observed_rate": float(failed[sel].mean())})
    return rows


def adaptive_calibration_table(p_fail: np.ndarray, failed: np.ndarray, *,
                               min_count: int = 100,
                               max_bins: int = 10) -> list[dict[str, float]]:
    """Reliability table over equal-count bins of predicted p_fail: at most max_bins, each of
    at least min_count queries (ties stay in one bin, so a constant predictor has one)."""
    p_fail, failed = np.asarray(p_fail, np.float64), np.asarray(failed, bool)
    n = len(p_fail)
    if n == 0:
        return []
    order = np.argsort(p_fail, kind="stable")
    p_sorted, f_sorted = p_fail[order], failed[order]
    n_bins = max(1, min(max_bins, n // max(min_count, 1)))
    cuts = [int(round(k * n / n_bins)) for k in range(1, n_bins)]
    # Move each cut to the end of its run of equal predictions; drop cuts that leave a bin
    # smaller than min_count (its queries join the next bin).
    bounds, last = [0], 0
    for c in cuts:
        c = int(np.searchsorted(p_sorted, p_sorted[c - 1], side="right"))
        if c - last >= min(min_count, n) and n - c >= min(min_count, n):
            bounds.append(c)
            last = c
    bounds.append(n)
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi <= lo:
            continue
        rows.append({"bin_lo": float(p_sorted[lo]), "bin_hi": float(p_sorted[hi - 1]),
                     "count": int(hi - lo), "mean_predicted": float(p_sorted[lo:hi].mean()),
                     "observed_rate": float(f_sorted[lo:hi].mean())})
    return rows


# ---- predictive distributions: CRPS and log score of the measured RTT ----

# ln(ms) grid on which CDFs are integrated for the CRPS (1 us .. 60 s).
LOG_GRID = np.linspace(np.log(1e-3), np.log(6e4), 3001)


def _first_byte_edges_ms() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(canonical first RTT bytes, their lower and upper RTT edges in ms), in RTT order."""
    from pingllm.data import tokens

    lo, hi = tokens.rtt_byte1_ranges_us()
    canon = np.flatnonzero(tokens.CANONICAL_RTT_BYTE1)
    return canon, np.maximum(lo[canon], 1.0) / 1000.0, hi[canon] / 1000.0


def first_byte_bin(true_ms: np.ndarray) -> np.ndarray:
    """Index (into the canonical first bytes) of the bin each RTT falls in."""
    _, _, hi = _first_byte_edges_ms()
    return np.minimum(np.searchsorted(hi, np.asarray(true_ms, np.float64), side="right"),
                      len(hi) - 1)


def crps_log(cdf_NxG: np.ndarray, true_ms: np.ndarray, grid: np.ndarray = LOG_GRID) -> np.ndarray:
    """CRPS of ln(RTT) per query: integral over the grid of (F(x) - 1[x >= ln y])^2."""
    step = np.diff(grid).mean()
    heaviside = grid[None, :] >= np.log(np.maximum(true_ms, 1e-3))[:, None]
    return np.sum((cdf_NxG - heaviside) ** 2, axis=1) * step


def model_distribution_metrics(p_b1_Nx256: np.ndarray, true_ms: np.ndarray) -> dict[str, float]:
    """CRPS of ln RTT (the first-byte CDF, uniform in ln RTT inside each bin) and the log score
    of the measured RTT's first-byte bin (exact: ln p(b1)), over queries with a reply."""
    canon, lo, hi = _first_byte_edges_ms()
    p = np.asarray(p_b1_Nx256, np.float64)[:, canon]
    p = p / p.sum(axis=1, keepdims=True)
    xp = np.log(np.concatenate([lo[:1], hi]))
    cdf = np.stack([np.interp(LOG_GRID, xp, np.concatenate([[0.0], np.cumsum(row)]))
                    for row in p]) if len(p) else np.zeros((0, len(LOG_GRID)))
    mass = p[np.arange(len(p)), first_byte_bin(true_ms)]
    return {"crps_log_rtt": float(crps_log(cdf, true_ms).mean()) if len(p) else float("nan"),
            "rtt_log_score": float(np.log(np.maximum(mass, 1e-12)).mean())
            if len(p) else float("nan")}


def residual_cdf(log_residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z grid, CDF) of a smoothed distribution of ln(measured / predicted): a logistic-kernel
    density over the residual sample with Silverman's bandwidth."""
    r = np.sort(np.asarray(log_residuals, np.float64))
    spread = min(np.std(r), (np.quantile(r, 0.75) - np.quantile(r, 0.25)) / 1.34)
    h = max(0.9 * spread * len(r) ** -0.2, 1e-3)
    scale = h * np.sqrt(3.0) / np.pi  # logistic kernel with standard deviation h
    z = np.linspace(r[0] - 8 * h, r[-1] + 8 * h, 2001)
    cdf = np.mean(1.0 / (1.0 + np.exp(-(z[:, None] - r[None, :]) / scale)), axis=1)
    return z, cdf


def baseline_distribution_metrics(pred_ms: np.ndarray, true_ms: np.ndarray,
                                  log_residuals: np.ndarray) -> dict[str, float]:
    """A point baseline as a distribution: RTT = prediction x exp(residual), the residual drawn
    from its out-of-fold errors on training pairs (baselines.out_of_fold_log_residuals).
    p10-p90 coverage, CRPS of ln RTT and the first-byte-bin log score, as for the model."""
    pred = np.log(np.maximum(np.asarray(pred_ms, np.float64), 1e-3))
    true = np.asarray(true_ms, np.float64)
    z, fz = residual_cdf(log_residuals)
    q10, q90 = np.quantile(log_residuals, [0.1, 0.9])
    inside = (true >= np.exp(pred + q10)) & (true <= np.exp(pred + q90))
    cdf = np.stack([np.interp(LOG_GRID - p, z, fz, left=0.0, right=1.0) for p in pred]) \
        if len(pred) else np.zeros((0, len(LOG_GRID)))
    _, lo, hi = _first_byte_edges_ms()
    b = first_byte_bin(true)
    mass = (np.interp(np.log(hi[b]) - pred, z, fz, left=0.0, right=1.0)
            - np.interp(np.log(lo[b]) - pred, z, fz, left=0.0, right=1.0))
    return {"p10_p90_coverage": float(inside.mean()) if len(true) else float("nan"),
            "crps_log_rtt": float(crps_log(cdf, true).mean()) if len(true) else float("nan"),
            "rtt_log_score": float(np.log(np.maximum(mass, 1e-12)).mean())
            if len(true) else float("nan")}


def rtt_metrics(pred_rtt_ms, true_rtt_ms, p_fail, ip_version,
                base_rate: float | None = None) -> dict[str, float]:
    """All RTT and failure metrics of one method, flat ('<metric>[/<breakdown>]' keys).

    true_rtt_ms < 0 marks a failed measurement (it counts for P(fail), not for RTT errors).
    Breakdowns: 'ipv4'/'ipv6' and the true-RTT ranges of RTT_RANGES_MS. base_rate (the
    training failure rate) adds the Brier score of predicting it for every query.
    """
    pred, true = np.asarray(pred_rtt_ms, np.float64), np.asarray(true_rtt_ms, np.float64)
    p_fail, ver = np.asarray(p_fail, np.float64), np.asarray(ip_version)
    failed = true < 0
    ok = ~failed
    out: dict[str, float] = dict(point_metrics(pred[ok], true[ok]))
    for v in (4, 6):
        sel = ok & (ver == v)
        for k, val in point_metrics(pred[sel], true[sel]).items():
            out[f"{k}/ipv{v}"] = val
    for lo, hi in RTT_RANGES_MS:
        sel = ok & (true >= lo) & (true < hi)
        for k, val in point_metrics(pred[sel], true[sel]).items():
            out[f"{k}/{_range_name(lo, hi)}"] = val
    eps = 1e-6
    clipped = np.clip(p_fail, eps, 1 - eps)
    out["p_fail_brier"] = float(np.mean((p_fail - failed) ** 2)) if len(p_fail) else 0.0
    out["p_fail_log_loss"] = float(-np.mean(np.where(failed, np.log(clipped),
                                                     np.log1p(-clipped)))) if len(p_fail) else 0.0
    out["observed_fail_rate"] = float(failed.mean()) if len(failed) else 0.0
    out["mean_p_fail"] = float(p_fail.mean()) if len(p_fail) else 0.0
    out["n_queries"] = int(len(true))
    if base_rate is not None and len(p_fail):
        out["p_fail_brier_base_rate"] = float(np.mean((base_rate - failed) ** 2))
    return out


# ---- held-out queries ----


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Sampled test measurements and where each sits (record index, position in it)."""

    src_addr: np.ndarray  # uint8[N, 16]
    dst_addr: np.ndarray
    ip_version: np.ndarray  # int8[N]
    event_time: np.ndarray  # int64[N]
    rtt_ms: np.ndarray  # float32[N], -1 failed
    record: np.ndarray  # int64[N]
    position: np.ndarray  # int64[N]

    def __len__(self) -> int:
        return len(self.event_time)

    def query(self, i: int) -> predict_lib.Query:
        return predict_lib.Query(self.src_addr[i], self.dst_addr[i], int(self.ip_version[i]),
                                 int(self.event_time[i]))


def sample_held_out(test_records: Sequence[dict], max_queries: int, seed: int = 0) -> HeldOut:
    """Up to max_queries test measurements, uniformly without replacement (seeded)."""
    counts = np.array([len(r["event_time"]) for r in test_records])
    total = int(counts.sum())
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(total, size=min(max_queries, total), replace=False))
    starts = np.cumsum(counts) - counts
    rec = np.searchsorted(starts, pick, side="right") - 1
    pos = pick - starts[rec]
    recs = [test_records[int(r)] for r in rec]
    return HeldOut(
        src_addr=np.stack([np.asarray(r["src_addr"], np.uint8) for r in recs]),
        dst_addr=np.stack([np.asarray(r["dst_addr"][p], np.uint8) for r, p in zip(recs, pos)]),
        ip_version=np.array([int(r["ip_version"]) for r in recs], np.int8),
        event_time=np.array([int(r["event_time"][p]) for r, p in zip(recs, pos)], np.int64),
        rtt_ms=np.array([float(r["rtt_ms"][p]) for r, p in zip(recs, pos)], np.float32),
        record=rec.astype(np.int64), position=pos.astype(np.int64))


def window_context(record: dict, position: int) -> dict:
    """The measurements before `position` in its record (the query's window)."""
    return {k: (record[k] if k in ("src_addr", "ip_version") else record[k][:position])
            for k in ("src_addr", "ip_version", "dst_addr", "event_time", "rtt_ms")}


def model_prompts(predictor: predict_lib.Predictor, held: HeldOut, test_records,
                  context: str) -> list[np.ndarray]:
    """The model's prompt of each held-out query with the `train` or `window` context."""
    prompts = []
    for i in range(len(held)):
        q = held.query(i)
        if context == "window":
            rec = int(held.record[i])
            ctx = window_context(test_records[rec], int(held.position[i]))
            prompts.append(predictor.prompt(q, ctx, window_index=rec, mode="drawn"))
        else:
            prompts.append(predictor.prompt(q, predictor.training_context(q)))
    return prompts


def model_predictions(predictor: predict_lib.Predictor, held: HeldOut, test_records,
                      context: str) -> predict_lib.Predictions:
    return predictor.predict_prompts(model_prompts(predictor, held, test_records, context))


def first_byte_distribution(predictor: predict_lib.Predictor,
                            prompts: Sequence[np.ndarray]) -> np.ndarray:
    """p(b1) over the 256 first RTT bytes (canonical only) after prompt + RTT_START."""
    from pingllm.data import tokens

    rows = [np.append(p, tokens.RTT_START).astype(np.int32) for p in prompts]
    logits = predictor._logits(rows)[:, 1]
    valid = np.broadcast_to(predict_lib.CANONICAL_B1, (len(rows), 256))
    return predict_lib.byte_distribution(logits, valid)


def comparison(metrics: dict[str, dict[str, float]], model: str = "model") -> dict:
    """The model against the best baseline (lowest median relative error), Vivaldi, every
    baseline's absolute error and the base rate's Brier; the issue's bars as booleans."""
    names = [n for n in baselines_lib.BASELINE_NAMES if n in metrics]
    if model not in metrics or not names:
        return {}
    mm = metrics[model]
    best = min(names, key=lambda n: metrics[n]["median_relative_error"])
    rel, best_rel = mm["median_relative_error"], metrics[best]["median_relative_error"]
    out = {"best_baseline": best, "best_baseline_median_relative_error": best_rel,
           "model_median_relative_error": rel, "x_best_baseline": rel / best_rel,
           "min_baseline_median_abs_error_ms": min(metrics[n]["median_abs_error_ms"]
                                                   for n in names),
           "model_median_abs_error_ms": mm["median_abs_error_ms"]}
    if "vivaldi" in metrics:
        out["x_vivaldi"] = rel / metrics["vivaldi"]["median_relative_error"]
    base = mm.get("p_fail_brier_base_rate")
    if base:
        out["brier_x_base_rate"] = mm["p_fail_brier"] / base
    out["bars"] = {
        "rel_error <= 0.65x vivaldi": out.get("x_vivaldi", np.inf) <= 0.65,
        "rel_error <= 0.8x best baseline": out["x_best_baseline"] <= 0.8,
        "abs_error below every baseline":
            out["model_median_abs_error_ms"] < out["min_baseline_median_abs_error_ms"],
        "brier <= 0.9x base rate": out.get("brier_x_base_rate", np.inf) <= 0.9,
        "p10-p90 coverage in [0.75, 0.85]": 0.75 <= mm.get("p10_p90_coverage", -1) <= 0.85,
    }
    return out


# ---- token losses on the held-out split ----


def token_losses(model_cfg, params, batches) -> dict[str, float]:
    """Per-token loss and per-field losses (step.loss_sums) over eval batches, teacher-forced."""
    import jax

    from pingllm import step as step_lib
    from pingllm.model import Transformer

    model = Transformer(model_cfg)

    @jax.jit
    def sums(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"])
        return step_lib.loss_sums(logits, batch)

    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in jax.device_get(sums(params, batch)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: float(v) for k, v in step_lib.means_from_sums(totals).items()
            if k.startswith("loss")}


# ---- the whole evaluation ----


def is_synthetic(data_config) -> bool:
    return data_config.source == "synthetic_memory" or data_config.tfds_config == "synthetic"


def evaluate(predictor: predict_lib.Predictor, cfg, *, max_queries: int = 500,
             context: str = "train", seed: int = 0, eval_batches: int | None = None,
             vivaldi: baselines_lib.VivaldiConfig | None = None,
             log=print, distributions: bool = True, calibration_min_count: int = 100) -> dict:
    """{method: {metric: value}} plus 'calibration' {method: table} (equal-count bins of at
    least calibration_min_count queries), 'comparison' (the model against the best baseline)
    and the raw predictions. distributions: also score each method's RTT distribution."""
    from pingllm.data import pipeline

    t0 = time.perf_counter()
    train_src = pipeline.record_source(cfg.data, "train")
    test_src = pipeline.record_source(cfg.data, cfg.data.eval_split)  # 'test' or 'later'
    test_records = [test_src[i] for i in range(len(test_src))]
    train_m = baselines_lib.measurements_of_records(train_src[i] for i in range(len(train_src)))
    fitted = baselines_lib.fit_all(train_m, vivaldi or baselines_lib.VivaldiConfig())
    held = sample_held_out(test_records, max_queries, seed)
    log(f"evaluate: {len(train_m)} training measurements, {len(held)} held-out queries "
        f"({time.perf_counter() - t0:.1f}s to load and fit baselines)")

    point: dict[str, np.ndarray] = {}
    p_fail: dict[str, np.ndarray] = {}
    residuals: dict[str, np.ndarray] = {}
    nn_level = None
    for name in baselines_lib.BASELINE_NAMES:
        if getattr(fitted, name) is None:
            log(f"evaluate: {name}: nothing to fit on (n/a)")
            continue
        point[name], p_fail[name] = fitted.predict(name, held.src_addr, held.dst_addr,
                                                   held.ip_version)
        if name == "nearest_neighbour":
            _, nn_level = fitted.nearest_neighbour.predict_with_level(
                held.src_addr, held.dst_addr, held.ip_version)
    if distributions:
        try:
            residuals = baselines_lib.out_of_fold_log_residuals_all(
                train_m, fitted, tuple(n for n in baselines_lib.BASELINE_NAMES if n in point))
        except ValueError as e:  # too little training data to leave pairs out: n/a
            log(f"evaluate: no baseline distributions ({e})")
    log(f"evaluate: baselines predicted{' with out-of-fold residuals' if residuals else ''}"
        f" ({time.perf_counter() - t0:.1f}s since start)")
    if is_synthetic(cfg.data):
        from pingllm.data import synthetic

        world = synthetic.SyntheticInternet(seed=cfg.data.synthetic_seed)
        point["floor"] = world.noise_free_rtt_ms(held.src_addr, held.dst_addr, held.ip_version,
                                                 held.event_time)
        p_fail["floor"] = np.full(len(held), baselines_lib.failure_rate(train_m))

    contexts = ("train", "window") if context == "both" else (context,)
    quantiles = {}
    first_bytes: dict[str, np.ndarray] = {}
    for ctx in contexts:
        name = "model" if ctx == "train" else "model_window_context"
        if context == "window":
            name = "model"
        t = time.perf_counter()
        prompts = model_prompts(predictor, held, test_records, ctx)
        preds = predictor.predict_prompts(prompts)
        if distributions:
            first_bytes[name] = first_byte_distribution(predictor, prompts)
        log(f"evaluate: {name} ({ctx} context): {len(held)} queries in "
            f"{time.perf_counter() - t:.1f}s")
        point[name], p_fail[name] = preds.rtt_p50, preds.p_fail
        quantiles[name] = preds

    base_rate = baselines_lib.failure_rate(train_m)
    ok = held.rtt_ms >= 0
    results: dict = {}
    for name in point:
        results[name] = rtt_metrics(point[name], held.rtt_ms, p_fail[name], held.ip_version,
                                    base_rate=base_rate)
    for name, preds in quantiles.items():
        inside = (held.rtt_ms[ok] >= preds.rtt_p10[ok]) & (held.rtt_ms[ok] <= preds.rtt_p90[ok])
        results[name]["p10_p90_coverage"] = float(inside.mean()) if ok.any() else 0.0
        if name in first_bytes:
            results[name].update(model_distribution_metrics(first_bytes[name][ok],
                                                            held.rtt_ms[ok]))
    for name, res in residuals.items():
        results[name].update(baseline_distribution_metrics(point[name][ok], held.rtt_ms[ok],
                                                           res))
    if nn_level is not None:
        for k in range(int(nn_level.max()) + 1):
            results["nearest_neighbour"][f"answered_at_level/{k}"] = float(np.mean(nn_level == k))
    n_batches = eval_batches if eval_batches is not None else cfg.run.eval_steps
    if n_batches > 0:
        batches = pipeline.eval_batches(cfg.data, num_batches=n_batches)
        results["model"].update(token_losses(predictor.model_cfg, predictor.params, batches))
    calibration = {name: adaptive_calibration_table(p_fail[name], held.rtt_ms < 0,
                                                    min_count=calibration_min_count)
                   for name in point}
    return {"metrics": results, "calibration": calibration, "held_out": held, "point": point,
            "p_fail": p_fail, "quantiles": quantiles, "comparison": comparison(results)}


@functools.lru_cache(maxsize=2)
def _rtt_eval_set(data_config, model_config, max_queries: int, seed: int):
    """(held-out queries, the model's prompts, baselines' predictions): all independent of the
    parameters, so the trainer's periodic eval builds them (reading the splits) only once."""
    from pingllm.data import pipeline

    train_src = pipeline.record_source(data_config, "train")
    test_src = pipeline.record_source(data_config, data_config.eval_split)
    test_records = [test_src[i] for i in range(len(test_src))]
    train_m = baselines_lib.measurements_of_records(train_src[i] for i in range(len(train_src)))
    # Only the two the trainer logs (the later baselines would add fitting time to its eval).
    fitted = baselines_lib.fit_all(train_m, names=())
    held = sample_held_out(test_records, max_queries, seed)
    builder = predict_lib.Predictor(model_config, None, data_config=data_config,
                                    seed=data_config.seed)
    prompts = tuple(builder.prompt(held.query(i), builder.training_context(held.query(i)))
                    for i in range(len(held)))
    baselines = {name: fitted.predict(name, held.src_addr, held.dst_addr, held.ip_version)
                 for name in ("vivaldi", "per_destination_median")}
    return held, prompts, baselines


def eval_rtt_metrics(cfg, params, *, max_queries: int = 64, seed: int = 0) -> dict[str, float]:
    """RTT metrics for the trainer's periodic eval: {'rtt/<method>/<metric>': value}.

    The model (train context) and the baselines on the same max_queries held-out queries;
    queries, prompts and baselines are built once per config (cached). Params may be sharded
    over this process's devices; single-process runs only (the prompts are host arrays).
    """
    held, prompts, baselines = _rtt_eval_set(cfg.data, cfg.model, max_queries, seed)
    predictor = predict_lib.Predictor(cfg.model, params, data_config=cfg.data, seed=cfg.data.seed)
    preds = predictor.predict_prompts(list(prompts))
    out = {}
    for name, (rtt, p_fail) in {"model": (preds.rtt_p50, preds.p_fail), **baselines}.items():
        m = rtt_metrics(rtt, held.rtt_ms, p_fail, held.ip_version)
        for key in ("median_relative_error", "median_abs_error_ms", "within_25pct",
                    "p_fail_brier"):
            out[f"rtt/{name}/{key}"] = m[key]
    return out


def format_table(metrics: dict[str, dict[str, float]], columns=HEADLINE) -> str:
    """A fixed-width text table: one row per method."""
    methods = list(metrics)
    width = max(len(m) for m in methods) + 2
    widths = [max(len(c) + 2, 12) for c in columns]
    head = "method".ljust(width) + "".join(c.rjust(w) for c, w in zip(columns, widths))
    lines = [head, "-" * len(head)]
    for m in methods:
        cells = []
        for c, w in zip(columns, widths):
            v = metrics[m].get(c)
            cells.append(("n/a" if v is None else f"{v:.4g}").rjust(w))
        lines.append(m.ljust(width) + "".join(cells))
    return "\n".join(lines)


def format_calibration(table: list[dict[str, float]]) -> str:
    lines = ["p_fail bin          count  mean_predicted  observed_rate"]
    for r in table:
        lines.append(f"[{r['bin_lo']:.4f}, {r['bin_hi']:.4f}]  {r['count']:>7d}  "
                     f"{r['mean_predicted']:>14.4f}  {r['observed_rate']:>13.4f}")
    return "\n".join(lines)


def format_comparison(comp: dict) -> str:
    """The model against the best baseline and the issue's bars, one line each."""
    if not comp:
        return ""
    lines = [f"best baseline: {comp['best_baseline']} "
             f"({comp['best_baseline_median_relative_error']:.4f}); model "
             f"{comp['model_median_relative_error']:.4f} = {comp['x_best_baseline']:.3f}x"
             + (f", {comp['x_vivaldi']:.3f}x Vivaldi" if "x_vivaldi" in comp else ""),
             f"median abs error: model {comp['model_median_abs_error_ms']:.2f} ms, best "
             f"baseline {comp['min_baseline_median_abs_error_ms']:.2f} ms"]
    if "brier_x_base_rate" in comp:
        lines.append(f"P(fail) Brier: {comp['brier_x_base_rate']:.3f}x the base rate's")
    lines += [f"  [{'met' if ok else 'MISSED'}] {bar}" for bar, ok in comp["bars"].items()]
    return "\n".join(lines)
