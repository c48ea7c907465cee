"""Replay and diff reports: terminal output, and the self-contained HTML page rendered in a real
headless Chromium (Debian `chromium`): page content from the rendered DOM, and a screenshot
decoded and checked to be a real, non-blank picture of the page.

The replay report (`gymtape.replay/1`) comes from :func:`replay_report`: real SmolLM2 token IDs
and pieces, recorded logprobs, replayed = recorded + small noise, one planted bad token; its
metrics follow the definitions of the schema. A real replay of a tiny tape is rendered too,
through replay-score's `replay._replay.replay_tape` with the embedded SmolLM2.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from recorder import tokenizer_identity
from replay import diff_tapes, print_replay, write_diff_html, write_replay_html
from tests.replay.png import read_png
from tests.replay.test_diff import build_diff_tapes

WORST_TEXT = " zebra"  # the planted token: replayed logprob far below the recorded one
WORST_DELTA = -2.5
SIZE = (1280, 2000)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# -- a realistic gymtape.replay/1 report ----------------------------------------------------


def metrics(rec: np.ndarray, rep: np.ndarray, call_of: np.ndarray, bounds: tuple[float, float]) -> dict[str, Any]:
    """The schema's Metrics over tokens with recorded/replayed logprobs (d = replayed - recorded)."""
    n = int(rec.size)
    keys = ("mean_abs_dlogprob", "max_abs_dlogprob", "mean_abs_dprob", "max_abs_dprob", "kl_k1", "kl_k2", "kl_k3",
            "token_mult_prob_error", "seq_is_ratio", "geo_mean_is_ratio", "frac_outside_is_bounds", "chi2", "ess")
    if n == 0:
        return {"tokens": 0, **dict.fromkeys(keys)}
    d = rep.astype(np.float64) - rec
    r = np.exp(d)
    dprob = np.abs(np.exp(rep) - np.exp(rec))
    seq = [float(np.exp(d[call_of == c].sum())) for c in np.unique(call_of)]
    return {"tokens": n, "mean_abs_dlogprob": float(np.abs(d).mean()), "max_abs_dlogprob": float(np.abs(d).max()),
            "mean_abs_dprob": float(dprob.mean()), "max_abs_dprob": float(dprob.max()), "kl_k1": float(np.mean(-d)),
            "kl_k2": float(np.mean(d * d / 2)), "kl_k3": float(np.mean(r - 1 - d)),
            "token_mult_prob_error": float(np.mean(np.exp(np.abs(d)))), "seq_is_ratio": float(np.mean(seq)),
            "geo_mean_is_ratio": float(np.exp(d.mean())),
            "frac_outside_is_bounds": float(np.mean((r < bounds[0]) | (r > bounds[1]))),
            "chi2": float(np.mean((r - 1) ** 2)), "ess": float(r.sum() ** 2 / (n * (r * r).sum()))}


