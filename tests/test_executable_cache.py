"""Start-up programs loaded whole: a restart traces and compiles nothing; a corrupt entry or a
changed config falls back to the normal path with the same losses."""

import pickle
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_compilation_cache import _start as _start_without

from pingllm import compilation_cache, executable_cache

_EXE = re.compile(r"executable cache: (\d+) loaded \((.*?)\), (\d+) traced and compiled \((.*?)\), "
                  r"(\d+) unusable entries")


def _start(*args, **kwargs) -> dict:
    return _start_without(*args, executables=True, **kwargs)


def _exe_counts(run: dict) -> dict:
    found = _EXE.findall(run["log"])
    assert len(found) == 1, run["log"][-3000:]
    loaded, loaded_names, built, built_names, unusable = found[0]
    return {"loaded": int(loaded), "built": int(built), "unusable": int(unusable),
            "loaded_names": set(loaded_names.split(", ")) - {"-"},
            "built_names": set(built_names.split(", ")) - {"-"}}


def _entries(base) -> list:
    return sorted((base / compilation_cache.DEFAULT_SUBDIR / executable_cache.SUBDIR).glob("*.bin"))


@pytest.mark.slow
def test_restart_traces_nothing_and_falls_back_cleanly(tmp_path):
    base = tmp_path / "out"
    whole = _start(base, "whole", steps=7)  # the uninterrupted run; a fresh, empty cache
    fresh = _exe_counts(whole)
    assert fresh["loaded"] == 0 and {"abstract_state", "init", "train_step"} <= fresh["built_names"]
    names = {p.name.split("-")[0] for p in _entries(base)}
    # The fresh start also wrote what only a restore runs (the parameters' fingerprint).
    assert names == {"abstract_state", "init", "dropout_key", "train_step", "fingerprint"}

    first = _start(base, "a", steps=3)  # same shapes: the init and the step are loaded too
    assert _exe_counts(first)["built"] == 0 and first["requests"] <= 1
    assert first["losses"] == {s: whole["losses"][s] for s in (1, 2, 3)}

    resumed = _start(base, "a", steps=5)  # a restart: nothing traced, nothing compiled
    counts = _exe_counts(resumed)
    assert "restored step 3" in resumed["log"]
    assert counts["built"] == 0 and counts["unusable"] == 0, resumed["log"][-3000:]
    assert counts["loaded_names"] == {"abstract_state", "fingerprint", "dropout_key", "train_step"}
    # Nothing of ours went to XLA (at most one small orbax helper, from the compilation cache).
    assert resumed["requests"] <= 1 and resumed["compiled"] == 0
    assert resumed["losses"] == {s: whole["losses"][s] for s in (4, 5)}  # bit for bit

    for path in _entries(base):  # every entry damaged: cut short, or not of this format
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if "train_step" in path.name else b"junk" + data)
    damaged = _start(base, "a", steps=7)  # falls back: traces and compiles, the same run
    counts = _exe_counts(damaged)
    assert counts["loaded"] == 0 and counts["unusable"] == 4, damaged["log"][-3000:]
    assert "not used" in damaged["log"] and "restored step 5" in damaged["log"]
    assert damaged["losses"] == {s: whole["losses"][s] for s in (6, 7)}
    # The damaged ones are removed; the state description is written again (a value, not a
    # program the compilation cache served), the unused init stays as it is.
    assert {p.name.split("-")[0] for p in _entries(base)} == {"init", "abstract_state"}

    wider = ("ModelConfig.mlp_dim = 96",)  # another config: another program, not a damaged one
    changed = _start(base, "b", steps=2, extra=wider)
    counts = _exe_counts(changed)
    assert counts["loaded"] == 0 and counts["unusable"] == 0
    assert {"abstract_state", "init", "train_step"} <= counts["built_names"]
    normal = _start(base, "c", steps=2, extra=(*wider, "ENABLE_COMPILATION_CACHE = False"))
    assert "executable cache: off" in normal["log"]
    assert changed["losses"] == normal["losses"] and changed["losses"] != whole["losses"]


def _cache(tmp_path, **kw) -> executable_cache.ExecutableCache:
    return executable_cache.ExecutableCache(str(tmp_path), **kw)


