"""metrics.Writer: TensorBoard events from process 0; other processes log without TensorFlow."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_lead_writes_event_files_that_tensorboard_reads(tmp_path):
    _python(f"""
        from pingllm import metrics
        w = metrics.Writer({str(tmp_path)!r})
        w.scalars(3, {{"loss": 1.5, "skipped": float("nan")}})
        w.texts(3, {{"note": "hello"}})
        w.close()
    """)
    import resume_helpers as rh

    assert rh.scalars(tmp_path) == {"loss": {3: 1.5}}  # NaN values are not written


def test_other_processes_log_scalars_and_never_import_tensorflow(tmp_path):
    proc = _python(f"""
        import sys
        import jax
        from absl import logging
        logging.set_verbosity(logging.INFO)
        jax.process_index = lambda: 1  # what process 1 of a job sees
        from pingllm import metrics
        w = metrics.Writer({str(tmp_path)!r})
        w.scalars(7, {{"loss": 2.25, "grad_norm": 0.5}})
        w.texts(7, {{"note": "x"}})
        w.images(7, {{}})
        w.flush()
        w.close()
        assert "tensorflow" not in sys.modules, "process 1 imported TensorFlow"
    """)
    assert "[7] grad_norm=0.5, loss=2.25" in proc.stderr
    assert not (tmp_path / "tensorboard").exists()


def test_writer_creation_error_surfaces_at_the_first_write(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from pingllm import metrics
        w = metrics.Writer({str(blocker)!r})
        print("constructed", flush=True)
        w.scalars(1, {{"loss": 1.0}})
    """)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stdout == "constructed\n"
    assert f"{blocker} is not a directory" in proc.stderr, proc.stderr[-2000:]
