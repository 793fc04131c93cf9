# Every target makes the virtualenv first, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test lint bench chaos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/ingester dev

test: venv
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check ingester tests bench
	$(BIN)/ruff format --check ingester tests bench
	$(BIN)/mypy

bench: venv
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .dev .pytest_cache .mypy_cache .ruff_cache .hypothesis
