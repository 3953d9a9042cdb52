"""TensorBoard event files written without TensorFlow, in the format CLU's SummaryWriter writes.

CLU's SummaryWriter goes through `tf.summary`, and importing TensorFlow costs ~10 s of CPU on
the 2-core machine, on every start of every run. The summaries themselves are small protobufs
that the `tensorboard` package builds in pure Python, so this writer builds the same ones
(TF2 tensor summaries: float32 scalars with the `scalars` plugin, string tensors with `text`,
`[width, height, png...]` with `images`) and frames them as TFRecords with a masked CRC-32C.
tests/test_metrics.py reads its files and CLU's with TensorBoard's EventAccumulator and
compares them. The method names are CLU's `MetricWriter`'s.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time
from collections.abc import Mapping

import google_crc32c
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.util import tensor_util

FILE_VERSION = "brain.Event:2"


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    header = struct.pack("<Q", len(data))
    return header + _masked_crc(header) + data + _masked_crc(data)


def png(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] (C = 1, 3 or 4) -> PNG; floats are read as [0, 1] and saturated."""
    from PIL import Image

    if image.dtype != np.uint8:
        image = np.clip(np.rint(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8)
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be [height, width, 1|3|4], got shape {image.shape}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[-1]]
    out = io.BytesIO()
    Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(out, format="PNG")
    return out.getvalue()


def image_summary(tag: str, images: np.ndarray) -> summary_pb2.Summary:
    """[N, H, W, C] or [H, W, C] -> what `tf.summary.image(tag, images, max_outputs=N)` writes."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    height, width = images.shape[1:3]
    tensor = np.array([str(width).encode(), str(height).encode(), *map(png, images)],
                      dtype=object)
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, tensor=tensor_util.make_tensor_proto(tensor, dtype=np.object_),
                      metadata=image_metadata.create_summary_metadata(None, None))
    return summary


class EventFileWriter:
    """Appends summaries to `<logdir>/events.out.tfevents.<time>.<host>.<pid>.v2` (local)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.v2"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")  # noqa: SIM115 - open for the writer's lifetime
        self._event(file_version=FILE_VERSION)
        self.flush()

    def _event(self, step: int = 0, **fields) -> None:
        event = event_pb2.Event(wall_time=time.time(), step=step, **fields)
        self._file.write(record(event.SerializeToString()))

    def _summary(self, step: int, summary: summary_pb2.Summary) -> None:
        self._event(step=step, summary=summary)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self._summary(step, scalar_summary.scalar_pb(tag, value))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for tag, value in texts.items():
            self._summary(step, text_summary.text_pb(tag, value))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for tag, value in images.items():
            self._summary(step, image_summary(tag, value))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
