"""The repository stands alone: a fresh clone has everything its code, tests and docs cite."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("pingllm", "tests", "tools", "benchmarks", "launch", "gin")
# Design notes that live outside the repository: citing them leaves the reader without them.
OUTSIDE = re.compile(r"\.\./shared|parent\s*/\s*[\"']shared[\"']|(?<![\w/])"
                     r"(TOKENIZATION|DATA|LIBRARY_FACTS|ARCHITECTURE|STYLE)\.md")
DOC_REF = re.compile(r"(?<![\w./])(docs/[\w./-]+\.md)")


def _tracked(*dirs: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--", *dirs], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return [REPO / p for p in out if (REPO / p).suffix in {".py", ".gin", ".sh", ".md", ".toml"}]


def test_nothing_reads_or_cites_outside_the_repository():
    hits = []
    for path in _tracked(*CODE_DIRS, "docs", "pyproject.toml", "Makefile", "README.md"):
        if path == Path(__file__).resolve() or path.name.startswith("."):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) and "Normative copy of the project's design note" not in line:
                hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_every_cited_doc_exists():
    missing = []
    for path in _tracked(*CODE_DIRS, "README.md", "Makefile", "pyproject.toml"):
        for ref in DOC_REF.findall(path.read_text(errors="replace")):
            if not (REPO / ref.rstrip(".")).exists():
                missing.append(f"{path.relative_to(REPO)} cites {ref}")
    assert not missing, "\n".join(missing)
