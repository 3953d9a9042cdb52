"""Rewrite a checkpoint for another mesh / process layout, dtype or content, streaming.

    pingllm-reshard-checkpoint --input RUN/checkpoints/STEP --output RUN2_OR_STEP_DIR \
        [--mesh data=1,fsdp=4,tensor=2 | --gin_file F --gin_bindings B ...] [--num_devices K] \
        [--param_dtype bfloat16] [--content full|params|no_iter] [--max_buffer_mb 256] [--json]

Target layout: --mesh lays each array's saved PartitionSpec onto a mesh of these axis sizes
(missing axes = 1); --gin_file/--gin_bindings take the mesh, logical rules, shapes and dtypes of a
run config (what that run's trainer will ask for). Neither: all devices on 'fsdp', saved specs.
--num_devices K describes the target on K fake CPU devices (the tool re-executes itself with
XLA_FLAGS set before JAX starts), so a CPU host can write a checkpoint for a larger machine;
default: the mesh's size (--mesh), else this host's devices.

--output: a run directory (writes RUN/checkpoints/<input step>) or a step directory. It refuses
to overwrite, then verifies what it wrote (checksums, then every array re-read and compared).
Content: 'full' state and iterator files; 'no_iter' state with an empty iterator item (the
trainer derives the data position from the step); 'params' the parameter tree alone (for
LOAD_PARAMETERS_PATH). --param_dtype casts the floating-point parameters.

Exit status: 0 written and verified; 2 missing input, not a checkpoint, existing output, bad mesh
or config, or a mesh that does not divide the arrays; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

EXIT_BAD_INPUT = 2
MESH_AXES = ("data", "fsdp", "tensor")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="step directory to read")
    parser.add_argument("--output", required=True, help="run directory or step directory")
    parser.add_argument("--mesh", help="axis sizes, e.g. data=2,fsdp=4 (missing axes = 1)")
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--num_devices", type=int, help="describe the target on K CPU devices")
    parser.add_argument("--param_dtype", help="cast floating parameters, e.g. bfloat16")
    parser.add_argument("--content", default="full", choices=("full", "params", "no_iter"))
    parser.add_argument("--max_buffer_mb", type=float, default=256.0,
                        help="arrays held at once (a larger single array is held alone)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.mesh and args.gin_file:
        parser.error("give --mesh or --gin_file, not both")
    return args


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=N with AXIS in "
                             f"{MESH_AXES} and N >= 1")
        sizes[name] = int(value)
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def _fail(message: str) -> int:
    print(f"reshard_checkpoint: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _targets(args, stored, reshard, num_devices):
    """(shardings, dtypes or None) of every stored leaf on the target layout."""
    import jax

    from pingllm import partitioning

    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    if args.gin_file:
        from pingllm import config as config_lib
        from pingllm import optimizer as optimizer_lib
        from pingllm import train_state as state_lib

        cfg = config_lib.load(args.gin_file, args.gin_bindings)
        mesh = partitioning.make_mesh(cfg.mesh, devices)
        tx, _ = optimizer_lib.make_optimizer(cfg.optimizer)
        abstract, _ = state_lib.abstract_train_state(cfg.model, tx, mesh,
                                                     cfg.mesh.logical_axis_rules,
                                                     ema=cfg.optimizer.ema_decay > 0)
        leaves, _ = jax.tree_util.tree_flatten_with_path(abstract)
        want = {reshard.leaf_name(p): leaf for p, leaf in leaves}
        wrong = [f"{n}: checkpoint shape {tuple(m.shape)} != config shape {want[n].shape}"
                 for n, m in stored.items() if n in want and tuple(m.shape) != want[n].shape]
        missing = [f"{n}: in the checkpoint but not in the config" for n in stored
                   if n not in want]
        if wrong or missing:
            raise reshard.ReshardError("the config does not describe this checkpoint:\n  "
                                       + "\n  ".join(wrong + missing))
        return {n: want[n].sharding for n in stored}, {n: want[n].dtype for n in stored}
    if args.mesh:
        sizes = parse_mesh(args.mesh)
        cfg = partitioning.MeshConfig(data_ici=sizes["data"], fsdp_ici=sizes["fsdp"],
                                      tensor_ici=sizes["tensor"])
        devices = devices[:math.prod(sizes.values())]
        mesh = partitioning.make_mesh(cfg, devices)
    else:
        mesh = partitioning.make_mesh(partitioning.MeshConfig(), devices)
    return reshard.shardings_from_saved_specs(stored, mesh), None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from etils import epath

    src = epath.Path(args.input)
    if not src.exists():
        return _fail(f"--input {src}: no such directory")
    if not (src / "items" / "_METADATA").exists() or not src.name.isdigit():
        return _fail(f"--input {src}: not a checkpoint step directory (expected "
                     "<run>/checkpoints/<step>/items/_METADATA)")
    try:
        mesh_size = math.prod(parse_mesh(args.mesh).values()) if args.mesh else None
    except ValueError as e:
        return _fail(str(e))
    num_devices = args.num_devices or mesh_size
    from pingllm import planner

    if num_devices and not planner.has_fake_cpu_devices(num_devices, os.environ):
        import jax  # only to learn whether this host already has enough devices

        if num_devices != jax.device_count():
            env = planner.fake_cpu_device_env(num_devices, os.environ)
            argv = [sys.executable, "-m", "pingllm.cli.reshard_checkpoint", *argv]
            os.execve(sys.executable, argv, env)
    from pingllm import config as config_lib
    from pingllm.checkpoint import reshard

    try:
        stored = reshard.stored_leaves(src / "items")
        shardings, dtypes = _targets(args, stored, reshard, num_devices)
        plans = reshard.plan_leaves(stored, shardings, content=args.content,
                                    param_dtype=args.param_dtype, target_dtypes=dtypes)
        result = reshard.reshard(src, args.output, plans, content=args.content,
                                 max_buffer_bytes=int(args.max_buffer_mb * 2**20))
    except (reshard.ReshardError, config_lib.ConfigError, ValueError) as e:
        return _fail(str(e))
    summary = {
        "output": str(result.step_dir), "leaves": result.leaves,
        "array_bytes": result.array_bytes, "files_bytes": result.files_bytes,
        "groups": result.groups, "largest_group_bytes": result.largest_group_bytes,
        "seconds": round(result.seconds, 3), "verify_seconds": round(result.verify_seconds, 3),
        "mesh": {str(k): int(v) for k, v in plans[0].sharding.mesh.shape.items()},
        "content": args.content,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {result.step_dir}: {result.leaves} arrays, {result.array_bytes / 2**20:.2f} "
              f"MiB on mesh {summary['mesh']} ({args.content}), in {result.groups} groups of at "
              f"most {result.largest_group_bytes / 2**20:.2f} MiB; {result.seconds:.1f}s, "
              f"verified (checksums + re-read) in {result.verify_seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
