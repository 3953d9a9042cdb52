"""Gin at the edge: every shipped file parses, and every bad config names its source."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pingllm import config as config_lib

REPO = Path(__file__).resolve().parents[1]
GIN_FILES = sorted(p.relative_to(REPO) for p in (REPO / "gin").rglob("*.gin"))
# Fragments meant to be included by an experiment, not run alone.
EXPERIMENTS = [p for p in GIN_FILES if p.parent == Path("gin")]


def test_gin_files_exist():
    names = {str(p) for p in GIN_FILES}
    assert {"gin/latency_network.gin", "gin/quickstart.gin"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=str)
def test_every_experiment_parses(path):
    cfg = config_lib.load([str(REPO / path)])
    assert cfg.model.max_target_length == cfg.data.max_target_length


@pytest.mark.parametrize("path", [p for p in GIN_FILES if p not in EXPERIMENTS], ids=str)
def test_every_fragment_parses_inside_an_experiment(path):
    # Fragments are parsed on top of the full experiment so their macros resolve.
    if path.name == "ripe_atlas.gin":
        bindings = ['MANUAL_DIR = "/tmp/manual"']
    else:
        bindings = []
    config_lib.load([str(REPO / "gin/latency_network.gin"), str(REPO / path)], bindings)


def test_latency_network_is_the_original_research_config():
    cfg = config_lib.load([str(REPO / "gin/latency_network.gin")])
    m, o = cfg.model, cfg.optimizer
    assert (m.vocab_size, m.num_layers, m.emb_dim, m.num_heads, m.head_dim, m.mlp_dim) == (
        267, 20, 640, 10, 64, 2048,
    )
    assert (m.max_target_length, m.dropout_rate, m.dtype) == (1024, 0.1, "bfloat16")
    assert (o.peak_learning_rate, o.b1, o.b2, o.eps, o.weight_decay) == (
        3e-4, 0.9, 0.999, 1e-8, 0.01)
    assert (o.warmup_steps, o.decay_end_step) == (2000, 200_000)
    assert cfg.data.global_batch_size == 32
    assert cfg.checkpoint.checkpoint_period == 1000
    assert cfg.run.steps == 200_000


def test_each_default_has_one_value():
    """The dataclass defaults are the research config: gin files restate them, never disagree."""
    cfg = config_lib.load([str(REPO / "gin/latency_network.gin")])
    disagree = []
    for part in dataclasses.fields(cfg):
        obj = getattr(cfg, part.name)
        for f in dataclasses.fields(obj):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                continue
            if getattr(obj, f.name) != default:
                disagree.append(f"{type(obj).__name__}.{f.name}: dataclass {default!r}, "
                                f"gin {getattr(obj, f.name)!r}")
    assert not disagree, disagree


def test_quickstart_model_file_is_the_quickstart_shape():
    cfg = config_lib.load([str(REPO / "gin/quickstart.gin")])
    alone = config_lib.load([str(REPO / "gin/latency_network.gin"),
                             str(REPO / "gin/models/quickstart.gin")])
    assert cfg.model == alone.model
    assert (cfg.model.num_layers, cfg.model.emb_dim, cfg.model.max_target_length) == (2, 128, 256)


def test_macros_are_overridable_with_bindings():
    cfg = config_lib.load(
        [str(REPO / "gin/quickstart.gin")],
        ["STEPS = 7", "GLOBAL_BATCH_SIZE = 4", 'RUN_NAME = "x"', "LEARNING_RATE = 0.5",
         "CHECKPOINT_PERIOD = 3", "ICI_FSDP_PARALLELISM = 2", "SEED = 9"],
    )
    assert (cfg.run.steps, cfg.data.global_batch_size, cfg.run.run_name) == (7, 4, "x")
    assert cfg.optimizer.peak_learning_rate == 0.5
    assert cfg.checkpoint.checkpoint_period == 3
    assert cfg.mesh.fsdp_ici == 2
    assert (cfg.run.seed, cfg.data.seed) == (9, 9)


def test_misspelt_binding_names_the_binding():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load([str(REPO / "gin/quickstart.gin")], ["ModelConfig.num_layerz = 3"])
    assert "--gin_bindings='ModelConfig.num_layerz = 3'" in str(e.value)
    assert "num_layerz" in str(e.value)


def test_unknown_configurable_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include '{REPO}/gin/quickstart.gin'\n\nModelConfg.num_layers = 3\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load([str(bad)])
    assert str(bad) in str(e.value) and "line 3" in str(e.value)
    assert "ModelConfg" in str(e.value)


def test_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "syntax.gin"
    bad.write_text("STEPS = 3\nRUN_NAME = 'a' 'b' 'c' ]\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load([str(bad)])
    assert str(bad) in str(e.value) and "line 2" in str(e.value)


def test_unclosed_bracket_names_the_file(tmp_path):
    bad = tmp_path / "open.gin"
    bad.write_text("STEPS = 3\nRunConfig.steps = (\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load([str(bad)])
    assert str(bad) in str(e.value) and "syntax error" in str(e.value)


def test_missing_required_value_is_named(tmp_path):
    exp = tmp_path / "manual.gin"
    exp.write_text(f"include '{REPO}/gin/quickstart.gin'\n"
                   f"include '{REPO}/gin/data/ripe_atlas.gin'\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load([str(exp)])
    assert "DataConfig.manual_dir" in str(e.value) and "required" in str(e.value)


def test_undefined_macro_is_named():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load([str(REPO / "gin/quickstart.gin")], ["RunConfig.steps = %NO_SUCH_MACRO"])
    assert "%NO_SUCH_MACRO" in str(e.value) and "RunConfig.steps" in str(e.value)


def test_missing_file_is_named():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(["gin/does_not_exist.gin"])
    assert "does_not_exist.gin" in str(e.value)


def test_window_lengths_must_agree():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load([str(REPO / "gin/quickstart.gin")], ["DataConfig.max_target_length = 64"])
    assert "max_target_length" in str(e.value)


def test_cli_config_error_exits_2_before_device_work(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pingllm.main", "--gin_file=gin/quickstart.gin",
         "--gin_bindings=ModelConfig.num_layerz = 3",
         f"--gin_bindings=BASE_OUTPUT_DIRECTORY = '{out}'"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error" in proc.stderr and "num_layerz" in proc.stderr
    assert not out.exists()  # nothing was written: it failed before the run started
