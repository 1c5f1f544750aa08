# Two commands set everything up on first use: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-quick lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,export,ray,audit,lite]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pipeline demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two workers or more (pytest-xdist): most of the suite waits on CLI start-up, one core each; a module's tests and
# the tests on the featurized real photos each stay on one worker (tests/conftest.py).
PYTEST := $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

test: lint
	$(PYTEST)

test-quick: lint
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) runs/demo
