"""beam_build.py: the manual build on Beam's local runner writes the single-process build's bytes.

Inputs: the repository's real RIPE Atlas results (mixed types and firmware, edge cases), one of
them twice (every row duplicated across files), a generated mixed dump in the RIPE format as
.bz2 (one file whole, one truncated), and a Parquet extract with an IPv4 and an IPv6 source
whose address bytes are equal.
"""

import bz2
import datetime
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pingllm.data import beam_build, records, ripe_atlas, schema, tfds_builder

LENGTH = 128
LATER_FROM = "2025-03-03T02:00:00Z"
# Beam's Python local runner, in this process, one worker. Not "DirectRunner": in Beam 2.78 it
# first downloads the Prism runner from GitHub (and falls back to this one when offline).
DIRECT = ["--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
# Equal bytes, two families: IPv4 32.1.13.184 is 20 01 0d b8, as is IPv6 2001:db8::.
TWINS = ("32.1.13.184", "2001:db8::")


def _twins_extract(path) -> None:
    t0 = datetime.datetime(2025, 3, 3, 1, tzinfo=datetime.UTC)
    rows = [(TWINS[0], "8.8.8.8", 4), (TWINS[1], "2001:4860:4860::8888", 6)] * 3
    pq.write_table(pa.table({
        "msm_id": pa.array([1001] * 6, pa.int64()),
        "prb_id": pa.array([7, 8] * 3, pa.int64()),
        "event_time": pa.array([t0 + datetime.timedelta(minutes=40 * (i // 2))
                                for i in range(6)], pa.timestamp("us", tz="UTC")),
        "src_addr": [r[0] for r in rows], "dst_addr": [r[1] for r in rows],
        "ip_version": pa.array([r[2] for r in rows], pa.int8()),
        "rtt": pa.array([10.0, 20.0, 11.0, 21.0, -1.0, 22.0], pa.float32()),
    }), path)


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory, fixtures_dir, repo_root):
    root = tmp_path_factory.mktemp("manual")
    for f in fixtures_dir.glob("*.jsonl"):
        shutil.copy(f, root / f.name)
    (root / "again").mkdir()
    shutil.copy(fixtures_dir / "ping_results.jsonl", root / "again" / "ping_results.jsonl")
    gen = tmp_path_factory.mktemp("generated")
    subprocess.run([sys.executable, "-m", "pingllm.cli.make_synthetic", "--rows", "3000",
                    "--format", "ripe-json-mixed", "--duration_s", "14400",
                    "--rows_per_file", "1500", "--output", str(gen)],
                   cwd=repo_root, check=True, capture_output=True)
    whole = bz2.compress((gen / "results-00000.jsonl").read_bytes(), compresslevel=1)
    (root / "ping-2025-03-03T0000.bz2").write_bytes(whole)
    cut = bz2.compress((gen / "results-00001.jsonl").read_bytes(), compresslevel=1)
    (root / "ping-2025-03-03T0100.bz2").write_bytes(cut[: len(cut) * 2 // 3])
    _twins_extract(root / "twins.parquet")
    return root


def _build(config, data_dir, manual_dir, beam: bool):
    options = PipelineOptions(DIRECT) if beam else None
    return tfds_builder.prepare(config, data_dir=str(data_dir), manual_dir=str(manual_dir),
                                beam_options=options)


def _record_files(b) -> dict:
    return {p.name: p.read_bytes() for p in sorted(b.data_path.iterdir())
            if ".array_record-" in p.name}


def _summary(s: ripe_atlas.ImportSummary) -> dict:
    d = s.to_dict()
    for t in d["truncated"]:
        t.pop("error", None)  # Beam logs the decompressor's message; counters hold the numbers
    return d


@pytest.mark.parametrize("later_from", ["", LATER_FROM], ids=["pair_split", "time_split"])
def test_beam_and_single_process_builds_write_identical_records(tmp_path, manual_dir,
                                                                later_from):
    config = tfds_builder.make_config("manual", max_target_length=LENGTH, test_fraction=0.3,
                                      later_from=later_from)
    single = _build(config, tmp_path / "single", manual_dir, beam=False)
    beam = _build(config, tmp_path / "beam", manual_dir, beam=True)
    splits = ("train", "test") + (("later",) if later_from else ())
    assert set(beam.info.splits.keys()) == set(single.info.splits.keys()) == set(splits)

    # Byte-identical ArrayRecord files, hence the same records in the same order.
    files = _record_files(single)
    assert sorted(files) == sorted(_record_files(beam))
    assert {name.split("-")[1].split(".")[0] for name in files} == set(splits)
    for name, data in _record_files(beam).items():
        assert data == files[name], name
    for split in splits:
        a, b = tfds_builder.RecordSource(single, split), tfds_builder.RecordSource(beam, split)
        assert len(a) == len(b) == single.info.splits[split].num_examples > 0
        assert [a.read_raw(i) for i in range(len(a))] == [b.read_raw(i) for i in range(len(b))]

    # Both report the importer's counts, and the records hold every row it kept.
    expect = ripe_atlas.ImportSummary()
    for _ in ripe_atlas.iter_file_tables(tfds_builder.manual_files(manual_dir), expect):
        pass
    assert expect.truncated and expect.dropped.get("not_a_ping", 0) > 0
    assert _summary(beam.import_summary) == _summary(single.import_summary) == _summary(expect)
    got = {s: list(tfds_builder.RecordSource(beam, s)) for s in splits}
    assert sum(len(r["event_time"]) for s in splits for r in got[s]) == expect.kept

    if later_from:
        cut = tfds_builder.later_from_seconds(later_from)
        assert all((r["event_time"] >= cut).all() for r in got["later"])
        assert all((r["event_time"] < cut).all() for s in ("train", "test") for r in got[s])
    # Per source, the records hold exactly the imported rows (a multiset: the file given twice
    # gives each of its rows twice), with each source in records of its own family.
    imported, _ = ripe_atlas.import_files(tfds_builder.manual_files(manual_dir))
    m = records.measurements_from_table(imported)
    want = sorted(zip(m.ip_version.tolist(), map(bytes, m.src_addr), m.event_time.tolist(),
                      map(bytes, m.dst_addr), m.rtt_ms.tolist()))
    have = sorted((int(r["ip_version"]), bytes(r["src_addr"]), t, bytes(d), x)
                  for s in splits for r in got[s]
                  for t, d, x in zip(r["event_time"].tolist(), r["dst_addr"], r["rtt_ms"].tolist()))
    assert have == want
    assert len(set(have)) < len(have)  # the duplicates are kept, as in the single-process path
    twins = {int(r["ip_version"]) for s in splits for r in got[s]
             if bytes(r["src_addr"][:4]) == bytes([32, 1, 13, 184])}
    assert twins == {4, 6}


def test_keys_come_from_the_content_not_the_row_order():
    rows = tfds_builder_rows()
    shuffled = rows.take(np.random.default_rng(0).permutation(rows.num_rows))
    keyed = [
        [k for k, _ in tfds_builder.keyed_records(
            records.rows_to_split_records(t, LENGTH, 0.3)["train"])]
        for t in (rows, shuffled)
    ]
    assert keyed[0] == keyed[1] and len(set(keyed[0])) == len(keyed[0]) > 10
    # One source's rows alone (the Beam path) give that source's keys of all rows at once.
    first = rows["src_addr"][0].as_py()
    alone = rows.filter(pa.compute.equal(rows["src_addr"], first))
    keys = [k for k, _ in tfds_builder.keyed_records(
        records.rows_to_split_records(alone, LENGTH, 0.3)["train"])]
    address, version = schema.parse_addresses([first])
    prefix = f"{int(version[0])}/{address[0].tobytes().hex()}/"
    assert keys and keys == [k for k in keyed[0] if k.startswith(prefix)]
    assert [int(k.rsplit("/", 1)[1]) for k in keys] == list(range(len(keys)))


def tfds_builder_rows() -> pa.Table:
    from pingllm.data import synthetic

    return synthetic.SyntheticInternet(seed=3).generate(2000, duration_s=7200)


def test_rows_by_source_hands_out_each_row_once_under_its_source():
    rows = tfds_builder_rows()
    pieces = list(beam_build.rows_by_source(rows))
    assert sum(t.num_rows for _, t in pieces) == rows.num_rows
    assert len({s for s, _ in pieces}) == len(pieces) == len(set(rows["src_addr"].to_pylist()))
    for source, table in pieces:
        assert set(table["src_addr"].to_pylist()) == {source}
    assert list(beam_build.rows_by_source(rows.slice(0, 0))) == []


def test_other_file_formats_and_misnamed_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--file_format=array_record"):
        tfds_builder.RipeAtlasPing(config="manual", data_dir=str(tmp_path),
                                   file_format="tfrecord")
    # What `tfds build --config '{"name": ..., ...}'` makes: the name must be make_config's.
    misnamed = tfds_builder.RipeAtlasPingConfig(name="manual_short", source="manual",
                                                max_target_length=256)
    with pytest.raises(ValueError, match="'manual_len256'"):
        tfds_builder.RipeAtlasPing(config=misnamed, data_dir=str(tmp_path))
    named = tfds_builder.RipeAtlasPingConfig(name="manual_len256", source="manual",
                                             max_target_length=256)
    b = tfds_builder.RipeAtlasPing(config=named, data_dir=str(tmp_path))
    assert b.builder_config.name == tfds_builder.make_config(
        "manual", max_target_length=256).name


@pytest.mark.slow
def test_tfds_build_command_on_the_local_runner(tmp_path, manual_dir, repo_root):
    """The documented `tfds build` command (the builder registered by importing its module,
    Beam options), in another process, writes what the single-process build writes."""
    manual = tmp_path / "manual"
    manual.mkdir()
    for f in manual_dir.glob("*.bz2"):
        shutil.copy(f, manual / f.name)
    tfds_cli = shutil.which("tfds", path=str(repo_root / ".venv" / "bin")) or shutil.which(
        "tfds")
    assert tfds_cli, "the tfds command (tensorflow-datasets, with mlcroissant) is not installed"
    out = subprocess.run(
        [tfds_cli, "build", "ripe_atlas_ping", "--imports", "pingllm.data.tfds_builder",
         "--config", "manual", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "cli"),
         "--beam_pipeline_options=runner=FnApiRunner,direct_num_workers=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    single = _build("manual", tmp_path / "single", manual, beam=False)
    cli = tfds_builder.builder("manual", data_dir=str(tmp_path / "cli"))
    assert cli.is_prepared() and cli.info.file_format.value == "array_record"
    assert _record_files(cli) == _record_files(single)
    logs = out.stdout + out.stderr
    assert "imported" in logs and "rows through Beam" in logs and "Prism" not in logs
