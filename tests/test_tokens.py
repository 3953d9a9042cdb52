"""Pins the measurement token scheme v1 (docs/tokenization.md) and its window tokenizer."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from pingllm.data import tokens as T

M64 = (1 << 64) - 1


# ---- a spec-literal pure-Python reference of the scheme ----


def ref_mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_field_order_hash(src: bytes, dst: bytes, seconds: int) -> int:
    """The documented hash, one measurement at a time, in Python ints."""
    s_lo, s_hi = int.from_bytes(src[:8], "little"), int.from_bytes(src[8:], "little")
    h0 = ref_mix64((ref_mix64((s_lo + 0x9E3779B97F4A7C15) & M64) ^ s_hi) & M64)
    d_lo, d_hi = int.from_bytes(dst[:8], "little"), int.from_bytes(dst[8:], "little")
    y = ((((d_lo ^ h0) * 0x9FB21C651E98DF25) & M64 ^ d_hi) * 0xC2B2AE3D27D4EB4F) & M64
    y ^= seconds & M64
    return ((y ^ (y >> 32)) * 0xBF58476D1CE4E5B9) & M64


def ref_rtt_code(rtt_ms: float) -> int:
    """Smallest exponent whose rounded (half to even) mantissa fits 11 bits."""
    us = min(max(float(rtt_ms) * 1000.0, 1.0), float(T.RTT_MAX_US))
    e = 0
    while round(us / 2**e) > 2047:
        e += 1
    return e << 11 | round(us / 2**e)


def ref_measurement(src, dst, a, rtt, time_field, seconds):
    """(tokens, fields) of one measurement; time_field None or (kind, value)."""
    v6 = a == 16
    blocks = {
        T.SLOT_SRC: [T.SRC_IPV6 if v6 else T.SRC_IPV4] + [b + 11 for b in src[:a]],
        T.SLOT_DST: [T.DST_IPV6 if v6 else T.DST_IPV4] + [b + 11 for b in dst[:a]],
    }
    if rtt >= 0:
        code = ref_rtt_code(rtt)
        blocks[T.SLOT_RESULT] = [T.RTT_START, (code >> 8) + 11, (code & 255) + 11]
    else:
        blocks[T.SLOT_RESULT] = [T.FAILED]
    if time_field is not None:
        kind, value = time_field
        if kind == "abs":
            blocks[T.SLOT_TIME] = [T.TIMESTAMP_ABS] + [
                b + 11 for b in value.to_bytes(8, "big", signed=True)]
        elif kind == "delta1":
            blocks[T.SLOT_TIME] = [T.TIMESTAMP_DELTA1, value + 11]
        else:
            blocks[T.SLOT_TIME] = [T.TIMESTAMP_DELTA4] + [b + 11 for b in value.to_bytes(4, "big")]
    order = T.FIELD_ORDERS[(ref_field_order_hash(bytes(src), bytes(dst), seconds) >> 40) % 24]
    field_class = {T.SLOT_SRC: T.FIELD_SRC, T.SLOT_DST: T.FIELD_DST,
                   T.SLOT_RESULT: T.FIELD_RESULT, T.SLOT_TIME: T.FIELD_TIME}
    toks, flds = [T.MEASUREMENT_START], [T.FIELD_START]
    for slot in order:
        if slot in blocks:
            toks += blocks[slot]
            flds += [field_class[slot]] * len(blocks[slot])
    return toks, flds


def ref_window(record, seed, window_index, max_length):
    """(tokens, fields, packed) following window_plan, one measurement at a time."""
    n = len(record["event_time"])
    plan = T.window_plan(seed, window_index, n)
    src = [int(b) for b in record["src_addr"]]
    a = 4 if int(record["ip_version"]) == 4 else 16
    toks, flds, last, packed = [], [], None, 0
    for pos, i in enumerate(plan.order):
        seconds = int(record["event_time"][i])
        time_field = None
        if plan.timestamped[pos]:
            if last is None:
                time_field = ("abs", seconds)
            else:
                d = min(seconds - last, 2**32 - 1)
                time_field = ("delta1" if d < 256 else "delta4", d)
            last = seconds
        dst = [int(b) for b in record["dst_addr"][i]]
        mt, mf = ref_measurement(src, dst, a, float(record["rtt_ms"][i]), time_field, seconds)
        if len(toks) + len(mt) > max_length:
            break
        toks += mt
        flds += mf
        packed += 1
    return toks, flds, packed


# ---- records ----


def make_record(rng, ip_version, n, *, gap_scale=60.0, failed_frac=0.1, t0=1_700_000_000):
    """A source's record with distinct destinations, gaps incl. 0 and >= 256 s, some failures."""
    a = 4 if ip_version == 4 else 16
    src = np.zeros(16, np.uint8)
    src[:a] = rng.integers(0, 256, a)
    dst = np.zeros((n, 16), np.uint8)
    dst[:, :a] = rng.integers(0, 256, (n, a))
    dst[:, 0] = np.arange(n) % 256  # distinct destinations (n <= 256 here)
    gaps = rng.exponential(gap_scale, n).astype(np.int64)
    gaps[rng.random(n) < 0.1] = 0
    gaps[:1] = 0
    rtt = np.exp(rng.uniform(np.log(0.0005), np.log(3000.0), n)).astype(np.float32)
    rtt[rng.random(n) < failed_frac] = -1.0
    return {
        "src_addr": src,
        "ip_version": np.int8(ip_version),
        "dst_addr": dst,
        "event_time": t0 + np.cumsum(gaps),
        "rtt_ms": rtt,
    }


