"""Prediction from a checkpoint: the exact reading of the RTT distribution, a trained model that
orders same-city below across-ocean latency, ordered quantiles, P(fail) in [0, 1], the CLI in
single and batch mode, and clear errors for bad addresses.

A tiny model is trained once per session by the real CLI (`python -m pingllm.main`), in a
fixed directory under pytest's base temp (or $PINGLLM_TINY_RUN_BASE), so test_evaluate.py
reuses the same checkpoint (a rerun of a complete run exits at once).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq
import pytest

from pingllm.cli import predict as predict_cli
from pingllm.data import records, synthetic, tokens
from pingllm.eval import predictor as predict

TINY_ROWS = 20_000
TINY_BINDINGS = [
    'BASE_OUTPUT_DIRECTORY = "{out}"',
    'RUN_NAME = "tiny"',
    'DataConfig.source = "synthetic_memory"',
    f"DataConfig.synthetic_rows = {TINY_ROWS}",
    "MAX_TARGET_LENGTH = 128",
    "ModelConfig.num_layers = 2",
    "ModelConfig.emb_dim = 64",
    "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 32",
    "ModelConfig.mlp_dim = 128",
    'ModelConfig.dtype = "float32"',
    "STEPS = 200",
    "GLOBAL_BATCH_SIZE = 16",
    "LEARNING_RATE = 1e-2",
    "WARMUP_STEPS = 10",
    "LEARNING_RATE_SCHEDULE_STEPS = 200",
    "LOG_PERIOD = 50",
    "EVAL_INTERVAL = 0",
    "EVAL_STEPS = 1",
    "CHECKPOINT_PERIOD = 1000",
]


def train_tiny(repo_root, base) -> str:
    """Trains (or finds complete) the tiny run; returns its run directory."""
    out = base / "pingllm_tiny_run"
    run_dir = out / "tiny"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "pingllm.main", f"--gin_file={repo_root}/gin/quickstart.gin"]
    cmd += [f"--gin_bindings={b.format(out=out)}" for b in TINY_BINDINGS]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(run_dir)


@pytest.fixture(scope="session")
def tiny_run(repo_root, tmp_path_factory) -> str:
    # PINGLLM_TINY_RUN_BASE keeps the run across sessions (a complete run is not retrained).
    base = os.environ.get("PINGLLM_TINY_RUN_BASE")
    return train_tiny(repo_root, Path(base) if base else tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def predictor(tiny_run) -> predict.Predictor:
    return predict.Predictor.from_checkpoint(tiny_run, batch_size=16)


@pytest.fixture(scope="session")
def world_rows():
    world = synthetic.SyntheticInternet(seed=0)
    return world, world.generate(TINY_ROWS)


# ---- the reading of the distribution, without a model ----


def test_quantiles_read_inside_the_crossing_bins():
    p_b1 = np.zeros((1, 256))
    p_b1[0, 0x24], p_b1[0, 0x2C] = 0.3, 0.7  # two canonical bins: e=4 and e=5, top bits 4
    bins, inner = predict.quantile_bins(p_b1)
    assert bins.tolist() == [[0x24, 0x2C, 0x2C]]
    assert np.allclose(inner, [[0.1 / 0.3, 0.2 / 0.7, 0.6 / 0.7]])
    p_b2 = np.full((1, 256), 1 / 256)
    assert predict.quantile_in_bin(p_b2, np.array([0.5]))[0] == 127  # cdf 128/256 >= 0.5
    # b1 = 0 cannot be followed by b2 = 0 (code 0 is not canonical).
    assert predict.b2_valid(np.array([0, 1]))[:, 0].tolist() == [False, True]
    assert predict.CANONICAL_B1[[0, 3, 7, 8, 11, 12, 15]].tolist() == [
        True, True, True, False, False, True, True]


@pytest.mark.parametrize("latest", [False, True])
def test_context_keeps_measurements_before_the_query_and_latest_per_destination(latest):
    dst = np.zeros((6, 16), np.uint8)
    dst[:, :4] = [[198, 51, 100, d] for d in (1, 2, 1, 3, 2, 1)]
    context = {"src_addr": np.array([192, 0, 2, 9] + [0] * 12, np.uint8), "ip_version": 4,
               "dst_addr": dst, "event_time": np.arange(6, dtype=np.int64) * 60 + 1_000,
               "rtt_ms": np.arange(6, dtype=np.float32) + 10}
    query = predict.Query(context["src_addr"], dst[0], 4, 1_000 + 4 * 60)  # rows 0..4 before
    fitted = predict._fit_context(context, query, 256, latest_per_destination=latest)
    expected = [0, 1, 2, 3, 4] if not latest else [2, 3, 4]  # dst 1 at 2, dst 3 at 3, dst 2 at 4
    np.testing.assert_array_equal(fitted["event_time"], context["event_time"][expected])
    np.testing.assert_array_equal(fitted["dst_addr"], dst[expected])
    np.testing.assert_array_equal(fitted["rtt_ms"], context["rtt_ms"][expected])


def test_predictor_cuts_contexts_like_its_training_windows():
    from pingllm.data import pipeline
    from pingllm.model import ModelConfig

    cfg = ModelConfig(num_layers=1, emb_dim=32, num_heads=1, head_dim=32, mlp_dim=32)
    plain = predict.Predictor(cfg, None, data_config=pipeline.DataConfig())
    deduped = predict.Predictor(cfg, None, data_config=pipeline.DataConfig(dedupe_rate=1.0))
    assert not plain.latest_per_destination and deduped.latest_per_destination
    assert not predict.Predictor(cfg, None).latest_per_destination


def test_fast_reading_equals_the_full_code_distribution(predictor, world_rows):
    """Reading 1-3 bins equals building p(code) = p(b1) p(b2|b1) over every canonical code."""
    _, table = world_rows
    rec = next(records.rows_to_records(table.slice(0, 400), 10_000))
    q = predict.Query(rec["src_addr"], rec["dst_addr"][-1], int(rec["ip_version"]),
                      int(rec["event_time"][-1]))
    ctx = {k: (rec[k] if k in ("src_addr", "ip_version") else rec[k][:-1]) for k in rec}
    prompt = predictor.prompt(q, ctx)
    fast = predictor.predict_prompts([prompt])

    first = predictor._logits([np.append(prompt, tokens.RTT_START)])
    p_b1 = predict.byte_distribution(first[:, 1], predict.CANONICAL_B1[None])[0]
    b1s = np.flatnonzero(predict.CANONICAL_B1)
    rows = [np.append(prompt, [tokens.RTT_START, tokens.BYTE_OFFSET + b]) for b in b1s]
    p_b2 = predict.byte_distribution(predictor._logits(rows)[:, 1], predict.b2_valid(b1s))
    codes = (b1s[:, None] << 8) | np.arange(256)[None, :]
    p_code = (p_b1[b1s][:, None] * p_b2).ravel()
    rtt = tokens.decode_rtt(codes.ravel())
    order = np.argsort(rtt, kind="stable")
    cdf = np.cumsum(p_code[order])
    for q_level, got in zip(predict.QUANTILES, (fast.rtt_p10, fast.rtt_p50, fast.rtt_p90)):
        want = rtt[order][np.argmax(cdf >= q_level - 1e-9)]
        assert got[0] == pytest.approx(want, rel=2e-3), (q_level, got[0], want)
    assert fast.p_fail[0] == pytest.approx(predict.p_fail_from_logits(first[:, 0])[0])


# ---- a trained model ----


def _pairs_by_distance(world, table):
    """(same-city IPv4 pair, across-ocean IPv4 pair) rows' (src, dst) with >= 6 replies each."""
    ok = pa.compute.greater(table["rtt"], 0).to_numpy(zero_copy_only=False)
    v4 = table["ip_version"].to_numpy() == 4
    t = table.filter(pa.array(ok & v4))
    src, dst = t["src_addr"].to_pylist(), t["dst_addr"].to_pylist()
    pairs, counts = np.unique(np.array([f"{s} {d}" for s, d in zip(src, dst)]),
                              return_counts=True)
    pairs = [p.split() for p in pairs[counts >= 6]]
    from pingllm.data import schema

    s_b, _ = schema.parse_addresses([p[0] for p in pairs])
    d_b, _ = schema.parse_addresses([p[1] for p in pairs])
    floor = world.fibre_floor_ms(s_b, d_b, 4)
    region = world.cities.region
    s_city = world.locate(s_b, 4).city
    d_city = world.locate(d_b, 4).city
    same = np.flatnonzero(floor == 0)
    far = np.flatnonzero((floor >= 60) & (d_city >= 0)
                         & (region[np.maximum(s_city, 0)] != region[np.maximum(d_city, 0)]))
    assert len(same) and len(far), "the tiny world should hold both kinds of pair"
    return [pairs[i] for i in same], [pairs[i] for i in far]


