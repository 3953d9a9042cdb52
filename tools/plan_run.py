"""Plan a run without running it: parameters, FLOPs, per-device memory, checkpoint fit.

    python tools/plan_run.py --gin_file=gin/latency_network.gin [--gin_bindings=...] \
        (--num_devices 8 | --topology cpu:8) [--checkpoint STEP_DIR] [--measure] [--json]

The train step is compiled ahead of time for the target mesh (the run's MeshConfig over N
devices) and XLA's memory analysis of the compiled per-device program is reported; nothing runs.
N devices are simulated with fake CPU devices: the tool re-executes itself with
XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts. TPU topology names
(e.g. v5e-256) need libtpu's topology descriptions, which a CPU-only install lacks: the tool says
so and exits 2 (use --num_devices 256 to plan the same mesh on CPU devices; CPU memory layouts
are close to, not equal to, TPU ones).

--checkpoint STEP_DIR also checks that checkpoint restores onto the mesh (shapes, dtypes, and every
sharded dimension divisible). --measure runs the compiled step once on the CPU devices and
reports the measured per-device peak memory next to the plan.

Exit status: 0 planned (and the checkpoint fits); 2 bad arguments, config, topology or a missing /
non-checkpoint path; 3 the checkpoint cannot restore onto this mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXIT_BAD_INPUT = 2
EXIT_CHECKPOINT_DOES_NOT_FIT = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", action="append", default=[], required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--gin_search_paths", action="append", default=[])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--num_devices", type=int, help="plan for N fake CPU devices")
    target.add_argument("--topology", help="cpu:N, or a TPU topology name (needs libtpu)")
    parser.add_argument("--checkpoint", help="a step directory to check against the mesh")
    parser.add_argument("--measure", action="store_true",
                        help="also run the step once on the CPU devices and measure its memory")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def target_devices(args: argparse.Namespace) -> int | None:
    """Fake CPU devices to simulate, None for this host's own devices; exits 2 on a TPU name."""
    if args.num_devices is not None:
        if args.num_devices < 1:
            sys.exit(_fail(f"--num_devices must be >= 1, got {args.num_devices}"))
        return args.num_devices
    if args.topology is None:
        return None
    m = re.fullmatch(r"cpu:(\d+)", args.topology)
    if m:
        return int(m.group(1))
    from jax.experimental import topologies

    try:
        topologies.get_topology_desc(args.topology, "tpu")
    except Exception as e:  # RuntimeError without libtpu, ValueError for unknown names
        sys.exit(_fail(f"topology {args.topology!r} is not available here ({e}); plan the same "
                       "device count with --num_devices N (fake CPU devices) instead"))
    sys.exit(_fail(f"topology {args.topology!r}: TPU topologies are recognised but this tool "
                   "plans on jax.devices(); run it on the TPU host, or use --num_devices"))


def _fail(message: str) -> int:
    print(f"plan_run: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    n = target_devices(args)
    from pingllm import planner

    if n is not None and not planner.has_fake_cpu_devices(n, os.environ):
        env = planner.fake_cpu_device_env(n, os.environ)
        os.execve(sys.executable, [sys.executable, __file__, *argv], env)
    if args.checkpoint:
        from etils import epath

        step = epath.Path(args.checkpoint)
        items = step / "items" if (step / "items").is_dir() else step
        if not step.exists():
            return _fail(f"--checkpoint {step}: no such directory")
        if not (items / "_METADATA").exists():
            return _fail(f"--checkpoint {step}: not a checkpoint (no items/_METADATA)")
    from pingllm import config as config_lib

    try:
        cfg = config_lib.load(args.gin_file, args.gin_bindings, args.gin_search_paths)
    except config_lib.ConfigError as e:
        return _fail(f"config error: {e}")
    try:
        result = planner.plan(cfg, checkpoint=args.checkpoint, measure=args.measure)
    except ValueError as e:  # e.g. a mesh that does not fit the device count
        return _fail(str(e))
    print(json.dumps(result.to_json(), indent=1) if args.json else planner.format_plan(result))
    return EXIT_CHECKPOINT_DOES_NOT_FIT if result.checkpoint_problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
