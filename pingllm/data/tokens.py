"""The measurement token scheme v1 (docs/tokenization.md): RTT codes, windows, prompts, parsing.

Windows. `tokenize_window` packs one record (docs/CONTRACTS.md); `tokenize_windows` does the
same for many records in one vectorised pass (row i is identical to tokenize_window of record i)
and is several times faster per token, because numpy's per-call overhead, not arithmetic, bounds
a single ~850-token window.

Randomness. Every random choice of a window (timestamp mode, order, which measurements carry a
timestamp) comes from a counter-based splitmix64 stream keyed by (seed, window_index) alone,
implemented here in numpy uint64 arithmetic. We do not use `np.random.Generator`: building one
costs ~30 us per window (a fifth of tokenize_window's time) and NumPy does not promise that
Generator streams stay the same across NumPy versions, while this stream is fixed by this code.

Field order. Each measurement's field order is one of the 24 orders of (src, dst, result, time)
(`FIELD_ORDERS`, lexicographic), picked by `field_order_hash` of (source bytes, destination
bytes, Unix seconds). A measurement without a timestamp uses the same order with the time field
left out, so its fields keep their relative order whatever mode the window draws.

RTT rounding. Ties round to even. Integer microseconds below 2048 us are exact; a fractional
value there is within 0.5 us, and from 2048 us up the relative error is <= 1/2048.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from pingllm.data import splitmix

# ---- vocabulary (docs/tokenization.md) ----
MEASUREMENT_START = 0
SRC_IPV4 = 1
SRC_IPV6 = 2
DST_IPV4 = 3
DST_IPV6 = 4
TIMESTAMP_ABS = 5
TIMESTAMP_DELTA1 = 6
TIMESTAMP_DELTA4 = 7
RTT_START = 8
THROUGHPUT_START = 9
FAILED = 10
BYTE_OFFSET = 11
VOCAB_SIZE = 267
PAD = MEASUREMENT_START  # padding reuses id 0; it carries field class FIELD_PAD

# ---- field classes (docs/CONTRACTS.md) ----
FIELD_PAD = 0
FIELD_START = 1
FIELD_SRC = 2
FIELD_DST = 3
FIELD_RESULT = 4
FIELD_TIME = 5

# ---- timestamp modes of a window ----
TIMESTAMP_MODES = ("full", "none", "mixed")
TIMESTAMP_MODE_PROBS = (0.4, 0.3, 0.3)

# ---- RTT code ----
RTT_EXPONENT_BITS = 5
RTT_MANTISSA_BITS = 11
RTT_MIN_US = 1
RTT_MAX_US = 2047 * 2**31
RTT_MAX_REL_ERROR = 1 / 2048
NUM_RTT_CODES = 1 << 16

MAX_DELTA = 2**32 - 1
DELTA1_MAX = 255

# Field slots of a measurement, in the canonical order the permutations index.
SLOT_SRC, SLOT_DST, SLOT_RESULT, SLOT_TIME = 0, 1, 2, 3
FIELD_ORDERS = tuple(itertools.permutations(range(4)))
_SLOT_FIELD = (FIELD_SRC, FIELD_DST, FIELD_RESULT, FIELD_TIME)

# Time kinds of one measurement (internal codes; Measurement uses the names).
_TIME_NONE, _TIME_ABS, _TIME_DELTA1, _TIME_DELTA4 = 0, 1, 2, 3
TIME_KIND_NAMES = (None, "abs", "delta1", "delta4")
_TIME_TOKENS = (0, 9, 2, 5)
_RESULT_TOKENS = (3, 1)  # rtt, failed


class TokenGrammarError(ValueError):
    """A token sequence that the measurement grammar does not accept."""

    def __init__(self, message: str, position: int):
        super().__init__(f"{message} (at token {position})")
        self.position = position


# ---- token counts ----


def _address_tokens(ip_version):
    return np.where(np.asarray(ip_version) == 6, 17, 5)


def _as_int(x):
    x = np.asarray(x)
    return int(x) if x.ndim == 0 else x


def measurement_tokens(ip_version, time_kind=None, failed=False):
    """Tokens of one measurement; time_kind is None, 'abs', 'delta1' or 'delta4' (vectorised)."""
    time = _TIME_TOKENS[TIME_KIND_NAMES.index(time_kind)]
    result = np.where(np.asarray(failed), _RESULT_TOKENS[1], _RESULT_TOKENS[0])
    return _as_int(1 + 2 * _address_tokens(ip_version) + result + time)


def worst_case_tokens(ip_version, first):
    """Most tokens one measurement can take: absolute timestamp if first, else a 4-byte delta."""
    time = np.where(np.asarray(first), _TIME_TOKENS[_TIME_ABS], _TIME_TOKENS[_TIME_DELTA4])
    return _as_int(1 + 2 * _address_tokens(ip_version) + _RESULT_TOKENS[0] + time)


def max_measurements(ip_version: int, max_length: int) -> int:
    """How many measurements always fit in max_length whatever mode a window draws."""
    first, rest = worst_case_tokens(ip_version, True), worst_case_tokens(ip_version, False)
    return 0 if max_length < first else 1 + (max_length - first) // rest


# ---- RTT codes ----


def encode_rtt(rtt_ms) -> np.ndarray:
    """RTT codes (uint16) of RTTs in ms; < 1 us (and NaN) -> 1 us, clipped at RTT_MAX_US.

    Rounds to nearest (ties to even) with the smallest exponent that fits, carrying into the
    exponent when the mantissa rounds up to 2048. Failed probes (rtt < 0) are not RTTs: the
    tokenizer emits FAILED for them, whatever code this returns.
    """
    return _rtt_codes(rtt_ms).astype(np.uint16)


def _rtt_codes(rtt_ms) -> np.ndarray:
    """encode_rtt as int64."""
    us = np.asarray(rtt_ms, np.float64) * 1000.0
    us = np.fmax(us, 1.0)  # fmax also maps NaN to 1 us, so no cast warnings below
    us = np.minimum(us, float(RTT_MAX_US))
    # -exponent: 10 - floor(log2 us) from the float's exponent bits, at most 0
    neg_e = np.minimum(_I1033 - (us.view(np.int64) >> _I52), _I0)
    m = np.rint(np.ldexp(us, neg_e)).astype(np.int64)
    # a mantissa that rounded up to 2048 carries: exponent + 1, mantissa 1024
    return m + ((m >> _I11) << _I10) - (neg_e << _I11)


def decode_rtt(codes) -> np.ndarray:
    """RTTs in ms (float64) of RTT codes."""
    return decode_rtt_us(codes) / 1000.0


def decode_rtt_us(codes, xp=np, dtype=np.float64):
    """RTTs in microseconds of RTT codes; `xp=jax.numpy` decodes traced codes in a step."""
    codes = xp.asarray(codes).astype(xp.int32 if xp is not np else np.int64)
    mantissa = codes & ((1 << RTT_MANTISSA_BITS) - 1)
    return xp.ldexp(mantissa.astype(dtype), codes >> RTT_MANTISSA_BITS)


def rtt_code_to_bytes(codes):
    """(byte1, byte2) of RTT codes: the values of the two byte tokens after RTT_START."""
    codes = np.asarray(codes).astype(np.int64)
    return _as_int(codes >> 8), _as_int(codes & 0xFF)


def bytes_to_rtt_code(byte1, byte2):
    """RTT code of the two byte values after RTT_START (vectorised)."""
    return _as_int((np.asarray(byte1).astype(np.int64) << 8) | np.asarray(byte2).astype(np.int64))


def is_canonical_rtt_code(codes) -> np.ndarray:
    """Codes that encode_rtt can produce (others decode to a value some canonical code holds)."""
    codes = np.asarray(codes).astype(np.int64)
    e, m = codes >> RTT_MANTISSA_BITS, codes & 2047
    return np.where(e == 0, m >= 1, m >= 1024)


# First RTT bytes (exponent, top 3 mantissa bits) that some canonical code starts with.
CANONICAL_RTT_BYTE1 = is_canonical_rtt_code(np.arange(256) << 8 | 255)


def rtt_byte1_ranges_us() -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) in us (float64[256]) of the RTTs whose codes start with each first RTT byte
    (codes b1 << 8 .. b1 << 8 | 255); (0, 0) for bytes no canonical code starts with."""
    first = np.arange(256) << 8
    lo = decode_rtt_us(first)
    hi = decode_rtt_us(first | 255) + np.ldexp(1.0, first >> RTT_MANTISSA_BITS)
    return np.where(CANONICAL_RTT_BYTE1, lo, 0.0), np.where(CANONICAL_RTT_BYTE1, hi, 0.0)


