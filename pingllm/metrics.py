"""Metrics out: TensorBoard events (process 0) and the log, throughput and MFU accounting."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging

# Dense bf16 peak FLOP/s per device by `device_kind` prefix (vendor figures).
_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 125e12,
}


def peak_flops_per_device(configured: float = 0.0) -> float:
    """Configured peak, else the device kind's table entry, else a measured matmul (CPU)."""
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind
    for prefix, flops in _PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return measured_matmul_flops()


def measured_matmul_flops(n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a large f32 matmul on one local device: the achievable peak on CPU."""
    device = jax.local_devices()[0]
    a = jax.device_put(np.ones((n, n), np.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        matmul(a).block_until_ready()
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start)


class Writer:
    """Scalars, texts and images to `<run_dir>/tensorboard` (process 0) and the log.

    Process 0 writes TensorBoard event files with `event_files.EventFileWriter` (no
    TensorFlow: its import cost ~10 s of CPU at every start), created at the first write so
    that a bad directory fails there; every process logs scalars as CLU's LoggingWriter does.
    """

    def __init__(self, run_dir: str):
        self.is_lead = jax.process_index() == 0
        self._logdir = os.path.join(run_dir, "tensorboard")
        self._events = None

    def _file(self):
        if self._events is None and self.is_lead:
            from pingllm import event_files

            _check_creatable(self._logdir)
            self._events = event_files.EventFileWriter(self._logdir)
        return self._events

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(clean.items())))
        if self.is_lead:
            self._file().write_scalars(int(step), clean)

    def texts(self, step: int, values: Mapping[str, str]) -> None:
        if self.is_lead:
            self._file().write_texts(int(step), dict(values))

    def images(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        if self.is_lead and values:
            self._file().write_images(int(step), dict(values))

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


def _check_creatable(logdir: str) -> None:
    """Raises NotADirectoryError naming a file that stands where a parent directory must be."""
    if "://" in logdir:
        return
    path = os.path.abspath(logdir)
    while path != os.path.dirname(path):
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise NotADirectoryError(f"{path} is not a directory")
            return
        path = os.path.dirname(path)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def log_progress(step: int, total: int, values: Mapping[str, float], steps_per_sec: float) -> None:
    eta = (total - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
    logging.info(
        "step %d/%d (%.1f%%) %s | %.2f steps/s ETA %s",
        step, total, 100.0 * step / max(total, 1), shown, steps_per_sec,
        format_duration(eta) if np.isfinite(eta) else "?",
    )
