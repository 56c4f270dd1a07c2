"""Small SVG charts rendered in Python: line/point charts and horizontal bar charts.

No dependency and no script: each chart is a static ``<svg>`` element with a title, a
description, axis labels, a legend, and a ``<title>`` on every point and bar (the
browser shows it as a tooltip; screen readers read it). Every text that comes from a
repository (branch, metric and tag names, messages) is escaped here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape

__all__ = ["Point", "Series", "Bar", "line_chart", "bar_chart", "nice_ticks", "PALETTE", "human_bytes", "fmt_number"]

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")

WIDTH, HEIGHT = 640, 300
MAX_MARKERS = 400  # plain dots drawn per series at most (the page stays small for 10,000 commits)
LEFT, RIGHT, TOP, BOTTOM = 72, 16, 16, 48

_ids = iter(range(1, 1 << 30))


@dataclass
class Point:
    """One plotted value; ``marker``: ``dot``, ``hollow`` (pruned), ``tag`` (a diamond), ``best`` (a ring)."""

    x: float
    y: float
    tooltip: str
    marker: str = "dot"


@dataclass
class Series:
    name: str
    points: list[Point] = field(default_factory=list)
    color: str = PALETTE[0]
    line: bool = True
    dashed: bool = False


@dataclass
class Bar:
    label: str
    value: float
    tooltip: str
    color: str = PALETTE[0]


def fmt_number(value: float) -> str:
    """A short, readable number (4 significant digits, no exponent for everyday sizes)."""
    if value == 0 or not math.isfinite(value):
        return str(value) if not math.isfinite(value) else "0"
    magnitude = abs(value)
    if magnitude >= 1e6 or magnitude < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4g}"


def human_bytes(n: float) -> str:
    """Bytes in B/KiB/MiB/GiB/TiB, as ``ckptvcs stats`` prints them ("-" for no number)."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def fmt_time(epoch: float, span: float = 86400.0) -> str:
    """A UTC time label as precise as a span of ``span`` seconds needs."""
    when = datetime.fromtimestamp(epoch, timezone.utc)
    if span < 600:
        return when.strftime("%H:%M:%S")
    if span < 2 * 86400:
        return when.strftime("%m-%d %H:%M")
    return when.strftime("%Y-%m-%d")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (1, 2, 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    start = math.floor(lo / step) * step
    ticks: list[float] = []
    value = start
    while value <= hi + step * 0.5 and len(ticks) < 50:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _open(title: str, desc: str, width: int, height: int) -> tuple[str, str]:
    uid = f"c{next(_ids)}"
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-labelledby="{uid}t {uid}d">'
            f'<title id="{uid}t">{escape(title)}</title><desc id="{uid}d">{escape(desc)}</desc>')
    return uid, head


