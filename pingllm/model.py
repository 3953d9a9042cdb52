"""Decoder-only transformer over ping tokens (the MaxText llama2 block), logically partitioned.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and activations are
constrained at block boundaries (`nn.with_logical_constraint`); `partitioning.py` maps those
names onto the mesh. Outside a mesh + rules context the constraints are no-ops.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pingllm.data import tokens as tokens_lib

# Added to the logits of padded-vocab ids: far below any real logit, yet finite so that
# softmax/cross-entropy and their gradients stay NaN-free.
NEG_INF = -1e9

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls
    "save_dots": jax.checkpoint_policies.checkpoint_dots,  # keep every matmul incl. attention
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
}
ATTENTION_KINDS = ("dot_product", "cudnn_flash", "auto")
MLP_ACTIVATIONS = {"silu": nn.silu, "gelu": nn.gelu, "relu": nn.relu}

BLOCK_AXES = ("activation_batch", "activation_length", "activation_embed")

# Field slots: ids below the byte range open a field (MEASUREMENT_START, SRC_IPV4, ..., FAILED);
# a byte token's slot is (the id that opened its field, its offset in the field, <= 16).
MAX_SLOT_OFFSET = 16
NUM_FIELD_SLOTS = tokens_lib.BYTE_OFFSET * (MAX_SLOT_OFFSET + 1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the transformer; defaults are the latency_network research model."""

    vocab_size: int = 267
    # Rows of the embedding/output tables are rounded up to this multiple (matmul-friendly).
    vocab_pad_multiple: int = 128
    num_layers: int = 20
    emb_dim: int = 640
    num_heads: int = 10
    head_dim: int = 64
    mlp_dim: int = 2048
    max_target_length: int = 1024
    # 'silu' + gated = SwiGLU (llama2); 'gelu' + not gated = the two-matrix GPT-style MLP.
    mlp_activation: str = "silu"
    mlp_gated: bool = True
    dropout_rate: float = 0.1
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"
    normalization_epsilon: float = 1e-6
    rope_max_timescale: float = 10_000.0
    scan_layers: bool = True
    # Layers per iteration of the scan's loop; >= num_layers unrolls it fully (no while loop,
    # no stacked-residual buffers, same stacked parameters and checkpoints). On 2 CPU cores a
    # 2-layer model stepped 11% faster and compiled 22% faster fully unrolled
    # (docs/performance.md); compile time grows with depth, so keep 1 for deep models.
    scan_unroll: int = 1
    remat_policy: str = "none"  # one of REMAT_POLICIES
    # 'dot_product': XLA everywhere; 'cudnn_flash': cuDNN fused attention (GPU only);
    # 'auto': cuDNN when the default backend is GPU and dtype is 16-bit, XLA otherwise.
    attention: str = "auto"
    # Untied by default: with 267 ids the extra table costs 0.25M params and frees the output
    # head from the input embedding's geometry.
    logits_via_embedding: bool = False
    # Add a learned embedding of each token's field slot (which field opened it, which byte of
    # the field it is): "3rd byte of the destination" becomes an input feature instead of
    # something attention must work out from relative positions.
    field_slot_embedding: bool = False
    # Buckets of a hashed embedding of each address's prefixes (0 = off), added at the address's
    # last byte: IPv4 /16, /24, /32; IPv6 /32, /48, /64, /128; one table for sources and
    # destinations. A learned vector per prefix, as matrix factorisation learns one per host,
    # but shared by every address of a /24 (a site) or /16 (an AS).
    address_prefix_buckets: int = 0
    padded_vocab_size: int = dataclasses.field(init=False)

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r}: use one of {list(REMAT_POLICIES)}"
            )
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r}: use one of {list(ATTENTION_KINDS)}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"mlp_activation={self.mlp_activation!r}: use one of {list(MLP_ACTIVATIONS)}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.scan_unroll < 1:
            raise ValueError(f"scan_unroll={self.scan_unroll} must be >= 1")
        if self.address_prefix_buckets < 0:
            raise ValueError(
                f"address_prefix_buckets={self.address_prefix_buckets} must be >= 0 (0 = off)"
            )
        if self.vocab_pad_multiple < 1:
            raise ValueError(f"vocab_pad_multiple={self.vocab_pad_multiple} must be >= 1")
        padded = -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple
        object.__setattr__(self, "padded_vocab_size", padded)


