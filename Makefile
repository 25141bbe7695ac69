# One command to set up and run the demo, one to set up and run the tests.
#   make demo        creates .venv, installs, runs the pipeline on the synthetic dataset
#   make test        lint, then every tier but image and exhaustive on $(WORKERS) cores (what CI runs)
#   make test-fast   the unit tier only: a minute or two
# Test tiers (markers, set in tests/conftest.py; pick one with pytest -m):
#   unit       no marker: pure functions on tiny data; no service, no training, no pipeline run
#   service    a real service on loopback: mlflow server, GCS emulator, gRPC/REST model server, browser
#   e2e        kfp.local pipeline runs, trainings, the CLI through a whole run
#   image      builds infra/Dockerfile and runs the steps in it (make image first); not in make test
#   exhaustive every variant (each backbone's export, the pointing-game benchmark); not in make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# The venv is rebuilt only when the lock or the project metadata changes.
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) pyproject.toml | sha256sum | cut -c1-16)

.PHONY: setup demo test test-fast lint format bench image checkov clean

# Empty is unset for Python: the commands below write bytecode (see UV_INSTALL).
export PYTHONDONTWRITEBYTECODE :=

setup: $(STAMP)

# The installer: uv (from PyPI, pinned) installs the lock's wheels several times faster than pip
# and is tried first; INSTALLER=pip, or uv failing to install or to run, falls back to plain pip.
INSTALLER ?= uv
UV_VERSION := 0.13.8
# The venv is made without pip (ensurepip alone took 5.5 s of a 2-core install): uv is installed
# into it by the system's pip (`pip --python`, pip 22.3 or later), and only where that fails, or
# for the pip installer, the venv gets its own pip.
ENSUREPIP := { $(BIN)/python -m pip --version >/dev/null 2>&1 \
	|| $(BIN)/python -m ensurepip --upgrade >/dev/null; }
PIP_INSTALL := $(ENSUREPIP) && $(BIN)/python -m pip install --quiet --upgrade pip \
	&& $(BIN)/python -m pip install --quiet -r $(LOCK) \
	&& $(BIN)/python -m pip install --quiet --no-deps -e .
UV_BOOTSTRAP := { $(PYTHON) -m pip --python $(BIN)/python install --quiet uv==$(UV_VERSION) \
	2>/dev/null || { $(ENSUREPIP) && $(BIN)/python -m pip install --quiet uv==$(UV_VERSION); }; }
# Bytecode: pip compiles every wheel's .pyc files at install (about 45 s of the 2-core install
# here), uv does not. Instead, make's own commands let Python write each module's .pyc the first
# time something imports it (its default; where the environment sets PYTHONDONTWRITEBYTECODE,
# make's commands unset it: the export above). Only what the pipeline, the server and the tests
# import is compiled, once, by the first run. Without any .pyc, every pipeline task (a fresh
# process) compiled TensorFlow's modules again (the demo's run 225 s instead of 151 s).
UV_INSTALL := $(UV_BOOTSTRAP) \
	&& $(BIN)/uv pip install --quiet --python $(BIN)/python -r $(LOCK) \
	&& $(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
$(STAMP): $(LOCK) pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3, 11), (3, 12)) else "tumorflow needs Python 3.11 or 3.12 (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv --without-pip $(VENV)
	@if [ "$(INSTALLER)" = uv ]; then \
	  echo "installing $(LOCK) with uv $(UV_VERSION) (INSTALLER=pip to use pip)"; \
	  $(UV_INSTALL) || { echo "uv could not install; installing with pip"; $(PIP_INSTALL); }; \
	else \
	  echo "installing $(LOCK) with pip"; $(PIP_INSTALL); \
	fi
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(BIN)/tumorflow run --preset phantom

# pytest-xdist workers; loadfile keeps a test module on one worker, so its module-scoped server
# or pipeline run is set up once. (loadgroup would be finer, but pytest 9.2 drops its groups
# silently: pytest-xdist issue 1386.) --no-loadscope-reorder keeps tests/conftest.py's order, the
# longest modules first; xdist's own reorder (most tests first) left the five-day loop to the end,
# one worker running it alone for its last ten minutes.
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadfile --no-loadscope-reorder

# The ten slowest tests are printed at the end: where the suite's minutes go.
test: setup lint
	$(BIN)/pytest $(XDIST) -m "not image and not exhaustive" --durations=10

test-fast: setup
	$(BIN)/pytest $(XDIST) -m "not service and not e2e and not image and not exhaustive"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/tumorflow bench input
	$(BIN)/tumorflow bench serving

# The production and -gpu images (infra/Dockerfile) with docker (a running daemon), buildah or
# podman, whichever is present; IMAGE=REGISTRY/tumorflow-python:0.1.0 names them. buildah and
# podman cache layers (--layers): a code change rebuilds the last layers only. With buildah (as
# root) the base image is pulled, or made as a local stand-in where no registry answers
# (infra/base-standin.sh); RUN steps use chroot isolation, which works where an OCI runtime does not.
IMAGE ?= localhost/tumorflow-python:0.1.0
ENGINE := $(shell (docker info >/dev/null 2>&1 && echo docker) || command -v buildah 2>/dev/null || command -v podman 2>/dev/null)
BUILDAH_ISOLATION ?= chroot
export BUILDAH_ISOLATION
BUILD := $(if $(findstring buildah,$(ENGINE)),$(ENGINE) bud --layers,$(if $(findstring podman,$(ENGINE)),$(ENGINE) build --layers,docker build)) --network host -f infra/Dockerfile

image:
	@test -n "$(ENGINE)" || { echo "make image: no docker (with a running daemon), buildah or podman on PATH"; exit 2; }
	$(if $(findstring buildah,$(ENGINE)),sh infra/base-standin.sh)
	$(BUILD) --target production -t $(IMAGE) .
	$(BUILD) --target gpu -t $(IMAGE)-gpu .

# checkov, for tests/infra/test_checkov.py, in a virtualenv of its own: its pins (packaging,
# networkx) would downgrade the project's. With the project's uv (make setup) when it has one, else
# pip (about a minute and a half).
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION := 3.3.30

checkov: $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	@if [ -x $(BIN)/uv ] && $(BIN)/uv pip install --quiet --python $(CHECKOV_VENV)/bin/python \
	  checkov==$(CHECKOV_VERSION); then :; \
	else $(CHECKOV_VENV)/bin/python -m pip install --quiet checkov==$(CHECKOV_VERSION); fi
	rm -f $(CHECKOV_VENV)/.installed-*
	touch $@

clean:
	rm -rf runs .pytest_cache .ruff_cache
