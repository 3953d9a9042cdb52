"""The `manual` tfds build per CPU second: single process against Beam's local runner.

    python benchmarks/bench_beam_build.py [--rows 100000] [--workdir /tmp/pingllm_bench_beam]

Writes a mixed-firmware RIPE dump of the synthetic Internet (`ripe-json-mixed`, bz2, like the
hourly dumps), then in the same run: the import alone (`ripe_atlas.iter_file_tables`), the
single-process build and the Beam build on the Python local runner (FnApiRunner, in this
process, direct_num_workers=1), each per CPU second of this process (so one core, whatever
else the machine runs; Beam's worker threads run in this process too). Checks that both
builds wrote the same bytes.
"""

from __future__ import annotations

import argparse
import bz2
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pingllm.data import ripe_atlas, ripe_writer, synthetic, tfds_builder  # noqa: E402

LOCAL_RUNNER = ["--runner=FnApiRunner", "--direct_num_workers=1",
                "--direct_running_mode=in_memory"]


def _cpu(fn) -> tuple[float, float, object]:
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c, time.perf_counter() - w, out


def _files(b) -> dict:
    return {p.name: p.read_bytes() for p in b.data_path.iterdir() if ".array_record-" in p.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workdir", default="/tmp/pingllm_bench_beam")
    args = parser.parse_args()
    from apache_beam.options.pipeline_options import PipelineOptions

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    manual = work / "manual"
    manual.mkdir(parents=True)
    rows = synthetic.SyntheticInternet(seed=0).generate(args.rows, duration_s=4 * 3600)
    plain = work / "ping.jsonl"
    ripe_writer.write_ripe_json(rows, plain, mixed=True)
    dump = manual / "ping-mixed.jsonl.bz2"
    dump.write_bytes(bz2.compress(plain.read_bytes()))
    plain.unlink()

    summary = ripe_atlas.ImportSummary()
    cpu, wall, _ = _cpu(lambda: sum(t.num_rows for t in
                                    ripe_atlas.iter_file_tables([dump], summary)))
    results = summary.total_read
    print(f"input: {dump.name} {dump.stat().st_size / 1e6:.1f} MB bz2, {results:,} results "
          f"({summary.kept:,} pings kept)")
    print(f"import only         {results / cpu:>9,.0f} results/s/core ({cpu:.1f} s CPU, "
          f"{wall:.1f} s wall)")
    config = tfds_builder.make_config("manual", max_target_length=1024)
    builds = {}
    for name, options in (("single-process build", None),
                          ("Beam local runner  ", PipelineOptions(LOCAL_RUNNER))):
        data_dir = work / name.split()[0].lower()
        cpu, wall, b = _cpu(lambda d=data_dir, o=options: tfds_builder.prepare(
            config, data_dir=str(d), manual_dir=str(manual), beam_options=o))
        builds[name] = b
        print(f"{name}  {results / cpu:>9,.0f} results/s/core ({cpu:.1f} s CPU, "
              f"{wall:.1f} s wall)")
    a, b = builds.values()
    print(f"identical ArrayRecord files: {_files(a) == _files(b)}; records: "
          + ", ".join(f"{s} {a.info.splits[s].num_examples:,}" for s in ("train", "test")))


if __name__ == "__main__":
    main()