# ---- stable hashing and the window's random stream ----

_M64, _GOLDEN, _MIX1, _MIX2 = splitmix.M64, splitmix.GOLDEN, splitmix.MIX1, splitmix.MIX2
_mix64, _mix64_inplace = splitmix.mix64_int, splitmix.mix64_inplace
_U = np.uint64
_GOLDEN_U, _MIX1_U, _MIX2_U = _U(_GOLDEN), _U(_MIX1), _U(_MIX2)
_S27, _S30, _S31, _S32 = _U(27), _U(30), _U(31), _U(32)
_K1, _K2 = _U(0x9FB21C651E98DF25), _U(0xC2B2AE3D27D4EB4F)
_S40 = _U(40)
_I0, _I10, _I11, _I52, _I1033 = (np.int64(v) for v in (0, 10, 11, 52, 1033))
_I24, _I96 = np.int64(24), np.int64(96)
_MAX_DELTA_I, _DELTA1_MAX_I = np.int64(MAX_DELTA), np.int64(DELTA1_MAX)
_MAX_DELTA_U = np.uint64(MAX_DELTA)
_TIME_DELTA1_I = np.int64(_TIME_DELTA1)
_STREAM_MODE, _STREAM_ORDER = 1, 2


def _src_hash(src_Rx16: np.ndarray) -> np.ndarray:
    """h0 of each source: splitmix64 over its little-endian words lo, hi (uint64[R])."""
    if len(src_Rx16) == 1:  # Python ints: a few times cheaper than numpy on one value
        raw = np.asarray(src_Rx16, np.uint8).tobytes()
        lo, hi = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
        return np.array([_mix64((_mix64((lo + _GOLDEN) & _M64) ^ hi) & _M64)], np.uint64)
    w = np.ascontiguousarray(src_Rx16, np.uint8).reshape(-1, 16).view("<u8")
    h = w[:, 0] + _GOLDEN_U
    _mix64_inplace(h)
    h ^= w[:, 1]
    return _mix64_inplace(h)


