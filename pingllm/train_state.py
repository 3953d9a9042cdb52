"""The train state and its sharded initialisation (no host ever holds the whole state)."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from pingllm import partitioning
from pingllm.model import ModelConfig, Transformer, dummy_inputs


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds. No RNG: dropout keys are `fold_in(base_key, step)`."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def _boxed_init_fn(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int):
    """A no-argument init whose params/opt_state leaves are nn.Partitioned (logical names)."""
    model = Transformer(model_cfg)

    def init() -> TrainState:
        params = model.init({"params": jax.random.key(seed)}, *dummy_inputs(model_cfg))["params"]
        # optax maps over the boxes' values, so mu/nu come out boxed with the params' names.
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    return init


def abstract_train_state(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: partitioning.Rules,
    seed: int = 0,
) -> tuple[TrainState, TrainState]:
    """(state of ShapeDtypeStructs carrying their NamedSharding, the tree of NamedShardings).

    The state tree is unboxed (plain arrays), as stored in checkpoints; scalars (step, optax
    counts) are replicated, optimizer moments follow their parameter's sharding.
    """
    boxed = jax.eval_shape(_boxed_init_fn(model_cfg, optimizer, seed))
    shardings = partitioning.logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def init_train_state(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: partitioning.Rules,
    seed: int = 0,
) -> TrainState:
    """A fresh state created directly in its shards by one jitted init."""
    _, shardings = abstract_train_state(model_cfg, optimizer, mesh, rules, seed)
    boxed_init = _boxed_init_fn(model_cfg, optimizer, seed)
    return jax.jit(lambda: nn.meta.unbox(boxed_init()), out_shardings=shardings)()
