"""Write the exact batches the trainer sees at some steps, optionally printed as measurements.

    pingllm-dump-batches --gin_file=gin/quickstart.gin [--gin_bindings=...] \
        --steps 0,1,7 --output batches.npz [--decode] [--process_count P --process_index p]

The npz holds `steps` int64[S] and inputs/targets/weights/segment_ids/fields [S, rows, L]:
the GLOBAL batch of each step, or with --process_count/--process_index (or when run as every
process of a jax.distributed job) that process's rows of it. Builds the dataset if missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pingllm.data import pipeline, schema, tokens

BATCH_KEYS = tuple(pipeline.BATCH_DTYPES)


def dump(config: pipeline.DataConfig, steps, process_index: int = 0,
         process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's rows of each step's batch, stacked: {key: [S, rows, L]} plus `steps`."""
    steps = [int(s) for s in steps]
    iterator = pipeline.train_iterator(config, process_index=process_index,
                                       process_count=process_count, start_step=min(steps))
    batches = {}
    try:
        for step in sorted(set(steps)):
            if iterator.step != step:
                iterator.for_step(step)
            batches[step] = next(iterator)
    finally:
        iterator.close()
    keys = BATCH_KEYS + (("positions",) if config.windows_per_row > 1 else ())
    out = {key: np.stack([batches[s][key] for s in steps]) for key in keys}
    out["steps"] = np.asarray(steps, np.int64)
    return out


def describe(dumped: dict[str, np.ndarray]) -> str:
    """The dumped windows as measurements, one line each."""
    lines = []
    for i, step in enumerate(dumped["steps"]):
        for row, (inputs, segments) in enumerate(zip(dumped["inputs"][i],
                                                     dumped["segment_ids"][i])):
            packed = segments.max() > 1
            for segment in np.unique(segments[segments > 0]):
                window = inputs[segments == segment]
                where = f" window {segment}" if packed else ""
                lines.append(f"step {step} row {row}{where}: {len(window)} tokens")
                lines.extend(_measurement_lines(window))
    return "\n".join(lines)


def _measurement_lines(window) -> list[str]:
    lines = []
    for m in tokens.decode_tokens(window, len(window)):
        result = "FAILED" if m.failed else f"{m.rtt_ms:.3f} ms"
        time = "" if m.time_kind is None else f" {m.time_kind}={m.time_value}"
        lines.append(f"  {schema.format_address(m.src_addr, m.src_version)} -> "
                     f"{schema.format_address(m.dst_addr, m.dst_version)} {result}{time}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--gin_search_paths", action="append", default=[])
    parser.add_argument("--steps", required=True, help="comma-separated steps, e.g. 0,1,7")
    parser.add_argument("--output", type=Path, help="npz to write")
    parser.add_argument("--decode", action="store_true", help="print windows as measurements")
    parser.add_argument("--process_count", type=int, default=None)
    parser.add_argument("--process_index", type=int, default=None)
    args = parser.parse_args(argv)

    from pingllm import config as config_lib

    data = config_lib.load(args.gin_file, args.gin_bindings, args.gin_search_paths).data
    if args.process_count is None:
        import jax  # a jax.distributed job dumps each process's rows

        process_index, process_count = jax.process_index(), jax.process_count()
    else:
        process_index, process_count = args.process_index or 0, args.process_count
    if process_index == 0:
        pipeline.prepare(data)
    dumped = dump(data, args.steps.split(","), process_index, process_count)
    if args.output:
        np.savez(args.output, **dumped)
        print(f"wrote steps {args.steps} ({process_index} of {process_count}) to {args.output}")
    if args.decode:
        print(describe(dumped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