def _field_hash(h0, dst_Nx16: np.ndarray, t_N: np.ndarray) -> np.ndarray:
    d = np.ascontiguousarray(dst_Nx16, np.uint8).reshape(-1, 16).view("<u8")
    x = d[:, 0] ^ h0
    x *= _K1
    x ^= d[:, 1]
    x *= _K2
    x ^= np.asarray(t_N, np.int64).view(np.uint64)
    x ^= x >> _S32
    x *= _MIX1_U
    return x


def field_order_hash(src_addr, dst_addr, event_time) -> np.ndarray:
    """Stable uint64 hash of (source bytes, destination bytes, Unix seconds) per measurement.

    src_addr uint8[16]; dst_addr uint8[N, 16]; event_time int64[N]. Addresses are read as two
    little-endian 64-bit words (bytes 0..7, 8..15), time as its two's complement. The source
    words go through splitmix64 into h0 = mix(mix(src_lo + G) ^ src_hi), then per measurement
    y = ((dst_lo ^ h0) * K1 ^ dst_hi) * K2 ^ time and x = (y ^ y >> 32) * M1 (mod 2**64);
    the order uses x's top bits, which the last multiply mixes from every input bit.
    """
    return _field_hash(_src_hash(np.asarray(src_addr).reshape(1, 16))[0], dst_addr, event_time)


def field_order_index(src_addr, dst_addr, event_time) -> np.ndarray:
    """Index (int64) into FIELD_ORDERS of each measurement's field order: top 24 bits mod 24."""
    return (field_order_hash(src_addr, dst_addr, event_time) >> _S40).view(np.int64) % 24


def _u64(values) -> np.ndarray:
    """Integers as uint64 (two's complement for negatives)."""
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        v = np.array([int(x) & _M64 for x in v.ravel()], np.uint64).reshape(v.shape)
    return v.astype(np.uint64)


def stream_keys(seed: int, window_indices, stream: int) -> np.ndarray:
    """Key of a window's random stream: mix(mix(mix(seed + G) ^ window_index) + stream * G)."""
    seed_key = _mix64((int(seed) + _GOLDEN) & _M64)
    if len(window_indices) == 1:  # Python ints: a few times cheaper than numpy on one value
        k = _mix64(seed_key ^ (int(window_indices[0]) & _M64))
        return np.array([_mix64((k + stream * _GOLDEN) & _M64)], np.uint64)
    z = _u64(window_indices) ^ _U(seed_key)
    _mix64_inplace(z)
    z += _U((stream * _GOLDEN) & _M64)
    return _mix64_inplace(z)


def _mode_indices(seed: int, window_indices) -> np.ndarray:
    """Timestamp mode index (0 full, 1 none, 2 mixed) of each window (int64)."""
    keys = stream_keys(seed, window_indices, _STREAM_MODE)
    p_full, p_none, _ = TIMESTAMP_MODE_PROBS
    if len(keys) == 1:
        u = (int(keys[0]) >> 11) * 2.0**-53
        return np.array([(u >= p_full) + (u >= p_full + p_none)], np.int64)
    u = (keys >> _U(11)).astype(np.float64)
    u *= 2.0**-53
    return (u >= p_full).astype(np.int64) + (u >= p_full + p_none)


def timestamp_mode(seed: int, window_index: int) -> str:
    """The timestamp mode ('full', 'none' or 'mixed') window `window_index` draws."""
    return TIMESTAMP_MODES[int(_mode_indices(seed, [window_index])[0])]


_ARANGE_U64 = np.arange(1, 1 << 14, dtype=np.uint64)


def _arange_u64(n: int) -> np.ndarray:
    """uint64 1..n."""
    global _ARANGE_U64
    if n > len(_ARANGE_U64):
        _ARANGE_U64 = np.arange(1, 2 * n + 1, dtype=np.uint64)
    return _ARANGE_U64[:n]


_LOW63, _TOP_BIT = _U((1 << 63) - 1), _U(1 << 63)
_S16, _S47 = _U(16), _U(47)


