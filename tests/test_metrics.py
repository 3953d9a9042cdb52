"""metrics.Writer: TensorBoard events from process 0, the same as CLU's SummaryWriter writes, and
no TensorFlow in any process."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_lead_writes_event_files_that_tensorboard_reads(tmp_path):
    _python(f"""
        import sys
        from pingllm import metrics
        w = metrics.Writer({str(tmp_path)!r})
        w.scalars(3, {{"loss": 1.5, "skipped": float("nan")}})
        w.texts(3, {{"note": "hello"}})
        w.close()
        assert "tensorflow" not in sys.modules, "the writer imported TensorFlow"
    """)
    import resume_helpers as rh

    assert rh.scalars(tmp_path) == {"loss": {3: 1.5}}  # NaN values are not written


def _read_events(logdir) -> dict:
    """{tag: [(step, plugin, value)]} as TensorBoard reads them; images as decoded pixels."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(str(logdir),
                                             size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        rows = []
        for e in acc.Tensors(tag):
            value = tensor_util.make_ndarray(e.tensor_proto)
            if plugin == "images":
                value = (list(value[:2]), [np.asarray(Image.open(io.BytesIO(b))).tolist()
                                           for b in value[2:]])
            else:
                value = (str(value.dtype), value.tolist())
            rows.append((e.step, plugin, value))
        out[tag] = rows
    return out


def test_event_files_read_back_as_clus_summary_writer_s(tmp_path):
    """Scalars, texts and images through EventFileWriter and through CLU's (TensorFlow)
    SummaryWriter read back identically in TensorBoard: tags, steps, plugins, dtypes, values,
    pixels."""
    rng = np.random.default_rng(0)
    images = {"eval/rgb": rng.integers(0, 256, (1, 5, 7, 3), dtype=np.uint8),
              "eval/two": rng.integers(0, 256, (2, 4, 3, 4), dtype=np.uint8),
              "eval/one": rng.integers(0, 256, (6, 2, 3), dtype=np.uint8)}
    np.savez(tmp_path / "images.npz", **{k.replace("/", "_"): v for k, v in images.items()})

    def write(maker: str, logdir) -> None:
        _python(f"""
            import numpy as np
            {maker}
            loaded = np.load({str(tmp_path / "images.npz")!r})
            images = {{k.replace("eval_", "eval/"): loaded[k] for k in loaded.files}}
            w = make({str(logdir)!r})
            w.write_scalars(1, {{"loss": 2.5, "lr": 3e-3}})
            w.write_scalars(2, {{"loss": 1.25}})
            w.write_texts(1, {{"config/operative": "A = 1\\nB = 'x'"}})
            w.write_images(5, images)
            w.close()
        """)

    ours, clus = tmp_path / "ours", tmp_path / "clu"
    write("from pingllm.event_files import EventFileWriter as make", ours)
    write("from clu.metric_writers import SummaryWriter as make", clus)
    got, expected = _read_events(ours), _read_events(clus)
    assert set(got) == {"loss", "lr", "config/operative", "eval/rgb", "eval/two", "eval/one"}
    assert got == expected
    assert got["loss"] == [(1, "scalars", ("float32", 2.5)), (2, "scalars", ("float32", 1.25))]
    assert got["eval/one"][0][2][1] == [images["eval/one"].tolist()]


def test_other_processes_log_scalars_and_write_no_events(tmp_path):
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
