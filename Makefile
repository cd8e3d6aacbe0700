# make demo: set up .venv (first time) and train the bundled tiny demo on the CPU.
# make test: set up .venv (first time) and run the whole test suite (what CI runs).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO_ROOT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint setup

setup: $(VENV)/.installed

# The CPU build of torch first, so that nothing pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/lit-qlp fit --config configs/demo.yaml --trainer.default_root_dir $(DEMO_ROOT)
	@echo "adapter: $(DEMO_ROOT)/epoch1   logs: tensorboard --logdir $(DEMO_ROOT)"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check lit_qlp tests tools
	$(BIN)/ruff format --check lit_qlp tests tools
