"""Test setup: 8 CPU devices, CPU-only JAX, the repository's fixtures."""

import os
import sys
from pathlib import Path

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the whole run, inherited by every subprocess the
# tests start: the same tiny configs are compiled by many CLI runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/pingllm_test_jax_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Real RIPE Atlas results and edge cases (provenance: ping_results.sources.tsv)."""
    return FIXTURES / "ripe_atlas"


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real fake-gcs-server on a free 127.0.0.1 port; its client variables are put in
    os.environ for the session (so subprocesses inherit them). See tests/gcs_emulator.py."""
    import gcs_emulator as emulator_lib

    emulator = emulator_lib.Emulator()
    saved = {k: os.environ.get(k) for k in emulator.env()}
    emulator_lib.apply_env(emulator.env())
    yield emulator
    emulator.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
