# The two commands of the README: `make run` (set-up, then the default pipeline) and
# `make test` (set-up, lint, then the fast tier of the test suite inside a loopback-only network
# namespace); `make test-all` runs every test (what .ci/run runs); `make bench` runs every benchmark
# (about 12 minutes on 2 cores) and writes BENCHMARKS.md.
VENV := .venv
MPQ := $(VENV)/bin/mpq

.PHONY: setup run test test-all lint bench clean-outputs

setup:
	@bash scripts/setup.sh

run: setup
	$(MPQ) pipeline $(ARGS)

# The two tiers (pyproject.toml [tool.pytest.ini_options] markers); the tier is the `slow` marker alone.
# test: the fast tier, `-m "not slow"`: unit tests, in-process integration tests and one short
#       `mpq <stage>` subprocess run per stage (marked smoke); under 10 minutes on 2 cores.
# test-all: every test, the slow ones too (DeepSpeed ranks, Slurm, Ray, studies, kill-and-resume,
#       fault injection, the export matrix, cold compiles); under 45 minutes on 2 cores.
# Both print their 20 slowest tests (scripts/run_tests.sh); ARGS go to pytest.
test: setup lint
	@bash scripts/run_tests.sh -m "not slow" $(ARGS)

test-all: setup lint
	@bash scripts/run_tests.sh $(ARGS)

# ruff, then the architecture contracts of pyproject.toml [tool.importlinter] (layers, no cycles)
lint: setup
	$(VENV)/bin/ruff check framework launchers tests benchmarks scripts
	$(VENV)/bin/lint-imports --no-cache

# every script of benchmarks/ (settings in scripts/bench.sh), results in benchmarks/results/, then BENCHMARKS.md
bench: setup
	@bash scripts/bench.sh

clean-outputs:
	rm -rf outputs multirun

# the documentation site (mkdocs.yml, pages in docs/, API reference from the docstrings), built with
# --strict (a broken link or a missing function fails it) into site/; nothing is fetched
.PHONY: docs
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