def _marker(kind: str, x: float, y: float, color: str, tooltip: str) -> str:
    tip = f"<title>{escape(tooltip)}</title>"
    if kind == "hollow":
        return (f'<circle class="pt pruned" cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#fff" stroke="{color}" '
                f'stroke-width="1.5" stroke-dasharray="2 1.5">{tip}</circle>')
    if kind == "tag":
        d = f"M{x:.1f} {y - 7:.1f} L{x + 7:.1f} {y:.1f} L{x:.1f} {y + 7:.1f} L{x - 7:.1f} {y:.1f} Z"
        return f'<path class="pt tagged" d="{d}" fill="{color}" stroke="#222" stroke-width="1.2">{tip}</path>'
    if kind == "best":
        return (f'<g class="pt best"><circle cx="{x:.1f}" cy="{y:.1f}" r="8" fill="none" stroke="#222" '
                f'stroke-width="1.5"/><circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>{tip}</g>')
    return f'<circle class="pt" cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}">{tip}</circle>'


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    x_time: bool = False,
    y_format: Callable[[float], str] = fmt_number,
    log_y: bool = False,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """A chart of points (joined by lines where ``series.line``), with axes, grid, legend and tooltips.

    ``x_time``: x values are seconds since the epoch (labels as UTC dates). ``log_y``:
    a logarithmic y axis (non-positive values are left out).
    """
    shown = [s for s in series if s.points]
    points = [p for s in shown for p in s.points if math.isfinite(p.x) and math.isfinite(p.y) and (p.y > 0 or not log_y)]
    desc = f"{y_label} against {x_label}: " + ", ".join(f"{s.name} ({len(s.points)} points)" for s in shown)
    uid, out = _open(title, desc, width, height + 20 * _legend_rows(shown, width))
    if not points:
        return out + (f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">'
                      "nothing recorded yet</text></svg>")
    tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [p.x for p in points]
    ys = [tf(p.y) for p in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        pad = abs(y_lo) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    y_ticks = [t for t in nice_ticks(y_lo, y_hi)]
    y_lo, y_hi = min(y_lo, y_ticks[0]), max(y_hi, y_ticks[-1])
    x_ticks = nice_ticks(x_lo, x_hi, 6)
    x_ticks = [t for t in x_ticks if x_lo <= t <= x_hi] or [x_lo, x_hi]
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM

    def sx(v: float) -> float:
        return LEFT + (v - x_lo) / (x_hi - x_lo) * plot_w

    def sy(v: float) -> float:
        return TOP + plot_h - (v - y_lo) / (y_hi - y_lo) * plot_h

    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="plot"/>']
    for t in y_ticks:
        y = sy(t)
        label = y_format(10 ** t) if log_y else y_format(t)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>')
    for t in x_ticks:
        x = sx(t)
        label = fmt_time(t, x_hi - x_lo) if x_time else fmt_number(t)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
                     f'<text class="tick" x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{escape(label)}</text>')
    parts.append(f'<text class="axis" x="{LEFT + plot_w / 2}" y="{TOP + plot_h + 36}" text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    parts.append(f'<text class="axis" transform="translate(14 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 f'{escape(y_label)}</text>')
    for s in shown:
        pts = [(sx(p.x), sy(tf(p.y)), p) for p in s.points
               if math.isfinite(p.x) and math.isfinite(p.y) and (p.y > 0 or not log_y)]
        if s.line and len(pts) > 1:
            d = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f} {y:.1f}" for i, (x, y, _) in enumerate(pts))
            dash = ' stroke-dasharray="6 4"' if s.dashed else ""
            parts.append(f'<path class="line" d="{d}" fill="none" stroke="{s.color}" stroke-width="2"{dash}>'
                         f"<title>{escape(s.name)}</title></path>")
        every = max(1, -(-len(pts) // MAX_MARKERS))  # long runs: the line has every point, plain dots thin out
        parts.extend(_marker(p.marker, x, y, s.color, p.tooltip) for i, (x, y, p) in enumerate(pts)
                     if p.marker != "dot" or i % every == 0 or i == len(pts) - 1)
    parts.append(_legend(shown, height, width))
    return out + "".join(parts) + "</svg>"


_LEGEND_NAME = 32  # characters of a series name shown in a legend (the tooltip has all of it)


def _legend_layout(series: Sequence[Series], width: int) -> list[tuple[int, int, str]]:
    """(x, row, shown name) per legend item, flowing left to right (about 7 px per character)."""
    x, row, out = LEFT, 0, []
    for s in series:
        name = s.name if len(s.name) <= _LEGEND_NAME else s.name[:_LEGEND_NAME - 1] + "…"
        item = 34 + 7 * len(name)
        if x + item > width and x > LEFT:
            x, row = LEFT, row + 1
        out.append((x, row, name))
        x += item
    return out


def _legend_rows(series: Sequence[Series], width: int) -> int:
    layout = _legend_layout(series, width)
    return 1 + (layout[-1][1] if layout else 0)


def _legend(series: Sequence[Series], top: int, width: int) -> str:
    items = []
    for s, (x, row, name) in zip(series, _legend_layout(series, width)):
        y = top + 4 + row * 20
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        swatch = (f'<line x1="{x}" x2="{x + 18}" y1="{y + 6}" y2="{y + 6}" stroke="{s.color}" stroke-width="2"{dash}/>'
                  if s.line else f'<circle cx="{x + 9}" cy="{y + 6}" r="4" fill="{s.color}"/>')
        items.append(f'<g class="legend-item">{swatch}<text class="legend" x="{x + 24}" y="{y + 10}">'
                     f"{escape(name)}<title>{escape(s.name)}</title></text></g>")
    return '<g class="legend">' + "".join(items) + "</g>"


def bar_chart(
    title: str,
    bars: Sequence[Bar],
    *,
    value_label: str,
    value_format: Callable[[float], str] = fmt_number,
    width: int = WIDTH,
) -> str:
    """Horizontal bars, one per row, labelled on the left, valued on the right, each with a tooltip."""
    row = 26
    label_w = 170
    height = TOP + row * max(len(bars), 1) + 40
    desc = f"{value_label}: " + ", ".join(f"{b.label} {value_format(b.value)}" for b in bars)
    _, out = _open(title, desc, width, height)
    if not bars:
        return out + (f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">'
                      "nothing recorded yet</text></svg>")
    top_value = max((b.value for b in bars if math.isfinite(b.value)), default=0.0) or 1.0
    plot_w = width - label_w - 90
    parts = []
    for i, b in enumerate(bars):
        y = TOP + i * row
        w = max(1.0, (b.value if math.isfinite(b.value) else 0.0) / top_value * plot_w)
        label = b.label if len(b.label) <= 24 else b.label[:23] + "…"
        parts.append(
            f'<text class="tick" x="{label_w - 8}" y="{y + 16}" text-anchor="end">{escape(label)}</text>'
            f'<rect class="bar" x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" fill="{b.color}">'
            f"<title>{escape(b.tooltip)}</title></rect>"
            f'<text class="tick" x="{label_w + w + 6:.1f}" y="{y + 16}">{escape(value_format(b.value))}</text>'
        )
    parts.append(f'<text class="axis" x="{label_w + plot_w / 2}" y="{height - 10}" text-anchor="middle">'
                 f"{escape(value_label)}</text>")
    return out + "".join(parts) + "</svg>"