def _plan(seed, window_indices, modes, n, starts, win):
    """Sequence order and timestamped flags of R windows of n[r] measurements, flattened.

    Returns (order int[M] or None for time order, timestamped bool[M] by position or None for
    all). Measurement j (1-based) of window w draws r = splitmix64 output j of the window's
    order stream; its top bit says whether it is timestamped (mixed windows), bits 16..62 place
    it (stable sort). The slots timestamped ones land on are then refilled with them in
    time order, so full windows keep time order.
    """
    m = len(win) if win is not None else int(n[0])
    if win is None and modes[0] == 0:
        return None, None
    keys = stream_keys(seed, window_indices, _STREAM_ORDER)
    if win is None:
        r = _arange_u64(m) * _GOLDEN_U
        r += keys[0]
    else:
        # Per-window values spread over its measurements: np.repeat beats indexing by win.
        r = _arange_u64(m) - np.repeat(starts.astype(np.uint64), n)
        r *= _GOLDEN_U
        r += np.repeat(keys, n)
    _mix64_inplace(r)
    place = r & _LOW63
    place >>= _S16  # 47 bits: room for the window number above them in one stable sort
    if win is not None:
        if len(n) > 1 << 17:
            raise ValueError("at most 131072 windows per call")
        place |= win.astype(np.uint64) << _S47
    order = np.argsort(place, kind="stable")
    if win is None:
        if modes[0] == 1:
            return order, np.zeros(m, bool)
        timestamped = r >= _TOP_BIT
    else:
        mode_m = np.repeat(modes, n)
        timestamped = (mode_m == 0) | ((mode_m == 2) & (r >= _TOP_BIT))
    ts_pos = timestamped[order]
    order[ts_pos] = np.flatnonzero(timestamped)
    return order, ts_pos


@dataclasses.dataclass(frozen=True, eq=False)
class WindowPlan:
    """The random choices of one window: mode, sequence order, timestamped flags per position."""

    mode: str
    order: np.ndarray  # int[N]: position -> record index
    timestamped: np.ndarray  # bool[N], by position


def window_plan(seed: int, window_index: int, num_measurements: int, mode=None) -> WindowPlan:
    """The plan tokenize_window follows for a record of num_measurements (before packing)."""
    modes = _modes(seed, [window_index], mode)
    n = num_measurements
    order, ts = _plan(seed, [window_index], modes, np.array([n]), None, None)
    order = np.arange(n) if order is None else order
    ts = np.full(n, True) if ts is None else ts
    return WindowPlan(TIMESTAMP_MODES[int(modes[0])], order, ts)


def _modes(seed, window_indices, mode) -> np.ndarray:
    if mode is None:
        return _mode_indices(seed, window_indices)
    return np.full(len(window_indices), TIMESTAMP_MODES.index(mode), np.int64)


# ---- layout tables: one measurement as a fixed-width row, then per-order column gathers ----


@dataclasses.dataclass(frozen=True, eq=False)
class _Layout:
    """Canonical row [START | src | dst | result | time] of one ip version and its gather tables.

    A row holds raw values: bytes, or a selector in the result type column (0 RTT_START,
    2 FAILED) and the time type column (kind 1..3 -> ABS, DELTA1, DELTA4); the START and
    address type columns hold 0. Adding `offset` makes token ids with the column's field class
    in bits 16..23, so one gather yields both. For key = (failed * 4 + time kind) * 24 + order,
    row `cols[key]` lists the canonical columns of the measurement's tokens in output order,
    the first `length[key]` of them valid (flagged by `mask`).
    """

    width: int
    addr: int
    dst0: int
    res0: int
    time0: int
    offset: np.ndarray  # int32[width]
    cols: np.ndarray  # int32[192, width]
    mask: np.ndarray  # bool[192, width]
    length: np.ndarray  # int32[192]


