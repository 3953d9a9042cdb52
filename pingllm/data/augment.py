"""Training-window augmentations that make windows look like a held-out-pair query.

A held-out pair is asked with a context of the source's *other* destinations (the pair itself
never appears), while most results of a plain training window repeat a pair seen earlier in
the same window, and the source's address lets the model memorise each training pair
(docs/evaluation.md). Two record -> record transforms, each drawn per window with a pure
function of (seed, window index) so a resumed run sees the same windows:

- latest per destination: the window keeps only each destination's latest measurement, so
  every result must be predicted from the other destinations before it (nothing to copy);
- anonymise the source: the source address becomes random bytes (same family), so the
  window's results must be explained from its context and destinations, not recalled from
  the source's identity.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pingllm.data import splitmix, tokens

_STREAM_ANONYMISE = 102
_STREAM_DEDUPE = 103


def _uniforms(seed: int, window_index: int, stream: int, n: int) -> np.ndarray:
    """n uniforms in [0, 1) keyed by (seed, window index, stream); NumPy-version independent."""
    key = int(tokens.stream_keys(seed, [window_index], stream)[0])
    with np.errstate(over="ignore"):
        z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(splitmix.GOLDEN) + np.uint64(key)
    return splitmix.unit(splitmix.mix64_inplace(z))


def latest_of_each_destination(dst_addr: np.ndarray) -> np.ndarray:
    """Sorted row indices of each destination's last row in uint8[N, 16]."""
    keys = np.ascontiguousarray(dst_addr, np.uint8).view(np.dtype((np.void, 16))).ravel()
    # np.unique's first index over the reversed rows = each destination's last row.
    _, last_reversed = np.unique(keys[::-1], return_index=True)
    return np.sort(len(keys) - 1 - last_reversed)


def latest_per_destination(record: dict) -> dict:
    """Keeps only the latest measurement of every destination (time order kept)."""
    keep = latest_of_each_destination(np.asarray(record["dst_addr"]))
    if len(keep) == len(record["event_time"]):
        return record
    out = dict(record)
    for k in ("dst_addr", "event_time", "rtt_ms"):
        out[k] = np.asarray(record[k])[keep]
    return out


def anonymise_source(record: dict, u_bytes: np.ndarray) -> dict:
    """The source address replaced by random bytes of its family (from 16 uniforms)."""
    addr = np.zeros(16, np.uint8)
    n = 4 if int(record["ip_version"]) == 4 else 16
    addr[:n] = (np.asarray(u_bytes[:n]) * 256).astype(np.uint8)
    out = dict(record)
    out["src_addr"] = addr
    return out


@dataclasses.dataclass(frozen=True)
class Augment:
    """Grain map over (window index, record): both augmentations at their rates (validated
    where they enter, DataConfig)."""

    seed: int
    dedupe_rate: float = 0.0
    anonymise_source_rate: float = 0.0

    @property
    def active(self) -> bool:
        return self.dedupe_rate > 0 or self.anonymise_source_rate > 0

    def __call__(self, element: tuple[int, dict]) -> tuple[int, dict]:
        position, record = element
        if self.dedupe_rate > 0 and _uniforms(self.seed, position, _STREAM_DEDUPE, 1)[0] < \
                self.dedupe_rate:
            record = latest_per_destination(record)
        if self.anonymise_source_rate > 0:
            u = _uniforms(self.seed, position, _STREAM_ANONYMISE, 17)
            if u[0] < self.anonymise_source_rate:
                record = anonymise_source(record, u[1:])
        return position, record
