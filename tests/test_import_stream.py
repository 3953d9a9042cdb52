"""Streaming RIPE Atlas import: mixed dumps, both decoders agree, filters, inputs that end
early, stdin, and memory that stays flat however long the input is."""

import bz2
import gzip
import json
import random
import re
import subprocess
import sys

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pingllm.data import ripe_atlas, ripe_writer, synthetic
from pingllm.data.ripe_atlas import ImportSummary, RowFilter, import_files, import_lines
from pingllm.data.schema import ROW_SCHEMA

REAL = "ping_results.jsonl"
EDGE = "ping_results_synthetic_edge_cases.jsonl"
KEYS = [(c, "ascending") for c in ROW_SCHEMA.names]


@pytest.fixture(scope="module")
def rows() -> pa.Table:
    return synthetic.SyntheticInternet(seed=4).generate(6000, duration_s=7200)


@pytest.fixture(scope="module")
def mixed_lines(rows) -> list[bytes]:
    return [line.encode() for line in ripe_writer.mixed_ripe_lines(rows)]


def _fixture_lines(fixtures_dir) -> list[bytes]:
    return [*(fixtures_dir / REAL).read_bytes().splitlines(),
            *(fixtures_dir / EDGE).read_bytes().splitlines()]


def _json_only(monkeypatch):
    """Every line through json.loads and the dict checks (the fallback path)."""
    def reject(line):
        raise msgspec.DecodeError("forced")
    monkeypatch.setattr(ripe_atlas, "_DECODE_PING", reject)


def test_mixed_dump_imports_to_exactly_the_rows(rows, mixed_lines):
    table, summary = import_lines(mixed_lines)
    others = len(mixed_lines) - rows.num_rows
    assert others > 500  # traceroute and DNS results between the pings
    assert (summary.kept, summary.dropped) == (rows.num_rows, {"not_a_ping": others})
    assert table.sort_by(KEYS).equals(rows.sort_by(KEYS))
    firmware = {json.loads(line)["fw"] for line in mixed_lines}
    assert firmware == {4610, 4790, 5020, 5080}
    for note in ripe_atlas.NOTES:
        assert summary.notes[note] > 0, note


def test_fast_and_json_decoders_give_the_same_rows_and_counts(fixtures_dir, mixed_lines,
                                                              monkeypatch):
    rng = random.Random(1)
    base = _fixture_lines(fixtures_dir) + mixed_lines[:300]
    junk = [b"", b"\x00", b"\xff", b'"', b"{", b"]", b"9" * 30, b"null", b"NaN", b"1e999",
            b'"min":', b'"error"', b"\\ud800"]
    mutated = []
    for _ in range(2000):
        data = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 3)):
            i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
            data[i:j] = rng.choice(junk)
        mutated.append(bytes(data))
    lines = base + mutated + [b"[" + b",".join(base[:3]) + b"]", b"  ", b"{}"]
    fast_table, fast = import_lines(lines)
    _json_only(monkeypatch)
    slow_table, slow = import_lines(lines)
    assert fast_table.equals(slow_table)
    assert fast == slow
    assert fast.dropped.get("unexpected_error", 0) == 0 and fast.kept > 200


def test_fixtures_and_mixed_dump_files_import_the_same_as_lines(fixtures_dir, mixed_lines,
                                                                 tmp_path):
    dump = tmp_path / "ping-2025-03-03T0000.bz2"
    dump.write_bytes(bz2.compress(b"\n".join(mixed_lines) + b"\n"))
    paths = [fixtures_dir / REAL, fixtures_dir / EDGE, dump]
    table, summary = import_files(paths, chunk_rows=1000)
    lines = _fixture_lines(fixtures_dir) + mixed_lines
    expected, expected_summary = import_lines(lines)
    assert table.equals(expected) and summary == expected_summary


