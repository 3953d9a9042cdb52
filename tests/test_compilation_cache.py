"""The persistent compilation cache by default: a restart compiles nothing; a bad entry costs a
compile, not the run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pingllm import compilation_cache, config

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "ModelConfig.num_layers = 2",
    "ModelConfig.emb_dim = 32",
    "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 16",
    "ModelConfig.mlp_dim = 64",
    "MAX_TARGET_LENGTH = 64",
    "GLOBAL_BATCH_SIZE = 4",
    'DataConfig.source = "synthetic_memory"',
    "DataConfig.synthetic_rows = 2000",
    "LOG_PERIOD = 1",
    "EVAL_INTERVAL = 0",
    "EVAL_RTT_QUERIES = 0",
    "CHECKPOINT_PERIOD = 2",
    "ASYNC_CHECKPOINTING = False",
]

_COUNTS = re.compile(r"compilation cache: (\d+) programs, (\d+) loaded from the cache, "
                     r"(\d+) compiled \((\d+) written\)")
_LOSS = re.compile(r"step (\d+)/\d+ \(.*?\) loss=(\S+)")


def _start(base: Path, run_name: str, steps: int, extra: tuple[str, ...] = (),
           executables: bool = False) -> dict:
    """One CLI run with the default cache location; its counts, losses and log.

    The executable cache (tests/test_executable_cache.py) is off unless `executables`: with it,
    a restart asks the compilation cache for (almost) nothing.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PINGLLM_EXECUTABLE_CACHE="1" if executables else "0")
    for var in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
        env.pop(var, None)  # the suite's shared cache: this test needs the run's own default
    bindings = [*TINY, f'BASE_OUTPUT_DIRECTORY = "{base}"', f'RUN_NAME = "{run_name}"',
                f"STEPS = {steps}", *extra]
    args = [sys.executable, "-m", "pingllm.main", "--gin_file=gin/quickstart.gin",
            *(f"--gin_bindings={b}" for b in bindings)]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    found = _COUNTS.findall(log)
    assert len(found) == 1, log[-4000:]
    requests, hits, compiled, written = map(int, found[0])
    return {"requests": requests, "hits": hits, "compiled": compiled, "written": written,
            "losses": {int(s): v for s, v in _LOSS.findall(log)}, "log": log}


def _entries(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in cache.glob("*-cache")}


@pytest.mark.slow
def test_restart_compiles_nothing_and_survives_a_corrupt_entry(tmp_path):
    base = tmp_path / "out"
    cache = base / compilation_cache.DEFAULT_SUBDIR

    first = _start(base, "a", steps=3)  # fresh: compiles and writes every program
    assert first["compiled"] > 0 and first["written"] == first["compiled"]
    assert first["losses"].keys() == {1, 2, 3}
    after_first = _entries(cache)

    # The fresh start also compiled what only a restore runs (the parameters' fingerprint).
    assert len(after_first) == first["written"] + 1
    resumed = _start(base, "a", steps=5)  # a restart: everything comes from the cache
    assert resumed["requests"] > 0
    assert resumed["compiled"] == 0 and resumed["written"] == 0, resumed["log"][-3000:]
    assert resumed["hits"] == resumed["requests"]
    assert "restored step 3" in resumed["log"]
    entries = _entries(cache)

    other = _start(base, "b", steps=3)  # a fresh run of the same shapes shares the cache
    assert other["compiled"] == 0 and other["hits"] == first["requests"]
    assert other["losses"] == first["losses"]
    assert _entries(cache) == entries

    for name in entries:  # every entry overwritten with garbage
        (cache / name).write_bytes(b"not a compiled program")
    corrupt = _start(base, "c", steps=3)
    assert corrupt["hits"] == 0 and corrupt["compiled"] == first["requests"]
    assert corrupt["losses"] == first["losses"]  # compiled instead, same run
    assert "unreadable entries, compiled instead; removed" in corrupt["log"]
    assert b"not a compiled program" not in _entries(cache).values()  # the garbage is gone

    repaired = _start(base, "d", steps=3)  # writes them back
    assert repaired["written"] == first["written"] and len(_entries(cache)) == len(after_first)
    assert repaired["losses"] == first["losses"]


def test_cache_directory_precedence(monkeypatch):
    monkeypatch.delenv(compilation_cache.ENV_DIR, raising=False)
    run = config.RunConfig(base_output_directory="/runs", run_name="x")
    assert compilation_cache.cache_dir(run) == "/runs/.jax_cache"
    bucket = config.RunConfig(base_output_directory="gs://bucket/runs", run_name="x")
    assert compilation_cache.cache_dir(bucket) == "gs://bucket/runs/.jax_cache"
    monkeypatch.setenv(compilation_cache.ENV_DIR, "/env_cache")
    assert compilation_cache.cache_dir(run) == "/env_cache"
    explicit = config.RunConfig(base_output_directory="/runs", compilation_cache_dir="/mine")
    assert compilation_cache.cache_dir(explicit) == "/mine"
    off = config.RunConfig(compilation_cache_dir="/mine", enable_compilation_cache=False)
    assert compilation_cache.cache_dir(off) == ""


def test_remove_corrupt_entries_keeps_readable_ones(tmp_path):
    from jax._src.compilation_cache import compress_executable

    (tmp_path / "good-cache").write_bytes(compress_executable(b"x" * 1000))
    (tmp_path / "cut-cache").write_bytes(compress_executable(b"x" * 1000)[:-5])
    (tmp_path / "junk-cache").write_bytes(b"junk")
    (tmp_path / "other-atime").write_bytes(b"junk")  # not an entry
    assert sorted(compilation_cache.remove_corrupt_entries(str(tmp_path))) == [
        "cut-cache", "junk-cache"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good-cache", "other-atime"]


_COMPILE_ONCE = r"""
import sys
import jax, jax.numpy as jnp
from pingllm import compilation_cache, config
run = config.RunConfig(base_output_directory=sys.argv[1], run_name="x")
print("DIR", compilation_cache.enable(run))
jax.jit(lambda x: x * 2 + 1)(jnp.arange(8.0)).block_until_ready()
print("COUNTS", compilation_cache.stats().snapshot())
"""


def test_cache_in_a_bucket(gcs_emulator):
    """gs:// output directories keep the cache in the bucket (JAX reads it through etils.epath)."""
    import ast

    bucket = gcs_emulator.create_bucket("compilation-cache")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(gcs_emulator.env(), JAX_PLATFORMS="cpu")
    counts = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _COMPILE_ONCE, f"{bucket}/out"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"DIR {bucket}/out/.jax_cache" in proc.stdout
        counts.append(ast.literal_eval(proc.stdout.split("COUNTS ", 1)[1].strip()))
    assert counts[0]["written"] >= 1 and counts[0]["hits"] == 0
    assert counts[1]["compiled"] == 0 and counts[1]["hits"] == counts[0]["requests"]
    entries = gcs_emulator.objects("compilation-cache", "out/.jax_cache/")
    assert len([n for n in entries if n.endswith("-cache")]) == counts[0]["written"]