def attention_implementation(config: ModelConfig) -> str:
    """The `jax.nn.dot_product_attention` implementation this config runs with."""
    if config.attention == "dot_product":
        return "xla"
    if config.attention == "cudnn_flash":
        return "cudnn"
    # cuDNN's fused attention takes only half-precision inputs.
    half = config.dtype in ("bfloat16", "float16")
    return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


def _openers(inputs_BxL: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(position of the id that opened each token's field, that id, offset since it)."""
    positions_L = jnp.arange(inputs_BxL.shape[1])
    is_opener_BxL = inputs_BxL < tokens_lib.BYTE_OFFSET
    opener_at_BxL = jax.lax.cummax(jnp.where(is_opener_BxL, positions_L, 0), axis=1)
    opener_BxL = jnp.take_along_axis(inputs_BxL, opener_at_BxL, axis=1)
    opener_BxL = jnp.clip(opener_BxL, 0, tokens_lib.BYTE_OFFSET - 1)
    return opener_at_BxL, opener_BxL, positions_L - opener_at_BxL


def field_slots(inputs_BxL: jax.Array) -> jax.Array:
    """int32[B, L] in [0, NUM_FIELD_SLOTS): opener id * 17 + offset since the opener."""
    _, opener_BxL, offset_BxL = _openers(inputs_BxL)
    offset_BxL = jnp.minimum(offset_BxL, MAX_SLOT_OFFSET)
    return (opener_BxL * (MAX_SLOT_OFFSET + 1) + offset_BxL).astype(jnp.int32)


# Prefix lengths in bytes hashed at an address's last byte (IPv4 /16 /24 /32; IPv6 /32 /48
# /64 /128); an IPv4 address repeats its /32 in the fourth slot, masked off.
_PREFIX_BYTES = {4: (2, 3, 4, 4), 6: (4, 6, 8, 16)}


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (uint32 in, uint32 out)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def address_prefix_buckets(inputs_BxL: jax.Array, buckets: int) -> tuple[jax.Array, jax.Array]:
    """(int32[B, L, 4] bucket of each prefix of the address ending here, bool[B, L, 4] valid).

    Valid only at the last byte of a complete address field (source or destination, one hash
    for both), so no position sees a byte after it; the bucket hashes the family, the prefix
    length and the prefix's bytes.
    """
    b, length = inputs_BxL.shape
    opener_at_BxL, opener_BxL, offset_BxL = _openers(inputs_BxL)
    is_v6_BxL = (opener_BxL == tokens_lib.SRC_IPV6) | (opener_BxL == tokens_lib.DST_IPV6)
    is_v4_BxL = (opener_BxL == tokens_lib.SRC_IPV4) | (opener_BxL == tokens_lib.DST_IPV4)
    last_BxL = (is_v4_BxL & (offset_BxL == 4)) | (is_v6_BxL & (offset_BxL == 16))
    last_BxL &= inputs_BxL >= tokens_lib.BYTE_OFFSET
    at_BxLx16 = jnp.clip(opener_at_BxL[:, :, None] + 1 + jnp.arange(16), 0, length - 1)
    bytes_BxLx16 = jnp.take_along_axis(inputs_BxL, at_BxLx16.reshape(b, -1), axis=1)
    bytes_BxLx16 = (bytes_BxLx16.reshape(b, length, 16) - tokens_lib.BYTE_OFFSET) & 0xFF
    # Running hash of the first k + 1 bytes, for every k.
    h_BxL = jnp.where(is_v6_BxL, jnp.uint32(0x9E3779B9), jnp.uint32(0x7F4A7C15))
    running = []
    for k in range(16):
        h_BxL = _fmix32(h_BxL * jnp.uint32(0x01000193) + bytes_BxLx16[:, :, k].astype(jnp.uint32))
        running.append(h_BxL)
    running_BxLx16 = jnp.stack(running, axis=-1)
    out, valid = [], []
    for level in range(4):
        n4, n6 = _PREFIX_BYTES[4][level], _PREFIX_BYTES[6][level]
        h_BxL = jnp.where(is_v6_BxL, running_BxLx16[:, :, n6 - 1], running_BxLx16[:, :, n4 - 1])
        h_BxL = _fmix32(h_BxL ^ jnp.uint32(0x2545F491 * (level + 1) & 0xFFFFFFFF))
        out.append((h_BxL % jnp.uint32(buckets)).astype(jnp.int32))
        valid.append(last_BxL & (is_v6_BxL | (level < 3)))
    return jnp.stack(out, axis=-1), jnp.stack(valid, axis=-1)


class Dense(nn.Module):
    """x @ kernel over the trailing `len(in_axes)` dims, no bias; kernel named by its logical axes.

    Own module rather than nn.DenseGeneral: that one initialises a flattened 2-D kernel and
    reshapes it, and the boxed flat kernel fails the logical-rank check under the rules context.
    """

    features: tuple[int, ...]
    in_axes: tuple[str, ...]  # logical names of the contracted input dims
    out_axes: tuple[str, ...]  # logical names of `features`
    config: ModelConfig
    output_dtype: str | None = None  # default: the compute dtype

    @nn.compact
    def __call__(self, x):
        n_in, n_out = len(self.in_axes), len(self.features)
        init = nn.initializers.variance_scaling(
            1.0,
            "fan_in",
            "truncated_normal",
            in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, n_in + n_out)),
        )
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.in_axes + self.out_axes),
            x.shape[x.ndim - n_in :] + tuple(self.features),
            jnp.dtype(self.config.param_dtype),
        )
        dtype = jnp.dtype(self.config.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        out_dtype = jnp.dtype(self.output_dtype or self.config.dtype)
        return jax.lax.dot_general(
            x.astype(dtype),
            kernel.astype(dtype),
            (contract, ((), ())),
            preferred_element_type=out_dtype,
        )


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        scale_D = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x_BxLxD.shape[-1],),
            jnp.dtype(self.config.param_dtype),
        )
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(
            jnp.mean(x * x, axis=-1, keepdims=True) + self.config.normalization_epsilon
        )
        return (x * scale_D.astype(jnp.float32)).astype(jnp.dtype(self.config.dtype))


