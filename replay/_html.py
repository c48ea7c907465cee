"""Building blocks of gymtape's self-contained HTML reports.

A report page must open anywhere -- a laptop without network, a CI artifact viewer, an email
attachment -- so it is one file: inline CSS, inline SVG charts, no scripts, no fonts, images or
stylesheets fetched from anywhere. These helpers produce escaped HTML fragments; the report
pages themselves are assembled in :mod:`replay._render`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: |Δlogprob| edges of the token colour classes ``d0`` .. ``d7`` (log scale: a class per decade).
DELTA_EDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DELTA_COLOURS = ("#eef7ee", "#fff8e1", "#ffecb3", "#ffd480", "#ffb259", "#ff8a4c", "#ec4f3b", "#a50f24")

CSS = """
:root { --fg:#1d232b; --muted:#667085; --line:#d9dee5; --bg:#ffffff; --panel:#f6f8fa; --bad:#c62828; --ok:#2e7d32;
        --a:#b3261e; --b:#1b6e3a; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; padding: 20px 28px 60px; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; } h3 { font-size: 14px; margin: 14px 0 6px; }
.meta { color: var(--muted); margin: 0 0 14px; } .meta b { color: var(--fg); font-weight: 600; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 8px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
.card .k { color: var(--muted); font-size: 12px; } .card .v { font-size: 18px; font-weight: 600;
  font-variant-numeric: tabular-nums; } .card.fail { border-color: var(--bad); background: #fdecea; }
.card.fail .v { color: var(--bad); } .card .bound { font-size: 11px; color: var(--bad); }
.fails { border: 1px solid var(--bad); background: #fdecea; color: var(--bad); border-radius: 6px; padding: 8px 12px; }
.fails li { margin: 2px 0; } .pass { color: var(--ok); }
.warn { border: 1px solid #e0a800; background: #fff8e1; border-radius: 6px; padding: 6px 12px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.chart { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
svg text { font: 11px system-ui, sans-serif; fill: #444; } svg .title { font-size: 12px; font-weight: 600; fill: #222; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 4px 0; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: var(--panel); position: sticky; top: 0; } td.l, th.l { text-align: left; }
td.mono, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
td.ctx { text-align: left; white-space: pre-wrap; word-break: break-all; max-width: 520px; }
.nowrap { white-space: nowrap; }
mark { background: #ffd480; padding: 0 1px; border-radius: 2px; } .bad { color: var(--bad); font-weight: 600; }
.sa { color: var(--a); } .sb { color: var(--b); } .dim { color: var(--muted); }
.tokens { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px;
  white-space: pre-wrap; word-break: break-all; line-height: 1.7; background: #fff; border: 1px solid var(--line);
  border-radius: 6px; padding: 8px; }
.tokens span { border-radius: 2px; } .tokens .p { color: #9aa1ab; } .tokens .n { background: #e8e8ff; }
.tokens .e, .legend .e { color: #2f5f9e; background: #eaf1fb; }
.tokens .turn { display: block; margin: 8px 0 2px; padding: 1px 6px; border-top: 2px solid #2f5f9e; color: #2f5f9e;
  font: 600 11.5px system-ui, sans-serif; white-space: normal; }
.tokens .turn:first-child { margin-top: 0; } .legend .turn-key { color: #2f5f9e; border-top: 2px solid #2f5f9e; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 2px; border-radius: 2px; font-size: 12px; }
.caption { color: var(--muted); font-size: 12px; margin: 2px 0 8px; }
""" + "".join(
    f".d{i} {{ background: {c}; }}" + (f".d{i} {{ color: #fff; }}" if i >= 6 else "")
    for i, c in enumerate(DELTA_COLOURS)
)


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for display: ``-`` for null, thousands separators for ints, ``digits`` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def delta_classes(deltas: Sequence[float | None]) -> list[str]:
    """Colour class per token: ``d0``..``d7`` by |Δlogprob| decade, ``n`` where there is no value."""
    arr = np.array([np.nan if d is None else abs(d) for d in deltas], dtype=np.float64)
    idx = np.digitize(np.nan_to_num(arr, nan=0.0), DELTA_EDGES)
    return ["n" if isnan else f"d{i}" for i, isnan in zip(idx.tolist(), np.isnan(arr).tolist())]


def decade(x: float) -> str:
    """Short label of a power of ten: 1e-06 → "1e-6", 0.01 → "0.01", 1.0 → "1"."""
    return f"{x:g}" if x >= 1e-3 else f"1e{round(math.log10(x))}"


def legend(*, turns: bool = False) -> str:
    """The token colours; ``turns`` adds the multi-call marks (turn dividers, environment text)."""
    e = [decade(x) for x in DELTA_EDGES]
    labels = [f"<{e[0]}"] + [f"{lo}–{hi}" for lo, hi in zip(e[:-1], e[1:])] + [f"≥{e[-1]}"]
    spans = "".join(f'<span class="d{i}">{esc(lab)}</span>' for i, lab in enumerate(labels))
    extra = ('<span class="e">environment + template text between calls</span>'
             '<span class="turn-key">▼ call k / ▲ end of call k: turn boundary</span>') if turns else ""
    return (f'<div class="legend">|Δlogprob| {spans} <span class="p tokens" style="padding:0 6px">prompt</span>'
            f'<span class="n">no value</span>{extra}</div>')


def token_html(piece: str, cls: str, title: str) -> str:
    shown = piece.replace("\n", "↵\n") if piece else "∅"
    return f'<span class="{cls}" title="{esc(title)}">{esc(shown)}</span>'


def cards(items: Sequence[tuple[str, str, str | None]]) -> str:
    """Metric cards: (label, value, failing bound or None)."""
    out = []
    for label, value, bound in items:
        cls = "card fail" if bound is not None else "card"
        b = f'<div class="bound">above {esc(bound)}</div>' if bound is not None else ""
        out.append(f'<div class="{cls}"><div class="k">{esc(label)}</div><div class="v">{esc(value)}</div>{b}</div>')
    return f'<div class="cards">{"".join(out)}</div>'


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: Sequence[int] = (), raw: bool = False,
          classes: dict[int, str] | None = None, table_id: str | None = None) -> str:
    """An HTML table. Cells are escaped unless ``raw`` (then they must already be HTML)."""
    classes = dict(classes or {})
    for i in left:
        classes[i] = (classes.get(i, "") + " l").strip()

    def cell(tag: str, i: int, v: str) -> str:
        c = classes.get(i)
        return f'<{tag} class="{c}">{v}</{tag}>' if c else f"<{tag}>{v}</{tag}>"

    head = "".join(cell("th", i, esc(h)) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v if raw else esc(v)) for i, v in enumerate(r)) + "</tr>"
                   for r in rows)
    tid = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def bar_chart(chart_id: str, title: str, bars: Sequence[tuple[str, float, str]], *,
              colour: str | Sequence[str] = "#4c78a8", width: int = 390, height: int = 220, y_label: str = "",
              x_label: str = "") -> str:
    """An inline SVG bar chart: bars are (x label, value, hover text); values must be >= 0.

    ``colour`` is one fill for every bar or one per bar.
    """
    pad_l, pad_r, pad_t, pad_b = 44, 10, 24, 40
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    n = max(1, len(bars))
    top = max([v for _, v, _ in bars if v is not None and math.isfinite(v)] + [0.0])
    top = top if top > 0 else 1.0
    bw = w / n
    parts = [f'<svg id="{esc(chart_id)}" class="chart" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}" viewBox="0 0 {width} {height}">',
             f'<text class="title" x="{pad_l}" y="15">{esc(title)}</text>',
             f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#888"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#888"/>',
             f'<text x="{pad_l - 4}" y="{pad_t + 4}" text-anchor="end">{esc(fmt(top, 3))}</text>',
             f'<text x="{pad_l - 4}" y="{pad_t + h}" text-anchor="end">0</text>']
    if y_label:
        parts.append(f'<text x="10" y="{pad_t + h / 2}" transform="rotate(-90 10 {pad_t + h / 2})" '
                     f'text-anchor="middle">{esc(y_label)}</text>')
    step = max(1, math.ceil(n / 12))  # at most ~12 x labels
    for i, (label, value, hover) in enumerate(bars):
        v = value if value is not None and math.isfinite(value) else 0.0
        bh = h * v / top
        x = pad_l + i * bw
        fill = colour if isinstance(colour, str) else colour[i % len(colour)]
        parts.append(f'<rect x="{x + bw * 0.1:.1f}" y="{pad_t + h - bh:.1f}" width="{bw * 0.8:.1f}" '
                     f'height="{bh:.1f}" fill="{fill}" stroke="#8892a0" stroke-width="0.5">'
                     f'<title>{esc(hover)}</title></rect>')
        if i % step == 0:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{pad_t + h + 14}" text-anchor="middle">{esc(label)}</text>')
    if x_label:
        parts.append(f'<text x="{pad_l + w / 2}" y="{height - 6}" text-anchor="middle">{esc(x_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
