"""Metrics out: CLU writers to TensorBoard (process 0), throughput and MFU accounting."""

from __future__ import annotations

import concurrent.futures
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

    CLU's TensorBoard writer imports TensorFlow (~5 s of CPU, most of it holding the GIL).
    Process 0 starts that import on a background thread at the first write - after the first
    step, so that it does not slow start-up - and queues writes until the writer exists;
    `flush` and `close` wait for it. The other processes only log scalars and never import it.
    """

    def __init__(self, run_dir: str):
        self.is_lead = jax.process_index() == 0
        self._logdir = os.path.join(run_dir, "tensorboard")
        self._writer = None if self.is_lead else _LogWriter()
        self._pending = None
        self._queued: list[tuple[str, int, dict]] = []

    def _ready(self, wait: bool):
        """The writer, once created (None while the import runs and `wait` is False)."""
        if self._writer is None:
            if self._pending is None:
                _check_creatable(self._logdir)  # a bad directory fails at the first write
                pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tb_writer")
                self._pending = pool.submit(_tensorboard_writer, self._logdir)
                pool.shutdown(wait=False)
            if not wait and not self._pending.done():
                return None
            self._writer = self._pending.result()  # re-raises an import or creation error
        for method, step, values in self._queued:
            getattr(self._writer, method)(step, values)
        self._queued.clear()
        return self._writer

    def _write(self, method: str, step: int, values: dict) -> None:
        writer = self._ready(wait=False)
        if writer is None:
            self._queued.append((method, step, values))
        else:
            getattr(writer, method)(step, values)

    @property
    def writer(self):
        return self._ready(wait=True)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
        self._write("write_scalars", int(step), clean)

    def texts(self, step: int, values: Mapping[str, str]) -> None:
        self._write("write_texts", int(step), dict(values))

    def images(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        self._write("write_images", int(step), dict(values))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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


def _tensorboard_writer(logdir: str):
    from clu import metric_writers  # imports TensorFlow

    return metric_writers.create_default_writer(logdir, asynchronous=True)


class _LogWriter:
    """What CLU's LoggingWriter logs (scalars as `[step] k=v, ...`), without TensorFlow."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items()))
        logging.info("[%d] %s", step, shown)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


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
