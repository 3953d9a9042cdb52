"""RIPE Atlas ping results (JSON lines, or Parquet extracts) -> measurement rows.

The rules are docs/data.md's "Import rules" (after docs/data_rules.md §2). Every input record
becomes one ROW_SCHEMA row, one count under a named drop reason or one count under a filter
in `ImportSummary`; a bad record never raises and never turns into a plausible-looking row.
Inputs stream in bounded memory (decompressed blocks of at most a few MiB); a `.bz2`/`.gz`
that ends early keeps what was read and records where it ended.

Decisions beyond docs/data_rules.md (each one line of why):

- Public address: unicast and outside the IANA special-purpose blocks that are not globally
  reachable (private, shared CGNAT, loopback, link-local, multicast, reserved, IPv6 outside
  2000::/3, ULA, 2001::/23, IPv4-mapped). An explicit list, because `ipaddress.is_global`
  changes between Python patch releases (3.11.7 calls 224.0.0.1 global).
- Documentation prefixes (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32,
  3fff::/20) count as public: no real probe is ever seen from them, so real data is unchanged,
  and they are what examples and format-level fixtures are written with.
- Known firmware: 0 (unknown, numbers may be strings), 1 (the 2010-12 format with
  `addr`/`srcaddr`/`pf`) and 4000-5999 (the 4xxx and 5xxx series, hardware and software
  probes); anything else may have changed the format, so it is counted, not guessed.
- Numbers given as strings are accepted only from fw 0, the one firmware documented to
  write them; elsewhere a string where a number belongs marks a malformed record.
- A destination that is not public (a probe pinging its LAN) is dropped: the same private
  address names a different host behind every probe.
- The destination equal to the source (`from` or `src_addr`: an anchor pinging itself) is
  dropped as `self_ping`: the packets never left the host.
- `sent` or `rcvd` missing is `missing_counts`: without them a failure cannot be told apart.
- `sent == 0` (the probe refused or could not send: "address not allowed", a local error)
  is dropped as `nothing_sent`, not a failed row: nothing crossed the network.
- Timestamps must lie in [2010-01-01, 2100-01-01): RIPE Atlas started in 2010, and a 0 or a
  millisecond value is corruption, not a time. RTTs above 10 minutes are `bad_rtt`.
- Kept, but counted in `notes`: `lts == -1` (clock sync unknown; the RTT does not depend
  on the clock), no `mver`, no `stored_timestamp` (neither is part of a row), `dup > 0`
  (duplicates never enter `min`), `error` entries in `result[]` (not replies; a result whose
  packets all failed with errors has rcvd 0 and is a failed row when sent > 0).
- A line holding a JSON array (the RIPE API's `format=json` download) is read as one record
  per element; blank lines are counted as `empty_line`.
- Parquet extracts: missing `msm_id` / `prb_id` columns (or nulls) become -1 ("unknown");
  rows are held to the same address, public-source, family, time and RTT rules.

Speed: lines are decoded by msgspec into a struct of the few fields a row needs (other
fields are skipped unparsed); a line msgspec rejects, or one that is not ASCII, is decoded
by `json.loads`, whose result goes through the same checks: both give the same rows and counts.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import ipaddress
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from pingllm.data.schema import FAILED_RTT, ROW_SCHEMA

# Stable drop-reason names, in the order a record is checked.
DROP_REASONS = (
    "empty_line",
    "malformed_json",  # not JSON, not UTF-8, nested too deep, an integer too long to parse
    "line_too_long",  # no newline within MAX_LINE_BYTES
    "truncated_line",  # the partial last line of an input that ended early
    "not_an_object",  # JSON, but not an object
    "missing_timestamp",  # also probe-side output, which has no controller fields
    "missing_msm_id",
    "not_a_ping",  # `type` missing or not "ping" (traceroute, dns, ... in a mixed dump)
    "unknown_firmware",  # `fw` missing, not an integer, or not a known series
    "bad_timestamp",  # not an integer Unix second in [2010, 2100)
    "bad_field",  # an id, count, af or result list of the wrong type or out of range
    "no_destination_address",  # DNS failure: no `dst_addr` / `addr`
    "bad_address",  # an address field that is not plain IPv4/IPv6 text
    "private_destination",  # the target is not a public address
    "no_public_source",  # neither `from` nor `src_addr` is public
    "address_family_mismatch",  # af / ip_version disagrees with an address
    "self_ping",  # destination == source: the packets never left the host
    "missing_counts",  # no `sent` or no `rcvd`
    "nothing_sent",  # sent == 0: a local error, nothing crossed the network
    "bad_rtt",  # NaN, inf, negative other than -1, > 10 min, or inconsistent with rcvd
    "unexpected_error",  # a bug in this module; a test holds it at zero
)
# Kept rows with something worth knowing, counted (one row may count under several).
NOTES = ("clock_unsynced", "no_mver", "no_stored_timestamp", "duplicate_replies",
         "error_entries")
# Valid rows a user filter left out.
FILTERS = ("ip_version", "msm_id", "time", "probe")

UNKNOWN_ID = -1
MIN_TIMESTAMP_S = 1_262_304_000  # 2010-01-01T00:00:00Z
MAX_TIMESTAMP_S = 4_102_444_800  # 2100-01-01T00:00:00Z
MAX_RTT_MS = 600_000.0
# Built-in measurements (the pings every probe runs, to root servers and the like) have ids
# below this; user-defined and anchoring measurements start above it.
BUILTIN_MSM_ID_LIMIT = 1_000_000
MAX_LINE_BYTES = 16 << 20
_INT64_MAX = 2**63 - 1
DEFAULT_CHUNK_ROWS = 100_000
_READ_BYTES = 1 << 18  # compressed bytes read at a time
_BLOCK_BYTES = 1 << 22  # most decompressed bytes produced at a time

_NOT_PUBLIC_V4 = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NOT_PUBLIC_V6 = (ipaddress.ip_network("2001::/23"),)  # IETF protocol assignments, Teredo
_PARQUET_SUFFIXES = (".parquet", ".pq")


class DroppedRecord(Exception):
    """A record is not imported, for `reason` (one of DROP_REASONS)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _add(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


@dataclasses.dataclass
class ImportSummary:
    """Rows kept; records dropped per reason; rows filtered out; notes; inputs that ended early."""

    kept: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    filtered: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: dict[str, int] = dataclasses.field(default_factory=dict)
    # One dict per input that ended early: file, compressed_offset (bytes of the file read),
    # compressed_size, decompressed_offset (end of the last whole line kept), lines.
    truncated: list[dict] = dataclasses.field(default_factory=list)

    def drop(self, reason: str, count: int = 1) -> None:
        _add(self.dropped, reason, count)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def total_filtered(self) -> int:
        return sum(self.filtered.values())

    @property
    def total_read(self) -> int:
        return self.kept + self.total_dropped + self.total_filtered

    def merge(self, other: ImportSummary) -> ImportSummary:
        """A new summary holding both counts."""
        out = ImportSummary(self.kept + other.kept, dict(self.dropped), dict(self.filtered),
                            dict(self.notes), [*self.truncated, *other.truncated])
        for mine, theirs in ((out.dropped, other.dropped), (out.filtered, other.filtered),
                             (out.notes, other.notes)):
            for key, count in theirs.items():
                _add(mine, key, count)
        return out

    __add__ = merge

    def to_dict(self) -> dict:
        # Every known reason appears (0 included) so consumers can rely on the keys.
        def full(counts, names):
            out = {name: counts.get(name, 0) for name in names}
            out.update({k: c for k, c in counts.items() if k not in out})
            return out

        return {
            "read": self.total_read,
            "kept": self.kept,
            "total_dropped": self.total_dropped,
            "dropped": full(self.dropped, DROP_REASONS),
            "total_filtered": self.total_filtered,
            "filtered": full(self.filtered, FILTERS),
            "notes": full(self.notes, NOTES),
            "truncated": list(self.truncated),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> ImportSummary:
        def nonzero(counts):
            return {k: int(c) for k, c in (counts or {}).items() if c}

        return cls(int(d["kept"]), nonzero(d["dropped"]), nonzero(d.get("filtered")),
                   nonzero(d.get("notes")), list(d.get("truncated", [])))

    def format(self) -> str:
        """A human-readable table; reasons with zero counts are left out."""
        lines = [
            f"{'read':<28}{self.total_read:>12,}",
            f"{'kept':<28}{self.kept:>12,}",
            f"{'dropped':<28}{self.total_dropped:>12,}",
        ]
        order = [r for r in DROP_REASONS if r in self.dropped]
        order += sorted(r for r in self.dropped if r not in DROP_REASONS)
        lines += [f"  {r:<26}{self.dropped[r]:>12,}" for r in order if self.dropped[r]]
        if self.total_filtered:
            lines.append(f"{'filtered out':<28}{self.total_filtered:>12,}")
            lines += [f"  by {r:<23}{c:>12,}" for r, c in sorted(self.filtered.items()) if c]
        if any(self.notes.values()):
            lines.append("kept, with notes:")
            lines += [f"  {r:<26}{self.notes[r]:>12,}" for r in NOTES if self.notes.get(r)]
        for t in self.truncated:
            lines.append(
                f"TRUNCATED {t['file']}: ended at compressed byte {t['compressed_offset']:,} of "
                f"{t['compressed_size']:,}; kept {t['lines']:,} whole lines "
                f"({t['decompressed_offset']:,} decompressed bytes)")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RowFilter:
    """Which valid rows to keep; None = any. Times are Unix seconds, [start_s, end_s)."""

    ip_version: int | None = None
    msm_ids: frozenset[int] | None = None
    builtin_only: bool = False
    start_s: int | None = None
    end_s: int | None = None
    probes: frozenset[int] | None = None

    def __post_init__(self):
        if self.ip_version not in (None, 4, 6):
            raise ValueError(f"ip_version must be 4 or 6, got {self.ip_version}")
        if self.start_s is not None and self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"time range is empty: [{self.start_s}, {self.end_s})")

    def reason(self, row) -> str | None:
        """The filter that leaves `row` out, or None to keep it."""
        if self.ip_version is not None and row[5] != self.ip_version:
            return "ip_version"
        msm = row[0]
        if (self.msm_ids is not None and msm not in self.msm_ids) or (
                self.builtin_only and not 0 < msm < BUILTIN_MSM_ID_LIMIT):
            return "msm_id"
        seconds = row[2] // 1_000_000
        if (self.start_s is not None and seconds < self.start_s) or (
                self.end_s is not None and seconds >= self.end_s):
            return "time"
        if self.probes is not None and row[1] not in self.probes:
            return "probe"
        return None


# ---------------------------------------------------------------- addresses


@functools.lru_cache(maxsize=1 << 18)
def _address(text: str) -> tuple[str, int, bool] | None:
    """(canonical text, ip version, is public) of plain address text, or None if it is not one."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if getattr(addr, "scope_id", None):  # "fe80::1%eth0" names an interface, not a host
        return None
    if addr.version == 4:
        public = not any(addr in net for net in _NOT_PUBLIC_V4)
    else:
        public = addr in _GLOBAL_UNICAST_V6 and not any(addr in net for net in _NOT_PUBLIC_V6)
    return str(addr), addr.version, public


def is_public_address(text: str) -> bool:
    """Whether `text` is an address the importer accepts as a public source (module doc)."""
    parsed = _address(text) if isinstance(text, str) else None
    return parsed is not None and parsed[2]


def _parse_address_field(value) -> tuple[str, int, bool] | None:
    """An address field: None when absent or "", else parsed, else `bad_address`."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DroppedRecord("bad_address")
    parsed = _address(value)
    if parsed is None:
        raise DroppedRecord("bad_address")
    return parsed


def _pick_source(candidates: Sequence) -> tuple[str, int]:
    """The first public candidate (docs/data_rules.md: `from`, then `src_addr`)."""
    for value in candidates:
        parsed = _parse_address_field(value)
        if parsed is not None and parsed[2]:
            return parsed[0], parsed[1]
    raise DroppedRecord("no_public_source")


# ---------------------------------------------------------------- numbers


def _int(value, *, strings_ok: bool, reason: str = "bad_field") -> int:
    if isinstance(value, bool):
        raise DroppedRecord(reason)
    if isinstance(value, int):
        return value
    if strings_ok and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise DroppedRecord(reason) from None
    raise DroppedRecord(reason)


def _float(value, *, strings_ok: bool) -> float:
    if isinstance(value, bool):
        raise DroppedRecord("bad_rtt")
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            raise DroppedRecord("bad_rtt") from None
    if strings_ok and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise DroppedRecord("bad_rtt") from None
    raise DroppedRecord("bad_rtt")


def _event_time_us(seconds: int) -> int:
    if not MIN_TIMESTAMP_S <= seconds < MAX_TIMESTAMP_S:
        raise DroppedRecord("bad_timestamp")
    return seconds * 1_000_000


def _id(value, *, strings_ok: bool) -> int:
    out = _int(value, strings_ok=strings_ok)
    if not 0 < out <= _INT64_MAX:
        raise DroppedRecord("bad_field")
    return out


def _check_rtt(rtt: float) -> float:
    """A reply's RTT in ms: finite, non-negative, at most MAX_RTT_MS."""
    if not (math.isfinite(rtt) and 0.0 <= rtt <= MAX_RTT_MS):
        raise DroppedRecord("bad_rtt")
    return rtt


def _min_over_replies(result, *, strings_ok: bool) -> float | None:
    """Minimum RTT over non-duplicate replies in `result[]`, None when there is none."""
    if not isinstance(result, list):
        raise DroppedRecord("bad_field")
    best = None
    for entry in result:
        if not isinstance(entry, dict):
            raise DroppedRecord("bad_field")
        if "rtt" not in entry or entry.get("dup"):
            continue
        rtt = _check_rtt(_float(entry["rtt"], strings_ok=strings_ok))
        best = rtt if best is None else min(best, rtt)
    return best


# ---------------------------------------------------------------- one JSON record

_Row = tuple[int, int, int, str, str, int, float]
_UNSET = msgspec.UNSET
_NOTE_BITS = {name: 1 << i for i, name in enumerate(NOTES)}


class _Ping(msgspec.Struct):
    """The fields of a result a row needs; msgspec skips every other field."""

    # None = absent or null (the dict path's `get`); UNSET where the key's presence matters.
    type: Any = None
    fw: Any = None
    timestamp: Any = None
    msm_id: Any = None
    prb_id: Any = None
    dst_addr: Any = _UNSET
    addr: Any = None
    src_addr: Any = _UNSET
    srcaddr: Any = None
    from_: Any = msgspec.field(default=None, name="from")
    af: Any = _UNSET
    pf: Any = None
    sent: Any = None
    rcvd: Any = None
    min: Any = None
    dup: Any = None
    lts: Any = None
    mver: Any = None
    stored_timestamp: Any = None
    result: msgspec.Raw = _UNSET


_DECODE_PING = msgspec.json.Decoder(_Ping).decode


def _firmware(fw) -> int:
    if isinstance(fw, bool) or not isinstance(fw, int):
        raise DroppedRecord("unknown_firmware")
    if fw in (0, 1) or 4000 <= fw <= 5999:
        return fw
    raise DroppedRecord("unknown_firmware")


def _has_error_entry(result) -> bool:
    return isinstance(result, list) and any(isinstance(e, dict) and "error" in e for e in result)


def _row_of_values(timestamp, msm_id, type_, fw, prb_id, dst, from_, src, af, sent, rcvd,
                   reported_min, result: Callable[[], Any]) -> _Row:
    """The checks of docs/data.md's import rules, on a record's values (None = absent or null;
    dst/src/af already resolved between new and old keys). `result()` gives `result[]`."""
    if timestamp is None:
        raise DroppedRecord("missing_timestamp")
    if msm_id is None:
        raise DroppedRecord("missing_msm_id")
    if type_ != "ping":
        raise DroppedRecord("not_a_ping")
    strings_ok = not (type(fw) is int and 4000 <= fw <= 5999) and _firmware(fw) == 0
    # `type(x) is int` (never bool) and cached plain-text addresses are the common case, inline.
    if type(timestamp) is int and MIN_TIMESTAMP_S <= timestamp < MAX_TIMESTAMP_S:
        event_time_us = timestamp * 1_000_000
    else:
        event_time_us = _event_time_us(
            _int(timestamp, strings_ok=strings_ok, reason="bad_timestamp"))
    if not (type(msm_id) is int and 0 < msm_id <= _INT64_MAX):
        msm_id = _id(msm_id, strings_ok=strings_ok)
    if prb_id is None:
        prb_id = UNKNOWN_ID
    elif not (type(prb_id) is int and 0 < prb_id <= _INT64_MAX):
        prb_id = _id(prb_id, strings_ok=strings_ok)

    if type(dst) is str and dst:
        dst = _address(dst)
        if dst is None:
            raise DroppedRecord("bad_address")
    else:
        dst = _parse_address_field(dst)
        if dst is None:
            raise DroppedRecord("no_destination_address")
    if not dst[2]:
        raise DroppedRecord("private_destination")
    public_from = _address(from_) if type(from_) is str and from_ else None
    if public_from is not None and public_from[2]:
        src_text, src_version = public_from[0], public_from[1]
    else:
        src_text, src_version = _pick_source((from_, src))

    ip_version = dst[1] if af is None else af if type(af) is int else _int(
        af, strings_ok=strings_ok)
    if ip_version not in (4, 6):
        raise DroppedRecord("bad_field")
    if not ip_version == dst[1] == src_version:
        raise DroppedRecord("address_family_mismatch")
    if src_text == dst[0] or (isinstance(src, str) and (_address(src) or ("",))[0] == dst[0]):
        raise DroppedRecord("self_ping")

    if sent is None or rcvd is None:
        raise DroppedRecord("missing_counts")
    if type(sent) is not int:
        sent = _int(sent, strings_ok=strings_ok)
    if type(rcvd) is not int:
        rcvd = _int(rcvd, strings_ok=strings_ok)
    if not 0 <= rcvd <= sent:  # rcvd excludes duplicates, so it never exceeds sent
        raise DroppedRecord("bad_field")
    if sent == 0:
        raise DroppedRecord("nothing_sent")

    if reported_min is not None and type(reported_min) is not float:
        reported_min = _float(reported_min, strings_ok=strings_ok)
    if rcvd == 0:
        # Duplicates may still carry RTTs here; `min` excludes them and must say -1.
        if reported_min is not None and reported_min != FAILED_RTT:
            raise DroppedRecord("bad_rtt")
        rtt = FAILED_RTT
    elif reported_min is not None:
        rtt = reported_min if 0.0 <= reported_min <= MAX_RTT_MS else _check_rtt(reported_min)
    else:
        rtt = _min_over_replies(result(), strings_ok=strings_ok)
        if rtt is None:
            raise DroppedRecord("bad_rtt")
    return msm_id, prb_id, event_time_us, src_text, dst[0], ip_version, rtt


def _dict_notes(record: dict) -> int:
    bits = 0
    if record.get("lts") == -1:
        bits |= _NOTE_BITS["clock_unsynced"]
    if record.get("mver") is None:
        bits |= _NOTE_BITS["no_mver"]
    if record.get("stored_timestamp") is None:
        bits |= _NOTE_BITS["no_stored_timestamp"]
    dup = record.get("dup")
    if dup not in (None, 0, "0", False):
        bits |= _NOTE_BITS["duplicate_replies"]
    if _has_error_entry(record.get("result")):
        bits |= _NOTE_BITS["error_entries"]
    return bits


def _row_of_dict(record) -> tuple[_Row, int]:
    """(row, note bits) of one parsed JSON value; raises DroppedRecord."""
    if not isinstance(record, dict):
        raise DroppedRecord("not_an_object")
    get = record.get
    # New key first; firmware before 4460 writes the old one (some write both, equal).
    row = _row_of_values(
        get("timestamp"), get("msm_id"), get("type"), get("fw"), get("prb_id"),
        get("dst_addr", get("addr")), get("from"), get("src_addr", get("srcaddr")),
        get("af", get("pf")), get("sent"), get("rcvd"), get("min"), lambda: get("result"))
    return row, _dict_notes(record)


def _struct_result(raw):
    return None if raw is _UNSET else msgspec.json.decode(raw)


def _row_of_struct(s: _Ping) -> tuple[_Row, int]:
    """The same as _row_of_dict, from the msgspec struct of the line."""
    row = _row_of_values(
        s.timestamp, s.msm_id, s.type, s.fw, s.prb_id,
        s.addr if s.dst_addr is _UNSET else s.dst_addr, s.from_,
        s.srcaddr if s.src_addr is _UNSET else s.src_addr, s.pf if s.af is _UNSET else s.af,
        s.sent, s.rcvd, s.min, lambda: _struct_result(s.result))
    bits = 0
    if s.lts == -1:
        bits |= _NOTE_BITS["clock_unsynced"]
    if s.mver is None:
        bits |= _NOTE_BITS["no_mver"]
    if s.stored_timestamp is None:
        bits |= _NOTE_BITS["no_stored_timestamp"]
    if s.dup not in (None, 0, "0", False):
        bits |= _NOTE_BITS["duplicate_replies"]
    raw = s.result
    if raw is not _UNSET and b'"error"' in bytes(raw) and _has_error_entry(_struct_result(raw)):
        bits |= _NOTE_BITS["error_entries"]
    return row, bits


def row_from_record(record) -> _Row:
    """One parsed ping result -> (msm_id, prb_id, event_time_us, src, dst, ip_version, rtt).

    Raises `DroppedRecord` with the reason when the record is not imported; prb_id is -1 when
    the record has none.
    """
    return _row_of_dict(record)[0]


# ---------------------------------------------------------------- lines -> rows


class _Columns:
    """Rows, handed out column by column as ROW_SCHEMA tables."""

    def __init__(self):
        self.rows: list[_Row] = []
        self.append = self.rows.append

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, n: int | None = None) -> pa.Table:
        """The first n rows (all by default) as a table; the rest stay."""
        n = len(self) if n is None else n
        columns = list(zip(*self.rows[:n])) or [()] * len(ROW_SCHEMA)
        del self.rows[:n]
        arrays = [pa.array(c, type=f.type) for c, f in zip(columns, ROW_SCHEMA)]
        return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)


