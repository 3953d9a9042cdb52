"""Stand-in for `pingllm.main` in the launcher tests: a real multi-process JAX job on CPU.

Takes the trainer's coordinator flags, joins `jax.distributed`, all-reduces (psum) one value per
device across every process, writes what it saw to `<out_dir>/process_<i>.json`, then acts out
`--mode`: `psum` exits 0; `fail` makes process `--fail_process` crash with `--fail_status` while
the others hang as a peer of a dead process would; `wait_for_signal` waits for SIGTERM/SIGINT,
records it and exits 75 like a trainer that saved its checkpoint.
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator_address", required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--mode", choices=["psum", "fail", "wait_for_signal"], default="psum")
    parser.add_argument("--fail_process", type=int, default=1)
    parser.add_argument("--fail_status", type=int, default=3)
    parser.add_argument("--out_dir", type=Path, required=True)
    args = parser.parse_args()

    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.distributed.initialize(
        args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id
    )
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("d",))
    # Device k holds k + 1, so the psum is n (n + 1) / 2 only if every process took part.
    x_N = jax.make_array_from_callback(
        (n,), NamedSharding(mesh, P("d")), lambda index: np.arange(1, n + 1, dtype=np.int32)[index]
    )
    psum = jax.jit(
        jax.shard_map(lambda x: jax.lax.psum(x, "d"), mesh=mesh, in_specs=P("d"), out_specs=P())
    )(x_N)
    seen = {
        "process_id": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": n,
        "local_device_count": jax.local_device_count(),
        "platform": jax.devices()[0].platform,
        "psum": int(np.asarray(psum.addressable_data(0))[0]),
        "pid": os.getpid(),
    }
    out = args.out_dir / f"process_{args.process_id}"
    out.with_suffix(".json").write_text(json.dumps(seen))
    print(f"process {args.process_id}: {seen}", flush=True)

    if args.mode == "fail":
        if args.process_id == args.fail_process:
            os._exit(args.fail_status)  # a crash: no jax.distributed shutdown handshake
        time.sleep(600)
    elif args.mode == "wait_for_signal":
        # Installed after initialize(): JAX's preemption service would otherwise take SIGTERM.
        received = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda s, _frame: received.append(s))
        out.with_suffix(".ready").write_text("")
        deadline = time.monotonic() + 600
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        out.with_suffix(".signal").write_text(str(received[0]) if received else "none")
        os._exit(75 if received else 1)


if __name__ == "__main__":
    main()
