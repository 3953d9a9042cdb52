"""Import RIPE Atlas ping results into ROW_SCHEMA Parquet files, printing what was dropped.

    pingllm-import-ripe-atlas FILE... --output DIR [--summary_json FILE]
        [--af 4|6] [--msm_ids ID,ID,...|builtin] [--start TIME] [--end TIME]
        [--probes ID,ID,...|@FILE] [--progress auto|always|never]

FILEs are JSON lines (plain, .gz or .bz2, told apart by content, e.g. the hourly
`ping-2024-01-01T0000.bz2` dumps) or Parquet extracts; "-" reads stdin. Rows are streamed in
bounded memory: each chunk of --chunk_rows rows is one row group, and a new
DIR/rows-NNNNN.parquet starts every --rows_per_file rows. TIME is ISO 8601 (UTC unless it
says otherwise) or Unix seconds; the range is [start, end). Exit 0 when every input was read
to its end, even when records were dropped (they are counted); 3 when a compressed input
ended early or was corrupt (the rows before that point are written, the summary says where it
stopped); 2 with a message for a missing input or an output directory that already holds rows.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from pingllm.data import ripe_atlas
from pingllm.data.schema import ROW_SCHEMA


class _RowFiles:
    """Writes ROW_SCHEMA tables as DIR/rows-NNNNN.parquet, rolling after `rows_per_file`."""

    def __init__(self, output: Path, rows_per_file: int):
        self.output = output
        self.rows_per_file = rows_per_file
        self.paths: list[Path] = []
        self._writer = None
        self._rows_in_file = 0

    def _open(self) -> None:
        path = self.output / f"rows-{len(self.paths):05d}.parquet"
        self.paths.append(path)
        self._writer = pq.ParquetWriter(path, ROW_SCHEMA)
        self._rows_in_file = 0

    def write(self, table) -> None:
        if self._writer is None or self._rows_in_file >= self.rows_per_file:
            self.close()
            self._open()
        self._writer.write_table(table, row_group_size=table.num_rows or None)
        self._rows_in_file += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> None:
        if not self.paths:  # no rows at all: still leave a file that carries the schema
            self._open()
        self.close()


def _seconds(text: str) -> int:
    """ISO 8601 (UTC when no offset is given) or Unix seconds -> Unix seconds."""
    if text.lstrip("-").isdigit():
        return int(text)
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return int(t.timestamp())


def _ids(text: str) -> frozenset[int]:
    """Comma-separated ids, or @FILE holding ids separated by commas or whitespace."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    return frozenset(int(t) for t in text.replace(",", " ").split())


def row_filter(args) -> ripe_atlas.RowFilter | None:
    """The RowFilter of the command line's filter options (None when there are none)."""
    builtin = args.msm_ids == "builtin"
    f = ripe_atlas.RowFilter(
        ip_version=args.af,
        msm_ids=None if args.msm_ids is None or builtin else _ids(args.msm_ids),
        builtin_only=builtin,
        start_s=None if args.start is None else _seconds(args.start),
        end_s=None if args.end is None else _seconds(args.end),
        probes=None if args.probes is None else _ids(args.probes),
    )
    return None if f == ripe_atlas.RowFilter() else f


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--output", required=True, type=Path, help="directory for rows-*.parquet")
    parser.add_argument("--summary_json", type=Path, help="also write the counts here as JSON")
    parser.add_argument("--chunk_rows", type=int, default=ripe_atlas.DEFAULT_CHUNK_ROWS)
    parser.add_argument("--rows_per_file", type=int, default=1_000_000)
    parser.add_argument("--af", type=int, choices=(4, 6), help="keep only this IP version")
    parser.add_argument("--msm_ids", help="keep only these measurement ids, or 'builtin' "
                        f"(ids below {ripe_atlas.BUILTIN_MSM_ID_LIMIT:,})")
    parser.add_argument("--start", help="keep results at or after this time")
    parser.add_argument("--end", help="keep results before this time")
    parser.add_argument("--probes", help="keep only these probe ids (ID,ID,... or @FILE)")
    parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                        help="a status line on stderr (auto: when stderr is a terminal)")
    args = parser.parse_args(argv)

    missing = [p for p in args.files if p != "-" and not Path(p).is_file()]
    if missing:
        print(f"error: input file not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.chunk_rows < 1 or args.rows_per_file < 1:
        print("error: --chunk_rows and --rows_per_file must be positive", file=sys.stderr)
        return 2
    try:
        keep = row_filter(args)
    except (ValueError, OSError) as e:
        print(f"error: bad filter: {e}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    if any(args.output.glob("rows-*.parquet")):
        # Mixing a new import with an old one's files would silently duplicate rows.
        print(
            f"error: {args.output} already holds rows-*.parquet; use an empty directory",
            file=sys.stderr,
        )
        return 2

    progress = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    summary = ripe_atlas.ImportSummary()
    files = _RowFiles(args.output, args.rows_per_file)
    started = time.perf_counter(), time.process_time()
    try:
        for table in ripe_atlas.iter_file_tables(args.files, summary, chunk_rows=args.chunk_rows,
                                                 row_filter=keep, progress=progress):
            files.write(table)
    except (OSError, ValueError) as e:  # unreadable file, wrong Parquet schema
        files.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    files.finish()
    wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]

    print(
        f"RIPE Atlas import of {len(args.files)} file(s) -> {len(files.paths)} Parquet file(s)"
        f" in {args.output}"
    )
    print(summary.format())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = summary.total_read
    print(f"{n:,} results in {wall:.1f} s ({n / max(wall, 1e-9):,.0f}/s; "
          f"{n / max(cpu, 1e-9):,.0f}/s per CPU second); peak RSS {peak_mb:,.0f} MB")
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(summary.to_json() + "\n")
    if summary.truncated:
        print(f"warning: {len(summary.truncated)} input(s) ended early; rows before that point "
              "were kept", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
