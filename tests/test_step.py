"""Loss, optimizer and the jitted train/eval steps on tiny shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

from pingllm import partitioning, step
from pingllm.data import tokens
from pingllm.optimizer import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from pingllm.partitioning import MeshConfig
from pingllm.train_state import abstract_train_state, init_train_state

TINY = tiny.model_config(
    dropout_rate=0.1,  # dropout on: keys must not depend on the mesh either
    remat_policy="minimal",  # the production path: scan + remat
)
RULES = partitioning.DEFAULT_RULES
OPT_CFG = OptimizerConfig(peak_learning_rate=3e-3, warmup_steps=3, decay_end_step=100)
B, L = 8, 16


def make_batch(seed: int = 0, batch_size: int = B, length: int = L) -> dict[str, np.ndarray]:
    """A batch as docs/CONTRACTS.md describes it: one window per row, real tokens then padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, batch_size)
    real = np.arange(length)[None, :] < lengths[:, None]
    inputs = np.where(real, rng.integers(0, 267, (batch_size, length)), 0).astype(np.int32)
    targets = np.concatenate([inputs[:, 1:], np.zeros((batch_size, 1), np.int32)], axis=1)
    has_target = np.arange(length)[None, :] < (lengths - 1)[:, None]
    fields = np.where(has_target, rng.integers(1, 6, (batch_size, length)), 0).astype(np.int32)
    return {
        "inputs": inputs,
        "targets": targets,
        "weights": has_target.astype(np.float32),
        "segment_ids": real.astype(np.int32),
        "fields": fields,
        "novel_result": ((fields == 4) & (rng.random((batch_size, length)) < 0.5)).astype(
            np.float32),
    }


class Setup:
    """One mesh's compiled steps plus a way to get fresh copies of one initial state."""

    def __init__(self, mesh, host_state):
        self.mesh = mesh
        self.optimizer, self.schedule = make_optimizer(OPT_CFG)
        _, self.shardings = abstract_train_state(TINY, self.optimizer, mesh, RULES)
        self.host_state = host_state
        batch_sharding = partitioning.batch_sharding(mesh, RULES)
        self.train_step = step.make_train_step(
            TINY, self.optimizer, self.schedule, self.shardings, batch_sharding, mesh, RULES
        )
        self.eval_step = step.make_eval_step(
            TINY, self.shardings.params, batch_sharding, mesh, RULES
        )

    def fresh_state(self):
        return jax.device_put(self.host_state, self.shardings)

    def batch(self, seed=0):
        return partitioning.make_global_batch(make_batch(seed), self.mesh, RULES)


@pytest.fixture(scope="module")
def four():
    """data=2, fsdp=2 on 4 devices."""
    mesh = partitioning.make_mesh(MeshConfig(data_ici=2, fsdp_ici=2), jax.devices()[:4])
    optimizer, _ = make_optimizer(OPT_CFG)
    host_state = jax.device_get(init_train_state(TINY, optimizer, mesh, RULES, seed=0))
    return Setup(mesh, host_state)


def test_loss_decreases_on_a_repeated_batch(four):
    state, batch, key = four.fresh_state(), four.batch(), jax.random.key(0)
    losses = []
    for _ in range(30):
        state, metrics = four.train_step(state, batch, key)
        losses.append(float(metrics["loss"]))
    print("loss every 5 steps:", [round(x, 3) for x in losses[::5]], "last", round(losses[-1], 3))
    assert int(state.step) == 30
    assert losses[-1] < 0.6 * losses[0]
    assert np.all(np.isfinite(losses))


def test_metrics_per_field_consistent_and_learning_rate(four):
    state, batch = four.fresh_state(), four.batch(seed=1)
    host = make_batch(seed=1)
    _, metrics = four.train_step(state, batch, jax.random.key(0))
    metrics = {k: float(v) for k, v in metrics.items()}
    assert metrics["tokens"] == host["weights"].sum()
    groups = step.FIELD_GROUPS
    assert sum(metrics[f"tokens/{g}"] for g in groups) == metrics["tokens"]
    assert metrics["tokens/address"] == np.sum(np.isin(host["fields"], (2, 3)) * host["weights"])
    weighted = sum(metrics[f"loss/{g}"] * metrics[f"tokens/{g}"] for g in groups)
    assert weighted == pytest.approx(metrics["loss"] * metrics["tokens"], rel=1e-5)
    assert metrics["learning_rate"] == 0.0  # step 0 of the warmup
    assert metrics["grad_norm"] > 0


