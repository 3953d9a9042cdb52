"""pipeline.py: the batch of step s is a pure function of (dataset, seed, s)."""

import dataclasses
import json
import socket
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pingllm.cli import dump_batches
from pingllm.data import pipeline, records, tokens

CONFIG = pipeline.DataConfig(
    source="synthetic_memory", synthetic_rows=3_000, max_target_length=256, global_batch_size=8,
    seed=5, read_threads=1, prefetch_batches=1,
)
KEYS = dump_batches.BATCH_KEYS


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def first_steps():
    it = pipeline.train_iterator(CONFIG)
    batches = _take(it, 6)
    it.close()
    return batches


def test_batch_shapes_and_dtypes(first_steps):
    b = first_steps[0]
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "inputs": ((8, 256), "int32"), "targets": ((8, 256), "int32"),
        "weights": ((8, 256), "float32"), "segment_ids": ((8, 256), "int32"),
        "fields": ((8, 256), "int32"), "novel_result": ((8, 256), "float32"),
    }


def _window(dsts, rtts, version=4):
    """One tokenized window of source 192.0.2.1 (or 2001:db8::1) pinging `dsts` in order."""
    n = 4 if version == 4 else 16
    src = np.zeros(16, np.uint8)
    src[:n] = [192, 0, 2, 1] if version == 4 else [0x20, 0x01, 0x0D, 0xB8] + [0] * 11 + [1]
    dst = np.zeros((len(dsts), 16), np.uint8)
    for i, d in enumerate(dsts):
        v6 = [0x20, 0x01, 0x0D, 0xB9] + [0] * 11 + [d]
        dst[i, :n] = [198, 51, 100, d] if version == 4 else v6
    record = {"src_addr": src, "ip_version": version, "dst_addr": dst,
              "event_time": 1_700_000_000 + 60 * np.arange(len(dsts)),
              "rtt_ms": np.asarray(rtts, np.float32)}
    return tokens.tokenize_window(record, seed=0, window_index=0, max_length=256, mode="full")


@pytest.mark.parametrize("version", [4, 6])
def test_novel_result_marks_results_of_destinations_new_to_the_window(version):
    dsts, rtts = [7, 8, 7, 9, 8, 7], [10.0, 20.0, 11.0, -1.0, 21.0, 12.0]
    w = _window(dsts, rtts, version)
    batch = pipeline.make_batch([w])
    starts = np.flatnonzero(w.fields[:w.length] == tokens.FIELD_START)
    expected_input = np.zeros(256, bool)
    query_shaped = []
    for m, first in enumerate([True, True, False, True, False, False]):
        end = starts[m + 1] if m + 1 < len(starts) else w.length
        span = np.arange(starts[m], end)
        is_result = w.fields[span] == tokens.FIELD_RESULT
        assert is_result.sum() == (1 if rtts[m] < 0 else 3)  # FAILED, or RTT_START + 2 bytes
        # Only a result that follows its destination is what a held-out query asks for.
        after_dst = span[w.fields[span] == tokens.FIELD_DST][0] < span[is_result][0]
        query_shaped.append(after_dst)
        expected_input[span[is_result]] = first and after_dst
    assert np.array_equal(pipeline.novel_results(w.tokens[None], w.fields[None])[0],
                          expected_input)
    # Target-aligned like `fields`: position t marks the token at t + 1.
    assert np.array_equal(batch["novel_result"][0, :-1], expected_input[1:].astype(np.float32))
    assert batch["novel_result"][0, -1] == 0
    assert np.all(batch["fields"][0][batch["novel_result"][0] > 0] == tokens.FIELD_RESULT)
    # dst 7, dst 8, dst 9 (failed), each where its result follows its destination.
    assert batch["novel_result"][0].sum() == np.dot([3, 3, 1], np.array(query_shaped)[[0, 1, 3]])
    assert 0 < sum(query_shaped) < 6  # this window's field orders exercise both cases


def test_novel_result_on_pipeline_batches(first_steps):
    for b in first_steps:
        novel = b["novel_result"] > 0
        result = (b["fields"] == tokens.FIELD_RESULT) & (b["weights"] > 0)
        assert np.all(result[novel]) and 0 < novel.sum() < result.sum()
        assert np.all(b["weights"][novel] == 1)


def test_start_step_gives_the_same_batch_as_iterating_to_it(first_steps):
    it = pipeline.train_iterator(CONFIG, start_step=4)
    _assert_batches_equal(next(it), first_steps[4])
    _assert_batches_equal(next(it), first_steps[5])
    assert it.step == 6
    _assert_batches_equal(pipeline.global_batch(CONFIG, 3), first_steps[3])


