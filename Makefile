# mrl-vision: set-up, tests, demo and benchmarks. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: install test test-fast test-slow demo bench clean

# Create the virtual environment and install the package with its test extras. torch comes from
# setup.cfg's requirement (on these machines pip takes torch 2.14.1 / torchvision 0.29.1 from disk).
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Everything: unit, CLI, slow (multi-process, notebooks) tests. What the README and CI run.
test: $(STAMP)
	$(PYTEST) -q --durations=10

# The inner loop: skips tests marked slow.
test-fast: $(STAMP)
	$(PYTEST) -q -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -q -m slow

# Train MRL on the quickstart digits (CPU, about 2 minutes), then print the per-size test table.
demo: $(STAMP)
	rm -rf runs/quickstart/demo runs/quickstart/demo-test
	$(VENV)/bin/mrl-vision fit --trainer.logger.init_args.version demo --trainer.enable_progress_bar false
	$(VENV)/bin/mrl-vision test --trainer.logger.init_args.version demo-test --trainer.enable_progress_bar false \
		--ckpt_path runs/quickstart/demo/checkpoints/last.ckpt

bench: $(STAMP)
	$(PY) benchmarks/head_overhead.py

clean:
	rm -rf runs lightning_logs .pytest_cache
