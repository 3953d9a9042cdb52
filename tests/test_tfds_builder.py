"""tfds_builder.py: the ripe_atlas_ping dataset builds offline as ArrayRecord and reads back."""

import numpy as np
import pytest

from pingllm.data import records, synthetic, tfds_builder

ROWS, LENGTH = 3_000, 256


def _key(rec) -> tuple:
    return (bytes(rec["src_addr"]), int(rec["event_time"][0]), len(rec["event_time"]))


def _by_key(recs) -> dict:
    out = {_key(r): r for r in recs}
    assert len(out) == len(recs)
    return out


def test_config_names_encode_every_non_default_value():
    assert tfds_builder.make_config().name == "synthetic"
    assert tfds_builder.make_config(synthetic_rows=100_000).name == "synthetic_small"
    assert tfds_builder.make_config("manual").name == "manual"
    c = tfds_builder.make_config(synthetic_rows=5, synthetic_seed=2, max_target_length=64,
                                 test_fraction=0.25)
    assert c.name == "synthetic_rows5_seed2_len64_test0.25"
    assert (c.synthetic_rows, c.synthetic_seed, c.max_target_length) == (5, 2, 64)
    assert tfds_builder.make_config("manual", max_target_length=128).name == "manual_len128"
    c = tfds_builder.make_config(synthetic_duration_s=7200, max_target_length=256)
    assert c.name == "synthetic_rows1000000_seed0_span7200s_len256"
    assert c.synthetic_duration_s == 7200
    assert tfds_builder.make_config(synthetic_duration_s=7200.0).name == (
        "synthetic_rows1000000_seed0_span7200s")  # a float from gin names the same data
    # A span means nothing for files: it does not change the manual config.
    assert tfds_builder.make_config("manual", synthetic_duration_s=7200).name == "manual"
    with pytest.raises(ValueError, match="source must be"):
        tfds_builder.make_config("kaggle")
    with pytest.raises(ValueError, match="synthetic_duration_s must be > 0"):
        tfds_builder.make_config(synthetic_duration_s=0)


def test_shorter_span_holds_more_sources_with_fewer_pings_each(tmp_path):
    """The same rows over 2 hours instead of a day: many more sources, each for less time."""
    counts = {}
    for span in (tfds_builder.DEFAULT_SYNTHETIC_DURATION_S, 7200):
        config = tfds_builder.make_config(synthetic_rows=ROWS, max_target_length=LENGTH,
                                          synthetic_duration_s=span)
        b = tfds_builder.prepare(config, data_dir=str(tmp_path))
        recs = list(tfds_builder.RecordSource(b, "train"))
        times = np.concatenate([r["event_time"] for r in recs])
        sources = {bytes(r["src_addr"]) for r in recs}
        counts[span] = (len(sources), int(times.max() - times.min()))
    (day_sources, day_span), (short_sources, short_span) = counts[86_400], counts[7200]
    assert short_span < 7200 < day_span
    assert short_sources > 5 * day_sources


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    config = tfds_builder.make_config(synthetic_rows=ROWS, max_target_length=LENGTH)
    return tfds_builder.prepare(config, data_dir=str(data_dir)), data_dir


def test_synthetic_config_builds_offline_as_array_record(built):
    b, data_dir = built
    version_dir = data_dir / "ripe_atlas_ping" / f"synthetic_rows{ROWS}_seed0_len{LENGTH}" / "1.0.0"
    files = sorted(p.name for p in version_dir.iterdir())
    assert "ripe_atlas_ping-train.array_record-00000-of-00001" in files
    assert "ripe_atlas_ping-test.array_record-00000-of-00001" in files
    # Rebuilding is a no-op: the files are not rewritten.
    mtime = (version_dir / files[-1]).stat().st_mtime_ns
    tfds_builder.prepare(b.builder_config, data_dir=str(data_dir))
    assert (version_dir / files[-1]).stat().st_mtime_ns == mtime


