"""The chat request of each model call of a NeMo Gym rollout, rebuilt from the rollout line.

A Gym rollout line keeps the Responses request (``responses_create_params``) and the Responses
output, but not the chat messages the model server sent to the engine for each model call.
Gym's chat-backed model servers (``vllm_model``) turn a Responses request into chat messages
with ``nemo_gym.responses_converter.ResponsesConverter.responses_to_chat_completion_create_params``;
the agent's request for call *n* is the task input plus every output item before call *n*'s
own items. Doing that conversion again, here, lets ``gymtape check`` re-template ingested calls.

It is done without nemo_gym (not a dependency of gymtape), following the converter's rules for
the item types a chat request can carry:

* ``instructions`` become one leading system message, folding in the run of system/developer
  messages that starts the input (their text parts joined with a blank line);
* ``message`` items keep their role; a user/system/developer list of ``input_text`` parts becomes
  a list of ``{"type": "text"}`` parts; assistant text parts are joined, refusals kept apart;
* ``reasoning`` summaries become ``<think>..</think>`` put before the assistant content;
* ``function_call`` items become ``tool_calls`` of the assistant message;
* consecutive assistant items (reasoning, message, function_call) make ONE assistant message,
  closed by the next non-assistant item;
* ``function_call_output`` becomes a ``tool`` message;
* tools ``{type: function, name, ...}`` become ``{function: {name, description, parameters},
  type: function}``, null fields dropped, keys in the order the request reaches the engine (a
  pydantic dump of OpenAI's typed dicts), and ``strict`` removed as Gym's vLLM model server removes
  it (``_strip_hosted_only_tool_fields``). An engine may normalise tools again before templating
  (vLLM re-dumps them with its own defaults); ``gymtape serve`` templates them as received.

Anything else (images, custom tools, hosted-tool calls, server-side history such as
``previous_response_id``) has no chat form the engine could have templated: it raises
:class:`~recorder.GymConversionError` naming the item.

Which output items are call *n*'s own: in Gym the token fields sit on the last output item of
each model call (``postprocess_assistant_message_dict``), and ingest records the index of that
item (``call_item_indices``). Call *n*'s items are the run of model-produced items that ends
there and starts after call *n-1*'s token item; environment items (tool outputs, user turns)
lie between calls. The rule also covers agents that put the token fields on a call's first item
(e.g. Gym's hermes agent: the assistant message, then its function_call), since an environment
item always separates two calls there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from .._errors import GymConversionError

#: Output item types the model produces (Gym's ``_RESPONSE_OUTPUT_BOUNDARY_TYPES``); an assistant
#: ``message`` counts too.
MODEL_ITEM_TYPES = frozenset({
    "reasoning", "function_call", "custom_tool_call", "code_interpreter_call", "computer_call", "file_search_call",
    "image_generation_call", "local_shell_call", "mcp_approval_request", "mcp_call", "mcp_list_tools",
    "web_search_call", "apply_patch_call", "shell_call", "tool_search_call",
})
#: The fields of a chat function tool, in the order Gym's model server sends them (its request is
#: a pydantic dump of OpenAI's typed dicts: declared keys only, in declared order; ``strict`` is
#: declared too, but the server removes it).
_FUNCTION_KEYS = ("name", "description", "parameters")
#: Request fields that put part of the conversation outside the request: no messages to rebuild.
_SERVER_SIDE_HISTORY = ("previous_response_id", "conversation", "prompt")

Messages = list[dict[str, Any]]
Tools = list[dict[str, Any]] | None


def gym_call_requests(input_json: str | bytes | dict[str, Any], response_json: str | bytes | dict[str, Any],
                      call_item_indices: Sequence[int]) -> list[tuple[Messages, Tools]]:
    """The chat ``(messages, tools)`` each model call of one Gym rollout was sampled from.

    Args:
        input_json: the rollout's ``responses_create_params`` (JSON text or parsed).
        response_json: the rollout's ``response``, a Responses object (JSON text or parsed); its
            token fields, if still there, are ignored.
        call_item_indices: index into ``response.output`` of each call's token-carrying item, in
            call order (ingest stores it on the rollout row).

    Returns one ``(messages, tools)`` per call, as Gym's chat-backed model server sends them
    (``tools`` is None without tools). Raises :class:`~recorder.GymConversionError` when an
    item or field has no chat form, or the indices do not fit the output.
    """
    params = _parsed(input_json, "responses_create_params")
    response = _parsed(response_json, "response")
    if not isinstance(params, dict):
        raise GymConversionError(f"responses_create_params is {type(params).__name__}, expected an object")
    output = response.get("output") if isinstance(response, dict) else None
    if not isinstance(output, list):
        raise GymConversionError("response.output is missing or not a list: the rollout's output items are needed")
    for key in _SERVER_SIDE_HISTORY:
        if params.get(key) is not None:
            raise GymConversionError(f"responses_create_params.{key} is set: part of the conversation lives on the "
                                     "Responses server, so the chat messages cannot be rebuilt from the rollout line")
    raw_input = params.get("input")
    if isinstance(raw_input, str):
        base: list[Any] = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": raw_input}]}]
    elif isinstance(raw_input, list):
        base = raw_input
    else:
        raise GymConversionError(f"responses_create_params.input is {type(raw_input).__name__}, expected a string "
                                 "or a list of items")
    tools = _tools(params.get("tools"))
    instructions = params.get("instructions")
    out = []
    for start in call_starts(output, call_item_indices):
        items = [*(("input", i, it) for i, it in enumerate(base)),
                 *(("output", i, it) for i, it in enumerate(output[:start]))]
        out.append((_messages(items, instructions), tools))
    return out


def call_starts(output: Sequence[Any], call_item_indices: Sequence[int]) -> list[int]:
    """Index of each call's first own item in ``output`` (its request is everything before it)."""
    starts, prev = [], -1
    for n, idx in enumerate(call_item_indices):
        if not isinstance(idx, int) or isinstance(idx, bool) or not prev < idx < len(output):
            raise GymConversionError(f"call_item_indices[{n}] is {idx!r}; expected increasing indices into "
                                     f"response.output (0..{len(output) - 1}), after {prev}")
        j = idx
        while j - 1 > prev and _is_model_item(output[j - 1]):
            j -= 1
        starts.append(j)
        prev = idx
    return starts