# ---- constants and counts ----


def test_vocabulary_and_field_constants():
    ids = [T.MEASUREMENT_START, T.SRC_IPV4, T.SRC_IPV6, T.DST_IPV4, T.DST_IPV6,
           T.TIMESTAMP_ABS, T.TIMESTAMP_DELTA1, T.TIMESTAMP_DELTA4, T.RTT_START,
           T.THROUGHPUT_START, T.FAILED, T.BYTE_OFFSET]
    assert ids == list(range(12))
    assert T.VOCAB_SIZE == 267 == T.BYTE_OFFSET + 256
    assert (T.FIELD_PAD, T.FIELD_START, T.FIELD_SRC, T.FIELD_DST, T.FIELD_RESULT,
            T.FIELD_TIME) == (0, 1, 2, 3, 4, 5)
    assert T.TIMESTAMP_MODES == ("full", "none", "mixed")
    assert T.TIMESTAMP_MODE_PROBS == (0.4, 0.3, 0.3)
    assert T.RTT_MAX_US == 2047 * 2**31
    assert len(T.FIELD_ORDERS) == 24 and T.FIELD_ORDERS[0] == (0, 1, 2, 3)
    assert T.FIELD_ORDERS[23] == (3, 2, 1, 0)


def test_token_counts():
    assert T.measurement_tokens(4, "abs") == 23
    assert T.measurement_tokens(4, "delta1") == 16
    assert T.measurement_tokens(4, None) == 14
    assert T.measurement_tokens(4, "delta4") == 19
    for kind in (None, "abs", "delta1", "delta4"):
        assert T.measurement_tokens(4, kind, failed=True) == T.measurement_tokens(4, kind) - 2
        assert T.measurement_tokens(6, kind) == T.measurement_tokens(4, kind) + 24
    assert T.worst_case_tokens(4, True) == 23 and T.worst_case_tokens(4, False) == 19
    assert T.worst_case_tokens(6, True) == 47 and T.worst_case_tokens(6, False) == 43
    np.testing.assert_array_equal(
        T.worst_case_tokens(np.array([4, 4, 6, 6]), np.array([True, False, True, False])),
        [23, 19, 47, 43])
    assert T.max_measurements(4, 1024) == 53  # 23 + 52 * 19 = 1011 <= 1024 < 1030
    assert T.max_measurements(6, 1024) == 23  # 47 + 22 * 43 = 993 <= 1024 < 1036
    assert T.max_measurements(4, 22) == 0


