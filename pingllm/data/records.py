"""Rows -> records: each record is a time-ordered chunk of one source's measurements.

A record is what the dataset stores and Grain reads at random (CONTRACTS.md): a
dict of numpy arrays `src_addr uint8[16]`, `ip_version int8`, `dst_addr uint8[N, 16]`,
`event_time int64[N]` (Unix seconds, non-decreasing), `rtt_ms float32[N]`.
Everything here is vectorised over rows; Python loops run once per record at most.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pingllm.data import schema, splitmix, tokens

RECORD_KEYS = ("src_addr", "ip_version", "dst_addr", "event_time", "rtt_ms")
DEFAULT_TEST_FRACTION = 0.1
# Changing the salt reshuffles which (source, destination) pairs are held out.
DEFAULT_SPLIT_SALT = "pingllm-split-v1"


@dataclasses.dataclass(frozen=True)
class Measurements:
    """Rows in binary form (addresses as uint8[N, 16]), one entry per row."""

    src_addr: np.ndarray  # uint8[N, 16]
    dst_addr: np.ndarray  # uint8[N, 16]
    ip_version: np.ndarray  # int8[N]
    event_time: np.ndarray  # int64[N], Unix seconds
    rtt_ms: np.ndarray  # float32[N], -1 = failed

    def __len__(self) -> int:
        return len(self.event_time)

    def take(self, index: np.ndarray) -> Measurements:
        return Measurements(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def _parse_column(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Text addresses -> (uint8[N, 16], int8[N]); parses each distinct address once."""
    encoded = pc.dictionary_encode(column).combine_chunks()
    unique_bytes, unique_versions = schema.parse_addresses(encoded.dictionary.to_pylist())
    index = encoded.indices.to_numpy(zero_copy_only=False)
    return unique_bytes[index], unique_versions[index]


def measurements_from_table(table: pa.Table) -> Measurements:
    """ROW_SCHEMA table -> Measurements; raises if an address disagrees with `ip_version`."""
    table = table.select(schema.ROW_SCHEMA.names).cast(schema.ROW_SCHEMA)
    src, src_version = _parse_column(table["src_addr"])
    dst, dst_version = _parse_column(table["dst_addr"])
    ip_version = table["ip_version"].to_numpy().astype(np.int8)
    bad = (src_version != ip_version) | (dst_version != ip_version)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} rows have an address whose family differs from ip_version"
        )
    micros = table["event_time"].cast(pa.int64()).to_numpy()
    return Measurements(
        src_addr=src,
        dst_addr=dst,
        ip_version=ip_version,
        event_time=np.floor_divide(micros, 1_000_000).astype(np.int64),
        rtt_ms=table["rtt"].to_numpy().astype(np.float32),
    )


def _address_words(addr_Nx16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8[N, 16] -> (high, low) big-endian uint64 words, for sorting and hashing."""
    words = np.ascontiguousarray(addr_Nx16).view(">u8").astype(np.uint64)
    return words[:, 0], words[:, 1]


def _salt_word(salt: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "big"))


def split_of_pairs(
    src_bytes: np.ndarray,
    dst_bytes: np.ndarray,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    salt: str = DEFAULT_SPLIT_SALT,
) -> np.ndarray:
    """bool[N]: True where the (source, destination) pair belongs to the test split.

    A stable hash (never Python's salted `hash()`) of the 32 address bytes, so a pair
    lands in the same split on every run, host and row order.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    h = np.full(len(src_bytes), _salt_word(salt), np.uint64)
    with np.errstate(over="ignore"):
        for word in (*_address_words(src_bytes), *_address_words(dst_bytes)):
            h = splitmix.mix64(h ^ word) + np.uint64(splitmix.GOLDEN)
    u = splitmix.unit(splitmix.mix64(h))
    return u < test_fraction


def measurements_per_record(ip_version: int, max_target_length: int) -> int:
    """The most measurements whose worst-case tokenization fits `max_target_length`."""
    n = tokens.max_measurements(ip_version, max_target_length)
    if n < 1:
        raise ValueError(
            f"max_target_length={max_target_length} cannot hold one IPv{ip_version} measurement"
        )
    return n


def _records(m: Measurements, max_target_length: int) -> Iterator[dict[str, np.ndarray]]:
    if len(m) == 0:
        return
    src_hi, src_lo = _address_words(m.src_addr)
    dst_hi, dst_lo = _address_words(m.dst_addr)
    # Ties in time break on destination then RTT, so records do not depend on row order.
    # A source is its bytes and its family: IPv4 32.1.13.184 and IPv6 2001:db8:: share bytes.
    order = np.lexsort((m.rtt_ms, dst_lo, dst_hi, m.event_time, m.ip_version, src_lo, src_hi))
    m = m.take(order)
    src_hi, src_lo = src_hi[order], src_lo[order]

    new_source = np.ones(len(m), bool)
    new_source[1:] = ((src_hi[1:] != src_hi[:-1]) | (src_lo[1:] != src_lo[:-1])
                      | (m.ip_version[1:] != m.ip_version[:-1]))
    starts = np.flatnonzero(new_source)
    counts = np.diff(np.append(starts, len(m)))
    per_record = {v: measurements_per_record(v, max_target_length) for v in (4, 6)}
    capacity = np.where(m.ip_version[starts] == 4, per_record[4], per_record[6])
    # Equal-sized chunks (sizes differ by at most one) rather than full ones and a stub.
    chunks = -(-counts // capacity)
    source_of_row = np.repeat(np.arange(len(starts)), counts)
    rank = np.arange(len(m)) - starts[source_of_row]
    chunk_of_row = rank * chunks[source_of_row] // counts[source_of_row]
    new_record = new_source.copy()
    new_record[1:] |= chunk_of_row[1:] != chunk_of_row[:-1]
    bounds = np.append(np.flatnonzero(new_record), len(m))
    for begin, end in itertools.pairwise(bounds):
        yield {
            "src_addr": m.src_addr[begin].copy(),
            "ip_version": np.int8(m.ip_version[begin]),
            "dst_addr": m.dst_addr[begin:end].copy(),
            "event_time": m.event_time[begin:end].copy(),
            "rtt_ms": m.rtt_ms[begin:end].copy(),
        }


def rows_to_records(table: pa.Table, max_target_length: int) -> Iterator[dict[str, np.ndarray]]:
    """Records (one source, time order, worst case fits) from a ROW_SCHEMA table.

    Records come out sorted by (source address, time): deterministic for given rows.
    """
    return _records(measurements_from_table(table), max_target_length)


def rows_to_split_records(
    table: pa.Table,
    max_target_length: int,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    salt: str = DEFAULT_SPLIT_SALT,
    later_from_s: int | None = None,
) -> dict[str, Iterator[dict[str, np.ndarray]]]:
    """{'train': records, 'test': records}: rows split by pair first, then chunked per split.

    With `later_from_s` (Unix seconds), every row at or after it, whatever its pair, goes to a
    third split 'later' (train on earlier days, ask about later ones); the earlier rows are
    split by pair as before.
    """
    m = measurements_from_table(table)
    later = np.zeros(len(m), bool) if later_from_s is None else m.event_time >= later_from_s
    test = split_of_pairs(m.src_addr, m.dst_addr, test_fraction, salt) & ~later
    out = {
        "train": _records(m.take(~test & ~later), max_target_length),
        "test": _records(m.take(test), max_target_length),
    }
    if later_from_s is not None:
        out["later"] = _records(m.take(later), max_target_length)
    return out
