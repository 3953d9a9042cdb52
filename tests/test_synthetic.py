"""The synthetic Internet against docs/data_rules.md §3, at test size (200k rows, default seed)."""

import hashlib
import importlib.util
import io
import ipaddress
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pingllm.data import ripe_writer, synthetic
from pingllm.data.schema import ROW_SCHEMA, parse_addresses

ROWS = 200_000


@pytest.fixture(scope="module")
def world():
    return synthetic.SyntheticInternet(0)


@pytest.fixture(scope="module")
def table(world):
    return world.generate(ROWS)


@pytest.fixture(scope="module")
def parsed(table):
    """(src uint8[N,16], dst uint8[N,16], src versions, dst versions), parsing each text once."""
    out = []
    for name in ("src_addr", "dst_addr"):
        text = np.asarray(table[name].to_numpy(zero_copy_only=False)).astype(str)
        keys, inverse = np.unique(text, return_inverse=True)
        addr, ver = parse_addresses(keys)
        out += [addr[inverse], ver[inverse]]
    return out[0], out[2], out[1], out[3]


def _sha(table: pa.Table) -> str:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def test_rows_have_the_schema_and_count(table):
    assert table.schema.equals(ROW_SCHEMA)
    assert len(table) == ROWS
    t = table["event_time"].cast(pa.int64()).to_numpy()
    assert (t % 1_000_000 == 0).all()  # whole seconds: the RIPE JSON round trip is exact
    assert set(np.unique(table["ip_version"].to_numpy())) == {4, 6}
    assert (table["prb_id"].to_numpy() > 0).all()


def test_property1_no_success_below_fibre_floor(world, table, parsed):
    src, dst, _, _ = parsed
    ver = table["ip_version"].to_numpy()
    rtt = table["rtt"].to_numpy()
    floor = world.fibre_floor_ms(src, dst, ver)
    assert not np.isnan(floor).any()
    ok = rtt >= 0
    assert (rtt[ok] >= floor[ok]).all()
    # The floor really binds: some rows are within 2x of it, and trans-ocean floors occur.
    assert (rtt[ok] < 2 * floor[ok]).mean() > 0.05
    assert floor.max() > 100


def test_floor_and_truth_for_named_city_pairs(world):
    h, c = world.hosts, world.cities
    london, sydney = c.index("London"), c.index("Sydney")
    unicast = h.kind != synthetic.ANYCAST
    in_london = np.flatnonzero(unicast & (h.city == london))
    in_sydney = np.flatnonzero(unicast & (h.city == sydney))
    a, b, far = in_london[0], in_london[1], in_sydney[0]
    src = h.addr_bytes(4, [a, a])
    dst = h.addr_bytes(4, [b, far])
    floor = world.fibre_floor_ms(src, dst, 4)
    km = c.distance_km(london, sydney)
    assert 16_900 < km < 17_100
    np.testing.assert_allclose(floor, [0.0, 2 * km / 200.0])
    truth = world.noise_free_rtt_ms(src, dst, 4)
    # Same city: access and processing only, plus a metro detour; far: stretch over fibre.
    assert h.access_ms[a] + h.access_ms[b] < truth[0] < h.access_ms[a] + h.access_ms[b] + 10
    assert floor[1] * 1.1 < truth[1] < floor[1] * 3 + 1200
    # Unknown addresses give NaN, not a guess.
    nowhere = np.zeros((1, 16), np.uint8)
    nowhere[0, :4] = [192, 0, 2, 1]
    assert np.isnan(world.noise_free_rtt_ms(nowhere, dst[:1], 4)).all()


def test_property2_loosely_at_test_size(table):
    # At 200k rows (~200 sources) one satellite probe is ~0.5% of all rows, so p99 swings
    # by up to ~0.6 in ln between seeds; p10-p90 and the shares move by less. Full-size
    # (1M rows, 0.25) calibration is benchmarks/check_synthetic.py.
    rtt = table["rtt"].to_numpy()
    ok = rtt >= 0
    for q, target, tol in ((10, 12.5, 0.3), (50, 50.3, 0.3), (90, 239.4, 0.3), (99, 343.1, 0.7)):
        got = np.percentile(rtt[ok], q)
        assert abs(np.log(got / target)) <= tol, (q, got)
    assert abs(100 * (1 - ok.mean()) - 3.5) <= 1.0
    assert abs(100 * (table["ip_version"].to_numpy() == 4).mean() - 57.7) <= 2.5