def replay_report(tok: Any, *, n_rollouts: int = 6, long_prompt: bool = False, seed: int = 0) -> dict[str, Any]:
    """A `gymtape.replay/1` report over two-call chat rollouts with real token IDs and pieces."""
    rng = np.random.default_rng(seed)
    bounds = (0.5, 2.0)
    buckets = [0, 16, 64, 256, 1024, 4096]
    answers = ["I will add the numbers with the calculator tool first.",
               "The sum is 12, so the answer is twelve and a zebra of 3 is fine."]
    all_rec, all_rep, all_pos, all_call, rollouts, details, worst = [], [], [], [], [], [], []
    for i in range(n_rollouts):
        rid = f"rollout-{i:02d}"
        system = ("You are a careful assistant. " * (120 if long_prompt and i == 0 else 1)).strip()
        context: list[int] = []
        seg = {"pieces": [], "generated": [], "delta": [], "call_index": [], "recorded": [], "replayed": []}
        calls, r_rec, r_rep, r_call = [], [], [], []
        for k, answer in enumerate(answers):
            turn = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is {i} + 12?<|im_end|>\n"
                    if k == 0 else "\n<|im_start|>tool\n12<|im_end|>\n") + "<|im_start|>assistant\n"
            added = tok.encode(turn, add_special_tokens=False)
            gen = tok.encode(answer, add_special_tokens=False) + [2]
            rec = rng.uniform(-3.0, -0.01, len(gen)).astype(np.float32)
            rep = (rec + rng.normal(0.0, 10.0 ** -(1 + i % 4), len(gen))).astype(np.float32)
            if i == 3 and k == 1:
                j = gen.index(tok.encode(WORST_TEXT, add_special_tokens=False)[0])
                rep[j] = rec[j] + WORST_DELTA
            pos = np.arange(len(gen))
            temp = 1.0
            calls.append({"call_index": k, "temperature": temp, "logprobs_kind": "raw",
                          **metrics(rec, rep, np.zeros(len(gen), int), bounds)})
            for ids, is_gen in ((added, False), (gen, True)):
                seg["pieces"] += [tok.decode([t]) for t in ids]
                seg["generated"] += [is_gen] * len(ids)
                seg["call_index"] += [k] * len(ids)
            seg["delta"] += [None] * len(added) + (rep.astype(np.float64) - rec).tolist()
            seg["recorded"] += [None] * len(added) + rec.tolist()
            seg["replayed"] += [None] * len(added) + rep.tolist()
            for j in range(len(gen)):
                ctx_ids = context + added + gen[:j]
                worst.append({"rollout_id": rid, "call_index": k, "position": j, "token_id": gen[j],
                              "token": tok.decode([gen[j]]), "recorded_logprob": float(rec[j]),
                              "replayed_logprob": float(rep[j]), "delta": float(rep[j]) - float(rec[j]),
                              "before": tok.decode(ctx_ids[-16:])[-40:], "after": tok.decode(gen[j + 1 : j + 12])[:40]})
            context = context + added + gen
            r_rec.append(rec), r_rep.append(rep), r_call.append(np.full(len(gen), k))
            all_pos.append(pos)
        rec_r, rep_r, call_r = np.concatenate(r_rec), np.concatenate(r_rep), np.concatenate(r_call)
        all_rec.append(rec_r), all_rep.append(rep_r), all_call.append(call_r + 10 * i)
        m = metrics(rec_r, rep_r, call_r, bounds)
        rollouts.append({"rollout_id": rid, "env": "math", "task_index": i, "rollout_index": 0,
                         "reward": float(i % 2), **m, "calls": calls})
        details.append({"rollout_id": rid, "max_abs_dlogprob": m["max_abs_dlogprob"], "segments": [seg]})
    rec, rep, pos, call = (np.concatenate(x) for x in (all_rec, all_rep, all_pos, all_call))
    by_position = []
    for lo, hi in zip(buckets, buckets[1:] + [None]):
        sel = (pos >= lo) & (pos < hi) if hi is not None else pos >= lo
        by_position.append({"bucket": f"{lo}-{hi - 1}" if hi else f"{lo}+", "lo": lo, "hi": hi,
                            **metrics(rec[sel], rep[sel], call[sel], bounds)})
    overall = metrics(rec, rep, call, bounds)
    fail_above = {"max_abs_dlogprob": 1.0, "kl_k3": 0.5}
    failures = [f"{k} = {overall[k]:.4g} > {b}" for k, b in fail_above.items() if overall[k] > b]
    details.sort(key=lambda x: -x["max_abs_dlogprob"])
    worst.sort(key=lambda w: -abs(w["delta"]))
    return {"schema": "gymtape.replay/1", "tape": "runs/demo-tape", "mode": "model", "model": "SmolLM2-135M-Instruct",
            "engine_url": None, "device": "cpu", "dtype": "float32",
            "settings": {"is_bounds": list(bounds), "position_buckets": buckets, "fail_above": fail_above},
            "timing": {"tokens": int(rec.size), "seconds": 0.5, "tokens_per_s": rec.size / 0.5},
            "skipped": {"calls_without_tokens": 0, "rollouts_without_tokens": 0},
            "overall": overall, "by_position": by_position, "rollouts": rollouts, "worst_tokens": worst[:20],
            "details": details, "threshold_failures": failures}


@pytest.fixture(scope="module")
def report(tok: Any) -> dict[str, Any]:
    return replay_report(tok)


# -- HTML checks that need no browser -------------------------------------------------------

_RESOURCE = re.compile(r"""(?:\b(?:src|href|srcset|action|poster|data|xlink:href)\s*=\s*["']?\s*(?:https?:)?//)"""
                       r"""|(?:url\(\s*["']?\s*(?:https?:)?//)|(?:@import)""", re.I)


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert not _RESOURCE.search(page), _RESOURCE.search(page)
    for tag in ("<script", "<link", "<img", "<iframe", "<object", "<embed"):
        assert tag not in page.lower(), f"{tag} in a self-contained page"