def test_loss_sums_match_a_numpy_reference():
    rng = np.random.default_rng(2)
    batch = make_batch(seed=2)
    logits = rng.normal(size=(B, L, 384)).astype(np.float32) * 3
    logits[..., 267:] = -1e9
    sums = jax.jit(step.loss_sums)(jnp.asarray(logits), batch)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    w = batch["weights"]
    assert float(sums["loss_sum"]) == pytest.approx(float((ce * w).sum()), rel=1e-5)
    assert float(sums["tokens"]) == w.sum()
    for name, ids in step.FIELD_GROUPS.items():
        gw = w * np.isin(batch["fields"], ids)
        assert float(sums[f"loss_sum/{name}"]) == pytest.approx(float((ce * gw).sum()), rel=1e-5)
        assert float(sums[f"tokens/{name}"]) == gw.sum()
    means = step.means_from_sums({k: float(v) for k, v in sums.items()})
    assert means["loss"] == pytest.approx(float((ce * w).sum() / w.sum()), rel=1e-5)
    assert step.means_from_sums({"loss_sum/x": 0.0, "tokens/x": 0.0})["loss/x"] == 0.0


def test_eval_sums_add_up_over_batches(four):
    state, batch = four.fresh_state(), make_batch(seed=3)
    full = four.eval_step(state.params, partitioning.make_global_batch(batch, four.mesh, RULES))
    halves = []
    for rows in (slice(0, 4), slice(4, 8)):
        part = dict(batch, weights=batch["weights"].copy())
        part["weights"][rows] = 0.0
        part_batch = partitioning.make_global_batch(part, four.mesh, RULES)
        halves.append(four.eval_step(state.params, part_batch))
    for key, value in full.items():
        assert float(halves[0][key] + halves[1][key]) == pytest.approx(float(value), rel=1e-5), key
    # Eval is deterministic (no dropout) and leaves the state alone.
    again = four.eval_step(state.params, partitioning.make_global_batch(batch, four.mesh, RULES))
    assert float(again["loss_sum"]) == float(full["loss_sum"])


def test_state_is_donated(four):
    state = four.fresh_state()
    old_leaves = jax.tree.leaves(state)
    new_state, _ = four.train_step(state, four.batch(), jax.random.key(0))
    assert all(x.is_deleted() for x in old_leaves)
    assert not any(x.is_deleted() for x in jax.tree.leaves(new_state))


