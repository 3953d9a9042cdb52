"""RIPE Atlas ping results (JSON lines, or Parquet extracts) -> measurement rows (DATA.md §2).

Every input record becomes one ROW_SCHEMA row or one count under a named drop reason in
`ImportSummary`; a bad record never raises and never turns into a plausible-looking row.

Decisions beyond DATA.md (each one line of why):

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
- `sent == 0` (the probe refused or could not send: "address not allowed", a local error)
  is dropped as `nothing_sent`, not a failed row: nothing crossed the network.
- Timestamps must lie in [2010-01-01, 2100-01-01): RIPE Atlas started in 2010, and a 0 or a
  millisecond value is corruption, not a time. RTTs above 10 minutes are `bad_rtt`.
- A line holding a JSON array (the RIPE API's `format=json` download) is read as one record
  per element; blank lines are counted as `empty_line`.
- Parquet extracts: missing `msm_id` / `prb_id` columns (or nulls) become -1 ("unknown");
  rows are held to the same address, public-source, family, time and RTT rules.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import gzip
import ipaddress
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pingllm.data.schema import FAILED_RTT, ROW_SCHEMA

# Stable drop-reason names, in the order a record is checked.
DROP_REASONS = (
    "empty_line",
    "malformed_json",  # not JSON, not UTF-8, nested too deep, an integer too long to parse
    "not_an_object",  # JSON, but not an object
    "missing_timestamp",  # also probe-side output, which has no controller fields
    "missing_msm_id",
    "not_a_ping",  # `type` missing or not "ping"
    "unknown_firmware",  # `fw` missing, not an integer, or not a known series
    "bad_timestamp",  # not an integer Unix second in [2010, 2100)
    "bad_field",  # an id, count, af or result list of the wrong type or out of range
    "no_destination_address",  # DNS failure: no `dst_addr` / `addr`
    "bad_address",  # an address field that is not plain IPv4/IPv6 text
    "no_public_source",  # neither `from` nor `src_addr` is public
    "address_family_mismatch",  # af / ip_version disagrees with an address
    "nothing_sent",  # sent == 0: a local error, nothing crossed the network
    "bad_rtt",  # NaN, inf, negative other than -1, > 10 min, or inconsistent with rcvd
    "unexpected_error",  # a bug in this module; a test holds it at zero
)

UNKNOWN_ID = -1
MIN_TIMESTAMP_S = 1_262_304_000  # 2010-01-01T00:00:00Z
MAX_TIMESTAMP_S = 4_102_444_800  # 2100-01-01T00:00:00Z
MAX_RTT_MS = 600_000.0
_INT64_MAX = 2**63 - 1
DEFAULT_CHUNK_ROWS = 100_000

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


@dataclasses.dataclass
class ImportSummary:
    """How many records became rows, and how many were dropped for each reason."""

    kept: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def total_read(self) -> int:
        return self.kept + self.total_dropped

    def merge(self, other: ImportSummary) -> ImportSummary:
        """A new summary holding both counts."""
        out = ImportSummary(self.kept + other.kept, dict(self.dropped))
        for reason, count in other.dropped.items():
            out.drop(reason, count)
        return out

    __add__ = merge

    def to_dict(self) -> dict:
        # Every known reason appears (0 included) so consumers can rely on the keys.
        dropped = {reason: self.dropped.get(reason, 0) for reason in DROP_REASONS}
        dropped.update({r: c for r, c in self.dropped.items() if r not in dropped})
        return {
            "read": self.total_read,
            "kept": self.kept,
            "total_dropped": self.total_dropped,
            "dropped": dropped,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> ImportSummary:
        return cls(int(d["kept"]), {r: int(c) for r, c in d["dropped"].items() if c})

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
        return "\n".join(lines)


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
    """The first public candidate (DATA.md: `from`, then `src_addr`)."""
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


def _firmware(record: dict) -> int:
    fw = record.get("fw")
    if isinstance(fw, bool) or not isinstance(fw, int):
        raise DroppedRecord("unknown_firmware")
    if fw in (0, 1) or 4000 <= fw <= 5999:
        return fw
    raise DroppedRecord("unknown_firmware")


def row_from_record(record) -> _Row:
    """One parsed ping result -> (msm_id, prb_id, event_time_us, src, dst, ip_version, rtt).

    Raises `DroppedRecord` with the reason when the record is not imported; prb_id is -1 when
    the record has none.
    """
    if not isinstance(record, dict):
        raise DroppedRecord("not_an_object")
    if record.get("timestamp") is None:
        raise DroppedRecord("missing_timestamp")
    if record.get("msm_id") is None:
        raise DroppedRecord("missing_msm_id")
    if record.get("type") != "ping":
        raise DroppedRecord("not_a_ping")
    strings_ok = _firmware(record) == 0

    event_time_us = _event_time_us(
        _int(record["timestamp"], strings_ok=strings_ok, reason="bad_timestamp")
    )
    msm_id = _id(record["msm_id"], strings_ok=strings_ok)
    prb_id = record.get("prb_id")
    prb_id = UNKNOWN_ID if prb_id is None else _id(prb_id, strings_ok=strings_ok)

    # New key first; firmware before 4460 writes the old one (some write both, equal).
    dst = _parse_address_field(record.get("dst_addr", record.get("addr")))
    if dst is None:
        raise DroppedRecord("no_destination_address")
    src_text, src_version = _pick_source(
        (record.get("from"), record.get("src_addr", record.get("srcaddr")))
    )

    af = record.get("af", record.get("pf"))
    ip_version = dst[1] if af is None else _int(af, strings_ok=strings_ok)
    if ip_version not in (4, 6):
        raise DroppedRecord("bad_field")
    if not ip_version == dst[1] == src_version:
        raise DroppedRecord("address_family_mismatch")

    sent = _int(record.get("sent"), strings_ok=strings_ok)
    rcvd = _int(record.get("rcvd"), strings_ok=strings_ok)
    if not 0 <= rcvd <= sent:  # rcvd excludes duplicates, so it never exceeds sent
        raise DroppedRecord("bad_field")
    if sent == 0:
        raise DroppedRecord("nothing_sent")

    reported_min = record.get("min")
    if reported_min is not None:
        reported_min = _float(reported_min, strings_ok=strings_ok)
    if rcvd == 0:
        # Duplicates may still carry RTTs here; `min` excludes them and must say -1.
        if reported_min is not None and reported_min != FAILED_RTT:
            raise DroppedRecord("bad_rtt")
        rtt = FAILED_RTT
    elif reported_min is not None:
        rtt = _check_rtt(reported_min)
    else:
        rtt = _min_over_replies(record.get("result"), strings_ok=strings_ok)
        if rtt is None:
            raise DroppedRecord("bad_rtt")
    return msm_id, prb_id, event_time_us, src_text, dst[0], ip_version, rtt


# ---------------------------------------------------------------- rows -> tables


class _RowBuffer:
    """Accumulates rows column by column and hands them out as ROW_SCHEMA tables."""

    def __init__(self):
        self.columns = [[] for _ in ROW_SCHEMA]

    def __len__(self) -> int:
        return len(self.columns[0])

    def append(self, row: _Row) -> None:
        for column, value in zip(self.columns, row):
            column.append(value)

    def take(self) -> pa.Table:
        arrays = [pa.array(c, type=f.type) for c, f in zip(self.columns, ROW_SCHEMA)]
        self.columns = [[] for _ in ROW_SCHEMA]
        return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)


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


def _rows_of_lines(lines: Iterable[str | bytes], summary: ImportSummary) -> Iterator[_Row]:
    """Rows of JSON lines; every dropped record is counted in `summary`."""
    for line in lines:
        try:
            records = _records_of_line(line)
        except DroppedRecord as drop:
            summary.drop(drop.reason)
            continue
        for record in records:
            try:
                row = row_from_record(record)
            except DroppedRecord as drop:
                summary.drop(drop.reason)
                continue
            except Exception:  # noqa: BLE001 - a bad line must never stop an import
                summary.drop("unexpected_error")
                continue
            summary.kept += 1
            yield row


def _chunked(rows: Iterable[_Row], chunk_rows: int) -> Iterator[pa.Table]:
    """ROW_SCHEMA tables of exactly `chunk_rows` rows, the last one shorter."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, not {chunk_rows}")
    buffer = _RowBuffer()
    for row in rows:
        buffer.append(row)
        if len(buffer) >= chunk_rows:
            yield buffer.take()
    if len(buffer):
        yield buffer.take()


