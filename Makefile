# Two entry points on a fresh machine:
#   make quickstart   set up .venv, then train and evaluate DMDD on the built-in dataset (fast preset)
#   make test         set up .venv, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision are pinned together in one pip command so no other package pulls another build.
ifeq ($(filter aarch64 arm64,$(shell uname -m)),)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
else
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
endif

.PHONY: setup quickstart test lint wheel figures docs docs-test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet $(TORCH_PINS) -e ".[dev]"
	touch $@

quickstart: setup
	$(VENV)/bin/dmdd quickstart --preset fast --data builtin --out runs/quickstart

test: setup
	HF_HUB_OFFLINE=1 DMDD_FAST=1 $(VENV)/bin/python -m pytest -q tests notebooks --nbval-lax --nbval-current-env --durations=15

# A wheel of the package (dist/dmdd_core-<version>-py3-none-any.whl): what an instructor hands out when the
# repository cannot be reached (a notebook's install cell takes it through DMDD_INSTALL). It names torch as
# torch>=2.3 and pins nothing: an environment's own torch (Colab's) is kept.
wheel: setup
	$(VENV)/bin/python -m pip wheel --quiet --no-deps --no-build-isolation -w dist .

# Redraw the figures the README and the notebooks show (tools/figures.py --list says what makes each): the quick
# ones, drawn from committed results; ALL=1 also retrains what shows a trained model's maps (hours on a CPU).
figures: setup
	$(VENV)/bin/python tools/figures.py $(if $(ALL),--all,)

# The tutorial as a static site in build/site/ (tools/site.py): the README, docs/METHOD.md, the notebooks and their
# solutions executed in fast mode and rendered by MkDocs + mkdocs-jupyter. About 10 minutes on two CPU cores the
# first time; later builds execute only the notebooks that changed.
docs: setup
	$(VENV)/bin/python -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python tools/site.py

# Builds the site and opens every notebook page in headless Chromium (Debian's, installed here when missing):
# figures shown, no error output, links load; screenshots in docs/site_screenshots/. Kept out of `make test`
# for CI time.
docs-test: docs
	command -v chromium >/dev/null || (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium))
	DMDD_SITE_TEST=1 NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m pytest -q tests/test_site.py

lint: setup
	$(VENV)/bin/python -m pip install --quiet ruff mypy
	$(VENV)/bin/ruff check dmdd_core tests benchmarks tools
	$(VENV)/bin/mypy dmdd_core

clean:
	rm -rf $(VENV) runs .pytest_cache dist build
