# The targets are the single source of truth: README and CI call these.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
CONFIG ?= examples/main.cf

.PHONY: install run system-deps test test-fast lint typecheck importcheck unit docs clean bench bench-profile

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The demo: smtpgate on 127.0.0.1:2525 with the seed's setup done right, in front of an
# embedded backend (smtpgate sink) on 127.0.0.1:2526 that stores mail in var/mail/new.
# Ctrl-C stops both.
run: install
	@$(BIN)/smtpgate check -c $(CONFIG)
	@cat examples/TRY.txt
	@mkdir -p var; \
	$(BIN)/smtpgate sink --listen 127.0.0.1:2526 --maildir var/mail & sink=$$!; \
	trap 'kill $$sink 2>/dev/null; wait $$sink 2>/dev/null' EXIT INT TERM; \
	$(BIN)/smtpgate serve -c $(CONFIG) -o maillog_file=var/maillog -o pid_file=var/smtpgate.pid \
		-o smtpgate_user=nobody; \
	echo "smtpgate stopped; log in var/maillog"

lint: install
	$(BIN)/ruff check smtpgate tests deploy bench
	$(BIN)/ruff format --check smtpgate tests deploy bench

typecheck: install
	$(BIN)/mypy

importcheck: install
	$(BIN)/lint-imports

unit: install
	$(BIN)/pytest

# The Debian packages the tests start (Postfix, rspamd, ClamAV, OpenDKIM, postgrey,
# postfwd, policyd-spf, Redis, HAProxy, Chromium): installed when missing.
system-deps:
	bash tests/system-deps.sh

test: system-deps lint typecheck importcheck unit

# The inner loop: pytest only (no lint), without the tests marked postfix, soak or deploy
# (pyproject.toml lists the markers). make test stays the whole suite.
FAST_MARKERS := not postfix and not soak and not deploy
test-fast: install
	$(BIN)/pytest -q -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

# smtpgate vs Postfix side by side on loopback (root; a few minutes); see bench/README.md.
# BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--rounds 3 -o name=value";
# HARNESS=independent runs issue 16's independent harness configuration instead of today's.
HARNESS ?= today
bench: install
	bench/setup.sh
	$(PY) -m bench --harness $(HARNESS) $(BENCH_ARGS)

# py-spy profile of smtpgate under the 1 KB relay workload.
bench-profile: install
	bench/setup.sh --profile
	$(PY) -m bench --profile $(BENCH_ARGS)

# Generated documentation (a test fails when it is stale).
docs: install
	$(PY) -m smtpgate.config.reference > docs/configuration.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