def test_replay_page_is_self_contained_with_charts_tables_and_coloured_tokens(report: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    path = write_replay_html(report, tmp_path / "sub" / "replay.html")
    page = path.read_text()
    assert_self_contained(page)
    assert "http://" not in page and "https://" not in page
    for chart in ("hist-dlogprob", "bars-position", "hist-rollout-max"):
        assert f'<svg id="{chart}"' in page
    assert "<|im_end|>" not in page and "&lt;|im_end|&gt;" in page, "token text must be escaped"
    # the planted token: darkest colour class, and a hover title with its values
    m = re.search(r'<span class="(d\d)" title="([^"]*)">' + re.escape(WORST_TEXT) + "</span>", page)
    assert m and m.group(1) == "d7", m
    assert "Δ -2.5" in m.group(2) and "recorded" in m.group(2) and "replayed" in m.group(2)
    assert page.count('<span class="p"') > 100  # prompt tokens, grey
    assert 'id="threshold-failures"' in page and "max_abs_dlogprob" in page
    # the rollout table is sorted by max |Δlogprob|: the planted rollout first
    rows = re.findall(r'<tr><td class="l">(rollout-\d\d)</td>', page.split('id="rollouts"')[1])
    assert rows[0] == "rollout-03" and sorted(rows) == [f"rollout-{i:02d}" for i in range(6)]


def test_long_prompts_are_folded_and_engine_urls_are_text_only(tok: Any, tmp_path: Path) -> None:
    r = replay_report(tok, n_rollouts=2, long_prompt=True)
    r.update(mode="engine", model=None, engine_url="http://127.0.0.1:8000/v1")
    page = write_replay_html(r, tmp_path / "r.html").read_text()
    assert_self_contained(page)
    assert "http://127.0.0.1:8000/v1" in page  # shown, never fetched
    assert re.search(r"⋯ [\d,]+ prompt tokens not shown ⋯", page)


def test_terminal_replay_summary_puts_metrics_and_failures_first(report: dict[str, Any]) -> None:
    console = Console(record=True, width=160)
    print_replay(report, console)
    text = console.export_text()
    order = [text.index(s) for s in ("mean |Δlogprob|", "FAIL", "worst rollouts", "worst tokens")]
    assert order == sorted(order)
    assert "rollout-03 #1" in text and WORST_TEXT.strip() in text
    assert f"{report['overall']['max_abs_dlogprob']:.4g} > 1" in text


# -- rendered in headless Chromium ----------------------------------------------------------


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "Debian chromium not installed (apt-get install -y chromium)"
        if os.environ.get("GYMTAPE_REQUIRE_CHROMIUM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def render(page: Path, tmp: Path) -> tuple[str, np.ndarray]:
    """The page's DOM after Chromium rendered it, and a decoded screenshot."""
    exe = chromium()
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}",
              "--no-first-run", "--disable-extensions", "--hide-scrollbars", f"--window-size={SIZE[0]},{SIZE[1]}"]
    env = {**os.environ, "HOME": str(tmp)}
    dom = subprocess.run([*common, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120, env=env, check=True).stdout
    shot = tmp / f"{page.stem}.png"
    subprocess.run([*common, f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, timeout=120,
                   env=env, check=True)
    return dom, read_png(shot)


class Dom(HTMLParser):
    """Element counts by tag / id / class, and the visible text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.ids: set[str] = set()
        self.classes: dict[str, int] = {}
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        for c in (a.get("class") or "").split():
            self.classes[c] = self.classes.get(c, 0) + 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def assert_real_picture(img: np.ndarray) -> None:
    assert img.shape[:2] == (SIZE[1], SIZE[0]), img.shape
    rgb = img[..., :3].astype(np.int16)
    background = np.all(rgb >= 250, axis=-1)
    assert background.mean() < 0.97, "the screenshot is (nearly) blank"
    colours = np.unique(rgb.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 50, "too few colours for text, charts and coloured tokens"
    # content reaches down the page, not just a header line
    rows_with_ink = np.flatnonzero((~background).any(axis=1))
    assert rows_with_ink.max() > SIZE[1] // 2


def keep_screenshot(png: Path) -> None:
    """Copy a screenshot to $GYMTAPE_SCREENSHOT_DIR (when set) for a person to look at."""
    if os.environ.get("GYMTAPE_SCREENSHOT_DIR"):
        shutil.copy(png, Path(os.environ["GYMTAPE_SCREENSHOT_DIR"]) / png.name)


def test_chromium_renders_the_replay_page(report: dict[str, Any], tmp_path: Path) -> None:
    page = write_replay_html(report, tmp_path / "replay.html")
    dom_html, img = render(page, tmp_path)
    dom = Dom(dom_html)
    assert {"hist-dlogprob", "bars-position", "hist-rollout-max", "worst-tokens", "rollouts"} <= dom.ids
    assert dom.tags.get("svg", 0) == 3 and dom.tags.get("rect", 0) >= 8 + 6 + 8
    text = "".join(dom.text)
    assert WORST_TEXT in text and all(f"rollout-{i:02d}" in text for i in range(6))
    assert dom.classes.get("d7", 0) >= 1 and dom.classes.get("p", 0) > 100
    assert "threshold failures" in text
    assert_real_picture(img)
    # the colour of the worst token class (#a50f24) is on screen: the coloured token view rendered
    assert np.any(np.all(img[..., :3] == (0xA5, 0x0F, 0x24), axis=-1))
    keep_screenshot(tmp_path / "replay.png")


def test_chromium_renders_the_diff_page(tok: Any, model_dir: Path, tmp_path: Path) -> None:
    spec = build_diff_tapes(tok, tokenizer_identity(model_dir), tmp_path / "tapes")
    report = diff_tapes(spec["a"], spec["b"], tokenizer=tok).to_dict()
    page = write_diff_html(report, tmp_path / "diff.html")
    assert_self_contained(page.read_text())
    dom_html, img = render(page, tmp_path)
    dom = Dom(dom_html)
    assert {"hist-divergence-offset", "hist-divergence-call", "hist-shared-fraction", "hist-reward-change",
            "divergences", "identical", "only-a", "only-b"} <= dom.ids
    text = "".join(dom.text)
    assert "five, I think." in text and "a-0" in text and "b-only" in text
    assert_real_picture(img)
    keep_screenshot(tmp_path / "diff.png")


# -- a real replay ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_replay_of_a_tiny_tape_renders(model_dir: Path, tok: Any, tmp_path: Path) -> None:
    from recorder import CallRecord, RolloutRecord, TapeWriter
    from replay._replay import replay_tape

    q = tok.encode("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    gen = tok.encode("Hi there! How can I help?", add_special_tokens=False) + [2]
    with TapeWriter(tmp_path / "t", tokenizer=tokenizer_identity(model_dir), flush_seconds=None,
                    handle_signals=False) as w:
        for i in range(2):
            w.add_call(CallRecord(rollout_id=f"r{i}", call_index=0, prompt_ids=q, generation_ids=gen,
                                  generation_logprobs=[-1.0] * len(gen), temperature=1.0, logprobs_kind="raw"))
            w.add_rollout(RolloutRecord(rollout_id=f"r{i}", env="hi", task_index=0, rollout_index=i, reward=1.0))
    rep = replay_tape(tmp_path / "t", model=model_dir, fail_above={"max_abs_dlogprob": 1e-3}).to_dict()
    assert rep["schema"] == "gymtape.replay/1" and rep["overall"]["tokens"] == 2 * len(gen)
    console = Console(record=True, width=160)
    print_replay(rep, console)
    out = console.export_text()
    assert "KL k3" in out and "FAIL max_abs_dlogprob" in out and re.search(rf"tokens\s+{2 * len(gen)}\s", out)
    page = write_replay_html(rep, tmp_path / "real.html")
    assert_self_contained(page.read_text())
    dom_html, img = render(page, tmp_path)  # skips here when chromium is absent
    dom = Dom(dom_html)
    text = "".join(dom.text)
    assert {"hist-dlogprob", "bars-position", "hist-rollout-max", "worst-tokens", "rollouts", "detail-0"} <= dom.ids
    assert "r0" in text and "r1" in text and "threshold failures" in text
    coloured = sum(n for c, n in dom.classes.items() if re.fullmatch(r"d\d", c))
    # every token of both rollouts, plus the legend's swatches (8 colours, 1 prompt)
    assert coloured == 2 * len(gen) + 8 and dom.classes.get("p", 0) == 2 * len(q) + 1
    assert rep["worst_tokens"][0]["token"] in text
    assert_real_picture(img)
    keep_screenshot(tmp_path / "real.png")


def test_empty_reports_render_without_numbers(tmp_path: Path, tok: Any) -> None:
    r = replay_report(tok, n_rollouts=1)
    empty = {**r, "overall": metrics(np.empty(0), np.empty(0), np.empty(0), (0.5, 2.0)), "rollouts": [],
             "worst_tokens": [], "details": [], "by_position": [], "threshold_failures": [],
             "settings": {**r["settings"], "fail_above": {}},
             "skipped": {"calls_without_tokens": 3, "rollouts_without_tokens": 1}}
    page = write_replay_html(empty, tmp_path / "empty.html").read_text()
    assert_self_contained(page)
    assert "skipped 1 rollouts and 3 calls without token IDs" in page and "Worst tokens" not in page
    console = Console(record=True, width=120)
    print_replay(empty, console)
    assert "skipped 1 rollouts / 3 calls" in console.export_text()
    d = {"schema": "gymtape.diff/1", "tape_a": "a", "tape_b": "b", "by": "id", "summary": {}, "pairs": [],
         "unmatched_a": [], "unmatched_b": [], "warnings": ["nothing matched"]}
    page = write_diff_html(d, tmp_path / "d.html").read_text()
    assert_self_contained(page)
    assert "nothing matched" in page