def _build_layout(ip_version: int) -> _Layout:
    a = 4 if ip_version == 4 else 16
    src_type, dst_type = (SRC_IPV4, DST_IPV4) if ip_version == 4 else (SRC_IPV6, DST_IPV6)
    src0, dst0 = 1, 2 + a
    res0 = dst0 + 1 + a
    time0 = res0 + 3
    width = time0 + 9
    slot_cols = (
        list(range(src0, src0 + 1 + a)),
        list(range(dst0, dst0 + 1 + a)),
        list(range(res0, res0 + 3)),
        list(range(time0, time0 + 9)),
    )
    offset = np.full(width, BYTE_OFFSET, np.int32)
    offset[[0, src0, dst0, res0, time0]] = [
        MEASUREMENT_START, src_type, dst_type, RTT_START, TIMESTAMP_ABS - 1]
    field_of_col = np.full(width, FIELD_START, np.int32)
    for slot, cols in enumerate(slot_cols):
        field_of_col[cols] = _SLOT_FIELD[slot]
    offset |= field_of_col << 16
    time_valid = {
        _TIME_NONE: [0] * 9,
        _TIME_ABS: [1] * 9,
        _TIME_DELTA1: [1] + [0] * 7 + [1],
        _TIME_DELTA4: [1] + [0] * 4 + [1] * 4,
    }
    n_keys = 2 * 4 * 24
    cols_t = np.zeros((n_keys, width), np.int32)
    mask_t = np.zeros((n_keys, width), bool)
    length_t = np.zeros(n_keys, np.int32)
    for failed in (0, 1):
        for kind in range(4):
            valid = np.ones(width, bool)
            valid[res0:res0 + 3] = [1, 0, 0] if failed else [1, 1, 1]
            valid[time0:] = time_valid[kind]
            for p, order in enumerate(FIELD_ORDERS):
                perm = [0] + [c for slot in order for c in slot_cols[slot]]
                sel = [c for c in perm if valid[c]]
                key = (failed * 4 + kind) * 24 + p
                cols_t[key, : len(sel)] = sel
                mask_t[key, : len(sel)] = True
                length_t[key] = len(sel)
    return _Layout(width, a, dst0, res0, time0, offset, cols_t, mask_t, length_t)


_LAYOUTS = {4: _build_layout(4), 6: _build_layout(6)}


def _layout(ip_version) -> _Layout:
    try:
        return _LAYOUTS[int(ip_version)]
    except KeyError:
        raise ValueError(f"ip_version must be 4 or 6, got {ip_version}") from None


# ---- windows ----


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedWindow:
    """One training sequence: tokens and field classes padded to max_length."""

    tokens: np.ndarray  # int32[max_length], 0 past length
    fields: np.ndarray  # int8[max_length], FIELD_PAD past length
    length: int
    num_measurements: int
    mode: str


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedBatch:
    """tokenize_windows' result: one row per record."""

    tokens: np.ndarray  # int32[B, max_length]
    fields: np.ndarray  # int8[B, max_length]
    lengths: np.ndarray  # int64[B]
    num_measurements: np.ndarray  # int64[B]
    modes: tuple[str, ...]


def _time_fields(t, ts_pos, win):
    """(time kind int64[M], value int64[M] or None) for times in sequence order.

    ts_pos None means every position is timestamped; win None means one window.
    """
    m = len(t)
    idx = None if ts_pos is None else np.flatnonzero(ts_pos)
    if idx is not None and len(idx) == 0:
        return np.zeros(m, np.int64), None
    if idx is not None and len(idx) == m:
        idx = None
    tt = t if idx is None else t[idx]
    d = tt[1:] - tt[:-1]
    if win is not None:
        wt = win if idx is None else win[idx]
        first = np.empty(len(tt), bool)
        first[0] = True
        first[1:] = wt[1:] != wt[:-1]
        d[first[1:]] = 0  # a window's first timestamp is absolute, not a delta
    if (d.view(np.uint64) > _MAX_DELTA_U).any():  # negative, or too long for DELTA4
        if (d < 0).any():
            raise ValueError("event_time must be non-decreasing within a record")
        d = np.minimum(d, _MAX_DELTA_I)
    val = np.empty(len(tt), np.int64)
    val[1:] = d
    kind = (val > _DELTA1_MAX_I).view(np.int8) + _TIME_DELTA1_I  # int64
    if win is None:
        val[0] = tt[0]
        kind[0] = _TIME_ABS
    else:
        val[first] = tt[first]
        kind[first] = _TIME_ABS
    if idx is None:
        return kind, val
    kind_all = np.zeros(m, np.int64)
    kind_all[idx] = kind
    val_all = np.zeros(m, np.int64)
    val_all[idx] = val
    return kind_all, val_all


@dataclasses.dataclass(frozen=True, eq=False)
class _Encoded:
    """Windows of one ip version, flattened: tokens of window r are a contiguous run."""

    packed_tokens: np.ndarray  # int32[T]: token id | field class << 16
    lengths: np.ndarray  # int64[R] tokens per window
    packed: np.ndarray  # int64[R] measurements packed per window
    time: np.ndarray  # int64[M'] packed measurements' seconds, in sequence order
    kind: np.ndarray  # int64[M'] their time kinds


