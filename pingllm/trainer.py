"""The training loop: restore or initialise, then step, log, evaluate and save until done or told to stop."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from pingllm import checkpointing, config as config_lib, metrics as metrics_lib
from pingllm import model as model_lib, optimizer as optimizer_lib, partitioning, preemption
from pingllm import step as step_lib, train_state as state_lib
from pingllm.data import pipeline

EXIT_DONE = 0
EXIT_STOPPED = 75  # EX_TEMPFAIL: saved and stopped early; rerun the same command to resume.


@dataclasses.dataclass
class Setup:
    """What the loop runs with, built once at start-up."""

    mesh: Any
    rules: Any
    model: Any
    abstract_state: Any
    state_shardings: Any
    train_step: Callable
    eval_step: Callable
    schedule: Callable


def _write_config(run_dir: epath.Path) -> None:
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.gin").write_text(config_lib.config_str())


def _enable_compilation_cache(path: str) -> None:
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def build(cfg: config_lib.Config) -> Setup:
    """Mesh, model, abstract sharded state and the jitted steps; no device memory yet."""
    mesh = partitioning.make_mesh(cfg.mesh)
    rules = cfg.mesh.logical_axis_rules
    model = model_lib.Transformer(cfg.model)
    tx, schedule = optimizer_lib.make_optimizer(cfg.optimizer)
    abstract_state, shardings = state_lib.abstract_train_state(
        cfg.model, tx, mesh, rules, seed=cfg.run.seed
    )
    train_step = step_lib.make_train_step(cfg.model, tx, schedule, shardings, mesh, rules, seed=cfg.run.seed)
    eval_step = step_lib.make_eval_step(cfg.model, shardings, mesh, rules)
    return Setup(mesh, rules, model, abstract_state, shardings, train_step, eval_step, schedule)


def _global_batch(setup: Setup, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return partitioning.make_global_batch(local_batch, setup.mesh, setup.rules)


def evaluate(setup: Setup, params, batches: Iterator[dict[str, np.ndarray]]) -> dict[str, float]:
    """Token-weighted means over the eval batches (eval_step returns sums)."""
    totals: dict[str, float] = {}
    for local_batch in batches:
        sums = jax.device_get(setup.eval_step(params, _global_batch(setup, local_batch)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return step_lib.finalize_eval(totals)


class _Window:
    """Train metrics of the steps since the last log line, fetched lazily."""

    def __init__(self):
        self.metrics: list[dict[str, jax.Array]] = []
        self.start = time.perf_counter()

    def mean(self) -> dict[str, float]:
        fetched = jax.device_get(self.metrics)
        return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def train(cfg: config_lib.Config) -> int:
    """Runs (or resumes) the configured run; returns the process exit status."""
    started = time.time()
    run_dir = epath.Path(cfg.run.run_dir)
    _write_config(run_dir)
    _enable_compilation_cache(cfg.run.compilation_cache_dir)
    stop = preemption.StopSignal(time_limit_seconds=cfg.run.time_limit_seconds)
    writer = metrics_lib.Writer(str(run_dir))
    try:
        return _train(cfg, run_dir, stop, writer, started)
    finally:
        writer.close()
        stop.uninstall()


def _train(cfg, run_dir, stop, writer, started) -> int:
    setup = build(cfg)
    n_params = model_lib.param_count(cfg.model)
    logging.info("model: %s parameters (%.1fM)", f"{n_params:,}", n_params / 1e6)

    t = time.perf_counter()
    if jax.process_index() == 0:
        pipeline.prepare(cfg.data)
    multihost_utils.sync_global_devices("pingllm:data_prepared")
    data_prepare_s = time.perf_counter() - t

    checkpointer = checkpointing.Checkpointer(cfg.checkpoint, str(run_dir))
    try:
        return _loop(cfg, setup, checkpointer, stop, writer, started, data_prepare_s)
    finally:
        checkpointer.close()


def _initial_state(cfg, setup, checkpointer, iterator):
    """Restores the newest complete checkpoint onto this mesh, else initialises sharded."""
    t = time.perf_counter()
    restored = checkpointer.restore(setup.abstract_state, iterator)
    restore_s = time.perf_counter() - t
    if restored.state is not None:
        state = restored.state
        logging.info("restored step %d from %s in %.2fs", int(restored.step), restored.source, restore_s)
    else:
        state = state_lib.init_train_state(
            cfg.model, setup.abstract_state, setup.state_shardings, setup.mesh, setup.rules,
            seed=cfg.run.seed, params=restored.params,
        )
        logging.info("initialised a fresh train state (%s)", restored.source or "no checkpoint")
    return state, restored, restore_s


def _loop(cfg, setup, checkpointer, stop, writer, started, data_prepare_s) -> int:
    process_index, process_count = jax.process_index(), jax.process_count()
    iterator = pipeline.train_iterator(
        cfg.data, process_index=process_index, process_count=process_count, start_step=0
    )
    state, restored, restore_s = _initial_state(cfg, setup, checkpointer, iterator)
    step = int(jax.device_get(state.step))
    if restored.state is not None and not restored.iter_restored:
        # Another process layout wrote it: the data is a pure function of the step.
        iterator = pipeline.train_iterator(
            cfg.data, process_index=process_index, process_count=process_count, start_step=step
        )
    total = cfg.run.steps
    if step >= total:
        logging.info("run %s already complete at step %d (STEPS=%d); nothing to do",
                     cfg.run.run_name, step, total)
        return EXIT_DONE

    t = time.perf_counter()
    batch = _global_batch(setup, next(iterator))
    first_batch_s = time.perf_counter() - t
    t = time.perf_counter()
    train_step = setup.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t

    tokens_per_step = cfg.data.global_batch_size * cfg.model.max_target_length
    flops_per_step = model_lib.flops_per_token(cfg.model) * tokens_per_step
    peak = metrics_lib.peak_flops_per_device(cfg.run.peak_flops_per_device) * jax.device_count()
    guard = cfg.run.transfer_guard
    window, last_log_step = _Window(), step
    first_step_logged = False

    while True:
        with jax.transfer_guard(guard):
            state, step_metrics = train_step(state, batch)
        step += 1
        window.metrics.append(step_metrics)

        if not first_step_logged:
            jax.block_until_ready(state)
            first_step_logged = True
            ttfs = time.time() - started
            logging.info(
                "time to first step %.2fs (data prepare %.2fs, restore %.2fs, first batch %.2fs, compile %.2fs)",
                ttfs, data_prepare_s, restore_s, first_batch_s, compile_s,
            )
            writer.scalars(step, {
                "startup/time_to_first_step_s": ttfs, "startup/restore_s": restore_s,
                "startup/compile_s": compile_s, "startup/first_batch_s": first_batch_s,
                "startup/data_prepare_s": data_prepare_s,
                "startup/steps_lost_since_last_save": restored.steps_lost,
            })
            if jax.process_index() == 0:
                operative = config_lib.operative_config_str()
                (epath.Path(cfg.run.run_dir) / "operative_config.gin").write_text(operative)
                writer.texts(step, {"config/operative": f"```\n{operative}\n```"})
            window = _Window()
            last_log_step = step

        done = step >= total
        reason = None if done else stop.should_stop(step)
        if done or reason:
            break

        # Dispatch the next step before fetching this one's metrics: the device never waits on the host.
        batch = _global_batch(setup, next(iterator))

        if step % cfg.run.log_period == 0 and window.metrics:
            _log_window(writer, window, step, last_log_step, total, tokens_per_step, flops_per_step, peak)
            window, last_log_step = _Window(), step
        if cfg.run.eval_interval > 0 and step % cfg.run.eval_interval == 0:
            _run_eval(cfg, setup, state, writer, step)
        saved = checkpointer.maybe_save(step, state, iterator)
        if saved:
            writer.scalars(step, checkpointer.last_save_metrics())

    if window.metrics:
        _log_window(writer, window, step, last_log_step, total, tokens_per_step, flops_per_step, peak)
    if done and cfg.run.eval_interval > 0 and step % cfg.run.eval_interval != 0:
        _run_eval(cfg, setup, state, writer, step)
    if done:
        saved = checkpointer.save_on_completion(step, state, iterator)
    else:
        logging.warning("stopping at step %d: %s; saving a checkpoint", step, reason)
        saved = checkpointer.maybe_save(step, state, iterator, force=True)
    checkpointer.wait()
    if saved:
        writer.scalars(step, checkpointer.last_save_metrics())
    writer.flush()
    if done:
        logging.info("run %s complete at step %d", cfg.run.run_name, step)
        return EXIT_DONE
    logging.warning("saved step %d; exiting %d so the same command resumes", step, EXIT_STOPPED)
    return EXIT_STOPPED


def _log_window(writer, window, step, last_log_step, total, tokens_per_step, flops_per_step, peak):
    values = window.mean()
    elapsed = time.perf_counter() - window.start
    steps = step - last_log_step
    steps_per_sec = steps / elapsed if elapsed > 0 else 0.0
    values.update({
        "perf/steps_per_sec": steps_per_sec,
        "perf/tokens_per_sec": steps_per_sec * tokens_per_step,
        "perf/mfu": steps_per_sec * flops_per_step / peak if peak > 0 else 0.0,
    })
    writer.scalars(step, values)
    metrics_lib.log_progress(step, total, {k: values[k] for k in ("loss",) if k in values}, steps_per_sec)


def _run_eval(cfg, setup, state, writer, step):
    t = time.perf_counter()
    batches = pipeline.eval_batches(
        cfg.data, process_index=jax.process_index(), process_count=jax.process_count(),
        num_batches=cfg.run.eval_steps,
    )
    values = evaluate(setup, state.params, batches)
    writer.scalars(step, {f"eval/{k}": v for k, v in values.items()})
    logging.info("eval at step %d (%.1fs): %s", step, time.perf_counter() - t,
                 " ".join(f"{k}={v:.4g}" for k, v in values.items()))
