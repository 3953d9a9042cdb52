"""RTT quantiles and failure probability for address pairs, from a trained checkpoint.

    pingllm-predict --checkpoint RUN_DIR_OR_STEP --src 192.0.2.1 --dst 198.51.100.7 [--time T]
        [--context F]
    pingllm-predict --checkpoint PATH --pairs pairs.csv --output predictions.parquet

(also `python -m pingllm.cli.predict`). How the answer is read: pingllm/eval/predictor.py.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pyarrow as pa

from pingllm.eval.predictor import (
    PredictionError,
    Predictor,
    make_query,
    queries_from_table,
    read_rows,
    read_table,
    write_table,
)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="pingllm-predict", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, its checkpoints/ directory, or one step directory")
    parser.add_argument("--src", help="source address (IPv4 or IPv6 text)")
    parser.add_argument("--dst", help="destination address (same family as --src)")
    parser.add_argument("--time", help="query time: Unix seconds or ISO 8601 (optional)")
    parser.add_argument("--context", help="earlier measurements (Parquet/CSV rows, RIPE JSON); "
                        "default: the training data's measurements of the source")
    parser.add_argument("--pairs", help="Parquet/CSV with src_addr, dst_addr[, event_time]")
    parser.add_argument("--output", help="where --pairs predictions go (.parquet or .csv)")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        if args.pairs:
            if not args.output:
                raise PredictionError("--pairs needs --output")
            table = read_table(args.pairs)
            queries = queries_from_table(table)
        else:
            if not (args.src and args.dst):
                raise PredictionError("give --src and --dst, or --pairs and --output")
            queries = [make_query(args.src, args.dst, args.time)]
        context = read_rows(args.context) if args.context else None
        predictor = Predictor.from_checkpoint(args.checkpoint, batch_size=args.batch_size)
        preds = predictor.predict(queries, context=context)
    except (PredictionError, FileNotFoundError) as e:
        print(f"pingllm-predict: error: {e}", file=sys.stderr)
        return 2
    if args.pairs:
        for name, values in preds.as_dict().items():
            table = table.append_column(name, pa.array(values, pa.float64()))
        write_table(table, args.output)
        print(f"wrote {len(table)} predictions to {args.output}")
    else:
        print(f"src={args.src} dst={args.dst} p_fail={preds.p_fail[0]:.4f} "
              f"rtt_p10={preds.rtt_p10[0]:.3f}ms rtt_p50={preds.rtt_p50[0]:.3f}ms "
              f"rtt_p90={preds.rtt_p90[0]:.3f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
