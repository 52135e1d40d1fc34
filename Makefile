# Quick start: `make demo` (set up + run the main job), `make test` (set up + run the test suite).
# Both create ./.venv on first use. torch is pinned first so pip never swaps in a different build;
# on a machine with a local CPU wheel this avoids pulling a multi-GB CUDA torch.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
PYTEST_ARGS ?= -q -n 2 --durations=15

.PHONY: setup demo test verify clean

$(BIN)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,viz]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m nanogpt2 generate --model shakespeare-tiny --prompt "ROMEO:" --max-new-tokens 120 --temperature 0.8 --seed 0

verify: setup
	$(BIN)/python -m nanogpt2 verify

test: setup
	$(BIN)/pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info
