"""Train-step time with the hashed address-prefix embedding (ModelConfig.address_prefix_buckets).

    .venv/bin/python benchmarks/bench_prefix_embedding.py [--buckets N] [--rounds 5] [--steps 20]

The quickstart's jitted train step (gin/quickstart.gin) compiled twice, without the table (the
reference) and with it, timed in this process on one fixed batch of real synthetic windows,
alternating rounds so that the machine's drift hits both alike. Prints each round's median step
time, its process CPU time, and the ratio with / without.
"""

from __future__ import annotations

import argparse
import statistics as st
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pingllm import config as config_lib  # noqa: E402
from pingllm import train_state, trainer  # noqa: E402
from pingllm.data import tokens  # noqa: E402


def _window_batch(batch: int, length: int) -> np.ndarray:
    """batch x length tokens of synthetic-looking IPv4 windows (every address field complete)."""
    rng = np.random.default_rng(0)
    rows = []
    for b in range(batch):
        n = 12
        record = {"src_addr": np.r_[rng.integers(0, 256, 4), np.zeros(12)].astype(np.uint8),
                  "ip_version": 4,
                  "dst_addr": np.c_[rng.integers(0, 256, (n, 4)), np.zeros((n, 12))].astype(
                      np.uint8),
                  "event_time": 1_700_000_000 + 60 * np.arange(n),
                  "rtt_ms": rng.uniform(1, 300, n).astype(np.float32)}
        w = tokens.tokenize_window(record, seed=0, window_index=b, max_length=length)
        rows.append(w.tokens)
    return np.stack(rows).astype(np.int32)


def make_step(buckets: int):
    cfg = config_lib.load([str(REPO / "gin/quickstart.gin")],
                          [f"ModelConfig.address_prefix_buckets = {buckets}", "EVAL_INTERVAL = 0"])
    setup = trainer.build(cfg)
    B, L = cfg.data.global_batch_size, cfg.model.max_target_length
    rng = np.random.default_rng(0)
    inputs = _window_batch(B, L)
    local = {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
             "weights": np.ones((B, L), np.float32), "segment_ids": np.ones((B, L), np.int32),
             "fields": rng.integers(1, 6, (B, L)).astype(np.int32),
             "novel_result": (rng.random((B, L)) < 0.05).astype(np.float32)}
    batch = trainer.global_batch(setup, local)
    key = jax.random.key(1)
    step = setup.train_step.lower(setup.abstract_state, batch, key).compile()
    state = train_state.init_train_state(cfg.model, setup.optimizer, setup.mesh, setup.rules)
    return step, state, batch, key


def time_steps(runner, n: int) -> tuple[float, float]:
    """(median wall seconds per step, process CPU seconds per step)."""
    step, state, batch, key = runner
    times = []
    cpu0 = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    runner[1] = state  # the input state was donated
    return st.median(times), (time.process_time() - cpu0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buckets", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    plain, prefixed = list(make_step(0)), list(make_step(args.buckets))
    time_steps(plain, 3), time_steps(prefixed, 3)  # warm-up
    a, b, ca, cb = [], [], [], []
    for r in range(args.rounds):
        wall, cpu = time_steps(plain, args.steps)
        a.append(wall), ca.append(cpu)
        wall, cpu = time_steps(prefixed, args.steps)
        b.append(wall), cb.append(cpu)
        print(f"round {r}: without {a[-1] * 1e3:.1f} ms/step ({ca[-1] * 1e3:.0f} CPU-ms), "
              f"{args.buckets} buckets {b[-1] * 1e3:.1f} ms/step ({cb[-1] * 1e3:.0f} CPU-ms) "
              f"({b[-1] / a[-1]:.3f}x)", flush=True)
    print(f"median step: without {st.median(a) * 1e3:.1f} ms ({st.median(ca) * 1e3:.0f} CPU-ms), "
          f"with {st.median(b) * 1e3:.1f} ms ({st.median(cb) * 1e3:.0f} CPU-ms); wall ratio "
          f"{st.median(b) / st.median(a):.3f}x, CPU ratio {st.median(cb) / st.median(ca):.3f}x")


if __name__ == "__main__":
    main()
