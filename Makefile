# Two commands on a fresh machine (python3 and make only): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?= -n 2

EXPERIMENTS ?= quickstart zo_vs_gd fd_cost gradcheck mds remat admodes curvature_mlp

.PHONY: demo test test-slow lint format bench clean venv experiments

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/gradlab run configs/quickstart.toml --out gradlab-runs/quickstart --jobs 2

# regenerate the committed reference reports experiments/<name>/ from configs/<name>.toml
experiments: $(STAMP)
	for c in $(EXPERIMENTS); do \
	  $(BIN)/gradlab run configs/$$c.toml --out experiments/$$c --jobs 2 --quiet || exit 1; \
	done

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/rules.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
