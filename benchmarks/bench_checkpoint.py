"""Checkpoint save/restore throughput against raw writes/reads of the same bytes.

python benchmarks/bench_checkpoint.py [--mb 400] [--dir /tmp/pingllm_bench_ckpt] [--devices 8]
python benchmarks/bench_checkpoint.py --gcs   # the same through fake-gcs-server on 127.0.0.1
Prints GB/s of: raw write (+fsync), raw read (cold), Orbax save (start -> commit), restore (cold),
their ratios, and the time one async save blocks the loop, against a stated step time. With
--gcs the run directory is gs://bench/run on a local fake-gcs-server (tests/gcs_emulator.py) and
"raw" is a plain PUT / GET of the same bytes with tensorstore's gcs kvstore, the client Orbax
writes arrays with, in the same run; the emulator's own speed bounds both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path


def _drop_cache(paths):
    """Evicts these files from the page cache so reads hit the disk (per file, not system-wide)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_disk(host, nbytes, root):
    """The same bytes as plain files: writes + fsync, then a cold read."""
    raw = root / "raw"
    raw.mkdir()
    t = time.perf_counter()
    files = []
    for i, h in enumerate(host):
        path = raw / f"leaf_{i}.bin"
        with open(path, "wb") as f:
            f.write(h.tobytes())
            f.flush()
            os.fsync(f.fileno())
        files.append(path)
    raw_write = nbytes / (time.perf_counter() - t) / 1e9
    _drop_cache(files)
    t = time.perf_counter()
    got = sum(len(p.read_bytes()) for p in files)
    raw_read = got / (time.perf_counter() - t) / 1e9
    return raw_write, raw_read


def _raw_gcs(host, nbytes):
    """The same bytes as plain objects through tensorstore's gcs kvstore: PUT, then GET."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "gcs", "bucket": "bench", "path": "raw/"}).result()
    blobs = [h.tobytes() for h in host]
    t = time.perf_counter()
    for f in [kv.write(f"leaf_{i}.bin", b) for i, b in enumerate(blobs)]:
        f.result()
    raw_write = nbytes / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    got = sum(len(f.result().value) for f in [kv.read(f"leaf_{i}.bin") for i in range(len(blobs))])
    raw_read = got / (time.perf_counter() - t) / 1e9
    return raw_write, raw_read


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=400, help="state size in MB (3 equal f32 leaves)")
    ap.add_argument("--dir", default="/tmp/pingllm_bench_ckpt")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--saves", type=int, default=2)
    ap.add_argument("--gcs", action="store_true", help="run directory on a local GCS emulator")
    ap.add_argument("--step_ms", type=float, default=100.0,
                    help="the training step time blocking is compared against")
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    emulator = None
    if args.gcs:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import gcs_emulator

        emulator = gcs_emulator.Emulator()
        gcs_emulator.apply_env(emulator.env())
        emulator.create_bucket("bench")

    from etils import epath

    from pingllm.checkpoint import format as fmt
    from pingllm.checkpoint import manager as ck

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ckpt_root = epath.Path("gs://bench") if args.gcs else epath.Path(root)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    rows = NamedSharding(mesh, P("data"))
    cols = 1024
    nrows = (args.mb * 10**6 // 3 // 4 // cols) // jax.device_count() * jax.device_count()

    @jax.jit
    def init(key):
        k = jax.random.split(key, 3)
        leaf = lambda i: jax.random.normal(k[i], (nrows, cols), jnp.float32)
        return {"step": jnp.int32(0), "params": {"w": leaf(0)},
                "opt_state": {"mu": leaf(1), "nu": leaf(2)}}

    shardings = {"step": NamedSharding(mesh, P()), "params": {"w": rows},
                 "opt_state": {"mu": rows, "nu": rows}}
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    jax.block_until_ready(state)
    host = [np.asarray(x) for x in jax.tree.leaves(state)]
    nbytes = sum(h.nbytes for h in host)
    print(f"state: {nbytes / 1e6:.1f} MB in {len(host)} leaves, {jax.device_count()} devices, "
          f"dir {root}")

    if args.gcs:
        raw_write, raw_read = _raw_gcs(host, nbytes)
    else:
        raw_write, raw_read = _raw_disk(host, nbytes, root)

    class It:
        def get_state(self):
            return {"step": 0}

        def set_state(self, s):
            pass

    def run_saves(run_dir, verify):
        cfg = ck.CheckpointConfig(checkpoint_period=1, verify_checksums=verify,
                                  max_num_checkpoints_to_keep=1)
        ckpt = ck.Checkpointer(cfg, run_dir)
        out = []
        for step in range(1, args.saves + 1):
            t0 = time.perf_counter()
            ckpt.maybe_save(step, state, It())
            blocking = time.perf_counter() - t0
            ckpt.wait()
            total = time.perf_counter() - t0
            (m,) = ckpt.pop_save_metrics()
            out.append((blocking, total, m))
        ckpt.close()
        return out

    saves = run_saves(ckpt_root / "run", verify=True)
    saves_nov = run_saves(ckpt_root / "run_nocheck", verify=False)
    step_dir = ckpt_root / "run" / "checkpoints" / str(args.saves)
    listed = fmt.listing(step_dir)
    ckpt_files = [str(step_dir / rel) for rel in listed]
    stored = sum(f.size for f in listed.values())

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    del host
    restores = []
    for verify in (True, False):
        if not args.gcs:
            _drop_cache(ckpt_files)
        ckpt = ck.Checkpointer(ck.CheckpointConfig(verify_checksums=verify), ckpt_root / "run")
        t0 = time.perf_counter()
        r = ckpt.restore(abstract, It())
        jax.block_until_ready(r.state)
        restores.append((time.perf_counter() - t0, r.timings))
        ckpt.close()
        assert r.step == args.saves
    ok = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(r.state),
                                                          jax.tree.leaves(state)))

    raw_name = "raw PUT / GET (tensorstore gcs)" if args.gcs else "raw write+fsync / cold read"
    print(f"{raw_name}: {raw_write:.3f} / {raw_read:.3f} GB/s")
    print(f"checkpoint stored: {stored / 1e6:.1f} MB ({stored / nbytes:.3f}x the array bytes)")
    for name, rows_ in (("save (checksums on)", saves), ("save (checksums off)", saves_nov)):
        for i, (blocking, total, m) in enumerate(rows_):
            e2e = nbytes / total / 1e9
            write = m.bytes_written / m.write_seconds / 1e9
            print(f"{name} #{i + 1}: blocking {blocking * 1e3:.1f} ms "
                  f"({blocking * 1e3 / args.step_ms:.2f} of a {args.step_ms:.0f} ms step); "
                  f"start->files written {m.write_seconds:.2f} s = {write:.3f} GB/s "
                  f"({write / raw_write:.2f}x raw); start->committed {total:.2f} s = "
                  f"{e2e:.3f} GB/s ({e2e / raw_write:.2f}x raw)")
    for verify, (total, timings) in zip((True, False), restores):
        gbps = nbytes / total / 1e9
        print(f"restore cold (verify {'on' if verify else 'off'}): {total:.2f} s = {gbps:.3f} GB/s "
              f"({gbps / raw_read:.2f}x raw read); select+verify {timings['select_seconds']:.2f} s,"
              f" orbax restore {timings['restore_seconds']:.2f} s; values equal: {ok}")
    shutil.rmtree(root, ignore_errors=True)
    if emulator is not None:
        emulator.stop()


if __name__ == "__main__":
    main()
