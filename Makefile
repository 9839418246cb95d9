# The targets are the single source of truth: README and CI call these.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
CONFIG ?= examples/main.cf

.PHONY: install run test lint typecheck importcheck unit docs clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Until `serve` lands (next issue), run checks the example config and explains the
# seed's dialogue: the reply a qq.com sender gets for foo@bar.org, and a good sender's.
run: install
	$(BIN)/smtpgate check -c $(CONFIG)
	$(BIN)/smtpgate explain -c $(CONFIG) --client 203.0.113.82 --helo me.testing.example.com \
		--from 318787866@qq.com --to foo@bar.org
	$(BIN)/smtpgate explain -c $(CONFIG) --client 203.0.113.82 --helo me.testing.example.com \
		--from friend@example.net --to foo@bar.org

lint: install
	$(BIN)/ruff check smtpgate tests
	$(BIN)/ruff format --check smtpgate tests

typecheck: install
	$(BIN)/mypy

importcheck: install
	$(BIN)/lint-imports

unit: install
	$(BIN)/pytest

test: lint typecheck importcheck unit

# Generated documentation (a test fails when it is stale).
docs: install
	$(PY) -m smtpgate.config.reference > docs/configuration.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
