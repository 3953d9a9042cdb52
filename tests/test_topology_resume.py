"""A run saved by 2 processes x 2 devices continues on 1 x 8, 1 x 1 and 2 x 2 again.

After every restart: the parameters the trainer restored are exactly the saved ones (the
fingerprint it logs vs the checkpoint read with plain Orbax), and the first global batch it
trains on is the uninterrupted run's batch of that step (`pipeline.global_batch`), row for row
on every process.
"""

import math

import pytest
import resume_helpers as rh

from pingllm.data import pipeline

# (processes, devices per process, STEPS): each leg runs 8 more steps from the last one's save.
# Other host counts (2 -> 1 -> 2) and device counts (4 -> 8 -> 1 -> 4), each mesh from
# ICI_FSDP_PARALLELISM = -1; 1 x 4 is in test_checkpointing's in-process topology test.
LEGS = [(2, 2, 8), (1, 8, 16), (1, 1, 24), (2, 2, 32)]
BASE = ["ICI_FSDP_PARALLELISM = -1", "CHECKPOINT_PERIOD = 100", "StopConfig.check_every_steps = 4"]


@pytest.mark.slow
def test_save_on_2x2_continue_on_1x8_1x1_and_2x2(tmp_path_factory):
    s = rh.shared(tmp_path_factory)
    data = s.data_config()
    run_dir = s.run_dir("topo")
    previous = 0
    for processes, devices, steps in LEGS:
        launch = rh.run(s, "topo", [*BASE, f"STEPS = {steps}"], processes=processes,
                        devices=devices, tag=f"_{processes}x{devices}")
        log = launch.log()
        if previous:
            step, tier, got = rh.restored(log)
            saved = rh.read_state(run_dir / "checkpoints" / str(previous))
            assert (step, tier) == (previous, "persistent")
            assert got == rh.fingerprint(saved["params"]), f"{processes}x{devices}: params"
        else:
            assert "no checkpoint: initialising" in log
        expected = pipeline.global_batch(data, previous)
        for p in range(processes):
            step, proc, count, lo, hi, digest = rh.first_batch(launch.log(p))
            assert (step, proc, count) == (previous, p, processes)
            assert (lo, hi) == (p * 8 // processes, (p + 1) * 8 // processes)
            rows = {k: v[lo:hi] for k, v in expected.items()}
            assert digest == rh.batch_digest(rows), f"{processes}x{devices} process {p}"
        assert rh.checkpoint_steps(run_dir)[-1] == steps
        previous = steps

    losses = rh.scalars(run_dir)["loss"]
    assert sorted(losses) == list(range(1, LEGS[-1][2] + 1))
    assert all(math.isfinite(v) for v in losses.values())
