# The two commands of the README: `make run` (set-up, then the default pipeline) and
# `make test` (set-up, lint, then the test suite inside a loopback-only network namespace);
# `make bench` runs every benchmark (about 12 minutes on 2 cores) and writes BENCHMARKS.md.
VENV := .venv
MPQ := $(VENV)/bin/mpq

.PHONY: setup run test test-all lint bench clean-outputs

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

# every script of benchmarks/ (settings in scripts/bench.sh), results in benchmarks/results/, then BENCHMARKS.md
bench: setup
	@bash scripts/bench.sh

clean-outputs:
	rm -rf outputs multirun
