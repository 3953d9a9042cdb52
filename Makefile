# Two commands on a fresh machine with Python 3.11 and pip:
#   make quickstart   create .venv, install pingllm, train gin/quickstart.gin on the built-in synthetic
#                     Internet, then evaluate it against the baselines on held-out pairs
#   make test         create .venv, install pingllm with test extras, run the whole test suite
# Developer loop: make lint (ruff), make test-fast (the tests not marked slow).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-fast lint venv bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

QUICKSTART_RUN ?= /tmp/pingllm_quickstart/outputs/quickstart

# Train (resumes if interrupted; exits 0 at once when already complete), then print the
# held-out table of the model against the baselines (docs/evaluation.md).
quickstart: $(STAMP)
	$(PY) -m pingllm.main --gin_file=gin/quickstart.gin $(ARGS)
	$(PY) -m pingllm.cli.evaluate --checkpoint $(QUICKSTART_RUN) --max_queries 1000 \
		--output_json $(QUICKSTART_RUN)/eval/metrics.json

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pingllm tests tools benchmarks launch

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) /tmp/pingllm_quickstart
