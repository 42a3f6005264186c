# The two commands of the README: `make run` (set-up, then the default pipeline) and
# `make test` (set-up, lint, then the test suite inside a loopback-only network namespace).
VENV := .venv
MPQ := $(VENV)/bin/mpq

.PHONY: setup run test test-all lint clean-outputs

setup:
	@bash scripts/setup.sh

run: setup
	$(MPQ) pipeline $(ARGS)

test: setup lint
	@bash scripts/run_tests.sh $(ARGS)

test-all: setup lint
	@MPQ_TEST_SLOW=1 bash scripts/run_tests.sh $(ARGS)

# ruff, then the architecture contracts of pyproject.toml [tool.importlinter] (layers, no cycles)
lint: setup
	$(VENV)/bin/ruff check framework launchers tests benchmarks scripts
	$(VENV)/bin/lint-imports --no-cache

clean-outputs:
	rm -rf outputs multirun
