"""The transformer: shapes, masking, padded vocabulary, scan/remat, parameter counts."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from pingllm import model as model_lib
from pingllm.model import ModelConfig, Transformer

TINY = tiny.model_config()
B, L = 2, 16


def _inputs(seed=0, real_length=12):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, TINY.vocab_size, (B, L)).astype(np.int32)
    segment_ids = np.zeros((B, L), np.int32)
    segment_ids[:, :real_length] = 1
    inputs[:, real_length:] = 0
    return inputs, segment_ids


@functools.cache
def _init(cfg=TINY):
    """(jitted apply(params, inputs, segment_ids, ...), params). Cached: compiles dominate."""
    model = Transformer(cfg)
    abstract = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, *model_lib.dummy_inputs(cfg))
    )
    # Random values from numpy instead of running the (slow-to-compile) init on CPU.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            np.ones(x.shape, x.dtype)
            if path[-1].key == "scale"
            else (rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if x.ndim > 1 else 1)).astype(
                x.dtype
            )
        ),
        nn.meta.unbox(abstract["params"]),
    )
    apply = jax.jit(
        lambda p, inputs, segment_ids, deterministic=True, key=None: model.apply(
            {"params": p},
            inputs,
            segment_ids,
            deterministic=deterministic,
            rngs=None if key is None else {"dropout": key},
        ),
        static_argnames="deterministic",
    )
    return apply, params


def test_output_shape_dtype_and_padded_vocab():
    model, params = _init()
    inputs, segment_ids = _inputs()
    logits = model(params, inputs, segment_ids)
    assert TINY.padded_vocab_size == 384
    assert logits.shape == (B, L, 384) and logits.dtype == jnp.float32
    assert np.all(np.asarray(logits[..., 267:]) == model_lib.NEG_INF)
    assert np.all(np.abs(np.asarray(logits[..., :267])) < 1e3)
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(jnp.max(probs[..., 267:])) == 0.0
    assert np.allclose(np.asarray(jnp.sum(probs[..., :267], -1)), 1.0, atol=1e-5)


def test_every_parameter_has_logical_axes():
    boxed = jax.eval_shape(
        lambda: Transformer(TINY).init({"params": jax.random.key(0)}, *model_lib.dummy_inputs(TINY))
    )["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
    query = boxed["layers"]["attention"]["query"]["kernel"]
    assert query.names == ("layers", "embed", "heads", "kv")
    assert boxed["layers"]["mlp"]["wo"]["kernel"].names == ("layers", "mlp", "embed")
    assert boxed["token_embedding"].names == ("vocab", "embed")
    assert boxed["logits"]["kernel"].names == ("embed", "vocab")


def test_causal():
    model, params = _init()
    inputs, segment_ids = _inputs()
    base = np.asarray(model(params, inputs, segment_ids))
    changed = inputs.copy()
    changed[:, 5] = (changed[:, 5] + 7) % TINY.vocab_size
    out = np.asarray(model(params, changed, segment_ids))
    np.testing.assert_array_equal(out[:, :5], base[:, :5])
    assert np.max(np.abs(out[:, 5:12] - base[:, 5:12])) > 1e-3


def test_padding_never_attended_and_no_nans():
    model, params = _init()
    inputs, segment_ids = _inputs(real_length=9)
    base = np.asarray(model(params, inputs, segment_ids))
    assert np.all(np.isfinite(base))
    changed = inputs.copy()
    changed[:, 9:] = np.arange(7) + 100  # different tokens in every padded slot
    out = np.asarray(model(params, changed, segment_ids))
    np.testing.assert_array_equal(out[:, :9], base[:, :9])
    assert np.all(np.isfinite(out))
    assert np.max(np.abs(out[:, 9:] - base[:, 9:])) > 1e-3  # padding rows do see their tokens


def test_attention_mask_shape_and_values():
    mask = np.asarray(model_lib.attention_mask(jnp.array([[1, 1, 1, 0]])))
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)
    assert mask.shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(mask[0, 0], expected)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32) for _ in range(2))
    positions = jnp.arange(6)[None, :]

    def scores(offset):
        rq = model_lib.apply_rope(q, positions + offset, 10_000.0)
        rk = model_lib.apply_rope(k, positions + offset, 10_000.0)
        return np.asarray(jnp.einsum("bqnh,bknh->bnqk", rq, rk))

    np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)
    np.testing.assert_allclose(  # a rotation: norms are kept
        np.linalg.norm(np.asarray(model_lib.apply_rope(q, positions, 10_000.0)), axis=-1),
        np.linalg.norm(np.asarray(q), axis=-1),
        rtol=1e-5,
    )
    assert np.max(np.abs(scores(0) - np.asarray(jnp.einsum("bqnh,bknh->bnqk", q, k)))) > 1e-2


def test_length_based_attention_equals_mask_at_real_positions():
    # The cuDNN path's arguments (causal + lengths), run through XLA here: CPU has no cuDNN.
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 8, 2, 4)), jnp.float32) for _ in range(3))
    segment_ids = jnp.array([[1] * 5 + [0] * 3, [1] * 8])
    by_mask = np.asarray(model_lib.attend(q, k, v, segment_ids, "xla"))
    by_lengths = np.asarray(model_lib.attend_by_lengths(q, k, v, segment_ids, "xla"))
    np.testing.assert_allclose(by_lengths[0, :5], by_mask[0, :5], atol=1e-6)
    np.testing.assert_allclose(by_lengths[1], by_mask[1], atol=1e-6)
    assert np.all(by_lengths[0, 5:] == 0)


def test_scan_matches_unrolled():
    model, params = _init()
    unrolled_cfg = dataclasses.replace(TINY, scan_layers=False)
    unrolled_apply, _ = _init(unrolled_cfg)
    unrolled = {k: v for k, v in params.items() if k != "layers"}
    for i in range(TINY.num_layers):
        unrolled[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    reference = jax.eval_shape(
        lambda: Transformer(unrolled_cfg).init(
            {"params": jax.random.key(0)}, *model_lib.dummy_inputs(TINY)
        )
    )["params"]
    assert jax.tree.structure(nn.meta.unbox(reference)) == jax.tree.structure(unrolled)
    inputs, segment_ids = _inputs()
    scanned = model(params, inputs, segment_ids)
    looped = unrolled_apply(unrolled, inputs, segment_ids)
    np.testing.assert_allclose(np.asarray(looped), np.asarray(scanned), atol=1e-5, rtol=1e-5)


def test_remat_policies_trace():
    # Tracing shows the checkpoint in the program without compiling; test_step.py compiles and
    # trains with scan + remat 'minimal', the production path.
    inputs, segment_ids = _inputs()
    for policy in model_lib.REMAT_POLICIES:
        for scan_layers in (True, False):
            cfg = dataclasses.replace(TINY, remat_policy=policy, scan_layers=scan_layers)
            model, params = _init(cfg)
            grad_fn = jax.grad(lambda p, model=model: jnp.mean(model(p, inputs, segment_ids)))
            jaxpr = str(jax.make_jaxpr(grad_fn)(params))
            assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (policy != "none"), policy


def test_dropout_uses_the_rng():
    cfg = dataclasses.replace(TINY, dropout_rate=0.5)
    model, params = _init(cfg)
    inputs, segment_ids = _inputs()
    run = lambda key: np.asarray(  # noqa: E731
        model(params, inputs, segment_ids, deterministic=False, key=key)
    )
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, run(jax.random.key(1)))
    assert np.max(np.abs(a - b)) > 1e-3
    # Same parameter values as TINY's (only the rate differs), whose apply is compiled already.
    tiny_apply, tiny_params = _init(TINY)
    no_dropout = np.asarray(tiny_apply(tiny_params, inputs, segment_ids))
    assert np.max(np.abs(a - no_dropout)) > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    model, params = _init(cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    logits = model(params, *_inputs())
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


# The latency_network shape (20 layers x 640, 10 heads of 64, MLP 2048, vocab 267 -> 384 rows).
# Per layer: attention 4*640*640 = 1,638,400; two RMSNorm gains 1,280; MLP 2*640*2048 =
# 2,621,440 (two-matrix) or 3*640*2048 = 3,932,160 (gated). Plus final norm 640 and the
# embedding table 384*640 = 245,760 (x2 when untied).
PARAM_COUNTS = {
    # (mlp_gated, logits_via_embedding): total parameters with the vocabulary padded to 384
    (True, False): 111_928_960,
    (True, True): 111_683_200,
    (False, False): 85_714_560,
    (False, True): 85_468_800,
}


@pytest.mark.parametrize("gated,tied", list(PARAM_COUNTS))
def test_latency_network_param_counts(gated, tied):
    cfg = ModelConfig(
        mlp_gated=gated, mlp_activation="silu" if gated else "gelu", logits_via_embedding=tied
    )
    mlp = (3 if gated else 2) * 640 * 2048
    table = 384 * 640
    expected = 20 * (4 * 640 * 640 + mlp + 2 * 640) + 640 + table * (1 if tied else 2)
    count = model_lib.param_count(cfg)
    print(f"latency_network gated={gated} tied={tied}: {count:,} parameters")
    assert count == expected == PARAM_COUNTS[(gated, tied)]
    # Without padding the vocabulary, each table would have 267 rows instead of 384.
    unpadded = count - (384 - 267) * 640 * (1 if tied else 2)
    unpadded_cfg = ModelConfig(
        mlp_gated=gated,
        mlp_activation="silu" if gated else "gelu",
        logits_via_embedding=tied,
        vocab_pad_multiple=1,
    )
    assert model_lib.param_count(unpadded_cfg) == unpadded


def test_flops_per_token():
    cfg = ModelConfig()
    matmul = 111_928_960 - 384 * 640  # input embedding lookup excluded
    assert model_lib.matmul_param_count(cfg) == matmul == 111_683_200
    assert model_lib.flops_per_token(cfg) == 6 * matmul + 12 * 20 * 640 * 1024 == 827_385_600


def test_config_validation_and_attention_choice():
    assert ModelConfig().padded_vocab_size == 384
    assert ModelConfig(vocab_pad_multiple=1).padded_vocab_size == 267
    assert model_lib.attention_implementation(ModelConfig(attention="auto")) == "xla"  # CPU
    assert model_lib.attention_implementation(ModelConfig(attention="cudnn_flash")) == "cudnn"
    with pytest.raises(ValueError, match="remat_policy"):
        ModelConfig(remat_policy="bogus")
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="flash")


def test_field_slots_name_the_field_and_byte_of_every_token():
    from pingllm.data import tokens

    record = {"src_addr": np.array([192, 0, 2, 1] + [0] * 12, np.uint8), "ip_version": 4,
              "dst_addr": np.array([[198, 51, 100, 7] + [0] * 12] * 2, np.uint8),
              "event_time": np.array([1_700_000_000, 1_700_000_100]),
              "rtt_ms": np.array([12.5, -1], np.float32)}
    w = tokens.tokenize_window(record, seed=0, window_index=0, max_length=64, mode="full")
    slots = np.asarray(model_lib.field_slots(jnp.asarray(w.tokens[None])))[0]
    opener, offset = np.divmod(slots[:w.length], model_lib.MAX_SLOT_OFFSET + 1)
    expected_opener, expected_offset, current, since = [], [], 0, 0
    for t in w.tokens[:w.length]:
        if t < tokens.BYTE_OFFSET:
            current, since = int(t), 0
        else:
            since += 1
        expected_opener.append(current)
        expected_offset.append(since)
    assert opener.tolist() == expected_opener and offset.tolist() == expected_offset
    dst_bytes = (opener == tokens.DST_IPV4) & (offset > 0)
    assert offset[dst_bytes].tolist() == [1, 2, 3, 4, 1, 2, 3, 4]
    assert slots.max() < model_lib.NUM_FIELD_SLOTS


def test_field_slot_embedding_adds_one_table_and_changes_the_output():
    cfg = dataclasses.replace(TINY, field_slot_embedding=True)
    assert model_lib.param_count(cfg) - model_lib.param_count(TINY) == (
        model_lib.NUM_FIELD_SLOTS * TINY.emb_dim)
    assert model_lib.matmul_param_count(cfg) == model_lib.matmul_param_count(TINY)
    apply, params = _init(cfg)
    inputs, segment_ids = _inputs()
    logits = apply(params, inputs, segment_ids)
    without = dict(params, field_slot_embedding=np.zeros_like(params["field_slot_embedding"]))
    assert np.all(np.isfinite(logits))
    assert not np.allclose(logits, apply(without, inputs, segment_ids))



PREFIX_TINY = dataclasses.replace(TINY, max_target_length=64, field_slot_embedding=True)


def _two_pings_window(third_dst_byte=100):
    from pingllm.data import tokens

    record = {"src_addr": np.array([192, 0, 2, 1] + [0] * 12, np.uint8), "ip_version": 4,
              "dst_addr": np.array([[198, 51, third_dst_byte, 7] + [0] * 12] * 2, np.uint8),
              "event_time": np.array([1_700_000_000, 1_700_000_100]),
              "rtt_ms": np.array([12.5, 30.0], np.float32)}
    return tokens.tokenize_window(record, seed=0, window_index=0, max_length=64, mode="full")


def test_address_prefix_buckets_hash_each_prefix_at_the_address_last_byte():
    from pingllm.data import tokens

    w, w2 = _two_pings_window(100), _two_pings_window(101)
    buckets, valid = (np.asarray(a)[0] for a in model_lib.address_prefix_buckets(
        jnp.asarray(w.tokens[None]), 1 << 14))
    buckets2, valid2 = (np.asarray(a)[0] for a in model_lib.address_prefix_buckets(
        jnp.asarray(w2.tokens[None]), 1 << 14))
    opener2 = np.asarray(model_lib._openers(jnp.asarray(w2.tokens[None]))[1])[0]
    dst2_at = np.flatnonzero(valid2.any(-1) & (opener2 == tokens.DST_IPV4))
    _, opener, offset = (np.asarray(a)[0] for a in model_lib._openers(jnp.asarray(w.tokens[None])))
    last_v4 = np.isin(opener, [tokens.SRC_IPV4, tokens.DST_IPV4]) & (offset == 4)
    last_v4 &= np.arange(len(w.tokens)) < w.length
    # Valid exactly at each IPv4 address's 4th byte, for /16, /24 and /32 (not the 4th level).
    assert valid[:w.length].any(-1).tolist() == last_v4[:w.length].tolist()
    assert (valid[last_v4] == [True, True, True, False]).all()
    src_at = np.flatnonzero(last_v4 & (opener == tokens.SRC_IPV4))
    dst_at = np.flatnonzero(last_v4 & (opener == tokens.DST_IPV4))
    assert len(src_at) == 2 and len(dst_at) == 2
    # The same address hashes the same wherever it is; another /24 in the same /16 shares
    # only the /16 bucket; the source's prefixes differ from the destination's.
    assert (buckets[dst_at[0], :3] == buckets[dst_at[1], :3]).all()
    assert buckets2[dst2_at[0], 0] == buckets[dst_at[0], 0]
    assert (buckets2[dst2_at[0], 1:3] != buckets[dst_at[0], 1:3]).all()
    assert (buckets[src_at[0], :3] != buckets[dst_at[0], :3]).all()
    assert buckets.min() >= 0 and buckets.max() < 1 << 14


def test_address_prefix_embedding_is_used_causally_and_changes_the_output():
    cfg = dataclasses.replace(PREFIX_TINY, address_prefix_buckets=64)
    base = PREFIX_TINY
    assert model_lib.param_count(cfg) - model_lib.param_count(base) == 64 * TINY.emb_dim
    assert model_lib.matmul_param_count(cfg) == model_lib.matmul_param_count(base)
    with pytest.raises(ValueError, match="address_prefix_buckets"):
        dataclasses.replace(TINY, address_prefix_buckets=-1)
    apply, params = _init(cfg)
    w = _two_pings_window()
    inputs = jnp.asarray(w.tokens[None])
    segment_ids = jnp.asarray((np.arange(len(w.tokens)) < w.length)[None].astype(np.int32))
    logits = np.asarray(apply(params, inputs, segment_ids))
    zero = dict(params, address_prefix_embedding=np.zeros_like(params["address_prefix_embedding"]))
    logits_zero = np.asarray(apply(zero, inputs, segment_ids))
    # Zero table = the model without it (same other parameters).
    apply_base, _ = _init(base)
    without = {k: v for k, v in params.items() if k != "address_prefix_embedding"}
    np.testing.assert_allclose(logits_zero, np.asarray(apply_base(without, inputs, segment_ids)),
                               rtol=1e-5, atol=1e-5)
    first = int(np.flatnonzero(np.asarray(model_lib.address_prefix_buckets(inputs, 64)[1])[0]
                               .any(-1))[0])
    # Positions before the first address's last byte never see the table; later ones do.
    np.testing.assert_array_equal(logits[0, :first], logits_zero[0, :first])
    assert not np.allclose(logits[0, first:w.length], logits_zero[0, first:w.length])
