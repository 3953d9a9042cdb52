"""Generate rows of the synthetic Internet into DIR, as ROW_SCHEMA Parquet or RIPE JSON lines.

    pingllm-make-synthetic --rows N [--seed S] --output DIR
        [--format parquet|ripe-json|ripe-json-mixed] [--start_time ISO] [--duration_s SECONDS]

Writes DIR/rows-NNNNN.parquet (or DIR/results-NNNNN.jsonl), one file per chunk of
--rows_per_file rows, and prints a short summary. The same arguments give the same bytes.
`ripe-json-mixed` writes the same rows as a dump from the wild looks (firmware 4610..5080,
lts -1, late duplicates, error entries, traceroute and DNS results between the pings).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pingllm.data import ripe_writer, synthetic


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--format", choices=("parquet", "ripe-json", "ripe-json-mixed"),
                   default="parquet")
    p.add_argument("--start_time", default=synthetic.DEFAULT_START)
    p.add_argument("--duration_s", type=int, default=synthetic.DAY_S)
    p.add_argument("--rows_per_file", type=int, default=1_000_000)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.rows <= 0:
        print("--rows must be positive", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    existing = sorted(args.output.glob("rows-*.parquet")) + sorted(args.output.glob("results-*"))
    if existing:
        print(
            f"{args.output} already holds {existing[0].name}; refusing to mix runs", file=sys.stderr
        )
        return 2
    started = time.perf_counter()
    world = synthetic.SyntheticInternet(args.seed)
    written, failed, ipv4, paths = 0, 0, 0, []
    tables = world.iter_tables(args.rows, args.start_time, args.duration_s, args.rows_per_file)
    for i, table in enumerate(tables):
        if args.format == "parquet":
            path = args.output / f"rows-{i:05d}.parquet"
            pq.write_table(table, path)
        else:
            path = args.output / f"results-{i:05d}.jsonl"
            ripe_writer.write_ripe_json(table, path, mixed=args.format == "ripe-json-mixed")
        paths.append(path)
        written += len(table)
        failed += int((table["rtt"].to_numpy() < 0).sum())
        ipv4 += int((table["ip_version"].to_numpy() == 4).sum())
    seconds = time.perf_counter() - started
    print(
        f"wrote {written} rows ({args.format}, seed {args.seed}) to {len(paths)} file(s) in "
        f"{args.output} in {seconds:.1f} s: {100 * failed / written:.2f}% failed, "
        f"{100 * ipv4 / written:.1f}% IPv4, {len(world.hosts)} hosts, "
        f"{np.unique(world.streams.src).size} sources in the world"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