def _encode(records, seed, window_indices, modes, budget) -> _Encoded:
    """Tokenize R non-empty records that share an ip version, vectorised over all of them."""
    lay = _layout(records[0]["ip_version"])
    single = len(records) == 1
    if single:
        rec = records[0]
        src = np.asarray(rec["src_addr"], np.uint8).reshape(1, 16)
        dst = np.asarray(rec["dst_addr"], np.uint8)
        t = np.asarray(rec["event_time"], np.int64)
        rtt = np.asarray(rec["rtt_ms"])
        n = np.array([len(t)])
        starts = win = None
        if not len(dst) == len(rtt) == n[0]:
            raise ValueError("a record's dst_addr, event_time and rtt_ms differ in length")
    else:
        times = [rec["event_time"] for rec in records]
        dsts = [rec["dst_addr"] for rec in records]
        rtts = [rec["rtt_ms"] for rec in records]
        n_list = [len(x) for x in times]
        if [len(x) for x in dsts] != n_list or [len(x) for x in rtts] != n_list:
            raise ValueError("a record's dst_addr, event_time and rtt_ms differ in length")
        src = np.stack([rec["src_addr"] for rec in records]).astype(np.uint8, copy=False)
        dst = np.concatenate(dsts).astype(np.uint8, copy=False)
        t = np.concatenate(times).astype(np.int64, copy=False)
        rtt = np.concatenate(rtts)
        n = np.array(n_list)
        starts = np.cumsum(n) - n
        win = np.repeat(np.arange(len(records)), n)
    if dst.shape[1:] != (16,) or src.shape != (len(records), 16):
        raise ValueError(f"addresses must be uint8[16] per measurement, got src {src.shape[1:]},"
                         f" dst {dst.shape[1:]}")

    order, ts_pos = _plan(seed, window_indices, modes, n, starts, win)
    if order is not None:
        dst, t, rtt = dst[order], t[order], rtt[order]
    kind, tval = _time_fields(t, ts_pos, win)
    failed = ~(rtt >= 0)  # NaN counts as failed too
    h0 = _src_hash(src)
    key = failed * _I96
    key += kind * _I24
    key += (_field_hash(h0[0] if single else np.repeat(h0, n), dst, t) >> _S40).view(np.int64) % 24
    lens = lay.length[key]
    cum = np.cumsum(lens)
    if single:
        lengths = cum[-1:]
        over = lengths[0] > budget
        cum_in = cum
    else:
        base = cum[starts] - lens[starts]
        lengths = cum[starts + n - 1] - base
        over = (lengths > budget).any()
    packed = n
    if over:  # only when a record is longer than its worst case allows
        if not single:
            cum_in = cum - base[win]
        keep = np.flatnonzero(cum_in <= budget)  # a prefix of each window
        dst, t, rtt, kind, failed, key, lens = (
            x[keep] for x in (dst, t, rtt, kind, failed, key, lens))
        tval = None if tval is None else tval[keep]
        if single:
            packed = np.array([len(keep)])
            lengths = np.array([lens.sum()])
        else:
            win = win[keep]
            packed = np.bincount(win, minlength=len(records))
            lengths = np.bincount(win, weights=lens, minlength=len(records)).astype(np.int64)
    m = len(key)

    # One row per measurement in the canonical layout, raw values; + offset makes ids|fields.
    a, w = lay.addr, lay.width
    rows = np.empty((m, w), np.int32)
    rows[:, :2] = 0
    # A window's rows are a contiguous run of `packed` rows: a repeat, ~7x cheaper than src[win].
    rows[:, 2:2 + a] = (src[0, :a] if single
                        else np.repeat(src[:, :a].astype(np.int32), packed, axis=0))
    rows[:, lay.dst0] = 0
    rows[:, lay.dst0 + 1:lay.dst0 + 1 + a] = dst[:, :a]
    rows[:, lay.res0] = failed
    rows[:, lay.res0] <<= 1
    rows[:, lay.res0 + 1:lay.res0 + 3] = _rtt_codes(rtt).astype(">u2").view(np.uint8).reshape(m, 2)
    if tval is not None:
        rows[:, lay.time0] = kind
        rows[:, lay.time0 + 1:] = tval.astype(">i8").view(np.uint8).reshape(m, 8)
    rows += lay.offset
    # Then gather each row's columns in its field order, keeping the valid ones.
    idx = lay.cols[key]
    idx += _row_starts(m, w)[:, None]
    flat = idx[lay.mask[key]]
    return _Encoded(rows.ravel()[flat], lengths, packed, t, kind)


_ROW_STARTS = np.arange(1 << 14, dtype=np.int32)


def _row_starts(m: int, width: int) -> np.ndarray:
    """int32 0, width, 2 * width, ... (m of them)."""
    global _ROW_STARTS
    if m > len(_ROW_STARTS):
        _ROW_STARTS = np.arange(2 * m, dtype=np.int32)
    return _ROW_STARTS[:m] * np.int32(width)


def _check_window_args(max_length: int):
    if max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")


def tokenize_window(record, *, seed: int, window_index: int, max_length: int,
                    mode: str | None = None) -> TokenizedWindow:
    """Pack a record's measurements whole into max_length tokens under the window's random plan.

    `mode` forces a timestamp mode instead of drawing one (order and flags still come from
    (seed, window_index)).
    """
    _check_window_args(max_length)
    modes = _modes(seed, [window_index], mode)
    tokens = np.zeros(max_length, np.int32)
    fields = np.zeros(max_length, np.int8)
    length = n = 0
    if len(record["event_time"]):
        enc = _encode([record], seed, [window_index], modes, max_length)
        length, n = len(enc.packed_tokens), int(enc.packed[0])
        np.bitwise_and(enc.packed_tokens, 0xFFFF, out=tokens[:length])
        fields[:length] = enc.packed_tokens >> 16
    else:
        _layout(record["ip_version"])
    return TokenizedWindow(tokens, fields, length, n, TIMESTAMP_MODES[int(modes[0])])


