# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Each creates/updates its own virtual environment; torch is pinned through constraints.txt so
# set-up never pulls a CUDA build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench clean

$(VENV)/.test-installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $@

test: $(VENV)/.test-installed
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(VENV)/.test-installed
	$(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) build *.egg-info
