"""The train state and its sharded initialisation (no host ever holds the whole state)."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from pingllm import partitioning
from pingllm.model import ModelConfig, Transformer, dummy_inputs


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds. No RNG: dropout keys are `fold_in(base_key, step)`."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    # OptimizerConfig.ema_decay > 0: the parameters' moving average (sharded like params);
    # None (no leaves, nothing saved) otherwise.
    ema_params: Any = None

    @property
    def eval_params(self):
        """What evaluation and prediction use: the moving average when there is one."""
        return self.params if self.ema_params is None else self.ema_params


def _boxed_init_fn(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int,
                   ema: bool = False):
    """A no-argument init whose params/opt_state leaves are nn.Partitioned (logical names)."""
    model = Transformer(model_cfg)

    def init() -> TrainState:
        params = model.init({"params": jax.random.key(seed)}, *dummy_inputs(model_cfg))["params"]
        return state_from_params(params, optimizer, ema)

    return init


def state_from_params(params, optimizer: optax.GradientTransformation,
                      ema: bool = False) -> TrainState:
    """Step 0 with fresh optimizer moments (and moving average) for these parameters."""
    # optax maps over the boxes' values, so mu/nu come out boxed with the params' names; the
    # moving average starts as a copy, boxed the same way.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def abstract_train_state(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: partitioning.Rules,
    seed: int = 0,
    *,
    ema: bool = False,
) -> tuple[TrainState, TrainState]:
    """(state of ShapeDtypeStructs carrying their NamedSharding, the tree of NamedShardings).

    The state tree is unboxed (plain arrays), as stored in checkpoints; scalars (step, optax
    counts) are replicated, optimizer moments (and the moving average) follow their
    parameter's sharding.
    """
    boxed = jax.eval_shape(_boxed_init_fn(model_cfg, optimizer, seed, ema))
    shardings = partitioning.logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def describe_abstract(abstract: TrainState) -> tuple[Any, list[tuple]]:
    """The abstract state as plain data (structure, and shape, dtype, spec per leaf): picklable."""
    leaves, treedef = jax.tree.flatten(abstract)
    return treedef, [(tuple(x.shape), x.dtype, x.sharding.spec) for x in leaves]


def abstract_from_description(description, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """`abstract_train_state`'s pair rebuilt on `mesh` from `describe_abstract`, without tracing."""
    treedef, leaves = description
    shardings = [NamedSharding(mesh, spec) for _, _, spec in leaves]
    abstract = [jax.ShapeDtypeStruct(shape, dtype, sharding=s)
                for (shape, dtype, _), s in zip(leaves, shardings, strict=True)]
    return treedef.unflatten(abstract), treedef.unflatten(shardings)


def init_program(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                 shardings: TrainState, seed: int = 0, *, ema: bool = False):
    """The jitted no-argument init that creates the state directly in `shardings`."""
    boxed_init = _boxed_init_fn(model_cfg, optimizer, seed, ema)
    return jax.jit(lambda: nn.meta.unbox(boxed_init()), out_shardings=shardings)


def init_train_state(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: partitioning.Rules,
    seed: int = 0,
    *,
    ema: bool = False,
) -> TrainState:
    """A fresh state created directly in its shards by one jitted init."""
    _, shardings = abstract_train_state(model_cfg, optimizer, mesh, rules, seed, ema=ema)
    return init_program(model_cfg, optimizer, shardings, seed, ema=ema)()