def apply_rope(x_BxLxNxH, positions_BxL, max_timescale: float):
    """Rotary position embedding (rotate-half form, as in MaxText), computed in float32."""
    head_dim = x_BxLxNxH.shape[-1]
    fraction_H2 = 2 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
    timescale_H2 = max_timescale**fraction_H2
    angle_BxLx1xH2 = positions_BxL[:, :, None, None].astype(jnp.float32) / timescale_H2
    sin, cos = jnp.sin(angle_BxLx1xH2), jnp.cos(angle_BxLx1xH2)
    first, second = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BxLxNxH.dtype)


def attention_mask(segment_ids_BxL):
    """Causal AND same-segment mask, Bx1xLxL (True = may attend).

    Padding (segment 0) shares no segment with real tokens, so real tokens never see it; a
    padding query sees earlier padding and at least itself, so its softmax row is never empty.
    """
    length = segment_ids_BxL.shape[1]
    causal_LxL = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return (same_BxLxL & causal_LxL)[:, None, :, :]


def attend(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, implementation: str):
    """Causal self-attention that never lets real tokens see padding."""
    if implementation == "cudnn":
        return attend_by_lengths(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, "cudnn")
    return jax.nn.dot_product_attention(
        q_BxLxNxH,
        k_BxLxNxH,
        v_BxLxNxH,
        mask=attention_mask(segment_ids_BxL),
        implementation=implementation,
    )


def attend_by_lengths(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, implementation: str):
    """Causal + per-row lengths: cuDNN's native masking (no LxL bias tensor).

    Equal to the segment mask at real positions because the batch contract gives each row one
    segment of real tokens followed by padding; padding rows come out as zeros.
    """
    lengths_B = jnp.sum(segment_ids_BxL != 0, axis=-1).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q_BxLxNxH,
        k_BxLxNxH,
        v_BxLxNxH,
        is_causal=True,
        query_seq_lengths=lengths_B,
        key_value_seq_lengths=lengths_B,
        implementation=implementation,
    )


