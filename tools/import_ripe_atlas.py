"""Import RIPE Atlas ping results into ROW_SCHEMA Parquet files, printing what was dropped.

    python tools/import_ripe_atlas.py FILE... --output DIR [--summary_json FILE]

FILEs are JSON lines (plain, .gz or .bz2) or Parquet extracts. Rows are streamed: each
chunk of --chunk_rows rows is one row group, and a new DIR/rows-NNNNN.parquet starts every
--rows_per_file rows. Exit 0 even when records were dropped (they are counted); non-zero
with a message for a missing input or an output directory that already holds rows.
"""

from __future__ import annotations

import argparse
import sys
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    parser.add_argument("--output", required=True, type=Path, help="directory for rows-*.parquet")
    parser.add_argument("--summary_json", type=Path, help="also write the counts here as JSON")
    parser.add_argument("--chunk_rows", type=int, default=ripe_atlas.DEFAULT_CHUNK_ROWS)
    parser.add_argument("--rows_per_file", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"error: input file not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.chunk_rows < 1 or args.rows_per_file < 1:
        print("error: --chunk_rows and --rows_per_file must be positive", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    if any(args.output.glob("rows-*.parquet")):
        # Mixing a new import with an old one's files would silently duplicate rows.
        print(
            f"error: {args.output} already holds rows-*.parquet; use an empty directory",
            file=sys.stderr,
        )
        return 2

    summary = ripe_atlas.ImportSummary()
    files = _RowFiles(args.output, args.rows_per_file)
    try:
        for table in ripe_atlas.iter_file_tables(args.files, summary, chunk_rows=args.chunk_rows):
            files.write(table)
    except (OSError, EOFError, ValueError) as e:  # unreadable/corrupt file, wrong Parquet schema
        files.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    files.finish()

    print(
        f"RIPE Atlas import of {len(args.files)} file(s) -> {len(files.paths)} Parquet file(s)"
        f" in {args.output}"
    )
    print(summary.format())
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(summary.to_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
