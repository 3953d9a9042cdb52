"""Context-free latency baselines fitted on training rows: global median, per-destination median,
Vivaldi network coordinates (Dabek et al., SIGCOMM 2004: 2-D + height), biased matrix
factorisation of the ln-RTT matrix (ALS), DMFSGD (Liao et al., IEEE/ACM ToN 2013: decentralised
SGD factorisation) and the nearest known neighbour (same source, the destination's nearest known
prefix).

Every baseline predicts `(rtt_ms[N], p_fail[N])` for pairs given as binary addresses (uint8[N, 16]
plus ip_version[N]); p_fail is the training failure rate (none of them models failures).
Nodes are keyed by (ip version, address bytes): a dual-stack host is two unrelated nodes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pingllm.data import records


def measurements_of_records(recs) -> records.Measurements:
    """Flattens records (docs/CONTRACTS.md) into one row per measurement."""
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


# ---- the (source, destination) log-RTT matrix ----


@dataclasses.dataclass(frozen=True)
class PairTable:
    """Training pairs as host indices with each pair's median ln RTT (ms)."""

    keys: np.ndarray  # sorted node keys of every host (sources and destinations)
    src: np.ndarray  # int64[P] host index
    dst: np.ndarray
    log_rtt: np.ndarray  # float64[P]