def vocab_is_sharded() -> bool:
    """Whether the logical 'vocab' axis maps onto a mesh axis of size > 1 in the current context.

    Read at trace time from the active logical-axis rules and mesh (False outside a mesh).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return False
    axes = nn.logical_to_mesh_axes(("vocab",))[0]
    if axes is None:
        return False
    names = axes if isinstance(axes, tuple) else (axes,)
    return any(mesh.shape[name] > 1 for name in names)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL):
        cfg = self.config
        dense = functools.partial(
            Dense, (cfg.num_heads, cfg.head_dim), ("embed",), ("heads", "kv"), cfg
        )
        head_axes = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        q_BxLxNxH = nn.with_logical_constraint(dense(name="query")(x_BxLxD), head_axes)
        k_BxLxNxH = nn.with_logical_constraint(dense(name="key")(x_BxLxD), head_axes)
        v_BxLxNxH = nn.with_logical_constraint(dense(name="value")(x_BxLxD), head_axes)
        q_BxLxNxH = apply_rope(q_BxLxNxH, positions_BxL, cfg.rope_max_timescale)
        k_BxLxNxH = apply_rope(k_BxLxNxH, positions_BxL, cfg.rope_max_timescale)

        out_BxLxNxH = attend(
            q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, attention_implementation(cfg)
        )
        out_BxLxNxH = nn.with_logical_constraint(out_BxLxNxH, head_axes)
        return Dense((cfg.emb_dim,), ("heads", "kv"), ("embed",), cfg, name="out")(out_BxLxNxH)


class Mlp(nn.Module):
    """SwiGLU (gated) or two-matrix feed-forward block."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.config
        activation = MLP_ACTIVATIONS[cfg.mlp_activation]
        mlp_axes = ("activation_batch", "activation_length", "activation_mlp")
        up = functools.partial(Dense, (cfg.mlp_dim,), ("embed",), ("mlp",), cfg)
        h_BxLxF = activation(up(name="wi_0")(x_BxLxD))
        if cfg.mlp_gated:
            h_BxLxF = h_BxLxF * up(name="wi_1")(x_BxLxD)
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, mlp_axes)
        return Dense((cfg.emb_dim,), ("mlp",), ("embed",), cfg, name="wo")(h_BxLxF)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then + Mlp(RMSNorm(x)); returns (x, None) for scan."""

    config: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL):
        cfg = self.config
        dropout = nn.Dropout(rate=cfg.dropout_rate, deterministic=self.deterministic)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, BLOCK_AXES)
        h_BxLxD = RMSNorm(cfg, name="pre_attention_norm")(x_BxLxD)
        h_BxLxD = Attention(cfg, name="attention")(h_BxLxD, segment_ids_BxL, positions_BxL)
        x_BxLxD = x_BxLxD + dropout(h_BxLxD)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, BLOCK_AXES)
        h_BxLxD = Mlp(cfg, name="mlp")(RMSNorm(cfg, name="pre_mlp_norm")(x_BxLxD))
        x_BxLxD = x_BxLxD + dropout(h_BxLxD)
        return nn.with_logical_constraint(x_BxLxD, BLOCK_AXES), None


class Transformer(nn.Module):
    """Token ids (and segment ids) -> float32 logits over the padded vocabulary."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, inputs_BxL, segment_ids_BxL, *, deterministic: bool = True, positions_BxL=None
    ):
        cfg = self.config
        if positions_BxL is None:
            # Windows hold one segment starting at position 0 (docs/CONTRACTS.md), so positions are
            # simply the indices; padding positions are never seen by real tokens anyway.
            positions_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[1]), inputs_BxL.shape)
        table_VxD = self.param(
            "token_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (cfg.padded_vocab_size, cfg.emb_dim),
            jnp.dtype(cfg.param_dtype),
        )
        dtype = jnp.dtype(cfg.dtype)
        if vocab_is_sharded():
            # A one-hot matmul instead of a gather: with the vocabulary sharded XLA partitions
            # a matmul cleanly but fully rematerialises a gather (2*V*D FLOPs per token).
            one_hot_BxLxV = jax.nn.one_hot(inputs_BxL, cfg.padded_vocab_size, dtype=dtype)
            x_BxLxD = jnp.einsum("blv,vd->bld", one_hot_BxLxV, table_VxD.astype(dtype))
        else:
            # A gather when nothing is partitioned over the vocabulary: on CPU the one-hot
            # matmul and its gradient made a 2x128 model's step 3.5% slower.
            x_BxLxD = jnp.take(table_VxD, inputs_BxL, axis=0).astype(dtype)
        if cfg.field_slot_embedding:
            slots_VxD = self.param(
                "field_slot_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), (None, "embed")),
                (NUM_FIELD_SLOTS, cfg.emb_dim),
                jnp.dtype(cfg.param_dtype),
            )
            x_BxLxD += jnp.take(slots_VxD, field_slots(inputs_BxL), axis=0).astype(dtype)
        if cfg.address_prefix_buckets:
            # Zero init: an address whose prefixes were never trained on adds nothing.
            prefixes_PxD = self.param(
                "address_prefix_embedding",
                nn.with_logical_partitioning(nn.initializers.zeros, ("prefix_buckets", "embed")),
                (cfg.address_prefix_buckets, cfg.emb_dim),
                jnp.dtype(cfg.param_dtype),
            )
            bucket_BxLx4, valid_BxLx4 = address_prefix_buckets(
                inputs_BxL, cfg.address_prefix_buckets
            )
            rows_BxLx4xD = jnp.take(prefixes_PxD, bucket_BxLx4, axis=0)
            x_BxLxD += jnp.einsum(
                "blpd,blp->bld", rows_BxLx4xD, valid_BxLx4.astype(rows_BxLx4xD.dtype)
            ).astype(dtype)
        x_BxLxD = nn.Dropout(rate=cfg.dropout_rate, deterministic=deterministic)(x_BxLxD)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, BLOCK_AXES)

        block = DecoderBlock
        policy = REMAT_POLICIES[cfg.remat_policy]
        if policy is not None:
            block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                unroll=min(cfg.scan_unroll, cfg.num_layers),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxLxD, _ = stack(cfg, deterministic, name="layers")(
                x_BxLxD, segment_ids_BxL, positions_BxL
            )
        else:
            for i in range(cfg.num_layers):
                x_BxLxD, _ = block(cfg, deterministic, name=f"layers_{i}")(
                    x_BxLxD, segment_ids_BxL, positions_BxL
                )

        x_BxLxD = RMSNorm(cfg, name="final_norm")(x_BxLxD)
        if cfg.logits_via_embedding:
            # Tied table: the N(0, 1) embedding init would give logits of scale sqrt(D).
            logits_BxLxV = jnp.einsum(
                "bld,vd->blv",
                x_BxLxD,
                table_VxD.astype(dtype),
                preferred_element_type=jnp.float32,
            )
            logits_BxLxV = logits_BxLxV / np.sqrt(cfg.emb_dim)
        else:
            # float32 out: the loss needs logits finer than bfloat16's 3 significant digits.
            logits_BxLxV = Dense(
                (cfg.padded_vocab_size,),
                ("embed",),
                ("vocab",),
                cfg,
                output_dtype="float32",
                name="logits",
            )(x_BxLxD)
        valid_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        logits_BxLxV = jnp.where(valid_V, logits_BxLxV, NEG_INF)
        return nn.with_logical_constraint(
            logits_BxLxV, ("activation_batch", "activation_length", "activation_vocab")
        )