def test_filters_keep_only_what_they_name_and_count_the_rest(rows, mixed_lines):
    t0 = int(rows["event_time"].cast(pa.int64()).to_numpy().min() // 10**6)
    probes = frozenset(rows["prb_id"].to_pylist()[:50])
    cases = {
        "ip_version": RowFilter(ip_version=6),
        "msm_id": RowFilter(builtin_only=True),
        "time": RowFilter(start_s=t0 + 600, end_s=t0 + 3600),
        "probe": RowFilter(probes=probes),
    }
    _, everything = import_lines(mixed_lines)
    for name, keep in cases.items():
        table, summary = import_lines(mixed_lines, row_filter=keep)
        assert 0 < table.num_rows < rows.num_rows, name
        assert summary.filtered == {name: rows.num_rows - table.num_rows}
        assert summary.dropped == everything.dropped
        assert all(keep.reason(r) is None for r in _tuples(table))
    msm = frozenset(rows["msm_id"].to_pylist()[:3])
    table, _ = import_lines(mixed_lines, row_filter=RowFilter(msm_ids=msm))
    assert set(table["msm_id"].to_pylist()) == msm
    assert all(m < ripe_atlas.BUILTIN_MSM_ID_LIMIT for m in
               import_lines(mixed_lines, row_filter=cases["msm_id"])[0]["msm_id"].to_pylist())


def _tuples(table):
    times = table["event_time"].cast(pa.int64()).to_pylist()
    return [(m, p, t, s, d, v, r) for m, p, t, s, d, v, r in zip(
        table["msm_id"].to_pylist(), table["prb_id"].to_pylist(), times,
        table["src_addr"].to_pylist(), table["dst_addr"].to_pylist(),
        table["ip_version"].to_pylist(), table["rtt"].to_pylist())]


# ---------------------------------------------------------------- inputs that end early


def _whole_lines_before(data: bytes, offset: int) -> list[bytes]:
    return data[:offset].split(b"\n")[:-1]


@pytest.mark.parametrize("kind", ["bz2", "gz"])
def test_truncated_input_reports_where_it_ended_and_keeps_what_was_read(mixed_lines, tmp_path,
                                                                        kind):
    data = b"\n".join(mixed_lines) + b"\n"
    packed = bz2.compress(data, 1) if kind == "bz2" else gzip.compress(data)
    cut = len(packed) * 2 // 3
    path = tmp_path / f"dump.{kind}"
    path.write_bytes(packed[:cut])
    table, summary = import_files([path])
    [t] = summary.truncated
    assert (t["file"], t["compressed_offset"], t["compressed_size"]) == (str(path), cut, cut)
    assert 0 < t["decompressed_offset"] < len(data) and t["error"]
    kept_lines = _whole_lines_before(data, t["decompressed_offset"])
    assert t["lines"] == len(kept_lines) and data[t["decompressed_offset"] - 1] == ord("\n")
    expected, expected_summary = import_lines(kept_lines)
    assert table.equals(expected) and table.num_rows > 1000
    partial = data[t["decompressed_offset"]:].split(b"\n")[0]
    assert summary.dropped.get("truncated_line", 0) == (1 if partial else 0)
    assert "TRUNCATED" in summary.format() and f"{cut:,}" in summary.format()


def test_corrupt_bz2_keeps_the_blocks_before_the_damage(mixed_lines, tmp_path):
    data = (b"\n".join(mixed_lines) + b"\n") * 3
    packed = bytearray(bz2.compress(data, 1))  # 100 kB blocks
    packed[len(packed) // 2: len(packed) // 2 + 64] = b"\x00" * 64
    path = tmp_path / "damaged.bz2"
    path.write_bytes(bytes(packed))
    table, summary = import_files([path])
    [t] = summary.truncated
    assert "OSError" in t["error"] or "EOFError" in t["error"]
    expected, _ = import_lines(_whole_lines_before(data, t["decompressed_offset"]))
    assert table.equals(expected) and table.num_rows > 0


def test_multi_stream_bz2_and_multi_member_gzip_are_read_whole(mixed_lines, tmp_path):
    half = len(mixed_lines) // 2
    a, b = (b"\n".join(part) + b"\n" for part in (mixed_lines[:half], mixed_lines[half:]))
    expected, expected_summary = import_lines(mixed_lines)
    for name, packed in (("x.bz2", bz2.compress(a) + bz2.compress(b)),
                         ("x.gz", gzip.compress(a) + gzip.compress(b))):
        (tmp_path / name).write_bytes(packed)
        table, summary = import_files([tmp_path / name])
        assert table.equals(expected) and summary == expected_summary and not summary.truncated


def _cli(*args, cwd, stdin=None):
    return subprocess.run([sys.executable, "pingllm/cli/import_ripe_atlas.py", *map(str, args)],
                          check=False, cwd=cwd, capture_output=True, timeout=300, input=stdin)


def test_cli_truncated_bz2_exits_3_with_the_offset_and_writes_the_rows(mixed_lines, tmp_path,
                                                                       repo_root):
    data = b"\n".join(mixed_lines) + b"\n"
    packed = bz2.compress(data, 1)
    cut = len(packed) - 1000
    (tmp_path / "t.bz2").write_bytes(packed[:cut])
    result = _cli(tmp_path / "t.bz2", "--output", tmp_path / "out", "--summary_json",
                  tmp_path / "s.json", cwd=repo_root)
    assert result.returncode == 3, result.stderr
    assert f"ended at compressed byte {cut:,} of {cut:,}" in result.stdout.decode()
    summary = ImportSummary.from_dict(json.loads((tmp_path / "s.json").read_text()))
    written = pq.read_table(tmp_path / "out")
    assert written.num_rows == summary.kept > 0
    assert summary.truncated[0]["compressed_offset"] == cut


def test_cli_reads_stdin_with_filters_and_progress(mixed_lines, tmp_path, repo_root):
    data = bz2.compress(b"\n".join(mixed_lines) + b"\n")
    result = _cli("-", "--output", tmp_path / "out", "--af", "4", "--msm_ids", "builtin",
                  "--progress", "always", cwd=repo_root, stdin=data)
    assert result.returncode == 0, result.stderr
    expected, _ = import_lines(mixed_lines,
                               row_filter=RowFilter(ip_version=4, builtin_only=True))
    assert pq.read_table(tmp_path / "out").equals(expected)
    assert re.search(r"results [\d,]+/s .* MB kept", result.stderr.decode())
    bad = _cli("-", "--output", tmp_path / "o2", "--start", "2025-01-02", "--end", "2025-01-01",
               cwd=repo_root, stdin=b"")
    assert bad.returncode == 2 and b"time range is empty" in bad.stderr


# ---------------------------------------------------------------- memory


def _peak_rss_mb(repo_root, tmp_path, block: bytes, repeats: int) -> tuple[float, int]:
    """Peak RSS of the importer CLI fed `block` x `repeats` through a pipe; rows written."""
    out = tmp_path / f"out{repeats}"
    proc = subprocess.Popen(
        [sys.executable, "pingllm/cli/import_ripe_atlas.py", "-", "--output", str(out),
         "--chunk_rows", "20000", "--rows_per_file", "200000"],
        cwd=repo_root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(repeats):
        proc.stdin.write(block)
    proc.stdin.close()
    stdout = proc.stdout.read().decode()
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    peak = float(re.search(r"peak RSS ([\d,]+) MB", stdout).group(1).replace(",", ""))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("rows-*.parquet"))
    return peak, rows


@pytest.mark.slow
def test_memory_stays_flat_on_a_stream_far_larger_than_it(mixed_lines, tmp_path, repo_root):
    block = b"\n".join(mixed_lines[:2000]) + b"\n"  # ~1 MB, ~1,600 pings
    pings = import_lines(mixed_lines[:2000])[1].kept
    small_peak, small_rows = _peak_rss_mb(repo_root, tmp_path, block, 10)
    repeats = 240_000_000 // len(block)
    big_peak, big_rows = _peak_rss_mb(repo_root, tmp_path, block, repeats)
    assert (small_rows, big_rows) == (10 * pings, repeats * pings)
    growth = big_peak - small_peak
    streamed_mb = repeats * len(block) / 1e6
    print(f"peak RSS {small_peak:.0f} MB at {10 * len(block) / 1e6:.0f} MB in, {big_peak:.0f} MB "
          f"at {streamed_mb:.0f} MB in")
    # 240 MB streamed through; the importer grows by less than a twentieth of that.
    assert growth < streamed_mb / 20
