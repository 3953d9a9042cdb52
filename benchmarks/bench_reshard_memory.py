"""Peak memory of pingllm/cli/reshard_checkpoint.py against the bound 2 x largest array + slack.

    python benchmarks/bench_reshard_memory.py --gb 2 --arrays 8            # the stated target
    python benchmarks/bench_reshard_memory.py --gb 0.3 --arrays 6 --slack_mb 600   # CI size

Writes a synthetic train-state checkpoint (`step`, `params`, `opt_state` holding `arrays` float32
arrays of equal size, sharded over 8 CPU devices) with pingllm's Checkpointer in this process,
then reshards it to another mesh (4 devices, fsdp=2 x tensor=2) with the CLI in a subprocess and
reads that process's peak RSS: VmHWM of /proc/self/status, printed by the subprocess as it exits.
(Not `getrusage(RUSAGE_CHILDREN)`: Python starts children with vfork, and the kernel carries the
parent's high-water mark - here the 2 GB writer's - into the child's ru_maxrss at exec.) Prints
the figures and exits 1 when the peak exceeds the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()


# Runs the CLI in this interpreter, then reports this process's own peak RSS (VmHWM is per
# address space: nothing of the parent's is in it).
_MEASURED = """
import runpy, sys
tool = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(tool, run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("VMHWM_KIB", line.split()[1], file=sys.stderr)
sys.exit(code)
"""


class _Iterator:
    def get_state(self) -> dict:
        return {"step": 7, "note": "synthetic"}


def write_state(run_dir: Path, total_bytes: int, arrays: int) -> int:
    """Saves `arrays` equal float32 arrays totalling ~total_bytes; returns one array's bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from pingllm.checkpoint import manager as checkpointing

    mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("fsdp", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    cols = 1024
    rows = max(8, (total_bytes // arrays // 4 // cols) // 8 * 8)
    make = jax.jit(lambda i: jnp.full((rows, cols), i, jnp.float32) + jnp.arange(cols) * 1e-3,
                   out_shardings=sharding)
    half = arrays // 2
    params = {f"w{i}": make(float(i)) for i in range(arrays - half)}
    mu = {f"w{i}": make(100.0 + i) for i in range(half)}
    state = {"step": jnp.asarray(7, jnp.int32), "params": params, "opt_state": {"mu": mu}}
    cfg = checkpointing.CheckpointConfig(checkpoint_period=1, async_checkpointing=False)
    ckpt = checkpointing.Checkpointer(cfg, run_dir)
    ckpt.maybe_save(7, state, _Iterator(), force=True)
    ckpt.wait()
    ckpt.close()
    return rows * cols * 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size (GiB)")
    parser.add_argument("--arrays", type=int, default=8)
    parser.add_argument("--slack_mb", type=float, default=1024.0, help="bound = 2 x largest + this")
    parser.add_argument("--max_buffer_mb", type=float, default=256.0)
    parser.add_argument("--workdir", default="", help="default: a temporary directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_reshard_"))
    try:
        t = time.perf_counter()
        largest = write_state(work / "src", int(args.gb * 2**30), args.arrays)
        write_s = time.perf_counter() - t
        step_dir = work / "src" / "checkpoints" / "7"
        on_disk = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
        t = time.perf_counter()
        from pingllm import planner

        env = planner.fake_cpu_device_env(4, os.environ)  # so the CLI need not re-execute
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURED,
             str(REPO / "pingllm" / "cli" / "reshard_checkpoint.py"),
             "--input", str(step_dir), "--output", str(work / "dst"), "--mesh", "fsdp=2,tensor=2",
             "--num_devices", "4", "--max_buffer_mb", str(args.max_buffer_mb), "--json"],
            capture_output=True, text=True, env=env)
        reshard_s = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 2
        hwm = [line for line in proc.stderr.splitlines() if line.startswith("VMHWM_KIB ")]
        peak = int(hwm[-1].split()[1]) * 1024
        bound = 2 * largest + int(args.slack_mb * 2**20)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        report = {
            "checkpoint_bytes": on_disk, "arrays": args.arrays, "largest_array_bytes": largest,
            "peak_rss_bytes": peak, "bound_bytes": bound, "within_bound": peak <= bound,
            "write_seconds": round(write_s, 1), "reshard_seconds": round(reshard_s, 1),
            "reshard": result,
        }
        if args.json:
            print(json.dumps(report))
        else:
            mib = lambda b: f"{b / 2**20:,.0f} MiB"
            print(f"checkpoint on disk: {mib(on_disk)} in {args.arrays} arrays of "
                  f"{mib(largest)} (written in {write_s:.1f}s)")
            print(f"reshard 8 devices (fsdp=8) -> 4 devices (fsdp=2 x tensor=2), buffer "
                  f"{args.max_buffer_mb:.0f} MiB: {result['groups']} groups, {reshard_s:.1f}s "
                  f"incl. verification")
            print(f"peak RSS of the reshard process: {mib(peak)}; bound 2 x largest + "
                  f"{args.slack_mb:.0f} MiB = {mib(bound)}: "
                  f"{'within' if peak <= bound else 'EXCEEDED'} "
                  f"({peak / (on_disk or 1):.2f} x the checkpoint size)")
        return 0 if peak <= bound else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
