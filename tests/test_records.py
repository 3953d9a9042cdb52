"""records.py: chunking rows into per-source records, and the stable train/test split."""

import itertools

import numpy as np
import pyarrow as pa
import pytest

from pingllm.data import records, ripe_atlas, schema, tokens


def _table(src, dst, seconds, rtt, ip_version) -> pa.Table:
    n = len(src)
    return pa.table(
        {
            "msm_id": np.arange(n, dtype=np.int64),
            "prb_id": np.zeros(n, np.int64),
            "event_time": pa.array(np.asarray(seconds, np.int64) * 1_000_000,
                                   pa.timestamp("us", tz="UTC")),
            "src_addr": src,
            "dst_addr": dst,
            "ip_version": np.asarray(ip_version, np.int8),
            "rtt": np.asarray(rtt, np.float32),
        },
        schema=schema.ROW_SCHEMA,
    )


def _mixed_table(seed=0, n4=200, n6=100) -> pa.Table:
    """One busy IPv4 source (n4 rows), one IPv6 source (n6 rows), and 3 one-row sources."""
    rng = np.random.default_rng(seed)
    src = ["192.0.2.1"] * n4 + ["2001:db8::1"] * n6 + ["198.51.100.7", "203.0.113.9", "10.0.0.1"]
    dst = [f"198.18.0.{i % 7}" for i in range(n4)] + [f"2001:db8:ff::{i % 5:x}" for i in range(n6)]
    dst += ["192.0.2.200", "192.0.2.201", "192.0.2.202"]
    # Repeated seconds on purpose: ties in time must break deterministically.
    seconds = 1_700_000_000 + rng.integers(0, 5_000, len(src)) // 10 * 10
    seconds[:3] = 1_700_000_000 + 10**6  # a delta that needs 4 bytes
    rtt = rng.lognormal(3.5, 1.0, len(src)).astype(np.float32)
    rtt[::13] = -1.0
    versions = [4] * n4 + [6] * n6 + [4, 4, 4]
    return _table(src, dst, seconds, rtt, versions)


def _rows_of(table: pa.Table) -> list[tuple]:
    m = records.measurements_from_table(table)
    return sorted(
        (bytes(m.src_addr[i]), bytes(m.dst_addr[i]), int(m.event_time[i]), float(m.rtt_ms[i]))
        for i in range(len(m))
    )


def _rows_of_records(recs) -> list[tuple]:
    out = []
    for r in recs:
        for d, t, rtt in zip(r["dst_addr"], r["event_time"], r["rtt_ms"]):
            out.append((bytes(r["src_addr"]), bytes(d), int(t), float(rtt)))
    return sorted(out)


def _worst_case(rec) -> int:
    v, n = int(rec["ip_version"]), len(rec["event_time"])
    return tokens.worst_case_tokens(v, True) + (n - 1) * tokens.worst_case_tokens(v, False)


def test_capacity_per_record_matches_the_token_counts():
    # IPv4: 23 tokens for the first (absolute time), 19 for each later one (4-byte delta).
    assert records.measurements_per_record(4, 128) == 6  # 23 + 5 * 19 = 118 <= 128 < 137
    assert records.measurements_per_record(6, 128) == 2  # 47 + 43 = 90 <= 128 < 133
    assert records.measurements_per_record(4, 1024) == 53
    with pytest.raises(ValueError, match="cannot hold one IPv6"):
        records.measurements_per_record(6, 40)


def test_records_are_one_source_in_time_order_and_fit_the_worst_case():
    recs = list(records.rows_to_records(_mixed_table(), 128))
    # 200 IPv4 rows / 6 -> 34 chunks (30 of 6, 4 of 5); 100 IPv6 rows / 2 -> 50 of 2; 3 singles.
    sizes = {}
    for r in recs:
        assert r["src_addr"].shape == (16,) and r["src_addr"].dtype == np.uint8
        assert r["ip_version"].dtype == np.int8
        n = len(r["event_time"])
        assert r["dst_addr"].shape == (n, 16) and r["dst_addr"].dtype == np.uint8
        assert r["event_time"].dtype == np.int64 and r["rtt_ms"].dtype == np.float32
        assert np.all(np.diff(r["event_time"]) >= 0)
        assert _worst_case(r) <= 128
        sizes.setdefault(schema.format_address(r["src_addr"], r["ip_version"]), []).append(n)
    assert sorted(sizes["192.0.2.1"]) == [5] * 4 + [6] * 30
    assert sizes["2001:db8::1"] == [2] * 50
    assert sizes["198.51.100.7"] == sizes["203.0.113.9"] == sizes["10.0.0.1"] == [1]
    assert len(recs) == 34 + 50 + 3
    # Consecutive chunks of a source continue in time.
    v4 = [r for r in recs if schema.format_address(r["src_addr"], 4) == "192.0.2.1"]
    for a, b in itertools.pairwise(v4):
        assert a["event_time"][-1] <= b["event_time"][0]


