"""Gin at the edge: parse files and bindings into one `Config`, and record what ran.

Library modules define plain frozen dataclasses; this module alone registers them
with gin, so a gin file binds `ModelConfig.num_layers = 20` and nothing below the
trainer ever reads gin.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tokenize
from collections.abc import Sequence
from typing import Any

import gin.config as gin_config

import gin


class ConfigError(ValueError):
    """A config that cannot run; the message names the file/line or binding."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Run-level settings (the MaxText-named macros of the run gin files)."""

    run_name: str = "latency_network"
    base_output_directory: str = "/tmp/pingllm/outputs"  # as gin/runs/pretrain.gin
    steps: int = 200_000
    log_period: int = 100
    eval_interval: int = 1_000  # <= 0 disables periodic eval
    eval_steps: int = 10
    # Held-out queries whose RTT the model predicts at each eval (eval/rtt/... metrics, next to
    # the baselines'); 0 disables. Single-process runs only.
    eval_rtt_queries: int = 64
    seed: int = 0
    # Host<->device transfer guard inside the loop ("disallow" catches accidental copies).
    transfer_guard: str = "disallow"
    # Persistent XLA compilation cache (pingllm/compilation_cache.py): a restart loads the compiled
    # init and step. Directory "" = $JAX_COMPILATION_CACHE_DIR if set, else
    # <base_output_directory>/.jax_cache (local, Modal volume or gs://); False switches it off.
    enable_compilation_cache: bool = True
    compilation_cache_dir: str = ""
    # Peak FLOP/s of one device for the MFU estimate; 0 = look up the device kind.
    peak_flops_per_device: float = 0.0

    def __post_init__(self):
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"RunConfig.run_name must be a non-empty name, got {self.run_name!r}")
        if self.steps < 0:
            raise ConfigError(f"RunConfig.steps must be >= 0, got {self.steps}")
        if self.log_period <= 0:
            raise ConfigError(f"RunConfig.log_period must be > 0, got {self.log_period}")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.base_output_directory, self.run_name)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run needs, built from gin."""

    run: Any
    model: Any
    optimizer: Any
    mesh: Any
    data: Any
    checkpoint: Any
    stop: Any


def _config_classes() -> dict[str, type]:
    """The dataclasses a gin file may bind, by the name gin knows them by."""
    from pingllm import model, optimizer, partitioning, preemption
    from pingllm.checkpoint import manager as checkpointing
    from pingllm.data import pipeline

    return {
        "RunConfig": RunConfig,
        "ModelConfig": model.ModelConfig,
        "OptimizerConfig": optimizer.OptimizerConfig,
        "MeshConfig": partitioning.MeshConfig,
        "DataConfig": pipeline.DataConfig,
        "CheckpointConfig": checkpointing.CheckpointConfig,
        "StopConfig": preemption.StopConfig,
    }


_FIELDS = {
    "RunConfig": "run",
    "ModelConfig": "model",
    "OptimizerConfig": "optimizer",
    "MeshConfig": "mesh",
    "DataConfig": "data",
    "CheckpointConfig": "checkpoint",
    "StopConfig": "stop",
}

_registered: dict[str, Any] = {}


def _quiet_gin_resource_reader(record: logging.LogRecord) -> bool:
    """gin's package-resource probe logs an ERROR for every plain-path include it then finds."""
    return not record.pathname.endswith(os.path.join("gin", "resource_reader.py"))


logging.getLogger().addFilter(_quiet_gin_resource_reader)


def _register() -> dict[str, Any]:
    if not _registered:
        for name, cls in _config_classes().items():
            _registered[name] = gin.external_configurable(cls, name=name)
    return _registered


def _parse_one(parse, what: str, source: str) -> None:
    try:
        parse()
    except tokenize.TokenError as e:
        line = e.args[1][0] if len(e.args) > 1 else "?"
        raise ConfigError(f"{source}: gin syntax error near line {line}: {e.args[0]}") from e
    except SyntaxError as e:
        raise ConfigError(f"{source}: gin syntax error at line {e.lineno}: {e.msg}") from e
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{source}: {str(e).strip() or type(e).__name__}") from e
    except OSError as e:
        raise ConfigError(f"{what} {source!r} cannot be read: {e}") from e


def _undefined_macros() -> list[str]:
    """Bindings that reference a macro nobody defined (gin reports these as a bare TypeError)."""
    missing = []
    for (scope, selector), params in gin_config._CONFIG.items():
        for param, value in params.items():
            if (isinstance(value, gin_config.ConfigurableReference)
                    and value.selector == "gin.macro"):
                macro = value.scoped_selector.split("/")[0]
                try:
                    gin.query_parameter(f"{macro}/gin.macro.value")
                except ValueError:
                    where = f"{scope}/" if scope else ""
                    missing.append(f"{where}{selector}.{param} = %{macro}")
    return missing


def _check_required(name: str, obj: Any) -> None:
    for field in dataclasses.fields(obj):
        if getattr(obj, field.name) is gin.REQUIRED:
            raise ConfigError(
                f"{name}.{field.name} is required (bound to %gin.REQUIRED) but not set")


def load(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
) -> Config:
    """Parses gin files then bindings (later wins) and builds the `Config`.

    Every error is a `ConfigError` naming the file and line or the binding, raised
    before any device work.
    """
    classes = _register()
    gin.clear_config()
    repo_gin = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
    for path in [*search_paths, repo_gin, os.getcwd()]:
        gin.add_config_file_search_path(path)
    if not gin_files:
        raise ConfigError("no --gin_file given")
    for path in gin_files:
        _parse_one(functools.partial(gin.parse_config_file, path), "gin file", path)
    for binding in gin_bindings:
        _parse_one(functools.partial(gin.parse_config, binding), "binding",
                   f"--gin_bindings={binding!r}")
    missing = _undefined_macros()
    if missing:
        raise ConfigError("undefined gin macro: " + "; ".join(missing))
    built = {}
    for name, configurable in classes.items():
        try:
            obj = configurable()
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{name}: {e}") from e
        _check_required(name, obj)
        built[_FIELDS[name]] = obj
    cfg = Config(**built)
    _check_consistent(cfg)
    return cfg


def _check_consistent(cfg: Config) -> None:
    """Values two parts must agree on (the dataset is chunked for one window length)."""
    if cfg.data.max_target_length != cfg.model.max_target_length:
        raise ConfigError(
            f"DataConfig.max_target_length ({cfg.data.max_target_length}) != "
            f"ModelConfig.max_target_length ({cfg.model.max_target_length}); bind both to "
            "%MAX_TARGET_LENGTH"
        )


def config_str() -> str:
    """The full parsed config (all bindings), as written beside the run."""
    return gin.config_str()


def operative_config_str() -> str:
    """Only the bindings that were used (valid once the configurables were called)."""
    return gin.operative_config_str()
