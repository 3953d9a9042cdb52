"""Held-out evaluation of a checkpoint: the model against the baselines on pairs never trained on.

    pingllm-evaluate --checkpoint RUN_DIR [--gin_file F ...] [--output_json F]
        [--max_queries N] [--context train|window|both]

(also `python -m pingllm.cli.evaluate`). What it computes: pingllm/eval/heldout.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pingllm.eval import predictor as predict_lib
from pingllm.eval.heldout import (
    TABLE_COLUMNS,
    evaluate,
    format_calibration,
    format_comparison,
    format_table,
)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="pingllm-evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, its checkpoints/ directory, or one step directory")
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin files to use instead of the run's config.gin (e.g. other data)")
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--output_json", help="write {method: {metric: value}} here")
    parser.add_argument("--max_queries", type=int, default=500)
    parser.add_argument("--context", choices=("train", "window", "both"), default="both")
    parser.add_argument("--eval_batches", type=int, default=None,
                        help="batches for token losses (default: the run's EVAL_STEPS)")
    parser.add_argument("--no_plots", action="store_true")
    args = parser.parse_args(argv)

    from pingllm import config as config_lib

    try:
        model_cfg_run, params, step_dir = predict_lib.load_checkpoint(args.checkpoint)
        cfg = model_cfg_run
        if args.gin_file or args.gin_bindings:
            run_dir, _ = predict_lib.resolve_checkpoint(args.checkpoint)
            files = args.gin_file or [str(run_dir / "config.gin")]
            cfg = config_lib.load(files, args.gin_bindings)
            if cfg.model != model_cfg_run.model:
                raise config_lib.ConfigError("--gin_file changes the model config; the "
                                             "checkpoint was trained with another")
    except (FileNotFoundError, config_lib.ConfigError) as e:
        print(f"pingllm-evaluate: error: {e}", file=sys.stderr)
        return 2
    predictor = predict_lib.Predictor(cfg.model, params, data_config=cfg.data,
                                      seed=cfg.data.seed)
    step = int(step_dir.name) if step_dir.name.isdigit() else 0
    print(f"evaluate: checkpoint {step_dir} (step {step})")
    out = evaluate(predictor, cfg, max_queries=args.max_queries, context=args.context,
                   eval_batches=args.eval_batches)
    metrics = out["metrics"]
    print(format_table(metrics, TABLE_COLUMNS))
    print(format_comparison(out["comparison"]))
    for k in sorted(metrics["model"]):
        if k.startswith("loss"):
            print(f"model {k} = {metrics['model'][k]:.4f}")
    print("P(fail) calibration of the model (equal-count bins):")
    print(format_calibration(out["calibration"]["model"]))
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        path.with_name(path.stem + "_calibration.json").write_text(
            json.dumps(out["calibration"], indent=2))
        path.with_name(path.stem + "_comparison.json").write_text(
            json.dumps(out["comparison"], indent=2, default=bool))
        print(f"wrote {path}")
    if not args.no_plots:
        from pingllm.checkpoint import storage
        from pingllm.eval import plots

        run_dir, _ = predict_lib.resolve_checkpoint(args.checkpoint)
        # matplotlib and the event writer write local files: on gs:// they go to a local
        # mirror of the run directory and are copied up.
        local = storage.local_mirror(run_dir) if storage.is_remote(run_dir) else str(run_dir)
        written = plots.write_eval_plots(local, step, out)
        if local != str(run_dir):
            storage.Mirror(local, run_dir).sync()
            written = [f"{run_dir}/{w[len(local):].lstrip('/')}" for w in written]
        print("plots: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