def test_every_timestamp_mode_packs_the_whole_record():
    recs = list(records.rows_to_records(_mixed_table(), 128))
    for i, r in enumerate(recs):
        for mode in ("full", "none", "mixed"):
            w = tokens.tokenize_window(r, seed=3, window_index=i, max_length=128, mode=mode)
            assert w.num_measurements == len(r["event_time"])


def test_no_measurement_lost_and_row_order_does_not_matter():
    table = _mixed_table()
    recs = list(records.rows_to_records(table, 128))
    assert _rows_of_records(recs) == _rows_of(table)
    shuffled = table.take(np.random.default_rng(1).permutation(table.num_rows))
    again = list(records.rows_to_records(shuffled, 128))
    assert len(again) == len(recs)
    for a, b in zip(recs, again):
        for key in records.RECORD_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_real_ripe_atlas_rows_become_records(fixtures_dir):
    table, _ = ripe_atlas.import_files(sorted(fixtures_dir.glob("*.jsonl")))
    recs = list(records.rows_to_records(table, 1024))
    assert _rows_of_records(recs) == _rows_of(table)
    assert sum(len(r["event_time"]) for r in recs) == table.num_rows == 17  # 18 - a self-ping


def test_address_family_mismatch_is_rejected():
    table = _table(["192.0.2.1"], ["2001:db8::1"], [1], [1.0], [4])
    with pytest.raises(ValueError, match="1 rows have an address"):
        records.measurements_from_table(table)


def test_split_by_pair_is_stable_and_keeps_pairs_whole():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (20_000, 16), dtype=np.uint8)
    dst = rng.integers(0, 256, (20_000, 16), dtype=np.uint8)
    test = records.split_of_pairs(src, dst, 0.1)
    assert abs(test.mean() - 0.1) < 0.01
    # A pure function of the bytes: the same pair always lands the same way.
    np.testing.assert_array_equal(records.split_of_pairs(src[::-1], dst[::-1], 0.1), test[::-1])
    assert records.split_of_pairs(src, dst, 0.0).sum() == 0
    assert records.split_of_pairs(src, dst, 1.0).all()
    # Pinned: the split of these pairs must never change (it would leak test pairs into train).
    i = np.arange(40)
    src40 = np.zeros((40, 16), np.uint8)
    src40[:, :4] = np.stack([np.full(40, 10), np.zeros(40), i // 8, i % 8], 1)  # 10.0.i/8.i%8
    dst40 = np.zeros((40, 16), np.uint8)
    dst40[:, :4] = np.stack([np.full(40, 192), np.zeros(40), np.full(40, 2), i], 1)  # 192.0.2.i
    assert np.flatnonzero(records.split_of_pairs(src40, dst40, 0.5)).tolist() == [
        1, 3, 6, 9, 13, 14, 16, 18, 24, 26, 27, 29, 32, 35, 36, 39]
    # Another salt is another split.
    assert (records.split_of_pairs(src, dst, 0.5, salt="other") != (
        records.split_of_pairs(src, dst, 0.5))).mean() > 0.4


def test_rows_are_split_by_pair_before_chunking():
    table = _mixed_table(n4=400, n6=200)
    split = {k: list(v) for k, v in records.rows_to_split_records(table, 128, 0.3).items()}
    pairs = {
        name: {(bytes(r["src_addr"]), bytes(d)) for r in recs for d in r["dst_addr"]}
        for name, recs in split.items()
    }
    assert pairs["train"] and pairs["test"]
    assert not pairs["train"] & pairs["test"]
    assert _rows_of_records(split["train"] + split["test"]) == _rows_of(table)
    m = records.measurements_from_table(table)
    expect_test = records.split_of_pairs(m.src_addr, m.dst_addr, 0.3)
    assert sum(len(r["event_time"]) for r in split["test"]) == int(expect_test.sum())
    for recs in split.values():
        assert all(_worst_case(r) <= 128 for r in recs)