def test_get_state_set_state_resumes_exactly(first_steps):
    it = pipeline.train_iterator(CONFIG)
    _take(it, 2)
    state = it.get_state()
    assert state == {"step": 2, "process_index": 0, "process_count": 1, "global_batch_size": 8,
                     "seed": 5, "max_target_length": 256,
                     "dataset": "synthetic_memory_rows3000_seed0_len256_test0.1",
                     "dedupe_rate": 0.0, "anonymise_source_rate": 0.0, "windows_per_row": 1}
    fresh = pipeline.train_iterator(CONFIG)
    fresh.set_state(json.loads(json.dumps(state)))
    _assert_batches_equal(next(fresh), first_steps[2])
    _assert_batches_equal(next(it), first_steps[2])
    other = pipeline.train_iterator(dataclasses.replace(CONFIG, seed=6))
    with pytest.raises(ValueError, match="seed=5"):
        other.set_state(state)
    augmented = pipeline.train_iterator(dataclasses.replace(CONFIG, dedupe_rate=1.0))
    with pytest.raises(ValueError, match="dedupe_rate=0.0"):
        augmented.set_state(state)
    # A state saved before the augmentations existed resumes a run without them.
    old = {k: v for k, v in state.items() if "rate" not in k and k != "windows_per_row"}
    fresh = pipeline.train_iterator(CONFIG)
    fresh.set_state(old)
    _assert_batches_equal(next(fresh), first_steps[2])


def test_orbax_checkpoints_the_iterator_with_grains_handler(tmp_path, first_steps):
    it = pipeline.train_iterator(CONFIG)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path, item_names=("iter",)) as manager:
        manager.save(3, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    assert json.loads((tmp_path / "3" / "iter" / "process_0-of-1.json").read_text())["step"] == 3
    fresh = pipeline.train_iterator(CONFIG)
    with ocp.CheckpointManager(tmp_path, item_names=("iter",)) as manager:
        restored = manager.restore(
            3, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert restored["iter"] is fresh
    _assert_batches_equal(next(fresh), first_steps[3])


def test_process_rows_concatenate_to_the_global_batch(first_steps):
    steps = [0, 1, 5]
    whole = dump_batches.dump(CONFIG, steps, 0, 1)
    for count in (2,):
        parts = [dump_batches.dump(CONFIG, steps, p, count) for p in range(count)]
        for key in KEYS:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=1),
                                          whole[key])
    for i, s in enumerate(steps):
        for key in KEYS:
            np.testing.assert_array_equal(whole[key][i], first_steps[s][key])
    # The iterator can also move to a step under a new layout (restart on another host count).
    it = pipeline.train_iterator(CONFIG, process_index=1, process_count=2).for_step(5)
    np.testing.assert_array_equal(next(it)["inputs"], first_steps[5]["inputs"][4:])


def _window_records(config, step):
    """The records (and global positions) behind each row of a step."""
    source = pipeline.record_source(config, "train")
    positions = [step * config.global_batch_size + r for r in range(config.global_batch_size)]
    return [(g, source[pipeline.record_index(config.seed, g, len(source))]) for g in positions]


def test_every_row_decodes_to_its_record_with_true_time_deltas(first_steps):
    seen_modes = set()
    for step, batch in enumerate(first_steps):
        for row, (g, rec) in enumerate(_window_records(CONFIG, step)):
            length = int(batch["segment_ids"][row].sum())
            decoded = tokens.decode_tokens(batch["inputs"][row], length)
            n = len(rec["event_time"])
            assert len(decoded) == n  # records fit the worst case: nothing dropped
            plan = tokens.window_plan(CONFIG.seed, g, n)
            seen_modes.add(plan.mode)
            times = tokens.absolute_times(decoded)
            last = None
            for pos, (m, t_abs) in enumerate(zip(decoded, times)):
                i = plan.order[pos]
                np.testing.assert_array_equal(m.src_addr, rec["src_addr"])
                np.testing.assert_array_equal(m.dst_addr, rec["dst_addr"][i])
                assert m.failed == (rec["rtt_ms"][i] < 0)
                if not m.failed:
                    assert m.rtt_code == int(tokens.encode_rtt(rec["rtt_ms"][i]))
                assert (m.time_kind is not None) == bool(plan.timestamped[pos])
                if m.time_kind is not None:
                    true_time = int(rec["event_time"][i])
                    assert t_abs == true_time
                    if m.time_kind != "abs":
                        assert m.time_value == true_time - last
                    last = true_time
    assert seen_modes == {"full", "none", "mixed"}


