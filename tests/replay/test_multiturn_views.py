"""Multi-turn rollouts where a user looks: `gymtape inspect` counts the calls per rollout and the
prompt tokens the splice reused, and the replay HTML page marks each call's turn (where its
generation starts and ends, where the environment's text begins).

The real case is a tape recorded through `gymtape serve` (embedded SmolLM2-135M, hf engine) on
the built-in multi-turn `followup` env: every expected figure is recomputed here from the calls'
own token IDs, independently of `summarize`."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from cli import app
from recorder import Tape, gym_jsonl_size, summarize
from replay import print_summary, write_replay_html
from replay._render import _token_view
from tests.replay.test_html import assert_self_contained

# -- a real recorded multi-call tape ----------------------------------------------------------------


@pytest.fixture(scope="module")
def followup_tape(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three `followup` rollouts recorded through `gymtape serve`; greedy, these validation
    tasks get a short first answer, so each reaches its second call (as in tests/recorder/test_envs.py)."""
    from tests.servers import record_greedy_followup

    tmp = tmp_path_factory.mktemp("followup")
    tape = tmp / "tape"
    record_greedy_followup(tmp, model_dir, tape)
    return tape


def _calls(tape: Path) -> dict[str, dict[str, Any]]:
    """Rollout id -> its calls (lists by call, prompts rebuilt in full)."""
    index = Tape(tape).calls_by_rollout()
    return {rid: index.get(rid) for rid in index.rollout_ids()}


@pytest.mark.slow
def test_inspect_counts_calls_per_rollout_and_the_prompt_tokens_the_splice_reused(followup_tape: Path) -> None:
    calls = list(_calls(followup_tape).values())
    assert [c["call_index"] for c in calls] == [[0, 1]] * 3
    # recomputed from the token IDs: call 1's prompt starts with call 0's prompt + generation
    heads = [np.concatenate([c["prompt_ids"][0], c["generation_ids"][0]]) for c in calls]
    for c, head in zip(calls, heads):
        assert np.array_equal(c["prompt_ids"][1][: head.size], head)
    reused = sum(h.size for h in heads)
    later_prompts = sum(c["prompt_ids"][1].size for c in calls)
    sampled = sum(c["generation_ids"][0].size for c in calls)

    s = summarize(Tape(followup_tape), jsonl_size=gym_jsonl_size)
    assert s["calls_per_rollout"] == {"mean": 2.0, "min": 2, "max": 2, "rollouts_by_calls": {"2": 3}}
    assert s["splice"] == {"later_calls": 3, "later_prompt_tokens": later_prompts, "reused_tokens": reused,
                           "reused_generation_tokens": sampled, "whole_context_calls": 3,
                           "reused_share": reused / later_prompts}
    assert 0.5 < s["splice"]["reused_share"] < 1.0  # the env's follow-up turn is the rest

    # the CLI: the table and its JSON
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", str(followup_tape), "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["splice"] == s["splice"] and d["calls_per_rollout"] == s["calls_per_rollout"]
    console = Console(record=True, width=200)
    print_summary(s, console)
    text = console.export_text()
    assert re.search(r"calls per rollout\s+│\s+2\.00 mean \(3 × 2 calls\)", text), text
    assert re.search(rf"splice: prompt tokens reused\s+│\s+{reused:,} of {later_prompts:,} "
                     rf"\({reused / later_prompts:.1%}\) in later calls", text), text
    assert re.search(rf"sampled tokens among them\s+│\s+{sampled:,} \(the previous turn's\)", text)
    assert re.search(r"whole previous context kept\s+│\s+3 of 3 calls", text)


class _Tokens(HTMLParser):
    """The token view of each `details` block: a list of (kind, text) where kind is a token's
    class, or "turn" for a divider."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.views: list[list[tuple[str, str]]] = []
        self._cls: str | None = None
        self._in_tokens = False
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "details":
            self.views.append([])
        elif tag == "div" and a.get("class") == "tokens":
            self._in_tokens = True
        elif tag == "span" and self._in_tokens:
            self._cls = a.get("class")

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._in_tokens = False
        self._cls = None if tag == "span" else self._cls

    def handle_data(self, data: str) -> None:
        if self._in_tokens and self._cls is not None:
            self.views[-1].append((self._cls, data))


def _runs(view: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive tokens of one kind joined; dividers kept one by one."""
    out: list[tuple[str, str]] = []
    for kind, text in view:
        kind = "gen" if re.fullmatch(r"d\d|n", kind) else kind
        if out and kind == out[-1][0] and kind != "turn":
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


