# `make demo` and `make test` create or reuse .venv in the repo root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-postgres lint bench soak clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/farm demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The same suite with PostgreSQL as the database (FARM_TEST_POSTGRES_URL, default the local server).
test-postgres: $(STAMP)
	FARM_TEST_DATABASE=postgresql $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/farm bench

# A fault soak of a farm of its own (farm chaos): MINUTES of random faults, then the audit. SEED to repeat one.
MINUTES ?= 30
soak: $(STAMP)
	$(BIN)/farm chaos --minutes $(MINUTES) $(if $(SEED),--seed $(SEED))

lint: $(STAMP)
	$(BIN)/ruff check farm web tests

clean:
	rm -rf var .pytest_cache
