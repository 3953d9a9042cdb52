"""docs/data.md's real-data recipe end to end at toy size: a mixed RIPE dump (bz2) -> import
-> build with a time split -> python -m pingllm.main --gin_file=gin/ripe_atlas.gin ->
pingllm-evaluate on held-out pairs and on the later-in-time split."""

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

# The tests run with 8 CPU devices (conftest.py): the global batch must divide by 8.
TINY = [
    "MAX_TARGET_LENGTH = 128", "ModelConfig.num_layers = 1", "ModelConfig.emb_dim = 32",
    "ModelConfig.num_heads = 2", "ModelConfig.head_dim = 16", "ModelConfig.mlp_dim = 64",
    "STEPS = 3", "GLOBAL_BATCH_SIZE = 8", "WARMUP_STEPS = 1", "LEARNING_RATE_SCHEDULE_STEPS = 3",
    "EVAL_INTERVAL = 0", "EVAL_RTT_QUERIES = 0", "CHECKPOINT_PERIOD = 3", "LOG_PERIOD = 1",
    "ASYNC_CHECKPOINTING = False",
]


def _run(args, cwd, timeout=900):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _table_methods(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method"))
    methods = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith(("best baseline", "median abs")):
            break
        methods.append(line.split()[0])
    return methods


@pytest.mark.slow
def test_import_build_train_evaluate_on_a_ripe_dump(tmp_path, repo_root):
    dumps, imported = tmp_path / "dumps", tmp_path / "imported"
    _run(["pingllm/cli/make_synthetic.py", "--rows", "12000", "--format", "ripe-json-mixed",
          "--duration_s", "14400", "--output", str(dumps)], repo_root)
    _run(["-c", "import bz2, pathlib, sys; p = pathlib.Path(sys.argv[1]); "
          "p.with_suffix('.jsonl.bz2').write_bytes(bz2.compress(p.read_bytes())); p.unlink()",
          str(dumps / "results-00000.jsonl")], repo_root)
    out = _run(["pingllm/cli/import_ripe_atlas.py", str(dumps / "results-00000.jsonl.bz2"),
                "--output", str(imported)], repo_root)
    assert "not_a_ping" in out and "kept                              12,000" in out
    assert pq.read_table(imported).num_rows == 12000

    bindings = [*TINY, f'MANUAL_DIR = "{imported}"', f'DATASET_PATH = "{tmp_path / "tfds"}"',
                f'BASE_OUTPUT_DIRECTORY = "{tmp_path / "outputs"}"',
                'LATER_FROM = "2025-03-03T02:00:00Z"']
    flags = [f"--gin_bindings={b}" for b in bindings]
    _run(["-m", "pingllm.main", "--gin_file=gin/ripe_atlas.gin", *flags], repo_root)
    built = tmp_path / "tfds" / "ripe_atlas_ping" / "manual_len128_later20250303T020000"
    assert (built / "1.0.0").is_dir()

    run = tmp_path / "outputs" / "ripe_atlas"
    common = ["-m", "pingllm.cli.evaluate", "--checkpoint", str(run), "--max_queries", "40",
              "--no_plots", "--context", "train", "--eval_batches", "1",
              "--output_json", str(tmp_path / "eval.json")]
    held_out = _run(common, repo_root)
    methods = _table_methods(held_out)
    assert "model" in methods and "vivaldi" in methods and "per_destination_median" in methods
    assert "floor" not in methods  # the generator's noise-free latency: synthetic data only
    later = _run([*common, "--gin_bindings", "DataConfig.eval_split='later'"], repo_root)
    assert set(_table_methods(later)) == set(methods)
    assert later != held_out
