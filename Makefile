# make repro   install (into .venv) and run the whole pipeline on the real data set
# make test    install and run the test suite
# make check   lint, types and the tests that start no stage process: the inner loop
# make demo    the same pipeline offline: ImageNet weights that ship with the install, on Fashion-MNIST where
#              the machine has it (apt-get install dataset-fashion-mnist), else on generated images; minutes on a CPU
# make lint    lint, format and type checks alone (make test runs them first); make format fixes
# make bench   the pipeline's speed against plain Keras, Pillow and DVC on this machine: one markdown table
# make team-up / make team-down   the team's MLflow server, PostgreSQL and S3 store on this machine
#              (state in TEAM_DIR, default .team; TEAM_HOST=0.0.0.0 at the first team-up serves other machines,
#              which reach it as TEAM_PUBLIC_HOST, default this machine's name)
# DEVICE=cpu|gpu: TensorFlow and JAX for the CPU, or JAX with CUDA (docs/gpus.md); by default gpu when `nvidia-smi` sees a GPU.

PYTHON ?= python3
VENV := .venv
DEVICE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(DEVICE)

# Stages run `python -m stages.<name>`: the venv's python must come first (outside make, the venv's
# programs see to it themselves: ops/venv_bin_first.pth).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro test check lint format demo bench team-up team-down clean-venv

install: $(STAMP)

$(STAMP): requirements.txt requirements-$(DEVICE).txt constraints.txt pyproject.toml ops/venv_bin_first.pth
	@if [ "$(DEVICE)" != cpu ] && [ "$(DEVICE)" != gpu ]; then echo "DEVICE must be cpu or gpu, not '$(DEVICE)'"; exit 2; fi
	@# tensorflow-cpu and tensorflow cannot share a venv: switching builds starts afresh.
	@if ls $(VENV)/.installed-* >/dev/null 2>&1 && [ ! -f $@ ]; then echo "switching to the $(DEVICE) build: recreating $(VENV)"; rm -rf $(VENV); fi
	@v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || { echo "$(PYTHON) cannot be run here: install it, or name another Python 3.11 or newer: make PYTHON=python3.11 ..."; exit 2; }; \
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "$(PYTHON) is Python $$v: 3.11 or newer is needed: make PYTHON=python3.11 ..."; exit 2; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r requirements-$(DEVICE).txt -c constraints.txt
	@# The project's own packages (classifier, ops), editable: an edit takes effect without reinstalling.
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	@# Every program of the venv puts its bin/ first on PATH: DVC's `python -m stages...` is the venv's.
	cp ops/venv_bin_first.pth "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/"
	touch $@

repro: $(STAMP)
	dvc repro

# The tests side by side, one pytest-xdist worker per core; the tests of a file that share a workspace
# or module fixtures run on one worker, in file order (their xdist_group mark); the groups start in the
# order of their first test (slow tests first: tests/conftest.py), not largest group first.
PYTEST := python -m pytest -n auto --dist loadgroup --no-loadscope-reorder

test: lint
	$(PYTEST)

# The inner loop: lint, types, and every test that starts no stage process.
check: lint
	$(PYTEST) -m "not slow"

# What the checks cover and why is in pyproject.toml ([tool.ruff], [tool.mypy]).
lint: $(STAMP)
	ruff check .
	ruff format --check .
	mypy

format: $(STAMP)
	ruff check --fix .
	ruff format .

demo: $(STAMP)
	python -m ops.demo

# About 5 minutes on an idle 2-core CPU; python benchmarks/bench.py --quick checks it in 2-3.
bench: $(STAMP)
	python benchmarks/bench.py --device $(DEVICE)

team-up: $(STAMP)
	python -m ops.team up $(if $(TEAM_HOST),--host $(TEAM_HOST)) $(if $(TEAM_PUBLIC_HOST),--public-host $(TEAM_PUBLIC_HOST))

team-down: $(STAMP)
	python -m ops.team down

clean-venv:
	rm -rf $(VENV)
