# Every target sets up .venv by itself on a fresh machine; re-running is fast when nothing changed.
# Python 3.12 (megatron-core 0.19 needs it): pyenv's 3.12.1 on these machines, else python3.12 on PATH.
PY      ?= $(shell PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || command -v python3.12)
VENV    := .venv
BIN     := $(VENV)/bin
# On Python 3.12 torch comes from PyPI as the CUDA build (~2.7 GB; it runs on the CPU): pinned to the tested release.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: quickstart test test-quick test-upgrade bench lint venv clean

$(STAMP): pyproject.toml Makefile
	@test -n "$(PY)" || { echo "make: Python 3.12 not found (pyenv 3.12.1 or python3.12 on PATH); set PY=..." >&2; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' || { echo "make: $(VENV) is not Python >= 3.12: make clean, then rerun" >&2; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev,hf,quant]'
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/foldtron quickstart $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not upgrade" $(PYTEST_ARGS)

# After a Megatron-Core upgrade: which adaptation-layer patches are still needed (each scenario must fail without).
test-upgrade: $(STAMP)
	$(BIN)/python -m pytest -m upgrade $(PYTEST_ARGS)

# The loop for developers: no slow, multi-process or Slurm tests.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not multiproc and not slurm" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

lint: $(STAMP)
	$(BIN)/ruff check pretrain parallel data_pipeline model kernels tests bench

clean:
	rm -rf $(VENV) build *.egg-info
