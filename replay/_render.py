"""Reports of every gymtape command: rich terminal summaries, and self-contained HTML for
`gymtape replay` and `gymtape diff`.

Every renderer takes the JSON-ready dict its command prints with ``--json`` (``summarize`` for
`inspect`, ``CheckReport.to_dict()`` for `check`, ``gymtape.replay/1`` from
:mod:`replay._replay`, ``gymtape.diff/1`` from :func:`replay.diff_tapes`), so a report saved as
JSON renders the same later. The terminal puts the numbers that decide "is this tape trainable / did it change?"
first (overall metrics and threshold failures), then where it goes wrong (worst rollouts, worst
tokens with their context). The HTML page adds what a terminal cannot show: every token of the
worst rollouts coloured by |Δlogprob|, and histograms. It is one file with inline CSS and
SVG, no scripts and no external resources, so it opens offline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from recorder import write_bytes_atomic

from ._html import (DELTA_COLOURS, DELTA_EDGES, bar_chart, cards, decade, delta_classes, esc, fmt, legend, page, table,
                    token_html)

#: Metric keys of a replay report, in display order, with their labels.
METRICS: tuple[tuple[str, str], ...] = (
    ("tokens", "tokens"),
    ("mean_abs_dlogprob", "mean |Δlogprob|"),
    ("max_abs_dlogprob", "max |Δlogprob|"),
    ("mean_abs_dprob", "mean |Δprob|"),
    ("max_abs_dprob", "max |Δprob|"),
    ("kl_k1", "KL k1"),
    ("kl_k2", "KL k2"),
    ("kl_k3", "KL k3"),
    ("token_mult_prob_error", "token mult. prob error"),
    ("seq_is_ratio", "seq IS ratio"),
    ("geo_mean_is_ratio", "geo-mean IS ratio"),
    ("frac_outside_is_bounds", "outside IS bounds"),
    ("chi2", "χ²"),
    ("ess", "ESS"),
)
_LABELS = dict(METRICS)
#: Rows shown in HTML tables before the rest is summarised as a count.
_HTML_ROWS = 500
#: Consecutive prompt tokens beyond this are folded (first/last ones kept) in the token view.
_PROMPT_RUN = 400
_PROMPT_HEAD, _PROMPT_TAIL = 100, 200


def _write(path: str | os.PathLike[str], text: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, text.encode("utf-8"))
    return out


def _failing(report: dict[str, Any], metrics: dict[str, Any]) -> dict[str, float]:
    """Metric → bound, for the metrics above their ``fail_above`` bound."""
    bounds = (report.get("settings") or {}).get("fail_above") or {}
    out = {}
    for k, bound in bounds.items():
        v = metrics.get(k)
        if isinstance(v, (int, float)) and bound is not None and (math.isnan(v) or v > bound):
            out[k] = bound
    return out


def _oneline(s: str | None) -> str:
    return (s or "").replace("\n", "↵").replace("\r", "␍").replace("\t", "→")


def _where(v: dict[str, Any]) -> str:
    """A divergence point in a few characters: "call 1 gen +3" is 3 tokens into call 1's generation."""
    return f"call {v['call_index']} {'gen' if v['part'] == 'generation' else 'prompt'} +{v['offset_in_call']}"


def _bucket_start(b: dict[str, Any]) -> str:
    """Axis label of a position bucket: its first position; the open last bucket gets a ≥."""
    return f"≥{b.get('lo')}" if b.get("hi") is None else str(b.get("lo"))


def _key(p: dict[str, Any]) -> str:
    if p.get("task_index") is None:
        return str(p.get("rollout_id_a") or p.get("rollout_id"))
    return f"{p.get('env') or '-'}/{p['task_index']}/{p.get('rollout_index')}"


