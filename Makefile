# `make run` and `make test` work on a fresh machine with Python 3.11: they create .venv and install first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The bundled default run: a few hundred rt-sentiment snippets through MiniLM (store runs/rt-sentiment-minilm-300.zarr).
RUN_LIMIT ?= 300
RUN_VARIANTS ?= effective,stochastic,simplex

.PHONY: install run lint test test-unit benchmark clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt requirements-test.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "effattn needs Python 3.11, found " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: install
	$(BIN)/effattn run --corpus rt-sentiment --model minilm --limit $(RUN_LIMIT) --variants $(RUN_VARIANTS)

# Lint and format checks first (seconds), then the suite.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

# The unit tier alone (no bundled model, no server): about a minute.
test-unit: install
	$(BIN)/python -m pytest -q -m unit

benchmark: install
	$(BIN)/python benchmarks/extraction_throughput.py
	$(BIN)/python benchmarks/efficient_stage.py
	$(BIN)/python benchmarks/causal_forward.py
	$(BIN)/python benchmarks/explanation_cost.py

clean:
	rm -rf runs .pytest_cache .hypothesis
