"""RIPE Atlas import speed: results per CPU second against a json.loads-per-line loop.

    python benchmarks/bench_import.py [--rows 300000] [--workdir /tmp/pingllm_bench_import]

Writes a mixed-firmware RIPE dump of the synthetic Internet (pingllm/cli/make_synthetic.py's
`ripe-json-mixed`: pings of firmware 4610..5080 with traceroute and DNS results between
them), plain and bz2, then in the same run, on each file:

- reference: `for line in file: json.loads(line)` (the same decompression: bz2.open);
- import: pingllm/cli/import_ripe_atlas.py's whole path, file -> checked rows -> Parquet files.

Figures are per CPU second of this process (one core), so they do not depend on what else
the machine runs; the ratio is import / reference (>= 1: importing costs no more than
parsing). Peak RSS is measured in subprocesses importing 1x and 4x the file.
"""

from __future__ import annotations

import argparse
import bz2
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pingllm.data import ripe_atlas, ripe_writer, synthetic  # noqa: E402


def _cpu(fn) -> tuple[float, object]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def _json_loop(path: Path) -> int:
    n = 0
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        for line in f:
            json.loads(line)
            n += 1
    return n


def _import(path: Path, out: Path) -> ripe_atlas.ImportSummary:
    from pingllm.cli import import_ripe_atlas as cli

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    summary = ripe_atlas.ImportSummary()
    files = cli._RowFiles(out, 1_000_000)
    for table in ripe_atlas.iter_file_tables([path], summary):
        files.write(table)
    files.finish()
    return summary


def _peak_rss_mb(path: Path, copies: int, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pingllm.cli.import_ripe_atlas", *[str(path)] * copies,
           "--output", str(out)]
    stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"peak RSS ([\d,]+) MB", stdout).group(1).replace(",", ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/pingllm_bench_import"))
    p.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    plain = args.workdir / f"ping-mixed-{args.rows}.jsonl"
    packed = plain.with_suffix(".jsonl.bz2")
    if not plain.exists():
        table = synthetic.SyntheticInternet(seed=0).generate(args.rows)
        ripe_writer.write_ripe_json(table, plain, mixed=True)
        packed.write_bytes(bz2.compress(plain.read_bytes(), 9))
    mb = plain.stat().st_size / 1e6
    print(f"input: {plain.name} {mb:,.1f} MB plain, {packed.stat().st_size / 1e6:,.1f} MB bz2")
    for path in (plain, packed):
        ref = min((_cpu(lambda path=path: _json_loop(path)) for _ in range(args.repeats)),
                  key=lambda r: r[0])
        imp = min((_cpu(lambda path=path: _import(path, args.workdir / "out"))
                   for _ in range(args.repeats)), key=lambda r: r[0])
        lines, summary = ref[1], imp[1]
        assert summary.total_read == lines, (summary.total_read, lines)
        ref_rate, imp_rate = lines / ref[0], lines / imp[0]
        print(f"{path.suffix:>6}: json.loads loop {ref_rate:>9,.0f} results/s/core | import "
              f"{imp_rate:>9,.0f} results/s/core ({summary.kept:,} rows kept, "
              f"{summary.dropped.get('not_a_ping', 0):,} other types) | ratio "
              f"{imp_rate / ref_rate:.2f}x")
    one = _peak_rss_mb(packed, 1, args.workdir / "out")
    four = _peak_rss_mb(packed, 4, args.workdir / "out")
    print(f"peak RSS: {one:,.0f} MB importing {mb:,.0f} MB, {four:,.0f} MB importing "
          f"{4 * mb:,.0f} MB (ratio {four / one:.2f})")
    shutil.rmtree(args.workdir / "out", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