def test_window_lengths_match_token_counts():
    # IPv4 full mode with known gaps: abs, delta1 (0 s), delta1 (255 s), delta4 (256 s), failed
    rec = {"src_addr": np.array([10, 0, 0, 1] + [0] * 12, np.uint8), "ip_version": np.int8(4),
           "dst_addr": np.tile(np.array([10, 0, 0, 2] + [0] * 12, np.uint8), (5, 1)),
           "event_time": np.array([0, 0, 255, 511, 600]) + 1_600_000_000,
           "rtt_ms": np.array([1, 2, 3, 4, -1], np.float32)}
    w = T.tokenize_window(rec, seed=0, window_index=0, max_length=200, mode="full")
    assert w.length == 23 + 16 + 16 + 19 + 14 and w.num_measurements == 5
    kinds = [m.time_kind for m in T.decode_tokens(w.tokens)]
    assert kinds == ["abs", "delta1", "delta1", "delta4", "delta1"]
    w = T.tokenize_window(rec, seed=0, window_index=0, max_length=200, mode="none")
    assert w.length == 4 * 14 + 12


# ---- RTT codes ----


def test_rtt_code_exhaustive_round_trip():
    codes = np.arange(T.NUM_RTT_CODES)
    canonical = T.is_canonical_rtt_code(codes)
    assert canonical.sum() == 2047 + 31 * 1024
    values = T.decode_rtt(codes)
    again = T.encode_rtt(values)
    assert again.dtype == np.uint16
    np.testing.assert_array_equal(again[canonical], codes[canonical])
    # a non-canonical code with a nonzero mantissa decodes to a value whose canonical code
    # holds it exactly (mantissa 0 means 0 us, which encodes as 1 us)
    ok = (codes & 2047) >= 1
    np.testing.assert_array_equal(T.decode_rtt(again[ok]), values[ok])
    assert T.decode_rtt(65535) == 2047 * 2**31 / 1000


def test_rtt_byte1_ranges_tile_the_rtt_axis():
    lo, hi = T.rtt_byte1_ranges_us()
    pinned = {0: (0, 256), 7: (1792, 2048), 8: (0, 0), 11: (0, 0), 12: (2048, 2560),
              15: (3584, 4096), 255: (7 * 256 * 2**31, 8 * 256 * 2**31)}
    assert {b: (lo[b], hi[b]) for b in pinned} == pinned
    assert T.CANONICAL_RTT_BYTE1.sum() == 8 + 31 * 4
    np.testing.assert_array_equal(T.CANONICAL_RTT_BYTE1, hi > lo)
    # In RTT order the canonical ranges are contiguous from 0 us ...
    order = np.argsort(lo[T.CANONICAL_RTT_BYTE1])
    starts, ends = lo[T.CANONICAL_RTT_BYTE1][order], hi[T.CANONICAL_RTT_BYTE1][order]
    assert starts[0] == 0 and np.array_equal(starts[1:], ends[:-1])
    # ... and every canonical code's RTT lies in the range of its first byte.
    codes = np.arange(T.NUM_RTT_CODES)[T.is_canonical_rtt_code(np.arange(T.NUM_RTT_CODES))]
    us = T.decode_rtt(codes) * 1000
    assert np.all((lo[codes >> 8] <= us) & (us < hi[codes >> 8]))


def test_rtt_code_bytes():
    code = T.encode_rtt(3.0)  # 3000 us -> exponent 1, mantissa 1500
    assert int(code) == (1 << 11) | 1500
    assert T.rtt_code_to_bytes(code) == ((1 << 3) | (1500 >> 8), 1500 & 0xFF)
    codes = np.arange(T.NUM_RTT_CODES)
    b1, b2 = T.rtt_code_to_bytes(codes)
    np.testing.assert_array_equal(b1, (codes >> 11) << 3 | (codes & 2047) >> 8)
    np.testing.assert_array_equal(T.bytes_to_rtt_code(b1, b2), codes)