def test_records_read_back_equal_the_generated_ones(built):
    b, _ = built
    table = synthetic.SyntheticInternet(seed=0).generate(ROWS)
    expect = {k: list(v) for k, v in records.rows_to_split_records(table, LENGTH).items()}
    for split in ("train", "test"):
        source = tfds_builder.RecordSource(b, split)
        stock = b.as_data_source(split)
        assert len(source) == len(stock) == len(expect[split]) == b.info.splits[split].num_examples
        got = [source[i] for i in range(len(source))]
        # tfds shuffles on write: compare as sets keyed by (source, first time, size).
        want = _by_key(expect[split])
        assert _by_key(got).keys() == want.keys()
        for i, rec in enumerate(got):
            for key in records.RECORD_KEYS:
                np.testing.assert_array_equal(rec[key], want[_key(rec)][key])
                np.testing.assert_array_equal(stock[i][key], rec[key])
            assert rec["ip_version"].dtype == np.int8 and rec["dst_addr"].dtype == np.uint8
    with pytest.raises(IndexError):
        tfds_builder.RecordSource(b, "train")[len(expect["train"])]


def test_manual_config_imports_ripe_atlas_files(tmp_path, fixtures_dir):
    config = tfds_builder.make_config("manual", max_target_length=128, test_fraction=0.3)
    b = tfds_builder.prepare(config, data_dir=str(tmp_path), manual_dir=str(fixtures_dir))
    counts = {s: b.info.splits[s].num_examples for s in ("train", "test")}
    measurements = sum(
        len(rec["event_time"])
        for s in ("train", "test")
        for rec in map(tfds_builder.RecordSource(b, s).__getitem__, range(counts[s]))
    )
    assert measurements == 17  # every result the importer keeps from the two fixture files
    assert counts["train"] > 0 and counts["test"] > 0


def test_manual_config_with_a_time_split(tmp_path):
    """A mixed RIPE dump over four hours, split after two: 'later' holds every row from then
    on, train/test the earlier rows by pair; the records (built bucket by bucket of sources)
    equal records.py's on all the rows at once."""
    from pingllm.data import ripe_atlas, ripe_writer

    rows = synthetic.SyntheticInternet(seed=2).generate(6000, duration_s=4 * 3600)
    manual = tmp_path / "manual"
    manual.mkdir()
    ripe_writer.write_ripe_json(rows, manual / "ping-2025-03-03.jsonl", mixed=True)
    later_from = "2025-03-03T02:00:00Z"
    config = tfds_builder.make_config("manual", max_target_length=LENGTH,
                                      later_from=later_from)
    assert config.name == f"manual_len{LENGTH}_later20250303T020000"
    b = tfds_builder.prepare(config, data_dir=str(tmp_path / "data"), manual_dir=str(manual))
    got = {s: [tfds_builder.RecordSource(b, s)[i] for i in range(b.info.splits[s].num_examples)]
           for s in ("train", "test", "later")}
    cut = tfds_builder.later_from_seconds(later_from)
    assert all((r["event_time"] >= cut).all() for r in got["later"])
    assert all((r["event_time"] < cut).all() for s in ("train", "test") for r in got[s])
    assert all(len(got[s]) > 0 for s in got)
    imported, _ = ripe_atlas.import_files([manual / "ping-2025-03-03.jsonl"])
    # Built bucket by bucket (by source): the records of all rows at once.
    assert len(np.unique(tfds_builder.source_buckets(imported["src_addr"]))) > 8
    expect = records.rows_to_split_records(imported, LENGTH, later_from_s=cut)
    for split, recs in expect.items():
        want, have = _by_key(list(recs)), _by_key(got[split])
        assert want.keys() == have.keys(), split
        for k in want:
            for field in records.RECORD_KEYS:
                np.testing.assert_array_equal(want[k][field], have[k][field])
    assert sum(len(r["event_time"]) for s in got for r in got[s]) == rows.num_rows
    with pytest.raises(ValueError):
        tfds_builder.make_config("manual", later_from="not a time")
