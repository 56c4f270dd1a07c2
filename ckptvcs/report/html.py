"""The report as one self-contained HTML page: inline CSS, SVG drawn here, no script, no network.

A Content-Security-Policy that allows nothing but the inline style makes the "no network"
promise checkable: a browser refuses any request the page might try. Every string from
the repository is escaped (names and messages are untrusted input).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from typing import Any

from .svg import PALETTE, Bar, Point, Series, bar_chart, fmt_number, human_bytes, line_chart

__all__ = ["render_html"]

MAX_METRIC_CHARTS = 12
MAX_TABLE_ROWS = 200

_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --bg:#f6f7fb; --card:#fff; --line:#dde1ea; --err:#b3261e; --warn:#8a5a00;
        --info:#0b5cad; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; color:var(--fg);
       background:var(--bg); }
header { background:#1d2330; color:#fff; padding:18px 28px; }
header h1 { margin:0; font-size:22px; } header p { margin:4px 0 0; color:#c9cfdb; font-size:13px; }
main { max-width:1400px; margin:0 auto; padding:18px 28px 40px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 20px; margin:18px 0; }
h2 { margin:0 0 10px; font-size:18px; } h3 { margin:14px 0 6px; font-size:15px; color:var(--muted); }
.grid { display:flex; flex-wrap:wrap; gap:14px; }
.card { flex:1 1 150px; border:1px solid var(--line); border-radius:8px; padding:10px 12px; background:#fbfcfe; }
.card b { display:block; font-size:20px; } .card span { color:var(--muted); font-size:12px; }
.charts { display:flex; flex-wrap:wrap; gap:16px; }
figure { margin:0; flex:0 1 auto; } figcaption { font-weight:600; margin-bottom:4px; }
svg.chart { max-width:100%; height:auto; background:#fff; }
svg .plot { fill:#fbfcfe; stroke:var(--line); } svg .grid { stroke:#e8ebf1; }
svg text { font:12px system-ui,sans-serif; fill:#39404d; } svg .axis { font-weight:600; }
svg .empty { fill:var(--muted); font-style:italic; }
ul.attention { list-style:none; padding:0; margin:0; }
ul.attention li { padding:8px 12px; margin:6px 0; border-left:5px solid; border-radius:4px; background:#fbfcfe; }
li.error { border-color:var(--err); } li.warning { border-color:#e0a100; } li.info { border-color:var(--info); }
li .lvl { font-weight:700; margin-right:6px; } li.error .lvl { color:var(--err); } li.warning .lvl { color:var(--warn); }
li.info .lvl { color:var(--info); }
table { border-collapse:collapse; width:100%; font-size:13px; margin:6px 0 10px; }
caption { text-align:left; font-weight:600; padding:4px 0; }
th, td { border-bottom:1px solid var(--line); padding:4px 8px; text-align:left; vertical-align:top; }
th { background:#f0f2f7; } td.num { text-align:right; font-variant-numeric:tabular-nums; }
code { font-size:12px; } .muted { color:var(--muted); } .ok { color:#1b7f3b; font-weight:600; }
.bad { color:var(--err); font-weight:600; }
.key { font-size:12px; color:var(--muted); }
"""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def render_html(summary: dict[str, Any]) -> str:
    """The whole report page for a :func:`ckptvcs.report.build_summary` result."""
    body = "".join([
        _attention(summary),
        _overview(summary),
        _metrics(summary),
        _storage(summary),
        _latency(summary),
        _retention(summary),
        _health(summary),
    ])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ckptvcs report: {escape(_repo_name(summary))}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>Checkpoint report: {escape(_repo_name(summary))}</h1>"
        f"<p>{escape(str(summary.get('repository', '')))} · generated {escape(str(summary.get('generated', '')))} UTC"
        f" · HEAD {escape(_head(summary))}</p></header><main>{body}</main></body></html>\n"
    )


def _repo_name(summary: dict[str, Any]) -> str:
    path = str(summary.get("repository", "repository")).rstrip("/")
    parts = path.split("/")
    return "/".join(parts[-2:]) if parts[-1] == ".ckptvcs" and len(parts) > 1 else parts[-1]