def test_rtt_encode_matches_reference_and_bounds():
    rng = np.random.default_rng(1)
    us_int = np.unique(np.exp(rng.uniform(0, np.log(T.RTT_MAX_US), 20000)).astype(np.int64))
    back = T.decode_rtt(T.encode_rtt(us_int / 1000.0)) * 1000.0
    assert np.max(np.abs(back - us_int) / us_int) <= 1 / 2048
    us_float = np.exp(rng.uniform(np.log(2048), np.log(T.RTT_MAX_US), 20000))
    back = T.decode_rtt(T.encode_rtt(us_float / 1000.0)) * 1000.0
    assert np.max(np.abs(back - us_float) / us_float) <= 1 / 2048
    # below 2048 us: integers exact, fractions to the nearest microsecond
    ints = np.arange(1, 2048)
    np.testing.assert_array_equal(T.encode_rtt(ints / 1000.0), ints)
    fracs = rng.uniform(1, 2047.4, 5000)
    assert np.max(np.abs(T.decode_rtt(T.encode_rtt(fracs / 1000)) * 1000 - fracs)) <= 0.5 + 1e-9
    sample = np.concatenate([us_int[::50] / 1000.0, fracs[:200] / 1000, [0.0, 2.0475, 4.0955]])
    assert [int(c) for c in T.encode_rtt(sample)] == [ref_rtt_code(x) for x in sample]


def test_rtt_carry_smallest_exponent_and_clipping():
    assert int(T.encode_rtt(2.047)) == 2047  # exponent 0, not 1024 * 2**1
    assert int(T.encode_rtt(2.0476)) == (1 << 11) | 1024  # mantissa rounds to 2048: carry
    assert int(T.encode_rtt(4.0955)) == (2 << 11) | 1024  # 2047.75 * 2 -> 1024 * 2**2
    assert int(T.encode_rtt(4.0945)) == (1 << 11) | 2047  # 2047.25 * 2 stays at exponent 1
    assert int(T.encode_rtt(2.049)) == (1 << 11) | 1024  # 1024.5 -> ties to even: 1024
    for sub_us in (0.0, 0.0001, 0.000999):
        assert int(T.encode_rtt(sub_us)) == 1 and T.decode_rtt(1) == 0.001
    assert int(T.encode_rtt(np.nan)) == 1
    assert int(T.encode_rtt(1e12)) == 65535 and int(T.encode_rtt(np.inf)) == 65535
    assert int(T.encode_rtt(2047 * 2**31 / 1000)) == 65535


# ---- field order ----


def test_field_order_hash_golden_and_reference():
    src = np.zeros(16, np.uint8)
    src[:4] = [192, 0, 2, 1]
    dst = np.zeros((2, 16), np.uint8)
    dst[0, :4] = [8, 8, 8, 8]
    dst[1] = np.arange(16)
    t = np.array([1_700_000_000, 1_700_000_060])
    # Golden values: changing the hash changes every tokenized window, so it must be deliberate.
    assert [int(h) for h in T.field_order_hash(src, dst, t)] == [
        12222366033008810058, 8936267281102151677]
    np.testing.assert_array_equal(T.field_order_index(src, dst, t), [1, 7])
    rng = np.random.default_rng(2)
    dsts = rng.integers(0, 256, (300, 16)).astype(np.uint8)
    times = rng.integers(-(2**40), 2**40, 300)
    got = T.field_order_hash(src, dsts, times)
    want = [ref_field_order_hash(bytes(src), bytes(d), int(s)) for d, s in zip(dsts, times)]
    assert [int(h) for h in got] == want
    counts = np.bincount(T.field_order_index(src, dsts, times), minlength=24)
    assert counts.min() > 0  # every one of the 24 orders occurs


def test_same_measurement_same_field_order_in_every_window():
    rec = make_record(np.random.default_rng(3), 4, 30)
    seen = {}
    for wi in range(40):
        w = T.tokenize_window(rec, seed=5, window_index=wi, max_length=1024)
        for m in T.decode_tokens(w.tokens):
            order = tuple(f for f in m.field_order if f != T.FIELD_TIME)
            seen.setdefault(int(m.dst_addr[0]), set()).add(order)
    assert len(seen) == 30 and all(len(orders) == 1 for orders in seen.values())


def _window_digest():
    rec = make_record(np.random.default_rng(4), 6, 20)
    h = hashlib.sha256()
    for wi in range(12):
        w = T.tokenize_window(rec, seed=11, window_index=wi, max_length=512)
        h.update(w.tokens.tobytes() + w.fields.tobytes())
    return h.hexdigest()


def test_tokens_identical_in_another_process():
    code = ("import sys; sys.path.insert(0, 'tests'); import test_tokens; "
            "print(test_tokens._window_digest())")
    for hash_seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
                             cwd=str(__import__("pathlib").Path(__file__).parents[1]))
        assert out.stdout.strip() == _window_digest()


