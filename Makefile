# Tessera task runner. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help

# Two distributions, both editable: the client (tessera.v1 and tessera.client,
# clients/python) that the scheduler's depends on, resolved together.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e clients/python -e ".[dev]"
	touch $(STAMP)

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

.PHONY: install
install: $(STAMP) ## Create .venv and install Tessera with its dev tools

.PHONY: gen
gen: $(STAMP) ## Regenerate the protobuf/gRPC code and stubs in protos/tessera/v1
	$(BIN)/python scripts/gen_protos.py

.PHONY: check
check: $(STAMP) ## Lint, format, mypy --strict, import boundaries, proto drift
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python scripts/gen_protos.py --check

.PHONY: test
test: $(STAMP) ## Run the test suite (real Valkey, real gRPC with mutual TLS, fake hosts)
	scripts/test_deps.sh
	$(BIN)/pytest

.PHONY: demo
demo: $(STAMP) ## Run a scheduler and three agents on fake hosts, end to end
	$(BIN)/tessera demo

.PHONY: screenshots
screenshots: $(STAMP) ## The dashboard's browser tests, their screenshots into docs/dashboard/ (the README's)
	scripts/test_deps.sh
	TESSERA_ARTIFACTS=docs $(BIN)/pytest tests/e2e/test_dashboard_e2e.py

.PHONY: demo-serve
demo-serve: $(STAMP) ## The demo cluster kept running with its dashboard open (prints the URL)
	$(BIN)/tessera demo --serve

.PHONY: bench
bench: $(STAMP) ## Every benchmark part, full sizes: bench/out/*.json, BENCHMARKS.md, bench/plots/
	$(BIN)/python bench/run.py

.PHONY: bench-quick
bench-quick: $(STAMP) ## Every benchmark part, small sizes (CI, under 5 min): bench/out/quick/
	$(BIN)/python bench/run.py --quick

.PHONY: dist-check
dist-check: $(STAMP) ## Build both wheels, install them in clean venvs, use them outside the repo (CI)
	$(BIN)/python scripts/check_dists.py

.PHONY: bench-place
bench-place: $(STAMP) ## Placement latency: core picker at fleet sizes, Place/Release end to end
	$(BIN)/python bench/place_latency.py

.PHONY: bench-engine
bench-engine: $(STAMP) ## Engine: single request on 1k/10k-host fleets, a CP-SAT batch of 1,000
	$(BIN)/python bench/engine.py

.PHONY: bench-engine-quick
bench-engine-quick: $(STAMP) ## The engine benchmark at small sizes (about a minute)
	$(BIN)/python bench/engine.py --quick --out bench/out/engine-quick.json

.PHONY: clean
clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
