# sdkit developer targets. `make install` then `make test` is all CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build by default (the pinned version resolves to the local CPU wheel here).
# On a CUDA machine: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# every other package at the versions the suite was last run with: a new release of a
# dependency cannot break a fresh install
CONSTRAINTS := -c constraints.txt

.PHONY: install test bench fuzz fixtures clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install -q $(CONSTRAINTS) -e ".[test]"
# bytecode, as a non-editable install has it: where PYTHONDONTWRITEBYTECODE is set, every
# command would otherwise compile the modules it imports (a third of `sdkit inspect`)
	$(PY) -m compileall -q sdkit

test:
	$(PY) -m pytest

bench:
	$(PIP) install -q $(CONSTRAINTS) -e ".[test,bench]"
	$(PY) -m pytest tests/bench -s -p no:cacheprovider -o addopts=""

fuzz:
	SDKIT_FUZZ_EXAMPLES=200000 $(PY) -m pytest tests -k fuzz -o addopts="-q"

fixtures:
	$(PY) fixtures/toy/build.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
