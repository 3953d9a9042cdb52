"""Evaluation figures: predicted vs true RTT (log-log) and P(fail) calibration, as PNG files in
`<run_dir>/eval/` and as TensorBoard images (CLU) in `<run_dir>/tensorboard/`."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_COLORS = {"model": "tab:blue", "vivaldi": "tab:orange", "per_destination_median": "tab:green",
           "global_median": "tab:gray", "floor": "tab:red", "model_window_context": "tab:purple",
           "matrix_factorisation": "tab:brown", "dmfsgd": "tab:pink",
           "nearest_neighbour": "tab:olive"}


def pred_vs_true_figure(true_ms: np.ndarray, preds: dict[str, np.ndarray], *, title: str = ""):
    """Log-log scatter of each method's point estimate against the measured RTT."""
    ok = np.asarray(true_ms) > 0
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    lo, hi = np.inf, 0.0
    for name, pred in preds.items():
        p = np.asarray(pred, np.float64)[ok]
        t = np.asarray(true_ms, np.float64)[ok]
        good = p > 0
        ax.scatter(t[good], p[good], s=5, alpha=0.5, label=name, color=_COLORS.get(name))
        if good.any():
            lo, hi = min(lo, t.min(), p[good].min()), max(hi, t.max(), p[good].max())
    if np.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured RTT (ms)")
    ax.set_ylabel("predicted RTT, p50 (ms)")
    ax.set_title(title or "held-out pairs")
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    return fig


def calibration_figure(tables: dict[str, list[dict[str, float]]]):
    """Observed failure rate against mean predicted P(fail), per (equal-count) bin."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    top = 0.05
    for name, rows in tables.items():
        if not rows:
            continue
        x = [r["mean_predicted"] for r in rows]
        y = [r["observed_rate"] for r in rows]
        ax.plot(x, y, "o-", label=name, color=_COLORS.get(name), ms=4)
        top = max(top, max(x), max(y))
    ax.plot([0, top], [0, top], "k--", lw=0.8)
    ax.set_xlabel("mean predicted P(fail)")
    ax.set_ylabel("observed failure rate")
    ax.set_title("P(fail) calibration")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """uint8[H, W, 3] pixels of a figure (for TensorBoard)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    img = plt.imread(buf, format="png")
    return (np.clip(img[..., :3], 0, 1) * 255).astype(np.uint8)


def write_eval_plots(run_dir: str, step: int, out: dict) -> list[str]:
    """PNGs in <run_dir>/eval/ and the same images in TensorBoard; returns the PNG paths."""
    from pingllm import metrics as metrics_lib

    held = out["held_out"]
    best = out.get("comparison", {}).get("best_baseline")
    shown = {k: v for k, v in out["point"].items() if k in ("model", "vivaldi", "floor", best)}
    eval_dir = os.path.join(run_dir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    figures = {
        "pred_vs_true": pred_vs_true_figure(held.rtt_ms, shown),
        "calibration": calibration_figure(
            {k: v for k, v in out["calibration"].items()
             if k in ("model", "model_window_context", "vivaldi")}),
    }
    paths, images = [], {}
    for name, fig in figures.items():
        path = os.path.join(eval_dir, f"{name}.png")
        fig.savefig(path)
        paths.append(path)
        images[f"eval/{name}"] = figure_to_array(fig)[None]
        plt.close(fig)
    writer = metrics_lib.Writer(run_dir)
    try:
        writer.images(step, images)
        writer.flush()
    finally:
        writer.close()
    return paths
