"""RIPE Atlas importer: every fixture line, every drop reason, compressed/Parquet inputs, CLI."""

import bz2
import copy
import gzip
import json
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pingllm.data import ripe_atlas
from pingllm.data.ripe_atlas import ImportSummary, import_files, import_lines
from pingllm.data.schema import ROW_SCHEMA, parse_address

REAL = "ping_results.jsonl"
EDGE = "ping_results_synthetic_edge_cases.jsonl"
V4_1, V4_2, DST_13 = "62.2.16.12", "62.2.16.24", "203.119.111.139"

# (file, line) -> (msm_id, prb_id, Unix seconds, src, dst, ip_version, rtt as written) or reason.
EXPECTED = {
    # sagan test_ping_0: fw 0, numbers as strings, no `from`: the public src_addr is the source.
    (REAL, 1): (1000192, 677, 1328019792, "78.128.9.202", V4_1, 4, 57.876),
    # test_ping_1: fw 1 writes `addr`, no `af`/`pf`: the family comes from the address.
    (REAL, 2): (1000192, 165, 1340523908, "194.85.27.7", V4_1, 4, 123.89400000000001),
    # 4460..4610: `from` public, `src_addr` private behind NAT.
    (REAL, 3): (1000192, 270, 1340524626, "188.194.234.136", V4_1, 4, 43.869999999999997),
    (REAL, 4): (1000192, 202, 1361244431, "80.56.151.3", V4_1, 4, 29.960999999999999),
    (REAL, 5): (1000192, 202, 1378271710, "80.56.151.3", V4_1, 4, 27.300999999999998),
    (REAL, 6): (1000192, 202, 1380586151, "62.195.143.53", V4_1, 4, 34.747999999999998),
    (REAL, 7): (1000192, 202, 1384500425, "62.195.143.53", V4_1, 4, 36.423999999999999),
    (REAL, 8): (1000192, 270, 1392321470, "188.195.183.141", V4_2, 4, 45.939),
    (REAL, 9): (1000192, 270, 1395416383, "188.195.181.120", V4_2, 4, 47.941000000000003),
    # test_ping_duplicate: duplicates with larger RTTs do not change `min`.
    (REAL, 10): (1000192, 1216, 1395277728, "109.190.83.40", V4_2, 4, 27.768000000000001),
    # test_ping_buggy: rcvd 0 but duplicates listed with 1.6 s RTTs: a failed probe.
    (REAL, 11): (1000192, 202, 1394745831, "62.195.143.53", V4_2, 4, -1.0),
    (REAL, 12): (1000192, 270, 1406561624, "188.193.157.75", V4_2, 4, 52.875),
    # fetchmesh: an anchor pinging itself (src_addr == dst_addr == from): the packets never
    # left the host, so it is dropped; then 5020 lines.
    (REAL, 13): "self_ping",
    (REAL, 14): (26858348, 6828, 1599523342, "185.106.32.32", DST_13, 4, 385.08633),
    (REAL, 15): (26858348, 6807, 1599525267, "194.233.214.2", DST_13, 4, 345.223359),
    (REAL, 16): (26858348, 6807, 1599530325, "194.233.214.2", DST_13, 4, -1.0),
    # probe-side output: no controller fields.
    (REAL, 17): "missing_timestamp",
    (REAL, 18): "missing_timestamp",
    # IPv6 with a timeout and a send error in result[]: rcvd 1, min 31.204.
    (EDGE, 1): (1000001, 1000002, 1751328000, "2001:db8:ffff::2", "2001:db8:1::1", 6, 31.204),
    (EDGE, 2): "no_destination_address",  # DNS failure
    (EDGE, 3): "nothing_sent",  # "address not allowed": sent 0
    (EDGE, 4): (1000007, 1000008, 1751328720, "192.0.2.10", "192.0.2.9", 4, 1.4),  # no avg
    (EDGE, 5): "missing_timestamp",  # no timestamp and no type
}


def _fixture_line(fixtures_dir, name, number) -> str:
    return (fixtures_dir / name).read_text().splitlines()[number - 1]