def _addr(raw):
    a = np.zeros(16, np.uint8)
    a[: len(raw)] = raw
    return a


def test_golden_windows():
    """Whole windows pinned: hash, RNG stream, layout and codes must not drift silently."""
    rec = {"src_addr": _addr([192, 0, 2, 1]), "ip_version": np.int8(4),
           "dst_addr": np.stack([_addr([198, 51, 100, 7]), _addr([203, 0, 113, 9]),
                                 _addr([198, 51, 100, 7])]),
           "event_time": np.array([1_700_000_000, 1_700_000_030, 1_700_000_400]),
           "rtt_ms": np.array([12.345, -1, 250.5], np.float32)}
    src, dst1, dst2 = [1, 203, 11, 13, 12], [3, 209, 62, 111, 18], [3, 214, 11, 124, 20]
    abs_time = [5, 11, 11, 11, 11, 112, 94, 252, 11]  # 1_700_000_000 = 0x6553F100
    rtt1, rtt3 = [8, 41, 18], [8, 74, 176]  # codes 7687 (1543 * 2**3 us), 16293 (1957 * 2**7)
    w = T.tokenize_window(rec, seed=1, window_index=1, max_length=64)
    assert w.mode == "full" and w.length == 56
    assert w.tokens.tolist() == (
        [0, *abs_time, *rtt1, *dst1, *src]
        + [0, 10, 6, 30 + 11, *src, *dst2]
        + [0, 7, 11, 11, 12, 114 + 11, *rtt3, *dst1, *src]  # delta 370 s = 0x0172
        + [0] * 8)
    assert w.fields[:14].tolist() == [1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 3]
    w = T.tokenize_window(rec, seed=1, window_index=3, max_length=64)
    assert w.mode == "mixed" and w.length == 54
    assert w.tokens[:54].tolist() == (
        [0, *rtt1, *dst1, *src]
        + [0, 10, *abs_time[:-2], 252, 41, *src, *dst2]  # 1_700_000_030 = 0x6553F11E
        + [0, 7, 11, 11, 12, 125, *rtt3, *dst1, *src])


# ---- windows ----


@pytest.mark.parametrize("ip_version,n", [(4, 53), (6, 23), (4, 5), (6, 1)])
def test_windows_match_reference_and_parse_back(ip_version, n):
    rng = np.random.default_rng(ip_version * 100 + n)
    rec = make_record(rng, ip_version, n, gap_scale=150.0)
    for wi in range(25):
        w = T.tokenize_window(rec, seed=9, window_index=wi, max_length=1024)
        toks, flds, packed = ref_window(rec, 9, wi, 1024)
        assert w.tokens.dtype == np.int32 and w.fields.dtype == np.int8
        assert w.tokens.shape == w.fields.shape == (1024,)
        assert w.tokens[: w.length].tolist() == toks
        assert w.fields[: w.length].tolist() == flds
        assert w.length == len(toks) and w.num_measurements == packed == n
        assert not w.tokens[w.length:].any() and not w.fields[w.length:].any()
        assert w.mode == T.timestamp_mode(9, wi)
        _check_parsed(rec, T.decode_tokens(w.tokens), w.mode)


def _check_parsed(rec, ms, mode):
    a = 4 if int(rec["ip_version"]) == 4 else 16
    times = T.absolute_times(ms)
    idx = [int(m.dst_addr[0]) for m in ms]  # destinations are distinct by byte 0
    assert sorted(idx) == list(range(len(rec["event_time"])))
    for m, i, t in zip(ms, idx, times):
        np.testing.assert_array_equal(m.src_addr, rec["src_addr"])
        np.testing.assert_array_equal(m.dst_addr, rec["dst_addr"][i])
        assert m.src_version == m.dst_version == int(rec["ip_version"]) and a in (4, 16)
        true_rtt = float(rec["rtt_ms"][i])
        if true_rtt < 0:
            assert m.failed and m.rtt_ms is None
        else:
            assert not m.failed
            us, back = max(true_rtt * 1000, 1.0), m.rtt_ms * 1000
            assert abs(back - us) <= max(0.5, us / 2048) + 1e-9
        if t is not None:
            assert t == int(rec["event_time"][i])  # deltas equal the true time differences
    stamped = [i for i, t in zip(idx, times) if t is not None]
    assert stamped == sorted(stamped)  # timestamped ones keep time order
    if mode == "full":
        assert idx == sorted(idx) and len(stamped) == len(ms)
        assert ms[0].time_kind == "abs" and all(m.time_kind != "abs" for m in ms[1:])
    elif mode == "none":
        assert not stamped


