"""List runs and their checkpoints, or show one checkpoint in detail.

    pingllm-inspect-checkpoints BASE_OR_RUN_OR_STEP_DIR [--run RUN] [--step N] [--json]

A base output directory lists every run under it; a run directory (or its checkpoints/) lists
that run; a step directory, or --step N, shows one checkpoint: every array's path, shape, dtype,
bytes and saved sharding, the iterator state, the metadata timestamps and the parameter count.
Any path etils epath understands works (local, gs://...).

Exit status: 0 listed; 2 the path is missing or holds no checkpoint (message on stderr);
3 with --strict when some listed step is corrupt or incomplete.
"""

from __future__ import annotations

import argparse
import json
import sys

from pingllm.checkpoint import inspect as inspect_lib

EXIT_BAD_PATH = 2
EXIT_NOT_ALL_COMPLETE = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="base output, run, checkpoints or step directory")
    parser.add_argument("--run", help="one run of a base output directory")
    parser.add_argument("--step", type=int, help="show this checkpoint in detail")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no_hashes", action="store_true",
                        help="check sizes only, not crc32c (fast on large checkpoints)")
    parser.add_argument("--strict", action="store_true",
                        help=f"exit {EXIT_NOT_ALL_COMPLETE} if a listed step is not complete")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        kind = inspect_lib.classify(inspect_lib.epath.Path(args.path))
        if args.step is not None or kind == "step":
            step_dir = inspect_lib.resolve_step(args.path, run=args.run, step=args.step)
            detail = inspect_lib.step_detail(step_dir)
            print(json.dumps(inspect_lib.detail_json(detail), indent=1) if args.json
                  else inspect_lib.format_detail(detail))
            statuses = [detail.row.status]
        else:
            reports = inspect_lib.scan(args.path, run=args.run, check_hashes=not args.no_hashes)
            print(json.dumps(inspect_lib.runs_json(reports), indent=1) if args.json
                  else inspect_lib.format_runs(reports))
            statuses = [s.status for r in reports for s in r.steps]
    except inspect_lib.InspectError as e:
        print(f"inspect_checkpoints: {e}", file=sys.stderr)
        return EXIT_BAD_PATH
    if args.strict and any(s != "complete" for s in statuses):
        return EXIT_NOT_ALL_COMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
