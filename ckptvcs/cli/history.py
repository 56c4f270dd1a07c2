"""Commands that read history: log, best, show, diff."""

from __future__ import annotations

import json
import math
from typing import Any

import click

from .. import catalog
from ..diff import DiffStat
from ..gc import COLLECTED_RULE
from ..graph import graph_lines
from ..objects import Commit
from ..repo import Repo
from ..state import DTYPE_ITEMSIZE, iter_tensors
from ._app import (
    _complete_branch,
    _complete_rev,
    _human,
    _local_time,
    _LogCommand,
    _metric_text,
    _repo,
    cli,
)


def _decorations(repo: Repo) -> dict[str, list[str]]:
    labels: dict[str, list[str]] = {}
    head_branch, head_id = repo.head()
    for name, cid in repo.branches().items():
        labels.setdefault(cid, []).append(f"HEAD -> {name}" if name == head_branch else name)
    if head_branch is None and head_id:
        labels.setdefault(head_id, []).insert(0, "HEAD")
    for name, tag in repo.tags().items():
        labels.setdefault(tag.object, []).append(f"tag: {name}")
    return labels


def _oneline(c: Commit, labels: dict[str, list[str]]) -> str:
    parts = [click.style(c.id[:12], fg="yellow")]
    if c.id in labels:
        parts.append(click.style(f"({', '.join(labels[c.id])})", fg="cyan"))
    if c.step is not None:
        parts.append(f"step={c.step}")
    if c.metrics:
        parts.append(_metric_text(c.metrics))
    if c.pruned is not None:
        parts.append(click.style(_released_mark(c.pruned), fg="red"))
    parts.append(c.message.splitlines()[0] if c.message else "")
    return " ".join(p for p in parts if p)


def _released_mark(record: dict[str, Any]) -> str:
    """The log mark of a commit whose tensor data was released."""
    if record.get("rule") == COLLECTED_RULE:
        return "[collected by gc]"
    return f"[pruned: {record.get('rule', '?')}]"


def _long(c: Commit, labels: dict[str, list[str]]) -> list[str]:
    head = click.style(f"commit {c.id}", fg="yellow")
    if c.id in labels:
        head += " " + click.style(f"({', '.join(labels[c.id])})", fg="cyan")
    lines = [head]
    if len(c.parents) > 1:
        lines.append("Merge:  " + " ".join(p[:12] for p in c.parents))
    lines.append(f"Author: {c.author}")
    lines.append(f"Date:   {_local_time(c.time)}")
    if c.step is not None:
        lines.append(f"Step:   {c.step}")
    if c.epoch is not None:
        lines.append(f"Epoch:  {c.epoch}")
    if c.metrics:
        lines.append("Metrics: " + _metric_text(c.metrics))
    if c.data_version:
        lines.append(f"Data:   {c.data_version}")
    if c.code_version:
        dirty = " (dirty)" if c.code_version.get("dirty") else ""
        lines.append(f"Code:   {c.code_version.get('git_commit', '?')}{dirty}")
    if c.pruned is not None and c.pruned.get("rule") == COLLECTED_RULE:
        lines.append(click.style(f"Collected: by gc on {_local_time(c.pruned.get('time', ''))} (tensor data released: "
                                 "no branch, tag or unexpired reflog entry kept it)", fg="red"))
    elif c.pruned is not None:
        why = f": {c.pruned['reason']}" if c.pruned.get("reason") else ""
        lines.append(click.style(f"Pruned: by {c.pruned.get('rule', '?')} on {_local_time(c.pruned.get('time', ''))}{why} "
                                 "(tensor data released)", fg="red"))
    lines.append("")
    lines += [f"    {line}" for line in (c.message or "(no message)").splitlines()]
    lines.append("")
    return lines


def _commit_json(c: Commit) -> dict[str, Any]:
    """A commit as one JSON object: its id, its record and its pruned record (or null)."""
    return {"id": c.id, **c.to_json(), "pruned": c.pruned}