def _rows(table: pa.Table) -> list[tuple]:
    """Rows as (msm, prb, event_time us, src, dst, ip_version, rtt float32)."""
    cols = [table[c].to_pylist() for c in ("msm_id", "prb_id", "src_addr", "dst_addr")]
    times = table["event_time"].cast(pa.int64()).to_pylist()
    versions = table["ip_version"].to_pylist()
    rtts = table["rtt"].to_numpy()
    return [
        (m, p, t, s, d, v, np.float32(r))
        for m, p, s, d, t, v, r in zip(*cols, times, versions, rtts)
    ]


def _expected_row(msm, prb, seconds, src, dst, version, rtt) -> tuple:
    return (msm, prb, seconds * 1_000_000, src, dst, version, np.float32(rtt))


@pytest.mark.parametrize("name,number", sorted(EXPECTED), ids=lambda x: str(x))
def test_fixture_line(fixtures_dir, name, number):
    table, summary = import_lines([_fixture_line(fixtures_dir, name, number)])
    assert table.schema == ROW_SCHEMA
    expected = EXPECTED[(name, number)]
    assert summary.dropped.get("unexpected_error", 0) == 0
    if isinstance(expected, str):
        assert table.num_rows == 0
        assert (summary.kept, summary.dropped) == (0, {expected: 1})
    else:
        assert (summary.kept, summary.dropped) == (1, {})
        assert _rows(table) == [_expected_row(*expected)]
        assert table["event_time"].type == pa.timestamp("us", tz="UTC")


def test_fixture_files_together(fixtures_dir):
    table, summary = import_files([fixtures_dir / REAL, fixtures_dir / EDGE])
    expected_rows = [_expected_row(*v) for v in EXPECTED.values() if not isinstance(v, str)]
    assert _rows(table) == expected_rows
    assert summary.to_dict()["read"] == 23
    assert (summary.kept, summary.dropped) == (
        17,
        {"missing_timestamp": 3, "no_destination_address": 1, "nothing_sent": 1,
         "self_ping": 1},
    )


# ---------------------------------------------------------------- drop reasons

# A modern fw 5020 success (fixture line 14) to break one field at a time.
BASE = {
    "fw": 5020,
    "af": 4,
    "dst_addr": DST_13,
    "src_addr": "10.107.254.5",
    "result": [{"rtt": 385.08633}, {"rtt": 385.177654}, {"rtt": 385.12235}],
    "dup": 0,
    "rcvd": 3,
    "sent": 3,
    "min": 385.08633,
    "max": 385.177654,
    "avg": 385.128778,
    "msm_id": 26858348,
    "prb_id": 6828,
    "timestamp": 1599523342,
    "from": "185.106.32.32",
    "type": "ping",
}


def _with(**changes) -> str:
    record = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is _DELETE:
            record.pop(key, None)
        else:
            record[key] = value
    return json.dumps(record)


_DELETE = object()

