"""Built-in environments: tools are safe, verifiers are exact, bundled task files are reproducible."""

from __future__ import annotations

import re

import orjson
import pytest

from recorder.collect._envs import BUILTIN_ENVS, SPLITS, builtin_env, last_int, make_tasks, safe_eval


def test_calculator_evaluates_integer_arithmetic_only() -> None:
    assert safe_eval("(41 * 61) + 2 - 7 // 2 % 3") == 41 * 61 + 2 - 7 // 2 % 3
    for bad in ("__import__('os')", "a + 1", "2 ** 10", "1.5 * 2", "[1][0]", "9" * 12 + " * " + "9" * 12):
        with pytest.raises((ValueError, SyntaxError)):
            safe_eval(bad)


def test_calculator_tool_answers_errors_as_text() -> None:
    env = builtin_env("calculator")
    assert env.call_tool("calculator", {"expression": "6 * 7"}, {}) == "42"
    assert env.call_tool("calculator", {"expression": "1 // 0"}, {}).startswith("error:")
    assert env.call_tool("calculator", {}, {}).startswith("error:")
    assert "no tool named" in env.call_tool("rm", {}, {})


@pytest.mark.parametrize("answer, reward", [("The answer is 42.", 1.0), ("42, or maybe 41", 0.0), ("forty-two", 0.0),
                                            (None, 0.0), ("-42", 0.0)])
def test_verifier_rewards_the_last_integer(answer: str | None, reward: float) -> None:
    got, extras = builtin_env("addition").verify({"expected_answer": "42"}, answer)
    assert got == reward and extras["extracted_answer"] == last_int(answer)


@pytest.mark.parametrize("name", sorted(BUILTIN_ENVS))
@pytest.mark.parametrize("split", SPLITS)
def test_bundled_task_files_match_their_generator(name: str, split: str) -> None:
    env = builtin_env(name)
    lines = [orjson.loads(x) for x in env.tasks_path(split).read_bytes().splitlines()]
    assert lines == make_tasks(env, split, len(lines)) and len(lines) >= 64
    assert all("expected_answer" in t and t["responses_create_params"]["input"] for t in lines)


def test_plus_validation_asks_only_pairs_training_never_does() -> None:
    env = builtin_env("plus")

    def pairs(split: str) -> set[tuple[int, ...]]:
        lines = [orjson.loads(x) for x in env.tasks_path(split).read_bytes().splitlines()]
        texts = [t["responses_create_params"]["input"][-1]["content"] for t in lines]
        asked = [tuple(map(int, re.findall(r"\d+", text))) for text in texts]
        assert all(int(t["expected_answer"]) == sum(pair) for t, pair in zip(lines, asked))
        return set(asked)

    train, validation = pairs("train"), pairs("validation")
    # 54 training pairs, 27 validation-only ones (64 validation tasks draw 23 of them)
    assert not train & validation and len(train) == 54 and len(validation) >= 20
    assert env.verify({"expected_answer": "14"}, "8 + 6 = 14") == (1.0, {"extracted_answer": 14})
