"""Packed training rows (DataConfig.windows_per_row): several whole windows per row, each its
own segment with positions from 0, and the same losses as the windows one per row."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import tiny

from pingllm import config as config_lib
from pingllm import step as step_lib
from pingllm import trainer
from pingllm.cli import dump_batches
from pingllm.data import pipeline, tokens
from pingllm.model import Transformer, dummy_inputs

CONFIG = pipeline.DataConfig(
    source="synthetic_memory", synthetic_rows=3_000, max_target_length=256, global_batch_size=8,
    seed=5, read_threads=1, prefetch_batches=1, dedupe_rate=1.0, windows_per_row=4,
)


def test_pack_windows_keeps_order_and_drops_what_does_not_fit():
    lengths = np.array([3, 5, 4, 2, 6, 1])
    tok = np.zeros((6, 10), np.int32)
    for w, n in enumerate(lengths):
        tok[w, :n] = 100 + 10 * w + np.arange(n)
    fields = (tok > 0).astype(np.int32) * 7
    out_tok, out_fields, segments, positions = pipeline.pack_windows(tok, fields, lengths, 3)
    # Row 0: windows 0 (3) and 1 (5); window 2 (4) would overflow 10 tokens and is dropped.
    np.testing.assert_array_equal(out_tok[0], [100, 101, 102, 110, 111, 112, 113, 114, 0, 0])
    np.testing.assert_array_equal(segments[0], [1, 1, 1, 2, 2, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(positions[0], [0, 1, 2, 0, 1, 2, 3, 4, 0, 0])
    # Row 1: windows 3 (2), 4 (6) and 5 (1) all fit; segment ids name the window's slot.
    np.testing.assert_array_equal(out_tok[1], [130, 131, 140, 141, 142, 143, 144, 145, 150, 0])
    np.testing.assert_array_equal(segments[1], [1, 1, 2, 2, 2, 2, 2, 2, 3, 0])
    np.testing.assert_array_equal(positions[1], [0, 1, 0, 1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(out_fields, (out_tok > 0) * 7)
    with pytest.raises(ValueError, match="rows of 4"):
        pipeline.pack_windows(tok, fields, lengths, 4)


def test_weights_stop_at_every_window_end():
    tok = np.array([[5, 6, 7, 8, 9, 10, 0, 0]], np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0]], np.int32)
    positions = np.array([[0, 1, 2, 0, 1, 0, 0, 0]], np.int32)
    batch = pipeline.batch_from_segments(tok, np.zeros_like(tok), segments, positions)
    np.testing.assert_array_equal(batch["weights"][0], [1, 1, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["targets"][0], [6, 7, 8, 9, 10, 0, 0, 0])
    np.testing.assert_array_equal(batch["positions"], positions)
    # One window per row: only the last real token has no target; no positions.
    plain = pipeline.batch_from_tokens(tok, np.zeros_like(tok), [6])
    np.testing.assert_array_equal(plain["weights"][0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(plain["segment_ids"][0], [1, 1, 1, 1, 1, 1, 0, 0])
    assert "positions" not in plain


def _expected_windows(config, step):
    """Window index -> (tokens, input field classes) of that window tokenized on its own."""
    source = pipeline.record_source(config, "train")
    k, b = config.windows_per_row, config.global_batch_size
    out = {}
    for w in range(step * b * k, (step + 1) * b * k):
        record = source[pipeline.record_index(config.seed, w, len(source))]
        _, record = config.augment((w, record))
        tw = tokens.tokenize_windows([record], seed=config.seed, window_indices=[w],
                                     max_length=config.max_target_length)
        out[w] = (tw.tokens[0, :tw.lengths[0]], tw.fields[0, :tw.lengths[0]])
    return out


def test_packed_rows_hold_the_windows_of_their_indices_whole():
    step = 2
    batch = pipeline.global_batch(CONFIG, step)
    expected = _expected_windows(CONFIG, step)
    k, length = CONFIG.windows_per_row, CONFIG.max_target_length
    packed = 0
    for row in range(CONFIG.global_batch_size):
        seg, at = batch["segment_ids"][row], 0
        windows = [expected[(step * CONFIG.global_batch_size + row) * k + j][0]
                   for j in range(k)]
        for j, window in enumerate(windows):
            if at + len(window) > length:  # dropped: nothing of it in the row
                assert not np.any(seg == j + 1)
                continue
            np.testing.assert_array_equal(batch["inputs"][row][seg == j + 1], window)
            np.testing.assert_array_equal(batch["positions"][row][seg == j + 1],
                                          np.arange(len(window)))
            at += len(window)
        assert np.all(seg[at:] == 0) and np.all(batch["inputs"][row][at:] == 0)
        packed += len(np.unique(seg[seg > 0]))
    # Deduplicated windows are short: the rows hold well over one window each.
    assert packed >= 2 * CONFIG.global_batch_size
    # Eval rows never pack.
    assert "positions" not in pipeline.eval_batches(CONFIG, num_batches=1)[0]


def test_a_destination_is_new_again_in_the_next_window_of_the_row():
    record = {"src_addr": np.array([192, 0, 2, 1] + [0] * 12, np.uint8), "ip_version": 4,
              "dst_addr": np.zeros((5, 16), np.uint8),
              "event_time": 1_700_000_000 + 60 * np.arange(5),
              "rtt_ms": np.array([10.0, 20.0, 30.0, 40.0, 11.0], np.float32)}
    record["dst_addr"][:, :4] = [[198, 51, 100, d] for d in (7, 8, 9, 10, 7)]
    one = tokens.tokenize_window(record, seed=0, window_index=0, max_length=256, mode="none")
    tok = np.stack([one.tokens, one.tokens])
    fields = np.stack([one.fields, one.fields])
    packed = pipeline.batch_from_segments(
        *pipeline.pack_windows(tok, fields, [one.length, one.length], 2))
    alone = pipeline.make_batch([one])["novel_result"][0, :one.length]
    assert alone.sum() > 0
    novel = packed["novel_result"][0]
    np.testing.assert_array_equal(novel[:one.length], alone)
    np.testing.assert_array_equal(novel[one.length:2 * one.length], alone)


def test_packed_loss_sums_equal_the_windows_one_per_row():
    cfg = tiny.model_config(max_target_length=256, field_slot_embedding=True)
    model = Transformer(cfg)
    params = model.init({"params": jax.random.key(1)}, *dummy_inputs(cfg))["params"]
    config = dataclasses.replace(CONFIG, global_batch_size=2)
    batch = pipeline.global_batch(config, 0)
    # The windows that made it into the packed rows, one per row.
    expected = _expected_windows(config, 0)
    present = [w for w in sorted(expected) if np.any(
        batch["segment_ids"][w // 4] == w % 4 + 1)]
    assert len(present) > 2
    tok = np.zeros((len(present), 256), np.int32)
    fld = np.zeros((len(present), 256), np.int32)
    for i, w in enumerate(present):
        t, f = expected[w]
        tok[i, :len(t)], fld[i, :len(f)] = t, f
    single = pipeline.batch_from_tokens(tok, fld, [len(expected[w][0]) for w in present])
    loss = jax.jit(lambda p, b: step_lib.loss_fn(p, b, model=model)[1])
    packed_sums, single_sums = loss(params, batch), loss(params, single)
    for key in single_sums:
        np.testing.assert_allclose(packed_sums[key], single_sums[key], rtol=2e-5, err_msg=key)
    assert single_sums["tokens/novel_result"] > 0
    # Without the segment mask a window would attend to the one before it in the row.
    merged = dict(batch, segment_ids=(batch["segment_ids"] > 0).astype(np.int32))
    assert not np.isclose(loss(params, merged)["loss_sum"], single_sums["loss_sum"], rtol=1e-4)


def test_iterator_state_names_the_packing():
    it = pipeline.train_iterator(CONFIG)
    next(it)
    state = it.get_state()
    it.close()
    assert state["windows_per_row"] == 4
    other = pipeline.train_iterator(dataclasses.replace(CONFIG, windows_per_row=2))
    with pytest.raises(ValueError, match="windows_per_row=4"):
        other.set_state(json.loads(json.dumps(state)))
    # States from before packing existed were one window per row.
    unpacked = pipeline.train_iterator(dataclasses.replace(CONFIG, windows_per_row=1))
    unpacked.set_state({k: v for k, v in state.items() if k != "windows_per_row"})
    with pytest.raises(ValueError, match="windows_per_row must be > 0"):
        pipeline.DataConfig(windows_per_row=0)


def test_process_rows_concatenate_to_the_packed_global_batch():
    whole = pipeline.global_batch(CONFIG, 1)
    parts = [next(pipeline.train_iterator(CONFIG, process_index=p, process_count=2,
                                          start_step=1)) for p in range(2)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_dump_batches_writes_and_decodes_packed_rows():
    dumped = dump_batches.dump(CONFIG, [0])
    assert dumped["positions"].shape == (1, 8, 256)
    text = dump_batches.describe(dumped)
    assert "step 0 row 0 window 1:" in text and "step 0 row 0 window 2:" in text


def test_packing_refuses_cudnn_attention(repo_root):
    cfg = config_lib.load([str(repo_root / "gin" / "quickstart.gin")],
                          ["DataConfig.windows_per_row = 2",
                           "ModelConfig.attention = 'cudnn_flash'"])
    with pytest.raises(config_lib.ConfigError, match="windows_per_row"):
        trainer.build(cfg)
