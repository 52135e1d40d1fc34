# Quick start: `make demo` (set up + run the main job), `make test` (set up + run the test suite).
# Both create ./.venv on first use. torch is pinned first so pip never swaps in a different build;
# on a machine with a local CPU wheel this avoids pulling a multi-GB CUDA torch.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
PYTEST_ARGS ?= -q -n 2 --durations=15

.PHONY: setup demo test verify clean gpu-check

$(BIN)/.installed: setup.py pyproject.toml
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

# The GPU check (issue 13; tools/gpu_check.py): the GPU's tests and benchmarks, logs + CSVs + summary.txt in $(OUT),
# all of them also packed in $(OUT)/gpu-check.tar.gz. On the device machine (no network: nothing is created or
# installed here), from the repository root (pyproject.toml lets pip install editable without an index):
#   python3 -m pip install -q --no-deps --no-build-isolation -e . && make gpu-check
# On a machine that lends 10 minutes a command and lets only a few files out (the device tool here): the two
# halves as two commands, the second at once (the machine stays warm), each copying its summary and bundle to
# that command's $OUT after every part, so that even a command stopped at its limit brings them back:
#   python3 -m pip install -q --no-deps --no-build-isolation -e . && make gpu-check ONLY=tests OUT=gpu-out BUNDLE_TO="$OUT"
#   make gpu-check ONLY=benchmarks OUT=gpu-out BUNDLE_TO="$OUT"
# (OUT=gpu-out on make's command line: where $OUT is set in the environment, every file would otherwise go there.)
#   make gpu-check ONLY=bench-decode      # rerun one part; `python3 tools/gpu_check.py --list` names them
#   make gpu-check DRY=1                  # the same plan on CPU (tiny shapes), with ./.venv's python if present
# It runs $(PYTHON) as it finds it (python3: the image's); DRY=1 prefers the venv `make setup` made.
OUT ?= gpu-out
DRY ?=
ONLY ?=
BUNDLE_TO ?=
GPU_CHECK_PYTHON = $(if $(and $(filter-out 0,$(DRY)),$(wildcard $(BIN)/python)),$(BIN)/python,$(PYTHON))

gpu-check:
	$(GPU_CHECK_PYTHON) tools/gpu_check.py --out "$(OUT)" $(if $(ONLY),--only "$(ONLY)") $(if $(filter-out 0,$(DRY)),--dry) \
		$(if $(BUNDLE_TO),--bundle-to "$(BUNDLE_TO)")
