"""Mesh shapes from config, logical->mesh rules, batch sharding and global batch assembly; meshes
on TPU topology devices (libtpu's descriptions)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pingllm import partitioning
from pingllm.partitioning import DEFAULT_RULES, MeshConfig

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[plan]')")
def test_meshes_on_tpu_topology_devices():
    """make_mesh on the devices libtpu describes for real slices (own process: no TPU runtime)."""
    from pingllm import planner

    env = planner.tpu_planning_env(planner.parse_topology("v5e:2x2"), os.environ)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "tpu_mesh_worker.py")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    # Two v5e 2x2 slices over DCN: 'data' is the DCN axis, one slice (and host) per data row.
    dcn = out["dcn"]
    assert dcn["shape"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dcn["kinds"] == ["TPU v5 lite"] and dcn["platforms"] == ["tpu"]
    assert out["topology_v5e_2x2_x2"]["slices"] == [0, 1]
    assert dcn["slices_by_data_row"] == [[0], [1]]
    assert dcn["ids"] == out["topology_v5e_2x2_x2"]["ids"]  # every device once
    # v4-32: 16 chips (megacore) on 4 hosts, made inside partitioning.target_devices.
    v4 = out["v4_32"]
    assert v4["shape"] == {"data": 2, "fsdp": 8, "tensor": 1} and v4["kinds"] == ["TPU v4"]
    assert v4["ids"] == list(range(16))
    assert sorted({p for row in v4["processes_by_data_row"] for p in row}) == [0, 1, 2, 3]
    v5e = out["v5e_16"]
    assert v5e["shape"] == {"data": 1, "fsdp": 16, "tensor": 1} and v5e["num_devices"] == 16
    assert v5e["processes_by_data_row"] == [[0, 1, 2, 3]]
    # A DCN axis on a single slice is refused in terms of slices, not processes.
    assert out["dcn_on_one_slice"] == ("DCN mesh {'data': 2, 'fsdp': 1, 'tensor': 1} needs 2 "
                                       "slices, but the devices span 1")
