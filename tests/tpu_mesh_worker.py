"""Meshes on TPU topology devices (libtpu's descriptions, no TPU attached); prints JSON facts.

Run by tests/test_partitioning.py in its own process with planner.tpu_planning_env, so the test
process's JAX (fake CPU devices) never loads libtpu.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pingllm import partitioning, planner  # noqa: E402


def describe(mesh) -> dict:
    devices = mesh.devices
    return {
        "shape": dict(mesh.shape),
        "kinds": sorted({d.device_kind for d in devices.flat}),
        "platforms": sorted({d.platform for d in devices.flat}),
        "num_devices": int(devices.size),
        # slice of every device, per position along 'data' (the DCN axis when there is one)
        "slices_by_data_row": [sorted({getattr(d, "slice_index", 0) for d in devices[i].flat})
                               for i in range(devices.shape[0])],
        "processes_by_data_row": [sorted({d.process_index for d in devices[i].flat})
                                  for i in range(devices.shape[0])],
        "ids": sorted(d.id for d in devices.flat),
    }


def main() -> None:
    out = {}
    two = planner.topology_devices(planner.parse_topology("v5e:2x2", num_slices=2))
    out["topology_v5e_2x2_x2"] = {"ids": sorted(d.id for d in two),
                                  "slices": sorted({d.slice_index for d in two})}
    out["dcn"] = describe(partitioning.make_mesh(partitioning.MeshConfig(data_dcn=2), two))
    v4 = planner.topology_devices(planner.parse_topology("v4-32"))
    with partitioning.target_devices(v4):  # how the planner hands trainer.build the topology
        out["v4_32"] = describe(partitioning.make_mesh(partitioning.MeshConfig(data_ici=2)))
    v5e = planner.topology_devices(planner.parse_topology("v5e-16"))
    out["v5e_16"] = describe(partitioning.make_mesh(partitioning.MeshConfig(), v5e))
    try:
        partitioning.make_mesh(partitioning.MeshConfig(data_dcn=2), v5e)
        out["dcn_on_one_slice"] = "no error"
    except ValueError as e:
        out["dcn_on_one_slice"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
