"""Mesh shapes from config, logical->mesh rules, batch sharding and global batch assembly."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pingllm import partitioning
from pingllm.partitioning import DEFAULT_RULES, MeshConfig


@pytest.mark.parametrize(
    "cfg,shape",
    [
        (MeshConfig(data_ici=2, fsdp_ici=2, tensor_ici=2), (2, 2, 2)),
        (MeshConfig(), (1, 8, 1)),  # fsdp=-1 fills every device
        (MeshConfig(data_ici=2, fsdp_ici=-1), (2, 4, 1)),
        (MeshConfig(data_ici=-1, fsdp_ici=1, tensor_ici=4), (2, 1, 4)),
        (MeshConfig(data_ici=1, fsdp_ici=1, tensor_ici=-1), (1, 1, 8)),
    ],
)
def test_mesh_shape_from_config(cfg, shape):
    assert jax.device_count() == 8
    mesh = partitioning.make_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_mesh_on_a_subset_of_devices():
    mesh = partitioning.make_mesh(MeshConfig(data_ici=2), jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
    assert mesh.devices.size == 4


def test_wrong_mesh_product_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs 3 devices, but there are 8"):
        partitioning.make_mesh(MeshConfig(data_ici=3, fsdp_ici=1))
    with pytest.raises(ValueError, match=r"fixed sizes \(product 3\) do not divide the 8 devices"):
        partitioning.make_mesh(MeshConfig(data_ici=3, fsdp_ici=-1))
    with pytest.raises(ValueError, match="at most one ICI size may be -1"):
        MeshConfig(data_ici=-1, fsdp_ici=-1)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        MeshConfig(tensor_dcn=0)
    with pytest.raises(ValueError, match=r"product 3\) does not divide the 8 devices"):
        partitioning.make_mesh(MeshConfig(data_dcn=3))
    # Two DCN granules (slices/processes) asked for, one process here.
    with pytest.raises(ValueError, match="needs 2 processes, but the devices span 1"):
        partitioning.make_mesh(MeshConfig(data_dcn=2))


def test_resolve_ici_shape_with_dcn():
    assert partitioning.resolve_ici_shape(MeshConfig(data_dcn=2), 16) == (1, 8, 1)
    assert partitioning.resolve_ici_shape(MeshConfig(fsdp_dcn=4, tensor_ici=2), 16) == (1, 2, 2)


def test_default_rules_map_logical_to_mesh_axes():
    mesh = partitioning.make_mesh(MeshConfig(data_ici=2, fsdp_ici=2, tensor_ici=2))
    specs = {
        "batch": P("activation_batch", "activation_length", "activation_embed"),
        "qkv": P("layers", "embed", "heads", "kv"),
        "mlp_in": P("embed", "mlp"),
        "table": P("vocab", "embed"),
        "norm": P("layers", "norm"),
        "scalar": P(),
    }
    shardings = partitioning.logical_to_shardings(specs, mesh, DEFAULT_RULES)
    assert shardings["batch"].spec == P(("data", "fsdp"), None, None)
    assert shardings["qkv"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["mlp_in"].spec == P("fsdp", "tensor")
    assert shardings["table"].spec == P("tensor", "fsdp")
    assert shardings["norm"].spec == P(None, None)
    assert shardings["scalar"].spec == P()
    assert all(s.mesh == mesh for s in shardings.values())
    assert partitioning.batch_sharding(mesh, DEFAULT_RULES).spec == P(("data", "fsdp"))
    assert partitioning.replicated(mesh).spec == P()


def test_rules_are_plain_data():
    # Gin binds tuples of (str, str | tuple | None): nothing else may appear.
    for logical, mesh_axes in MeshConfig().logical_axis_rules:
        assert isinstance(logical, str)
        assert mesh_axes is None or isinstance(mesh_axes, (str, tuple))
        for axis in (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ():
            assert axis in partitioning.MESH_AXES


def test_make_global_batch():
    mesh = partitioning.make_mesh(MeshConfig(data_ici=2, fsdp_ici=2, tensor_ici=2))
    rng = np.random.default_rng(0)
    local = {
        "inputs": rng.integers(0, 267, (8, 16)).astype(np.int32),
        "weights": rng.random((8, 16)).astype(np.float32),
    }
    batch = partitioning.make_global_batch(local, mesh, DEFAULT_RULES)
    expected_sharding = partitioning.batch_sharding(mesh, DEFAULT_RULES)
    for key, value in local.items():
        array = batch[key]
        assert array.shape == value.shape and array.dtype == value.dtype
        assert array.sharding == expected_sharding
        np.testing.assert_array_equal(np.asarray(array), value)
        # 4-way over rows (data x fsdp), replicated over 'tensor'.
        assert {s.data.shape for s in array.addressable_shards} == {(2, 16)}
        assert len(array.addressable_shards) == 8
