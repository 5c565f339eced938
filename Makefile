# The two commands a user needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 9000
# More proxy options for `make run`, e.g. ARGS="--provider-host 127.0.0.1:18080=openai".
ARGS ?=

.PHONY: run test setup lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Editable: pyproject.toml's package-dir ("" = ".") makes it a plain .pth
# file naming the checkout, so twistd's plugin scan sees twisted/plugins/
# (setuptools' import hook would hide it, STYLE.md) without the deprecated
# "compat" mode and its warnings.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/twistd -n llmobserve --port $(PORT) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check llmobserve parsers tests bench twisted typings
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench.overhead

clean:
	rm -rf $(VENV) build *.egg-info