def pair_table(m: records.Measurements) -> PairTable:
    """One entry per (source, destination) with a reply: the median of its ln RTTs."""
    ok = _ok(m)
    src_k = node_keys(m.src_addr[ok], m.ip_version[ok])
    dst_k = node_keys(m.dst_addr[ok], m.ip_version[ok])
    keys = np.unique(np.concatenate([src_k, dst_k]))
    pair = np.searchsorted(keys, src_k).astype(np.int64) * len(keys) + np.searchsorted(keys, dst_k)
    log_rtt = np.log(np.maximum(m.rtt_ms[ok].astype(np.float64), 1e-3))
    uniq, med = _group_medians(pair, log_rtt)
    return PairTable(keys, uniq // len(keys), uniq % len(keys), med)


def _symmetric(t: PairTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values) with every pair in both orientations (RTT is symmetric)."""
    keep = t.src != t.dst
    s, d, y = t.src[keep], t.dst[keep], t.log_rtt[keep]
    return np.concatenate([s, d]), np.concatenate([d, s]), np.concatenate([y, y])


@dataclasses.dataclass(frozen=True)
class MatrixFactorisationConfig:
    """Biased MF of ln RTT: mu + b_src + c_dst + u_src . v_dst, ridge-regularised, by ALS.

    rank = 0 chooses (rank, ridge) from ranks x ridges by cross-validation over training pairs.
    """

    rank: int = 0
    ridge: float = 1.0
    iterations: int = 15
    ranks: tuple[int, ...] = (1, 2, 4, 8)
    ridges: tuple[float, ...] = (0.3, 1.0, 3.0)
    folds: int = 3
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class MatrixFactorisation:
    keys: np.ndarray  # sorted host keys (rows and columns share them)
    mu: float
    row_bias: np.ndarray  # float64[K]
    col_bias: np.ndarray
    row_factors: np.ndarray  # float64[K, rank]
    col_factors: np.ndarray
    rank: int
    ridge: float
    fallback: GlobalMedian

    def log_predict(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """ln RTT of host index pairs; -1 (unknown) contributes no bias and no factor."""
        def take(a, idx):
            return np.where((idx >= 0).reshape((-1,) + (1,) * (a.ndim - 1)),
                            a[np.maximum(idx, 0)], 0.0)
        return (self.mu + take(self.row_bias, i) + take(self.col_bias, j)
                + np.sum(take(self.row_factors, i) * take(self.col_factors, j), axis=1))

    def predict(self, src, dst, ip_version) -> tuple[np.ndarray, np.ndarray]:
        i = _lookup(self.keys, node_keys(src, ip_version))
        j = _lookup(self.keys, node_keys(dst, ip_version))
        rtt = np.exp(self.log_predict(i, j))
        return rtt, np.full(len(rtt), self.fallback.p_fail)


def _ridge_side(idx, n, feats, target, ridge):
    """Per index: argmin_w sum (target - feats . w)^2 + ridge |w|^2 (batched normal equations)."""
    d = feats.shape[1]
    outer = (feats[:, :, None] * feats[:, None, :]).reshape(len(feats), d * d)
    a = np.stack([np.bincount(idx, weights=outer[:, k], minlength=n) for k in range(d * d)], 1)
    a = a.reshape(n, d, d) + ridge * np.eye(d)
    rhs = np.stack([np.bincount(idx, weights=feats[:, k] * target, minlength=n)
                    for k in range(d)], 1)
    return np.linalg.solve(a, rhs[..., None])[..., 0]


def _als(rows, cols, y, n, rank, ridge, iterations, seed):
    """(mu, row_bias, col_bias, U, V) of biased MF on entries (rows, cols, y) over n hosts."""
    rng = np.random.default_rng(seed)
    mu = float(np.mean(y))
    b, c = np.zeros(n), np.zeros(n)
    u = rng.normal(0.0, 0.1, (n, rank))
    v = rng.normal(0.0, 0.1, (n, rank))
    ones = np.ones((len(y), 1))
    for _ in range(iterations):
        w = _ridge_side(rows, n, np.concatenate([ones, v[cols]], 1), y - mu - c[cols], ridge)
        b, u = w[:, 0], w[:, 1:]
        w = _ridge_side(cols, n, np.concatenate([ones, u[rows]], 1), y - mu - b[rows], ridge)
        c, v = w[:, 0], w[:, 1:]
        mu = float(np.mean(y - b[rows] - c[cols] - np.sum(u[rows] * v[cols], 1)))
    return mu, b, c, u, v


def _undirected_folds(i: np.ndarray, j: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A seeded fold per unordered host pair (a pair and its reverse share a fold)."""
    pair = np.minimum(i, j).astype(np.int64) * (int(max(i.max(), j.max())) + 1) + np.maximum(i, j)
    uniq, inverse = np.unique(pair, return_inverse=True)
    return np.random.default_rng(seed).integers(0, folds, len(uniq))[inverse]


def fit_matrix_factorisation(m: records.Measurements,
                             config: MatrixFactorisationConfig | None = None
                             ) -> MatrixFactorisation:
    """Biased MF of the pairs' median ln RTT, both orientations of each pair as entries."""
    config = config or MatrixFactorisationConfig()
    t = pair_table(m)
    rows, cols, y = _symmetric(t)
    if len(y) == 0:
        raise ValueError("no pair of distinct hosts with a reply to fit on")
    n = len(t.keys)
    rank, ridge = config.rank, config.ridge
    if rank <= 0:  # cross-validated choice: median |ln error| on held-out pairs
        fold = _undirected_folds(rows, cols, config.folds, config.seed)
        best = None
        for r in config.ranks:
            for lam in config.ridges:
                errs = []
                for f in range(config.folds):
                    tr = fold != f
                    if tr.all() or not tr.any():
                        continue
                    mu, b, c, u, v = _als(rows[tr], cols[tr], y[tr], n, r, lam,
                                          config.iterations, config.seed)
                    seen_r = np.bincount(rows[tr], minlength=n) > 0
                    seen_c = np.bincount(cols[tr], minlength=n) > 0
                    i, j = rows[~tr], cols[~tr]
                    pred = (mu + np.where(seen_r[i], b[i], 0) + np.where(seen_c[j], c[j], 0)
                            + np.sum(u[i] * v[j], 1))
                    errs.append(np.abs(pred - y[~tr]))
                if errs:
                    score = float(np.median(np.concatenate(errs)))
                    if best is None or score < best[0]:
                        best = (score, r, lam)
        _, rank, ridge = best or (0.0, min(config.ranks), config.ridge)
    mu, b, c, u, v = _als(rows, cols, y, n, rank, ridge, config.iterations, config.seed)
    seen_r = np.bincount(rows, minlength=n) > 0
    seen_c = np.bincount(cols, minlength=n) > 0
    return MatrixFactorisation(t.keys, mu, np.where(seen_r, b, 0.0), np.where(seen_c, c, 0.0),
                               u * seen_r[:, None], v * seen_c[:, None], int(rank), float(ridge),
                               fit_global_median(m))


# ---- DMFSGD (Liao, Du, Geurts, Leduc: IEEE/ACM ToN 2013) ----


@dataclasses.dataclass(frozen=True)
class DMFSGDConfig:
    """Each node i keeps an out vector u_i and an in vector v_i (x_ij ~ u_i . v_j) and updates
    only them, by SGD on its own measurements with at most `neighbours` others (the paper's k),
    L2 loss plus ridge (the paper's lambda); here on ln RTT so the loss weighs relative errors."""

    rank: int = 10
    neighbours: int = 32
    learning_rate: float = 0.05
    ridge: float = 0.1
    rounds: int = 3000
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DMFSGD:
    keys: np.ndarray  # sorted host keys
    out_vectors: np.ndarray  # float64[K, rank]
    in_vectors: np.ndarray
    known: np.ndarray  # bool[K]: the node took part (has a neighbour)
    fallback: GlobalMedian

    def predict(self, src, dst, ip_version) -> tuple[np.ndarray, np.ndarray]:
        i = _lookup(self.keys, node_keys(src, ip_version))
        j = _lookup(self.keys, node_keys(dst, ip_version))
        ok = (i >= 0) & (j >= 0)
        ok[ok] = self.known[i[ok]] & self.known[j[ok]]
        ii, jj = np.maximum(i, 0), np.maximum(j, 0)
        log_rtt = np.sum(self.out_vectors[ii] * self.in_vectors[jj], axis=1)
        rtt = np.where(ok, np.exp(log_rtt), self.fallback.rtt_ms)
        return rtt, np.full(len(rtt), self.fallback.p_fail)


def fit_dmfsgd(m: records.Measurements, config: DMFSGDConfig | None = None) -> DMFSGD:
    """Simulates the decentralised protocol on the training pairs (symmetric: a pair makes each
    end a neighbour of the other). Each round every node measures one random neighbour j
    (the pair's median ln RTT x) and, with j's vectors, takes the paper's two steps:
    u_i <- (1 - eta lambda) u_i + eta (x - u_i.v_j) v_j and v_i <- (1 - eta lambda) v_i +
    eta (x - u_j.v_i) u_j. All nodes step at once from the previous round's vectors."""
    config = config or DMFSGDConfig()
    t = pair_table(m)
    rows, cols, y = _symmetric(t)
    if len(y) == 0:
        raise ValueError("no pair of distinct hosts with a reply to fit on")
    n = len(t.keys)
    rng = np.random.default_rng(config.seed)
    # Neighbour lists: at most k per node, a seeded choice when it measured more.
    order = np.lexsort((rng.random(len(rows)), rows))
    rows, cols, y = rows[order], cols[order], y[order]
    start_all = np.searchsorted(rows, np.arange(n))
    rank_in_row = np.arange(len(rows)) - start_all[rows]
    keep = rank_in_row < config.neighbours
    rows, cols, y = rows[keep], cols[keep], y[keep]
    count = np.bincount(rows, minlength=n)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    active = np.flatnonzero(count > 0)
    scale = np.sqrt(max(float(np.mean(y)), 1e-3) / config.rank)
    u = rng.uniform(0.0, 2.0 * scale, (n, config.rank))
    v = rng.uniform(0.0, 2.0 * scale, (n, config.rank))
    eta, decay = config.learning_rate, 1.0 - config.learning_rate * config.ridge
    for _ in range(config.rounds):
        pick = start[active] + (rng.random(len(active)) * count[active]).astype(np.int64)
        j, x = cols[pick], y[pick]
        err_out = x - np.sum(u[active] * v[j], axis=1)
        err_in = x - np.sum(u[j] * v[active], axis=1)
        new_u = decay * u[active] + eta * err_out[:, None] * v[j]
        new_v = decay * v[active] + eta * err_in[:, None] * u[j]
        u[active], v[active] = new_u, new_v
    return DMFSGD(t.keys, u, v, count > 0, fit_global_median(m))


# ---- nearest known neighbour ----

# Destination prefix lengths tried in order, per IP version: the pair itself, then wider.
PREFIX_LEVELS = {4: (32, 24, 16, 8), 6: (128, 48, 32, 16)}


def _masked(addr_Nx16: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Addresses with all but their first bits[N] bits zeroed."""
    keep = np.clip(np.asarray(bits)[:, None] - 8 * np.arange(16)[None, :], 0, 8)
    mask = ((0xFF00 >> keep) & 0xFF).astype(np.uint8)
    return np.asarray(addr_Nx16, np.uint8) & mask


def _prefix_keys(src, dst, ip_version, level: int) -> np.ndarray:
    """Keys of (source, destination's prefix at PREFIX_LEVELS[version][level])."""
    ver = np.broadcast_to(np.asarray(ip_version, np.int64), (len(dst),))
    bits = np.where(ver == 4, PREFIX_LEVELS[4][level], PREFIX_LEVELS[6][level])
    raw = np.concatenate([ver.astype(np.uint8)[:, None], np.asarray(src, np.uint8),
                          _masked(dst, bits)], axis=1)
    return np.ascontiguousarray(raw).view(np.dtype((np.void, 33))).ravel()


@dataclasses.dataclass(frozen=True)
class NearestNeighbour:
    """The median RTT from the same source to the destination's nearest known prefix."""

    tables: tuple[tuple[np.ndarray, np.ndarray], ...]  # per level: (sorted keys, medians)
    per_destination: PerDestinationMedian

    def predict_with_level(self, src, dst, ip_version) -> tuple[np.ndarray, np.ndarray]:
        """(rtt_ms, level): level k < len(tables) = that prefix level, then per-destination
        median (len(tables)) and the global median (len(tables) + 1)."""
        src = np.asarray(src, np.uint8).reshape(-1, 16)
        dst = np.asarray(dst, np.uint8).reshape(-1, 16)
        n = len(dst)
        rtt = np.full(n, np.nan)
        level = np.full(n, -1)
        for k, (keys, med) in enumerate(self.tables):
            idx = _lookup(keys, _prefix_keys(src, dst, ip_version, k))
            hit = (idx >= 0) & (level < 0)
            rtt[hit], level[hit] = med[idx[hit]], k
        pd_idx = _lookup(self.per_destination.keys, node_keys(dst, ip_version))
        hit = (pd_idx >= 0) & (level < 0)
        rtt[hit], level[hit] = self.per_destination.rtt_ms[pd_idx[hit]], len(self.tables)
        rest = level < 0
        rtt[rest], level[rest] = self.per_destination.fallback.rtt_ms, len(self.tables) + 1
        return rtt, level

    def predict(self, src, dst, ip_version) -> tuple[np.ndarray, np.ndarray]:
        rtt, _ = self.predict_with_level(src, dst, ip_version)
        return rtt, np.full(len(rtt), self.per_destination.fallback.p_fail)


def fit_nearest_neighbour(m: records.Measurements) -> NearestNeighbour:
    ok = _ok(m)
    src, dst, ver, rtt = m.src_addr[ok], m.dst_addr[ok], m.ip_version[ok], m.rtt_ms[ok]
    tables = tuple(_group_medians(_prefix_keys(src, dst, ver, k), rtt)
                   for k in range(len(PREFIX_LEVELS[4])))
    return NearestNeighbour(tables, fit_per_destination_median(m))


# ---- all of them ----

BASELINE_NAMES = ("global_median", "per_destination_median", "vivaldi", "matrix_factorisation",
                  "dmfsgd", "nearest_neighbour")


@dataclasses.dataclass(frozen=True)
class Baselines:
    global_median: GlobalMedian
    per_destination_median: PerDestinationMedian
    vivaldi: Vivaldi
    matrix_factorisation: MatrixFactorisation | None = None
    dmfsgd: DMFSGD | None = None
    nearest_neighbour: NearestNeighbour | None = None

    def predict(self, name: str, src, dst, ip_version) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, name).predict(src, dst, ip_version)

    def refit(self, name: str, m: records.Measurements):
        """The baseline `name` fitted on other rows with this fit's settings (MF keeps the
        rank and ridge it chose), for out-of-fold residuals."""
        if name == "matrix_factorisation":
            chosen = MatrixFactorisationConfig(rank=self.matrix_factorisation.rank,
                                               ridge=self.matrix_factorisation.ridge)
            return fit_matrix_factorisation(m, chosen)
        return _FITTERS[name](m)


_FITTERS = {"global_median": fit_global_median,
            "per_destination_median": fit_per_destination_median,
            "vivaldi": fit_vivaldi, "matrix_factorisation": fit_matrix_factorisation,
            "dmfsgd": fit_dmfsgd, "nearest_neighbour": fit_nearest_neighbour}


def fit_all(m: records.Measurements, vivaldi: VivaldiConfig | None = None, *,
            names: tuple[str, ...] = BASELINE_NAMES) -> Baselines:
    """Every baseline in names (the first three always) on the same training rows; a later
    one that finds nothing to fit on is None."""
    extra = {}
    for name in names:
        if name in ("matrix_factorisation", "dmfsgd", "nearest_neighbour"):
            try:
                extra[name] = _FITTERS[name](m)
            except ValueError:  # nothing it can fit on (e.g. no pair of two distinct hosts)
                extra[name] = None
    return Baselines(fit_global_median(m), fit_per_destination_median(m), fit_vivaldi(m, vivaldi),
                     **extra)


# ---- predictive distributions of point baselines ----


def held_out_pair_split(m: records.Measurements, fraction: float = 0.2,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, left-out rows): a seeded `fraction` of the unordered host pairs out."""
    src_k, dst_k = node_keys(m.src_addr, m.ip_version), node_keys(m.dst_addr, m.ip_version)
    keys = np.unique(np.concatenate([src_k, dst_k]))
    folds = max(2, int(round(1 / fraction)))
    fold = _undirected_folds(np.searchsorted(keys, src_k), np.searchsorted(keys, dst_k),
                             folds, seed)
    return np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)


def out_of_fold_log_residuals_all(m: records.Measurements, fitted: Baselines,
                                  names: tuple[str, ...], *, fraction: float = 0.2,
                                  max_samples: int = 4000, seed: int = 0
                                  ) -> dict[str, np.ndarray]:
    """Per baseline, ln(measured / predicted) of training replies whose (unordered) pair was
    left out of its refit (a seeded fifth of the pairs): the error it makes on a pair it never
    saw, as on held-out pairs. Sorted; at most max_samples (a seeded uniform sample of the
    left-out replies, so pairs weigh by their count, as in the evaluation's queries)."""
    train, test = held_out_pair_split(m, fraction, seed)
    test = test[_ok(m.take(test))]
    if len(test) == 0 or not _ok(m.take(train)).any():
        raise ValueError("too few pairs to leave some out")
    rng = np.random.default_rng(seed)
    test = np.sort(rng.choice(test, size=min(max_samples, len(test)), replace=False))
    rest, held = m.take(train), m.take(test)
    out = {}
    for name in names:
        pred, _ = fitted.refit(name, rest).predict(held.src_addr, held.dst_addr,
                                                   held.ip_version)
        out[name] = np.sort(np.log(np.maximum(held.rtt_ms, 1e-3) / np.maximum(pred, 1e-3)))
    return out


def out_of_fold_log_residuals(m: records.Measurements, fitted: Baselines, name: str,
                              **kwargs) -> np.ndarray:
    """out_of_fold_log_residuals_all for one baseline."""
    return out_of_fold_log_residuals_all(m, fitted, (name,), **kwargs)[name]