def _context_and_query(table, src, dst):
    """The pair's rows but the last as context; the last one's time as the query time."""
    mask = pa.compute.and_(pa.compute.equal(table["src_addr"], src),
                           pa.compute.equal(table["dst_addr"], dst))
    rows = table.filter(mask)
    times = rows["event_time"].cast(pa.int64()).to_numpy() // 1_000_000
    last = int(np.argmax(times))
    keep = np.ones(len(rows), bool)
    keep[last] = False
    return rows.filter(pa.array(keep)), int(times[last])


def test_same_city_is_predicted_faster_than_across_an_ocean(predictor, world_rows):
    """Each pair's own earlier measurements are its context; compared by median p50 over all
    same-city and all across-ocean pairs of the tiny world (5 and 7 of them): the tiny model
    ranks them right on the whole, not pair by pair (see docs/evaluation.md)."""
    world, table = world_rows
    same, far = _pairs_by_distance(world, table)
    preds = {}
    for name, group in (("same", same), ("far", far)):
        p50 = []
        for src, dst in group:
            ctx, t = _context_and_query(table, src, dst)
            p50.append(predictor.predict([(src, dst, t)], context=ctx).rtt_p50[0])
        preds[name] = np.array(p50)
    assert np.median(preds["same"]) < np.median(preds["far"]), preds


