"""The parameters' moving average (OptimizerConfig.ema_decay): its arithmetic, the sharded train
step that keeps it, its checkpoint, and prediction reading it."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny

from pingllm import partitioning, step
from pingllm.checkpoint import manager as checkpointing
from pingllm.model import Transformer, dummy_inputs
from pingllm.optimizer import OptimizerConfig, ema_update, make_optimizer, params_average
from pingllm.partitioning import MeshConfig
from pingllm.train_state import TrainState, abstract_train_state, init_train_state

TINY = tiny.model_config()
RULES = partitioning.DEFAULT_RULES
DECAY = 0.9


def test_ema_update_is_the_normalised_decayed_average_of_every_step():
    values = [np.float32(v) for v in (3.0, -1.0, 7.0, 2.0)]
    ema = {"w": jnp.float32(123.0)}  # the starting value never counts (first weight is 1)
    for t, v in enumerate(values, start=1):
        ema = ema_update(ema, {"w": jnp.asarray(v)}, jnp.int32(t), DECAY)
        weights = DECAY ** np.arange(t - 1, -1, -1)
        expected = np.dot(weights, values[:t]) / weights.sum()
        np.testing.assert_allclose(float(ema["w"]), expected, rtol=1e-6)


def test_tail_average_is_the_plain_mean_after_the_start_step():
    values = [np.float32(v) for v in (3.0, -1.0, 7.0, 2.0, 5.0)]
    ema = {"w": jnp.float32(123.0)}
    for t, v in enumerate(values, start=1):
        ema = ema_update(ema, {"w": jnp.asarray(v)}, jnp.int32(t), 1.0, start_step=2)
        # Up to the start step the average is the parameters; then the mean of steps 3..t.
        expected = v if t <= 3 else np.mean(values[2:t])
        np.testing.assert_allclose(float(ema["w"]), expected, rtol=1e-6)


def test_ema_settings_are_validated():
    assert params_average(OptimizerConfig()) is None
    with pytest.raises(ValueError, match="ema_decay"):
        OptimizerConfig(ema_decay=1.5)
    with pytest.raises(ValueError, match="ema_decay"):
        OptimizerConfig(ema_decay=-0.1)
    with pytest.raises(ValueError, match="ema_start_step"):
        OptimizerConfig(ema_decay=1.0, ema_start_step=-1)


def _batch(seed):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, 267, (4, 16)).astype(np.int32)
    return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
            "weights": np.ones((4, 16), np.float32), "segment_ids": np.ones((4, 16), np.int32),
            "fields": np.full((4, 16), 2, np.int32)}


def test_sharded_train_step_keeps_the_average_of_its_parameters():
    mesh = partitioning.make_mesh(MeshConfig(data_ici=2, fsdp_ici=2), jax.devices()[:4])
    opt_cfg = OptimizerConfig(peak_learning_rate=1e-2, warmup_steps=0, decay_end_step=10,
                              ema_decay=DECAY)
    tx, schedule = make_optimizer(opt_cfg)
    _, shardings = abstract_train_state(TINY, tx, mesh, RULES, ema=True)
    # The average is laid out exactly like the parameters.
    assert jax.tree.leaves(shardings.ema_params) == jax.tree.leaves(shardings.params)
    state = init_train_state(TINY, tx, mesh, RULES, ema=True)
    train = step.make_train_step(TINY, tx, schedule, shardings,
                                 partitioning.batch_sharding(mesh, RULES), mesh, RULES,
                                 params_average=params_average(opt_cfg))
    history = []
    for i in range(3):
        state, _ = train(state, partitioning.make_global_batch(_batch(i), mesh, RULES),
                         jax.random.key(0))
        history.append(jax.device_get(state.params))
    assert int(state.step) == 3
    weights = DECAY ** np.arange(2, -1, -1)
    expected = jax.tree.map(lambda *ps: sum(w * p for w, p in zip(weights, ps)) / weights.sum(),
                            *history)
    got = jax.device_get(state.ema_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got,
                 expected)
    assert state.eval_params is state.ema_params
    assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(history[-1])[0])
    plain = init_train_state(TINY, tx, mesh, RULES)
    assert plain.ema_params is None and plain.eval_params is plain.params


def _params(seed):
    model = Transformer(TINY)
    return jax.device_get(model.init({"params": jax.random.key(seed)},
                                     *dummy_inputs(TINY))["params"])


def test_prediction_restores_the_average_and_falls_back_to_the_parameters(tmp_path):
    tx, _ = make_optimizer(OptimizerConfig())
    params, average = _params(0), _params(1)
    with_ema = TrainState(step=np.int32(5), params=params, opt_state=tx.init(params),
                          ema_params=average)
    without = TrainState(step=np.int32(5), params=params, opt_state=tx.init(params))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), params)
    for name, state in (("with", with_ema), ("without", without)):
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp_path / name / "items", state)
    for name, prefer_ema, expected in (("with", True, average), ("with", False, params),
                                       ("without", True, params)):
        got = checkpointing.restore_params(tmp_path / name, abstract, prefer_ema=prefer_ema)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), expected)