@pytest.mark.parametrize("max_length", [1024, 300])
def test_tokenize_windows_equals_tokenize_window_row_by_row(max_length):
    rng = np.random.default_rng(16)
    records = [make_record(rng, int(rng.choice([4, 6])), int(rng.integers(0, 60)),
                           gap_scale=float(rng.choice([5.0, 200.0])))
               for _ in range(40)]
    records[3] = make_record(rng, 4, 0)
    indices = [int(i) for i in rng.integers(0, 2**40, len(records))]
    batch = T.tokenize_windows(records, seed=4, window_indices=indices, max_length=max_length)
    assert batch.tokens.shape == (40, max_length) and batch.fields.shape == (40, max_length)
    for i, (rec, wi) in enumerate(zip(records, indices)):
        w = T.tokenize_window(rec, seed=4, window_index=wi, max_length=max_length)
        assert batch.tokens[i].tobytes() == w.tokens.tobytes(), i
        assert batch.fields[i].tobytes() == w.fields.tobytes(), i
        assert (batch.lengths[i], batch.num_measurements[i], batch.modes[i]) == (
            w.length, w.num_measurements, w.mode)
    assert set(batch.modes) == set(T.TIMESTAMP_MODES)
    if max_length == 300:
        assert (batch.num_measurements < [len(r["event_time"]) for r in records]).any()
    forced = T.tokenize_windows(records[:5], seed=4, window_indices=indices[:5],
                                max_length=max_length, mode="mixed")
    assert forced.modes == ("mixed",) * 5
    w = T.tokenize_window(records[1], seed=4, window_index=indices[1], max_length=max_length,
                          mode="mixed")
    assert forced.tokens[1].tobytes() == w.tokens.tobytes()


def test_mode_frequencies_and_mixed_timestamp_rate():
    modes = [T.timestamp_mode(3, wi) for wi in range(20000)]
    freq = [modes.count(m) / len(modes) for m in T.TIMESTAMP_MODES]
    assert abs(freq[0] - 0.4) < 0.015 and abs(freq[1] - 0.3) < 0.015
    assert abs(freq[2] - 0.3) < 0.015
    mixed = [wi for wi in range(3000) if modes[wi] == "mixed"][:300]
    rates = [T.window_plan(3, wi, 40).timestamped.mean() for wi in mixed]
    assert abs(np.mean(rates) - 0.5) < 0.02
    plans = [T.window_plan(3, wi, 40) for wi in range(300) if modes[wi] == "none"]
    first = np.bincount([p.order[0] for p in plans], minlength=40)
    assert first.max() < 0.15 * len(plans)  # random orders, not a fixed one


def test_same_seed_and_index_give_identical_tokens():
    rec = make_record(np.random.default_rng(7), 4, 40)
    copy = {k: np.array(v, copy=True) for k, v in rec.items()}
    for wi in (0, 1, 2, 99, 2**40):
        a = T.tokenize_window(rec, seed=21, window_index=wi, max_length=1024)
        b = T.tokenize_window(copy, seed=21, window_index=wi, max_length=1024)
        assert a.tokens.tobytes() == b.tokens.tobytes() and a.fields.tobytes() == b.fields.tobytes()
    differ = sum(
        T.tokenize_window(rec, seed=21, window_index=wi, max_length=1024).tokens.tobytes()
        != T.tokenize_window(rec, seed=22, window_index=wi, max_length=1024).tokens.tobytes()
        for wi in range(20))
    assert differ >= 10


def test_packing_never_exceeds_max_length_and_stops_at_first_misfit():
    rec = make_record(np.random.default_rng(8), 4, 120)
    for max_length in (14, 100, 257, 600):
        for wi in range(15):
            w = T.tokenize_window(rec, seed=1, window_index=wi, max_length=max_length)
            toks, _, packed = ref_window(rec, 1, wi, max_length)
            assert w.length <= max_length and w.tokens.shape == (max_length,)
            assert w.num_measurements == packed < 120
            assert w.tokens[: w.length].tolist() == toks
            assert (w.fields[w.length:] == T.FIELD_PAD).all() and not w.tokens[w.length:].any()
            assert len(T.decode_tokens(w.tokens)) == packed