def dummy_inputs(config: ModelConfig, batch_size: int = 1):
    """(inputs, segment_ids) of the right shape and dtype, for init and eval_shape."""
    shape = (batch_size, config.max_target_length)
    return jnp.zeros(shape, jnp.int32), jnp.ones(shape, jnp.int32)


def param_count(config: ModelConfig) -> int:
    """Number of parameters (padded vocabulary included), from shapes only."""
    model = Transformer(config)
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, *dummy_inputs(config))["params"]
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes)))


def matmul_param_count(config: ModelConfig) -> int:
    """Parameters used in matmuls: all but the input embedding lookups (gathers).

    A tied table is counted once, since it is the output projection's matmul.
    """
    lookup = 0 if config.logits_via_embedding else config.padded_vocab_size * config.emb_dim
    if config.field_slot_embedding:
        lookup += NUM_FIELD_SLOTS * config.emb_dim
    lookup += config.address_prefix_buckets * config.emb_dim
    return param_count(config) - lookup


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token: 6 * N + 12 * L * (heads * head_dim) * seq (PaLM, appendix B).

    N = `matmul_param_count` (the non-embedding parameters, with the output projection over the
    padded vocabulary, which the hardware does compute); 6 = forward (2) + backward (4) FLOPs per
    parameter per token. The attention term counts QK^T and AV over the full sequence, as is
    standard for MFU, even though a causal kernel may skip half of it.
    """
    attention = (
        12 * config.num_layers * config.num_heads * config.head_dim * config.max_target_length
    )
    return float(6 * matmul_param_count(config) + attention)
