# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA ?= ../shared/data
SAMPLE_SIZE ?= 2000
export CASCADE_DATA_DIR ?= .cascade
export HF_HUB_OFFLINE := 1

.PHONY: install system-packages banks run review test lint format clean

# torch comes first and pinned: the CPU wheel on local disk (a bare `torch` pulls a CUDA build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

DATA_FILES := $(wildcard $(SHARED_DATA)/*.jsonl)
BANKS_STAMP := $(CASCADE_DATA_DIR)/.banks-seeded

# Banks from the train split only (the sample below is drawn from the test split); idempotent by id.
$(BANKS_STAMP): $(STAMP) $(DATA_FILES)
	@test -n "$(DATA_FILES)" || { echo "no labelled data in $(SHARED_DATA)"; exit 2; }
	for f in $(DATA_FILES); do \
	  $(BIN)/cascade bank import $$f --kind hash --split train && \
	  $(BIN)/cascade bank import $$f --kind exemplars --split train || exit 1; \
	done
	$(BIN)/cascade bank seed
	touch $@

banks: $(BANKS_STAMP)

# The main job: embedded broker + workers, a sample stream published, a live progress line,
# a verdict summary, a clean shutdown.
run: $(BANKS_STAMP)
	$(BIN)/cascade sample $(DATA_FILES) --split test -n $(SAMPLE_SIZE) -o $(CASCADE_DATA_DIR)/sample.jsonl
	$(BIN)/cascade run --publish $(CASCADE_DATA_DIR)/sample.jsonl --until-drained

# The human review page on what `make run` left in review (same CASCADE_DATA_DIR); Ctrl-C stops it.
review: $(STAMP)
	$(BIN)/cascade review serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian packages the tests use (databases, browsers, TLS tools), listed in .ci/system-packages.txt.
system-packages:
	bash .ci/install-system-packages

test: lint system-packages
	$(BIN)/cascade schemas --check
	$(BIN)/pytest -q

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(CASCADE_DATA_DIR) .pytest_cache .ruff_cache
