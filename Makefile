# Two commands set everything up on first use: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-quick lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,export]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pipeline demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

test-quick: lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs/demo
