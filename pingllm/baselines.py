"""Context-free latency baselines fitted on training rows: global median, per-destination median,
Vivaldi network coordinates (Dabek et al., SIGCOMM 2004: 2-D + height).

Every baseline predicts `(rtt_ms[N], p_fail[N])` for pairs given as binary addresses (uint8[N, 16]
plus ip_version[N]); p_fail is the training failure rate (none of them models failures).
Nodes are keyed by (ip version, address bytes): a dual-stack host is two unrelated nodes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pingllm.data import records

BASELINE_NAMES = ("global_median", "per_destination_median", "vivaldi")


def measurements_of_records(recs) -> records.Measurements:
    """Flattens records (CONTRACTS.md) into one row per measurement."""
    recs = list(recs)
    if not recs:
        raise ValueError("no records to fit on")
    n = [len(r["event_time"]) for r in recs]
    return records.Measurements(
        src_addr=np.repeat(np.stack([np.asarray(r["src_addr"], np.uint8) for r in recs]), n, 0),
        dst_addr=np.concatenate([np.asarray(r["dst_addr"], np.uint8) for r in recs]),
        ip_version=np.repeat(np.array([int(r["ip_version"]) for r in recs], np.int8), n),
        event_time=np.concatenate([np.asarray(r["event_time"], np.int64) for r in recs]),
        rtt_ms=np.concatenate([np.asarray(r["rtt_ms"], np.float32) for r in recs]),
    )


def node_keys(addr_Nx16: np.ndarray, ip_version) -> np.ndarray:
    """One void-typed key per (ip version, address): hashable, sortable, vectorised."""
    addr = np.ascontiguousarray(addr_Nx16, np.uint8).reshape(-1, 16)
    ver = np.broadcast_to(np.asarray(ip_version, np.uint8), (len(addr),))
    raw = np.concatenate([ver[:, None], addr], axis=1)
    return np.ascontiguousarray(raw).view(np.dtype((np.void, 17))).ravel()


def _lookup(table_keys: np.ndarray, query_keys: np.ndarray) -> np.ndarray:
    """Index of each query key in the sorted table_keys, -1 where absent."""
    if len(table_keys) == 0:
        return np.full(len(query_keys), -1)
    pos = np.minimum(np.searchsorted(table_keys, query_keys), len(table_keys) - 1)
    return np.where(table_keys[pos] == query_keys, pos, -1)


def _ok(m: records.Measurements) -> np.ndarray:
    return m.rtt_ms >= 0


def failure_rate(m: records.Measurements) -> float:
    return float(np.mean(~_ok(m))) if len(m) else 0.0


@dataclasses.dataclass(frozen=True)
class GlobalMedian:
    rtt_ms: float
    p_fail: float

    def predict(self, src, dst, ip_version) -> tuple[np.ndarray, np.ndarray]:
        n = len(np.asarray(src).reshape(-1, 16))
        return np.full(n, self.rtt_ms), np.full(n, self.p_fail)


def fit_global_median(m: records.Measurements) -> GlobalMedian:
    ok = _ok(m)
    if not ok.any():
        raise ValueError("no successful measurement to fit on")
    return GlobalMedian(float(np.median(m.rtt_ms[ok])), failure_rate(m))


@dataclasses.dataclass(frozen=True)
class PerDestinationMedian:
    keys: np.ndarray  # sorted node keys of destinations
    rtt_ms: np.ndarray  # float64, median successful RTT of each
    fallback: GlobalMedian

    def predict(self, src, dst, ip_version) -> tuple[np.ndarray, np.ndarray]:
        idx = _lookup(self.keys, node_keys(dst, ip_version))
        rtt = np.where(idx >= 0, self.rtt_ms[np.maximum(idx, 0)], self.fallback.rtt_ms)
        return rtt, np.full(len(rtt), self.fallback.p_fail)


def _group_medians(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, median of values per key), vectorised."""
    order = np.lexsort((values, keys))
    keys, values = keys[order], values[order]
    uniq, start, count = np.unique(keys, return_index=True, return_counts=True)
    lo = start + (count - 1) // 2
    hi = start + count // 2
    return uniq, 0.5 * (values[lo].astype(np.float64) + values[hi])


def fit_per_destination_median(m: records.Measurements) -> PerDestinationMedian:
    ok = _ok(m)
    keys, med = _group_medians(node_keys(m.dst_addr[ok], m.ip_version[ok]), m.rtt_ms[ok])
    return PerDestinationMedian(keys, med, fit_global_median(m))


