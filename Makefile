# Two commands do all the set-up: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test lint typecheck bench docs clean unasync servers mutate compiled test-compiled

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/seawall replay december-2022 --quick --jobs 4 --out replay-report --json replay-report/results.json

# Real servers for the integration tests (tests/test_real_clients.py): the CNCF
# distribution registry from Debian's docker-registry package (installing it needs root,
# as CI has); pypiserver comes with the dev extra. Without root the tests say what to do.
servers:
	@command -v docker-registry >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-registry >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-registry >/dev/null 2>&1; } || \
	  echo "note: could not install docker-registry; the OCI registry tests will not run"

test: $(STAMP) servers
	$(BIN)/python scripts/generate_sync.py --check
	$(BIN)/ruff check src tests benchmarks examples scripts
	$(BIN)/ruff format --check --quiet src tests benchmarks examples scripts
	$(BIN)/mypy
	$(MAKE) --no-print-directory docs
	SEAWALL_RUN_SLOW=1 $(BIN)/python -m pytest -q

# The optional compiled build (docs/design.md, "The compiled build"): mypyc compiles the
# server stack's hot path; the wheel is built from its sdist, as a release would be, and
# unpacked into build/compiled/site. `make test-compiled` runs the suite on it (CI does,
# after `make test`); `PYTHONPATH=build/compiled/site` runs anything else on it.
COMPILED := build/compiled
COMPILED_STAMP := $(COMPILED)/.built

$(COMPILED_STAMP): pyproject.toml $(shell find src -type f ! -path '*/__pycache__/*') | $(STAMP)
	rm -rf $(COMPILED) && mkdir -p $(COMPILED)
	HATCH_BUILD_HOOK_ENABLE_MYPYC=1 $(BIN)/python -m build --outdir $(COMPILED)/dist . \
	  >$(COMPILED)/build.log 2>&1 || { tail -40 $(COMPILED)/build.log; exit 1; }
	$(BIN)/python -m pip install --quiet --no-deps --target $(COMPILED)/site $(COMPILED)/dist/*.whl
	touch $@

compiled: $(COMPILED_STAMP)

test-compiled: $(COMPILED_STAMP) servers
	SEAWALL_EXPECT_COMPILED=1 SEAWALL_RUN_SLOW=1 PYTHONPATH=$(CURDIR)/$(COMPILED)/site \
	  $(BIN)/python -m pytest -q -p no:cacheprovider

# Mutation testing of the decision cores (docs/mutation.md); not part of `make test`.
# Which files are mutated and which tests judge them: [tool.mutmut] in pyproject.toml.
# `make mutate` starts afresh (about 1.5 hours on one core); `make mutate
# MUTANTS='seawall.shed.*'` (re)runs some, keeping the other results in mutants/.
# MUTATE_JOBS sets the worker processes (one by default: the machine is shared).
MUTATE_JOBS ?= 1
MUTANTS ?=
MUTATE_STAMP := $(VENV)/.installed-mutate

$(MUTATE_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,mutate]'
	touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	$(if $(MUTANTS),,rm -rf mutants)
	PATH="$(CURDIR)/$(BIN):$$PATH" SEAWALL_HYPOTHESIS_PROFILE=mutate \
	  $(BIN)/mutmut run --max-children $(MUTATE_JOBS) $(foreach m,$(MUTANTS),'$(m)')
	$(BIN)/python scripts/mutation_score.py

# The documentation site, strict: a broken link, anchor or nav entry fails (build/site).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The figures in docs/performance.md come from these (a few minutes; --quick for a look).
bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/client_overhead.py
	$(BIN)/python benchmarks/shedding.py --out bench-out
	$(BIN)/python benchmarks/telemetry_overhead.py
	$(BIN)/python benchmarks/build_steps.py

# The sync client and cache code is generated from its async source (docs/design.md).
unasync: $(STAMP)
	$(BIN)/python scripts/generate_sync.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist bench-out replay-report