# == inspect and check: terminal ===============================================================


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """Print a tape summary (:func:`recorder.summarize`, `gymtape inspect`): sizes, then rewards by group."""
    s = summary

    def num(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:,.3f}" if isinstance(v, float) else f"{v:,}"

    top = Table(title=f"tape {s['tape']} (format v{s['format_version']})", show_header=False, title_justify="left")
    top.add_column(style="bold")
    top.add_column(justify="right")
    stored_ratio = s["stored_tokens"] / max(1, s["prompt_tokens"] + s["generation_tokens"])
    rows = [
        ("rollouts", num(s["rollouts"])),
        ("calls", num(s["calls"])),
        *_turn_rows(s),
        ("prompt tokens (full prompts)", num(s["prompt_tokens"])),
        ("generation tokens", num(s["generation_tokens"])),
        ("tokens stored (delta-encoded)", f"{num(s['stored_tokens'])}  ({stored_ratio:.1%} of prompt+generation)"),
        ("tape bytes", num(s["tape_bytes"])),
    ]
    if "gym_jsonl_bytes" in s:
        ratio = s["compression_ratio"]
        rows.append(("equivalent Gym JSONL bytes", f"{num(s['gym_jsonl_bytes'])}  ({ratio:.1f}x the tape)" if ratio else "-"))
    rows += [
        ("mean reward", num(s["mean_reward"])),
        ("status", ", ".join(f"{k}: {v}" for k, v in s["status"].items()) or "-"),
        ("token fields", ", ".join(f"{k}: {v}" for k, v in s["token_status"].items()) or "-"),
        ("policy versions", f"{num(s['policy_versions']['min'])} .. {num(s['policy_versions']['max'])}"),
        ("shards", ", ".join(f"{t}: {v['count']} ({num(v['bytes'])} B)" for t, v in s["shards"].items())),
        ("writers", f"{len(s['writers']['seen'])} ({len(s['writers']['not_closed'])} not closed cleanly)"),
    ]
    integrity = s.get("integrity")
    if integrity is not None:
        bad = integrity["missing_calls"] + integrity["incomplete"]
        rows.append(("integrity", ("[red]" if bad else "") +
                     f"{integrity['missing_calls']:,} rollout(s) missing calls, {integrity['incomplete']:,} incomplete"
                     + ("[/]" if bad else "") + f", {integrity['superseded']:,} superseded by a retry"))
    if s["temp_files"]:
        rows.append(("temporary files (ignored)", str(len(s["temp_files"]))))
    superseded = s.get("superseded", {})
    if any(v["count"] for v in superseded.values()):
        rows.append(("superseded shards (not read, awaiting deletion)",
                     ", ".join(f"{t}: {v['count']} ({num(v['bytes'])} B)" for t, v in superseded.items())))
    for k, v in rows:
        top.add_row(k, v)
    console.print(top)
    groups = Table(title=f"reward by group ({s['num_groups']} groups)", title_justify="left")
    for col in ("group", "rollouts", "mean", "std", "min", "max"):
        groups.add_column(col, justify="left" if col == "group" else "right")
    shown = s["groups"][:20]
    for g in shown:
        groups.add_row(str(g["group_key"]), num(g["rollouts"]), num(g["mean"]), num(g["std"]), num(g["min"]), num(g["max"]))
    if len(s["groups"]) > len(shown):
        groups.caption = f"first {len(shown)} of {s['num_groups']}; --json lists all"
    console.print(groups)
    if integrity is not None:
        _print_broken(integrity.get("broken_rollouts") or [], console)


def _turn_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """Inspect's multi-turn rows: calls per rollout, and the later calls' prompt tokens the splice
    reused (absent from summaries saved before these fields existed)."""
    rows: list[tuple[str, str]] = []
    cpr = s.get("calls_per_rollout")
    if cpr and cpr.get("mean") is not None:
        hist = ", ".join(f"{c:,} × {n} call{'s' if n != '1' else ''}" for n, c in cpr["rollouts_by_calls"].items())
        rows.append(("calls per rollout", f"{cpr['mean']:.2f} mean ({hist})"))
    sp = s.get("splice")
    if sp and sp["later_calls"]:
        rows += [("splice: prompt tokens reused",
                  f"{sp['reused_tokens']:,} of {sp['later_prompt_tokens']:,} ({sp['reused_share']:.1%}) "
                  "in later calls"),
                 ("  sampled tokens among them", f"{sp['reused_generation_tokens']:,} (the previous turn's)"),
                 ("  whole previous context kept", f"{sp['whole_context_calls']:,} of {sp['later_calls']:,} calls")]
    elif sp is not None:
        rows.append(("splice: prompt tokens reused", "- (no rollout has a second call)"))
    return rows


def print_check(report: dict[str, Any], console: Console, *, warnings_to: Console | None = None) -> None:
    """Print a `gymtape check` report (``CheckReport.to_dict()``): totals, then the first problems.

    Warnings go to ``warnings_to`` (the CLI's standard error) when given, else to ``console``.
    """
    d = report
    top = Table(title=f"check {d['tape']}", show_header=False, title_justify="left")
    top.add_column(style="bold")
    top.add_column(justify="right")
    frac = d["off_policy_fraction"]
    rows = [
        ("rollouts", f"{d['rollouts']:,} ({d['rollouts_with_problems']:,} with problems)"),
        ("calls", f"{d['calls']:,} ({d['checkable_calls']:,} re-templated, {d['not_checkable']:,} not checkable)"),
        ("off-policy if re-templated", "-" if frac is None else
         f"{frac:.1%} of {d['checkable_generated_tokens']:,} generated tokens"),
    ]
    if "rollout_rows" in d:
        rows.append(("rollout rows", f"{d['rollout_rows']:,} ({d['rollouts_missing_calls']:,} missing calls, "
                                     f"{d['rollouts_incomplete']:,} incomplete, {d['rollouts_superseded']:,} "
                                     "superseded by a retry)"))
    rows += [(f"problem: {k}", f"{v:,}") for k, v in d["totals"].items()]
    rows.append(("re-template causes", ", ".join(f"{k}: {v}" for k, v in d["retemplate_categories"].items() if v) or "-"))
    rows.append(("re-tokenization kinds", ", ".join(f"{k}: {v}" for k, v in d["retokenization_kinds"].items() if v) or "-"))
    rows.append(("checked in", f"{d['elapsed_s']:.2f} s"))
    for k, v in rows:
        top.add_row(k, v)
    console.print(top)
    for w in d["warnings"]:
        (warnings_to or console).print(f"[yellow]warning:[/] {w}", highlight=False)
    if d["examples"]:
        ex = Table(title="first problems", title_justify="left", show_lines=True)
        for col in ("type", "rollout / call", "what", "context"):
            ex.add_column(col, overflow="fold")
        for p in d["examples"][:12]:
            ctx = [f"before: {p['before'][-40:]!r}"] if "before" in p else []
            for side in ("recorded", "template", "generated", "reencoded", "previous", "prompt"):
                if side in p:
                    ctx.append(f"{side}: {p[side]['text']!r} {p[side]['tokens'][:6]}")
            where = "-" if p["rollout_id"] is None else (
                p["rollout_id"] if p["call_index"] is None else f"{p['rollout_id']} #{p['call_index']}")
            ex.add_row(p["type"], where, p["message"], "\n".join(ctx) or "-")
        console.print(ex)
    _print_broken(d.get("broken_rollouts") or [], console)


