"""No local-only file API on a run path in pingllm/: a run directory may be gs://.

pathlib, os.path, open(), glob and shutil turn `gs://b/run` into `<cwd>/gs:/b/run` on local
disk. This walks the AST of every module of the package and fails on any such use that is not
listed below with the reason it never sees a run path. The checkpoint package may use none.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pingllm"
_OS_FILE_CALLS = {"makedirs", "mkdir", "replace", "rename", "remove", "unlink", "listdir",
                  "scandir", "walk", "fsync", "rmdir", "stat", "open"}

# (module, construct) -> (allowed count, why it never sees a run path)
ALLOWED = {
    ("config.py", "os.path"): (6, "run_dir is a posix string join (correct for gs://); the "
                                  "others locate gin files and the log filter"),
    ("metrics.py", "os.path"): (6, "the TensorBoard logdir: the trainer passes a local mirror "
                                   "when the run directory is on a bucket (_check_creatable "
                                   "returns at once for a URL)"),
    ("event_files.py", "os.path"): (1, "the TensorBoard logdir metrics.Writer passes (a local "
                                       "mirror for a gs:// run)"),
    ("event_files.py", "os.makedirs"): (1, "same local logdir"),
    ("event_files.py", "open"): (1, "the event file in that local logdir"),
    ("executable_cache.py", "os.path"): (4, "pingllm's own source files, hashed into the key"),
    ("executable_cache.py", "os.walk"): (1, "pingllm's own package directory"),
    ("executable_cache.py", "open"): (1, "pingllm's own source files"),
    ("eval/plots.py", "os.path"): (2, "PNGs: evaluate passes a local mirror for a gs:// run"),
    ("eval/plots.py", "os.makedirs"): (1, "same local mirror"),
    ("compilation_cache.py", "os.path"): (1, "JAX's cache directory (its own path handling)"),
    ("checkpoint/storage.py", "os.path"): (5, "the local mirror directory (local by "
                                              "construction)"),
    ("checkpoint/storage.py", "os.walk"): (1, "the local mirror directory"),
    ("planner.py", "open"): (2, "/proc/self files"),
    ("cli/evaluate.py", "pathlib"): (1, "--output_json, a local output file"),
    ("eval/predictor.py", "pathlib"): (1, "query/CSV files given on the command line"),
    ("cli/dump_batches.py", "pathlib"): (1, "--output, a local .npz"),
    ("cli/make_synthetic.py", "pathlib"): (1, "--output, a local dataset directory"),
    ("cli/import_ripe_atlas.py", "pathlib"): (1, "dump files and @probe lists (inputs)"),
    ("data/tfds_builder.py", "shutil"): (1, "removes its own temporary bucket directory"),
    ("data/tfds_builder.py", "pathlib"): (1, "dataset preparation (TFDS data_dir)"),
    ("data/ripe_atlas.py", "pathlib"): (1, "RIPE Atlas dump files (inputs)"),
    ("data/ripe_atlas.py", "open"): (1, "RIPE Atlas dump files (inputs)"),
    ("data/ripe_writer.py", "pathlib"): (1, "record files (inputs)"),
    ("data/ripe_writer.py", "open"): (2, "record files (inputs)"),
    ("data/pipeline.py", "os.path"): (3, "expanduser of data_dir/manual_dir (dataset inputs)"),
}


def _uses(tree: ast.AST) -> collections.Counter:
    found: collections.Counter = collections.Counter()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("pathlib", "glob", "shutil"):
                    found[alias.name.split(".")[0]] += 1
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in ("pathlib", "glob", "shutil"):
                found[node.module.split(".")[0]] += 1
            if node.module == "os" and any(a.name == "path" for a in node.names):
                found["os.path"] += 1
        elif isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Name) and fn.id == "open":
                found["open"] += 1
            elif (isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name)
                  and fn.value.id == "os" and fn.attr in _OS_FILE_CALLS):
                found[f"os.{fn.attr}"] += 1
            elif (isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Attribute)
                  and isinstance(fn.value.value, ast.Name) and fn.value.value.id == "os"
                  and fn.value.attr == "path"):
                found["os.path"] += 1
    return found


def test_no_local_file_api_on_run_paths():
    problems = []
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE).as_posix()
        for construct, n in _uses(ast.parse(file.read_text())).items():
            allowed, _ = ALLOWED.get((rel, construct), (0, ""))
            if rel.startswith("checkpoint/") and rel != "checkpoint/storage.py":
                allowed = 0
            if n > allowed:
                problems.append(f"pingllm/{rel}: {construct} used {n}x (allowed {allowed})")
    assert not problems, ("local-only file API in pingllm/ (a run path may be gs://; use "
                          "etils.epath or pingllm.checkpoint.format):\n  "
                          + "\n  ".join(problems))


def test_the_checker_sees_each_construct():
    src = ("import pathlib\nimport shutil\nfrom glob import glob\nimport os\n"
           "open('x')\nos.path.join('a', 'b')\nos.replace('a', 'b')\n")
    assert set(_uses(ast.parse(src))) == {"pathlib", "shutil", "glob", "open", "os.path",
                                          "os.replace"}
