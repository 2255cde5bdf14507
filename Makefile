# make demo : set up .venv and run the demo (corpus -> tokenizer -> .bin/.idx -> 2-rank ZeRO-2 training -> sample)
# make test : set up .venv (and a local Slurm cluster) and run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# On a GPU machine the venv sees the system's CUDA torch; elsewhere it gets the CPU build.
$(STAMP): setup.py Makefile
	@if command -v nvidia-smi >/dev/null 2>&1 && $(PYTHON) -c "import torch" 2>/dev/null; then \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    $(PYTHON) -m venv $(VENV) && $(PIP) install torch==2.13.0; \
	fi
	$(PIP) install numpy setuptools wheel
	# deepspeed's setup.py imports torch: build it against the torch above, not an isolated one.
	$(PIP) install --no-build-isolation "deepspeed>=0.16"
	$(PIP) install -e ".[test,mpi,analysis]"
	touch $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh

test: $(STAMP)
	bash tests/slurm/cluster.sh install
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) runs data *.egg-info