def _head(summary: dict[str, Any]) -> str:
    head = summary.get("head") or {}
    commit = str(head.get("commit") or "(no commits)")[:12]
    return f"{head['branch']} at {commit}" if head.get("branch") else f"detached at {commit}"


def _short(oid: Any) -> str:
    return str(oid)[:12] if oid else "-"


def _epoch(stamp: Any) -> float:
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return math.nan


def _section(sid: str, title: str, content: str) -> str:
    return f'<section id="{sid}" aria-labelledby="{sid}-h"><h2 id="{sid}-h">{escape(title)}</h2>{content}</section>'


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{escape(caption)}</figcaption>{svg}</figure>"


def _table(caption: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    rows = list(rows)
    shown = rows[:MAX_TABLE_ROWS]
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{cell if isinstance(cell, _Html) else escape(str(cell))}'
                         "</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in shown
    )
    more = (f'<p class="muted">{len(rows) - len(shown)} more rows are in <code>ckptvcs report --json</code>.</p>'
            if len(rows) > len(shown) else "")
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="muted">none</td></tr>'
    return f"<table><caption>{escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


class _Html(str):
    """Markup built here from escaped parts: a table cell inserts it as is."""


def _code(text: Any) -> _Html:
    return _Html(f"<code>{escape(str(text))}</code>")


def _attention(summary: dict[str, Any]) -> str:
    items = summary.get("attention") or []
    label = {"error": "Problem", "warning": "Check", "info": "Note"}
    if not items:
        content = '<p class="ok">Nothing needs attention.</p>'
    else:
        content = '<ul class="attention">' + "".join(
            f'<li class="{escape(i.get("level", "info"))}"><span class="lvl">{label.get(i.get("level", ""), "Note")}:</span>'
            f"{escape(str(i.get('text', '')))}</li>" for i in items) + "</ul>"
    return _section("attention", "Needs attention", content)


