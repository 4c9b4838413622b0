# The two README commands, plus the benchmarks. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# Huge pages for XLA CPU's per-step temporaries (README, "Benchmarks").
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

$(VENV)/.installed-%: requirements.txt requirements-test.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements$(if $(filter test,$*),-test,).txt
	touch $@

demo: $(VENV)/.installed-main
	$(PY) -m mixreorg_jax.train --config=configs/demo.py --workdir=workdirs/demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(PY) -m mixreorg_jax.tools.bench_step --config=configs/demo.py
	$(PY) -m mixreorg_jax.tools.bench_input

.PHONY: demo test bench