def _print_broken(broken: list[dict[str, Any]], console: Console, limit: int = 20) -> None:
    """Name the rollouts that point at missing calls or are incomplete (check and inspect)."""
    if not broken:
        return
    t = Table(title=f"rollouts missing calls or incomplete ({len(broken)}): trainers skip them; "
                    "re-run them with gymtape record --resume --retry-failed", title_justify="left")
    for col in ("rollout", "env / task / repeat", "problem", "calls found / num_calls"):
        t.add_column(col, overflow="fold")
    for b in broken[:limit]:
        t.add_row(str(b["rollout_id"]), f"{b.get('env') or '-'} / {b.get('task_index')} / {b.get('rollout_index')}",
                  b["problem"], f"{b['calls_found']} / {b['num_calls']}")
    if len(broken) > limit:
        t.caption = f"first {limit} of {len(broken)}; --json lists all"
    console.print(t)


# == replay: terminal ========================================================================


def print_replay(report: dict[str, Any], console: Console, *, top: int = 10) -> None:
    """Print a ``gymtape.replay/1`` report: overall metrics and failures, then where it is worst."""
    r = report
    overall = r.get("overall") or {}
    fails = _failing(r, overall)
    t = r.get("timing") or {}
    what = r.get("model") or r.get("engine_url") or "-"
    dev = " ".join(x for x in (r.get("device"), r.get("dtype")) if x)
    head = Text.assemble(("replay ", "bold"), (str(r.get("tape")), "bold cyan"),
                         f"  {r.get('mode')}: {what}" + (f" ({dev})" if dev else ""))
    if t.get("tokens") is not None:
        head.append(f"  {t['tokens']:,} tokens in {t.get('seconds') or 0:.2f} s "
                    f"({t.get('tokens_per_s') or 0:,.0f} tok/s)")
    console.print(head)
    skipped = r.get("skipped") or {}
    if any(skipped.values()):
        console.print(f"[yellow]skipped[/] {skipped.get('rollouts_without_tokens', 0)} rollouts / "
                      f"{skipped.get('calls_without_tokens', 0)} calls without token IDs", highlight=False)
    for w in r.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)

    m = Table(title="overall", title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    for _ in range(3):
        m.add_column(style="bold")
        m.add_column(justify="right")
    cells: list[tuple[str, Text]] = []
    for k, label in METRICS:
        v = overall.get(k)
        style = "bold red" if k in fails else ""
        cells.append((label, Text(fmt(v) + (f" > {fmt(fails[k])}" if k in fails else ""), style=style)))
    for i in range(0, len(cells), 3):
        row: list[Any] = []
        for label, val in cells[i : i + 3]:
            row += [label, val]
        m.add_row(*row)
    console.print(m)
    for f in r.get("threshold_failures") or []:
        console.print(Text("FAIL ", style="bold red") + Text(str(f), style="red"))
    if not r.get("threshold_failures") and (r.get("settings") or {}).get("fail_above"):
        console.print(Text("all thresholds passed", style="green"))

    pos = Table(title="by position in the call's generation", title_justify="left")
    for c in ("tokens", "mean |Δlogprob|", "max |Δlogprob|", "KL k3", "outside IS bounds"):
        pos.add_column(c, justify="right")
    pos.add_column("position", justify="left")
    for b in r.get("by_position") or []:
        if b.get("tokens"):
            pos.add_row(fmt(b["tokens"]), fmt(b.get("mean_abs_dlogprob")), fmt(b.get("max_abs_dlogprob")),
                        fmt(b.get("kl_k3")), fmt(b.get("frac_outside_is_bounds")), str(b.get("bucket")))
    if pos.row_count:
        console.print(pos)

    rollouts = sorted(r.get("rollouts") or [], key=lambda x: -(x.get("max_abs_dlogprob") or 0.0))
    if rollouts:
        wr = Table(title=f"worst rollouts (of {len(rollouts):,}, by max |Δlogprob|)", title_justify="left")
        for c in ("rollout", "env/task/repeat", "reward", "tokens", "mean |Δlogprob|", "max |Δlogprob|", "KL k3",
                  "seq IS"):
            wr.add_column(c, justify="left" if c in ("rollout", "env/task/repeat") else "right", overflow="fold")
        for x in rollouts[:top]:
            wr.add_row(str(x.get("rollout_id")), f"{x.get('env') or '-'}/{fmt(x.get('task_index'))}/"
                       f"{fmt(x.get('rollout_index'))}", fmt(x.get("reward")), fmt(x.get("tokens")),
                       fmt(x.get("mean_abs_dlogprob")), fmt(x.get("max_abs_dlogprob")), fmt(x.get("kl_k3")),
                       fmt(x.get("seq_is_ratio")))
        console.print(wr)

    worst = r.get("worst_tokens") or []
    if worst:
        wt = Table(title="worst tokens (replayed − recorded logprob)", title_justify="left")
        for c in ("Δ", "recorded", "replayed", "where"):
            wt.add_column(c, justify="right" if c != "where" else "left", no_wrap=c != "where", overflow="fold")
        wt.add_column("context", overflow="fold")
        for w in worst[:top]:
            ctx = Text(_oneline(w.get("before"))[-40:], style="dim")
            ctx.append(_oneline(w.get("token")) or "∅", style="bold reverse red")
            ctx.append(_oneline(w.get("after"))[:40], style="dim")
            wt.add_row(f"{w.get('delta', 0):+.4g}", fmt(w.get("recorded_logprob")), fmt(w.get("replayed_logprob")),
                       f"{w.get('rollout_id')} #{w.get('call_index')} @{w.get('position')}", ctx)
        console.print(wt)


# == replay: HTML ============================================================================


def _decade_bars(values: np.ndarray) -> list[tuple[str, float, str]]:
    """Counts of |values| per colour class (one per decade, as the token colouring)."""
    counts = np.bincount(np.digitize(np.abs(values), DELTA_EDGES), minlength=len(DELTA_EDGES) + 1)
    e = [decade(x) for x in DELTA_EDGES]
    labels = [f"<{x}" for x in e] + [f"≥{e[-1]}"]
    spans = [f"|Δ| < {e[0]}"] + [f"{lo} ≤ |Δ| < {hi}" for lo, hi in zip(e[:-1], e[1:])] + [f"|Δ| ≥ {e[-1]}"]
    return [(lab, float(n), f"{span}: {int(n):,}") for lab, n, span in zip(labels, counts, spans)]


def _coloured_chart(chart_id: str, title: str, bars: list[tuple[str, float, str]], y_label: str) -> str:
    """A decade histogram whose bars take the token colours of their class."""
    return bar_chart(chart_id, title, bars, colour=DELTA_COLOURS, y_label=y_label)


def _turn_marks(gen: Sequence[bool], calls: Sequence[int | None]) -> tuple[dict[int, str], dict[int, int | None]]:
    """Where a multi-call rollout's turns change, as dividers to insert before a token index
    (``len(gen)``: after the last token), and the call each env-text run leads into.

    A run of generated tokens is one call's generation (split where the call index changes); a
    prompt run after a generation is what the environment and the chat template added before the
    next call: text, not sampled. Call indices of prompt tokens are not used (a replay report
    gives them as -1).
    """
    marks: dict[int, str] = {}
    env_run: dict[int, int | None] = {}  # first index of an env-text run -> the call it prompts
    n = len(gen)
    i, prev_call = 0, None
    while i < n:
        j = i + 1
        if gen[i]:
            while j < n and gen[j] and calls[j] == calls[i]:
                j += 1
            if prev_call is not None and i in marks:  # directly after another call's generation
                marks[i] = f"▲ end of call {prev_call} · ▼ call {calls[i]}: generation (sampled)"
            else:
                marks[i] = f"▼ call {calls[i]}: generation (sampled)"
            marks[j] = f"▲ end of call {calls[i]}"
            prev_call = calls[i]
        else:
            while j < n and not gen[j]:
                j += 1
            if prev_call is None:
                marks[i] = f"prompt of call {calls[j]}" if j < n else "prompt"
            else:
                nxt = calls[j] if j < n else None
                env_run[i] = nxt
                into = f"prompt of call {nxt}" if nxt is not None else "no call followed"
                marks[i] = f"▲ end of call {prev_call} · environment + chat template text ({into}; not sampled)"
        i = j
    return marks, env_run


def _generated_calls(segments: Sequence[dict[str, Any]]) -> int:
    """How many calls' generations a rollout's token detail holds."""
    return len({c for seg in segments for c, g in zip(seg.get("call_index") or [], seg.get("generated") or []) if g})


def _token_view(segments: Sequence[dict[str, Any]]) -> str:
    """Every token of a rollout, coloured by |Δlogprob|; long prompt runs are folded. A rollout of
    several calls gets its turn boundaries marked: where each call's generation starts and ends,
    and where the environment's text (the next call's prompt suffix) begins."""
    multi = _generated_calls(segments) > 1
    blocks = []
    for si, seg in enumerate(segments):
        pieces = seg.get("pieces") or []
        gen = seg.get("generated") or [False] * len(pieces)
        delta = seg.get("delta") or [None] * len(pieces)
        calls = seg.get("call_index") or [None] * len(pieces)
        rec = seg.get("recorded")
        rep = seg.get("replayed")
        cls = delta_classes([d if g else None for d, g in zip(delta, gen)])
        keep = np.ones(len(pieces), dtype=bool)
        folds: dict[int, int] = {}  # first hidden index -> hidden count
        is_prompt = ~np.asarray(gen, dtype=bool) if pieces else np.zeros(0, bool)
        if is_prompt.size:
            edges = np.flatnonzero(np.diff(np.concatenate([[0], is_prompt.astype(np.int8), [0]])))
            for a, b in zip(edges[::2], edges[1::2]):
                if b - a > _PROMPT_RUN:
                    lo, hi = a + _PROMPT_HEAD, b - _PROMPT_TAIL
                    keep[lo:hi] = False
                    folds[int(lo)] = int(hi - lo)
        marks, env_runs = _turn_marks(gen, calls) if multi else ({}, {})
        out = []
        env_for: int | None = None
        in_env = False
        for i, piece in enumerate(pieces):
            if i in marks:
                out.append(f'<span class="turn">{esc(marks[i])}</span>')
            if i in env_runs:
                in_env, env_for = True, env_runs[i]
            elif gen[i]:
                in_env = False
            if not keep[i]:
                if i in folds:
                    out.append(f'<span class="p dim">\n⋯ {folds[i]:,} prompt tokens not shown ⋯\n</span>')
                continue
            if not gen[i]:
                if in_env:
                    out.append(token_html(piece, "e", f"environment/template text, prompt of call {env_for} {piece!r}"))
                else:
                    out.append(token_html(piece, "p", f"prompt {piece!r}"))
                continue
            d = delta[i]
            title = f"{piece!r}  Δ {'-' if d is None else format(d, '+.4g')}"
            if rec is not None and rep is not None and rec[i] is not None and rep[i] is not None:
                title += f"  recorded {rec[i]:.4f}  replayed {rep[i]:.4f}"
            title += f"  call {calls[i]}"
            out.append(token_html(piece, cls[i], title))
        if len(pieces) in marks:
            out.append(f'<span class="turn">{esc(marks[len(pieces)])}</span>')
        label = f'<div class="caption">segment {si}</div>' if len(segments) > 1 else ""
        blocks.append(f'{label}<div class="tokens">{"".join(out)}</div>')
    return "".join(blocks)


def replay_html(report: dict[str, Any]) -> str:
    """The replay report as one self-contained HTML page (see :func:`write_replay_html`)."""
    r = report
    overall = r.get("overall") or {}
    fails = _failing(r, overall)
    t = r.get("timing") or {}
    s = r.get("settings") or {}
    what = r.get("model") or r.get("engine_url") or "-"
    body = [f"<h1>gymtape replay: {esc(r.get('tape'))}</h1>",
            f'<p class="meta">mode <b>{esc(r.get("mode"))}</b> · {"model" if r.get("model") else "engine"} '
            f'<b>{esc(what)}</b> · device <b>{esc(r.get("device") or "-")}</b> · dtype '
            f'<b>{esc(r.get("dtype") or "-")}</b> · {fmt(t.get("tokens"))} tokens in {fmt(t.get("seconds"), 3)} s ({fmt(t.get("tokens_per_s"), 3)} '
            f'tok/s) · IS bounds <b>{esc(s.get("is_bounds"))}</b></p>']
    skipped = r.get("skipped") or {}
    if any(skipped.values()):
        body.append(f'<p class="warn">skipped {fmt(skipped.get("rollouts_without_tokens"))} rollouts and '
                    f'{fmt(skipped.get("calls_without_tokens"))} calls without token IDs</p>')
    for warning in r.get("warnings") or []:
        body.append(f'<p class="warn">{esc(warning)}</p>')
    failures = r.get("threshold_failures") or []
    if failures:
        body.append('<div class="fails" id="threshold-failures"><b>threshold failures</b><ul>'
                    + "".join(f"<li>{esc(f)}</li>" for f in failures) + "</ul></div>")
    elif s.get("fail_above"):
        body.append('<p class="pass" id="threshold-failures">all thresholds passed: '
                    + esc(", ".join(f"{_LABELS.get(k, k)} ≤ {v}" for k, v in s["fail_above"].items())) + "</p>")
    body.append("<h2>Overall</h2>")
    body.append(cards([(label, fmt(overall.get(k)), fmt(fails[k]) if k in fails else None) for k, label in METRICS]))

    details = r.get("details") or []
    det_deltas = np.array([d for x in details for seg in x.get("segments") or []
                           for d, g in zip(seg.get("delta") or [], seg.get("generated") or []) if g and d is not None],
                          dtype=np.float64)
    by_pos = [b for b in r.get("by_position") or []]
    per_rollout = np.array([x["max_abs_dlogprob"] for x in r.get("rollouts") or []
                            if x.get("max_abs_dlogprob") is not None], dtype=np.float64)
    charts = [
        _coloured_chart("hist-dlogprob", f"|Δlogprob| per token ({det_deltas.size:,} tokens, {len(details)} rollouts)",
                        _decade_bars(det_deltas), "tokens"),
        bar_chart("bars-position", "mean |Δlogprob| by position in the generation",
                  [(_bucket_start(b), b.get("mean_abs_dlogprob") or 0.0,
                    f"positions {b.get('bucket')}: {fmt(b.get('tokens'))} tokens, mean |Δ| "
                    f"{fmt(b.get('mean_abs_dlogprob'))}, max |Δ| {fmt(b.get('max_abs_dlogprob'))}, KL k3 "
                    f"{fmt(b.get('kl_k3'))}") for b in by_pos], colour="#4c78a8", y_label="mean |Δlogprob|",
                  x_label="tokens into the generation (bucket start)"),
        _coloured_chart("hist-rollout-max", f"max |Δlogprob| per rollout ({per_rollout.size:,} rollouts)",
                        _decade_bars(per_rollout), "rollouts"),
    ]
    body.append("<h2>Distributions</h2>")
    body.append(f'<div class="charts">{"".join(charts)}</div>')
    body.append('<p class="caption">Per-token histogram: the generated tokens of the rollouts with token detail '
                'below (the worst rollouts). Bars are coloured like the tokens.</p>')

    worst = r.get("worst_tokens") or []
    if worst:
        body.append("<h2>Worst tokens</h2>")
        rows = []
        for w in worst:
            token = esc(_oneline(w.get("token"))) or "∅"
            ctx = (f'<span class="dim">{esc(_oneline(w.get("before")))}</span><mark>{token}</mark>'
                   f'<span class="dim">{esc(_oneline(w.get("after")))}</span>')
            rows.append([esc(fmt(w.get("delta"))), esc(fmt(w.get("recorded_logprob"))),
                         esc(fmt(w.get("replayed_logprob"))), esc(w.get("rollout_id")), esc(w.get("call_index")),
                         esc(w.get("position")), esc(w.get("token_id")), ctx])
        body.append(table(["Δ", "recorded", "replayed", "rollout", "call", "position", "token id", "context"], rows,
                          raw=True, left=(3, 7), classes={7: "ctx mono"}, table_id="worst-tokens"))

    rollouts = sorted(r.get("rollouts") or [], key=lambda x: -(x.get("max_abs_dlogprob") or 0.0))
    if rollouts:
        body.append(f"<h2>Rollouts by max |Δlogprob| ({len(rollouts):,})</h2>")
        cols = ("tokens", "mean_abs_dlogprob", "max_abs_dlogprob", "kl_k3", "seq_is_ratio", "frac_outside_is_bounds")
        rows = [[str(x.get("rollout_id")), str(x.get("env") or "-"), fmt(x.get("task_index")),
                 fmt(x.get("rollout_index")), fmt(x.get("reward")), str(len(x.get("calls") or []))]
                + [fmt(x.get(c)) for c in cols] for x in rollouts[:_HTML_ROWS]]
        body.append(table(["rollout", "env", "task", "repeat", "reward", "calls"] + [_LABELS[c] for c in cols], rows,
                          left=(0, 1), table_id="rollouts"))
        if len(rollouts) > _HTML_ROWS:
            body.append(f'<p class="caption">{len(rollouts) - _HTML_ROWS:,} more rollouts in the JSON report</p>')

    if details:
        body.append(f"<h2>Token detail: the {len(details)} worst rollouts</h2>")
        n_calls = [_generated_calls(x.get("segments") or []) for x in details]
        multi_call = any(n > 1 for n in n_calls)
        body.append(legend(turns=multi_call))
        body.append('<p class="caption">Hover a token for its values. Grey: prompt tokens (not scored).'
                    + (" Blue dividers mark the turns of a multi-call rollout; blue tokens are the text the "
                       "environment and the chat template added between calls (not sampled, not scored)."
                       if multi_call else "") + "</p>")
        for i, x in enumerate(details):
            open_ = " open" if i == 0 else ""
            calls = f" · {n_calls[i]} calls" if n_calls[i] > 1 else ""
            body.append(f'<details{open_} id="detail-{i}"><summary>{esc(x.get("rollout_id"))}{calls} · '
                        'max |Δlogprob| '
                        f'{esc(fmt(x.get("max_abs_dlogprob")))}</summary>{_token_view(x.get("segments") or [])}'
                        "</details>")
    return page(f"gymtape replay {r.get('tape')}", "".join(body))


def write_replay_html(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the replay report as one self-contained HTML file (no network needed to open it)."""
    return _write(path, replay_html(report))


# == diff: terminal ==========================================================================


def print_diff(report: dict[str, Any], console: Console, *, top: int = 10) -> None:
    """Print a ``gymtape.diff/1`` report: how many pairs diverge, where, and the first few."""
    d = report
    s = d.get("summary") or {}
    console.print(Text.assemble(("diff ", "bold"), (str(d.get("tape_a")), "bold red"), " → ",
                                (str(d.get("tape_b")), "bold green"), f"  (matched by {d.get('by')})"))
    for w in d.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    n_div = s.get("diverged", 0)
    line = Text(f"{s.get('pairs', 0):,} pairs: ", style="bold")
    line.append(f"{n_div:,} diverged", style="bold red" if n_div else "bold green")
    line.append(f" ({s.get('diverged_in_prompt', 0):,} in a prompt, {s.get('diverged_in_generation', 0):,} in a "
                f"generation), {s.get('identical', 0):,} identical")
    if s.get("without_tokens"):
        line.append(f", {s['without_tokens']:,} without tokens")
    line.append(f"; only in A {s.get('unmatched_a', 0):,}, only in B {s.get('unmatched_b', 0):,}")
    console.print(line)
    rc = s.get("mean_reward_change")
    console.print(f"[bold]reward[/] mean {fmt(s.get('mean_reward_a'))} → {fmt(s.get('mean_reward_b'))} (change "
                  f"{'-' if rc is None else format(rc, '+.4g')}); changed in {s.get('reward_changed', 0):,} pairs "
                  f"({s.get('reward_changed_identical', 0):,} token-identical); status changed in "
                  f"{s.get('status_changed', 0):,}", highlight=False)
    console.print(f"[bold]shared generated tokens[/] {s.get('shared_generated_tokens', 0):,}: |Δlogprob| mean "
                  f"{fmt(s.get('shared_mean_abs_dlogprob'))}, max {fmt(s.get('shared_max_abs_dlogprob'))} "
                  f"({s.get('shared_changed_tokens', 0):,} tokens changed)", highlight=False)
    where = s.get("where") or {}
    if n_div:
        calls = ", ".join(f"call {c['call_index']}: {c['count']:,}" for c in where.get("call_index") or [])
        offs = ", ".join(f"{b['bucket']}: {b['count']:,}" for b in where.get("offset_in_call") or [] if b["count"])
        console.print(f"[bold]diverge at[/] {calls}; [bold]tokens into the call[/] {offs}", highlight=False)

    diverged = [p for p in d.get("pairs") or [] if p.get("divergence")]
    if diverged:
        t = Table(title=f"first divergences ({min(top, len(diverged))} of {len(diverged):,})", title_justify="left",
                  show_lines=True)
        t.add_column("pair", overflow="fold")
        t.add_column("where", no_wrap=True)
        t.add_column("shared", justify="right")
        t.add_column("before → A / B", overflow="fold")
        t.add_column("reward", justify="right", no_wrap=True)
        for p in diverged[:top]:
            v = p["divergence"]
            ctx = Text(_oneline(v["before"])[-40:], style="dim")
            ctx.append("\nA: ", style="bold")
            ctx.append("(ended)" if v["a"]["ended"] else _oneline(v["a"]["text"]), style="red")
            ctx.append("\nB: ", style="bold")
            ctx.append("(ended)" if v["b"]["ended"] else _oneline(v["b"]["text"]), style="green")
            t.add_row(_key(p), _where(v),
                      f"{p['shared_generated']:,}", ctx, f"{fmt(p.get('reward_a'))} → {fmt(p.get('reward_b'))}")
        console.print(t)
    changed = [p for p in d.get("pairs") or [] if p.get("identical") and p.get("reward_change")]
    if changed:
        console.print(f"[yellow]{len(changed):,} token-identical pairs changed reward[/] (verifier not "
                      f"deterministic?): " + ", ".join(f"{_key(p)} {fmt(p['reward_a'])}→{fmt(p['reward_b'])}"
                                                        for p in changed[:5]), highlight=False)
    for side in ("a", "b"):
        un = d.get(f"unmatched_{side}") or []
        if un:
            ids = ", ".join(str(u["rollout_id"]) for u in un[:5])
            console.print(f"only in {side.upper()}: {len(un):,} rollouts ({ids}{', ...' if len(un) > 5 else ''})",
                          highlight=False)


# == diff: HTML ==============================================================================


def _reward_change_bars(changes: list[float]) -> list[tuple[str, float, str]]:
    if not changes:
        return []
    uniq = sorted(set(changes))
    if len(uniq) <= 12:
        return [(fmt(v, 3), float(changes.count(v)), f"change {fmt(v)}: {changes.count(v):,} pairs") for v in uniq]
    counts, edges = np.histogram(np.asarray(changes), bins=12)
    return [(fmt(float(lo), 2), float(n), f"{fmt(float(lo))} ≤ change < {fmt(float(hi))}: {int(n):,} pairs")
            for n, lo, hi in zip(counts, edges[:-1], edges[1:])]


def diff_html(report: dict[str, Any]) -> str:
    """The diff report as one self-contained HTML page (see :func:`write_diff_html`)."""
    d = report
    s = d.get("summary") or {}
    w = s.get("where") or {}
    body = ["<h1>gymtape diff</h1>",
            f'<p class="meta">A <b class="sa">{esc(d.get("tape_a"))}</b> → B <b class="sb">{esc(d.get("tape_b"))}</b>'
            f' · matched by <b>{esc(d.get("by"))}</b> · changes are B − A</p>']
    for warning in d.get("warnings") or []:
        body.append(f'<p class="warn">{esc(warning)}</p>')
    body.append(cards([
        ("pairs", fmt(s.get("pairs")), None),
        ("identical", fmt(s.get("identical")), None),
        ("diverged", fmt(s.get("diverged")), None),
        ("… in a prompt", fmt(s.get("diverged_in_prompt")), None),
        ("… in a generation", fmt(s.get("diverged_in_generation")), None),
        ("only in A", fmt(s.get("unmatched_a")), None),
        ("only in B", fmt(s.get("unmatched_b")), None),
        ("reward changed", fmt(s.get("reward_changed")), None),
        ("mean reward A", fmt(s.get("mean_reward_a")), None),
        ("mean reward B", fmt(s.get("mean_reward_b")), None),
        ("mean reward change", fmt(s.get("mean_reward_change")), None),
        ("shared generated tokens", fmt(s.get("shared_generated_tokens")), None),
        ("shared mean |Δlogprob|", fmt(s.get("shared_mean_abs_dlogprob")), None),
        ("shared max |Δlogprob|", fmt(s.get("shared_max_abs_dlogprob")), None),
    ]))
    pairs = d.get("pairs") or []
    charts = [
        bar_chart("hist-divergence-offset", "divergences by tokens into the call",
                  [(_bucket_start(b), float(b["count"]), f"{b['bucket']} tokens in: {b['count']:,} pairs")
                   for b in w.get("offset_in_call") or []], colour="#c0504d", y_label="pairs",
                  x_label="tokens into the prompt / generation (bucket start)"),
        bar_chart("hist-divergence-call", "divergences by call index",
                  [(str(c["call_index"]), float(c["count"]), f"call {c['call_index']}: {c['count']:,} pairs")
                   for c in w.get("call_index") or []], colour="#c0504d", y_label="pairs", x_label="call index"),
        bar_chart("hist-shared-fraction", "shared prefix share (diverged pairs)",
                  [(f"{b['lo']:.1f}", float(b["count"]), f"{b['lo']:.1f}–{b['hi']:.1f}: {b['count']:,} pairs")
                   for b in w.get("shared_fraction") or []], colour="#4c78a8", y_label="pairs",
                  x_label="shared tokens / longer generated stream"),
        bar_chart("hist-reward-change", "reward change (B − A)",
                  _reward_change_bars([p["reward_change"] for p in pairs if p.get("reward_change") is not None]),
                  colour="#59a14f", y_label="pairs"),
    ]
    body.append("<h2>Where they diverge</h2>")
    body.append(f'<div class="charts">{"".join(charts)}</div>')

    diverged = [p for p in pairs if p.get("divergence")]
    if diverged:
        body.append(f"<h2>Divergence points ({len(diverged):,})</h2>")
        body.append('<p class="caption">The shared text before the first differing token (grey), then A\'s '
                    'continuation (red) and B\'s (green). Token IDs from the divergence on.</p>')
        rows = []
        for p in diverged[:_HTML_ROWS]:
            v = p["divergence"]

            def side(x: dict[str, Any], cls: str, name: str) -> str:
                text = "<i>(ended)</i>" if x["ended"] else esc(_oneline(x["text"]))
                return f'<div class="{cls}"><b>{name}</b> {text}</div>'

            ctx = (f'<div class="dim">…{esc(_oneline(v["before"]))}</div>' + side(v["a"], "sa", "A")
                   + side(v["b"], "sb", "B"))
            ids = (f'<span class="sa">{esc(v["a"]["token_ids"])}</span><br>'
                   f'<span class="sb">{esc(v["b"]["token_ids"])}</span>')
            sl = p.get("shared_logprobs") or {}
            rows.append([esc(_key(p)), esc(p["rollout_id_a"]), esc(p["rollout_id_b"]),
                         esc(_where(v)), esc(fmt(p["shared_generated"])),
                         ctx, ids, esc(f"{fmt(p.get('reward_a'))} → {fmt(p.get('reward_b'))}"),
                         esc(fmt(sl.get("max_abs_dlogprob")))])
        body.append(table(["pair", "rollout A", "rollout B", "where", "shared tokens", "context", "token ids",
                           "reward", "shared max |Δlogprob|"], rows, raw=True, left=(0, 1, 2, 3, 5, 6),
                          classes={3: "nowrap", 5: "ctx mono", 6: "mono"}, table_id="divergences"))
        if len(diverged) > _HTML_ROWS:
            body.append(f'<p class="caption">{len(diverged) - _HTML_ROWS:,} more in the JSON report</p>')

    same = [p for p in pairs if p.get("identical")]
    if same:
        worst_same = sorted(same, key=lambda p: -((p.get("shared_logprobs") or {}).get("max_abs_dlogprob") or 0.0))
        body.append(f"<h2>Token-identical pairs ({len(same):,})</h2>")
        rows = [[_key(p), str(p["rollout_id_a"]), str(p["rollout_id_b"]), fmt(p["generated_a"]),
                 fmt((p.get("shared_logprobs") or {}).get("mean_abs_dlogprob")),
                 fmt((p.get("shared_logprobs") or {}).get("max_abs_dlogprob")),
                 f"{fmt(p.get('reward_a'))} → {fmt(p.get('reward_b'))}"] for p in worst_same[:_HTML_ROWS]]
        body.append(table(["pair", "rollout A", "rollout B", "generated", "mean |Δlogprob|", "max |Δlogprob|",
                           "reward"], rows, left=(0, 1, 2), table_id="identical"))
    for side_name in ("a", "b"):
        un = d.get(f"unmatched_{side_name}") or []
        if un:
            body.append(f"<h2>Only in {side_name.upper()} ({len(un):,})</h2>")
            rows = [[str(u["rollout_id"]), str(u.get("env") or "-"), fmt(u.get("task_index")),
                     fmt(u.get("rollout_index")), fmt(u.get("calls")), fmt(u.get("reward"))] for u in un[:_HTML_ROWS]]
            body.append(table(["rollout", "env", "task", "repeat", "calls", "reward"], rows, left=(0, 1),
                              table_id=f"only-{side_name}"))
    return page(f"gymtape diff {d.get('tape_a')} → {d.get('tape_b')}", "".join(body))


def write_diff_html(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the diff report as one self-contained HTML file (no network needed to open it)."""
    return _write(path, diff_html(report))
