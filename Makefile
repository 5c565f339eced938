# The two commands a user needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 9000

.PHONY: run test setup lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Editable in "compat" mode: the default editable hook hides the top-level
# twisted/plugins/ directory from twistd's plugin scan (see STYLE.md).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/twistd -n llmobserve --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check llmobserve parsers tests bench twisted typings
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench.overhead

clean:
	rm -rf $(VENV) build *.egg-info