class _LineImporter:
    """Lines in, rows into a _Columns; every line ends as a row or a count in `summary`."""

    def __init__(self, summary: ImportSummary, row_filter: RowFilter | None = None):
        self.summary = summary
        self.row_filter = row_filter
        self.columns = _Columns()

    def _keep(self, row: _Row, bits: int) -> None:
        summary = self.summary
        if self.row_filter is not None:
            reason = self.row_filter.reason(row)
            if reason is not None:
                _add(summary.filtered, reason)
                return
        summary.kept += 1
        if bits:
            for name, bit in _NOTE_BITS.items():
                if bits & bit:
                    _add(summary.notes, name)
        self.columns.append(row)

    def _slow(self, line) -> None:
        """`json.loads` and the dict checks: lines msgspec rejects, and JSON array lines."""
        try:
            records = _records_of_line(line)
        except DroppedRecord as drop:
            self.summary.drop(drop.reason)
            return
        for record in records:
            try:
                row, bits = _row_of_dict(record)
            except DroppedRecord as drop:
                self.summary.drop(drop.reason)
                continue
            except Exception:  # noqa: BLE001 - a bad line must never stop an import
                self.summary.drop("unexpected_error")
                continue
            self._keep(row, bits)

    def feed(self, lines: Iterable[str | bytes]) -> None:
        decode, drop, keep = _DECODE_PING, self.summary.drop, self._keep
        append = self.columns.append
        slow = self._slow
        for line in lines:
            if not line.isascii():  # msgspec does not check UTF-8 in the fields it skips
                slow(line)
                continue
            try:
                s = decode(line)
            except msgspec.DecodeError:  # also ValidationError: not an object
                slow(line)
                continue
            try:
                row, bits = _row_of_struct(s)
            except DroppedRecord as drop_:
                drop(drop_.reason)
                continue
            except Exception:  # noqa: BLE001 - a bad line must never stop an import
                drop("unexpected_error")
                continue
            if bits or self.row_filter is not None:
                keep(row, bits)
            else:  # the common case, inline
                self.summary.kept += 1
                append(row)


