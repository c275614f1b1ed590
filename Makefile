# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA ?= ../shared/data
SAMPLE_SIZE ?= 2000
export CASCADE_DATA_DIR ?= .cascade
export HF_HUB_OFFLINE := 1

.PHONY: install run test lint format clean

# torch comes first and pinned: the CPU wheel on local disk (a bare `torch` pulls a CUDA build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/cascade sample $(SHARED_DATA)/*.jsonl --split test -n $(SAMPLE_SIZE) -o $(CASCADE_DATA_DIR)/sample.jsonl
	$(BIN)/cascade moderate $(CASCADE_DATA_DIR)/sample.jsonl -o $(CASCADE_DATA_DIR)/verdicts.jsonl

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/cascade schemas --check
	$(BIN)/pytest -q

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(CASCADE_DATA_DIR) .pytest_cache .ruff_cache