BAD_LINES = {
    "not json": ("{not json", "malformed_json"),
    "truncated": (_with()[:-20], "malformed_json"),
    "invalid utf-8": (b'{"type": "ping", "from": "\xff\xfe"}', "malformed_json"),
    "deep nesting": ("[" * 100_000, "malformed_json"),
    "5000-digit int": ('{"msm_id": ' + "9" * 5000 + "}", "malformed_json"),
    "a number": ("42", "not_an_object"),
    "a string": ('"ping"', "not_an_object"),
    "null": ("null", "not_an_object"),
    "empty array": ("[]", "not_an_object"),
    "blank": ("   ", "empty_line"),
    "no timestamp": (_with(timestamp=_DELETE), "missing_timestamp"),
    "null timestamp": (_with(timestamp=None), "missing_timestamp"),
    "no msm_id": (_with(msm_id=_DELETE), "missing_msm_id"),
    "traceroute": (_with(type="traceroute"), "not_a_ping"),
    "no type": (_with(type=_DELETE), "not_a_ping"),
    "unknown fw": (_with(fw=9999), "unknown_firmware"),
    "fw 6000": (_with(fw=6000), "unknown_firmware"),
    "fw 2": (_with(fw=2), "unknown_firmware"),
    "no fw": (_with(fw=_DELETE), "unknown_firmware"),
    "fw as string": (_with(fw="5020"), "unknown_firmware"),
    "fw true": (_with(fw=True), "unknown_firmware"),
    "timestamp 0": (_with(timestamp=0), "bad_timestamp"),
    "timestamp in ms": (_with(timestamp=1599523342000), "bad_timestamp"),
    "timestamp string on fw 5020": (_with(timestamp="1599523342"), "bad_timestamp"),
    "timestamp float": (_with(timestamp=1599523342.5), "bad_timestamp"),
    "huge msm_id": (_with(msm_id=2**70), "bad_field"),
    "negative prb_id": (_with(prb_id=-3), "bad_field"),
    "msm_id list": (_with(msm_id=[1]), "bad_field"),
    "af 5": (_with(af=5), "bad_field"),
    "rcvd > sent": (_with(rcvd=4), "bad_field"),
    "no rcvd": (_with(rcvd=_DELETE), "missing_counts"),
    "no sent": (_with(sent=_DELETE), "missing_counts"),
    "sent null": (_with(sent=None), "missing_counts"),
    "private destination": (_with(dst_addr="10.1.2.3"), "private_destination"),
    "destination is from": (_with(dst_addr="185.106.32.32"), "self_ping"),
    "destination is the local src_addr": (
        _with(src_addr="203.119.111.140", dst_addr="203.119.111.140"), "self_ping"),
    "sent string on fw 5020": (_with(sent="3"), "bad_field"),
    "result not a list": (_with(min=_DELETE, result={"rtt": 3}), "bad_field"),
    "no dst_addr": (_with(dst_addr=_DELETE), "no_destination_address"),
    "empty dst_addr": (_with(dst_addr=""), "no_destination_address"),
    "dst not an ip": (_with(dst_addr="hsi.cablecom.ch"), "bad_address"),
    "dst a number": (_with(dst_addr=1040322572), "bad_address"),
    "dst leading zeros": (_with(dst_addr="062.2.16.12"), "bad_address"),
    "from garbage": (_with(**{"from": "185.106.32"}), "bad_address"),
    "scoped from": (
        _with(af=6, dst_addr="2001:67c:2e8::2", **{"from": "fe80::1%eth0"}),
        "bad_address",
    ),
    "private from and src": (_with(**{"from": "192.168.1.2"}), "no_public_source"),
    "no from, private src": (_with(**{"from": _DELETE}), "no_public_source"),
    "cgnat from": (_with(**{"from": "100.64.3.4"}), "no_public_source"),
    "multicast from": (_with(**{"from": "224.0.0.1"}), "no_public_source"),
    "af 6, v4 addresses": (_with(af=6), "address_family_mismatch"),
    "v6 dst, v4 source": (
        _with(af=6, dst_addr="2001:67c:2e8:3::c100:a4"),
        "address_family_mismatch",
    ),
    "sent 0": (_with(sent=0, rcvd=0, min=-1), "nothing_sent"),
    "NaN min": (_with().replace("385.08633,", "NaN,", 1), "bad_rtt"),
    "inf min": (_with().replace('"min": 385.08633', '"min": 1e999'), "bad_rtt"),
    "huge min": (_with(min=1e30), "bad_rtt"),
    "negative min": (_with(min=-5.0), "bad_rtt"),
    "min -1 with rcvd 3": (_with(min=-1), "bad_rtt"),
    "min string on fw 5020": (_with(min="385.08633"), "bad_rtt"),
    "min bool": (_with(min=True), "bad_rtt"),
    "rcvd 0 but min 5": (_with(rcvd=0, min=5.0), "bad_rtt"),
    "no min, only dup replies": (
        _with(min=_DELETE, rcvd=1, result=[{"rtt": 9, "dup": 1}]),
        "bad_rtt",
    ),
    "no min, NaN reply": (_with(min=_DELETE, result=[{"rtt": "NaN"}]), "bad_rtt"),
    "fw 0 min 'nan'": (_with(fw=0, min="nan"), "bad_rtt"),
    "fw 0 rcvd 'x'": (_with(fw=0, rcvd="x"), "bad_field"),
}


def test_nan_line_is_really_nan():
    assert '"min": NaN' in BAD_LINES["NaN min"][0]


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_dropped_and_counted(case):
    line, reason = BAD_LINES[case]
    table, summary = import_lines([line])
    assert table.num_rows == 0 and table.schema == ROW_SCHEMA
    assert (summary.kept, summary.dropped) == (0, {reason: 1})


