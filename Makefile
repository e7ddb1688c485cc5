# Every target sets up .venv by itself on a fresh machine; re-running is fast when nothing changed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# CPU wheel: on these machines it comes from a local file in seconds (unpinned torch pulls GBs of CUDA).
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: quickstart test test-quick bench lint venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev,hf]'
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/foldtron quickstart $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The loop for developers: no slow, multi-process or Slurm tests.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not multiproc and not slurm" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

lint: $(STAMP)
	$(BIN)/ruff check pretrain parallel data_pipeline model kernels tests bench

clean:
	rm -rf $(VENV) build *.egg-info
