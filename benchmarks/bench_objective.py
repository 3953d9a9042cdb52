"""Train-step time with the smoothed RTT target (OptimizerConfig.rtt_label_sigma) against without.

    .venv/bin/python benchmarks/bench_objective.py [--sigma 0.4] [--rounds 5] [--steps 20]

The quickstart's jitted train step (gin/quickstart.gin: 2 x 128, batch 16 x 256) compiled twice,
once with the one-hot objective (sigma 0, the reference) and once smoothed, both timed in this
process on one fixed batch, alternating rounds so that the machine's drift hits both alike.
Prints each round's median step time and the ratio smoothed / one-hot (target: <= 1.05).
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


def make_step(sigma: float):
    cfg = config_lib.load([str(REPO / "gin/quickstart.gin")],
                          [f"OptimizerConfig.rtt_label_sigma = {sigma}", "EVAL_INTERVAL = 0"])
    setup = trainer.build(cfg)
    B, L = cfg.data.global_batch_size, cfg.model.max_target_length
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 267, (B, L)).astype(np.int32)
    inputs[:, ::16] = tokens.RTT_START  # a result every 16 tokens, as in a window
    local = {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
             "weights": np.ones((B, L), np.float32), "segment_ids": np.ones((B, L), np.int32),
             "fields": rng.integers(1, 6, (B, L)).astype(np.int32),
             "novel_result": (rng.random((B, L)) < 0.05).astype(np.float32)}
    batch = trainer.global_batch(setup, local)
    key = jax.random.key(1)
    step = setup.train_step.lower(setup.abstract_state, batch, key).compile()
    state = train_state.init_train_state(cfg.model, setup.optimizer, setup.mesh, setup.rules)
    return step, state, batch, key


def time_steps(runner, n: int) -> float:
    step, state, batch, key = runner
    times = []
    for _ in range(n):
        t = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    runner[1] = state  # the input state was donated
    return st.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sigma", type=float, default=0.4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    plain, smoothed = list(make_step(0.0)), list(make_step(args.sigma))
    time_steps(plain, 3), time_steps(smoothed, 3)  # warm-up
    a, b = [], []
    for r in range(args.rounds):
        a.append(time_steps(plain, args.steps))
        b.append(time_steps(smoothed, args.steps))
        print(f"round {r}: one-hot {a[-1] * 1e3:.1f} ms/step, sigma {args.sigma} "
              f"{b[-1] * 1e3:.1f} ms/step ({b[-1] / a[-1]:.3f}x)", flush=True)
    ratio = st.median(b) / st.median(a)
    print(f"median step: one-hot {st.median(a) * 1e3:.1f} ms, smoothed {st.median(b) * 1e3:.1f} ms;"
          f" ratio {ratio:.3f}x (target <= 1.05): {'met' if ratio <= 1.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
