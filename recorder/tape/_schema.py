"""Column-by-column schema of the tape (format v2; columns unchanged since v1).

This module is the single source of the tape's columns: the writer builds Arrow tables from
it, the reader checks shards against it, and ``docs/tape-format.md`` is generated from it
(``make docs``; a test keeps the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from ._layout import FORMAT_VERSION

TOKEN_IDS = pa.list_(pa.int32())
LOGPROBS = pa.list_(pa.float32())
TIMESTAMP = pa.timestamp("us", tz="UTC")
JSON_TEXT = pa.string()


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool
    doc: str

    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable)


CALL_COLUMNS: tuple[Column, ...] = (
    Column("call_id", pa.string(), False, "Unique id of this model call."),
    Column("rollout_id", pa.string(), False, "Rollout (episode) the call belongs to; joins `rollouts.rollout_id`."),
    Column("call_index", pa.int32(), False, "0-based position of the call within its rollout."),
    Column("prefix_len", pa.int32(), False,
           "Tokens of the previous call's context (its full prompt followed by its generation) "
           "that start this call's prompt. 0 for the first call. A history rewrite shows up as "
           "`prefix_len` shorter than the previous context."),
    Column("prompt_suffix_ids", TOKEN_IDS, False,
           "Prompt token IDs after the kept prefix: full prompt = previous context[:prefix_len] + "
           "prompt_suffix_ids."),
    Column("prompt_len", pa.int32(), False, "Length of the full prompt (prefix_len + len(prompt_suffix_ids))."),
    Column("generation_ids", TOKEN_IDS, False, "Token IDs the sampler generated, exactly."),
    Column("generation_logprobs", LOGPROBS, False,
           "Sampling logprob of each generated token; same length as `generation_ids`."),
    Column("token_status", pa.string(), False,
           "`ok`: token IDs present; `empty`: the source carried the token fields as empty lists; "
           "`invalid_logprobs`: a logprob is NaN, infinite or positive (kept as given, flagged by `gymtape check`)."),
    Column("finish_reason", pa.string(), True, "`stop`, `length`, `tool_calls`, ... as the engine reported it."),
    Column("policy_version", pa.int64(), False, "Policy (weights) version that generated the call."),
    Column("temperature", pa.float32(), True, "Sampling temperature (null: engine default)."),
    Column("top_p", pa.float32(), True, "Nucleus sampling threshold (null: engine default)."),
    Column("top_k", pa.int32(), True, "Top-k cut-off (null: engine default)."),
    Column("max_tokens", pa.int32(), True, "Generation token limit of the request."),
    Column("seed", pa.int64(), True, "Sampling seed of the request."),
    Column("logprobs_kind", pa.string(), True,
           "Which logprobs the engine returned: `raw` (model distribution, before temperature/top-p) "
           "or `processed` (after them); null when unknown."),
    Column("engine", pa.string(), True, "Generation engine (`vllm`, `hf`, ...); null when unknown."),
    Column("model", pa.string(), True, "Model name as served."),
    Column("started_at", TIMESTAMP, True, "When the call started (UTC)."),
    Column("latency_s", pa.float32(), True, "Wall time of the call in seconds."),
    Column("messages_prefix_len", pa.int32(), False,
           "Request messages kept from the previous call's request messages (0 for the first call)."),
    Column("new_messages_json", JSON_TEXT, True,
           "JSON list of the request messages after the kept ones. Null when the request is "
           "derivable from the rollout row (ingested Gym rollouts: input + earlier output items)."),
    Column("tools_json", JSON_TEXT, True,
           "JSON list of the request's tools; null means the same tools as the previous call."),
    Column("output_json", JSON_TEXT, True, "The parsed model output (message with tool calls / reasoning) as JSON."),
)

ROLLOUT_COLUMNS: tuple[Column, ...] = (
    Column("rollout_id", pa.string(), False, "Unique id of the rollout."),
    Column("env", pa.string(), True, "Environment / agent name (Gym `agent_ref.name`)."),
    Column("task_index", pa.int64(), True, "Gym `_ng_task_index`: which task of the task file."),
    Column("rollout_index", pa.int64(), True, "Gym `_ng_rollout_index`: which repeat of the task."),
    Column("group_key", pa.string(), True,
           "Rollouts with the same key form one GRPO group (same env and task)."),
    Column("reward", pa.float64(), True, "Verifier reward."),
    Column("status", pa.string(), False, "`ok`, `truncated` (hit a length limit) or `failed`."),
    Column("status_reason", pa.string(), True, "Why the rollout is truncated or failed."),
    Column("token_status", pa.string(), False,
           "`ok`: every model call has token IDs; `empty`: the token fields were present but empty; "
           "`partial`: some calls have them; `missing`: the source had no token fields at all; "
           "`incomplete`: a call of the rollout failed to be captured (NeMo Gym's `mark_incomplete`): "
           "never trained on, flagged by `gymtape check`; `invalid_logprobs`: a call's logprobs are NaN, infinite "
           "or positive: never trained on."),
    Column("num_calls", pa.int32(), False, "Model calls recorded for the rollout."),
    Column("prompt_tokens", pa.int64(), False, "Sum of the calls' full prompt lengths."),
    Column("generation_tokens", pa.int64(), False, "Sum of the calls' generated tokens."),
    Column("min_policy_version", pa.int64(), True, "Oldest policy version among the calls."),
    Column("max_policy_version", pa.int64(), True, "Newest policy version among the calls."),
    Column("input_json", JSON_TEXT, True, "Gym `responses_create_params` (the task input) as JSON."),
    Column("response_json", JSON_TEXT, True,
           "Gym `response` object as JSON, without the three token fields (they live in `calls`)."),
    Column("extras_json", JSON_TEXT, True,
           "The line's other fields (verifier extras, `agent_ref`, ...) as a JSON object."),
    Column("call_item_indices", pa.list_(pa.int32()), True,
           "For each call (by `call_index`), the index into `response.output` of the Gym output item "
           "that carries its token fields; null when the rollout has no Gym response."),
    Column("gym_keys", pa.list_(pa.string()), True,
           "Top-level keys of the source Gym line in their order, so export rebuilds it exactly."),
    Column("source", pa.string(), True, "Where the rollout came from (`file:line` for ingested ones)."),
    Column("created_at", TIMESTAMP, True, "When the rollout was written (UTC)."),
)

CALLS_SCHEMA = pa.schema([c.field() for c in CALL_COLUMNS])
ROLLOUTS_SCHEMA = pa.schema([c.field() for c in ROLLOUT_COLUMNS])
SCHEMAS = {"calls": CALLS_SCHEMA, "rollouts": ROLLOUTS_SCHEMA}
COLUMNS = {"calls": CALL_COLUMNS, "rollouts": ROLLOUT_COLUMNS}


_TYPE_NAMES = {"float": "float32", "double": "float64", "timestamp[us, tz=UTC]": "timestamp[us, UTC]"}


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    return _TYPE_NAMES.get(str(t), str(t))


def render_markdown() -> str:
    """The schema reference, as shipped in ``docs/tape-format.md``."""
    out = [
        f"# Tape format v{FORMAT_VERSION}: column reference",
        "",
        "Generated from `recorder/tape/_schema.py` by `make docs`; do not edit by hand.",
        "See `tape-layout.md` for the directory layout, atomicity and versioning rules.",
    ]
    for table, cols in COLUMNS.items():
        out += ["", f"## `{table}/*.parquet`", "", "| column | type | null | meaning |", "|---|---|---|---|"]
        for c in cols:
            out.append(f"| `{c.name}` | `{_type_name(c.type)}` | {'yes' if c.nullable else 'no'} | {c.doc} |")
    return "\n".join(out) + "\n"
