#!/usr/bin/env bash
# The whole local loop on the embedded default model (CPU, no GPU, nothing downloaded):
# serve SmolLM2-135M on-policy -> record a built-in multi-turn environment -> compact -> inspect -> replay -> export.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-out/demo}
PORT=${PORT:-8765}
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== 1. gymtape serve: embedded SmolLM2-135M-Instruct (hf engine, CPU), recording to $OUT/tape"
# one torch thread: the recorder takes the other core, and on a busy machine a 2-thread server
# oversubscribed by other work runs several times slower (SERVE_THREADS overrides)
OMP_NUM_THREADS=${SERVE_THREADS:-1} "$BIN/gymtape" serve --port "$PORT" --tape "$OUT/tape" >"$OUT/serve.log" 2>&1 &
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

echo "== 2. gymtape record: the built-in multi-turn 'followup' environment ('What is 3 plus 5?', then the env's"
echo "      follow-up 'Now add 4 to that': two model calls per rollout (one when turn 1 is cut off at --max-tokens);"
echo "      the server splices turn 1's own tokens into turn 2's prompt; half the reward per turn)"
"$BIN/gymtape" record --env followup --split validation --model-url "http://127.0.0.1:$PORT/v1" --tape "$OUT/tape" \
    $(printf -- '--task-index %d ' 0 1 2 3 4 5 6 7) --repeats 2 --concurrency 16 --max-tokens 48 --temperature 0.7 --seed 0

echo "== 3. stop the server (it closes its tape writer)"
kill -TERM "$SERVER"; wait "$SERVER" || true; trap - EXIT

echo "== 4. gymtape compact: merge the small shards (the server's and the recorder's) into one per table"
"$BIN/gymtape" compact "$OUT/tape"

echo "== 5. gymtape inspect (calls per rollout, prompt tokens the splice reused, tape bytes against Gym JSONL)"
"$BIN/gymtape" inspect "$OUT/tape"

echo "== 6. gymtape replay: re-score every generated token with the trainer-side model (did the trainer see what the sampler saw?)"
"$BIN/gymtape" replay "$OUT/tape" --html "$OUT/replay.html" --top 3

echo "== 7. gymtape export: the same rollouts as NeMo Gym rollout JSONL"
"$BIN/gymtape" export "$OUT/tape" --format gym-jsonl -o "$OUT/rollouts.jsonl"

cat <<EOF_NEXT

Next:
  * the tape is plain Parquet:  $BIN/python -c "import polars as pl; print(pl.scan_parquet('$OUT/tape/calls/*.parquet').select('rollout_id','call_index','prefix_len','prompt_len','policy_version').collect())"
  * publish it for another machine: $BIN/gymtape compact $OUT/tape --to s3://bucket/run1   (then replay s3://bucket/run1)
  * point NeMo Gym at it:        $BIN/gymtape serve --tape runs/tape   (Gym: --model-url http://127.0.0.1:8000/v1)
  * open $OUT/replay.html (one self-contained page: tokens coloured by |Δlogprob|, each call's turn marked)
  * run the reference GRPO loop: $BIN/gymtape train --out runs/train-followup --env followup   (docs/trainer-bridge.md)
  * read docs/serve.md, docs/record.md, docs/replay.md and docs/tape-layout.md
EOF_NEXT
