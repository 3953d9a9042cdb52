"""Plan a run without running it: parameters, FLOPs, per-device memory, HBM fit, checkpoint fit.

    pingllm-plan-run --gin_file=gin/latency_network.gin [--gin_bindings=...] \
        (--num_devices 8 | --topology cpu:8 | --topology v5e-256 [--num_slices 2]) \
        [--checkpoint STEP_DIR] [--measure] [--json]

The train step the trainer runs (trainer.build, the pipeline's batch keys and dtypes) is compiled
ahead of time for the target mesh and XLA's memory analysis of the compiled per-device program is
reported; nothing runs.

- TPU topologies (v5e-256, v5p-128, v4-32, v6e-64: Cloud accelerator types, where v4/v5p count
  TensorCores; or chips per torus axis, v5e:4x4, v5p:4x4x4) are compiled by libtpu (the `plan`
  extra: pip install -e '.[plan]') for every chip of the slice(s), on a host without TPUs: the
  report is XLA's TPU memory accounting against the chip's HBM, and a roofline ESTIMATE of step
  time and tokens/s at the generation's bf16 peak. --num_slices N plans N slices joined over DCN;
  a config without DCN axes then gets MeshConfig.data_dcn = N (data parallel over slices).
- --num_devices N (or cpu:N) simulates N fake CPU devices (CPU memory layouts are close to, not
  equal to, TPU ones); --measure then also runs the compiled step once and reports its measured
  per-device peak.

The tool re-executes itself with the environment the target needs (XLA_FLAGS for fake CPU
devices; for TPU topologies JAX_PLATFORMS=cpu plus the variables libtpu expects), so the
planning process never opens a TPU runtime.

--checkpoint STEP_DIR also checks that checkpoint restores onto the mesh (shapes, dtypes, and every
sharded dimension divisible).

Exit status: 0 planned (fits the chip's HBM, and the checkpoint fits); 2 bad arguments, config,
topology or a missing / non-checkpoint path; 3 does not fit: the step needs more than the chip's
HBM, or the checkpoint cannot restore onto this mesh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3
EXIT_CHECKPOINT_DOES_NOT_FIT = EXIT_DOES_NOT_FIT


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", action="append", default=[], required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--gin_search_paths", action="append", default=[])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--num_devices", type=int, help="plan for N fake CPU devices")
    target.add_argument("--topology", help="cpu:N, or a TPU topology: v5e-256, v4-32, v5e:4x4")
    parser.add_argument("--num_slices", type=int, default=1,
                        help="TPU slices joined over DCN (with --topology)")
    parser.add_argument("--checkpoint", help="a step directory to check against the mesh")
    parser.add_argument("--measure", action="store_true",
                        help="also run the step once on the CPU devices and measure its memory")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def target(args: argparse.Namespace):
    """(fake CPU devices or None, TPU Topology or None); exits 2 on a bad target."""
    from pingllm import planner

    if args.num_slices != 1 and (args.topology is None or args.topology.startswith("cpu:")):
        sys.exit(_fail("--num_slices needs a TPU --topology"))
    if args.num_devices is not None:
        if args.num_devices < 1:
            sys.exit(_fail(f"--num_devices must be >= 1, got {args.num_devices}"))
        return args.num_devices, None
    if args.topology is None:
        return None, None
    m = re.fullmatch(r"cpu:(\d+)", args.topology)
    if m:
        return int(m.group(1)), None
    try:
        return None, planner.parse_topology(args.topology, args.num_slices)
    except planner.TopologyError as e:
        sys.exit(_fail(str(e)))


def _fail(message: str) -> int:
    print(f"plan_run: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _with_slices(cfg, num_slices: int):
    """Data parallel over the slices when the config names no DCN axes of its own."""
    import math

    if num_slices == 1 or math.prod(cfg.mesh.dcn_shape) != 1:
        return cfg
    print(f"plan_run: {num_slices} slices: MeshConfig.data_dcn = {num_slices}", file=sys.stderr)
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data_dcn=num_slices))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    n, topology = target(args)
    from pingllm import planner

    if n is not None and not planner.has_fake_cpu_devices(n, os.environ):
        env = planner.fake_cpu_device_env(n, os.environ)
        os.execve(sys.executable, [sys.executable, "-m", "pingllm.cli.plan_run", *argv], env)
    if topology is not None and not planner.has_tpu_planning_env(topology, os.environ):
        env = planner.tpu_planning_env(topology, os.environ)
        os.execve(sys.executable, [sys.executable, "-m", "pingllm.cli.plan_run", *argv], env)
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
    cfg = _with_slices(cfg, args.num_slices)
    try:
        result = planner.plan(cfg, checkpoint=args.checkpoint, measure=args.measure,
                              topology=topology)
    except ValueError as e:  # a mesh that does not fit the device count; a topology libtpu lacks
        return _fail(str(e))
    print(json.dumps(result.to_json(), indent=1) if args.json else planner.format_plan(result))
    return EXIT_DOES_NOT_FIT if result.checkpoint_problems or not result.fits else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