def test_property3_addresses_and_prefixes(world, table, parsed):
    src, dst, src_ver, dst_ver = parsed
    ver = table["ip_version"].to_numpy()
    assert (src_ver == ver).all() and (dst_ver == ver).all()
    texts = set(table["src_addr"].to_pylist()) | set(table["dst_addr"].to_pylist())
    assert all(ipaddress.ip_address(t).is_global for t in texts)
    for addr in (src, dst):
        loc = world.locate(addr, ver)
        assert (loc.host >= 0).all()
        h = world.hosts
        assert (world.asn[h.as_index[loc.host]] == loc.asn).all()
        assert (h.city[loc.host] == loc.city).all()
        assert (h.access[loc.host] == loc.access).all()
    # Prefixes are unique across the world and every host sits in its site's prefix.
    assert len(np.unique(world.site_v4)) == len(world.site_v4)
    assert len(np.unique(world.site_v6)) == len(world.site_v6)
    h = world.hosts
    assert ((h.v4 >> np.uint32(8)) == world.site_v4[h.site]).all()
    six = h.has_v6
    assert ((h.v6_hi[six] >> np.uint64(16)) == world.site_v6[h.site[six]]).all()
    assert (world.site_as[h.site] == h.as_index).all() and (world.site_city[h.site] == h.city).all()
    # In the rows: each /24 or /48 seen has exactly one (AS, city).
    both = np.concatenate([src, dst])
    both_ver = np.concatenate([ver, ver])
    loc = world.locate(both, both_ver)
    width = np.where(both_ver == 4, 3, 6)
    prefix = [bytes(a[:w]) + bytes([v]) for a, w, v in zip(both[::97], width[::97], both_ver[::97])]
    seen = {}
    for p, asn, city in zip(prefix, loc.asn[::97], loc.city[::97]):
        assert seen.setdefault(p, (asn, city)) == (asn, city)
    # Anycast prefixes: one AS, resolved per source to the nearest-ish instance.
    assert loc.anycast.any() and (loc.city[loc.anycast] == synthetic.ANYCAST_CITY).all()


def test_property3_same_seed_same_bytes_other_seed_other_bytes(table):
    again = synthetic.SyntheticInternet(0).generate(ROWS)
    assert _sha(again) == _sha(table)
    other = synthetic.SyntheticInternet(1).generate(ROWS)
    assert _sha(other) != _sha(table)
    # The requested count is exact whatever the seed.
    assert len(other) == ROWS


def test_property4_gaps_within_a_source_stream(table):
    t = table["event_time"].cast(pa.int64()).to_numpy() // 1_000_000
    src = np.unique(
        np.asarray(table["src_addr"].to_numpy(zero_copy_only=False)).astype(str),
        return_inverse=True,
    )[1]
    order = np.lexsort((t, src))
    gaps = np.diff(t[order])[src[order][1:] == src[order][:-1]]
    p50, p90 = np.percentile(gaps, [50, 90])
    assert 45 <= p50 <= 80 and 140 <= p90 <= 220, (p50, p90)
    # Per (msm_id, probe) the gap is the measurement's interval: 240 s dominates.
    msm = table["msm_id"].to_numpy()
    order = np.lexsort((t, msm, src))
    same = (src[order][1:] == src[order][:-1]) & (msm[order][1:] == msm[order][:-1])
    per_msm = np.diff(t[order])[same]
    assert 235 <= np.median(per_msm) <= 245


def test_property4_congested_sources_slower_in_their_evening(world, table, parsed):
    src, dst, _, _ = parsed
    ver = table["ip_version"].to_numpy()
    t = table["event_time"].cast(pa.int64()).to_numpy() // 1_000_000
    rtt = table["rtt"].to_numpy()
    ok = rtt >= 0
    excess = rtt[ok] - world.noise_free_rtt_ms(src[ok], dst[ok], ver[ok], t[ok])
    assert (excess >= 0).all()  # queueing and the tail only add
    h = world.hosts
    host = world.locate(src[ok], ver[ok]).host
    hour = world.local_hour(h.city[host], t[ok])
    evening, day = (hour >= 20) & (hour < 22), (hour >= 9) & (hour < 17)
    residential = np.isin(h.access[host], (synthetic.FIBRE, synthetic.CABLE, synthetic.DSL))
    groups = {
        "congested": residential & world.as_congested[h.as_index[host]],
        "datacenter": h.access[host] == synthetic.DATACENTER,
    }
    diffs = {}
    for name, member in groups.items():
        diffs[name] = []
        for s in np.unique(host[member]):
            mine = host == s
            e, d = excess[mine & evening], excess[mine & day]
            if len(e) >= 20 and len(d) >= 20:
                diffs[name].append(np.median(e) - np.median(d))
    congested, datacenter = np.array(diffs["congested"]), np.array(diffs["datacenter"])
    assert len(congested) >= 5 and len(datacenter) >= 20
    assert np.median(congested) > 3.0 and (congested > 1.0).mean() >= 0.8, congested
    assert abs(np.median(datacenter)) < 0.5 and (np.abs(datacenter) < 2.0).mean() >= 0.9


def test_route_changes_switch_stretch_over_days(world):
    h = world.hosts
    probes = np.flatnonzero(h.kind == synthetic.PROBE)[:400]
    anchors = np.flatnonzero(h.kind == synthetic.ANCHOR)[:400]
    src, dst = h.addr_bytes(4, probes), h.addr_bytes(4, anchors)
    start = synthetic._to_seconds(synthetic.DEFAULT_START)
    days = [
        world.noise_free_rtt_ms(src, dst, 4, np.full(400, start + d * 86_400)) for d in range(14)
    ]
    days = np.stack(days)
    changed = (days.max(axis=0) - days.min(axis=0)) > 0.01
    assert 0.2 < changed.mean() < 0.98  # most pairs switch routes within two weeks, not all
    primary = world.noise_free_rtt_ms(src, dst, 4)
    assert (days >= primary - 1e-9).all()  # backup routes are longer


def test_property5_ripe_json_round_trip(table, tmp_path):
    if importlib.util.find_spec("pingllm.data.ripe_atlas") is None:
        pytest.skip("pingllm.data.ripe_atlas (the RIPE importer) does not exist yet")
    from pingllm.data import ripe_atlas

    part = table.slice(0, 20_000)
    path = tmp_path / "results.jsonl"
    assert ripe_writer.write_ripe_json(part, path) == len(part)
    back, summary = ripe_atlas.import_files([path])
    assert summary.total_dropped == 0
    keys = [(c, "ascending") for c in ROW_SCHEMA.names]
    assert back.schema.equals(ROW_SCHEMA)
    assert back.sort_by(keys).equals(part.sort_by(keys))


def test_ripe_json_lines_follow_the_format(table, tmp_path):
    part = table.slice(0, 3000)
    path = tmp_path / "results.jsonl"
    ripe_writer.write_ripe_json(part, path)
    records = ripe_writer.read_json_lines(path)
    assert len(records) == len(part)
    rtt = part["rtt"].to_numpy()
    assert (rtt < 0).any() and (rtt >= 0).any()
    for rec, row_rtt, src in zip(records, rtt, part["src_addr"].to_pylist()):
        assert rec["type"] == "ping" and rec["fw"] == 5080 and rec["sent"] == 3
        assert rec["from"] == src and rec["af"] in (4, 6)
        assert len(rec["result"]) == 3
        if row_rtt < 0:
            assert rec["rcvd"] == 0 and rec["min"] == rec["max"] == rec["avg"] == -1
            assert rec["result"] == [{"x": "*"}] * 3
        else:
            replies = [r["rtt"] for r in rec["result"] if "rtt" in r]
            assert len(replies) == rec["rcvd"] >= 1
            assert np.float32(rec["min"]) == row_rtt and min(replies) == rec["min"]
            assert rec["min"] <= rec["avg"] <= rec["max"]
    # Deterministic: the same rows give the same bytes.
    again = tmp_path / "again.jsonl"
    ripe_writer.write_ripe_json(part, again)
    assert path.read_bytes() == again.read_bytes()


def test_cli_writes_row_schema_parquet(repo_root, tmp_path):
    out = tmp_path / "parquet"
    proc = subprocess.run(
        [
            sys.executable,
            str(repo_root / "pingllm" / "cli" / "make_synthetic.py"),
            "--rows",
            "30000",
            "--seed",
            "3",
            "--output",
            str(out),
            "--start_time",
            "2026-01-01T00:00:00Z",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 30000 rows" in proc.stdout
    files = sorted(out.glob("rows-*.parquet"))
    assert [f.name for f in files] == ["rows-00000.parquet"]
    read = pq.read_table(files[0])
    assert read.schema.equals(ROW_SCHEMA) and len(read) == 30000
    first = read["event_time"].cast(pa.int64()).to_numpy().min() // 1_000_000
    assert first >= 1_767_225_600  # 2026-01-01
    assert read.equals(synthetic.SyntheticInternet(3).generate(30000, "2026-01-01T00:00:00Z"))


def test_cli_writes_ripe_json_lines(repo_root, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "make_synthetic", repo_root / "pingllm" / "cli" / "make_synthetic.py"
    )
    make_synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_synthetic)

    out = tmp_path / "json"
    assert (
        make_synthetic.main(["--rows", "2000", "--output", str(out), "--format", "ripe-json"]) == 0
    )
    lines = (out / "results-00000.jsonl").read_text().splitlines()
    assert len(lines) == 2000
    assert all(json.loads(line)["type"] == "ping" for line in lines)
    assert "wrote 2000 rows" in capsys.readouterr().out
