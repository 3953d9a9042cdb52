"""The trainer's held-out RTT evaluation, run on the training mesh by every process.

Each process builds the same held-out queries, prompts and baseline predictions
(evaluate's cached eval set: a pure function of the config); the model's forward passes are
global programs over the run's mesh, prompt rows sharded like a batch, the logits replicated so
every process reads them; every process then computes the same metrics and process 0's writer
records them. So a pod run logs the eval/rtt/... a one-process run of the same parameters logs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from pingllm import partitioning
from pingllm.eval import heldout as evaluate_lib
from pingllm.eval import predictor as predict_lib

METRICS = ("median_relative_error", "median_abs_error_ms", "within_25pct", "p_fail_brier")


class MeshPredictor(predict_lib.Predictor):
    """A Predictor whose forward passes run on `mesh` with params sharded over it."""

    def __init__(self, model_cfg, params, mesh, rules, *,
                 barrier: Callable[[str], None] = lambda name: None, **kwargs):
        super().__init__(model_cfg, params, **kwargs)
        self._barrier = barrier
        self._compiled: dict[tuple, object] = {}
        self._rows = partitioning.batch_sharding(mesh, rules)
        shards = _row_shards(self._rows)
        self.batch_size = -(-self.batch_size // shards) * shards  # whole rows per shard
        self._global_forward = jax.jit(self._forward,
                                       out_shardings=partitioning.replicated(mesh))

    def _global(self, host: np.ndarray) -> jax.Array:
        """The same host array on every process -> one global array sharded by rows."""
        return jax.make_array_from_callback(host.shape, self._rows, lambda index: host[index])

    def _logits(self, rows: list[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            batch, lengths = predict_lib.pad_prompts(chunk, self.batch_size, self.max_length)
            args = (self.params, self._global(batch), self._global(lengths))
            if batch.shape not in self._compiled:
                # Compiled, then every process waits: a peer still compiling must not time out
                # the first collective (see trainer.wait_for_all_processes).
                self._compiled[batch.shape] = self._global_forward.lower(*args).compile()
                self._barrier(f"pingllm_rtt_eval_compiled_{batch.shape[1]}")
            logits = self._compiled[batch.shape](*args)
            out.append(np.asarray(jax.device_get(logits))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 2, 1), np.float32)


def _row_shards(sharding) -> int:
    """How many distinct row blocks `sharding` cuts a batch's leading axis into."""
    n = sharding.num_devices
    return len({index[0].indices(n)[:2] for index in sharding.devices_indices_map((n,)).values()})


def rtt_metrics(cfg, params, mesh, rules, *, max_queries: int, seed: int = 0,
                barrier: Callable[[str], None] = lambda name: None) -> dict[str, float]:
    """{'rtt/<method>/<metric>': value} for the model (train context) and the baselines.

    Every process must call it (the forward passes are collective); all get the same values.
    `barrier(name)` waits for every process (after each new compile).
    """
    held, prompts, baselines = evaluate_lib._rtt_eval_set(cfg.data, cfg.model, max_queries, seed)
    barrier("pingllm_rtt_eval_set_built")
    predictor = MeshPredictor(cfg.model, params, mesh, rules, barrier=barrier,
                              data_config=cfg.data, seed=cfg.data.seed)
    with jax.transfer_guard("allow"):
        preds = predictor.predict_prompts(list(prompts))
    out = {}
    for name, (rtt, p_fail) in {"model": (preds.rtt_p50, preds.p_fail), **baselines}.items():
        m = evaluate_lib.rtt_metrics(rtt, held.rtt_ms, p_fail, held.ip_version)
        for key in METRICS:
            out[f"rtt/{name}/{key}"] = m[key]
    return out
