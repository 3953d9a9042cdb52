"""Tokens/s of tokens.tokenize_window on one core, against a per-measurement pure-Python encoder.

Also times tokens.tokenize_windows (the same windows, vectorised across a batch of records).
Windows look like the RIPE Atlas extract (docs/data_rules.md): 58% IPv4 / 42% IPv6 sources,
~3.5% failed, gaps between a source's measurements ~60 s median (p90 ~180 s), RTT median ~50 ms,
each record a full worst-case chunk of max_length 1024. Both encoders run in this process on the
same windows and must produce identical tokens. Throughput is reported from process CPU time
(robust on a shared machine) and from wall time.

    python benchmarks/bench_tokenizer.py [--windows 2000] [--reference-windows 200] [--batch 128]
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pingllm.data import tokens as T

MAX_LENGTH = 1024
SEED = 17


def make_records(count: int, rng: np.random.Generator) -> list[dict]:
    records = []
    for _ in range(count):
        v = 4 if rng.random() < 0.577 else 6
        a = 4 if v == 4 else 16
        n = T.max_measurements(v, MAX_LENGTH)
        src = np.zeros(16, np.uint8)
        src[:a] = rng.integers(0, 256, a)
        dst = np.zeros((n, 16), np.uint8)
        dst[:, :a] = rng.integers(0, 256, (n, a))
        gaps = np.rint(rng.lognormal(math.log(60), 0.86, n)).astype(np.int64)
        rtt = rng.lognormal(math.log(50.3), 1.22, n).astype(np.float32)
        rtt[rng.random(n) < 0.035] = -1.0
        records.append({"src_addr": src, "ip_version": np.int8(v), "dst_addr": dst,
                        "event_time": 1_700_000_000 + np.cumsum(gaps), "rtt_ms": rtt})
    return records


# ---- the reference: the same scheme, one measurement at a time in plain Python ----

_M64 = (1 << 64) - 1


def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _rtt_code(rtt_ms):
    us = min(max(rtt_ms * 1000.0, 1.0), float(T.RTT_MAX_US))
    e = max(math.frexp(us)[1] - 11, 0)
    m = round(us / 2**e)
    if m == 2048:
        e, m = e + 1, 1024
    return e << 11 | m


def reference_window(record, seed, window_index, max_length):
    plan = T.window_plan(seed, window_index, len(record["event_time"]))
    v6 = int(record["ip_version"]) == 6
    a = 16 if v6 else 4
    src = bytes(record["src_addr"])
    h0 = _mix64((_mix64((int.from_bytes(src[:8], "little") + 0x9E3779B97F4A7C15) & _M64)
                 ^ int.from_bytes(src[8:], "little")) & _M64)
    src_block = [T.SRC_IPV6 if v6 else T.SRC_IPV4] + [b + 11 for b in src[:a]]
    dst_type = T.DST_IPV6 if v6 else T.DST_IPV4
    times = record["event_time"].tolist()
    rtts = record["rtt_ms"].tolist()
    dsts = record["dst_addr"]
    tokens, fields, last = [], [], None
    for pos, i in enumerate(plan.order.tolist()):
        dst = bytes(dsts[i])
        seconds = times[i]
        blocks = [src_block, [dst_type] + [b + 11 for b in dst[:a]]]
        if rtts[i] >= 0:
            code = _rtt_code(rtts[i])
            blocks.append([T.RTT_START, (code >> 8) + 11, (code & 255) + 11])
        else:
            blocks.append([T.FAILED])
        if plan.timestamped[pos]:
            if last is None:
                blocks.append([T.TIMESTAMP_ABS] + [b + 11 for b in seconds.to_bytes(8, "big")])
            else:
                d = min(seconds - last, 2**32 - 1)
                blocks.append([T.TIMESTAMP_DELTA1, d + 11] if d < 256 else
                              [T.TIMESTAMP_DELTA4] + [b + 11 for b in d.to_bytes(4, "big")])
            last = seconds
        else:
            blocks.append(None)
        y = ((((int.from_bytes(dst[:8], "little") ^ h0) * 0x9FB21C651E98DF25) & _M64
              ^ int.from_bytes(dst[8:], "little")) * 0xC2B2AE3D27D4EB4F) & _M64
        y ^= seconds & _M64
        h = ((y ^ (y >> 32)) * 0xBF58476D1CE4E5B9) & _M64
        meas, meas_fields = [T.MEASUREMENT_START], [T.FIELD_START]
        for slot in T.FIELD_ORDERS[(h >> 40) % 24]:
            block = blocks[slot]
            if block is not None:
                meas += block
                meas_fields += [(T.FIELD_SRC, T.FIELD_DST, T.FIELD_RESULT, T.FIELD_TIME)[slot]] * (
                    len(block))
        if len(tokens) + len(meas) > max_length:
            break
        tokens += meas
        fields += meas_fields
    out = np.zeros(max_length, np.int32)
    out[: len(tokens)] = tokens
    out_fields = np.zeros(max_length, np.int8)
    out_fields[: len(fields)] = fields
    return out, out_fields, len(tokens)


# ---- timing ----


def _run(encode, items, repeats):
    """Median tokens/s by CPU time and by wall time, and tokens, over repeats of one pass.

    Each repeat uses new window indices (so new modes and orders), as training would.
    """
    runs = []
    for rep in range(repeats):
        total = 0
        c0, w0 = time.process_time(), time.perf_counter()
        for i, item in enumerate(items):
            total += encode(item, SEED, i + rep * len(items))
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        runs.append((total / cpu, total / wall, total))
    return tuple(statistics.median(r[k] for r in runs) for k in range(3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--reference-windows", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128, help="records per tokenize_windows")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one core
    rng = np.random.default_rng(0)
    records = make_records(args.windows, rng)
    ref_records = records[: args.reference_windows]

    for i, rec in enumerate(ref_records):  # same scheme: identical tokens and fields
        w = T.tokenize_window(rec, seed=SEED, window_index=i, max_length=MAX_LENGTH)
        tok, fld, length = reference_window(rec, SEED, i, MAX_LENGTH)
        assert w.length == length and np.array_equal(w.tokens, tok), f"window {i} differs"
        assert np.array_equal(w.fields, fld), f"window {i} fields differ"

    for s in range(0, 4 * args.batch, args.batch):  # the batched path gives the same rows
        batch = T.tokenize_windows(records[s:s + args.batch], seed=SEED,
                                   window_indices=range(s, s + args.batch), max_length=MAX_LENGTH)
        for i in range(s, s + args.batch):
            w = T.tokenize_window(records[i], seed=SEED, window_index=i, max_length=MAX_LENGTH)
            assert np.array_equal(batch.tokens[i - s], w.tokens), f"batched window {i} differs"

    def vectorised(rec, seed, wi):
        return T.tokenize_window(rec, seed=seed, window_index=wi, max_length=MAX_LENGTH).length

    def reference(rec, seed, wi):
        return reference_window(rec, seed, wi, MAX_LENGTH)[2]

    vectorised(records[0], SEED, 0)  # warm-up
    batches = [records[s:s + args.batch] for s in range(0, len(records), args.batch)]

    def batched(recs, seed, b):
        first = b * args.batch
        indices = range(first, first + len(recs))
        return int(T.tokenize_windows(recs, seed=seed, window_indices=indices,
                                      max_length=MAX_LENGTH).lengths.sum())

    vec = _run(vectorised, records, args.repeats)
    ref = _run(reference, ref_records, args.repeats)
    bat = _run(batched, batches, args.repeats)
    v4 = sum(int(r["ip_version"]) == 4 for r in records) / len(records)
    print(f"windows: {len(records)} ({v4:.0%} IPv4), {vec[2] / len(records):.0f} tokens/window, "
          f"max_length {MAX_LENGTH}, median of {args.repeats} repeats, 1 core")
    for name, (cpu_rate, wall_rate, _) in (
            ("tokenize_window", vec), ("pure-Python reference", ref),
            (f"tokenize_windows x{args.batch}", bat)):
        print(f"{name:>22}: {cpu_rate / 1e6:6.2f} M tokens/s (CPU time), "
              f"{wall_rate / 1e6:6.2f} M tokens/s (wall)")
    up_vec, up_bat = vec[0] / ref[0], bat[0] / ref[0]
    print(f"speed-up vs reference (CPU time): tokenize_window {up_vec:.1f}x, "
          f"tokenize_windows {up_bat:.1f}x; (wall) {vec[1] / ref[1]:.1f}x, {bat[1] / ref[1]:.1f}x")
    for name, rate, up, floor in (("tokenize_window", vec[0], up_vec, 5e6),
                                  ("tokenize_windows", bat[0], up_bat, 20e6)):
        print(f"targets, {name}: >= {floor / 1e6:.0f} M tokens/s per core "
              f"{'met' if rate >= floor else 'MISSED'}; "
              f">= 15x reference {'met' if up >= 15 else 'MISSED'}")


if __name__ == "__main__":
    main()