def _records_of_line(line: str | bytes) -> list:
    """Parsed JSON values of one line (an array line gives its elements); raises DroppedRecord."""
    if not line.strip():
        raise DroppedRecord("empty_line")
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int too long
        raise DroppedRecord("malformed_json") from None
    if isinstance(value, list):
        return value or [None]  # an empty array still counts, as `not_an_object`
    return [value]


def _tables(batches: Iterable[Iterable], importer: _LineImporter,
            chunk_rows: int) -> Iterator[pa.Table]:
    """ROW_SCHEMA tables of exactly `chunk_rows` rows (the last one shorter) from line batches."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, not {chunk_rows}")
    columns = importer.columns
    for batch in batches:
        importer.feed(batch)
        while len(columns) >= chunk_rows:
            yield columns.take(chunk_rows)
    if len(columns):
        yield columns.take()


def _batched(lines: Iterable, size: int = 4096) -> Iterator[list]:
    batch = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_line_tables(
    lines: Iterable[str | bytes], summary: ImportSummary, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
    row_filter: RowFilter | None = None,
) -> Iterator[pa.Table]:
    """JSON lines -> ROW_SCHEMA tables of `chunk_rows` rows; counts go into `summary`."""
    return _tables(_batched(lines), _LineImporter(summary, row_filter), chunk_rows)


def import_lines(lines: Iterable[str | bytes], *,
                 row_filter: RowFilter | None = None) -> tuple[pa.Table, ImportSummary]:
    """JSON lines (one ping result each) -> (ROW_SCHEMA table, summary)."""
    summary = ImportSummary()
    tables = list(iter_line_tables(lines, summary, row_filter=row_filter))
    return _concat(tables), summary


def _concat(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        return ROW_SCHEMA.empty_table()
    return pa.concat_tables(tables).combine_chunks()


# ---------------------------------------------------------------- Parquet extracts


def _parquet_time_us(column: pa.ChunkedArray) -> list:
    """event_time values as Unix microseconds (None where null); naive times are UTC."""
    t = column.type
    if pa.types.is_integer(t):  # Unix seconds; a ms/us column fails the range check loudly
        return [None if v is None else v * 1_000_000 for v in column.to_pylist()]
    if not pa.types.is_timestamp(t):
        raise ValueError(f"event_time must be a timestamp or integer seconds, not {t}")
    raw = column.cast(pa.int64()).to_pylist()
    if t.unit == "s":
        return [None if v is None else v * 1_000_000 for v in raw]
    if t.unit == "ms":
        return [None if v is None else v * 1_000 for v in raw]
    if t.unit == "ns":
        return [None if v is None else v // 1_000 for v in raw]
    return raw


def _row_from_parquet(msm_id, prb_id, time_us, src, dst, ip_version, rtt) -> _Row:
    if time_us is None:
        raise DroppedRecord("missing_timestamp")
    if not MIN_TIMESTAMP_S * 1_000_000 <= time_us < MAX_TIMESTAMP_S * 1_000_000:
        raise DroppedRecord("bad_timestamp")
    for value in (msm_id, prb_id):
        if value is not None and value != UNKNOWN_ID and value <= 0:
            raise DroppedRecord("bad_field")
    dst_parsed = _parse_address_field(dst)
    if dst_parsed is None:
        raise DroppedRecord("no_destination_address")
    if not dst_parsed[2]:
        raise DroppedRecord("private_destination")
    src_text, src_version = _pick_source((src,))
    if ip_version not in (4, 6):
        raise DroppedRecord("bad_field")
    if not ip_version == dst_parsed[1] == src_version:
        raise DroppedRecord("address_family_mismatch")
    if src_text == dst_parsed[0]:
        raise DroppedRecord("self_ping")
    if rtt is None or (rtt != FAILED_RTT and not (math.isfinite(rtt) and 0.0 <= rtt <= MAX_RTT_MS)):
        raise DroppedRecord("bad_rtt")
    return (
        UNKNOWN_ID if msm_id is None else msm_id,
        UNKNOWN_ID if prb_id is None else prb_id,
        time_us,
        src_text,
        dst_parsed[0],
        ip_version,
        rtt,
    )


_PARQUET_REQUIRED = ("event_time", "src_addr", "dst_addr", "ip_version", "rtt")


def _rows_of_parquet(path, summary: ImportSummary, batch_rows: int) -> Iterator[_Row]:
    """Validated rows of a Parquet extract; raises ValueError on a wrong schema."""
    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    missing = [c for c in _PARQUET_REQUIRED if c not in names]
    if missing:
        raise ValueError(f"{path}: Parquet input lacks required columns {missing}")
    wanted = [c for c in ROW_SCHEMA.names if c in names]
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
        table = pa.Table.from_batches([batch])
        n = table.num_rows
        ids = {
            c: table[c].cast(pa.int64()).to_pylist() if c in names else [None] * n
            for c in ("msm_id", "prb_id")
        }
        columns = (
            ids["msm_id"],
            ids["prb_id"],
            _parquet_time_us(table["event_time"]),
            table["src_addr"].cast(pa.string()).to_pylist(),
            table["dst_addr"].cast(pa.string()).to_pylist(),
            table["ip_version"].cast(pa.int64()).to_pylist(),
            table["rtt"].cast(pa.float64()).to_pylist(),
        )
        for values in zip(*columns):
            try:
                row = _row_from_parquet(*values)
            except DroppedRecord as drop:
                summary.drop(drop.reason)
                continue
            yield row  # counted as kept (or filtered) by the importer


# ---------------------------------------------------------------- files


class _Reader:
    """Decompressed blocks of one input (plain, .bz2 or .gz by content; "-" = stdin).

    Multi-stream bz2 and multi-member gzip are read whole. `compressed_offset` counts the bytes
    of the input consumed; `ended_early` is set when a compressed stream stops mid-way.
    """

    def __init__(self, path):
        self.name = str(path)
        self.compressed_offset = 0
        self.ended_early = False
        self.error = ""
        self._path = path

    def _open(self):
        if self.name == "-":
            return sys.stdin.buffer
        return open(self._path, "rb")

    def size(self) -> int:
        try:
            return 0 if self.name == "-" else Path(self._path).stat().st_size
        except OSError:
            return 0

    def blocks(self) -> Iterator[bytes]:
        f = self._open()
        try:
            data = f.read(_READ_BYTES)
            self.compressed_offset = len(data)
            if data[:3] == b"BZh":
                yield from self._decompressed(f, data, bz2.BZ2Decompressor)
            elif data[:2] == b"\x1f\x8b":
                yield from self._decompressed(f, data, lambda: zlib.decompressobj(wbits=31))
            else:
                while data:
                    yield data
                    data = f.read(_READ_BYTES)
                    self.compressed_offset += len(data)
        finally:
            if f is not sys.stdin.buffer:
                f.close()

    def _decompressed(self, f, data: bytes, new) -> Iterator[bytes]:
        try:
            yield from self._decompress(f, data, new)
        except (OSError, EOFError, zlib.error) as e:  # corrupt data: keep what came before
            self.ended_early, self.error = True, f"{type(e).__name__}: {e}"

    def _decompress(self, f, data: bytes, new) -> Iterator[bytes]:
        d = new()
        in_stream = True
        while True:
            if not data:
                data = f.read(_READ_BYTES)
                self.compressed_offset += len(data)
                if not data:
                    break
            if not in_stream:  # a new stream (pbzip2 output, concatenated .gz members)
                d, in_stream = new(), True
            out = d.decompress(data, _BLOCK_BYTES)
            data = b""
            while True:
                if out:
                    yield out
                if d.eof:
                    data, in_stream = d.unused_data, False
                    break
                more = getattr(d, "unconsumed_tail", b"")  # zlib keeps unread input here
                if not more and (not hasattr(d, "needs_input") or d.needs_input):
                    break
                out = d.decompress(more, _BLOCK_BYTES) if more else d.decompress(b"", _BLOCK_BYTES)
        self.ended_early = in_stream
        if in_stream:
            self.error = "the compressed stream ends before its end-of-stream marker"


class _Progress:
    """One status line on stderr at most every `period` seconds: results/s, bytes, drops."""

    def __init__(self, summary: ImportSummary, total_bytes: int, period: float = 1.0,
                 stream=None):
        self.summary, self.total_bytes, self.period = summary, total_bytes, period
        self.stream = stream or sys.stderr
        self.start = self.last = time.perf_counter()
        self.done_bytes = 0

    def update(self, reader_bytes: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.period:
            return
        self.last = now
        s = self.summary
        read, rate = s.total_read, s.total_read / max(now - self.start, 1e-9)
        done = self.done_bytes + reader_bytes
        of = f"/{self.total_bytes / 1e6:,.1f}" if self.total_bytes else ""
        top = sorted(s.dropped.items(), key=lambda kv: -kv[1])[:4]
        drops = " ".join(f"{k}={v:,}" for k, v in top)
        self.stream.write(
            f"\r{read:,} results {rate:,.0f}/s {done / 1e6:,.1f}{of} MB kept {s.kept:,} "
            f"dropped {s.total_dropped:,} {drops}"[:200].ljust(100))
        self.stream.flush()

    def close(self) -> None:
        self.update(0, force=True)
        self.stream.write("\n")
        self.stream.flush()


def _lines_of_reader(reader: _Reader, summary: ImportSummary,
                     progress: _Progress | None) -> Iterator[list[bytes]]:
    """Batches of whole lines; the partial tail of an input that ended early is counted."""
    carry = b""
    lines = seen = 0  # whole lines handed out; decompressed bytes seen
    skipping = False  # inside a line longer than MAX_LINE_BYTES
    for block in reader.blocks():
        seen += len(block)
        parts = block.split(b"\n")
        if skipping:
            if len(parts) == 1:
                continue
            del parts[0]  # the rest of the over-long line
            skipping = False
        else:
            parts[0] = carry + parts[0]
        carry = parts.pop()
        if len(carry) > MAX_LINE_BYTES:
            summary.drop("line_too_long")
            carry, skipping = b"", True
        if parts:
            lines += len(parts)
            yield parts
        if progress is not None:
            progress.update(reader.compressed_offset)
    if reader.ended_early:
        if carry:
            summary.drop("truncated_line")
        summary.truncated.append({
            "file": reader.name, "compressed_offset": reader.compressed_offset,
            "compressed_size": reader.size(), "decompressed_offset": seen - len(carry),
            "lines": lines, "error": reader.error})
    elif carry:
        yield [carry]


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in _PARQUET_SUFFIXES


def _batches_of_files(paths: list, importer: _LineImporter, batch_rows: int,
                      progress: _Progress | None) -> Iterator[list]:
    summary = importer.summary
    for path in paths:
        if path != "-" and _is_parquet(Path(path)):
            yield from _batched(_rows_of_parquet(path, summary, batch_rows))
            continue
        reader = _Reader(path)
        yield from _lines_of_reader(reader, summary, progress)
        if progress is not None:
            progress.done_bytes += reader.compressed_offset


class _RowFeeder(_LineImporter):
    """Parquet rows are validated already: a batch that holds rows (tuples) skips decoding."""

    def feed(self, lines) -> None:
        if lines and isinstance(lines[0], tuple):
            for row in lines:
                self._keep(row, 0)
            return
        super().feed(lines)


def iter_file_tables(
    paths: Iterable, summary: ImportSummary, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
    row_filter: RowFilter | None = None, progress: bool | float = False,
) -> Iterator[pa.Table]:
    """Files -> ROW_SCHEMA tables of `chunk_rows` rows (across files), streamed.

    "-" reads stdin. Counts go into `summary`; `progress` (True or a period in seconds) prints
    a status line on stderr. Raises FileNotFoundError for a missing path before reading.
    """
    paths = [p if p == "-" else Path(p) for p in paths]
    for path in paths:
        if path != "-" and not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    bar = None
    if progress:
        total = sum(Path(p).stat().st_size for p in paths if p != "-")
        bar = _Progress(summary, total, 1.0 if progress is True else float(progress))
    importer = _RowFeeder(summary, row_filter)
    tables = _tables(_batches_of_files(paths, importer, chunk_rows, bar), importer, chunk_rows)
    if bar is None:
        return tables
    return _closing(tables, bar)


def _closing(tables: Iterator[pa.Table], bar: _Progress) -> Iterator[pa.Table]:
    try:
        yield from tables
    finally:
        bar.close()


def import_files(
    paths: Iterable, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, row_filter: RowFilter | None = None,
) -> tuple[pa.Table, ImportSummary]:
    """JSON lines (plain, .gz, .bz2) and Parquet extracts -> (ROW_SCHEMA table, summary)."""
    summary = ImportSummary()
    tables = list(iter_file_tables(paths, summary, chunk_rows=chunk_rows, row_filter=row_filter))
    return _concat(tables), summary
