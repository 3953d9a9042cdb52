"""One process of a real (possibly multi-process) checkpoint test job; also the shared test state.

Run as: python tests/ckpt_worker.py MODE --run_dir D --out O [--num_processes N --process_id I
--port P] --devices K ...; writes O/result_<I>.json. Tests import make_state/abstract_state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

W_SHAPE = (16, 8)
EMB_SHAPE = (16, 4)


def expected_leaves(step: int) -> dict[str, np.ndarray]:
    """The full (global) value of every leaf at `step`: a pure function of the step."""
    import ml_dtypes

    w = np.arange(np.prod(W_SHAPE), dtype=np.float32).reshape(W_SHAPE) * 0.25 + step
    return {
        "step": np.asarray(step, np.int32),
        "params.w": w,
        "params.b": np.linspace(-1, 1, W_SHAPE[1], dtype=np.float32) * step,
        "params.emb": (np.arange(np.prod(EMB_SHAPE)).reshape(EMB_SHAPE) / 8 - step).astype(
            ml_dtypes.bfloat16),
        "opt_state.mu": w * 0.5,
        "opt_state.count": np.asarray(step * 3, np.int32),
    }


def _shardings(mesh):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    axis = mesh.axis_names[0]
    rows = NamedSharding(mesh, P(axis))
    rep = NamedSharding(mesh, P())
    return {"step": rep, "params.w": rows, "params.b": rep, "params.emb": rows,
            "opt_state.mu": rows, "opt_state.count": rep}


def _nest(flat: dict) -> dict:
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def make_state(step: int, mesh) -> dict:
    """A TrainState-like pytree {'step', 'params', 'opt_state'} of global arrays on `mesh`."""
    import jax

    values = expected_leaves(step)
    shardings = _shardings(mesh)
    return _nest({k: jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i])
                  for k, v in values.items()})


def abstract_state(mesh, *, overrides: dict | None = None) -> dict:
    """ShapeDtypeStructs on the current mesh; overrides: leaf name -> (shape, dtype)."""
    import jax

    shardings = _shardings(mesh)
    flat = {}
    for k, v in expected_leaves(0).items():
        shape, dtype = (overrides or {}).get(k, (v.shape, v.dtype))
        flat[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
    return _nest(flat)


def mismatches(state: dict, step: int) -> list[str]:
    """Leaves whose addressable shards differ from expected_leaves(step) (empty: all equal)."""
    import jax

    from pingllm.checkpoint.format import flat_by_name as _flat_by_name

    want = expected_leaves(step)
    bad = []
    for name, arr in _flat_by_name(state).items():
        if arr.dtype != want[name].dtype:
            bad.append(f"{name}: dtype {arr.dtype}")
        for shard in arr.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), want[name][shard.index]):
                bad.append(f"{name}: shard {shard.index} differs")
    assert jax.process_count() >= 1
    return bad


class StepIterator:
    """Stand-in for the data iterator: its position is the step; Grain-style get/set_state."""

    def __init__(self, step: int = 0):
        self.step = step

    def __next__(self) -> int:
        self.step += 1
        return self.step

    def get_state(self) -> dict:
        import jax

        return {"step": self.step, "process": jax.process_index()}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def _setup(args):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax

    from pingllm import preemption

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if not args.keep_jax_preemption_service:
            preemption.disable_jax_preemption_service()
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                   process_id=args.process_id,
                                   heartbeat_timeout_seconds=20)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    return jax, mesh


def _config(args):
    from pingllm.checkpoint.manager import CheckpointConfig

    return CheckpointConfig(
        checkpoint_period=args.period,
        max_num_checkpoints_to_keep=args.keep,
        enable_emergency_checkpoint=bool(args.local_dir),
        local_checkpoint_directory=args.local_dir,
        local_checkpoint_period=args.local_period,
        persistent_checkpoint_period=args.period,
        load_full_state_path=args.load_full_state_path,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "restore", "train"])
    p.add_argument("--run_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, nargs="*", default=[])
    p.add_argument("--period", type=int, default=1000)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--local_dir", default="")
    p.add_argument("--local_period", type=int, default=0)
    p.add_argument("--load_full_state_path", default="")
    p.add_argument("--total_steps", type=int, default=10_000)
    p.add_argument("--step_seconds", type=float, default=0.05)
    p.add_argument("--time_limit", type=float, default=None)
    p.add_argument("--keep_jax_preemption_service", action="store_true")
    args = p.parse_args(argv)
    jax, mesh = _setup(args)
    from pingllm import preemption
    from pingllm.checkpoint import manager as checkpointing

    pid = jax.process_index()
    result: dict = {"process_index": pid, "process_count": jax.process_count(),
                    "devices": jax.device_count()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exit_code = 0
    ckpt = checkpointing.Checkpointer(_config(args), args.run_dir)
    if args.mode == "save":
        for step in args.steps:
            ckpt.maybe_save(step, make_state(step, mesh), StepIterator(step))
        ckpt.wait()
        result["metrics"] = [m.__dict__ for m in ckpt.pop_save_metrics()]
    elif args.mode == "restore":
        it = StepIterator(-1)
        r = ckpt.restore(abstract_state(mesh), it)
        result.update(step=r.step, source=r.source, iter_restored=r.iter_restored,
                      iter_step=it.step, skipped=r.skipped,
                      mismatches=mismatches(r.state, r.step) if r.state is not None else None)
    else:  # train: a fake loop whose state is a pure function of the step
        stop = preemption.StopSignal(preemption.StopConfig(
            time_limit_seconds=args.time_limit, time_limit_margin_seconds=0.0,
            check_every_steps=2)).install()
        it = StepIterator(0)
        r = ckpt.restore(abstract_state(mesh), it)
        step = r.step
        result["restored_step"] = step
        print("READY", flush=True)
        while step < args.total_steps:
            time.sleep(args.step_seconds)
            step += 1
            next(it)
            state = make_state(step, mesh)
            reason = stop.should_stop(step)
            ckpt.maybe_save(step, state, it, force=reason is not None)
            print(f"STEP {step}", flush=True)
            if reason is not None:
                ckpt.wait()
                result.update(stopped_at=step, reason=reason)
                exit_code = preemption.EXIT_STOPPED_AFTER_SAVE
                break
    ckpt.close()
    (out / f"result_{pid}.json").write_text(json.dumps(result, default=str))
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