def iter_line_tables(
    lines: Iterable[str | bytes], summary: ImportSummary, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[pa.Table]:
    """JSON lines -> ROW_SCHEMA tables of `chunk_rows` rows; counts go into `summary`."""
    return _chunked(_rows_of_lines(lines, summary), chunk_rows)


def import_lines(lines: Iterable[str | bytes]) -> tuple[pa.Table, ImportSummary]:
    """JSON lines (one ping result each) -> (ROW_SCHEMA table, summary)."""
    summary = ImportSummary()
    tables = list(iter_line_tables(lines, summary))
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
    src_text, src_version = _pick_source((src,))
    if ip_version not in (4, 6):
        raise DroppedRecord("bad_field")
    if not ip_version == dst_parsed[1] == src_version:
        raise DroppedRecord("address_family_mismatch")
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
            summary.kept += 1
            yield row


# ---------------------------------------------------------------- files


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in _PARQUET_SUFFIXES


def _open_lines(path: Path):
    """Binary line iterator of a JSON-lines file, decompressing `.gz` / `.bz2` by suffix."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    return open(path, "rb")


def _rows_of_files(paths: list[Path], summary: ImportSummary, batch_rows: int) -> Iterator[_Row]:
    for path in paths:
        if _is_parquet(path):
            yield from _rows_of_parquet(path, summary, batch_rows)
        else:
            with _open_lines(path) as f:
                yield from _rows_of_lines(f, summary)


def iter_file_tables(
    paths: Iterable, summary: ImportSummary, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[pa.Table]:
    """Files -> ROW_SCHEMA tables of `chunk_rows` rows (across files), streamed.

    Counts go into `summary`. Raises FileNotFoundError for a missing path before reading.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    return _chunked(_rows_of_files(paths, summary, chunk_rows), chunk_rows)


def import_files(
    paths: Iterable, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[pa.Table, ImportSummary]:
    """JSON lines (plain, .gz, .bz2) and Parquet extracts -> (ROW_SCHEMA table, summary)."""
    summary = ImportSummary()
    tables = list(iter_file_tables(paths, summary, chunk_rows=chunk_rows))
    return _concat(tables), summary
