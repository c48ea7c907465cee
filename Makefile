# gymtape: `make demo` shows the main job, `make test` runs every test; both set up .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO   := out/demo

.PHONY: venv test demo bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

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

bench: $(STAMP)
	$(BIN)/python bench/bench_tape.py

docs: $(STAMP)
	$(BIN)/python -c "from recorder._schema import render_markdown; print(render_markdown(), end='')" > docs/tape-format.md

clean:
	rm -rf $(VENV) out .pytest_cache