def test_one_device_and_four_devices_agree(four):
    one = Setup(partitioning.make_mesh(MeshConfig(), jax.devices()[:1]), four.host_state)
    key = jax.random.key(7)
    results = []
    for setup in (one, four):
        state = setup.fresh_state()
        losses = []
        for seed in range(2):
            state, metrics = setup.train_step(state, setup.batch(seed), key)
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(state.params)))
    (losses_1, params_1), (losses_4, params_4) = results
    print("1 device:", losses_1, "4 devices:", losses_4)
    # Sharded reductions add in another order: float32 rounding only (seen: 9.5e-7 absolute).
    np.testing.assert_allclose(losses_1, losses_4, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_schedule_values_are_pinned():
    schedule = make_schedule(OptimizerConfig())  # 3e-4 peak, warmup 2000, cosine to 200k, 10%
    expected = {
        0: 0.0,
        1000: 1.5e-4,
        2000: 3e-4,
        101_000: 3e-4 * (0.1 + 0.9 * 0.5),  # half-way through the cosine
        200_000: 3e-5,
        300_000: 3e-5,  # constant after decay_end_step
    }
    for s, lr in expected.items():
        assert float(schedule(s)) == pytest.approx(lr, rel=1e-5, abs=1e-12), s


def test_weight_decay_mask_and_effect():
    params = {
        "token_embedding": jnp.ones((4, 2)),
        "layers": {
            "pre_attention_norm": {"scale": jnp.ones((2, 2))},
            "mlp": {"wi_0": {"kernel": jnp.ones((2, 2, 3))}},
        },
        "final_norm": {"scale": jnp.ones((2,))},
    }
    assert decay_mask(params) == {
        "token_embedding": True,
        "layers": {"pre_attention_norm": {"scale": False}, "mlp": {"wi_0": {"kernel": True}}},
        "final_norm": {"scale": False},
    }
    cfg = OptimizerConfig(
        peak_learning_rate=0.1, warmup_steps=0, decay_end_step=10, weight_decay=0.5
    )
    optimizer, schedule = make_optimizer(cfg)
    assert float(schedule(0)) == pytest.approx(0.1)

    @jax.jit
    def zero_grad_update(p):
        # Zero gradients: Adam's step is 0, so only decoupled weight decay moves a parameter.
        grads = jax.tree.map(jnp.zeros_like, p)
        updates, _ = optimizer.update(grads, optimizer.init(p), p)
        return optax.apply_updates(p, updates)

    new = zero_grad_update(params)
    np.testing.assert_allclose(new["token_embedding"], 0.95)  # 1 - lr * wd
    np.testing.assert_allclose(new["layers"]["mlp"]["wi_0"]["kernel"], 0.95)
    np.testing.assert_array_equal(new["layers"]["pre_attention_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(new["final_norm"]["scale"], 1.0)


def test_optimizer_config_validation():
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimizerConfig(warmup_steps=10, decay_end_step=5)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        OptimizerConfig(grad_clip_norm=-1.0)


def test_objective_weights_novel_results():
    rng = np.random.default_rng(4)
    batch = make_batch(seed=4)
    logits = jnp.asarray(rng.normal(size=(B, L, 384)).astype(np.float32))
    sums = {k: float(v) for k, v in jax.jit(step.loss_sums)(logits, batch).items()}
    novel = float((batch["weights"] * batch["novel_result"]).sum())
    assert sums["tokens/novel_result"] == novel > 0
    assert float(step.objective(sums)) == pytest.approx(sums["loss_sum"] / sums["tokens"])
    k = 5.0
    weights = batch["weights"] * (1 + (k - 1) * batch["novel_result"])
    shifted = np.asarray(logits) - np.asarray(logits).max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    assert float(step.objective(sums, k)) == pytest.approx(
        float((ce * weights).sum() / weights.sum()), rel=1e-5)
    del batch["novel_result"]  # batches without the key: the plain mean whatever the weight
    plain = {k_: float(v) for k_, v in jax.jit(step.loss_sums)(logits, batch).items()}
    assert float(step.objective(plain, k)) == pytest.approx(plain["loss_sum"] / plain["tokens"])


def test_novel_result_weight_changes_the_update_not_the_logged_loss(four):
    batch = four.batch(seed=5)
    heavy = step.make_train_step(TINY, four.optimizer, four.schedule, four.shardings,
                                 partitioning.batch_sharding(four.mesh, RULES), four.mesh, RULES,
                                 novel_result_weight=5.0)
    state_a, metrics_a = four.train_step(four.fresh_state(), batch, jax.random.key(0))
    state_b, metrics_b = heavy(four.fresh_state(), batch, jax.random.key(0))
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    assert float(metrics_a["loss/novel_result"]) == float(metrics_b["loss/novel_result"])
    assert float(metrics_a["grad_norm"]) != float(metrics_b["grad_norm"])


def _rtt_batch(rtts_ms):
    """One row: RTT_START, byte1, byte2 per RTT (byte1 predicted where RTT_START is the input)."""
    byte1, byte2 = tokens.rtt_code_to_bytes(tokens.encode_rtt(np.asarray(rtts_ms)))
    seq = [tok for b1, b2 in zip(byte1, byte2)
           for tok in (tokens.RTT_START, tokens.BYTE_OFFSET + b1, tokens.BYTE_OFFSET + b2)]
    inputs = np.asarray([seq], np.int32)
    targets = np.concatenate([inputs[:, 1:], [[tokens.RTT_START]]], axis=1).astype(np.int32)
    return {"inputs": inputs, "targets": targets}


def test_rtt_smoothed_targets_are_gaussian_mass_over_rtt_bins():
    rtts = [0.3, 12.3, 50.0, 180.0, 2500.0]
    batch = _rtt_batch(rtts)
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(1, batch["inputs"].shape[1], 384)).astype(np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    hard = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    # Each first RTT byte's range from the codes it starts (byte1 0 holds 1-255 us).
    canonical = [b for b in range(256) if tokens.is_canonical_rtt_code(b << 8 | 255)]
    edges = {b: (tokens.decode_rtt(b << 8) * 1000, tokens.decode_rtt(b << 8 | 255) * 1000
                 + 2.0 ** (b >> 3)) for b in canonical}
    sigma = 0.2
    got = np.asarray(step.rtt_smoothed_cross_entropy(jnp.asarray(logits), batch, sigma))
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    for i, rtt in enumerate(rtts):
        mu = math.log(rtt * 1000)
        q = {b: phi((math.log(hi) - mu) / sigma) - (phi((math.log(lo) - mu) / sigma) if lo > 0
                                                    else 0.0) for b, (lo, hi) in edges.items()}
        total = sum(q.values())
        want = -sum(m / total * log_probs[0, 3 * i, tokens.BYTE_OFFSET + b] for b, m in q.items())
        assert got[0, 3 * i] == pytest.approx(want, rel=1e-4)
        # Every other token (RTT_START, the second RTT byte) keeps its one-hot target.
        np.testing.assert_allclose(got[0, 3 * i + 1:3 * i + 3], hard[0, 3 * i + 1:3 * i + 3],
                                   rtol=1e-5)
    # Logits sure of the measured bin: nearly no loss one-hot, a real loss smoothed.
    peaked = np.where(np.arange(384) == batch["targets"][..., None], 20.0, 0.0)
    sure = np.asarray(step.rtt_smoothed_cross_entropy(jnp.asarray(peaked), batch, sigma))
    assert np.all(sure[0, ::3] > 1.0) and np.all(sure[0, 1::3] < 1e-5)
    # A narrow Gaussian inside one bin is that bin's one-hot target.
    narrow = np.asarray(step.rtt_smoothed_cross_entropy(jnp.asarray(logits), batch, 1e-4))
    np.testing.assert_allclose(narrow, hard, rtol=1e-5)


def test_rtt_label_sigma_changes_the_update_not_the_logged_loss(four):
    host = make_batch(seed=7)
    byte1, byte2 = tokens.rtt_code_to_bytes(tokens.encode_rtt(np.linspace(1.0, 300.0, B)))
    host["inputs"][:, :3] = np.stack([np.full(B, tokens.RTT_START), tokens.BYTE_OFFSET + byte1,
                                      tokens.BYTE_OFFSET + byte2], axis=1)
    host["targets"][:, :2] = host["inputs"][:, 1:3]
    batch = partitioning.make_global_batch(host, four.mesh, RULES)
    smoothed = step.make_train_step(TINY, four.optimizer, four.schedule, four.shardings,
                                    partitioning.batch_sharding(four.mesh, RULES), four.mesh,
                                    RULES, rtt_sigma=0.3)
    _, metrics_a = four.train_step(four.fresh_state(), batch, jax.random.key(0))
    _, metrics_b = smoothed(four.fresh_state(), batch, jax.random.key(0))
    assert float(metrics_a["loss"]) == pytest.approx(float(metrics_b["loss"]), rel=1e-6)
    assert float(metrics_a["grad_norm"]) != pytest.approx(float(metrics_b["grad_norm"]), rel=1e-4)
    with pytest.raises(ValueError, match="rtt_label_sigma"):
        OptimizerConfig(rtt_label_sigma=-0.1)
