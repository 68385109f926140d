# Two commands a new user needs: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint serve bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin the torch/torchvision pair first: a plain "torch" may resolve to another build.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

# The demo: build the memory from the demo world with the shipped bundle once (memory/ is
# not in git), then serve gateway + retriever + generator in one process on :8000.
BUNDLE ?= bundles/demo
MEMORY ?= memory
HOST ?= 127.0.0.1
PORT ?= 8000

$(MEMORY)/CURRENT: | $(STAMP)
	$(BIN)/racm3 build-index --source world --input memory --out $(MEMORY) --bundle $(BUNDLE)

serve: $(STAMP) $(MEMORY)/CURRENT
	RACM3_BUNDLE_DIR=$(BUNDLE) RACM3_MEMORY_DIR=$(MEMORY) $(BIN)/racm3 serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache
