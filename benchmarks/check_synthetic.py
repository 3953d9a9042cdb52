"""The synthetic Internet against docs/data_rules.md §3 at full size (>= 1M rows, default seed).

    python benchmarks/check_synthetic.py [--rows 1000000] [--seed 0]

Prints each measured value against its target with PASS/FAIL, plus rows/s; exits 1 when any
property fails. Property 5 (RIPE JSON round trip) runs on a 100k-row slice: the importer
parses JSON in Python (~10^5 lines/s), and the slice holds every kind of row.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pingllm.data import ripe_writer, synthetic
from pingllm.data.schema import ROW_SCHEMA, parse_addresses

RTT_TARGETS = {10: 12.5, 50: 50.3, 90: 239.4, 99: 343.1}
FAILED_TARGET, IPV4_TARGET = 3.5, 57.7

_results: list[bool] = []


def report(name: str, measured: str, target: str, ok: bool) -> None:
    _results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name:<44} {measured:>18}   target {target}")


def unique_addresses(column: pa.ChunkedArray, ver: np.ndarray):
    """(uint8[U,16], versions[U], inverse[N]) over the distinct (text, version) of a column."""
    text = np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)
    keys, inverse = np.unique(text.astype(str), return_inverse=True)
    addr, parsed = parse_addresses(keys)
    return addr, parsed, inverse


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    world = synthetic.SyntheticInternet(args.seed)
    t1 = time.perf_counter()
    table = world.generate(args.rows)
    t2 = time.perf_counter()
    print(
        f"world built in {t1 - t0:.2f} s; {len(table):,} rows generated in {t2 - t1:.2f} s "
        f"= {len(table) / (t2 - t1):,.0f} rows/s"
    )

    rtt = table["rtt"].to_numpy()
    ver = table["ip_version"].to_numpy()
    ok = rtt >= 0
    src_addr, src_ver, src_inv = unique_addresses(table["src_addr"], ver)
    dst_addr, dst_ver, dst_inv = unique_addresses(table["dst_addr"], ver)
    src_b, dst_b = src_addr[src_inv], dst_addr[dst_inv]

    # 1. No successful row below the fibre floor of its endpoints.
    floor = world.fibre_floor_ms(src_b, dst_b, ver)
    below = int((rtt[ok] < floor[ok]).sum()) + int(np.isnan(floor).sum())
    report("1 successful rows below fibre floor", f"{below}", "0", below == 0)

    # 2. Calibration.
    for q, target in RTT_TARGETS.items():
        got = float(np.percentile(rtt[ok], q))
        dev = abs(np.log(got / target))
        report(
            f"2 RTT p{q} (|ln ratio| <= 0.25)",
            f"{got:.1f} ms ({dev:.3f})",
            f"{target} ms",
            dev <= 0.25,
        )
    failed = 100 * (1 - ok.mean())
    report(
        "2 failed probes",
        f"{failed:.2f}%",
        f"{FAILED_TARGET}% +/- 0.5",
        abs(failed - FAILED_TARGET) <= 0.5,
    )
    ipv4 = 100 * (ver == 4).mean()
    report("2 IPv4 share", f"{ipv4:.2f}%", f"{IPV4_TARGET}% +/- 2", abs(ipv4 - IPV4_TARGET) <= 2)
    for q, target in {1: 3.2, 25: 25.8, 75: 120.7, 99.9: 1204}.items():
        got = float(np.percentile(rtt[ok], q))
        print(f"info  RTT p{q:<5} {got:8.1f} ms  (table {target}; not a tested target)")

    # 3. Addresses parse as their row's version; a prefix maps to one (AS, city); determinism.
    bad_version = int((src_ver[src_inv] != ver).sum() + (dst_ver[dst_inv] != ver).sum())
    report("3 addresses not of their row's IP version", f"{bad_version}", "0", bad_version == 0)
    import ipaddress

    texts = np.concatenate(
        [
            np.unique(table["src_addr"].to_numpy(zero_copy_only=False)),
            np.unique(table["dst_addr"].to_numpy(zero_copy_only=False)),
        ]
    )
    not_public = sum(not ipaddress.ip_address(t).is_global for t in texts)
    report(
        "3 distinct addresses that are not public",
        f"{not_public} of {len(texts)}",
        "0",
        not_public == 0,
    )
    both = np.concatenate([src_addr, dst_addr])
    both_ver = np.concatenate([src_ver, dst_ver])
    loc = world.locate(both, both_ver)
    unknown = int((loc.host < 0).sum())
    report("3 addresses that are no host of the world", f"{unknown}", "0", unknown == 0)
    h = world.hosts
    host_as, host_city = h.as_index[loc.host], h.city[loc.host]
    prefix = np.where(
        both_ver == 4,
        both[:, :3].astype(np.int64) @ [1 << 16, 1 << 8, 1],
        both[:, :6].astype(np.int64) @ [1 << 40, 1 << 32, 1 << 24, 1 << 16, 1 << 8, 1],
    )
    prefix = prefix * 10 + both_ver
    pairs = np.unique(np.stack([prefix, host_as, host_city], axis=1), axis=0)
    multi = len(pairs) - len(np.unique(pairs[:, 0]))
    report("3 prefixes (/24, /48) with more than one (AS, city)", f"{multi}", "0", multi == 0)
    again = synthetic.SyntheticInternet(args.seed).generate(200_000)
    other = synthetic.SyntheticInternet(args.seed + 1).generate(200_000)
    same = parquet_bytes(again) == parquet_bytes(world.generate(200_000))
    differs = parquet_bytes(other) != parquet_bytes(again)
    report("3 same seed -> byte-identical Parquet (200k)", f"{same}", "True", same)
    report("3 other seed -> different Parquet (200k)", f"{differs}", "True", differs)

    # 4. Gaps within a source's stream; evening congestion.
    t_s = table["event_time"].cast(pa.int64()).to_numpy() // 1_000_000
    order = np.lexsort((t_s, src_inv))
    same_src = src_inv[order][1:] == src_inv[order][:-1]
    gaps = np.diff(t_s[order])[same_src]
    g50, g90 = np.percentile(gaps, [50, 90])
    report("4 gap p50 within a source's stream", f"{g50:.0f} s", "~60 s (45-80)", 45 <= g50 <= 80)
    report(
        "4 gap p90 within a source's stream", f"{g90:.0f} s", "~180 s (140-220)", 140 <= g90 <= 220
    )
    msm = table["msm_id"].to_numpy()
    order = np.lexsort((t_s, msm, src_inv))
    same_stream = (src_inv[order][1:] == src_inv[order][:-1]) & (msm[order][1:] == msm[order][:-1])
    m50, m90 = np.percentile(np.diff(t_s[order])[same_stream], [50, 90])
    print(f"info  gaps per (msm_id, probe): p50 {m50:.0f} s, p90 {m90:.0f} s (the intervals)")
    evening, day = congestion_effect(world, table, src_b, dst_b, ver, t_s, rtt)
    report(
        "4 congested residential: evening - day excess",
        f"{evening:+.2f} ms",
        "> +3 ms",
        evening > 3,
    )
    report(
        "4 datacenter sources: evening - day excess",
        f"{day:+.2f} ms",
        "|x| < 0.5 ms",
        abs(day) < 0.5,
    )

    # 5. RIPE JSON round trip through the importer.
    if importlib.util.find_spec("pingllm.data.ripe_atlas") is None:
        report("5 RIPE JSON round trip", "importer missing", "equal rows", False)
    else:
        from pingllm.data import ripe_atlas

        part = table.slice(0, 100_000)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "results.jsonl"
            ripe_writer.write_ripe_json(part, path)
            back, summary = ripe_atlas.import_files([path])
        keys = [(c, "ascending") for c in ROW_SCHEMA.names]
        equal = back.schema.equals(ROW_SCHEMA) and back.sort_by(keys).equals(part.sort_by(keys))
        report(
            "5 RIPE JSON round trip (100k rows)",
            f"{len(back)} back, {summary.total_dropped} dropped",
            "equal rows",
            equal,
        )
    print(f"{sum(_results)}/{len(_results)} checks passed")
    return 0 if all(_results) else 1


def congestion_effect(world, table, src_b, dst_b, ver, t_s, rtt) -> tuple[float, float]:
    """Median over sources of (evening - daytime) median excess over the noise-free RTT."""
    ok = rtt >= 0
    truth = world.noise_free_rtt_ms(src_b[ok], dst_b[ok], ver[ok], t_s[ok])
    excess = rtt[ok] - truth
    host = world.locate(src_b[ok], ver[ok]).host
    h = world.hosts
    hour = world.local_hour(h.city[host], t_s[ok])
    is_evening, is_day = (hour >= 20) & (hour < 22), (hour >= 9) & (hour < 17)
    residential = np.isin(h.access[host], (synthetic.FIBRE, synthetic.CABLE, synthetic.DSL))
    congested = residential & world.as_congested[h.as_index[host]]
    datacenter = h.access[host] == synthetic.DATACENTER
    out = []
    for group in (congested, datacenter):
        diffs = []
        for s in np.unique(host[group]):
            mine = host == s
            e, d = excess[mine & is_evening], excess[mine & is_day]
            if len(e) >= 20 and len(d) >= 20:
                diffs.append(np.median(e) - np.median(d))
        out.append(float(np.median(diffs)) if diffs else float("nan"))
    return out[0], out[1]


if __name__ == "__main__":
    sys.exit(main())
