"""The measurement row (docs/data_rules.md §1) and binary address helpers."""

from __future__ import annotations

import ipaddress

import numpy as np
import pyarrow as pa

ROW_SCHEMA = pa.schema(
    [
        ("msm_id", pa.int64()),
        ("prb_id", pa.int64()),
        ("event_time", pa.timestamp("us", tz="UTC")),
        ("src_addr", pa.string()),
        ("dst_addr", pa.string()),
        ("ip_version", pa.int8()),
        ("rtt", pa.float32()),
    ]
)

FAILED_RTT = -1.0


class AddressError(ValueError):
    """An address that is not IPv4 or IPv6 text."""


def parse_address(text: str) -> tuple[np.ndarray, int]:
    """One address as (uint8[16], ip_version); IPv4 fills bytes 0..3."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except (ValueError, AttributeError) as e:
        raise AddressError(f"not an IP address: {text!r}") from e
    out = np.zeros(16, np.uint8)
    packed = addr.packed
    out[: len(packed)] = np.frombuffer(packed, np.uint8)
    return out, addr.version


def parse_addresses(texts) -> tuple[np.ndarray, np.ndarray]:
    """Many addresses as (uint8[N, 16], int8[N] ip versions)."""
    texts = list(texts)
    out = np.zeros((len(texts), 16), np.uint8)
    versions = np.zeros(len(texts), np.int8)
    for i, text in enumerate(texts):
        out[i], versions[i] = parse_address(text)
    return out, versions


def format_address(addr: np.ndarray, ip_version: int) -> str:
    """Text form of one binary address."""
    raw = bytes(np.asarray(addr, np.uint8)[: 4 if ip_version == 4 else 16])
    return str(ipaddress.ip_address(raw))


def format_addresses(addrs: np.ndarray, ip_versions) -> list[str]:
    """Text form of uint8[N, 16] addresses."""
    versions = np.broadcast_to(np.asarray(ip_versions), (len(addrs),))
    return [format_address(a, int(v)) for a, v in zip(addrs, versions)]


def empty_table() -> pa.Table:
    return ROW_SCHEMA.empty_table()
