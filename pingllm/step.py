"""Pure train and eval steps (no I/O), and their jitted, sharded forms."""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from pingllm import partitioning
from pingllm.data import tokens
from pingllm.model import ModelConfig, Transformer
from pingllm.train_state import TrainState

# Per-field loss groups over the field class of each *target* token (FIELD_PAD never carries
# weight). Addresses pool source and destination: the same bytes, predicted the same way.
FIELD_GROUPS: dict[str, tuple[int, ...]] = {
    "address": (tokens.FIELD_SRC, tokens.FIELD_DST),
    "result": (tokens.FIELD_RESULT,),
    "time": (tokens.FIELD_TIME,),
    "start": (tokens.FIELD_START,),
}

Batch = Mapping[str, jax.Array]


def _rtt_byte1_log_edges() -> tuple[np.ndarray, np.ndarray]:
    """ln(us) of each first RTT byte's RTT range (-inf, -inf: no canonical code)."""
    with np.errstate(divide="ignore"):
        return tuple(np.log(edge) for edge in tokens.rtt_byte1_ranges_us())


def rtt_smoothed_cross_entropy(logits_BxLxV: jax.Array, batch: Batch,
                               sigma: float) -> jax.Array:
    """Per-token cross-entropy where the first RTT byte's target is a Gaussian in ln(RTT)
    (std `sigma`) integrated over each byte's RTT range (HL-Gauss, Imani & White 2018), centred
    on the measured RTT; every other token's target is one-hot."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    targets_BxL = batch["targets"]
    hard_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    # The first RTT byte is predicted where RTT_START is the input; the second is the next target.
    byte1_BxL = jnp.clip(targets_BxL - tokens.BYTE_OFFSET, 0, 255)
    byte2_BxL = jnp.clip(jnp.roll(targets_BxL, -1, axis=1) - tokens.BYTE_OFFSET, 0, 255)
    code_BxL = byte1_BxL * 256 + byte2_BxL
    rtt_us_BxL = tokens.decode_rtt_us(code_BxL, xp=jnp, dtype=jnp.float32)
    mu_BxLx1 = jnp.log(jnp.maximum(rtt_us_BxL, 1.0))[..., None]
    lo_K, hi_K = (jnp.asarray(e, jnp.float32) for e in _rtt_byte1_log_edges())
    mass_BxLxK = (jax.scipy.special.ndtr((hi_K - mu_BxLx1) / sigma)
                  - jax.scipy.special.ndtr((lo_K - mu_BxLx1) / sigma))
    mass_BxLxK = mass_BxLxK * (hi_K > lo_K)
    q_BxLxK = mass_BxLxK / jnp.maximum(jnp.sum(mass_BxLxK, -1, keepdims=True), 1e-30)
    logp_BxLxK = jax.nn.log_softmax(logits_BxLxV, axis=-1)[
        ..., tokens.BYTE_OFFSET:tokens.BYTE_OFFSET + 256]
    soft_BxL = -jnp.sum(q_BxLxK * logp_BxLxK, axis=-1)
    is_byte1_BxL = (batch["inputs"] == tokens.RTT_START) & (targets_BxL >= tokens.BYTE_OFFSET)
    return jnp.where(is_byte1_BxL, soft_BxL, hard_BxL)


def loss_sums(logits_BxLxV: jax.Array, batch: Batch,
              rtt_sigma: float = 0.0) -> dict[str, jax.Array]:
    """Weighted cross-entropy sums and token counts, in total and per field group (float32).

    Keys: 'loss_sum', 'tokens', 'loss_sum/<group>', 'tokens/<group>'. Sums, not means, so that
    eval can add them over batches and divide once. `rtt_sigma` > 0: the first RTT byte's
    target is smoothed (`rtt_smoothed_cross_entropy`).
    """
    if rtt_sigma > 0:
        ce_BxL = rtt_smoothed_cross_entropy(logits_BxLxV, batch, rtt_sigma)
    else:
        ce_BxL = optax.softmax_cross_entropy_with_integer_labels(
            logits_BxLxV.astype(jnp.float32), batch["targets"]
        )
    weights_BxL = batch["weights"].astype(jnp.float32)
    sums = {"loss_sum": jnp.sum(ce_BxL * weights_BxL), "tokens": jnp.sum(weights_BxL)}
    for name, field_ids in FIELD_GROUPS.items():
        in_group_BxL = jnp.isin(batch["fields"], jnp.asarray(field_ids)).astype(jnp.float32)
        group_weights_BxL = weights_BxL * in_group_BxL
        sums[f"loss_sum/{name}"] = jnp.sum(ce_BxL * group_weights_BxL)
        sums[f"tokens/{name}"] = jnp.sum(group_weights_BxL)
    if "novel_result" in batch:
        novel_BxL = weights_BxL * batch["novel_result"].astype(jnp.float32)
        sums["loss_sum/novel_result"] = jnp.sum(ce_BxL * novel_BxL)
        sums["tokens/novel_result"] = jnp.sum(novel_BxL)
    return sums


def objective(sums: Mapping[str, jax.Array], novel_result_weight: float = 1.0) -> jax.Array:
    """The mean loss that is minimised: every weighted token counts once, except result tokens
    of destinations new to their window, which count `novel_result_weight` times."""
    if novel_result_weight == 1.0 or "loss_sum/novel_result" not in sums:
        return sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0)
    extra = novel_result_weight - 1.0
    total = sums["loss_sum"] + extra * sums["loss_sum/novel_result"]
    return total / jnp.maximum(sums["tokens"] + extra * sums["tokens/novel_result"], 1.0)


def means_from_sums(sums: Mapping[str, Any]) -> dict[str, Any]:
    """'loss_sum*' -> 'loss*' weighted means (0 where no tokens); token counts kept as they are."""
    out = {}
    for key, value in sums.items():
        if key.startswith("loss_sum"):
            count = sums["tokens" + key[len("loss_sum") :]]
            out["loss" + key[len("loss_sum") :]] = value / jnp.maximum(count, 1.0)
        else:
            out[key] = value
    return out


def loss_fn(params, batch: Batch, *, model: Transformer, dropout_key=None,
            novel_result_weight: float = 1.0, rtt_sigma: float = 0.0):
    """(objective, sums); dropout is on iff a dropout key is given. The sums are plain
    cross-entropy; `rtt_sigma` smooths the objective's RTT targets only."""
    logits_BxLxV = model.apply(
        {"params": params},
        batch["inputs"],
        batch["segment_ids"],
        positions_BxL=batch.get("positions"),  # packed rows: each window counts from 0
        deterministic=dropout_key is None,
        rngs=None if dropout_key is None else {"dropout": dropout_key},
    )
    sums = loss_sums(logits_BxLxV, batch)
    objective_sums = loss_sums(logits_BxLxV, batch, rtt_sigma) if rtt_sigma > 0 else sums
    return objective(objective_sums, novel_result_weight), sums


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Transformer,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    dropout_key: jax.Array,
    novel_result_weight: float = 1.0,
    params_average: Callable | None = None,
    rtt_sigma: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step. Metrics: loss (the plain per-token mean, whatever the objective's
    weights), loss/<group>, tokens, tokens/<group>, grad_norm (before clipping) and
    learning_rate (the rate this step's update used)."""
    step_key = jax.random.fold_in(dropout_key, state.step)
    grad_fn = jax.grad(functools.partial(loss_fn, model=model, dropout_key=step_key,
                                         novel_result_weight=novel_result_weight,
                                         rtt_sigma=rtt_sigma), has_aux=True)
    grads, sums = grad_fn(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = means_from_sums(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    ema_params = state.ema_params
    if params_average is not None:  # optimizer.params_average: the state keeps ema_params
        ema_params = params_average(ema_params, params, state.step + 1)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      ema_params=ema_params), metrics


def eval_step(params, batch: Batch, *, model: Transformer) -> dict[str, jax.Array]:
    """Loss sums and token counts (see `loss_sums`); average over batches with `means_from_sums`."""
    _, sums = loss_fn(params, batch, model=model)
    return sums


@dataclasses.dataclass(frozen=True)
class MeshFunction:
    """A jitted function that traces and runs under its mesh and logical-axis rules."""

    jitted: Callable
    mesh: Mesh
    rules: partitioning.Rules

    def __call__(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(tuple(self.rules)):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(tuple(self.rules)):
            return self.jitted.lower(*args)


def make_train_step(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    state_shardings: TrainState,
    batch_sharding: NamedSharding,
    mesh: Mesh,
    rules: partitioning.Rules,
    novel_result_weight: float = 1.0,
    params_average: Callable | None = None,
    rtt_sigma: float = 0.0,
) -> MeshFunction:
    """(state, batch, dropout_key) -> (state, metrics); the input state's buffers are donated."""
    fn = functools.partial(
        _train_step_positional, model=Transformer(model_cfg), optimizer=optimizer,
        schedule=schedule, novel_result_weight=novel_result_weight,
        params_average=params_average, rtt_sigma=rtt_sigma,
    )
    replicated = partitioning.replicated(mesh)
    jitted = jax.jit(
        fn,
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    return MeshFunction(jitted, mesh, rules)


def make_eval_step(
    model_cfg: ModelConfig,
    param_shardings: Any,
    batch_sharding: NamedSharding,
    mesh: Mesh,
    rules: partitioning.Rules,
) -> MeshFunction:
    """(params, batch) -> loss sums and token counts (replicated scalars)."""
    jitted = jax.jit(
        functools.partial(eval_step, model=Transformer(model_cfg)),
        in_shardings=(param_shardings, batch_sharding),
        out_shardings=partitioning.replicated(mesh),
    )
    return MeshFunction(jitted, mesh, rules)


def _train_step_positional(state, batch, dropout_key, *, model, optimizer, schedule,
                           novel_result_weight, params_average, rtt_sigma):
    return train_step(state, batch, model=model, optimizer=optimizer, schedule=schedule,
                      dropout_key=dropout_key, novel_result_weight=novel_result_weight,
                      params_average=params_average, rtt_sigma=rtt_sigma)