def _is_model_item(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    kind = item.get("type") or ("message" if item.get("role") else None)
    return kind in MODEL_ITEM_TYPES or (kind == "message" and item.get("role") == "assistant")


def _parsed(value: Any, what: str) -> Any:
    if isinstance(value, (str, bytes)):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError as e:
            raise GymConversionError(f"{what} is not valid JSON ({e})") from None
    return value


class _Turns:
    """The chat messages so far and the assistant message being collected (Gym's converter state)."""

    def __init__(self) -> None:
        self.messages: Messages = []
        self.content = ""
        self.refusal = ""
        self.tool_calls: list[dict[str, Any]] = []
        self.open = False  # an assistant item was seen since the last flush

    def flush(self) -> None:
        if not (self.open or self.content or self.refusal or self.tool_calls):
            return
        m: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        if self.refusal:
            m["refusal"] = self.refusal
        self.messages.append(m)
        self.content, self.refusal, self.tool_calls, self.open = "", "", [], False


def _messages(items: list[tuple[str, int, Any]], instructions: Any) -> Messages:
    turns = _Turns()
    for part, i, item in items:
        where = f"{'responses_create_params.input' if part == 'input' else 'response.output'}[{i}]"
        if not isinstance(item, dict):
            raise GymConversionError(f"{where} is {type(item).__name__}, expected an item object")
        kind = item.get("type") or ("message" if item.get("role") else None)
        if kind == "message":
            _message(item, turns, where)
        elif kind == "reasoning":
            turns.open = True
            turns.content += "".join(f"<think>{s['text']}</think>" for s in item.get("summary") or []
                                     if isinstance(s, dict) and s.get("text"))
        elif kind == "function_call":
            if item.get("namespace") is not None:
                raise GymConversionError(f"{where}: a function_call namespace has no chat form")
            _need(item, ("call_id", "name", "arguments"), where)
            turns.open = True
            turns.tool_calls.append({"id": item["call_id"], "function": {"arguments": item["arguments"],
                                                                         "name": item["name"]}, "type": "function"})
        elif kind == "function_call_output":
            _need(item, ("call_id", "output"), where)
            turns.flush()
            turns.messages.append({"content": _tool_output(item["output"], where), "role": "tool",
                                   "tool_call_id": item["call_id"]})
        else:
            raise GymConversionError(f"{where} is a {kind!r} item, which has no chat message form (Gym's model "
                                     "server cannot down-convert it either): this call's request cannot be rebuilt")
    turns.flush()
    messages = turns.messages
    if instructions:
        if not isinstance(instructions, str):
            raise GymConversionError(f"responses_create_params.instructions is {type(instructions).__name__}; "
                                     "only text instructions have a chat form")
        parts = [instructions]
        while messages and messages[0]["role"] in ("system", "developer"):
            parts.append(_text_of(messages.pop(0)["content"]))
        messages.insert(0, {"content": "\n\n".join(parts), "role": "system"})
    return messages


def _message(item: dict[str, Any], turns: _Turns, where: str) -> None:
    role = item.get("role")
    content = item.get("content")
    if item.get("phase") is not None:
        raise GymConversionError(f"{where}: a message phase has no chat form")
    if role == "assistant":
        turns.open = True
        if isinstance(content, str):
            turns.content += content
        elif isinstance(content, list):
            texts, refusals = [], []
            for j, p in enumerate(content):
                text, refusal = (p.get("text"), p.get("refusal")) if isinstance(p, dict) else (None, None)
                if not isinstance(text, str) and not isinstance(refusal, str):
                    raise GymConversionError(f"{where}.content[{j}] is neither text nor a refusal: no chat form")
                texts += [text] if isinstance(text, str) else []
                refusals += [refusal] if isinstance(refusal, str) else []
            turns.content += "".join(texts)
            turns.refusal += "".join(refusals)
        elif content is not None:
            raise GymConversionError(f"{where}.content is {type(content).__name__}, expected text or a list of parts")
        for j, call in enumerate(item.get("tool_calls") or []):  # chat-shaped assistant turns
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or "id" not in call:
                raise GymConversionError(f"{where}.tool_calls[{j}] is not a chat tool call (id, function)")
            turns.tool_calls.append({"id": call["id"], "function": {"arguments": fn.get("arguments"),
                                                                    "name": fn.get("name")}, "type": "function"})
        return
    if role not in ("user", "system", "developer", "tool"):
        raise GymConversionError(f"{where}.role is {role!r}; chat messages are user, system, developer, assistant "
                                 "or tool")
    if isinstance(content, list):
        content = [_input_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    turns.flush()
    if role == "tool":
        _need(item, ("tool_call_id",), where)
        turns.messages.append({"content": content, "role": "tool", "tool_call_id": item["tool_call_id"]})
    else:
        turns.messages.append({"content": content, "role": role})


def _input_part(part: Any, where: str) -> dict[str, Any]:
    if isinstance(part, dict) and part.get("type") == "input_text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise GymConversionError(f"{where} is a {kind!r} part; only input_text parts are rebuilt (images, video and "
                             "files reach the engine as media, not as template text)")


def _tool_output(output: Any, where: str) -> Any:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return [{"type": "text", "text": _input_part(p, f"{where}.output[{j}]")["text"]} for j, p in enumerate(output)]
    raise GymConversionError(f"{where}.output is {type(output).__name__}, expected text or a list of input_text parts")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))


def _need(item: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in item]
    if missing:
        raise GymConversionError(f"{where} ({item.get('type') or item.get('role')}) has no {', '.join(missing)}")


def _tools(tools: Any) -> Tools:
    if not tools:
        return None
    if not isinstance(tools, list):
        raise GymConversionError(f"responses_create_params.tools is {type(tools).__name__}, expected a list")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise GymConversionError(f"responses_create_params.tools[{i}] is a {kind!r} tool; only function tools "
                                     "are rebuilt")
        if tool.get("defer_loading"):
            raise GymConversionError(f"responses_create_params.tools[{i}] defers loading: no chat form")
        if not isinstance(tool.get("name"), str):
            raise GymConversionError(f"responses_create_params.tools[{i}] has no name")
        fn = {k: tool[k] for k in _FUNCTION_KEYS if tool.get(k) is not None}
        out.append({"function": fn, "type": "function"})
    return out