def _overview(summary: dict[str, Any]) -> str:
    s = summary["storage"]
    fsck = summary.get("fsck")
    fsck_text = "never run" if fsck is None else ("passed" if fsck.get("ok") else "FOUND DAMAGE")
    verified = summary["verifications"]["records"]
    ver_text = "never verified" if not verified else ("passed" if verified[-1].get("ok") else "FAILED")
    cards = [
        (str(len(summary["commits"])), "commits"),
        (str(len(summary["branches"])), "branches"),
        (str(len(summary["tags"])), "tags"),
        (str(len(summary["retention"]["pruned"])), "pruned commits"),
        (human_bytes(s["logical_bytes"]), "logical (what the commits hold)"),
        (human_bytes(s["pack_bytes"]), "on disk (packs)"),
        (f"{s['total_ratio']:.2f}×", f"saved overall (dedup {s['dedup_ratio']:.2f}× · compression "
                                     f"{s['compression_ratio']:.2f}×)"),
        (fsck_text, "last fsck"),
        (ver_text, "last verified restore"),
    ]
    return _section("overview", "Overview", '<div class="grid">' + "".join(
        f'<div class="card"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for v, k in cards) + "</div>")


def _branch_colors(summary: dict[str, Any]) -> dict[str, str]:
    names = list(summary["branches"])
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _commit_tooltip(c: dict[str, Any], branch: str, extra: str = "") -> str:
    bits = [f"branch {branch}", f"step {c['step']}" if c.get("step") is not None else "no step", extra,
            f"commit {_short(c['id'])}", c["time"]]
    if c.get("tags"):
        bits.append("tagged " + ", ".join(c["tags"]))
    if c.get("best_for"):
        bits.append("best " + ", ".join(c["best_for"]))
    if c.get("pruned"):
        p = c["pruned"]
        bits.append(f"pruned by {p.get('rule')}" + (" (data collected)" if p.get("collected") else ""))
    if c.get("message"):
        bits.append(str(c["message"]).splitlines()[0][:80])
    return " · ".join(b for b in bits if b)


def _metrics(summary: dict[str, Any]) -> str:
    commits = {c["id"]: c for c in summary["commits"]}
    colors = _branch_colors(summary)
    names = sorted({m for c in summary["commits"] for m in c["metrics"]})
    if not names:
        return _section("metrics", "Metrics by step", '<p class="muted">No commit records a metric.</p>')
    charts = []
    for metric in names[:MAX_METRIC_CHARTS]:
        best = (summary["best"].get(metric) or {}).get("commit")
        series = []
        for branch, info in summary["branches"].items():
            pts = []
            for oid in info["chain"]:
                c = commits.get(oid)
                if c is None or c.get("step") is None:
                    continue
                value = c["metrics"].get(metric)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                marker = ("best" if oid == best else "tag" if c.get("tags") else
                          "hollow" if c.get("pruned") else "dot")
                pts.append(Point(float(c["step"]), float(value),
                                 _commit_tooltip(c, branch, f"{metric} {fmt_number(float(value))}"), marker))
            series.append(Series(branch, pts, colors[branch]))
        mode = (summary["best"].get(metric) or {}).get("mode", "min")
        charts.append(_figure(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)",
                              line_chart(f"{metric} against training step, per branch", series,
                                         x_label="step", y_label=metric)))
    more = (f'<p class="muted">{len(names) - MAX_METRIC_CHARTS} more metrics are in the JSON summary.</p>'
            if len(names) > MAX_METRIC_CHARTS else "")
    key = ('<p class="key">Each branch is one line (its first-parent history). ◆ tagged commit · ◎ best kept '
           "commit for the metric · ○ dashed: pruned commit (its data released; its record stays).</p>")
    best_rows = [(m, e["mode"], fmt_number(e["value"]), e.get("step"), _code(_short(e["commit"])))
                 for m, e in sorted(summary["best"].items())]
    return _section("metrics", "Metrics by step", key + '<div class="charts">' + "".join(charts) + "</div>" + more
                    + _table("Best kept commit per metric", ["metric", "mode", "value", "step", "commit"], best_rows))


def _storage(summary: dict[str, Any]) -> str:
    s = summary["storage"]
    commits = summary["commits"]
    colors = _branch_colors(summary)
    logical = [Point(_epoch(c["time"]), c["logical_bytes"], _commit_tooltip(c, c.get("branch") or "-",
                                                                            f"logical {human_bytes(c['logical_bytes'])}"))
               for c in commits if c.get("logical_bytes") is not None]
    new = [Point(_epoch(c["time"]), c["new_stored_bytes"] or 0.0,
                 _commit_tooltip(c, c.get("branch") or "-", f"new stored {human_bytes(c['new_stored_bytes'] or 0)}"))
           for c in commits if c.get("new_stored_bytes") is not None]
    cumulative = [Point(_epoch(t["time"]), t["cumulative_new_stored_bytes"],
                        f"{human_bytes(t['cumulative_new_stored_bytes'])} written by commits up to {_short(t['commit'])}")
                  for t in s["timeline"]]
    disk = [Point(_epoch(g["time"]), g["pack_bytes"], f"after gc at {g['time']}: {human_bytes(g['pack_bytes'])} on disk, "
                  f"{human_bytes(g.get('reclaimed') or 0)} reclaimed")
            for g in s["disk_after_gc"] if g.get("pack_bytes") is not None]
    over_time = line_chart(
        "Storage over time: logical and stored bytes per commit, disk after each gc",
        [Series("logical bytes of the commit", logical, PALETTE[0], line=False),
         Series("new stored bytes of the commit", new, PALETTE[1], line=False),
         Series("written by commits, cumulative", cumulative, PALETTE[2]),
         Series("on disk after gc", disk, PALETTE[3], dashed=True)],
        x_label="time (UTC)", y_label="bytes", x_time=True, y_format=human_bytes,
    )
    comp_bars = []
    for i, (name, sizes) in enumerate(s["components"].items()):
        color = PALETTE[i % len(PALETTE)]
        comp_bars.append(Bar(f"{name}: logical", sizes["logical_bytes"],
                             f"{name}: {human_bytes(sizes['logical_bytes'])} held by kept commits", color))
        comp_bars.append(Bar(f"{name}: stored", sizes["stored_bytes"],
                             f"{name}: {human_bytes(sizes['stored_bytes'])} stored once, compressed", color))
    branch_bars = [Bar(name, float(cost), f"branch {name}: {human_bytes(cost)} stored only for its commits",
                       colors.get(name, PALETTE[0])) for name, cost in s["branch_own_bytes"].items()]
    gc_note = "" if summary["gc"]["recorded"] else '<p class="muted">Disk after gc: not recorded (no gc ran since ' \
        "ckptvcs started recording gc runs).</p>"
    ratios = _table("Ratios", ["what", "value", "meaning"], [
        ("dedup", f"{s['dedup_ratio']:.2f}×", "logical bytes / distinct chunk bytes"),
        ("compression", f"{s['compression_ratio']:.2f}×", "distinct chunk bytes / stored bytes (zstd, byte planes, deltas)"),
        ("overall", f"{s['total_ratio']:.2f}×", "logical bytes / stored bytes"),
        ("packs on disk", human_bytes(s["pack_bytes"]), f"{s['chunks']} chunks"),
        ("objects on disk", human_bytes(s["object_bytes"]), "commits, manifests, tags"),
    ])
    charts = '<div class="charts">' + "".join([
        _figure("Bytes over time", over_time),
        _figure("Split by component", bar_chart("Logical and stored bytes by component", comp_bars,
                                                value_label="bytes", value_format=human_bytes)),
        _figure("What each branch costs on its own", bar_chart(
            "Stored bytes only each branch's commits use", branch_bars, value_label="bytes", value_format=human_bytes)),
    ]) + "</div>"
    return _section("storage", "Storage", charts + gc_note + ratios)


def _latency(summary: dict[str, Any]) -> str:
    colors = _branch_colors(summary)
    series = []
    by_branch: dict[str, list[Point]] = {}
    for c in summary["commits"]:
        if c.get("save_seconds") is None:
            continue
        branch = c.get("branch") or "other"
        by_branch.setdefault(branch, []).append(
            Point(_epoch(c["time"]), c["save_seconds"],
                  _commit_tooltip(c, branch, f"saved in {fmt_number(c['save_seconds'])} s")))
    for branch, pts in by_branch.items():
        series.append(Series(f"save, {branch}", pts, colors.get(branch, PALETTE[7])))
    restores = [Point(_epoch(r.get("time")), float(r["restore_seconds"]),
                      f"restore of {_short(r.get('commit'))} (step {r.get('step')}) in {fmt_number(r['restore_seconds'])} s "
                      f"at {r.get('time')}", "tag")
                for r in summary["restores"]["records"] if isinstance(r.get("restore_seconds"), (int, float))]
    verifies = [Point(_epoch(v.get("time")), float(v["restore_seconds"]),
                      f"verified restore of {_short(v.get('commit'))} in {fmt_number(v['restore_seconds'])} s: "
                      f"{'passed' if v.get('ok') else 'FAILED'}", "best")
                for v in summary["verifications"]["records"] if isinstance(v.get("restore_seconds"), (int, float))]
    series.append(Series("restore (manager)", restores, PALETTE[5], line=False))
    series.append(Series("verified restore", verifies, PALETTE[6], line=False))
    recorded = any(s.points for s in series)
    note = "" if recorded else ('<p class="muted">Not recorded: these commits were made before ckptvcs recorded save '
                                "times, and no restore was recorded.</p>")
    chart = line_chart("Save and restore latency", series, x_label="time (UTC)", y_label="seconds", x_time=True)
    return _section("latency", "Save and load latency", note + '<div class="charts">' +
                    _figure("Seconds per save and restore", chart) + "</div>")


def _retention(summary: dict[str, Any]) -> str:
    r = summary["retention"]
    bars = [Bar(rule, float(n), f"{n} commit(s) pruned by {rule}", PALETTE[i % len(PALETTE)])
            for i, (rule, n) in enumerate(r["pruned_by_rule"].items())]
    kept_rows = [(_code(_short(k["commit"])), k.get("step"), "; ".join(k["why"])) for k in r["kept"]]
    pruned_rows = [(_code(_short(p["commit"])), p.get("step"), p.get("rule"), p.get("reason") or "", p.get("time"),
                    p.get("collected") or "not yet (data still on disk)") for p in r["pruned"]]
    chart = ('<div class="charts">' + _figure("Pruned commits by rule", bar_chart(
        "Number of pruned commits per retention rule", bars, value_label="commits")) + "</div>")
    return _section("retention", "Retention", chart
                    + _table("Kept commits and why", ["commit", "step", "why kept"], kept_rows, numeric=(1,))
                    + _table("Pruned commits", ["commit", "step", "rule", "reason", "pruned", "data collected by gc"],
                             pruned_rows, numeric=(1,)))


def _health(summary: dict[str, Any]) -> str:
    fsck = summary.get("fsck")
    if fsck is None:
        fsck_html = '<p><span class="bad">fsck: never run.</span> Run <code>ckptvcs fsck --read-data</code>.</p>'
    else:
        verdict = '<span class="ok">passed</span>' if fsck.get("ok") else '<span class="bad">found damage</span>'
        fsck_html = (f"<p>Last fsck: {verdict} on {escape(str(fsck.get('time')))}"
                     f"{' (all data read)' if fsck.get('read_data') else ' (structure only, data not read)'}: "
                     f"{escape(str(fsck.get('summary')))}</p>")
    verified = summary["verifications"]["records"]
    if verified:
        last = verified[-1]
        verdict = '<span class="ok">passed</span>' if last.get("ok") else '<span class="bad">FAILED</span>'
        ver_html = (f"<p>Last verified restore: {verdict}, commit <code>{escape(_short(last.get('commit')))}</code> "
                    f"on {escape(str(last.get('time')))}.</p>")
    else:
        ver_html = '<p><span class="bad">Restore: never verified.</span> Run <code>ckptvcs verify REV</code>.</p>'
    ver_rows = [(_code(_short(v.get("commit"))), v.get("time"), "passed" if v.get("ok") else "FAILED",
                 fmt_number(v["restore_seconds"]) if isinstance(v.get("restore_seconds"), (int, float)) else "-",
                 v.get("error") or "") for v in reversed(verified)]
    gc_rows = [(g.get("time"), human_bytes(g.get("pack_bytes_before") or 0), human_bytes(g.get("pack_bytes_after") or 0),
                human_bytes(g.get("bytes_reclaimed") or 0), g.get("packs_deleted"), g.get("chunks_freed"),
                g.get("commits_collected"), "restricted" if g.get("restricted") else "full")
               for g in reversed(summary["gc"]["records"])]
    gc_table = (_table("gc runs, newest first", ["time", "before", "after", "reclaimed", "packs deleted",
                                                  "chunks freed", "commits collected", "kind"], gc_rows,
                       numeric=(1, 2, 3, 4, 5, 6))
                if summary["gc"]["recorded"] else '<p class="muted">gc history: not recorded.</p>')
    tags = _table("Tags", ["tag", "commit", "time", "message"],
                  [(t["name"], _code(_short(t["commit"])), t["time"], t.get("message") or "") for t in summary["tags"]])
    branches = _table("Branches", ["branch", "tip", "commits (first-parent)"],
                      [(n, _code(_short(b["tip"])), b["commits"]) for n, b in summary["branches"].items()],
                      numeric=(2,))
    remotes = summary.get("remotes") or {}
    tiers = f'<p class="muted">Storage tiers: {escape(str(remotes.get("line") or "no remotes configured"))}.</p>'
    return _section("health", "Health", fsck_html + ver_html + tiers
                    + _table("Verified restores, newest first", ["commit", "time", "result", "restore s", "error"],
                             ver_rows)
                    + gc_table + branches + tags)
