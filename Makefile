# Two commands on a fresh machine (Python >= 3.10):  make demo   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean-venv

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) run.py --demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) bench/bench_epoch.py

clean-venv:
	rm -rf $(VENV)
