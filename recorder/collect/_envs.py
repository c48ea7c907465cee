"""Built-in environments: small verifiable tasks that need no NeMo Gym install.

Each environment has Gym-format task files (``datasets/envs/<name>/{train,validation}.jsonl``:
``responses_create_params`` with input messages and tools, plus verifier fields), tools the
agent loop executes, and a verifier that turns the final answer into a reward. They exist so a
user with only gymtape sees the whole loop (serve → record → replay → train) on a laptop.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .._data import env_tasks_path
from .._errors import RecordConfigError, UnknownEnvError

SPLITS = ("train", "validation")
_INT = re.compile(r"-?\d+")


def last_int(text: str | None) -> int | None:
    found = _INT.findall(text or "")
    return int(found[-1]) if found else None


def _json_int(value: int | None) -> int | str | None:
    """An extracted answer as the rollout line stores it: JSON (orjson) holds 64-bit integers,
    and a model may well answer with a longer one; that one is kept as its digits."""
    return str(value) if value is not None and not -(2**63) <= value < 2**63 else value


def _verify_number(task: dict[str, Any], answer: str | None) -> tuple[float, dict[str, Any]]:
    got = last_int(answer)
    expected = int(task["expected_answer"])
    return float(got == expected), {"extracted_answer": _json_int(got)}


_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def safe_eval(expression: str) -> int:
    """Integer arithmetic only (+ - * // %, parentheses): no names, calls or attributes."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Mult) and abs(left) * abs(right) > 10**18:
                raise ValueError("result too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression element: {type(node).__name__}")

    return ev(ast.parse(expression, mode="eval"))


def _calculator(args: dict[str, Any], task: dict[str, Any]) -> str:
    expr = args.get("expression")
    if not isinstance(expr, str):
        return "error: pass {\"expression\": \"<integer arithmetic>\"}"
    try:
        return str(safe_eval(expr))
    except (ValueError, SyntaxError, ZeroDivisionError, RecursionError) as e:
        return f"error: {e}"


CALCULATOR_TOOL = {
    "type": "function",
    "name": "calculator",
    "description": "Evaluate an integer arithmetic expression with + - * // % and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}


@dataclass(frozen=True)
class BuiltinEnv:
    name: str
    description: str
    max_steps: int
    tools: dict[str, Callable[[dict[str, Any], dict[str, Any]], str]]
    verify: Callable[[dict[str, Any], str | None], tuple[float, dict[str, Any]]]
    make_task: Callable[[random.Random], dict[str, Any]]
    #: Which split a generated task may go to (None: any). Lets an env hold out questions, so
    #: its validation split measures questions the training split never asks.
    in_split: Callable[[dict[str, Any], str], bool] | None = None
    #: Multi-turn envs: ``follow_up(task, turn, answer)`` is the environment's next user message
    #: once turn ``turn`` (0-based) ended with the model's ``answer`` text, or None when the
    #: episode is over. The agent loop sends it in the same conversation, after the model's own
    #: turn (carried forward with its token IDs, so the server splices them).
    follow_up: Callable[[dict[str, Any], int, str | None], str | None] | None = None
    #: Multi-turn envs: the reward from every turn's final answer (None: ``verify`` on the last).
    verify_turns: Callable[[dict[str, Any], list[str | None]], tuple[float, dict[str, Any]]] | None = None

    def tasks_path(self, split: str = "train") -> Path:
        if split not in SPLITS:
            raise RecordConfigError(f"split must be one of {SPLITS}, got {split!r}")
        return env_tasks_path(self.name, split)

    def call_tool(self, name: str, args: dict[str, Any], task: dict[str, Any]) -> str:
        tool = self.tools.get(name)
        return tool(args, task) if tool else f"error: no tool named {name!r}; available: {', '.join(self.tools)}"

    def score(self, task: dict[str, Any], answers: list[str | None]) -> tuple[float, dict[str, Any]]:
        """The rollout's reward from the final answer of each turn it reached, in order."""
        if self.verify_turns is not None:
            return self.verify_turns(task, answers)
        return self.verify(task, answers[-1] if answers else None)


def _addition_task(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return {
        "responses_create_params": {"input": [
            {"role": "system", "content": "You are a careful math assistant. End with the final number.", "type": "message"},
            {"role": "user", "content": f"What is {a} + {b}?", "type": "message"},
        ]},
        "expected_answer": str(a + b),
    }


def _calculator_task(rng: random.Random) -> dict[str, Any]:
    a, b, c = rng.randint(11, 99), rng.randint(11, 99), rng.randint(2, 30)
    return {
        "responses_create_params": {"input": [
            {"role": "system", "content": "Use the calculator tool for arithmetic, then give the final number.",
             "type": "message"},
            {"role": "user", "content": f"What is {a} * {b} + {c}?", "type": "message"},
        ], "tools": [CALCULATOR_TOOL]},
        "expected_answer": str(a * b + c),
    }


def _plus_task(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return {
        "responses_create_params": {"input": [
            {"role": "user", "content": f"What is {a} plus {b}?", "type": "message"},
        ]},
        "expected_answer": str(a + b),
    }


def _plus_split(task: dict[str, Any], split: str) -> bool:
    """27 of the 81 (a, b) pairs, those with (a + 2b) % 3 == 0, are validation-only."""
    a, b = map(int, _INT.findall(task["responses_create_params"]["input"][-1]["content"]))
    return ((a + 2 * b) % 3 == 0) == (split == "validation")


def _followup_task(rng: random.Random) -> dict[str, Any]:
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    return {
        "responses_create_params": {"input": [
            {"role": "user", "content": f"What is {a} plus {b}? Answer briefly.", "type": "message"},
        ]},
        "expected_answer": str(a + b + c),
        # The environment's messages after each turn, and the right answer of each turn.
        "follow_ups": [f"Now add {c} to that. What is the total?"],
        "expected_answers": [str(a + b), str(a + b + c)],
    }


def _scripted_follow_up(task: dict[str, Any], turn: int, answer: str | None) -> str | None:
    """The task's ``follow_ups[turn]``: the same next question whatever the answer was (the
    question refers to "that", the model's previous answer, in the conversation itself)."""
    follow_ups = task.get("follow_ups") or []
    return follow_ups[turn] if turn < len(follow_ups) else None


def _verify_each_turn(task: dict[str, Any], answers: list[str | None]) -> tuple[float, dict[str, Any]]:
    """Equal shares per turn: the last integer of each turn's answer against that turn's right
    answer (the true running total, whatever the model said before); a turn not reached scores 0."""
    expected = [int(x) for x in task["expected_answers"]]
    got = [last_int(a) for a in answers[: len(expected)]]
    got += [None] * (len(expected) - len(got))
    turn_rewards = [float(g == e) for g, e in zip(got, expected)]
    return sum(turn_rewards) / len(expected), {"extracted_answers": [_json_int(g) for g in got],
                                               "turn_rewards": turn_rewards}


BUILTIN_ENVS: dict[str, BuiltinEnv] = {
    "addition": BuiltinEnv("addition", "single step: add two numbers, verified by the last integer in the answer",
                           max_steps=1, tools={}, verify=_verify_number, make_task=_addition_task),
    "calculator": BuiltinEnv("calculator", "multi-step: call a calculator tool, then answer; verified like addition",
                             max_steps=4, tools={"calculator": _calculator}, verify=_verify_number,
                             make_task=_calculator_task),
    # The training demo's task (`gymtape train`, docs/trainer-bridge.md): the embedded SmolLM2-135M
    # knows single-digit sums but mostly starts explaining ("To find 8 plus 6, we ...") and runs
    # out of tokens before the number. With max_tokens 32 (`gymtape train`'s default) it scores
    # 0.14 sampled and 0.36 greedy on the validation split; answering first ("8 + 6 = 14") is a
    # behaviour GRPO learns within tens of steps.
    "plus": BuiltinEnv("plus", "single step: add two digits asked in words ('What is 8 plus 6?'), no system prompt; "
                       "verified by the last integer in the answer; validation asks pairs training never does",
                       max_steps=1, tools={}, verify=_verify_number, make_task=_plus_task, in_split=_plus_split),
    # The multi-turn training demo (docs/trainer-bridge.md): `plus`'s question, then the
    # environment's follow-up "Now add 4 to that. What is the total?", which only the
    # conversation says what "that" is: two model calls per rollout, the second one's prompt
    # holding the first one's tokens (gymtape serve splices them). Half the reward per turn; turn 2
    # is checked against the true total. SmolLM2-135M answers turn 1 like `plus` (often cut off
    # at 32 tokens, which ends the episode) and, when it gets to turn 2, mostly adds the new
    # number to the wrong one.
    "followup": BuiltinEnv("followup", "multi-turn: 'What is 3 plus 5?', then the env's follow-up 'Now add 4 to that. "
                           "What is the total?'; half the reward per turn, each turn verified by the last integer "
                           "of its answer against the true running total; validation asks pairs training never does",
                           max_steps=2, tools={}, verify=_verify_number, make_task=_followup_task,
                           in_split=_plus_split, follow_up=_scripted_follow_up, verify_turns=_verify_each_turn),
}


def builtin_env(name: str) -> BuiltinEnv:
    try:
        return BUILTIN_ENVS[name]
    except KeyError:
        raise UnknownEnvError(f"no built-in environment {name!r}; built-in: {', '.join(BUILTIN_ENVS)}") from None


def make_tasks(env: BuiltinEnv, split: str, n: int) -> list[dict[str, Any]]:
    """The bundled task files, reproducibly: the split name seeds the generator."""
    rng = random.Random(f"{env.name}/{split}")
    if env.in_split is None:
        return [env.make_task(rng) for _ in range(n)]
    tasks: list[dict[str, Any]] = []
    while len(tasks) < n:
        task = env.make_task(rng)
        if env.in_split(task, split):
            tasks.append(task)
    return tasks
