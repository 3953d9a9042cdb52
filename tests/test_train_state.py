"""Train state: abstract shapes/shardings, and an init that is born sharded."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pingllm import partitioning
from pingllm.optimizer import OptimizerConfig, make_optimizer
from pingllm.partitioning import MeshConfig
from pingllm.train_state import TrainState, abstract_train_state, init_train_state

TINY = tiny.model_config(dropout_rate=0.1)
RULES = partitioning.DEFAULT_RULES
OPTIMIZER, _ = make_optimizer(OptimizerConfig())


@pytest.fixture(scope="module")
def sharded():
    """(mesh, abstract, shardings, state) on data=1, fsdp=4, tensor=2."""
    mesh = partitioning.make_mesh(MeshConfig(fsdp_ici=4, tensor_ici=2))
    abstract, shardings = abstract_train_state(TINY, OPTIMIZER, mesh, RULES, seed=3)
    state = init_train_state(TINY, OPTIMIZER, mesh, RULES, seed=3)
    return mesh, abstract, shardings, state


def test_init_is_sharded_as_declared(sharded):
    mesh, abstract, shardings, state = sharded
    leaves = jax.tree_util.tree_leaves_with_path(state)
    expected = jax.tree.leaves(shardings)
    assert len(leaves) == len(expected) == len(jax.tree.leaves(abstract))
    for (path, leaf), sharding, shape in zip(leaves, expected, jax.tree.leaves(abstract)):
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, jax.Array), name
        assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh, name
        assert leaf.sharding == sharding == shape.sharding, name
        assert (leaf.shape, leaf.dtype) == (shape.shape, shape.dtype), name
    # Genuinely split: each device holds a quarter of embed and half of mlp.
    wi_0 = state.params["layers"]["mlp"]["wi_0"]["kernel"]
    assert wi_0.shape == (2, 32, 64)
    assert wi_0.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in wi_0.addressable_shards} == {(2, 8, 32)}
    table = state.params["token_embedding"]
    assert table.shape == (384, 32) and {s.data.shape for s in table.addressable_shards} == {
        (192, 8)
    }


def test_state_tree_is_unboxed_step_params_opt_state(sharded):
    _, _, shardings, state = sharded
    assert isinstance(state, TrainState)
    assert not any(
        isinstance(x, nn.Partitioned)
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    )
    assert state.step.dtype == jnp.int32 and state.step.shape == () and int(state.step) == 0
    assert state.step.sharding.spec == P()
    assert set(state.params) == {"token_embedding", "layers", "final_norm", "logits"}
    # Adam moments follow their parameter's sharding; counts are replicated scalars.
    adam = state.opt_state[1][0]
    for mu, nu, param in zip(
        jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu), jax.tree.leaves(state.params)
    ):
        assert mu.sharding == nu.sharding == param.sharding
        assert mu.shape == param.shape and float(jnp.max(jnp.abs(mu))) == 0.0
    assert adam.count.sharding.spec == P() and int(adam.count) == 0


def test_abstract_state_is_cheap_and_carries_shardings(sharded):
    mesh, abstract, shardings, _ = sharded
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert abstract.params["layers"]["attention"]["query"]["kernel"].shape == (2, 32, 4, 8)
    assert abstract.params["layers"]["attention"]["query"]["kernel"].sharding.spec == P(
        None, "fsdp", "tensor", None
    )
    # A different seed changes values, never shapes or shardings.
    other, _ = abstract_train_state(TINY, OPTIMIZER, mesh, RULES, seed=4)
    assert jax.tree.map(lambda a, b: a == b, abstract, other) == jax.tree.map(
        lambda _: True, abstract
    )


def test_init_values_do_not_depend_on_the_mesh(sharded):
    _, _, _, state = sharded
    one_device = partitioning.make_mesh(MeshConfig(), jax.devices()[:1])
    single = init_train_state(TINY, OPTIMIZER, one_device, RULES, seed=3)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(single.params["final_norm"]["scale"].sharding.device_set) == 1
