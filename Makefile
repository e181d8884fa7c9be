# corral: the two commands a new machine needs are `make up` and `make test`.
# Both run scripts/bootstrap.sh first, which installs whatever is missing.
SHELL := /bin/bash
VENV ?= .venv
NODES ?= 3
PYTEST_ARGS ?=

.PHONY: bootstrap up down status test lint bench clean

bootstrap:
	@scripts/bootstrap.sh

up: bootstrap
	$(VENV)/bin/corral up --nodes $(NODES)

down: bootstrap
	$(VENV)/bin/corral down

status: bootstrap
	$(VENV)/bin/corral status

test: bootstrap
	@scripts/run-tests.sh $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: bootstrap
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
