#!/usr/bin/env bash
# The whole local loop on the embedded default model (CPU, no GPU, nothing downloaded):
# serve SmolLM2-135M on-policy -> record a built-in multi-step environment -> compact -> inspect -> export.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-out/demo}
PORT=${PORT:-8765}
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== 1. gymtape serve: embedded SmolLM2-135M-Instruct (hf engine, CPU), recording to $OUT/tape"
"$BIN/gymtape" serve --port "$PORT" --tape "$OUT/tape" >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
"$BIN/python" - "$PORT" "$SERVER" <<'PY'
import os, sys, time, httpx
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("gymtape serve exited; see its log")
    time.sleep(0.5)
sys.exit("gymtape serve did not become healthy in 300 s")
PY

echo "== 2. gymtape record: the built-in multi-step 'calculator' environment (tool calls, verifier reward)"
"$BIN/gymtape" record --env calculator --model-url "http://127.0.0.1:$PORT/v1" --tape "$OUT/tape" \
    --repeats 2 --limit 12 --concurrency 12 --max-tokens 40

echo "== 3. stop the server (it closes its tape writer)"
kill -TERM "$SERVER"; wait "$SERVER" || true; trap - EXIT

echo "== 4. gymtape compact: merge the small shards (the server's and the recorder's) into one per table"
"$BIN/gymtape" compact "$OUT/tape"

echo "== 5. gymtape inspect (tape bytes against the same rollouts as Gym JSONL)"
"$BIN/gymtape" inspect "$OUT/tape"

echo "== 6. gymtape replay: re-score every generated token with the trainer-side model (did the trainer see what the sampler saw?)"
"$BIN/gymtape" replay "$OUT/tape" --html "$OUT/replay.html" --top 3

echo "== 7. gymtape export: the same rollouts as NeMo Gym rollout JSONL"
"$BIN/gymtape" export "$OUT/tape" --format gym-jsonl -o "$OUT/rollouts.jsonl"

cat <<EOF_NEXT

Next:
  * the tape is plain Parquet:  $BIN/python -c "import polars as pl; print(pl.scan_parquet('$OUT/tape/calls/*.parquet').select('rollout_id','call_index','prompt_len','policy_version').collect())"
  * publish it for another machine: $BIN/gymtape compact $OUT/tape --to s3://bucket/run1   (then replay s3://bucket/run1)
  * point NeMo Gym at it:        $BIN/gymtape serve --tape runs/tape   (Gym: --model-url http://127.0.0.1:8000/v1)
  * open $OUT/replay.html (one self-contained page: tokens coloured by |Δlogprob|)
  * run the reference GRPO loop: $BIN/gymtape train --out runs/train-plus --env plus   (docs/trainer-bridge.md)
  * read docs/serve.md, docs/record.md, docs/replay.md and docs/tape-layout.md
EOF_NEXT