def test_bad_lines_between_good_ones_leave_good_rows_exact(fixtures_dir):
    good = [_fixture_line(fixtures_dir, REAL, n) for n in (2, 14)]
    bad = [line for line, _ in BAD_LINES.values()]
    table, summary = import_lines([good[0], *bad, good[1]])
    assert _rows(table) == [
        _expected_row(*EXPECTED[(REAL, 2)]),
        _expected_row(*EXPECTED[(REAL, 14)]),
    ]
    assert summary.kept == 2 and summary.total_dropped == len(bad)
    reasons = {}
    for _, reason in BAD_LINES.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    assert summary.dropped == reasons


def test_mutated_lines_never_crash_and_kept_rows_are_valid(fixtures_dir):
    """Seeded byte/field mutations of every fixture line: each is a valid row or a counted drop."""
    lines = [
        *(fixtures_dir / REAL).read_bytes().splitlines(),
        *(fixtures_dir / EDGE).read_bytes().splitlines(),
    ]
    rng = random.Random(0)
    junk = [b"", b"\x00", b"\xff", b'"', b"{", b"]", b"-", b"9" * 30, b"null", b"true", b"1e999"]
    mutated = []
    for _ in range(3000):
        data = bytearray(rng.choice(lines))
        for _ in range(rng.randint(1, 3)):
            i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
            data[i:j] = rng.choice(junk)
        mutated.append(bytes(data))
    for _ in range(500):  # type swaps that keep the JSON valid
        record = json.loads(rng.choice(lines))
        key = rng.choice(sorted(record))
        record[key] = rng.choice([None, -1, 0, 2**65, 1.5, "x", "", [], {}, True, float("nan")])
        mutated.append(json.dumps(record).encode())
    table, summary = import_lines(mutated)
    assert summary.total_read == len(mutated)
    assert summary.dropped.get("unexpected_error", 0) == 0
    assert table.num_rows == summary.kept > 0
    for m, p, t, src, dst, version, rtt in _rows(table):
        assert m > 0 and (p > 0 or p == -1)
        assert ripe_atlas.MIN_TIMESTAMP_S * 10**6 <= t < ripe_atlas.MAX_TIMESTAMP_S * 10**6
        assert parse_address(src)[1] == parse_address(dst)[1] == version
        assert ripe_atlas.is_public_address(src)
        assert rtt == -1.0 or (np.isfinite(rtt) and 0 <= rtt <= ripe_atlas.MAX_RTT_MS)


# ---------------------------------------------------------------- import rules


def _one_row(line) -> tuple:
    table, summary = import_lines([line])
    assert summary.kept == 1, summary.dropped
    return _rows(table)[0]


def test_min_missing_is_computed_over_non_duplicate_replies(fixtures_dir):
    for number in (10, 15):  # duplicates with larger RTTs in result[]
        record = json.loads(_fixture_line(fixtures_dir, REAL, number))
        del record["min"]
        assert _one_row(json.dumps(record)) == _expected_row(*EXPECTED[(REAL, number)])
    # Duplicates faster than the real reply are still excluded.
    line = _with(
        min=_DELETE,
        rcvd=2,
        result=[{"rtt": 1.25, "dup": 1}, {"rtt": 7.5}, {"x": "*"}, {"rtt": 7.25}, {"error": "x"}],
    )
    assert _one_row(line)[6] == np.float32(7.25)


def test_rcvd_zero_is_failed_whatever_duplicates_or_string_numbers_say(fixtures_dir):
    record = json.loads(_fixture_line(fixtures_dir, REAL, 1))  # fw 0, strings
    record.update(rcvd="0", min="-1", avg="-1", max="-1")
    assert _one_row(json.dumps(record))[6] == np.float32(-1.0)
    record.pop("min")  # no min at all: rcvd alone decides
    assert _one_row(json.dumps(record))[6] == np.float32(-1.0)


@pytest.mark.parametrize(
    "from_, src_key, src, expected",
    [
        ("185.106.32.32", "src_addr", "10.107.254.5", "185.106.32.32"),
        ("", "src_addr", "185.106.32.9", "185.106.32.9"),  # `from` may be ""
        ("172.16.0.4", "src_addr", "185.106.32.9", "185.106.32.9"),  # private `from`
        (None, "srcaddr", "185.106.32.9", "185.106.32.9"),  # old firmware key
        ("185.106.32.32", "src_addr", "185.106.32.9", "185.106.32.32"),  # `from` wins
    ],
)
def test_source_is_from_when_public_else_src_addr(from_, src_key, src, expected):
    record = copy.deepcopy(BASE)
    record.pop("src_addr")
    record["from"] = from_
    record[src_key] = src
    assert _one_row(json.dumps(record))[3] == expected


