# The few commands a newcomer needs. Each sets up its own virtualenv on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench schemas screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,demo,display]"
	touch $(STAMP)

## demo: broker, simulator, daemon and riders with a live view (Ctrl-C ends it with a summary)
demo: $(STAMP)
	$(BIN)/cabinet demo

## test: lint, format check, type check and the whole test suite
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Tests mostly wait on real processes (daemon, simulator, broker), so more workers than cores
# pays; TEST_WORKERS=0 runs them in one process (a debugger, a traceback without interleaving).
TEST_WORKERS ?= 4
unit: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

## screenshots: the rider's screen at both sizes in both languages (docs/rider-screen/)
screenshots: $(STAMP)
	$(BIN)/python tools/rider_screenshots.py

## bench: bus cycle, swap latency, outbox drain, firmware update, daemon RSS/CPU, fleet N
bench: $(STAMP)
	$(BIN)/python bench/bus_cycle.py
	$(BIN)/python bench/daemon_cycle.py
	$(BIN)/python bench/swap_latency.py --swaps 20
	$(BIN)/python bench/outbox.py
	$(BIN)/python bench/firmware.py
	$(BIN)/python bench/daemon_resources.py
	$(BIN)/python bench/daemon_resources.py --display --fleet
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/broker_cost.py

## schemas: regenerate protocol/schemas/*.json from the message models
schemas: $(STAMP)
	$(BIN)/python tools/gen_schemas.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