@pytest.mark.slow
def test_the_replay_page_marks_each_turn_of_a_recorded_multi_call_rollout(followup_tape: Path, model_dir: Path,
                                                                         tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from replay._replay import replay_tape

    tok = AutoTokenizer.from_pretrained(model_dir)
    report = replay_tape(followup_tape, model=model_dir).to_dict()
    page = write_replay_html(report, tmp_path / "replay.html").read_text()
    assert_self_contained(page)
    assert "turn boundary" in page.split('class="legend"')[1].split("</div>")[0]

    def shown(ids: np.ndarray) -> str:  # as the page shows tokens: one piece each, newlines marked
        return "".join(p.replace("\n", "↵\n") or "∅" for p in tok.batch_decode(ids.reshape(-1, 1).tolist()))

    by_id = _calls(followup_tape)
    views = _Tokens(page).views
    assert len(views) == len(report["details"]) == 3
    for detail, view in zip(report["details"], views):
        c = by_id[detail["rollout_id"]]
        p0, g0, p1, g1 = c["prompt_ids"][0], c["generation_ids"][0], c["prompt_ids"][1], c["generation_ids"][1]
        runs = _runs(view)
        kinds = [k for k, _ in runs]
        assert kinds == ["turn", "p", "turn", "gen", "turn", "e", "turn", "gen", "turn"], kinds
        labels = [t for k, t in runs if k == "turn"]
        assert labels[0] == "prompt of call 0"
        assert labels[1] == "▼ call 0: generation (sampled)"
        assert labels[2].startswith("▲ end of call 0 · environment + chat template text (prompt of call 1")
        assert labels[3] == "▼ call 1: generation (sampled)"
        assert labels[4] == "▲ end of call 1"
        # each run is exactly its tokens: the prompt, turn 1, the env's text, turn 2
        texts = [t for k, t in runs if k != "turn"]
        assert texts == [shown(p0), shown(g0), shown(p1[p0.size + g0.size:]), shown(g1)]
        assert "Now add" in texts[2] and "<|im_start|>user" in texts[2]


# -- no server needed ---------------------------------------------------------------------------------


def test_single_call_rollouts_get_no_turn_marks_and_summaries_say_no_second_call(make_tape: Any) -> None:
    seg = {"pieces": ["a", "b", "c"], "generated": [False, True, True], "delta": [None, 0.0, 0.0],
           "call_index": [-1, 0, 0]}
    assert 'class="turn"' not in _token_view([seg]) and 'class="e"' not in _token_view([seg])
    tape, _ = make_tape(calls=1, repeats=1)
    s = summarize(Tape(tape))
    assert s["calls_per_rollout"]["rollouts_by_calls"] == {"1": s["rollouts"]} and s["calls_per_rollout"]["max"] == 1
    assert s["splice"]["later_calls"] == 0 and s["splice"]["reused_share"] is None
    console = Console(record=True, width=200)
    print_summary(s, console)
    assert "no rollout has a second call" in console.export_text()


def test_a_rewritten_history_keeps_less_than_the_whole_previous_context(make_tape: Any) -> None:
    """Synthetic 4-call rollouts, every second one rewriting its history at call 2: those calls
    keep a shorter prefix, and the counts say so."""
    tape, _ = make_tape(calls=4, repeats=2, rewrite_every=2)
    s = summarize(Tape(tape))
    n = s["rollouts"]
    assert s["calls_per_rollout"] == {"mean": 4.0, "min": 4, "max": 4, "rollouts_by_calls": {"4": n}}
    sp = s["splice"]
    assert sp["later_calls"] == 3 * n and sp["whole_context_calls"] == 3 * n - n // 2
    calls = list(_calls(tape).values())
    assert sp["reused_tokens"] == sum(int(x) for c in calls for x in c["prefix_len"][1:])
    assert sp["later_prompt_tokens"] == sum(p.size for c in calls for p in c["prompt_ids"][1:])


def test_dividers_sit_between_a_generation_and_the_environment_text() -> None:
    seg = {"pieces": ["Q", "A1", "A2", "T", "F", "B1"], "generated": [False, True, True, False, False, True],
           "delta": [None, 0.0, 0.0, None, None, 0.0], "call_index": [-1, 0, 0, -1, -1, 1]}
    html = _token_view([seg])
    order = [m.group(0) for m in re.finditer(r'<span class="(turn|p|e|d\d)"[^>]*>[^<]*</span>', html)]
    kinds = [re.match(r'<span class="([^"]+)"', x).group(1) for x in order]
    assert kinds == ["turn", "p", "turn", "d0", "d0", "turn", "e", "e", "turn", "d0", "turn"], kinds
    assert 'title="environment/template text, prompt of call 1' in html
