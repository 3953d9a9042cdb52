"""AdamW with global-norm clipping and a warmup + cosine learning-rate schedule."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

# Parameter names that are never weight-decayed: norm gains and biases (decaying them pulls
# norms towards zero and shifts activations without regularising anything).
NO_DECAY_NAMES = ("scale", "bias")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyperparameters (and the objective's two knobs: a token weight and the RTT target's
    smoothing); the schedule is in absolute optimizer steps."""

    peak_learning_rate: float = 3e-4
    warmup_steps: int = 2000
    decay_end_step: int = 200_000
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip_norm: float = 1.0  # 0 disables clipping
    # Loss weight of result tokens whose destination is new to the window (1 = plain mean): the
    # tokens a never-seen pair's prediction rests on; the rest are mostly copies of earlier pings.
    novel_result_weight: float = 1.0
    # Std, in ln(RTT), of the Gaussian the first RTT byte's training target is spread over
    # (0 = one-hot): nearby RTT bins share the credit (step.rtt_smoothed_cross_entropy).
    rtt_label_sigma: float = 0.0
    # A moving average of the parameters, kept in TrainState.ema_params and used for
    # evaluation and prediction (0 = off): the parameters after each step past ema_start_step,
    # weighted ema_decay**age and normalised (1.0 = their plain mean: tail averaging).
    ema_decay: float = 0.0
    ema_start_step: int = 0

    def __post_init__(self):
        if self.warmup_steps < 0 or self.decay_end_step < self.warmup_steps:
            raise ValueError(
                f"OptimizerConfig: need 0 <= warmup_steps ({self.warmup_steps}) <= "
                f"decay_end_step ({self.decay_end_step})"
            )
        if self.novel_result_weight <= 0:
            raise ValueError(f"OptimizerConfig: novel_result_weight={self.novel_result_weight} "
                             "must be > 0")
        if self.rtt_label_sigma < 0:
            raise ValueError(f"OptimizerConfig: rtt_label_sigma={self.rtt_label_sigma} must be "
                             ">= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"OptimizerConfig: ema_decay={self.ema_decay} must be in [0, 1]")
        if self.ema_start_step < 0:
            raise ValueError(f"OptimizerConfig: ema_start_step={self.ema_start_step} must be "
                             ">= 0")
        if self.grad_clip_norm < 0:
            raise ValueError(f"OptimizerConfig: grad_clip_norm={self.grad_clip_norm} must be >= 0")


def ema_update(ema, params, step, decay: float, start_step: int = 0):
    """The average after optimizer step `step` (1-based) produced `params`.

    With t = step - start_step: ema_t = ema_{t-1} + w_t (params_t - ema_{t-1}), where
    w_t = (1 - d) / (1 - d**t) (or 1 / t for d = 1): the mean of the parameters after steps
    start_step + 1 .. step weighted d**age. w_1 = 1, so neither the initial value nor anything
    before start_step is mixed in (up to start_step the average is the parameters).
    """
    t = jnp.maximum(jnp.asarray(step, jnp.float32) - start_step, 1.0)
    if decay == 1.0:
        w = 1.0 / t
    else:
        d = jnp.float32(decay)  # one rounding of d for both terms: w_1 is exactly 1
        w = (1.0 - d) / (1.0 - d ** t)
    return jax.tree.map(lambda e, p: (e + w * (p.astype(jnp.float32) - e)).astype(e.dtype),
                        ema, params)


def params_average(cfg: OptimizerConfig):
    """(ema, params, step) -> ema for the train step, or None without a moving average."""
    if cfg.ema_decay == 0:
        return None
    return functools.partial(ema_update, decay=cfg.ema_decay, start_step=cfg.ema_start_step)


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """lr(step): 0 -> peak linearly over warmup_steps, cosine to final_lr_fraction * peak at
    decay_end_step, constant after.

    The schedule is a pure function of the step, and optax reads the step from the count in
    opt_state, so a run restored from a checkpoint continues on exactly the same curve.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.peak_learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_end_step,  # optax: total length, warmup included
        end_value=cfg.final_lr_fraction * cfg.peak_learning_rate,
    )


def decay_mask(params):
    """True for parameters that get weight decay: every kernel and embedding table."""

    def decays(path, _):
        # The last dict key is the parameter's name (a boxed leaf adds a '.value' step after it).
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip -> AdamW(schedule, decoupled weight decay on `decay_mask`), schedule)."""
    schedule = make_schedule(cfg)
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw), schedule
    return adamw, schedule
