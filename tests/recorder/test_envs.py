"""Built-in environments: tools are safe, verifiers are exact, bundled task files are reproducible."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
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


# -- followup: the multi-turn env ---------------------------------------------------------------


def _followup_tasks(split: str) -> list[dict]:
    return [orjson.loads(x) for x in builtin_env("followup").tasks_path(split).read_bytes().splitlines()]


def test_followup_tasks_ask_a_sum_then_add_to_it_and_validation_holds_out_pairs() -> None:
    def pairs(split: str) -> set[tuple[int, int]]:
        out = set()
        for t in _followup_tasks(split):
            a, b = map(int, re.findall(r"\d+", t["responses_create_params"]["input"][-1]["content"]))
            (follow_up,) = t["follow_ups"]
            (c,) = map(int, re.findall(r"\d+", follow_up))
            assert follow_up == f"Now add {c} to that. What is the total?"
            assert t["expected_answers"] == [str(a + b), str(a + b + c)] and t["expected_answer"] == str(a + b + c)
            out.add((a, b))
        return out

    train, validation = pairs("train"), pairs("validation")
    assert not train & validation and len(train) == 54 and len(validation) >= 20


def test_followup_asks_its_next_question_once_then_ends() -> None:
    env = builtin_env("followup")
    task = _followup_tasks("train")[0]
    assert env.follow_up is not None and env.max_steps == 2
    assert env.follow_up(task, 0, "whatever the model said") == task["follow_ups"][0]
    assert env.follow_up(task, 1, "12") is None
    assert all(e.follow_up is None for name, e in BUILTIN_ENVS.items() if name != "followup")


@pytest.mark.parametrize("answers, reward, turns", [
    (["3 + 5 = 8", "8 + 4 = 12."], 1.0, [1.0, 1.0]),
    (["8", "13"], 0.5, [1.0, 0.0]),
    (["7", "The total is 12"], 0.5, [0.0, 1.0]),  # turn 2 is checked against the true total
    (["8"], 0.5, [1.0, 0.0]),  # turn 2 never reached (turn 1 cut off)
    ([], 0.0, [0.0, 0.0]),
    ([None, None], 0.0, [0.0, 0.0]),
])
def test_followup_rewards_half_per_turn(answers: list, reward: float, turns: list) -> None:
    task = {"expected_answer": "12", "expected_answers": ["8", "12"], "follow_ups": ["Now add 4 to that. What is the total?"]}
    got, extras = builtin_env("followup").score(task, answers)
    assert (got, extras["turn_rewards"]) == (reward, turns)
    assert extras["extracted_answers"] == [last_int(a) for a in answers] + [None] * (2 - len(answers))


def test_single_turn_envs_score_their_last_answer() -> None:
    env = builtin_env("plus")
    assert env.score({"expected_answer": "14"}, ["8 + 6 = 14"]) == env.verify({"expected_answer": "14"}, "8 + 6 = 14")
    assert env.score({"expected_answer": "14"}, []) == (0.0, {"extracted_answer": None})


@pytest.mark.slow
def test_followup_rollouts_through_gymtape_serve_splice_the_first_turn_into_the_second(
        model_dir: Path, tmp_path: Path) -> None:
    """A real record run: each rollout is two calls, the env's follow-up recorded as a Gym user
    message item, and the second call's prompt is the first call's prompt + generation (the
    splice), followed by the follow-up turn; `check` finds nothing to report."""
    from recorder import Tape, iter_gym_lines
    from replay import check_tape
    from tests.servers import record_greedy_followup

    tape = tmp_path / "tape"
    record_greedy_followup(tmp_path, model_dir, tape, concurrency=1)

    t = Tape(tape)
    tasks = _followup_tasks("validation")
    lines = sorted(iter_gym_lines(t), key=lambda ln: ln["_ng_task_index"])
    assert [ln["_ng_task_index"] for ln in lines] == [0, 1, 2]
    for line in lines:
        task = tasks[line["_ng_task_index"]]
        first, user, second = line["response"]["output"]
        # the env's message, as a Responses input item (Gym's converter makes it a user message again)
        assert user == {"type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": task["follow_ups"][0]}]}
        assert all(it["role"] == "assistant" and it["generation_token_ids"] for it in (first, second))
        texts = [it["content"][0]["text"] for it in (first, second)]
        reward, extras = builtin_env("followup").score(task, texts)
        assert line["reward"] == reward and line["turn_rewards"] == extras["turn_rewards"]

    index = t.calls_by_rollout(("new_messages_json",))
    assert len(index.rollout_ids()) == 3
    for rid in index.rollout_ids():
        calls = index.get(rid)
        assert calls["call_index"] == [0, 1]
        p0, g0, p1 = calls["prompt_ids"][0], calls["generation_ids"][0], calls["prompt_ids"][1]
        head = np.concatenate([p0, g0])
        # the splice: call 1 starts with exactly the tokens call 0 saw and produced
        assert calls["prefix_len"][1] == head.size and np.array_equal(p1[: head.size], head)
        assert p1.size > head.size  # ... then the env's user turn and the generation prompt
        sent = orjson.loads(calls["new_messages_json"][1])
        assert [m["role"] for m in sent] == ["assistant", "user"]

    d = check_tape(t).to_dict()
    assert d["ok"] and d["problems"] == 0 and d["checkable_calls"] == 6 and d["off_policy_fraction"] == 0.0, d["examples"]


@pytest.mark.parametrize("name", ["plus", "followup"])
def test_an_answer_longer_than_64_bits_is_scored_and_stays_json(name: str) -> None:
    """Seen in a training run: a sampled answer ended in a 30-digit number, and the rollout line
    could not be written (orjson holds 64-bit integers), which stopped the whole run."""
    huge = "9" * 30
    task = {"expected_answer": "12", "expected_answers": ["8", "12"]}
    reward, extras = builtin_env(name).score(task, ["8", f"The total is {huge}"])
    assert reward == (0.5 if name == "followup" else 0.0)
    assert huge in orjson.dumps(extras).decode()