def tokenize_windows(records, *, seed: int, window_indices, max_length: int,
                     mode: str | None = None) -> TokenizedBatch:
    """tokenize_window of each record with its window index, vectorised across the records.

    Row i equals tokenize_window(records[i], seed=seed, window_index=window_indices[i], ...);
    the per-call overhead is paid once per batch instead of once per window.
    """
    _check_window_args(max_length)
    b = len(records)
    if len(window_indices) != b:
        raise ValueError(f"{b} records but {len(window_indices)} window indices")
    modes = _modes(seed, window_indices, mode)
    packed_rows = np.zeros((b, max_length), np.int32)  # token id | field class << 16
    lengths = np.zeros(b, np.int64)
    packed = np.zeros(b, np.int64)
    versions = [int(rec["ip_version"]) for rec in records]
    for v in set(versions):
        _layout(v)
    for version in (4, 6):
        rows = [i for i in range(b) if versions[i] == version and len(records[i]["event_time"])]
        if not rows:
            continue
        enc = _encode([records[i] for i in rows], seed, np.asarray(window_indices)[rows],
                      modes[rows], max_length)
        lengths[rows], packed[rows] = enc.lengths, enc.packed
        flat = enc.packed_tokens
        start = 0
        for row, length in zip(rows, enc.lengths.tolist()):  # cheaper than a flat scatter
            packed_rows[row, :length] = flat[start:start + length]
            start += length
    tokens = packed_rows & 0xFFFF
    fields = (packed_rows >> 16).astype(np.int8)
    return TokenizedBatch(tokens, fields, lengths, packed,
                          tuple(TIMESTAMP_MODES[int(i)] for i in modes))


def _address_block(type_token: int, addr, ip_version: int) -> list[int]:
    a = 4 if ip_version == 4 else 16
    return [type_token] + [int(b) + BYTE_OFFSET for b in np.asarray(addr, np.uint8)[:a]]


def _time_block(kind: int, value: int) -> list[int]:
    nbytes = {_TIME_ABS: 8, _TIME_DELTA1: 1, _TIME_DELTA4: 4}[kind]
    raw = (value & ((1 << (8 * nbytes)) - 1)).to_bytes(nbytes, "big")
    return [TIMESTAMP_ABS - 1 + kind] + [b + BYTE_OFFSET for b in raw]


def tokenize_prompt(record, *, seed: int, window_index: int, max_length: int, query_src,
                    query_dst, ip_version: int, query_time: int | None = None,
                    mode: str | None = None) -> np.ndarray:
    """Context window then MEASUREMENT_START, src, dst, [timestamp]: int32, ends before result.

    The context packs whole measurements leaving room for the query and its whole result (3
    tokens), so the completed measurement still fits max_length. The query's timestamp is a delta
    from the context's last timestamped measurement, or absolute when the context has none;
    a query_time before that measurement raises ValueError (deltas are never negative).
    Addresses are uint8[16] (IPv4 in bytes 0..3).
    """
    a_tokens = int(_address_tokens(ip_version))
    query_len = 1 + 2 * a_tokens + (_TIME_TOKENS[_TIME_ABS] if query_time is not None else 0)
    budget = max_length - query_len - _RESULT_TOKENS[0]
    if budget < 0:
        raise ValueError(f"max_length {max_length} cannot hold the query")
    _layout(ip_version)
    tok, last_time = np.zeros(0, np.int32), None
    if len(record["event_time"]):
        enc = _encode([record], seed, [window_index], _modes(seed, [window_index], mode), budget)
        tok = enc.packed_tokens & 0xFFFF
        stamped = np.flatnonzero(enc.kind)
        last_time = int(enc.time[stamped[-1]]) if len(stamped) else None
    query = [MEASUREMENT_START]
    query += _address_block(SRC_IPV4 if ip_version == 4 else SRC_IPV6, query_src, ip_version)
    query += _address_block(DST_IPV4 if ip_version == 4 else DST_IPV6, query_dst, ip_version)
    if query_time is not None:
        if last_time is None:
            query += _time_block(_TIME_ABS, int(query_time))
        else:
            delta = int(query_time) - last_time
            if delta < 0:
                raise ValueError(f"query_time {query_time} is before the context's last "
                                 f"timestamp {last_time}")
            delta = min(delta, MAX_DELTA)
            query += _time_block(_TIME_DELTA1 if delta <= DELTA1_MAX else _TIME_DELTA4, delta)
    return np.concatenate([tok, np.asarray(query, np.int32)])


# ---- parsing back ----