@pytest.mark.parametrize("ip_version", [4, 6])
def test_worst_case_record_never_drops(ip_version):
    max_length = 512
    n = T.max_measurements(ip_version, max_length)
    rec = make_record(np.random.default_rng(9), ip_version, n, failed_frac=0.0)
    rec["event_time"] = 1_700_000_000 + 300 * np.arange(n)  # every delta needs 4 bytes
    modes = set()
    for wi in range(60):
        w = T.tokenize_window(rec, seed=0, window_index=wi, max_length=max_length)
        modes.add(w.mode)
        assert w.num_measurements == n
    assert modes == set(T.TIMESTAMP_MODES)
    w = T.tokenize_window(rec, seed=0, window_index=0, max_length=max_length, mode="full")
    assert w.length == T.worst_case_tokens(ip_version, True) + (n - 1) * T.worst_case_tokens(
        ip_version, False)
    longer = make_record(np.random.default_rng(9), ip_version, n + 1, failed_frac=0.0)
    longer["event_time"] = 1_700_000_000 + 300 * np.arange(n + 1)
    w = T.tokenize_window(longer, seed=0, window_index=0, max_length=max_length, mode="full")
    assert w.num_measurements == n  # the bound is tight


def test_empty_record_and_bad_input():
    rec = make_record(np.random.default_rng(10), 4, 0)
    w = T.tokenize_window(rec, seed=0, window_index=0, max_length=16)
    assert w.length == 0 and w.num_measurements == 0 and not w.tokens.any()
    bad = make_record(np.random.default_rng(10), 4, 3)
    bad["event_time"] = np.array([5, 4, 6]) + 1_700_000_000
    with pytest.raises(ValueError, match="non-decreasing"):
        T.tokenize_window(bad, seed=0, window_index=0, max_length=100, mode="full")
    bad = make_record(np.random.default_rng(10), 4, 3)
    bad["ip_version"] = np.int8(5)
    with pytest.raises(ValueError, match="ip_version"):
        T.tokenize_window(bad, seed=0, window_index=0, max_length=100)
    bad = make_record(np.random.default_rng(10), 4, 3)
    bad["rtt_ms"] = bad["rtt_ms"][:2]
    with pytest.raises(ValueError, match="differ in length"):
        T.tokenize_window(bad, seed=0, window_index=0, max_length=100)
    with pytest.raises(ValueError, match="differ in length"):
        T.tokenize_windows([rec, bad, bad], seed=0, window_indices=[0, 1, 2], max_length=100)


def test_huge_gap_clips_to_delta4_max():
    rec = make_record(np.random.default_rng(11), 4, 2, failed_frac=0.0)
    rec["event_time"] = np.array([0, 2**33])
    w = T.tokenize_window(rec, seed=0, window_index=0, max_length=100, mode="full")
    ms = T.decode_tokens(w.tokens)
    assert ms[1].time_kind == "delta4" and ms[1].time_value == 2**32 - 1


# ---- parsing ----


def test_decode_tokens_grammar_errors():
    rec = make_record(np.random.default_rng(12), 4, 2, failed_frac=0.0)
    w = T.tokenize_window(rec, seed=0, window_index=0, max_length=64, mode="none")
    good = w.tokens[: w.length].tolist()
    assert len(T.decode_tokens(good)) == 2
    assert len(T.decode_tokens(w.tokens, length=14)) == 1

    def error_at(seq):
        with pytest.raises(T.TokenGrammarError) as e:
            T.decode_tokens(seq, length=len(seq))
        return e.value.position

    assert error_at([T.SRC_IPV4] + good[1:]) == 0
    assert error_at(good[:14] + [T.MEASUREMENT_START]) == 14  # a START with no fields
    truncated = [0, T.SRC_IPV4, 11, 12, 13, 14, T.DST_IPV4, 11, 12]
    assert error_at(truncated) == len(truncated)  # ends inside a field
    assert error_at([0, T.SRC_IPV4, 11, 12, 13, 14, T.SRC_IPV4, 11, 12, 13, 14]) == 6
    assert error_at([0, T.SRC_IPV4, 11, 12, 13, 14, T.DST_IPV4, 11, 12, 13, 14]) == 0  # no result
    assert error_at([0, T.SRC_IPV4, 11, 12, 5, 14]) == 4  # not a byte token
    assert error_at([0, T.SRC_IPV4, 11, 12, 13, 267]) == 5  # outside the vocabulary
    assert error_at([0, 300]) == 1


