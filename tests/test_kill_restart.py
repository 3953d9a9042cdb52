"""kill -9 a 2-process job at chosen moments and restart it: no committed step is ever lost.

The short version of tools/kill_restart_loop.py (which runs >= 50 random kills): one kill of
each kind - while an async save is in flight, while training, one process only (the launcher
stops the other), during start-up - then a run to the end, bit-equal to an uninterrupted one.
"""

import importlib.util
import sys

import pytest
import resume_helpers as rh

STEPS = 40
BASE = [f"STEPS = {STEPS}", "MAX_NUM_CHECKPOINTS_TO_KEEP = None",
        "StopConfig.check_every_steps = 2", *rh.PACKED_EMA]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "kill_restart_loop", rh.REPO / "tools" / "kill_restart_loop.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_a_committed_step(tmp_path_factory):
    s = rh.shared(tmp_path_factory)
    tool = _tool()
    # The uninterrupted reference (test_resume's 2-process reference when it ran first).
    ref = s.run_dir("ref2") / "checkpoints" / str(STEPS)
    if not ref.is_dir():
        rh.run(s, "ref2", [*BASE, "CHECKPOINT_PERIOD = 10"], processes=2, devices=2)
    lines = []
    report = tool.run_loop(
        kills=4, bindings=lambda name: s.bindings(name, [*BASE, "CHECKPOINT_PERIOD = 3"]),
        run_dir=s.run_dir, gin_file="gin/quickstart.gin", reference=ref,
        work=s.root / "chaos", modes=("saving", "training", "one_process", "startup"),
        say=lines.append)
    print("\n".join(lines))
    # Each finished episode was compared bit for bit with the uninterrupted run (the loop
    # asserts it); with warm compilation caches a run can finish before the last kill, and the
    # loop then starts a second episode for it.
    assert report.kills == 4 and report.episodes_finished >= 1, lines
    assert report.by_mode == {"startup": 1, "training": 1, "saving": 1, "one_process": 1}
    assert report.during_save >= 1, lines  # the 'saving' kill found a save in flight
    # Every restart after a kill that came after the first save restored the newest listed
    # step with its exact parameters and reported the steps it lost.
    assert report.restores_checked >= 3, lines
    assert any(lost > 0 for lost in report.steps_lost), lines
    assert report.steps_verified >= STEPS // 3