def test_quantiles_ordered_and_p_fail_a_probability(predictor, world_rows):
    _, table = world_rows
    src = table["src_addr"].to_pylist()[:200:10]
    dst = table["dst_addr"].to_pylist()[:200:10]
    preds = predictor.predict(list(zip(src, dst)))  # context: the training data of each source
    assert len(preds) == len(src)
    assert np.all((preds.p_fail >= 0) & (preds.p_fail <= 1))
    assert np.all(preds.rtt_p10 > 0)
    assert np.all(preds.rtt_p10 <= preds.rtt_p50) and np.all(preds.rtt_p50 <= preds.rtt_p90)


# ---- the CLI ----


def test_cli_single_pair(tiny_run, world_rows, capsys, monkeypatch):
    _, table = world_rows
    src, dst = table["src_addr"][0].as_py(), table["dst_addr"][0].as_py()
    monkeypatch.chdir(Path(tiny_run).parent)  # a checkpoint path relative to the working dir
    assert predict_cli.main(["--checkpoint", Path(tiny_run).name, "--src", src, "--dst", dst,
                         "--time", "2025-03-03T12:00:00Z"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"src={src} dst={dst} p_fail=") and "rtt_p50=" in line


def test_cli_batch_mode_adds_columns(tiny_run, world_rows, tmp_path):
    _, table = world_rows
    pairs = table.select(["src_addr", "dst_addr", "event_time"]).slice(0, 5)
    pairs_csv = tmp_path / "pairs.csv"
    pa.csv.write_csv(pairs, pairs_csv)
    out = tmp_path / "out.parquet"
    ctx = tmp_path / "ctx.parquet"
    pq.write_table(table.slice(0, 300), ctx)
    assert predict_cli.main(["--checkpoint", os.path.join(tiny_run, "checkpoints"), "--pairs",
                         str(pairs_csv), "--output", str(out), "--context", str(ctx)]) == 0
    got = pq.read_table(out)
    assert got.column_names == ["src_addr", "dst_addr", "event_time", *predict.OUTPUT_COLUMNS]
    assert got["src_addr"].to_pylist() == pairs["src_addr"].to_pylist()
    p10, p50, p90 = (got[c].to_numpy() for c in ("rtt_p10", "rtt_p50", "rtt_p90"))
    assert np.all(p10 <= p50) and np.all(p50 <= p90) and len(p50) == 5


@pytest.mark.parametrize("args, message", [
    (["--src", "192.0.2.300", "--dst", "192.0.2.1"], "bad source address '192.0.2.300'"),
    (["--src", "192.0.2.1", "--dst", "not-an-ip"], "bad destination address 'not-an-ip'"),
    (["--src", "192.0.2.1", "--dst", "2001:db8::1"],
     "source 192.0.2.1 is IPv4 but destination 2001:db8::1 is IPv6"),
])
def test_cli_bad_address_is_a_clear_error(args, message, capsys):
    # Addresses are checked before the checkpoint is opened: the path need not exist.
    assert predict_cli.main(["--checkpoint", "/nonexistent", *args]) == 2
    assert message in capsys.readouterr().err


def test_pairs_file_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "pairs.csv"
    bad.write_text("src_addr,destination\n192.0.2.1,192.0.2.2\n")
    assert predict_cli.main(["--checkpoint", "/x", "--pairs", str(bad), "--output",
                         str(tmp_path / "o.csv")]) == 2
    assert "pairs file lacks column(s) dst_addr" in capsys.readouterr().err
    bad.write_text("src_addr,dst_addr\n192.0.2.1,192.0.2.2\n192.0.2.1,fe80::1\n")
    assert predict_cli.main(["--checkpoint", "/x", "--pairs", str(bad), "--output",
                         str(tmp_path / "o.csv")]) == 2
    assert "row 1: source 192.0.2.1 is IPv4 but destination fe80::1 is IPv6" in (
        capsys.readouterr().err)


def test_cli_as_a_process_exits_nonzero_on_bad_address(repo_root):
    proc = subprocess.run([sys.executable, "-m", "pingllm.cli.predict", "--checkpoint", "/x",
                           "--src", "1.2.3", "--dst", "1.2.3.4"], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bad source address '1.2.3'" in proc.stderr