def test_entry_roundtrip_and_corruption(tmp_path):
    """A program written is loaded (same results); a changed byte, another key or another
    format is refused and the program is built again."""
    salt = float(time.time_ns() % 10**6)  # a program the suite's compilation cache cannot hold
    f = jax.jit(lambda x: jnp.sin(x) * 3 + x.sum() + salt)
    x = jnp.arange(6.0)
    spec = executable_cache.spec(x)
    first = _cache(tmp_path)
    expected = np.asarray(first.compiled("f", spec, lambda: f.lower(x))(x))
    assert first.built == ["f"] and first.loaded == []
    (path,) = (tmp_path / executable_cache.SUBDIR).glob("f-*.bin")

    second = _cache(tmp_path)
    np.testing.assert_array_equal(np.asarray(second.compiled("f", spec, lambda: f.lower(x))(x)),
                                  expected)
    assert second.loaded == ["f"] and second.built == []

    other = _cache(tmp_path)  # another key: a different entry, the first one untouched
    y = jnp.arange(7.0)
    other.compiled("f", executable_cache.spec(y), lambda: f.lower(y))
    assert other.built == ["f"] and other.fallbacks == []

    good = path.read_bytes()
    for bad in (good[:-10], good[:40] + bytes([good[40] ^ 1]) + good[41:], b"x" + good):
        path.write_bytes(bad)
        cache = _cache(tmp_path)
        got = cache.compiled("f", spec, lambda: f.lower(x))(x)
        np.testing.assert_array_equal(np.asarray(got), expected)
        assert cache.loaded == [] and cache.built == ["f"] and len(cache.fallbacks) == 1
        assert path.read_bytes() == good or path.read_bytes()[:14] == good[:14]  # rewritten


def test_values_and_key_parts(tmp_path):
    """Values round-trip; the key covers its parts (a different part is another entry)."""
    cache = _cache(tmp_path)
    calls = []

    def build(n):
        calls.append(n)
        return {"n": n}

    enc = lambda v: pickle.dumps(v)
    dec = lambda b: pickle.loads(b)
    assert cache.value("v", ("a", 1), lambda: build(1), enc, dec) == {"n": 1}
    assert cache.value("v", ("a", 1), lambda: build(2), enc, dec) == {"n": 1}  # loaded
    assert cache.value("v", ("a", 2), lambda: build(3), enc, dec) == {"n": 3}  # another key
    assert calls == [1, 3]
    off = _cache(tmp_path, disabled_reason="test")
    assert off.value("v", ("a", 1), lambda: build(4), enc, dec) == {"n": 4}
    assert off.report() == {"loaded": 0, "built": 1, "fallbacks": 0}


def test_program_from_the_compilation_cache_is_not_written(tmp_path):
    """JAX 0.10.2 CPU: an executable the compilation cache served re-serializes broken; such a
    program gets no entry (the next start that really compiles it writes one)."""
    import subprocess
    import sys

    code = (
        "import sys, jax, jax.numpy as jnp\n"
        "from pingllm import compilation_cache, config, executable_cache\n"
        "run = config.RunConfig(base_output_directory=sys.argv[1], run_name='x')\n"
        "path = compilation_cache.enable(run)\n"
        "f = jax.jit(lambda x: jnp.cos(x) * 2 + 1)\n"
        "x = jnp.arange(8.0)\n"
        "if sys.argv[2] == 'keep':\n"
        "    f.lower(x).compile()\n"  # only into the compilation cache
        "else:\n"
        "    c = executable_cache.ExecutableCache(path)\n"
        "    print('OUT', c.compiled('f', executable_cache.spec(x), lambda: f.lower(x))(x).sum())\n"
        "    print('COUNTS', c.report())\n"
    )
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env["JAX_PLATFORMS"] = "cpu"
    outs = []
    for mode in ("keep", "use", "use"):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), mode], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout)
    assert "'built': 1" in outs[1] and "'built': 1" in outs[2]  # never loaded a broken entry
    assert not list((tmp_path / ".jax_cache" / executable_cache.SUBDIR).glob("*.bin"))
