"""The persistent XLA compilation cache: where it lives, switching it on, what it served.

A restart loads the compiled init and train step from here instead of compiling them again.
The default directory is `<base_output_directory>/.jax_cache`: next to the run directory, so it
survives wherever the run does (a local disk, a Modal volume, a gs:// bucket through
etils.epath) and is shared by the runs of one output directory and by all processes of a pod
when that directory is shared. JAX writes entries from process 0 only; every process reads.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import jax
from absl import logging
from etils import epath

ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
DEFAULT_SUBDIR = ".jax_cache"
_ENTRY_SUFFIX = "-cache"  # jax/_src/lru_cache.py names entries <key>-cache
_READ_ERROR = "Error reading persistent compilation cache entry"

_EVENTS = {
    "/jax/compilation_cache/compile_requests_use_cache": "requests",
    "/jax/compilation_cache/cache_hits": "hits",
    "/jax/compilation_cache/cache_misses": "written",
}


def cache_dir(run_cfg: Any) -> str:
    """The directory a run uses: explicit config, else $JAX_COMPILATION_CACHE_DIR, else default.

    Empty when `RunConfig.enable_compilation_cache` is False.
    """
    if not run_cfg.enable_compilation_cache:
        return ""
    if run_cfg.compilation_cache_dir:
        return run_cfg.compilation_cache_dir
    if os.environ.get(ENV_DIR):
        return os.environ[ENV_DIR]
    return os.path.join(run_cfg.base_output_directory, DEFAULT_SUBDIR)


class _Stats:
    """Counts of JAX's compilation-cache events in this process, and read errors seen."""

    def __init__(self):
        self.counts = dict.fromkeys(_EVENTS.values(), 0)
        self.read_errors: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.local()  # events fire in the compiling thread

    def on_event(self, event: str, **kwargs) -> None:
        name = _EVENTS.get(event)
        if name:
            with self._lock:
                self.counts[name] += 1
            setattr(self._thread, name, getattr(self._thread, name, 0) + 1)

    def hits_in_this_thread(self) -> int:
        """Programs this thread has loaded from the cache so far."""
        return getattr(self._thread, "hits", 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self.counts)
        counts["compiled"] = counts["requests"] - counts["hits"]
        return counts


_stats: _Stats | None = None


def _watch_read_errors(stats: _Stats) -> None:
    """JAX reports an unreadable entry only as a warning (then compiles): note it, show it."""
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(message).startswith(_READ_ERROR):
            stats.read_errors.append(str(message))
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    warnings.filterwarnings("always", message=_READ_ERROR)


def stats() -> _Stats:
    """This process's counters (registered with jax.monitoring on first use)."""
    global _stats
    if _stats is None:
        _stats = _Stats()
        jax.monitoring.register_event_listener(_stats.on_event)
        _watch_read_errors(_stats)
    return _stats


def enable(run_cfg: Any) -> str:
    """Points JAX at the run's cache (or switches it off); returns the directory, "" if off.

    Thresholds are zero so that every program, the small init and step programs included, is
    cached. Must run before the first compilation: JAX opens its cache once per process.
    """
    stats()
    path = cache_dir(run_cfg)
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        logging.info("persistent compilation cache: off")
        return ""
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logging.info("persistent compilation cache: %s", path)
    return path


def cache_dir_in_use() -> str:
    """The directory JAX caches compilations in now ("" when the cache is off)."""
    if not jax.config.jax_enable_compilation_cache:
        return ""
    return jax.config.jax_compilation_cache_dir or ""


def remove_corrupt_entries(path: str) -> list[str]:
    """Deletes entries that do not decompress (garbage, a write cut short); returns their names.

    JAX compiles past an unreadable entry but never replaces it (it writes only absent keys), so
    without this every later start would compile that program again. JAX's own decompression
    decides (zlib here, checksummed: a truncated or overwritten entry fails it).
    """
    from jax._src.compilation_cache import decompress_executable  # what JAX reads them with

    removed = []
    for entry in epath.Path(path).glob(f"*{_ENTRY_SUFFIX}"):
        try:
            decompress_executable(entry.read_bytes())
        except Exception:  # noqa: BLE001 - any failure to decompress means unreadable
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def report(path: str) -> dict[str, int]:
    """Logs what the cache served during start-up; repairs it if an entry was unreadable."""
    counts = stats().snapshot()
    logging.info("compilation cache: %d programs, %d loaded from the cache, %d compiled "
                 "(%d written)", counts["requests"], counts["hits"], counts["compiled"],
                 counts["written"])
    if path and stats().read_errors and jax.process_index() == 0:
        removed = remove_corrupt_entries(path)
        logging.warning("compilation cache: %d unreadable entr%s, compiled instead; removed "
                        "%s so that the next start writes them again",
                        len(stats().read_errors), "y" if len(stats().read_errors) == 1 else "ies",
                        removed)
        counts["removed"] = len(removed)
    return counts
