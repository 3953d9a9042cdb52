"""Baselines: exact medians and failure rates, per-destination fallback, Vivaldi recovers a
planar-plus-height latency space and is deterministic for a seed."""

import numpy as np
import pytest

from pingllm.data import records
from pingllm.eval import baselines


def _addr(i: int) -> np.ndarray:
    a = np.zeros(16, np.uint8)
    a[:4] = [10, 0, i // 256, i % 256]
    return a


def _m(src, dst, rtt, version=4) -> records.Measurements:
    n = len(rtt)
    return records.Measurements(
        src_addr=np.stack([_addr(s) for s in src]), dst_addr=np.stack([_addr(d) for d in dst]),
        ip_version=np.full(n, version, np.int8), event_time=np.arange(n, dtype=np.int64),
        rtt_ms=np.asarray(rtt, np.float32))


def test_global_median_and_failure_rate():
    m = _m([0, 0, 1, 1, 2], [5, 6, 5, 6, 5], [10.0, 30.0, -1.0, 20.0, 1000.0])
    fit = baselines.fit_global_median(m)
    assert fit.rtt_ms == 25.0  # median of 10, 20, 30, 1000; the failure is not an RTT
    assert fit.p_fail == 0.2
    rtt, p_fail = fit.predict(np.stack([_addr(0)] * 3), np.stack([_addr(9)] * 3), [4, 4, 4])
    assert rtt.tolist() == [25.0] * 3 and p_fail.tolist() == [0.2] * 3


def test_per_destination_median_with_fallback():
    m = _m([0, 1, 2, 0, 1, 0], [5, 5, 5, 6, 6, 7], [10.0, 12.0, 50.0, 100.0, 200.0, -1.0])
    fit = baselines.fit_per_destination_median(m)
    dst = np.stack([_addr(5), _addr(6), _addr(7), _addr(8)])
    rtt, p_fail = fit.predict(np.stack([_addr(3)] * 4), dst, [4, 4, 4, 4])
    # dst 5: median(10, 12, 50); dst 6: mean of the middle two; 7 only failed, 8 unseen: global
    assert rtt.tolist() == [12.0, 150.0, 50.0, 50.0]
    assert np.allclose(p_fail, 1 / 6)
    # The same bytes as IPv6 are another node: global fallback.
    rtt6, _ = fit.predict(np.stack([_addr(3)]), np.stack([_addr(5)]), [6])
    assert rtt6.tolist() == [50.0]


def _planar_world(n=40, seed=1):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    h = rng.uniform(1, 10, n)
    i, j = np.triu_indices(n, 1)
    rtt = np.linalg.norm(xy[i] - xy[j], axis=1) + h[i] + h[j]
    return i, j, rtt


def test_vivaldi_recovers_a_height_vector_space():
    i, j, rtt = _planar_world()
    held = (np.arange(len(rtt)) % 5) == 0  # a fifth of the pairs never seen in the fit
    # Each training pair measured three times; the fit uses the minimum.
    reps = np.repeat(~held, 3)
    noisy = np.repeat(rtt, 3) * (1 + np.tile([0.0, 0.05, 0.2], len(rtt)))
    m = _m(np.repeat(i, 3)[reps], np.repeat(j, 3)[reps], noisy[reps])
    fit = baselines.fit_vivaldi(m)
    pred, p_fail = fit.predict(np.stack([_addr(a) for a in i[held]]),
                               np.stack([_addr(b) for b in j[held]]), 4)
    rel = np.abs(pred - rtt[held]) / rtt[held]
    assert np.median(rel) < 0.08, np.median(rel)
    assert np.all(p_fail == 0.0)
    assert np.all(fit.heights >= baselines.VivaldiConfig().min_height_ms)
    # Seeded: the same fit twice.
    again = baselines.fit_vivaldi(m)
    assert np.array_equal(again.coords, fit.coords) and np.array_equal(again.heights, fit.heights)
    # Unknown node: the global median.
    rtt_u, _ = fit.predict(np.stack([_addr(999)]), np.stack([_addr(0)]), [4])
    assert rtt_u[0] == fit.fallback.rtt_ms


def test_measurements_of_records_and_fit_all():
    recs = [
        {"src_addr": _addr(1), "ip_version": np.int8(4), "dst_addr": np.stack([_addr(2), _addr(3)]),
         "event_time": np.array([5, 9]), "rtt_ms": np.array([4.0, -1.0], np.float32)},
        {"src_addr": _addr(2), "ip_version": np.int8(4), "dst_addr": np.stack([_addr(1)]),
         "event_time": np.array([7]), "rtt_ms": np.array([6.0], np.float32)},
    ]
    m = baselines.measurements_of_records(recs)
    assert m.src_addr[:, 3].tolist() == [1, 1, 2] and m.dst_addr[:, 3].tolist() == [2, 3, 1]
    assert m.event_time.tolist() == [5, 9, 7] and m.rtt_ms.tolist() == [4.0, -1.0, 6.0]
    fitted = baselines.fit_all(m)
    for name in baselines.BASELINE_NAMES:
        rtt, p_fail = fitted.predict(name, m.src_addr, m.dst_addr, m.ip_version)
        assert rtt.shape == (3,) and np.all(rtt > 0) and np.allclose(p_fail, 1 / 3)


def _low_rank_world(n_src=40, n_dst=50, rank=2, seed=3):
    """ln RTT = mu + a_src + b_dst + U V^T (planted), sources 0.., destinations 1000.."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(0, 0.5, (n_src, rank)), rng.normal(0, 0.5, (n_dst, rank))
    a, b = rng.normal(0, 0.5, n_src), rng.normal(0, 0.5, n_dst)
    log_rtt = 3.5 + a[:, None] + b[None, :] + u @ v.T
    i, j = np.meshgrid(np.arange(n_src), np.arange(n_dst), indexing="ij")
    return i.ravel(), j.ravel() + 1000, np.exp(log_rtt.ravel())


def test_matrix_factorisation_recovers_a_planted_low_rank_matrix():
    i, j, rtt = _low_rank_world()
    held = np.random.default_rng(0).random(len(rtt)) < 0.3
    # Two pings per training pair, +-5% around the planted value: the pair's median is exact.
    m = _m(np.repeat(i[~held], 2), np.repeat(j[~held], 2),
           np.repeat(rtt[~held], 2) * np.tile([0.95, 1.05], (~held).sum()))
    fit = baselines.fit_matrix_factorisation(m)
    assert fit.rank >= 2  # cross-validation finds the planted rank (or more)
    pred, _ = fit.predict(np.stack([_addr(a) for a in i[held]]),
                          np.stack([_addr(b) for b in j[held]]), 4)
    rel = np.abs(pred - rtt[held]) / rtt[held]
    assert np.median(rel) < 0.03, np.median(rel)
    # The per-destination median cannot: the source terms are real.
    pd, _ = baselines.fit_per_destination_median(m).predict(
        np.stack([_addr(a) for a in i[held]]), np.stack([_addr(b) for b in j[held]]), 4)
    assert np.median(np.abs(pd - rtt[held]) / rtt[held]) > 0.2
    # Unknown source: mu + destination bias only, finite; both unknown: exp(mu).
    rtt_u, _ = fit.predict(np.stack([_addr(999), _addr(998)]),
                           np.stack([_addr(1000), _addr(997)]), [4, 4])
    assert np.isfinite(rtt_u).all() and rtt_u[1] == pytest.approx(np.exp(fit.mu))


def test_dmfsgd_recovers_a_planted_symmetric_matrix():
    rng = np.random.default_rng(5)
    n, rank = 60, 3
    a = rng.uniform(0.3, 1.0, (n, rank))
    x = a @ a.T  # ln RTT of every pair, symmetric, ~0.8-3
    pairs = np.array([(p, q) for p in range(n) for q in range(p + 1, n)])
    held = rng.random(len(pairs)) < 0.2
    tr = pairs[~held]
    m = _m(tr[:, 0], tr[:, 1], np.exp(x[tr[:, 0], tr[:, 1]]))
    fit = baselines.fit_dmfsgd(m, baselines.DMFSGDConfig(rank=rank + 2))
    te = pairs[held]
    pred, _ = fit.predict(np.stack([_addr(p) for p in te[:, 0]]),
                          np.stack([_addr(q) for q in te[:, 1]]), 4)
    truth = np.exp(x[te[:, 0], te[:, 1]])
    rel = np.abs(pred - truth) / truth
    assert np.median(rel) < 0.10, np.median(rel)
    # Each node keeps at most k neighbours; a node never measured falls back to the median.
    rtt_u, _ = fit.predict(np.stack([_addr(500)]), np.stack([_addr(0)]), [4])
    assert rtt_u[0] == fit.fallback.rtt_ms


def _v4(a, b, c, d) -> np.ndarray:
    x = np.zeros(16, np.uint8)
    x[:4] = [a, b, c, d]
    return x


def test_nearest_neighbour_uses_the_nearest_known_prefix_then_falls_back():
    s1, s2 = _v4(192, 0, 2, 1), _v4(192, 0, 2, 2)
    dst = [_v4(10, 1, 1, 5), _v4(10, 1, 1, 6), _v4(10, 1, 9, 9), _v4(10, 7, 7, 7),
           _v4(10, 1, 1, 5)]
    src = [s1, s1, s1, s1, s2]
    rtt = [20.0, 22.0, 80.0, 300.0, 500.0]
    m = records.Measurements(src_addr=np.stack(src), dst_addr=np.stack(dst),
                             ip_version=np.full(5, 4, np.int8),
                             event_time=np.arange(5, dtype=np.int64),
                             rtt_ms=np.asarray(rtt, np.float32))
    fit = baselines.fit_nearest_neighbour(m)
    queries = [(s1, _v4(10, 1, 1, 5)),  # the pair itself (/32)
               (s1, _v4(10, 1, 1, 77)),  # same /24: median(20, 22)
               (s1, _v4(10, 1, 200, 1)),  # same /16: median(20, 22, 80)
               (s1, _v4(10, 9, 9, 9)),  # same /8: all four of s1
               (_v4(8, 8, 8, 8), _v4(10, 1, 1, 5)),  # unknown source: per-destination
               (_v4(8, 8, 8, 8), _v4(11, 0, 0, 1))]  # nothing: global median
    got, level = fit.predict_with_level(np.stack([q[0] for q in queries]),
                                        np.stack([q[1] for q in queries]), 4)
    assert got.tolist() == [20.0, 21.0, 22.0, 51.0, 260.0, 80.0]
    assert level.tolist() == [0, 1, 2, 3, 4, 5]
    # IPv6 prefixes: /48 groups, the same bytes as IPv4 are another family.
    rtt6, lvl6 = fit.predict_with_level(np.stack([s1]), np.stack([_v4(10, 1, 1, 5)]), [6])
    assert lvl6.tolist() == [5] and rtt6[0] == 80.0


def test_out_of_fold_residuals_are_errors_on_unseen_pairs():
    i, j, rtt = _low_rank_world(seed=4)
    m = _m(i, j, rtt)
    fitted = baselines.fit_all(m, names=("matrix_factorisation",))
    res = baselines.out_of_fold_log_residuals_all(
        m, fitted, ("global_median", "matrix_factorisation"), max_samples=300)
    res_gm, res_mf = res["global_median"], res["matrix_factorisation"]
    assert len(res_mf) == 300 and np.all(np.diff(res_mf) >= 0)
    # The left-out fifth of the pairs shares no unordered pair with the refit's rows.
    train, test = baselines.held_out_pair_split(m)
    assert len(test) == pytest.approx(0.2 * len(rtt), rel=0.25)

    def pairs(rows):
        a = m.src_addr[rows, 3].astype(int) + 256 * m.src_addr[rows, 2].astype(int)
        b = m.dst_addr[rows, 3].astype(int) + 256 * m.dst_addr[rows, 2].astype(int)
        return set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))
    assert not pairs(train) & pairs(test)
    # MF generalises to unseen pairs, the global median does not.
    assert np.median(np.abs(res_mf)) < 0.2 * np.median(np.abs(res_gm))
