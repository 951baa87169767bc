# The two commands of the README: `make demo` and `make test`. Each sets up what is
# missing first (system packages, virtualenv, the Kafka broker's jars), idempotently.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test setup system venv kafka-jars lint typecheck check bench clean stack-down

demo: setup
	$(BIN)/kefu demo $(DEMO_ARGS)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

setup: system venv kafka-jars

system:
	@scripts/ensure-system.sh

venv: $(VENV)/.installed

# setup.py and the C source too: `pip install -e .` rebuilds the moderation extension.
$(VENV)/.installed: pyproject.toml setup.py streams/_native/moderation.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

kafka-jars: venv
	@$(BIN)/kefu stack fetch

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

check: lint typecheck test

bench: setup
	$(BIN)/kefu bench $(BENCH_ARGS)

stack-down:
	-$(BIN)/kefu stack down

clean: stack-down
	rm -rf .kefu .pytest_cache .mypy_cache .ruff_cache
