"""augment.py: deduplicated windows and anonymised sources in training, never in eval."""

import dataclasses

import numpy as np
import pytest

from pingllm.data import augment, pipeline, tokens

CONFIG = pipeline.DataConfig(
    source="synthetic_memory", synthetic_rows=3_000, max_target_length=256, global_batch_size=8,
    seed=5, read_threads=1, prefetch_batches=1,
)


def _record(dst_ids, version=4):
    dst = np.zeros((len(dst_ids), 16), np.uint8)
    dst[:, 0] = 10
    dst[:, 3] = dst_ids
    return {
        "src_addr": np.array([192, 0, 2, 1] + [0] * 12, np.uint8),
        "ip_version": np.int8(version),
        "dst_addr": dst,
        "event_time": np.arange(len(dst_ids), dtype=np.int64) * 60 + 1_700_000_000,
        "rtt_ms": np.arange(len(dst_ids), dtype=np.float32) + 1.0,
    }


@pytest.mark.parametrize("version, width", [(4, 4), (6, 16)])
def test_anonymise_source_draws_an_address_of_the_same_family(version, width):
    rec = _record([1, 2], version=version)
    u = np.linspace(0.01, 0.99, 16)
    out = augment.anonymise_source(rec, u)
    np.testing.assert_array_equal(out["src_addr"][:width], (u[:width] * 256).astype(np.uint8))
    assert not out["src_addr"][width:].any()
    for k in ("dst_addr", "event_time", "rtt_ms"):
        np.testing.assert_array_equal(out[k], rec[k])


def test_rates_are_validated():
    with pytest.raises(ValueError, match="dedupe_rate"):
        pipeline.DataConfig(dedupe_rate=1.5)
    with pytest.raises(ValueError, match="anonymise_source_rate"):
        pipeline.DataConfig(anonymise_source_rate=-0.1)


def test_draws_are_a_pure_function_of_seed_and_window():
    a = augment._uniforms(3, 17, augment._STREAM_DEDUPE, 5)
    np.testing.assert_array_equal(a, augment._uniforms(3, 17, augment._STREAM_DEDUPE, 5))
    assert not np.array_equal(a, augment._uniforms(3, 18, augment._STREAM_DEDUPE, 5))
    assert not np.array_equal(a, augment._uniforms(4, 17, augment._STREAM_DEDUPE, 5))
    assert not np.array_equal(a, augment._uniforms(3, 17, augment._STREAM_ANONYMISE, 5))
    assert ((a >= 0) & (a < 1)).all()


def _decoded_rows(config, step):
    batch = pipeline.global_batch(config, step)
    return [tokens.decode_tokens(batch["inputs"][r], int(batch["segment_ids"][r].sum()))
            for r in range(config.global_batch_size)]


def _original_records(step):
    source = pipeline.record_source(CONFIG, "train")
    return [source[pipeline.record_index(CONFIG.seed, step * CONFIG.global_batch_size + r,
                                         len(source))] for r in range(CONFIG.global_batch_size)]


def test_anonymised_windows_keep_everything_but_the_source():
    config = dataclasses.replace(CONFIG, anonymise_source_rate=1.0)
    for step in range(2):
        for rec, measurements in zip(_original_records(step), _decoded_rows(config, step)):
            assert len(measurements) == len(rec["event_time"])
            src = {bytes(m.src_addr) for m in measurements}
            assert len(src) == 1 and src != {bytes(np.asarray(rec["src_addr"]))}
            assert sorted(bytes(m.dst_addr) for m in measurements) == sorted(
                bytes(d) for d in np.asarray(rec["dst_addr"]))


def test_half_the_windows_at_rate_one_half():
    config = dataclasses.replace(CONFIG, anonymise_source_rate=0.5)
    hidden = 0
    for step in range(4):
        for rec, measurements in zip(_original_records(step), _decoded_rows(config, step)):
            hidden += bytes(measurements[0].src_addr) != bytes(np.asarray(rec["src_addr"]))
    assert 8 <= hidden <= 24  # of 32 windows; a fixed draw, so this cannot flake


def test_rates_zero_and_eval_batches_are_untouched():
    plain = pipeline.global_batch(CONFIG, 2)
    same = pipeline.global_batch(dataclasses.replace(CONFIG, dedupe_rate=0.0), 2)
    for k in plain:
        np.testing.assert_array_equal(plain[k], same[k])
    config = dataclasses.replace(CONFIG, dedupe_rate=1.0, anonymise_source_rate=1.0)
    for a, b in zip(pipeline.eval_batches(CONFIG, num_batches=2),
                    pipeline.eval_batches(config, num_batches=2)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(pipeline.global_batch(config, 2)["inputs"], plain["inputs"])


def test_latest_per_destination_keeps_each_destinations_last_measurement_in_time_order():
    rec = _record([1, 2, 1, 3, 2, 1])
    out = augment.latest_per_destination(rec)
    np.testing.assert_array_equal(out["event_time"], rec["event_time"][[3, 4, 5]])
    np.testing.assert_array_equal(out["dst_addr"][:, 3], [3, 2, 1])
    np.testing.assert_array_equal(out["rtt_ms"], rec["rtt_ms"][[3, 4, 5]])
    distinct = _record([1, 2, 3])
    assert augment.latest_per_destination(distinct) is distinct


def test_deduplicated_training_windows_hold_each_destination_once():
    config = dataclasses.replace(CONFIG, dedupe_rate=1.0)
    for step in range(3):
        for rec, measurements in zip(_original_records(step), _decoded_rows(config, step)):
            dst = sorted(bytes(m.dst_addr) for m in measurements)
            assert dst == sorted({bytes(d) for d in np.asarray(rec["dst_addr"])})
            for m in measurements:  # each one is its destination's latest measurement
                rows = np.flatnonzero(np.all(np.asarray(rec["dst_addr"]) == m.dst_addr, axis=1))
                assert m.failed == (rec["rtt_ms"][rows[-1]] < 0)
                if not m.failed:
                    assert m.rtt_code == int(tokens.encode_rtt(rec["rtt_ms"][rows[-1]]))