def test_targets_weights_segments_and_fields(first_steps):
    for step, batch in enumerate(first_steps):
        windows = [
            tokens.tokenize_window(rec, seed=CONFIG.seed, window_index=g, max_length=256)
            for g, rec in _window_records(CONFIG, step)
        ]
        for row, w in enumerate(windows):
            n = w.length
            assert 0 < n <= 256
            np.testing.assert_array_equal(batch["inputs"][row], w.tokens)
            np.testing.assert_array_equal(batch["targets"][row, :-1], w.tokens[1:])
            assert batch["targets"][row, -1] == 0
            np.testing.assert_array_equal(batch["segment_ids"][row],
                                          (np.arange(256) < n).astype(np.int32))
            expect_w = np.zeros(256, np.float32)
            expect_w[: n - 1] = 1.0  # zero on padding and on the last real position
            np.testing.assert_array_equal(batch["weights"][row], expect_w)
            np.testing.assert_array_equal(batch["fields"][row, :-1], w.fields[1:])
            assert batch["fields"][row, -1] == tokens.FIELD_PAD
            assert np.all(batch["inputs"][row, n:] == 0)
            # Every weighted target is a real token with a real field class.
            assert np.all(batch["fields"][row, : n - 1] != tokens.FIELD_PAD)
            assert np.all(batch["fields"][row, n - 1:] == tokens.FIELD_PAD)


def test_each_epoch_reads_every_record_once_in_a_new_order():
    n = 97
    epoch0 = [pipeline.record_index(5, g, n) for g in range(n)]
    epoch1 = [pipeline.record_index(5, g, n) for g in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert epoch0 != [pipeline.record_index(6, g, n) for g in range(n)]
    # Pinned: the order is fixed by the code, not by the NumPy version.
    assert epoch0[:8] == [6, 63, 82, 18, 1, 49, 69, 42]


def test_eval_batches_are_fixed_and_come_from_test_pairs():
    a = pipeline.eval_batches(CONFIG, num_batches=2)
    b = pipeline.eval_batches(CONFIG, num_batches=2)
    for x, y in zip(a, b):
        _assert_batches_equal(x, y)
    halves = [pipeline.eval_batches(CONFIG, process_index=p, process_count=2, num_batches=2)
              for p in range(2)]
    for i in range(2):
        for key in KEYS:
            np.testing.assert_array_equal(
                np.concatenate([halves[0][i][key], halves[1][i][key]]), a[i][key])
    src, dst = [], []
    for batch in a:
        for row in range(CONFIG.global_batch_size):
            for m in tokens.decode_tokens(batch["inputs"][row]):
                src.append(m.src_addr)
                dst.append(m.dst_addr)
    assert records.split_of_pairs(np.stack(src), np.stack(dst), CONFIG.test_fraction).all()


@pytest.mark.slow
def test_worker_processes_give_identical_batches(first_steps):
    it = pipeline.train_iterator(dataclasses.replace(CONFIG, worker_count=2), start_step=1)
    try:
        for s in range(1, 6):
            _assert_batches_equal(next(it), first_steps[s])
        assert it.get_state()["step"] == 6
    finally:
        it.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_two_process_job_sees_the_global_batch(tmp_path, repo_root):
    steps = "0,3"
    config = {"source": "synthetic_memory", "synthetic_rows": 3_000, "max_target_length": 256,
              "global_batch_size": 8, "seed": 5}
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(repo_root / "tests" / "pipeline_worker.py"), str(port), str(p),
             "2", str(tmp_path / f"p{p}.npz"), steps, json.dumps(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for p in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=240)[0].decode() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    parts = [np.load(tmp_path / f"p{p}.npz") for p in range(2)]
    whole = dump_batches.dump(CONFIG, [0, 3], 0, 1)
    for key in KEYS:
        assert parts[0][key].shape == (2, 4, 256)
        np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]], axis=1),
                                      whole[key])


def test_dump_batches_cli_writes_the_global_batches(tmp_path, repo_root, capsys):
    out = tmp_path / "b.npz"
    bindings = ["DataConfig.source = 'synthetic_memory'", "DataConfig.synthetic_rows = 3000",
                "DataConfig.max_target_length = 256", "DataConfig.global_batch_size = 8",
                "DataConfig.seed = 5"]
    assert dump_batches.main(
        [f"--gin_file={repo_root / 'gin' / 'quickstart.gin'}", "--steps", "1,0",
         "--output", str(out), "--decode", "--process_count", "1"]
        + [f"--gin_bindings={b}" for b in bindings]) == 0
    dumped = np.load(out)
    np.testing.assert_array_equal(dumped["steps"], [1, 0])
    # The tool dumps exactly what training under that config sees (the quickstart augments
    # its training windows: pingllm/data/augment.py).
    from pingllm import config as config_lib

    quickstart = config_lib.load([str(repo_root / "gin" / "quickstart.gin")], bindings).data
    assert quickstart.dedupe_rate > 0
    for key in KEYS:
        np.testing.assert_array_equal(dumped[key][1], pipeline.global_batch(quickstart, 0)[key])
    printed = capsys.readouterr().out
    assert "step 1 row 7:" in printed and " ms " in printed or "FAILED" in printed
