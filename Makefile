# Two commands: `make tour` and `make test`. Each makes .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: tour test lab bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.core: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[dev,peers]"
	touch $(VENV)/.core $@

tour: $(VENV)/.core
	$(VENV)/bin/minillm tour

test: $(VENV)/.test
	MPLBACKEND=Agg OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 $(PY) -m pytest -n 2 -q --nbmake tests chapters
	MPLBACKEND=Agg OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 timeout 300 $(VENV)/bin/mpiexec -n 2 $(PY) -m pytest -q -p no:cacheprovider -p no:randomly -m mpi tests/test_parallel.py

lab: $(VENV)/.core
	$(PIP) install -e ".[notebooks]"
	$(VENV)/bin/jupyter lab chapters

bench: $(VENV)/.test
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