def test_old_keys_addr_and_pf_and_canonical_ipv6():
    record = copy.deepcopy(BASE)
    for key in ("dst_addr", "af", "src_addr"):
        record.pop(key)
    record.update(
        fw=4400, addr="2001:067C:02e8:0003:0:0:c100:00a4", pf=6, **{"from": "2001:470:D16A:10::1"}
    )
    row = _one_row(json.dumps(record))
    assert row[3:6] == ("2001:470:d16a:10::1", "2001:67c:2e8:3::c100:a4", 6)
    record["pf"] = 4
    assert import_lines([json.dumps(record)])[1].dropped == {"address_family_mismatch": 1}


def test_modern_5080_line_as_a_writer_would_emit_imports_exactly():
    """rows -> RIPE JSON (fw 5080, `from`, `min`, `rcvd`) -> rows is exact for float32 RTTs."""
    rng = np.random.default_rng(0)
    rtts = rng.lognormal(3.9, 1.2, 300).astype(np.float32)
    lines = []
    for i, rtt in enumerate(rtts):
        failed = i % 7 == 0
        value = -1.0 if failed else float(rtt)
        lines.append(
            json.dumps(
                {
                    "fw": 5080,
                    "type": "ping",
                    "af": 6,
                    "from": "2a01:4f8::%x" % (i + 1),
                    "dst_addr": "2001:7fe::53",
                    "msm_id": 1001 + i,
                    "prb_id": 10_000 + i,
                    "timestamp": 1_700_000_000 + 240 * i,
                    "sent": 3,
                    "rcvd": 0 if failed else 3,
                    "dup": 0,
                    "min": value,
                    "max": value,
                    "avg": value,
                    "result": [{"x": "*"}] * 3 if failed else [{"rtt": value}] * 3,
                }
            )
        )
    table, summary = import_lines(lines)
    assert (summary.kept, summary.dropped) == (300, {})
    want = np.where(np.arange(300) % 7 == 0, np.float32(-1), rtts)
    np.testing.assert_array_equal(table["rtt"].to_numpy(), want)
    assert table["msm_id"].to_pylist() == list(range(1001, 1301))
    assert table["event_time"].cast(pa.int64()).to_pylist() == [
        (1_700_000_000 + 240 * i) * 10**6 for i in range(300)
    ]
    assert table["src_addr"][10].as_py() == "2a01:4f8::b"


def test_json_array_line_is_one_record_per_element(fixtures_dir):
    lines = [json.loads(_fixture_line(fixtures_dir, REAL, n)) for n in (12, 14, 17)]
    table, summary = import_lines([json.dumps(lines + [7])])
    assert _rows(table) == [_expected_row(*EXPECTED[(REAL, n)]) for n in (12, 14)]
    assert summary.dropped == {"missing_timestamp": 1, "not_an_object": 1}


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("192.0.2.1", True),
        ("198.51.100.7", True),
        ("203.0.113.9", True),
        ("2001:db8::1", True),
        ("2a00:1450::1", True),
        ("2002:c000:204::1", True),
        ("10.1.1.1", False),
        ("172.31.0.1", False),
        ("192.168.0.1", False),
        ("100.64.0.1", False),
        ("127.0.0.1", False),
        ("169.254.1.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("198.18.0.1", False),
        ("192.0.0.8", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("ff02::1", False),
        ("::ffff:8.8.8.8", False),
        ("2001::1", False),
        ("64:ff9b::808:808", False),
        ("not-an-ip", False),
        ("fe80::1%eth0", False),
    ],
)
def test_public_address_decision(address, public):
    assert ripe_atlas.is_public_address(address) is public


# ---------------------------------------------------------------- files


