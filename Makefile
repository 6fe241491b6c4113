# Each target sets up what it needs: the virtual environment at .venv, torch pinned first
# (so pip does not pull a CUDA build), then minke editable with the extras the target needs.
PY     := .venv/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
TORCH  ?= torch==2.13.0

.PHONY: run test venv clean

.venv/.base:
	python3 -m venv .venv
	$(PIP) install $(TORCH)
	$(PIP) install -e .
	touch $@

.venv/.test: .venv/.base
	$(PIP) install -e ".[test]"
	touch $@

venv: .venv/.base

run: .venv/.base
	bash runs/speedrun.sh

test: .venv/.test
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest tests

clean:
	rm -rf .venv out
