# Two entry points: `make train` (the default main job) and `make test`; `make docs` builds the
# documentation site (docs/, mkdocs.yml) into site/.
# Both create .venv when missing and install the CPU build of torch first,
# so a CPU machine never pulls the multi-GB CUDA wheel.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
ARGS ?=
# the main job: the distillation pipeline at laptop scale (conf/experiment/quickstart.yaml);
# `make train MAIN=` runs plain `python train.py` (task=classify) instead
MAIN ?= +experiment=quickstart
# the project's machines keep real CIFAR beside the checkout; elsewhere data/ (downloaded)
DATA ?= $(if $(wildcard ../shared/data/cifar-10-batches-py),../shared/data,)

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,slurm]"
	touch $@

.PHONY: setup train test test-fast lint docs docs-serve docs-config
setup: $(BIN)/.installed

# quiet like CI: W&B's offline banner and sync hints off (WANDB_SILENT), the run's lines kept
train: setup
	WANDB_SILENT=true $(BIN)/python train.py $(MAIN) $(if $(DATA),paths.data_dir=$(DATA)) $(ARGS)

# every test, the slow end-to-end ones included (what CI runs)
test: setup
	$(BIN)/python -m pytest -q -m "slow or not slow" $(ARGS)

# the fast subset, for edit-test loops (same as plain `pytest`)
test-fast: setup
	$(BIN)/python -m pytest -q $(ARGS)

# what CI runs before the tests: ruff's lint rules and its formatter, both clean
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the documentation site: the docs extra on top of setup, then a strict build (a broken link, a
# nav line naming a missing page or a docstring warning fails) into site/; a configuration
# reference older than conf/ fails first (make docs-config regenerates it)
$(BIN)/.docs-installed: $(BIN)/.installed pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev,slurm,docs]"
	touch $@

docs: $(BIN)/.docs-installed
	$(BIN)/python tools/gen_config_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# regenerate docs/configuration/reference.md from conf/ (tests/test_docs.py fails while stale)
docs-config: setup
	$(BIN)/python tools/gen_config_reference.py