@dataclasses.dataclass(frozen=True)
class VivaldiConfig:
    """Dabek et al.'s constants; rounds x pairs updates, mini-batched for numpy."""

    dims: int = 2
    cc: float = 0.25  # timestep constant
    ce: float = 0.25  # error-smoothing constant
    rounds: int = 60
    batch_pairs: int = 256
    min_height_ms: float = 0.1
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Vivaldi:
    keys: np.ndarray  # sorted node keys
    coords: np.ndarray  # float64[K, dims] (ms)
    heights: np.ndarray  # float64[K] (ms)
    errors: np.ndarray  # float64[K] local error estimates
    fallback: GlobalMedian

    def distance(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return (np.linalg.norm(self.coords[i] - self.coords[j], axis=-1)
                + self.heights[i] + self.heights[j])

    def predict(self, src, dst, ip_version) -> tuple[np.ndarray, np.ndarray]:
        i = _lookup(self.keys, node_keys(src, ip_version))
        j = _lookup(self.keys, node_keys(dst, ip_version))
        known = (i >= 0) & (j >= 0)
        rtt = np.where(known, self.distance(np.maximum(i, 0), np.maximum(j, 0)),
                       self.fallback.rtt_ms)
        return rtt, np.full(len(rtt), self.fallback.p_fail)


def fit_vivaldi(m: records.Measurements, config: VivaldiConfig | None = None) -> Vivaldi:
    """Vivaldi on each training pair's minimum successful RTT (the propagation-like part).

    Each round visits every pair once in a seeded order, in mini-batches; both endpoints move
    (offline fit: each sample is i measuring j and j measuring i). A node that occurs several
    times in a mini-batch moves by the mean of its updates, so popular destinations (anycast)
    do not take one huge summed step.
    """
    config = config or VivaldiConfig()
    ok = _ok(m)
    src_k = node_keys(m.src_addr[ok], m.ip_version[ok])
    dst_k = node_keys(m.dst_addr[ok], m.ip_version[ok])
    keys = np.unique(np.concatenate([src_k, dst_k]))
    i_all, j_all = np.searchsorted(keys, src_k), np.searchsorted(keys, dst_k)
    pair = i_all.astype(np.int64) * len(keys) + j_all
    pairs, inverse = np.unique(pair, return_inverse=True)
    rtt = np.full(len(pairs), np.inf)
    np.minimum.at(rtt, inverse, m.rtt_ms[ok].astype(np.float64))
    pi, pj = pairs // len(keys), pairs % len(keys)
    keep = pi != pj
    pi, pj, rtt = pi[keep], pj[keep], np.maximum(rtt[keep], 1e-3)

    rng = np.random.default_rng(config.seed)
    k = len(keys)
    x = rng.normal(0.0, 1.0, (k, config.dims))
    h = np.full(k, config.min_height_ms)
    err = np.ones(k)
    # Sample i -> j and j -> i: each endpoint moves against the other.
    a_all, b_all, r_all = np.concatenate([pi, pj]), np.concatenate([pj, pi]), np.tile(rtt, 2)
    n = len(a_all)
    for _ in range(config.rounds):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_pairs):
            s = order[start:start + config.batch_pairs]
            a, b, r = a_all[s], b_all[s], r_all[s]
            diff = x[a] - x[b]
            norm_xy = np.linalg.norm(diff, axis=1)
            dist = norm_xy + h[a] + h[b]
            w = err[a] / np.maximum(err[a] + err[b], 1e-12)
            rel = np.abs(dist - r) / r
            new_err = rel * config.ce * w + err[a] * (1.0 - config.ce * w)
            step = config.cc * w * (r - dist)
            # Unit vector of the height vector [x_a - x_b, h_a + h_b]; a random direction when
            # two nodes coincide, as in the paper.
            coincide = norm_xy < 1e-9
            if coincide.any():
                diff[coincide] = rng.normal(0.0, 1.0, (int(coincide.sum()), config.dims))
                norm_xy = np.where(coincide, np.linalg.norm(diff, axis=1), norm_xy)
                dist = norm_xy + h[a] + h[b]
            dx = (step / dist)[:, None] * diff
            dh = step * (h[a] + h[b]) / dist
            count = np.bincount(a, minlength=k).astype(np.float64)
            sum_dx = np.zeros_like(x)
            np.add.at(sum_dx, a, dx)
            sum_dh = np.bincount(a, weights=dh, minlength=k)
            sum_err = np.bincount(a, weights=new_err, minlength=k)
            moved = count > 0
            x[moved] += sum_dx[moved] / count[moved, None]
            h[moved] = np.maximum(h[moved] + sum_dh[moved] / count[moved], config.min_height_ms)
            err[moved] = np.clip(sum_err[moved] / count[moved], 1e-3, 1.0)
    return Vivaldi(keys, x, h, err, fit_global_median(m))


@dataclasses.dataclass(frozen=True)
class Baselines:
    global_median: GlobalMedian
    per_destination_median: PerDestinationMedian
    vivaldi: Vivaldi

    def predict(self, name: str, src, dst, ip_version) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, name).predict(src, dst, ip_version)


def fit_all(m: records.Measurements, vivaldi: VivaldiConfig | None = None) -> Baselines:
    return Baselines(fit_global_median(m), fit_per_destination_median(m), fit_vivaldi(m, vivaldi))