@cli.command(cls=_LogCommand)
@click.argument("rev", default="HEAD", shell_complete=_complete_rev)
@click.option("-n", "max_count", type=click.IntRange(min=0), help="Show at most N commits (also -N, as in log -3).")
@click.option("--oneline", is_flag=True, help="One line per commit.")
@click.option("--graph", is_flag=True, help="Draw the commit graph.")
@click.option("--all", "all_refs", is_flag=True, help="Start from every branch and tag, not just REV.")
@click.option("--where", "where", multiple=True, metavar="EXPR",
              help="Only commits matching FIELD OP VALUE, e.g. \"val_loss < 0.3\" (repeatable: all must hold).")
@click.option("--json", "as_json", is_flag=True, help="Print the commits as one JSON list.")
@click.pass_context
def log(ctx: click.Context, rev: str, max_count: int | None, oneline: bool, graph: bool, all_refs: bool,
        where: tuple[str, ...], as_json: bool) -> None:
    """Show the history reachable from REV (default HEAD).

    REV may be a range A..B: the commits reachable from B and not from A (what B added
    since A); A.. means A..HEAD. --where filters by step, epoch, message, author, time,
    data_version, metrics.NAME (or a bare metric name) and config.KEY (docs/cli.md).
    """
    repo = _repo(ctx)
    if where:
        commits = repo.find(*where, rev=rev, all_refs=all_refs, n=max_count)
    else:
        commits = repo.all_commits()[:max_count] if all_refs else repo.log(rev, n=max_count)
    if as_json:
        click.echo(json.dumps([_commit_json(c) for c in commits], indent=2, sort_keys=True))
        return
    labels = _decorations(repo)
    texts = [[_oneline(c, labels)] if oneline else _long(c, labels) for c in commits]
    if graph:
        edges = [(c.id, c.parents) for c in commits]
        if where:  # a filtered history: join each commit to its nearest shown ancestors
            edges = catalog.shown_parents(commits, repo.all_commits() if all_refs else repo.log(rev))
        for line in graph_lines(edges, texts):
            click.echo(line)
    else:
        for block in texts:
            for line in block:
                click.echo(line)


@cli.command()
@click.option("--metric", required=True, metavar="NAME", help="The metric to rank by (e.g. val_loss).")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True,
              help="min: lower is better; max: higher is better.")
@click.option("-k", "k", type=click.IntRange(min=1), default=1, show_default=True, help="How many commits to show.")
@click.option("--branch", "branch", shell_complete=_complete_branch, help="Rank this branch's history (default HEAD's).")
@click.option("--where", "where", multiple=True, metavar="EXPR", help="Only commits matching EXPR (repeatable).")
@click.option("--include-pruned", is_flag=True, help="Also rank commits whose tensor data was released.")
@click.option("--json", "as_json", is_flag=True, help="Print the commits as one JSON list.")
@click.pass_context
def best(ctx: click.Context, metric: str, mode: str, k: int, branch: str | None, where: tuple[str, ...],
         include_pruned: bool, as_json: bool) -> None:
    """The K best commits by a metric, best first (ties: the newer commit first).

    Commits without the metric are skipped; pruned ones too unless --include-pruned.
    """
    repo = _repo(ctx)
    commits = repo.best(metric, mode=mode, k=k, branch=branch, where=where, include_pruned=include_pruned)
    if as_json:
        click.echo(json.dumps([_commit_json(c) for c in commits], indent=2, sort_keys=True))
        return
    labels = _decorations(repo)
    for c in commits:
        click.echo(_oneline(c, labels))


def _print_diff_stat(entries: list[DiffStat], as_json: bool) -> None:
    """``diff --stat``: one line per difference, then totals (git's layout, bytes for lines)."""
    if as_json:
        click.echo(json.dumps([e.__dict__ for e in entries], indent=2))
        return
    width = min(60, max((len(e.path) for e in entries), default=0))
    marks = {"added": "A", "removed": "D", "changed": "M"}
    for e in entries:
        if e.kind == "value":
            click.echo(f" {marks[e.status]} {e.path:<{width}} | value")
            continue
        bar = "#" * math.ceil(20 * e.changed_bytes / e.nbytes) if e.nbytes else ""
        click.echo(f" {marks[e.status]} {e.path:<{width}} | {_human(e.changed_bytes):>9} of {_human(e.nbytes):>9} {bar}")
    tensors = [e for e in entries if e.kind == "tensor"]
    count = {status: sum(e.status == status for e in tensors) for status in marks}
    click.echo(f" {count['changed']} tensor(s) changed, {count['added']} added, {count['removed']} removed: "
               f"{_human(sum(e.changed_bytes for e in tensors))} in changed chunks; "
               f"{len(entries) - len(tensors)} value(s) differ")


