# `make test` and `make demo` work on a fresh clone with nothing installed: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel first: an unpinned torch would pull several GB of CUDA wheels.
TORCH := torch==2.13.0

.PHONY: test demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: venv
	$(PY) -m pytest -q tests

demo: venv
	@echo "The demo workflow arrives with the Demo issue; see README.md."

clean:
	rm -rf $(VENV) .pytest_cache
