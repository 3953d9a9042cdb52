"""The device mesh, logical-axis rules as plain data, and the shardings derived from them."""

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis | tuple of mesh axes | None). FSDP shards weights' embed dimension
# and the batch; tensor parallelism shards heads, the MLP and the vocabulary (Megatron style:
# the residual stream between blocks is replicated over 'tensor').
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    # The hashed address-prefix table's rows: replicated (looked up by a gather, like the
    # field-slot table's unnamed rows); its embed dimension is FSDP-sharded as "embed".
    ("prefix_buckets", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes per axis within a slice (ICI) and across slices (DCN); -1 = the rest."""

    data_ici: int = 1
    fsdp_ici: int = -1
    tensor_ici: int = 1
    data_dcn: int = 1
    fsdp_dcn: int = 1
    tensor_dcn: int = 1
    logical_axis_rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES

    @property
    def ici_shape(self) -> tuple[int, ...]:
        return (self.data_ici, self.fsdp_ici, self.tensor_ici)

    @property
    def dcn_shape(self) -> tuple[int, ...]:
        return (self.data_dcn, self.fsdp_dcn, self.tensor_dcn)

    def __post_init__(self):
        if self.ici_shape.count(-1) > 1:
            raise ValueError(f"MeshConfig: at most one ICI size may be -1, got {self.ici_shape}")
        if any(s < 1 and s != -1 for s in self.ici_shape) or any(s < 1 for s in self.dcn_shape):
            raise ValueError(
                f"MeshConfig: sizes must be >= 1 (or -1 for one ICI axis), got ici "
                f"{self.ici_shape} dcn {self.dcn_shape}"
            )


def resolve_ici_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """ICI sizes with -1 filled, checked so that ICI x DCN uses exactly `num_devices`."""
    dcn = math.prod(cfg.dcn_shape)
    if num_devices % dcn:
        raise ValueError(
            f"DCN mesh {dict(zip(MESH_AXES, cfg.dcn_shape))} (product {dcn}) does not divide "
            f"the {num_devices} devices"
        )
    per_slice = num_devices // dcn
    known = math.prod(s for s in cfg.ici_shape if s != -1)
    if -1 in cfg.ici_shape:
        if per_slice % known:
            raise ValueError(
                f"ICI mesh {dict(zip(MESH_AXES, cfg.ici_shape))}: fixed sizes (product {known}) "
                f"do not divide the {per_slice} devices per slice "
                f"({num_devices} devices / DCN {dcn})"
            )
        return tuple(per_slice // known if s == -1 else s for s in cfg.ici_shape)
    if known != per_slice:
        raise ValueError(
            f"ICI mesh {dict(zip(MESH_AXES, cfg.ici_shape))} x DCN "
            f"{dict(zip(MESH_AXES, cfg.dcn_shape))} needs {known * dcn} devices, but there are "
            f"{num_devices}; set one ICI size to -1 to fill the rest"
        )
    return cfg.ici_shape


_TARGET_DEVICES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "pingllm_target_devices", default=None)


@contextlib.contextmanager
def target_devices(devices: Sequence) -> Iterator[None]:
    """Meshes made inside use `devices` (e.g. a TPU topology's, for compiling ahead of time)."""
    token = _TARGET_DEVICES.set(tuple(devices))
    try:
        yield
    finally:
        _TARGET_DEVICES.reset(token)


def default_devices() -> list:
    """The devices meshes are made of: `target_devices` inside that context, else jax.devices()."""
    target = _TARGET_DEVICES.get()
    return list(jax.devices() if target is None else target)


def granules(devices: Sequence) -> tuple[str, set]:
    """('slices', slice ids) for TPU devices (a lone slice may not name itself: 0), else
    ('processes', process ids): GPU and CPU hosts are one granule per process."""
    if devices[0].platform == "tpu" or getattr(devices[0], "slice_index", None) is not None:
        return "slices", {getattr(d, "slice_index", 0) for d in devices}
    return "processes", {d.process_index for d in devices}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh; axis size = ICI size x DCN size."""
    devices = default_devices() if devices is None else list(devices)
    ici = resolve_ici_shape(cfg, len(devices))
    if math.prod(cfg.dcn_shape) > 1:
        # TPU devices name their slice; elsewhere (GPU, CPU hosts) each process is one granule.
        kind, ids = granules(devices)
        process_is_granule = kind == "processes"
        if len(ids) != math.prod(cfg.dcn_shape):
            raise ValueError(
                f"DCN mesh {dict(zip(MESH_AXES, cfg.dcn_shape))} needs "
                f"{math.prod(cfg.dcn_shape)} {kind}, but the devices span {len(ids)}"
            )
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici, cfg.dcn_shape, devices, process_is_granule=process_is_granule
        )
    else:
        device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(device_array, MESH_AXES)


def logical_to_shardings(logical_spec_tree, mesh: Mesh, rules: Rules):
    """A tree of logical PartitionSpecs -> the same tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, tuple(rules))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Data batches: leading (row) axis sharded like 'activation_batch', the rest replicated."""
    return logical_to_shardings(PartitionSpec("activation_batch"), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def make_global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules
) -> dict[str, jax.Array]:
    """Assemble global arrays from each process's rows (rows of process p follow those of p-1)."""
    sharding = batch_sharding(mesh, rules)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