def test_absolute_times_needs_an_absolute_first():
    rec = make_record(np.random.default_rng(13), 4, 3)
    w = T.tokenize_window(rec, seed=0, window_index=0, max_length=200, mode="full")
    ms = T.decode_tokens(w.tokens)
    assert T.absolute_times(ms) == rec["event_time"].tolist()
    with pytest.raises(ValueError, match="delta"):
        T.absolute_times(ms[1:])


# ---- prompts ----


def test_prompt_ends_before_result_and_parses_when_completed():
    rng = np.random.default_rng(14)
    rec = make_record(rng, 4, 60, failed_frac=0.0)
    q_src, q_dst = rec["src_addr"], np.array([1, 2, 3, 4] + [0] * 12, np.uint8)
    t_query = int(rec["event_time"][-1]) + 1000
    for wi in range(12):
        p = T.tokenize_prompt(rec, seed=2, window_index=wi, max_length=512, query_src=q_src,
                              query_dst=q_dst, ip_version=4, query_time=t_query)
        assert p.dtype == np.int32 and len(p) + 3 <= 512
        completed = np.concatenate([p, [T.RTT_START, 11 + 0x50, 11 + 0x10]])
        ms = T.decode_tokens(completed)
        q = ms[-1]
        assert q.field_order[:3] == (T.FIELD_SRC, T.FIELD_DST, T.FIELD_TIME)
        np.testing.assert_array_equal(q.dst_addr, q_dst)
        assert T.absolute_times(ms)[-1] == t_query
        # the context is the window's own packing in the room the query and its result leave
        w = T.tokenize_window(rec, seed=2, window_index=wi, max_length=512 - 11 - 9 - 3)
        context_len = w.length
        assert p[:context_len].tolist() == w.tokens[:context_len].tolist()
        assert len(ms) - 1 == w.num_measurements < 60
        assert len(p) - context_len == 11 + (2 if q.time_kind == "delta1" else
                                             5 if q.time_kind == "delta4" else 9)
    p = T.tokenize_prompt(rec, seed=2, window_index=0, max_length=512, query_src=q_src,
                          query_dst=q_dst, ip_version=4)
    assert p[-11:].tolist() == [0, 1, *(rec["src_addr"][:4] + 11), 3, 12, 13, 14, 15]
    w = T.tokenize_window(rec, seed=2, window_index=0, max_length=512 - 11 - 3)
    assert p[:-11].tolist() == w.tokens[: w.length].tolist()


def test_prompt_timestamp_kinds():
    rec = make_record(np.random.default_rng(15), 4, 5, failed_frac=0.0)
    last = int(rec["event_time"][-1])
    kw = {"seed": 0, "window_index": 0, "max_length": 512, "query_src": rec["src_addr"],
          "query_dst": rec["dst_addr"][0], "ip_version": 4}
    p = T.tokenize_prompt(rec, query_time=last + 7, mode="full", **kw)
    assert p[-2:].tolist() == [T.TIMESTAMP_DELTA1, 7 + 11]
    p = T.tokenize_prompt(rec, query_time=last + 256, mode="full", **kw)
    assert p[-5:].tolist() == [T.TIMESTAMP_DELTA4, 11, 11, 12, 11]
    p = T.tokenize_prompt(rec, query_time=1_800_000_000, mode="none", **kw)
    abs_bytes = (1_800_000_000).to_bytes(8, "big")
    assert p[-9:].tolist() == [T.TIMESTAMP_ABS] + [b + 11 for b in abs_bytes]
    with pytest.raises(ValueError, match="before"):
        T.tokenize_prompt(rec, query_time=last - 1, mode="full", **kw)
