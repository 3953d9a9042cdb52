"""ArrayRecord -> token batches throughput, against reading the raw records alone.

    python benchmarks/bench_pipeline.py [--rows 100000] [--steps 40] [--batch 32]

Builds the synthetic dataset (synthetic_small size by default) in a temp data_dir, then
times: raw record reads (bytes), decoded records, and the full pipeline (read + decode +
tokenize + batch) with Grain worker_count 0 and 2. Tokens/s counts real (non-padding) tokens
and padded slots (batch * max_target_length) separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pingllm.data import pipeline, tfds_builder


def _time_reads(source, n, read):
    t = time.perf_counter()
    for i in range(n):
        read(source, (i * 7919) % len(source))
    return time.perf_counter() - t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=tfds_builder.SMALL_SYNTHETIC_ROWS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max_target_length", type=int, default=1024)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as data_dir:
        config = pipeline.DataConfig(
            data_dir=data_dir, synthetic_rows=args.rows, global_batch_size=args.batch,
            max_target_length=args.max_target_length,
        )
        t = time.perf_counter()
        pipeline.prepare(config)
        print(f"build {config.dataset_name}: {time.perf_counter() - t:.1f} s")
        source = pipeline.record_source(config, "train")
        n = args.steps * args.batch
        raw_s = _time_reads(source, n, lambda s, i: s.read_raw(i))
        decoded_s = _time_reads(source, n, lambda s, i: s[i])
        print(f"records: {len(source)} in train; raw reads {n / raw_s:,.0f} records/s; "
              f"decoded {n / decoded_s:,.0f} records/s")

        for workers in (0, 2):
            c = dataclasses.replace(config, worker_count=workers)
            it = pipeline.train_iterator(c)
            t = time.perf_counter()
            first = next(it)
            startup_s = time.perf_counter() - t
            real = slots = 0
            t = time.perf_counter()
            for _ in range(args.steps):
                batch = next(it)
                real += int(batch["segment_ids"].sum())
                slots += batch["inputs"].size
            elapsed = time.perf_counter() - t
            it.close()
            del first
            windows_per_s = args.steps * args.batch / elapsed
            print(
                f"pipeline worker_count={workers}: {real / elapsed:,.0f} real tokens/s, "
                f"{slots / elapsed:,.0f} padded tokens/s, {windows_per_s:,.0f} windows/s "
                f"({windows_per_s / (n / decoded_s):.2f}x of decoded reads, "
                f"{windows_per_s / (n / raw_s):.3f}x of raw reads); first batch {startup_s:.1f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