def _write_compressed(fixtures_dir, tmp_path):
    data = (fixtures_dir / REAL).read_bytes() + (fixtures_dir / EDGE).read_bytes()
    plain = tmp_path / "all.jsonl"
    plain.write_bytes(data)
    (tmp_path / "all.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "all.jsonl.bz2").write_bytes(bz2.compress(data))
    return plain, tmp_path / "all.jsonl.gz", tmp_path / "all.jsonl.bz2"


def test_gz_and_bz2_give_the_same_table_as_plain(fixtures_dir, tmp_path):
    plain, gz, bz = _write_compressed(fixtures_dir, tmp_path)
    table, summary = import_files([plain])
    assert table.num_rows == 17
    for path in (gz, bz):
        other, other_summary = import_files([path])
        assert other.equals(table)
        assert other_summary == summary


def test_chunks_stream_and_concatenate_to_the_whole(fixtures_dir, tmp_path):
    plain, gz, _ = _write_compressed(fixtures_dir, tmp_path)
    summary = ImportSummary()
    chunks = list(ripe_atlas.iter_file_tables([plain, gz], summary, chunk_rows=4))
    assert [c.num_rows for c in chunks] == [4] * 8 + [2]  # chunks run across file boundaries
    whole, whole_summary = import_files([plain, gz])
    assert pa.concat_tables(chunks).equals(whole)
    assert summary == whole_summary and summary.kept == 34


def test_missing_input_file_raises_before_reading(fixtures_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        import_files([fixtures_dir / REAL, tmp_path / "nope.jsonl"])


def _extract_table(columns: dict, types: dict) -> pa.Table:
    return pa.table({k: pa.array(v, type=types[k]) for k, v in columns.items()})


T0 = 1_600_000_000


def test_parquet_extract_is_validated_like_json(tmp_path):
    # The original extract's schema: no msm_id, rtt as float64, event_time in ns without tz.
    rows = [
        # (prb_id, seconds, src, dst, ip_version, rtt, expected reason or None)
        (1, T0, "185.106.32.32", "203.119.111.139", 4, 12.5, None),
        (2, T0 + 1, "2A01:4F8::1", "2001:7fe::53", 6, -1.0, None),
        (None, T0 + 2, "185.106.32.32", "8.8.8.8", 4, 0.25, None),
        (4, T0 + 3, "185.106.32.32", "8.8.8.8", 4, float("nan"), "bad_rtt"),
        (5, T0 + 4, "185.106.32.32", "8.8.8.8", 4, -5.0, "bad_rtt"),
        (6, T0 + 5, "185.106.32.32", "8.8.8.8", 4, float("inf"), "bad_rtt"),
        (7, T0 + 6, "185.106.32.32", "8.8.8.8", 4, None, "bad_rtt"),
        (8, T0 + 7, "185.106.32", "8.8.8.8", 4, 3.0, "bad_address"),
        (9, T0 + 8, "192.168.1.2", "8.8.8.8", 4, 3.0, "no_public_source"),
        (10, T0 + 9, "185.106.32.32", "8.8.8.8", 6, 3.0, "address_family_mismatch"),
        (11, T0 + 10, "185.106.32.32", "2001:7fe::53", 4, 3.0, "address_family_mismatch"),
        (12, None, "185.106.32.32", "8.8.8.8", 4, 3.0, "missing_timestamp"),
        (13, 0, "185.106.32.32", "8.8.8.8", 4, 3.0, "bad_timestamp"),
        (14, T0 + 13, "185.106.32.32", None, 4, 3.0, "no_destination_address"),
        (15, T0 + 14, "185.106.32.32", "8.8.8.8", 5, 3.0, "bad_field"),
    ]
    table = _extract_table(
        {
            "prb_id": [r[0] for r in rows],
            "event_time": [None if r[1] is None else r[1] * 10**9 for r in rows],
            "src_addr": [r[2] for r in rows],
            "dst_addr": [r[3] for r in rows],
            "ip_version": [r[4] for r in rows],
            "rtt": [r[5] for r in rows],
        },
        {
            "prb_id": pa.int64(),
            "event_time": pa.timestamp("ns"),
            "src_addr": pa.string(),
            "dst_addr": pa.string(),
            "ip_version": pa.int8(),
            "rtt": pa.float64(),
        },
    )
    path = tmp_path / "extract.parquet"
    pq.write_table(table, path)
    out, summary = import_files([path])
    assert out.schema == ROW_SCHEMA
    assert _rows(out) == [
        (-1, 1, T0 * 10**6, "185.106.32.32", "203.119.111.139", 4, np.float32(12.5)),
        (-1, 2, (T0 + 1) * 10**6, "2a01:4f8::1", "2001:7fe::53", 6, np.float32(-1.0)),
        (-1, -1, (T0 + 2) * 10**6, "185.106.32.32", "8.8.8.8", 4, np.float32(0.25)),
    ]
    expected_drops = {}
    for r in rows:
        if r[6]:
            expected_drops[r[6]] = expected_drops.get(r[6], 0) + 1
    assert (summary.kept, summary.dropped) == (3, expected_drops)


def test_parquet_of_our_own_rows_round_trips(fixtures_dir, tmp_path):
    table, _ = import_files([fixtures_dir / REAL, fixtures_dir / EDGE])
    pq.write_table(table, tmp_path / "rows.parquet")
    again, summary = import_files([tmp_path / "rows.parquet"], chunk_rows=5)
    assert again.equals(table)
    assert (summary.kept, summary.dropped) == (17, {})


def test_parquet_without_required_columns_is_an_error(tmp_path):
    pq.write_table(pa.table({"src_addr": ["8.8.8.8"], "rtt": [1.0]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="required columns"):
        import_files([tmp_path / "x.parquet"])


# ---------------------------------------------------------------- summary and CLI


def test_summary_merge_json_and_format():
    a = ImportSummary(3, {"bad_rtt": 2})
    b = ImportSummary(4, {"bad_rtt": 1, "not_a_ping": 5})
    merged = a + b
    assert (merged.kept, merged.dropped, merged.total_dropped) == (
        7,
        {"bad_rtt": 3, "not_a_ping": 5},
        8,
    )
    assert a.dropped == {"bad_rtt": 2}  # merge does not mutate
    d = json.loads(merged.to_json())
    assert (d["read"], d["kept"], d["total_dropped"]) == (15, 7, 8)
    assert list(d["dropped"]) == list(ripe_atlas.DROP_REASONS)
    assert ImportSummary.from_dict(d) == merged
    text = merged.format()
    assert "not_a_ping" in text and "bad_rtt" in text and "malformed_json" not in text
    assert text.splitlines()[0].split() == ["read", "15"]


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "pingllm/cli/import_ripe_atlas.py", *map(str, args)],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_end_to_end(fixtures_dir, tmp_path, repo_root):
    _, gz, _ = _write_compressed(fixtures_dir, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n" + _with(fw=9999) + "\n")
    out = tmp_path / "out"
    result = _cli(
        fixtures_dir / REAL,
        gz,
        bad,
        "--output",
        out,
        "--summary_json",
        tmp_path / "summary.json",
        "--chunk_rows",
        "7",
        "--rows_per_file",
        "14",
        cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("rows-*.parquet"))
    # 15 + 17 rows in chunks of 7, two chunks (row groups) a file.
    assert [f.name for f in files] == [f"rows-0000{i}.parquet" for i in range(3)]
    for f, rows in zip(files, (14, 14, 4)):
        assert pq.read_schema(f) == ROW_SCHEMA
        assert pq.ParquetFile(f).metadata.num_rows == rows
        assert pq.ParquetFile(f).metadata.num_row_groups == (2 if rows == 14 else 1)
    written = pa.concat_tables(pq.read_table(f) for f in files)
    expected, expected_summary = import_files([fixtures_dir / REAL, gz, bad])
    assert written.equals(expected) and written.num_rows == 32
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["read"], summary["kept"], summary["total_dropped"]) == (43, 32, 11)
    assert {k: v for k, v in summary["dropped"].items() if v} == {
        "missing_timestamp": 5,
        "no_destination_address": 1,
        "nothing_sent": 1,
        "self_ping": 2,
        "malformed_json": 1,
        "unknown_firmware": 1,
    }
    assert ImportSummary.from_dict(summary) == expected_summary
    assert "unknown_firmware" in result.stdout and "32" in result.stdout

    again = _cli(fixtures_dir / REAL, "--output", out, cwd=repo_root)
    assert again.returncode != 0 and "already holds" in again.stderr


def test_cli_missing_input_and_empty_result(fixtures_dir, tmp_path, repo_root):
    result = _cli(
        fixtures_dir / REAL, tmp_path / "missing.jsonl", "--output", tmp_path / "o", cwd=repo_root
    )
    assert result.returncode != 0
    assert "input file not found" in result.stderr and "missing.jsonl" in result.stderr
    assert not (tmp_path / "o").exists()

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(_fixture_line(fixtures_dir, REAL, 17) + "\n")
    result = _cli(only_bad, "--output", tmp_path / "o2", cwd=repo_root)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "o2" / "rows-00000.parquet")
    assert table.schema == ROW_SCHEMA and table.num_rows == 0
