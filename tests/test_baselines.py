"""Baselines: exact medians and failure rates, per-destination fallback, Vivaldi recovers a
planar-plus-height latency space and is deterministic for a seed."""

import numpy as np

from pingllm import baselines
from pingllm.data import records


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
