"""The tiny model config the unit tests share, read from tests/gin/tiny.gin."""

import dataclasses
import functools
from pathlib import Path

from pingllm import config as config_lib

TINY_GIN = Path(__file__).resolve().parent / "gin" / "tiny.gin"
_EXPERIMENT = Path(__file__).resolve().parents[1] / "gin" / "latency_network.gin"


@functools.cache
def _model_config():
    return config_lib.load([str(_EXPERIMENT), str(TINY_GIN)]).model


def model_config(**changes):
    """tests/gin/tiny.gin's ModelConfig with `changes` replaced."""
    return dataclasses.replace(_model_config(), **changes)
