"""The training loop: restore or initialise, then step, log, evaluate and save until done or
told to stop."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from pingllm import compilation_cache, partitioning, preemption
from pingllm import config as config_lib
from pingllm import executable_cache as executable_cache_lib
from pingllm import metrics as metrics_lib
from pingllm import model as model_lib
from pingllm import optimizer as optimizer_lib
from pingllm import step as step_lib
from pingllm import train_state as state_lib
from pingllm.checkpoint import manager as checkpointing
from pingllm.checkpoint import storage
from pingllm.data import pipeline
from pingllm.eval import in_loop as rtt_eval

EXIT_DONE = 0
EXIT_STOPPED = 75  # EX_TEMPFAIL: saved and stopped early; rerun the same command to resume.


@dataclasses.dataclass
class Setup:
    """What the loop runs with, built once at start-up (no device memory yet)."""

    mesh: Any
    rules: Any
    optimizer: Any
    abstract_state: Any
    state_shardings: Any
    train_step: Callable
    eval_step: Callable
    compiled_eval: Any = None  # eval_step compiled at the first evaluation
    # Start-up programs loaded whole on a restart (executable_cache.py); None: always built.
    executables: executable_cache_lib.ExecutableCache | None = None


def _write_config(run_dir: epath.Path) -> None:
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.gin").write_text(config_lib.config_str())


def wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
    """A barrier in JAX's coordination service, not a device collective.

    Every program's first cross-process collective sets up a gloo context that gives up after
    30 s (CPU jobs), so a process that arrives late - still compiling (the persistent cache can
    serve one process and not another), building the dataset - crashes its peers. Processes wait
    here, with a long timeout, before such a first collective.
    """
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def build(cfg: config_lib.Config,
          executables: executable_cache_lib.ExecutableCache | None = None) -> Setup:
    """Mesh, abstract sharded state and the jitted steps.

    With `executables`, the abstract state comes from its entry when there is one (no trace of
    the model's init).
    """
    if cfg.data.windows_per_row > 1 and model_lib.attention_implementation(cfg.model) == "cudnn":
        # cuDNN attention here masks by row length: it cannot keep packed windows apart.
        raise config_lib.ConfigError(
            "DataConfig.windows_per_row > 1 packs windows that need the segment mask: set "
            "ModelConfig.attention = 'dot_product' (this backend would use cuDNN)")
    mesh = partitioning.make_mesh(cfg.mesh)
    rules = cfg.mesh.logical_axis_rules
    tx, schedule = optimizer_lib.make_optimizer(cfg.optimizer)
    ema = cfg.optimizer.ema_decay > 0

    def trace_abstract_state():
        return state_lib.abstract_train_state(cfg.model, tx, mesh, rules, seed=cfg.run.seed,
                                              ema=ema)

    if executables is None:
        abstract_state, shardings = trace_abstract_state()
    else:
        abstract_state, shardings = executables.value(
            "abstract_state", (cfg.model, cfg.optimizer, cfg.mesh, cfg.run.seed),
            trace_abstract_state,
            encode=lambda built: state_lib.describe_abstract(built[0]),
            decode=lambda d: state_lib.abstract_from_description(d, mesh))
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    train_step = step_lib.make_train_step(
        cfg.model, tx, schedule, shardings, batch_sharding, mesh, rules,
        novel_result_weight=cfg.optimizer.novel_result_weight,
        params_average=optimizer_lib.params_average(cfg.optimizer),
        rtt_sigma=cfg.optimizer.rtt_label_sigma,
    )
    eval_step = step_lib.make_eval_step(cfg.model, shardings.params, batch_sharding, mesh, rules)
    return Setup(mesh, rules, tx, abstract_state, shardings, train_step, eval_step,
                 executables=executables)


def global_batch(setup: Setup, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return partitioning.make_global_batch(local_batch, setup.mesh, setup.rules)


def evaluate(setup: Setup, params, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """Token-weighted means over the eval batches (eval_step returns sums)."""
    totals: dict[str, float] = {}
    for local_batch in batches:
        batch = global_batch(setup, local_batch)
        if setup.compiled_eval is None:
            setup.compiled_eval = setup.eval_step.lower(params, batch).compile()
            wait_for_all_processes("pingllm_eval_compiled")
        sums = jax.device_get(setup.compiled_eval(params, batch))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: float(v) for k, v in step_lib.means_from_sums(totals).items()}


class _Window:
    """Train metrics of the steps since the last log line, fetched lazily."""

    def __init__(self, step: int):
        self.first_step = step
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
    compilation_cache.enable(cfg.run)
    executables = _executable_cache()
    stop_cfg = cfg.stop
    if jax.process_count() == 1:  # no collective to amortise: look at the flag every step
        stop_cfg = dataclasses.replace(stop_cfg, check_every_steps=1)
    data_prepare_s = _prepare_data(cfg)
    writer = metrics_lib.Writer(_tensorboard_parent(run_dir))
    with preemption.StopSignal(stop_cfg) as stop:
        try:
            return _train(cfg, run_dir, stop, writer, started, data_prepare_s, executables)
        finally:
            writer.close()
            _sync_tensorboard(run_dir)


def _prepare_data(cfg) -> float:
    """Builds the dataset if missing (process 0; the others wait); returns the seconds taken."""
    t = time.perf_counter()
    if jax.process_index() == 0:
        pipeline.prepare(cfg.data)
    wait_for_all_processes("pingllm_data_prepared", timeout_s=4 * 3600)  # may build the data
    return time.perf_counter() - t


def _executable_cache() -> executable_cache_lib.ExecutableCache:
    """Beside the compilation cache in use (off with it, with several processes, and with
    $PINGLLM_EXECUTABLE_CACHE=0)."""
    reason = ""
    if os.environ.get(executable_cache_lib.ENV_SWITCH, "1") == "0":
        reason = f"${executable_cache_lib.ENV_SWITCH}=0"
    elif jax.process_count() > 1:
        reason = ("several processes: not verified that every process loads the same entry; the "
                  "compilation cache still serves them")
    return executable_cache_lib.ExecutableCache(compilation_cache.cache_dir_in_use(),
                                                disabled_reason=reason)


def _train(cfg, run_dir, stop, writer, started, data_prepare_s, executables) -> int:
    setup = build(cfg, executables)
    # From the abstract state build() made: model_lib.param_count would trace the model again.
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
    logging.info("model: %s parameters (%.1fM)", f"{n_params:,}", n_params / 1e6)

    checkpointer = checkpointing.Checkpointer(cfg.checkpoint, str(run_dir))
    try:
        return _loop(cfg, setup, checkpointer, stop, writer, started, data_prepare_s)
    finally:
        checkpointer.close()


def _state_from_params(setup: Setup, params) -> state_lib.TrainState:
    """Step 0 with a fresh optimizer around given parameters (LOAD_PARAMETERS_PATH)."""
    ema = setup.state_shardings.ema_params is not None
    init = lambda p: state_lib.state_from_params(p, setup.optimizer, ema)
    return jax.jit(init, out_shardings=setup.state_shardings)(params)


def _leaf_fingerprint(leaf: jax.Array) -> jax.Array:
    """sum(bits[i] * (2654435761 * i + 1)) mod 2**32 over the flat index i of every element.

    Integer sums wrap exactly in any order, so every mesh and process count gives the same value
    without gathering the leaf; the position weight makes moved values count.
    """
    bits = jax.lax.bitcast_convert_type(leaf, _UINT_OF_SIZE[leaf.dtype.itemsize]).astype(jnp.uint32)
    index = jnp.zeros(leaf.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(leaf.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, leaf.shape, axis) * jnp.uint32(
            stride % 2**32)
        stride *= leaf.shape[axis]
    return jnp.sum(bits * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


_UINT_OF_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_fingerprints(tree) -> list[jax.Array]:
    return [_leaf_fingerprint(x) for x in jax.tree.leaves(tree)]


def _fingerprint_program(tree, executables=None):
    """tree_fingerprint's program for `tree` (arrays, or abstract ones of the same shardings)."""
    lower = lambda: jax.jit(_leaf_fingerprints).lower(tree)
    if executables is None:
        return lower().compile()
    return executables.compiled("fingerprint", executable_cache_lib.spec(tree), lower)


def _precompile_for_resume(setup: Setup) -> None:
    """On a fresh start, compiles (into the persistent cache) the program a resume adds.

    A restore logs the parameters' fingerprint: without this the first resume compiles it. On a
    thread after the first step, process 0 only (the one that writes the cache); not a daemon,
    so a short run's exit waits for it.
    """
    if jax.process_index() == 0 and compilation_cache.cache_dir_in_use():
        threading.Thread(target=_fingerprint_program,
                         args=(setup.abstract_state.params, setup.executables),
                         name="precompile_for_resume").start()


def tree_fingerprint(tree, executables=None) -> str:
    """16 hex digits naming the exact bits of every leaf (same value on any mesh or host count).

    Logged after a restore so a test (or a person) can check the restored parameters against the
    checkpoint on disk; tests/resume_helpers.py recomputes it with NumPy.
    """
    compiled = _fingerprint_program(tree, executables)
    wait_for_all_processes("pingllm_fingerprint_compiled")
    per_leaf = compiled(tree)
    words = np.asarray([int(v) for v in jax.device_get(per_leaf)], dtype="<u4")
    return hashlib.sha256(words.tobytes()).hexdigest()[:16]


def batch_digest(local_batch: dict[str, np.ndarray]) -> str:
    """16 hex digits of this process's rows of a batch (every key, sorted by name)."""
    digest = hashlib.sha256()
    for key in sorted(local_batch):
        value = np.ascontiguousarray(local_batch[key])
        digest.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


class _DataPosition:
    """The iterator's state frozen at one step: saved with that step's train state.

    The loop fetches the next batch before it saves (to overlap it with the device), so the live
    iterator is one step ahead of the state by then.
    """

    def __init__(self, state):
        self._state = state

    def get_state(self):
        return self._state


def _initial_state(cfg, setup, checkpointer, iterator):
    """Restores the newest complete checkpoint onto this mesh, else initialises sharded."""
    restored = checkpointer.restore(setup.abstract_state, iterator)
    for path, problem in restored.skipped:
        logging.warning("skipped checkpoint %s (left on disk): %s", path, problem)
    if restored.state is not None:
        logging.info("restored step %d from the %s tier; params fingerprint %s",
                     int(restored.step), restored.source,
                     tree_fingerprint(restored.state.params, setup.executables))
        return restored.state, restored
    if restored.params is not None:
        logging.info("starting from parameters of %s (step 0, fresh optimizer); params "
                     "fingerprint %s", cfg.checkpoint.load_parameters_path,
                     tree_fingerprint(restored.params))
        return _state_from_params(setup, restored.params), restored
    logging.info("no checkpoint: initialising a fresh, sharded train state")
    init = state_lib.init_program(cfg.model, setup.optimizer, setup.state_shardings,
                                  seed=cfg.run.seed, ema=cfg.optimizer.ema_decay > 0)
    if setup.executables is None:
        return init(), restored
    parts = (cfg.model, cfg.optimizer, cfg.mesh, cfg.run.seed,
             executable_cache_lib.spec(setup.abstract_state))
    return setup.executables.compiled("init", parts, init.lower)(), restored


# TensorBoard on gs://: an event file grows by appends, which an object cannot take, so the
# events go to a local mirror directory and are copied up (storage.Mirror) at every log period
# and at exit. See docs/object_storage.md.
_TB_MIRRORS: dict[str, storage.Mirror] = {}


def _tensorboard_parent(run_dir: epath.Path) -> str:
    if not storage.is_remote(run_dir) or jax.process_index() != 0:
        return str(run_dir)
    local = storage.local_mirror(run_dir)
    _TB_MIRRORS[str(run_dir)] = storage.Mirror(f"{local}/tensorboard", run_dir / "tensorboard")
    return local


def _sync_tensorboard(run_dir: epath.PathLike) -> None:
    mirror = _TB_MIRRORS.get(str(run_dir))
    if mirror is not None:
        try:
            mirror.sync()
        except Exception as e:  # a lost sync only delays the events; the run goes on
            logging.warning("copying TensorBoard events to %s failed: %s", run_dir, e)


def _progress_file(cfg) -> epath.Path:
    return epath.Path(cfg.run.run_dir) / "progress.json"


def _record_progress(cfg, step: int) -> None:
    """The last step known reached, so a restart can report the steps it lost."""
    if jax.process_index() == 0:
        path = _progress_file(cfg)
        text = json.dumps({"step": int(step), "time": time.time()})
        if storage.is_remote(path):  # one object write is atomic on a bucket (no rename there)
            path.write_text(text)
        else:
            tmp = path.parent / (path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
        _sync_tensorboard(cfg.run.run_dir)


def _steps_lost(cfg, restored_step: int) -> int:
    path = _progress_file(cfg)
    try:
        reached = int(json.loads(path.read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0
    return max(0, reached - restored_step)


def _loop(cfg, setup, checkpointer, stop, writer, started, data_prepare_s) -> int:
    process_index, process_count = jax.process_index(), jax.process_count()
    iterator = pipeline.train_iterator(
        cfg.data, process_index=process_index, process_count=process_count, start_step=0
    )
    t = time.perf_counter()
    state, restored = _initial_state(cfg, setup, checkpointer, iterator)
    step = int(jax.device_get(state.step))
    restore_s = time.perf_counter() - t
    if restored.state is None or not restored.iter_restored:
        # Fresh start, parameters only, or another process layout wrote it: the data is a pure
        # function of the step, so derive the position.
        iterator = pipeline.train_iterator(
            cfg.data, process_index=process_index, process_count=process_count, start_step=step
        )
    total = cfg.run.steps
    if step >= total:
        logging.info("run %s already complete at step %d (STEPS=%d); nothing to do",
                     cfg.run.run_name, step, total)
        return EXIT_DONE
    steps_lost = _steps_lost(cfg, step)

    t = time.perf_counter()
    local_batch = next(iterator)
    batch = global_batch(setup, local_batch)
    first_batch_s = time.perf_counter() - t
    rows = iterator.layout.local_batch_size
    logging.info("first batch: step %d, process %d of %d, rows [%d, %d), digest %s", step,
                 process_index, process_count, process_index * rows, (process_index + 1) * rows,
                 batch_digest(local_batch))
    # Made on the mesh by jit: device_put cannot target other processes' devices.
    dropout_key = _program(setup, "dropout_key", cfg.run.seed, jax.jit(
        lambda: jax.random.key(cfg.run.seed + 1),
        out_shardings=partitioning.replicated(setup.mesh),
    ).lower)()
    t = time.perf_counter()
    # Lowered from the abstract state: a fresh and a restored state then share one compiled
    # program (and one persistent-cache entry; concrete arrays carry layouts into the key).
    spec = executable_cache_lib.spec
    train_step = _program(
        setup, "train_step",
        (cfg.model, cfg.optimizer, cfg.mesh, spec(setup.abstract_state), spec(batch),
         spec(dropout_key)),
        lambda: setup.train_step.lower(setup.abstract_state, batch, dropout_key))
    wait_for_all_processes("pingllm_train_step_compiled")
    compile_s = time.perf_counter() - t

    tokens_per_step = cfg.data.global_batch_size * cfg.model.max_target_length
    # After the first step: flops_per_token traces the model (~1 s), and on CPU the peak is a
    # measured matmul (a compile and 0.3 s of running).
    flops_per_step = peak = None
    window = _Window(step)
    first = True
    reason = None

    while True:
        with jax.transfer_guard(cfg.run.transfer_guard):
            state, step_metrics = train_step(state, batch, dropout_key)
        step += 1
        window.metrics.append(step_metrics)

        if first:
            first = False
            jax.block_until_ready(state)
            ttfs = time.time() - started
            logging.info(
                "time to first step %.2fs (data %.2fs, restore %.2fs, first batch %.2fs, "
                "compile %.2fs); steps lost since the last save: %d",
                ttfs, data_prepare_s, restore_s, first_batch_s, compile_s, steps_lost,
            )
            flops_per_step = model_lib.flops_per_token(cfg.model) * tokens_per_step
            peak = (metrics_lib.peak_flops_per_device(cfg.run.peak_flops_per_device)
                    * jax.device_count())
            cache = compilation_cache.report(compilation_cache.cache_dir(cfg.run))
            loaded = setup.executables.report()
            if restored.state is None:
                _precompile_for_resume(setup)
            writer.scalars(step, {
                "startup/programs_from_compilation_cache": cache["hits"],
                "startup/programs_compiled": cache["compiled"],
                "startup/programs_from_executable_cache": loaded["loaded"],
                "startup/programs_traced": loaded["built"],
                "startup/time_to_first_step_s": ttfs, "startup/restore_s": restore_s,
                "startup/compile_s": compile_s, "startup/first_batch_s": first_batch_s,
                "startup/data_prepare_s": data_prepare_s,
                "startup/steps_lost_since_last_save": steps_lost,
            })
            if process_index == 0:
                operative = config_lib.operative_config_str()
                (epath.Path(cfg.run.run_dir) / "operative_config.gin").write_text(operative)
                writer.texts(step, {"config/operative": f"```\n{operative}\n```"})
            # Keep the first step's metrics, but time throughput from here: it excludes compile.
            window.first_step, window.start = step, time.perf_counter()

        done = step >= total
        if not done:
            reason = stop.should_stop(step)
        if done or reason:
            break

        # Fetch the next batch while the device runs this step.
        position = _DataPosition(iterator.get_state())
        batch = global_batch(setup, next(iterator))

        if step % cfg.run.log_period == 0 and window.metrics:
            _log_window(writer, window, step, total, tokens_per_step, flops_per_step, peak)
            _record_progress(cfg, step)
            window = _Window(step)
        if cfg.run.eval_interval > 0 and step % cfg.run.eval_interval == 0:
            _run_eval(cfg, setup, state, writer, step)
        checkpointer.maybe_save(step, state, position)
        _write_save_metrics(writer, checkpointer)

    if window.metrics:
        _log_window(writer, window, step, total, tokens_per_step, flops_per_step, peak)
    _record_progress(cfg, step)
    if done and cfg.run.eval_interval > 0:  # the final model is always evaluated
        _run_eval(cfg, setup, state, writer, step)
    if reason:
        logging.warning("stopping at step %d: %s; saving a checkpoint", step, reason)
    force = bool(reason) or cfg.checkpoint.save_checkpoint_on_completion
    checkpointer.maybe_save(step, state, iterator, force=force)
    checkpointer.wait()
    _write_save_metrics(writer, checkpointer)
    writer.flush()
    if done:
        logging.info("run %s complete at step %d", cfg.run.run_name, step)
        return EXIT_DONE
    logging.warning("saved step %d; exit %d: run the same command to resume", step, EXIT_STOPPED)
    return EXIT_STOPPED


def _program(setup: Setup, name: str, parts, lower: Callable):
    """`lower().compile()`, through the setup's executable cache when it has one."""
    if setup.executables is None:
        return lower().compile()
    return setup.executables.compiled(name, parts, lower)


def _write_save_metrics(writer, checkpointer) -> None:
    for m in checkpointer.pop_save_metrics():
        writer.scalars(m.step, {
            f"checkpoint/{m.tier}/blocking_s": m.blocking_seconds,
            f"checkpoint/{m.tier}/write_s": m.write_seconds,
            f"checkpoint/{m.tier}/bytes": m.bytes_written,
            f"checkpoint/{m.tier}/gb_per_s": m.gb_per_second,
        })


def _log_window(writer, window, step, total, tokens_per_step, flops_per_step, peak):
    values = window.mean()
    elapsed = time.perf_counter() - window.start
    steps = step - window.first_step
    steps_per_sec = steps / elapsed if steps > 0 and elapsed > 0 else 0.0
    if steps_per_sec > 0:  # a window holding only the first (compiling) step has no rate
        values.update({
            "perf/steps_per_sec": steps_per_sec,
            "perf/tokens_per_sec": steps_per_sec * tokens_per_step,
            "perf/mfu": steps_per_sec * flops_per_step / peak if peak > 0 else 0.0,
        })
    writer.scalars(step, values)
    shown = {k: values[k] for k in ("loss",) if k in values}
    metrics_lib.log_progress(step, total, shown, steps_per_sec)


def _run_eval(cfg, setup, state, writer, step):
    t = time.perf_counter()
    batches = pipeline.eval_batches(
        cfg.data, process_index=jax.process_index(), process_count=jax.process_count(),
        num_batches=cfg.run.eval_steps,
    )
    # The moving average when the run keeps one: what pingllm.predict and evaluate load.
    values = evaluate(setup, state.eval_params, batches)
    values.update(_rtt_metrics(cfg, setup, state.eval_params))
    writer.scalars(step, {f"eval/{k}": v for k, v in values.items()})
    logging.info("eval at step %d (%.1fs): %s", step, time.perf_counter() - t,
                 " ".join(f"{k}={v:.4g}" for k, v in values.items()))


def _rtt_metrics(cfg, setup, params) -> dict[str, float]:
    """Held-out RTT errors of the model and the baselines (rtt_eval: every process takes part)."""
    if cfg.run.eval_rtt_queries <= 0:
        return {}
    return rtt_eval.rtt_metrics(cfg, params, setup.mesh, setup.rules,
                                max_queries=cfg.run.eval_rtt_queries,
                                barrier=wait_for_all_processes)
