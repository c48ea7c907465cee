"""The on-policy token splice, with real tokenizers and chat templates (Qwen3 and SmolLM2).

Inputs are built the way the server builds them: the chat template is rendered to text with
``apply_chat_template(..., tokenize=False)`` and encoded with ``add_special_tokens=False``; the
model's generation IDs are constructed piece by piece, the way a sampler can emit them (which
need not be how the tokenizer would encode the same text).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from transformers import AutoTokenizer

from recorder.serve.engines._models import default_model_dir
from recorder.serve.engines._qwen import qwen_tokenizer_dir
from recorder.serve._splice import SpliceError, count_eos, splice_prefix

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "f",
            "description": "Look something up.",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
        },
    }
]


@dataclass(frozen=True)
class Tok:
    name: str
    hf: Any
    eos: int

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    def render(
        self, messages: list[dict[str, Any]], *, gen: bool, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        text = self.hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
        return self.encode(text)

    def gen(self, *pieces: str, eos: bool = True) -> list[int]:
        """Generation IDs as a sampler may emit them: each piece encoded on its own."""
        ids = [i for piece in pieces for i in self.encode(piece)]
        return ids + [self.eos] if eos else ids


@pytest.fixture(scope="module")
def qwen() -> Tok:
    hf = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 151645
    return Tok("qwen3", hf, hf.eos_token_id)


@pytest.fixture(scope="module")
def smol() -> Tok:
    hf = AutoTokenizer.from_pretrained(default_model_dir())
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 2
    return Tok("smollm2", hf, hf.eos_token_id)


@pytest.fixture(params=["qwen", "smol"])
def tok(request: pytest.FixtureRequest) -> Tok:
    return request.getfixturevalue(request.param)


@dataclass
class Chat:
    """A conversation driven through the splice, call by call, as the server would do it."""

    tok: Tok
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    context: list[int] = field(default_factory=list)  # last call's prompt IDs + generation IDs

    def inputs(self) -> tuple[list[int], list[int], list[int]]:
        """(model prefix, template prefix, full template) for the next call."""
        full = self.tok.render(self.messages, gen=True, tools=self.tools)
        if not self.context:
            return [], [], full
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        prefix = self.tok.render(self.messages[: last + 1], gen=False, tools=self.tools)
        return self.context, prefix, full

    def prompt(self) -> list[int]:
        model_prefix, template_prefix, full = self.inputs()
        return splice_prefix(model_prefix, template_prefix, full, self.tok.eos, tokenizer=self.tok)

    def respond(self, generation: list[int], message: dict[str, Any], *then: dict[str, Any]) -> list[int]:
        """The model answers the next call with ``generation`` (parsed into ``message``)."""
        prompt = self.prompt()
        self.context = prompt + generation
        self.messages += [message, *then]
        return prompt


def contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def turn_end(ids: list[int], eos: int) -> int:
    """Index of the last EOS in ``ids``."""
    return len(ids) - 1 - ids[::-1].index(eos)


# ---------------------------------------------------------------------------------------------
# Re-tokenization


MERGES = {"qwen": (" Skin", "ny"), "smol": (" Ski", "nny")}


@pytest.mark.parametrize("name", ["qwen", "smol"])
def test_splice_keeps_model_token_split_that_retokenization_would_merge(
    name: str, request: pytest.FixtureRequest
) -> None:
    tok: Tok = request.getfixturevalue(name)
    left, right = MERGES[name]
    emitted = tok.encode(left) + tok.encode(right)
    assert tok.encode(left + right) != emitted, (
        f"test premise broken: {tok.name} encodes {left + right!r} as the pieces {left!r}+{right!r}, "
        "so this is not a merge case"
    )
    chat = Chat(tok, [{"role": "user", "content": "What jeans?"}])
    generation = tok.gen("I like", left, right, " jeans.")
    text = tok.decode(generation[:-1])
    chat.respond(generation, {"role": "assistant", "content": text}, {"role": "user", "content": "Why?"})
    model_prefix, template_prefix, full = chat.inputs()
    spliced = chat.prompt()

    assert spliced[: len(model_prefix) - 1] == model_prefix[:-1], (
        "the spliced prompt does not start with the model's exact IDs"
    )
    assert contains(spliced, generation), "the model's generation (with its own token split) is missing from the prompt"
    assert not contains(full, generation[:-1]), (
        "test premise broken: the naively re-templated prompt already holds the model's IDs, "
        "so re-tokenization did not change anything"
    )
    assert tok.decode(spliced) == tok.decode(full), "splicing changed the text of the prompt, not just its token split"
    assert len(spliced) > len(full), f"{left!r}+{right!r} should be more tokens than the merged re-tokenization"


# ---------------------------------------------------------------------------------------------
# Turn boundaries


def test_splice_appends_eos_when_generation_stopped_without_one(tok: Tok) -> None:
    chat = Chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to fifty."}])
    generation = tok.gen("One, two, three, four", eos=False)  # finish_reason == "length"
    chat.respond(generation, {"role": "assistant", "content": tok.decode(generation)},
                 {"role": "user", "content": "Go on."})
    model_prefix, template_prefix, full = chat.inputs()
    assert full[: len(template_prefix)] == template_prefix, "test premise: this template renders the history stably"
    template_tail = full[turn_end(template_prefix, tok.eos):]  # from the EOS closing the assistant turn

    spliced = chat.prompt()

    assert spliced == model_prefix + template_tail, (
        "a generation cut at max tokens must be closed with one EOS and followed by the template's tail"
    )
    assert spliced[len(model_prefix)] == tok.eos, "no EOS was inserted after a generation that ended without one"
    assert tok.decode(spliced[len(model_prefix):]).startswith("<|im_end|>\n<|im_start|>user\nGo on.<|im_end|>")


def test_splice_at_last_of_several_assistant_turns_keeps_every_generation(tok: Tok) -> None:
    left, right = MERGES["qwen" if tok.name == "qwen3" else "smol"]
    chat = Chat(tok, [{"role": "system", "content": "You sell jeans."}, {"role": "user", "content": "Hi"}])
    generations = []
    for k, follow_up in enumerate(["Which cut?", "And the colour?", "Price?"]):
        generation = tok.gen(f"Answer {k}:", left, right, f" model {k}.")
        generations.append(generation)
        chat.respond(generation, {"role": "assistant", "content": tok.decode(generation[:-1])},
                     {"role": "user", "content": follow_up})
    model_prefix, template_prefix, full = chat.inputs()
    assert count_eos(template_prefix, tok.eos) == 2 + 2 * 3 - 1, "test premise: 3 assistant turns before the splice"

    spliced = chat.prompt()

    at = 0
    for k, generation in enumerate(generations):
        found = [i for i in range(at, len(spliced)) if spliced[i : i + len(generation)] == generation]
        assert found, f"assistant turn {k}'s exact generation IDs are missing (or out of order) in the final prompt"
        at = found[0] + len(generation)
    assert count_eos(spliced, tok.eos) == count_eos(full, tok.eos), (
        "the spliced prompt closes a different number of turns than the template"
    )
    assert spliced[-len(tok.encode("Price?<|im_end|>\n<|im_start|>assistant\n")):] == tok.encode(
        "Price?<|im_end|>\n<|im_start|>assistant\n"
    ), "the new user turn and the generation prompt must come from the template"


def test_splice_counts_turns_not_positions_when_template_strips_earlier_think(qwen: Tok) -> None:
    tok = qwen
    chat = Chat(tok, [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is f(1)?"}],
                tools=TOOLS)
    call = {"name": "f", "arguments": {"x": 1}}
    g1 = tok.gen("<think>\nI should call f.\n</think>\n\n",
                 '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    chat.respond(g1, {"role": "assistant", "content": "", "reasoning_content": "I should call f.",
                      "tool_calls": [{"type": "function", "function": call}]},
                 {"role": "tool", "content": "42"})
    g2 = tok.gen("<think>\nf(1) is 42.\n</think>\n\n", "It is 42.")
    chat.respond(g2, {"role": "assistant", "content": "It is 42.", "reasoning_content": "f(1) is 42."},
                 {"role": "user", "content": "And f(2)?"})
    model_prefix, template_prefix, full = chat.inputs()
    think = tok.hf.convert_tokens_to_ids("<think>")
    assert count_eos(template_prefix, tok.eos) == count_eos(full, tok.eos) - 1, "test premise: one new user turn"
    assert think in template_prefix and think not in full, (
        "test premise broken: the Qwen3 template should keep reasoning before the new user query and strip it after"
    )
    assert full[: len(template_prefix)] != template_prefix, "test premise: stripping must shift positions"

    spliced = chat.prompt()

    tail = tok.encode("<|im_end|>\n<|im_start|>user\nAnd f(2)?<|im_end|>\n<|im_start|>assistant\n")
    assert spliced == model_prefix[:-1] + tail, (
        "the splice must land after the model's last turn and append exactly the template's tail, "
        "even though the template dropped earlier <think> blocks"
    )
    assert spliced.count(think) == 2, "the model prefix lost the reasoning the model actually saw and produced"
    position_based = model_prefix[:-1] + full[turn_end(template_prefix, tok.eos):]
    assert position_based != spliced, "test premise: a position-based splice would have given the same prompt"


def test_splice_tail_is_exactly_template_tail_after_tool_call_with_reasoning(qwen: Tok) -> None:
    tok = qwen
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nold\n</think>\n\nHello."},
        {"role": "user", "content": "What is f(3)?"},
    ]
    chat = Chat(tok, history, tools=TOOLS)
    g = tok.gen("<think>\nCall f.\n</think>\n\n", '<tool_call>\n{"name": "f", "arguments": {"x": 3}}\n</tool_call>')
    chat.respond(g, {"role": "assistant", "content": "", "reasoning_content": "Call f.",
                     "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 3}}}]},
                 {"role": "tool", "content": "9"})
    model_prefix, template_prefix, full = chat.inputs()
    assert "old" not in tok.decode(full), "test premise: Qwen3 strips reasoning before the last user query"

    spliced = chat.prompt()

    tail = tok.encode(
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n9\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert spliced == model_prefix[:-1] + tail, (
        "the tool response and generation prompt must be the template's, verbatim"
    )
    assert contains(spliced, g), "the model's think block and tool call must be kept as emitted"


# ---------------------------------------------------------------------------------------------
# Re-chat-templating


def test_splice_keeps_model_tool_call_bytes_that_template_renders_differently(tok: Tok) -> None:
    chat = Chat(tok, [{"role": "user", "content": "Run f on 1."}], tools=TOOLS)
    emitted = '<tool_call>\n{"name":"f", "arguments": {"x":1}}\n</tool_call>'
    generation = tok.gen(emitted)
    parsed = {"role": "assistant", "content": "",
              "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}
    chat.respond(generation, parsed, {"role": "tool", "content": json.dumps({"y": 2})})
    model_prefix, template_prefix, full = chat.inputs()
    assert emitted not in tok.decode(full), "test premise broken: the template renders the tool call as the model did"

    spliced = chat.prompt()

    assert contains(spliced, generation), "the model's tool-call tokens were replaced by the template's rendering"
    assert emitted in tok.decode(spliced), "the model's tool-call bytes (its own spacing) are not in the prompt"
    assert tok.decode(spliced).endswith(
        '<tool_response>\n{"y": 2}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    ), "the tool response and generation prompt after the splice must be the template's"


def test_empty_model_prefix_returns_template_ids_unchanged(tok: Tok) -> None:
    full = tok.render([{"role": "user", "content": "Hi"}], gen=True)
    out = splice_prefix([], [], full, tok.eos)
    assert out == full, "a first call (no model prefix) must use the templated prompt as is"
    assert out is not full, "the result must be a new list: callers may extend it"


# ---------------------------------------------------------------------------------------------
# Errors


def _error_case(tok: Tok) -> Chat:
    chat = Chat(tok, [{"role": "user", "content": "Tell me about zebras."}])
    generation = tok.gen("Zebras have distinctive stripes.")
    chat.respond(generation, {"role": "assistant", "content": tok.decode(generation[:-1])},
                 {"role": "user", "content": "And okapis?"})
    return chat


def test_missing_eos_id_raises_with_both_sides_decoded(tok: Tok) -> None:
    model_prefix, template_prefix, full = _error_case(tok).inputs()
    with pytest.raises(SpliceError) as err:
        splice_prefix(model_prefix, template_prefix, full, None, tokenizer=tok)
    msg = str(err.value)
    assert "EOS" in msg and "eos_token" in msg, f"the message must say the EOS id is missing and how to set it: {msg}"
    assert "distinctive stripes" in msg, f"the message must show the model prefix as text: {msg}"
    assert "Tell me about zebras" in msg, f"the message must show the template side as text: {msg}"


def test_template_prefix_without_eos_raises_with_both_sides_decoded(tok: Tok) -> None:
    model_prefix, template_prefix, full = _error_case(tok).inputs()
    wrong_eos = tok.hf.convert_tokens_to_ids("<|endoftext|>")  # a real special token the template never emits
    assert wrong_eos not in template_prefix
    with pytest.raises(SpliceError) as err:
        splice_prefix(model_prefix, template_prefix, full, wrong_eos, tokenizer=tok)
    msg = str(err.value)
    assert "no EOS" in msg and str(wrong_eos) in msg, f"the message must say the template prefix has no EOS: {msg}"
    assert "distinctive stripes" in msg and "Tell me about zebras" in msg, f"both sides must be shown decoded: {msg}"


def test_template_with_fewer_turns_than_prefix_raises_with_both_sides_decoded(tok: Tok) -> None:
    model_prefix, template_prefix, _ = _error_case(tok).inputs()
    rewritten = tok.render([{"role": "user", "content": "Summary: zebras were discussed. And okapis?"}], gen=True)
    with pytest.raises(SpliceError) as err:
        splice_prefix(model_prefix, template_prefix, rewritten, tok.eos, tokenizer=tok)
    msg = str(err.value)
    assert "closes 1 turn(s)" in msg and "closes 2" in msg, f"the message must give both turn counts: {msg}"
    assert "distinctive stripes" in msg and "zebras were discussed" in msg, f"both sides must be shown decoded: {msg}"


def test_error_without_tokenizer_shows_raw_id_tails(smol: Tok) -> None:
    model_prefix, template_prefix, full = _error_case(smol).inputs()
    with pytest.raises(SpliceError) as err:
        splice_prefix(model_prefix, template_prefix, full[:3], smol.eos)
    msg = str(err.value)
    assert str(model_prefix[-3:])[1:-1] in msg, f"the model prefix's last IDs must be in the message: {msg}"
    assert str(full[:3]) in msg, f"the template's IDs must be in the message: {msg}"


# ---------------------------------------------------------------------------------------------
# Property: when the model's output re-templates identically, splicing changes nothing

WORDS = ["Skinny", " jeans", "naïve", "café", "42", "3.14", "\n\n", "  ", "日本語", "emoji 🙂", "x=1;", '"q"',
         "<b>", "don't", "Ski", "nny"]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(1, 8))).strip() or "ok"


def _conversation(rng: random.Random, reasoning: bool) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.5:
        messages.append({"role": rng.choice(["system", "developer"]), "content": _text(rng)})
    messages.append({"role": "user", "content": _text(rng)})
    for _ in range(rng.randint(1, 4)):
        message: dict[str, Any] = {"role": "assistant", "content": _text(rng)}
        if rng.random() < 0.4:
            message["content"] = rng.choice(["", message["content"]])
            message["tool_calls"] = [
                {"type": "function", "function": {"name": "f", "arguments": {"x": rng.randint(0, 99)}}}
                for _ in range(rng.randint(1, 2))
            ]
            messages.append(message)
            messages += [{"role": "tool", "content": _text(rng)} for _ in range(len(message["tool_calls"]))]
        else:
            messages.append(message)
            messages.append({"role": "user", "content": _text(rng)})
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1] + [{"role": "user", "content": _text(rng)}] if rng.random() < 0.5 else messages
    if reasoning:  # only where the template keeps it in both renders: after the last user query
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        for m in messages[last_user + 1 :]:
            if m["role"] == "assistant" and rng.random() < 0.7:
                m["reasoning_content"] = _text(rng)
    return messages


@pytest.mark.parametrize("trailing_eos", [True, False], ids=["stopped-at-eos", "cut-before-eos"])
def test_splice_is_identity_when_model_output_retemplates_identically(tok: Tok, trailing_eos: bool) -> None:
    rng = random.Random(f"{tok.name}-{trailing_eos}")
    for case in range(25):
        messages = _conversation(rng, reasoning=tok.name == "qwen3")
        tools = TOOLS if rng.random() < 0.5 else None
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        template_prefix = tok.render(messages[: last + 1], gen=False, tools=tools)
        full = tok.render(messages, gen=True, tools=tools)
        end = turn_end(template_prefix, tok.eos)
        model_prefix = template_prefix[: end + 1] if trailing_eos else template_prefix[:end]

        spliced = splice_prefix(model_prefix, template_prefix, full, tok.eos, tokenizer=tok)

        assert spliced == full, (
            f"case {case}: the model's output re-templates identically, yet the splice changed the prompt; "
            f"messages={messages!r}"
        )


def test_retemplate_mode_renders_from_text_like_a_stock_server_but_keeps_the_rollout_anchor(smol: Tok) -> None:
    """`gymtape serve --retemplate` (the A/B's stock arm): the same request, with the model's own
    token split of turn 1 in its token fields, is spliced by default and re-templated from text
    with the switch; both name the same anchor, so the call still joins its rollout."""
    from recorder.serve._prompting import PromptBuilder

    hf = smol.hf
    user = {"role": "user", "content": "What is 4 plus 9?"}
    p0 = hf.encode(hf.apply_chat_template([user], tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    # " \n\n13": a split the sampler can emit and re-encoding the text merges differently
    gen = [hf.convert_tokens_to_ids("ĠĊĊ"), *hf.encode("13", add_special_tokens=False), smol.eos]
    text = hf.decode(gen[:-1])
    assert hf.encode(text, add_special_tokens=False) != gen[:-1]
    messages = [user, {"role": "assistant", "content": text, "prompt_token_ids": p0, "generation_token_ids": gen,
                       "generation_log_probs": [-0.5] * len(gen)},
                {"role": "user", "content": "Now add 3 to that."}]
    spliced = PromptBuilder(hf).build(messages, None)
    stock = PromptBuilder(hf, retemplate=True).build(messages, None)
    assert spliced.ids[: len(p0) + len(gen)] == p0 + gen
    plain = [{k: v for k, v in m.items() if not k.endswith("_ids") and k != "generation_log_probs"} for m in messages]
    assert stock.ids == hf.encode(hf.apply_chat_template(plain, tokenize=False, add_generation_prompt=True),
                                  add_special_tokens=False)
    assert stock.ids[: len(p0) + len(gen)] != p0 + gen
    assert stock.anchor == spliced.anchor == (p0, gen)