@dataclasses.dataclass(eq=False)
class Measurement:
    """One measurement parsed from tokens. Addresses are uint8[16] (IPv4 in bytes 0..3)."""

    src_addr: np.ndarray
    src_version: int
    dst_addr: np.ndarray
    dst_version: int
    failed: bool
    rtt_code: int | None
    rtt_ms: float | None
    time_kind: str | None  # None, 'abs', 'delta1', 'delta4'
    time_value: int | None  # Unix seconds for 'abs', else seconds since the previous timestamp
    field_order: tuple[int, ...]  # FIELD_* classes of its fields, in token order
    throughput_code: int | None = None


_FIELD_OF_TYPE = {
    SRC_IPV4: (FIELD_SRC, 4), SRC_IPV6: (FIELD_SRC, 16), DST_IPV4: (FIELD_DST, 4),
    DST_IPV6: (FIELD_DST, 16), TIMESTAMP_ABS: (FIELD_TIME, 8), TIMESTAMP_DELTA1: (FIELD_TIME, 1),
    TIMESTAMP_DELTA4: (FIELD_TIME, 4), RTT_START: (FIELD_RESULT, 2),
    THROUGHPUT_START: (FIELD_RESULT, 2), FAILED: (FIELD_RESULT, 0),
}


def decode_tokens(tokens, length: int | None = None) -> list[Measurement]:
    """Parse tokens[:length] (default: up to trailing padding) back into measurements.

    A measurement never ends with token 0, so trailing zeros are padding. Raises
    TokenGrammarError with the offending position on a malformed sequence.
    """
    seq = np.asarray(tokens).astype(np.int64).tolist()
    if length is None:
        length = len(seq)
        while length and seq[length - 1] == PAD:
            length -= 1
    seq = seq[:length]
    out = []
    pos = 0
    while pos < length:
        if seq[pos] != MEASUREMENT_START:
            raise TokenGrammarError(f"expected MEASUREMENT_START, got {seq[pos]}", pos)
        start = pos
        pos += 1
        parts: dict[int, tuple[int, list[int]]] = {}
        order = []
        while pos < length and seq[pos] != MEASUREMENT_START:
            tok = seq[pos]
            if tok not in _FIELD_OF_TYPE:
                raise TokenGrammarError(f"expected a field type token, got {tok}", pos)
            field, nbytes = _FIELD_OF_TYPE[tok]
            if field in parts:
                raise TokenGrammarError(f"second field of class {field} in one measurement", pos)
            raw = seq[pos + 1:pos + 1 + nbytes]
            if len(raw) < nbytes:
                raise TokenGrammarError("sequence ends inside a field", length)
            for i, b in enumerate(raw):
                if not BYTE_OFFSET <= b < VOCAB_SIZE:
                    raise TokenGrammarError(f"expected a byte token, got {b}", pos + 1 + i)
            parts[field] = (tok, [b - BYTE_OFFSET for b in raw])
            order.append(field)
            pos += 1 + nbytes
        for field in (FIELD_SRC, FIELD_DST, FIELD_RESULT):
            if field not in parts:
                raise TokenGrammarError(f"measurement lacks a field of class {field}", start)
        out.append(_measurement(parts, tuple(order)))
    return out


def _measurement(parts, order) -> Measurement:
    def addr(field):
        _, raw = parts[field]
        a = np.zeros(16, np.uint8)
        a[: len(raw)] = raw
        return a, 4 if len(raw) == 4 else 6

    src, src_v = addr(FIELD_SRC)
    dst, dst_v = addr(FIELD_DST)
    res_tok, res_raw = parts[FIELD_RESULT]
    code = bytes_to_rtt_code(*res_raw) if res_tok == RTT_START else None
    kind = value = None
    if FIELD_TIME in parts:
        tok, raw = parts[FIELD_TIME]
        kind = TIME_KIND_NAMES[tok - TIMESTAMP_ABS + 1]
        value = int.from_bytes(bytes(raw), "big", signed=tok == TIMESTAMP_ABS)
    return Measurement(
        src_addr=src, src_version=src_v, dst_addr=dst, dst_version=dst_v,
        failed=res_tok == FAILED, rtt_code=code,
        rtt_ms=None if code is None else float(decode_rtt(code)),
        time_kind=kind, time_value=value, field_order=order,
        throughput_code=bytes_to_rtt_code(*res_raw) if res_tok == THROUGHPUT_START else None,
    )


def absolute_times(measurements: list[Measurement]) -> list[int | None]:
    """Unix seconds of each timestamped measurement (deltas resolved in order), else None."""
    out, last = [], None
    for i, m in enumerate(measurements):
        if m.time_kind is None:
            out.append(None)
            continue
        if m.time_kind == "abs":
            last = m.time_value
        elif last is None:
            raise ValueError(f"measurement {i} has a delta but no earlier timestamp")
        else:
            last += m.time_value
        out.append(last)
    return out
