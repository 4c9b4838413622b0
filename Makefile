# The two README commands, plus the benchmarks. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

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