def _tensor_bytes(body: dict) -> int:
    name, shape = body.get("dtype"), body.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
        return 0  # a malformed manifest: `load` reports it; `show` just prints what it can
    itemsize = DTYPE_ITEMSIZE.get(name) if isinstance(name, str) else None
    return math.prod(shape) * (itemsize if itemsize is not None else _numpy_itemsize(body))


def _numpy_itemsize(body: dict) -> int:
    import numpy as np

    try:
        return np.dtype(body.get("dtype")).itemsize
    except (TypeError, ValueError):
        return 0


@cli.command()
@click.argument("rev", default="HEAD", shell_complete=_complete_rev)
@click.option("--tensors", "list_tensors", is_flag=True, help="List every tensor with dtype and shape.")
@click.option("--json", "as_json", is_flag=True, help="Print the commit record as JSON.")
@click.pass_context
def show(ctx: click.Context, rev: str, list_tensors: bool, as_json: bool) -> None:
    """Show a commit: metadata, provenance and what its state holds."""
    repo = _repo(ctx)
    c = repo.show(rev)
    if as_json:
        click.echo(json.dumps({"id": c.id, **c.to_json()}, indent=2, sort_keys=True))
        return
    for line in _long(c, _decorations(repo)):
        click.echo(line)
    if c.config is not None:
        click.echo(f"Config: {json.dumps(c.config, sort_keys=True)[:500]}")
    env = c.environment
    click.echo(f"Env:    python {env.get('python')}, torch {env.get('torch')}, numpy {env.get('numpy')}, "
               f"ckptvcs {env.get('ckptvcs')} on {env.get('hostname')} ({env.get('platform')})")
    tensors = list(iter_tensors(repo.manifest(c.id).root))
    groups: dict[str, list[int]] = {}
    for path, _, body in tensors:
        top = path.split("/", 1)[0]
        groups.setdefault(top, [0, 0])
        groups[top][0] += 1
        groups[top][1] += _tensor_bytes(body)
    click.echo(f"State:  {len(tensors)} tensors, {_human(c.stats.get('logical_bytes', 0))}")
    for top, (count, nbytes) in groups.items():
        click.echo(f"  {top:<30} {count:>6} tensors {_human(nbytes):>10}")
    if list_tensors:
        for path, kind, body in tensors:
            shape = body.get("shape")
            shape_text = str(list(shape)) if isinstance(shape, list) else "[?]"
            click.echo(f"  {path}  {body.get('dtype')}{shape_text}" + ("  (ndarray)" if kind == "ndarray" else ""))


@cli.command()
@click.argument("rev_a", shell_complete=_complete_rev)
@click.argument("rev_b", default="HEAD", shell_complete=_complete_rev)
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
@click.option("--stat", "as_stat", is_flag=True,
              help="Sizes per tensor from the stored chunk ids alone: fast, reads no tensor data.")
@click.pass_context
def diff(ctx: click.Context, rev_a: str, rev_b: str, as_json: bool, as_stat: bool) -> None:
    """Compare two commits tensor by tensor (REV_B defaults to HEAD)."""
    repo = _repo(ctx)
    if as_stat:
        _print_diff_stat(repo.diff_stat(rev_a, rev_b), as_json)
        return
    entries = repo.diff(rev_a, rev_b)
    if as_json:
        click.echo(json.dumps([
            {"path": e.path, "kind": e.kind, "status": e.status, "detail": e.detail,
             "fraction_changed": e.fraction_changed, "max_abs_diff": e.max_abs_diff}
            for e in entries
        ], indent=2, default=str))
        return
    marks = {"added": ("A", "green"), "removed": ("D", "red"), "changed": ("M", "yellow")}
    for e in entries:
        mark, color = marks[e.status]
        text = f"{mark} {e.path}  {e.detail}"
        if e.fraction_changed is not None:
            text += f"  {e.fraction_changed:.2%} of elements changed, max |diff| {e.max_abs_diff:.4g}"
        click.echo(click.style(text, fg=color))
    tensors = sum(e.kind == "tensor" for e in entries)
    click.echo(f"{tensors} tensor(s) and {len(entries) - tensors} value(s) differ")
