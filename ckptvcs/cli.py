"""The ``ckptvcs`` command: a thin click layer over :class:`ckptvcs.Repo`.

Commands parse arguments, call the library and print. Library errors become one line
on stderr (``error: ...``) and the error's exit code; no traceback reaches the user.
The repository is ``--repo``, else ``$CKPTVCS_REPO``, else the nearest of the working
directory and its parents that is a repository or holds one as ``.ckptvcs``.

Start-up is kept light: torch is imported only by commands that read or write tensor
values (commit, load-backed diff, checkout -o, export), never by history, refs, status,
gc, fsck, help or shell completion.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from click.shell_completion import CompletionItem

from . import __version__, catalog
from .diff import DiffStat
from .errors import CkptvcsError, InvalidInputError, RefExistsError, RepositoryDamagedError, UsageError
from .exchange import FORMATS, export_metadata, export_state, guess_format, read_state_file, subtree
from .gc import COLLECTED_RULE
from .graph import graph_lines
from .objects import Commit
from .refs import Refs
from .repo import DEFAULT_CHUNK_SIZE, DEFAULT_KEYFRAME_INTERVAL, STORE_DIRNAME, Repo, _locate_store, find_store
from .state import DTYPE_ITEMSIZE, iter_tensors
from .store import Progress

__all__ = ["main", "cli"]

_PROGRESS_MIN_BYTES = 64 << 20


class _Group(click.Group):
    """Turns ckptvcs errors (and OS errors) into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CkptvcsError as err:
            _fail(str(err), err.exit_code)
        except OSError as err:
            _fail(f"{err.strerror or err}{f': {err.filename}' if err.filename else ''}", 13)
        except KeyboardInterrupt:
            _fail("interrupted", 130)


def _show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    """Warnings (a damaged branch or tag skipped while listing) as one ``warning:`` line."""
    click.echo(f"warning: {message}", err=True)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _LogCommand(click.Command):
    """``log -3`` means ``log -n 3``, as in git."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":
                rewritten += args[i:]
                break
            rewritten += ["-n", arg[1:]] if _DASH_NUMBER.match(arg) else [arg]
        return super().parse_args(ctx, rewritten)


_DASH_NUMBER = re.compile(r"^-[0-9]+$")


def _ref_names(ctx: click.Context, *namespaces: str) -> list[str]:
    """Branch and/or tag names of the repository the command line names, read from the ref
    files alone (no index, no torch), for shell completion. Never raises: a completion
    that fails offers nothing rather than printing into the user's shell."""
    try:
        path = ctx.find_root().params.get("repo_path") or os.environ.get("CKPTVCS_REPO")
        store = _locate_store(Path(path).absolute()) if path else find_store()
        if store is None:
            return []
        refs = Refs(store)
        return [name for namespace in namespaces for name in refs.names(namespace)]
    except Exception:
        return []


def _completions(candidates: Iterable[str], incomplete: str) -> list[CompletionItem]:
    # Complete the right side of a range A..B too.
    prefix, dots, rest = incomplete.rpartition("..")
    lead = prefix + dots
    return [CompletionItem(lead + c) for c in dict.fromkeys(candidates) if c.startswith(rest)]


def _complete_rev(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Revisions: HEAD, branch names and tag names."""
    return _completions(["HEAD", *_ref_names(ctx, "heads", "tags")], incomplete)


def _complete_branch(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    return _completions(_ref_names(ctx, "heads"), incomplete)


def _complete_tag(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    return _completions(_ref_names(ctx, "tags"), incomplete)


@contextlib.contextmanager
def _exists_hint(hint: str) -> Iterator[None]:
    """Name the CLI's way past a RefExistsError (the library's message names ``force``)."""
    try:
        yield
    except RefExistsError as err:
        raise RefExistsError(f"{err}: {hint}") from None


def _repo(ctx: click.Context) -> Repo:
    repo = ctx.obj.get("repo")
    if repo is None:
        path = ctx.obj.get("path")
        repo = Repo.open(path) if path else Repo.discover()
        ctx.obj["repo"] = repo
        ctx.call_on_close(repo.close)
    return repo


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Progress | None]:
    """A progress bar on stderr for long reads and writes (``(done, total)`` bytes), when stderr is a terminal.

    Small transfers (under ``_PROGRESS_MIN_BYTES``) get no bar.
    """
    with _phase_progress({"bytes": label}, min_total=_PROGRESS_MIN_BYTES) as update:
        yield None if update is None else functools.partial(update, "bytes")


def _human(n: float) -> str:
    n = min(n, 10**18)  # a crafted manifest's sizes may not fit a float
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _local_time(stamp: str) -> str:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")
    except ValueError:
        return stamp


def _metric_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.6g}" for k, v in metrics.items())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", "repo_path", envvar="CKPTVCS_REPO", type=click.Path(file_okay=False),
              help="Repository path (default: $CKPTVCS_REPO, else the repository this directory or a parent "
                   "is or holds as .ckptvcs).")
@click.version_option(__version__, prog_name="ckptvcs")
@click.pass_context
def cli(ctx: click.Context, repo_path: str | None) -> None:
    """Git-like version control for model training checkpoints."""
    ctx.with_resource(warnings.catch_warnings())  # restored when the command ends
    warnings.showwarning = _show_warning
    ctx.ensure_object(dict)
    ctx.obj["path"] = repo_path


@cli.command()
@click.argument("path", required=False, type=click.Path(file_okay=False))
@click.option("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, show_default=True,
              help="Chunk size in bytes (a multiple of 16, fixed for the repository's life).")
@click.option("--keyframe-interval", type=int, default=DEFAULT_KEYFRAME_INTERVAL, show_default=True,
              help="Store each chunk whole at least every K versions (a load resolves at most K-1 "
                   "deltas); 1 disables deltas against the parent commit.")
@click.pass_context
def init(ctx: click.Context, path: str | None, chunk_size: int, keyframe_interval: int) -> None:
    """Create a repository at PATH (default: --repo, else ./.ckptvcs)."""
    target = path or ctx.obj.get("path") or STORE_DIRNAME
    with Repo.init(target, chunk_size=chunk_size, keyframe_interval=keyframe_interval) as repo:
        click.echo(f"Initialized empty ckptvcs repository in {repo.root}")


def _parse_metrics(pairs: Iterable[str]) -> dict[str, float]:
    metrics = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            metrics[name] = float(value)
        except ValueError:
            raise UsageError(f"--metric wants NAME=NUMBER, got {pair!r}") from None
    return metrics


def _read_config(path: str | None) -> Any:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InvalidInputError(f"--config {path}: not a readable JSON file ({err})") from None


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-m", "--message", default="", help="Commit message.")
@click.option("--step", type=int, help="Training step of this checkpoint.")
@click.option("--epoch", type=int, help="Epoch of this checkpoint.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME=VALUE", help="A metric (repeatable).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON file of the run's config.")
@click.option("--data-version", help="Version of the training data (free text).")
@click.option("-b", "--branch", help="Commit onto this branch (created from HEAD if new) without moving HEAD.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="File format (default: from the extension).")
@click.pass_context
def commit(ctx: click.Context, file: str, message: str, step: int | None, epoch: int | None,
           metrics: tuple[str, ...], config_file: str | None, data_version: str | None,
           branch: str | None, fmt: str | None) -> None:
    """Commit a checkpoint FILE (.pt read with weights_only=True, or .safetensors)."""
    repo = _repo(ctx)
    parsed_metrics = _parse_metrics(metrics)
    config = _read_config(config_file)
    state, file_metadata = read_state_file(file, fmt)
    if file_metadata:
        config = {"run": config, "safetensors_metadata": file_metadata} if config is not None \
            else {"safetensors_metadata": file_metadata}
    with _progress("committing") as progress:
        commit_id = repo.commit(state, message=message, branch=branch, step=step, epoch=epoch,
                                metrics=parsed_metrics, config=config, data_version=data_version,
                                progress=progress)
    record = repo.show(commit_id)
    where = branch or repo.head()[0] or "detached HEAD"
    s = record.stats
    click.echo(
        f"[{where} {commit_id[:12]}] {message.splitlines()[0] if message else '(no message)'}\n"
        f" {s['tensors']} tensors, {_human(s['logical_bytes'])}; {s['new_chunks']} new chunks, "
        f"{_human(s['new_stored_bytes'])} stored"
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
    from .cli_trust import verification_line

    verified = verification_line(repo.last_verification(c.id))
    if verified:
        click.echo(f"Verified: {verified}")
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


@cli.command()
@click.argument("rev", required=False, shell_complete=_complete_rev)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the state to this file instead of moving HEAD.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Output format (default: from the extension).")
@click.option("--key", help="With -o: write only this entry of the state (e.g. model).")
@click.option("-b", "new_branch", metavar="NAME", help="Create branch NAME at REV (default HEAD) and switch to it.")
@click.pass_context
def checkout(ctx: click.Context, rev: str | None, output: str | None, fmt: str | None, key: str | None,
             new_branch: str | None) -> None:
    """Move HEAD to REV (a branch, or a detached commit), or with -o write REV's state to a file.

    With -b NAME, create branch NAME at REV (default HEAD) and switch to it.
    """
    repo = _repo(ctx)
    if key is not None and not output:
        raise click.UsageError("--key needs -o FILE")
    if new_branch is not None or rev is None:
        _checkout_new_branch(repo, new_branch, rev, output)
        return
    if output:
        _export(repo, rev, output, fmt, key)
        return
    before = _detached_commits(repo)
    commit_id = repo.checkout(rev)
    still_held = {c.id for c in _detached_commits(repo)}
    _warn_left_behind(repo, [c for c in before if c.id not in still_held])
    branch, _ = repo.head()
    if branch:
        click.echo(f"Switched to branch '{branch}' ({commit_id[:12]})")
    else:
        click.echo(f"HEAD is now at {commit_id[:12]} (detached)")


def _checkout_new_branch(repo: Repo, name: str | None, rev: str | None, output: str | None) -> None:
    """``checkout -b NAME [REV]``: create branch NAME at REV (default HEAD) and put HEAD on it."""
    if name is None:
        raise click.UsageError("checkout needs a REV, or -b NAME to start a new branch")
    if output:
        raise click.UsageError("-b creates a branch and -o writes a file: use one of them")
    rev = rev or "HEAD"
    with _exists_hint(f"switch to it with `ckptvcs checkout {name}`, or move it with `ckptvcs branch -f {name} {rev}`"):
        repo.branch(name, rev)
    commit_id = repo.checkout(name)
    click.echo(f"Switched to a new branch '{name}' ({commit_id[:12]})")


def _detached_commits(repo: Repo) -> list[Commit]:
    """The commits only a detached HEAD holds (none when HEAD is on a branch)."""
    branch, head_id = repo.head()
    return repo.commits_not_on_refs() if branch is None and head_id else []


def _warn_left_behind(repo: Repo, commits: list[Commit], shown: int = 5) -> None:
    """What git says on leaving commits of a detached HEAD behind: which, and how to keep them."""
    if not commits:
        return
    click.echo(f"warning: leaving {len(commits)} commit(s) behind that no branch or tag contains:", err=True)
    for c in commits[:shown]:
        click.echo(f"  {c.id[:12]} {c.message.splitlines()[0] if c.message else '(no message)'}", err=True)
    if len(commits) > shown:
        click.echo(f"  ... and {len(commits) - shown} more", err=True)
    click.echo(f"The reflog keeps them for {_duration(repo.reflog_expire)}, then gc releases their data. "
               f"Keep them with a branch: ckptvcs branch NAME {commits[0].id[:12]}", err=True)


def _duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "ever"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds / size
            return f"{count:.0f} {unit}{'s' if round(count) != 1 else ''}"
    return f"{seconds:.0f} seconds"


def _export(repo: Repo, rev: str, output: str, fmt: str | None, key: str | None = None) -> None:
    fmt = fmt or guess_format(output)
    commit_id = repo.resolve(rev)
    with _progress("loading") as progress:
        state = repo.load(commit_id, keys=None if key is None else [key.split("/")[0]],
                          map_location="cpu", progress=progress)
    if key is not None:
        state = subtree(state, key)
    metadata = export_metadata(repo.show(commit_id).config, commit_id) if fmt == "safetensors" else None
    result = export_state(state, output, fmt, metadata)
    click.echo(f"Wrote {commit_id[:12]}{f' {key}' if key else ''} to {output} ({fmt})")
    if result.tied:
        pairs = [f"{', '.join(drop)} (= {keep})" for keep, drop in result.tied.items()]
        click.echo(f"note: tied tensors written once; left out: {'; '.join(pairs[:8])}"
                   + ("; ..." if len(pairs) > 8 else ""), err=True)
    if result.skipped:
        skipped = result.skipped
        listed = ", ".join(skipped[:8]) + (", ..." if len(skipped) > 8 else "")
        click.echo(f"note: safetensors holds tensors only; {len(skipped)} value(s) left out: {listed} "
                   "(use --format pt to keep everything)", err=True)


@cli.command()
@click.argument("rev", shell_complete=_complete_rev)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Output format (default: from the extension).")
@click.option("--key", help="Write only this entry of the state (e.g. model; nested: model/encoder).")
@click.pass_context
def export(ctx: click.Context, rev: str, file: str, fmt: str | None, key: str | None) -> None:
    """Write the state of REV to FILE (.pt or .safetensors)."""
    _export(_repo(ctx), rev, file, fmt, key)


@cli.command()
@click.argument("name", required=False, shell_complete=_complete_branch)
@click.argument("rev", default="HEAD", shell_complete=_complete_rev)
@click.option("-d", "--delete", is_flag=True,
              help="Delete branch NAME; refused unless another branch or tag contains its commits.")
@click.option("-D", "force_delete", is_flag=True,
              help="Delete branch NAME even if no other branch or tag contains its commits.")
@click.option("-f", "--force", is_flag=True, help="Move NAME to REV if it exists.")
@click.option("--override-protection", is_flag=True, help="Delete or move NAME even if it is protected (audited).")
@click.pass_context
def branch(ctx: click.Context, name: str | None, rev: str, delete: bool, force_delete: bool, force: bool,
           override_protection: bool) -> None:
    """List branches, create NAME at REV, or delete NAME with -d (-D: even if unmerged)."""
    repo = _repo(ctx)
    delete = delete or force_delete
    if name is None:
        if delete:
            raise click.UsageError("branch -d/-D needs a NAME")
        current, _ = repo.head()
        for branch_name, cid in repo.branches().items():
            marker = "*" if branch_name == current else " "
            click.echo(f"{marker} {branch_name:<24} {cid[:12]}")
        return
    if delete:
        tip = repo.branches().get(name)
        repo.delete_branch(name, force=force_delete, override_protection=override_protection)
        click.echo(f"Deleted branch {name}" + (f" (was {tip[:12]})" if tip else ""))
        return
    with _exists_hint(f"add -f to move it (ckptvcs branch -f {name} {rev})"):
        commit_id = repo.branch(name, rev, force=force, override_protection=override_protection)
    click.echo(f"Branch {name} at {commit_id[:12]}")


@cli.command()
@click.argument("name", required=False, shell_complete=_complete_tag)
@click.argument("rev", default="HEAD", shell_complete=_complete_rev)
@click.option("-m", "--message", default="", help="Tag message (release notes, audit trail).")
@click.option("-d", "--delete", is_flag=True, help="Delete tag NAME.")
@click.option("-f", "--force", is_flag=True, help="Move an existing tag (tags never move otherwise).")
@click.option("-s", "--sign", is_flag=True, help="Sign the tag with the Ed25519 key of --key (docs/audit.md).")
@click.option("--key", type=click.Path(dir_okay=False), help="Private key (PEM) for -s; default $CKPTVCS_SIGNING_KEY.")
@click.option("-v", "--verify", "verify_it", is_flag=True,
              help="Verify NAME's signature and re-hash everything it pins.")
@click.option("--trusted-key", "trusted", multiple=True, type=click.Path(dir_okay=False),
              help="With -v: a trusted public key (PEM; repeatable). Default: the repository's keys/.")
@click.option("--override-protection", is_flag=True, help="Delete or move NAME even if it is protected (audited).")
@click.pass_context
def tag(ctx: click.Context, name: str | None, rev: str, message: str, delete: bool, force: bool, sign: bool,
        key: str | None, verify_it: bool, trusted: tuple[str, ...], override_protection: bool) -> None:
    """List tags, tag REV as NAME (-s: signed), verify NAME with -v, or delete NAME with -d."""
    from .cli_trust import signing_key, verify_tag_command

    repo = _repo(ctx)
    if verify_it:
        if name is None:
            raise click.UsageError("tag -v needs a NAME")
        verify_tag_command(ctx, name, trusted)
        return
    key = signing_key(key) if sign else None
    if sign and key is None:
        raise click.UsageError("tag -s needs --key KEYFILE (or $CKPTVCS_SIGNING_KEY); create one with `ckptvcs keygen`")
    if name is None:
        if delete:
            raise click.UsageError("tag -d needs a NAME")
        for tag_name, record in repo.tags().items():
            first = record.message.splitlines()[0] if record.message else ""
            signed = "signed" if record.signature else "      "
            click.echo(f"{tag_name:<24} {record.object[:12]}  {signed}  {first}")
        return
    if delete:
        repo.delete_tag(name, override_protection=override_protection)
        click.echo(f"Deleted tag {name}")
        return
    with _exists_hint(f"add -f to move it (ckptvcs tag -f {name} {rev})"):
        commit_id = repo.tag(name, rev, message=message, force=force, key=key,
                             override_protection=override_protection)
    click.echo(f"Tagged {commit_id[:12]} as {name}" + (" (signed)" if key else ""))


@cli.command()
@click.argument("ref", default="HEAD", shell_complete=_complete_rev)
@click.option("-n", "max_count", type=click.IntRange(min=0), help="Show at most N entries.")
@click.pass_context
def reflog(ctx: click.Context, ref: str, max_count: int | None) -> None:
    """Show where REF (default HEAD) has pointed, newest first."""
    repo = _repo(ctx)
    for i, entry in enumerate(repo.reflog(ref)[:max_count]):
        stamp = datetime.fromtimestamp(entry.time_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{click.style(entry.new[:12], fg='yellow')} {ref}@{{{i}}} {stamp} {entry.message}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Logical vs stored size, dedup and compression ratios, commit and chunk counts."""
    s = _repo(ctx).stats()
    if as_json:
        click.echo(json.dumps({**s.__dict__, "dedup_ratio": s.dedup_ratio, "compression_ratio": s.compression_ratio}, indent=2))
        return
    rows = [
        ("commits", str(s.commits)),
        ("branches / tags", f"{s.branches} / {s.tags}"),
        ("chunks", str(s.chunks)),
        ("logical bytes", f"{_human(s.logical_bytes)}  (tensor bytes of all commits)"),
        ("unique bytes", f"{_human(s.unique_bytes)}  (distinct chunks, uncompressed)"),
        ("stored bytes", f"{_human(s.stored_bytes)}  (chunks as stored)"),
        ("on disk", f"{_human(s.pack_bytes + s.object_bytes)}  (packs + objects)"),
        ("dedup ratio", f"{s.dedup_ratio:.2f}x"),
        ("compression ratio", f"{s.compression_ratio:.2f}x"),
        ("overall", f"{s.logical_bytes / max(1, s.pack_bytes + s.object_bytes):.2f}x"),
    ]
    for label, value in rows:
        click.echo(f"{label:<18} {value}")


@cli.command()
@click.option("-n", "--dry-run", is_flag=True, help="Report what would be reclaimed; change nothing.")
@click.option("--prune", "expire", metavar="EXPIRY",
              help="Keep commits named by reflog entries younger than EXPIRY: 'now' (none), 'never' (all), "
                   "or a number and unit such as 90s, 12h, 7d, 2.weeks, 3.months "
                   "(default: config.json's reflog_expire, 30.days).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, expire: str | None, as_json: bool) -> None:
    """Reclaim the space of chunks no kept commit needs (pruned or unreachable commits).

    Kept: every commit a branch, tag or HEAD reaches, and (git's grace) every commit
    a reflog entry younger than the expiry names, with its history.
    """
    report = _repo(ctx).gc(dry_run=dry_run, prune_unreachable_after=expire)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    verb = "would reclaim" if dry_run else "reclaimed"
    click.echo(f"{report.live_commits} live commits ({report.pruned_commits} pruned), "
               f"{report.live_chunks} live chunks, {report.dead_chunks} dead")
    if report.collected_commits:
        click.echo(f"{len(report.collected_commits)} unreachable commit(s) {'would lose' if dry_run else 'lost'} "
                   "their data (history stays; `log` and `show` mark them collected)")
    click.echo(f"packs: {len(report.packs_deleted)} deleted, {len(report.packs_rewritten)} rewritten"
               + (f", {len(report.packs_skipped)} unreadable left alone (run fsck)" if report.packs_skipped else ""))
    click.echo(f"{verb} {_human(report.bytes_reclaimed)} ({report.bytes_reclaimed} bytes); "
               f"packs now {_human(report.pack_bytes_after)}")


_PHASE_LABELS = {"packs": "checking packs", "data": "reading data", "commits": "walking commits"}


@contextlib.contextmanager
def _phase_progress(labels: dict[str, str] = _PHASE_LABELS, min_total: int = 1) -> Iterator[Any]:
    """Progress bars on stderr, one phase after another (``(phase, done, total)``), when stderr is a terminal.

    The one progress helper of the CLI (:func:`_progress` is its single-phase form).
    A phase whose total is under ``min_total`` gets no bar: open-ended counts (total 0)
    never do.
    """
    if not sys.stderr.isatty():
        yield None
        return
    bars: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase)
        if bar is None:
            if total <= 0 or total < min_total:
                return
            for other in bars.values():
                other.__exit__(None, None, None)
            bars.clear()
            bar = bars[phase] = click.progressbar(length=total, label=labels.get(phase, phase),
                                                  file=sys.stderr, show_eta=True).__enter__()
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.__exit__(None, None, None)


@cli.command()
@click.option("--read-data", is_flag=True, help="Also read every chunk back and verify it against its BLAKE3 id.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.pass_context
def fsck(ctx: click.Context, read_data: bool, as_json: bool) -> None:
    """Check the repository: refs, commits, manifests, index and packs (and data with --read-data).

    Prints one line per finding. Garbage (left by interrupted commits, removed by gc)
    is listed but is not an error; any damage makes the exit code non-zero.
    """
    repo = _repo(ctx)
    with _phase_progress() as progress:
        report = repo.fsck(read_data=read_data, progress=progress)
    if as_json:
        click.echo(json.dumps({
            "ok": report.ok, "summary": report.summary(),
            "findings": [{"kind": f.kind, "error": f.is_error, "message": f.message, "objects": list(f.objects),
                          "commits": list(f.commits), "tensors": list(f.tensors), "refs": list(f.refs)}
                         for f in report.findings],
        }, indent=2))
    else:
        for finding in report.errors + report.garbage:
            click.echo(click.style(str(finding), fg="red" if finding.is_error else None))
        click.echo(report.summary())
    if not report.ok:
        hint = "; `ckptvcs repair index` fixes index-mismatch" if any(f.kind == "index-mismatch" for f in report.errors) else ""
        raise RepositoryDamagedError(f"fsck found {len(report.errors)} problem(s) in {repo.root}{hint}")


@cli.group()
def repair() -> None:
    """Repair derived data (the chunk index) from the primary data (the packs)."""


@repair.command("index")
@click.pass_context
def repair_index(ctx: click.Context) -> None:
    """Rebuild the chunk index from the packs (under the exclusive repository lock)."""
    repo = _repo(ctx)
    with _phase_progress() as progress:
        report = repo.repair_index(progress=None if progress is None else lambda d, t: progress("packs", d, t))
    click.echo(report.summary())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Where HEAD is (branch, commit, step, metrics), what gc would reclaim, and the last fsck's verdict.

    Reads the history and runs gc's dry run (briefly under the repository lock, like
    `gc --dry-run`); reads no tensor data.
    """
    repo = _repo(ctx)
    branch_name, head_id = repo.head()
    head = repo.show(head_id) if head_id else None
    report = repo.gc(dry_run=True)
    checked = repo.last_fsck()
    verified = repo.last_verification(head_id) if head_id else None
    if as_json:
        click.echo(json.dumps({
            "branch": branch_name, "head": head_id,
            "step": head.step if head else None, "epoch": head.epoch if head else None,
            "metrics": head.metrics if head else None, "message": head.message if head else None,
            "time": head.time if head else None,
            "gc": {"reclaimable_bytes": report.bytes_reclaimed, "pruned_commits": report.pruned_commits,
                   "dead_chunks": report.dead_chunks},
            "fsck": checked,
            "verified": verified,
        }, indent=2))
        return
    for line in _status_lines(branch_name, head, report, checked):
        click.echo(line)
    from .cli_trust import verification_line

    click.echo(f"verify:  {verification_line(verified) or 'HEAD never verified; run `ckptvcs verify`'}")


def _status_lines(branch_name: str | None, head: Commit | None, report: Any, checked: dict | None) -> list[str]:
    lines = [f"On branch {branch_name}" if branch_name else f"HEAD detached at {head.id[:12] if head else '?'}"]
    if head is None:
        lines.append("No commits yet")
    else:
        where = f"step {head.step}" if head.step is not None else "no step recorded"
        lines.append(f"HEAD:    {click.style(head.id[:12], fg='yellow')} {where}, {_local_time(head.time)}")
        if head.message:
            lines.append(f"Message: {head.message.splitlines()[0]}")
        lines.append(f"Metrics: {_metric_text(head.metrics) if head.metrics else '(none)'}")
    pruned = f" ({report.pruned_commits} pruned commit(s))" if report.pruned_commits else ""
    if report.bytes_reclaimed:
        lines.append(f"gc:      would reclaim {_human(report.bytes_reclaimed)}{pruned}; run `ckptvcs gc`")
    else:
        lines.append(f"gc:      nothing to reclaim{pruned}")
    if checked is None:
        lines.append("fsck:    never run here; run `ckptvcs fsck`")
    else:
        verdict = "clean" if checked["ok"] else click.style(f"{checked.get('errors', '?')} problem(s)", fg="red")
        depth = " with --read-data" if checked.get("read_data") else ""
        lines.append(f"fsck:    {verdict} (last run{depth} {_local_time(str(checked.get('time', '?')))})")
    return lines


@cli.command()
@click.argument("rev", shell_complete=_complete_rev)
@click.option("--reason", default="", help="Why, in words (kept in the commit's pruned record).")
@click.pass_context
def prune(ctx: click.Context, rev: str, reason: str) -> None:
    """Drop REV's tensor data at the next gc, keeping its history record.

    The commit stays in log and show (marked pruned) with its metadata and metrics, and
    its children keep their parent; loading it fails from now on. A commit a branch,
    tag or HEAD points at cannot be pruned. The space returns with `ckptvcs gc`.
    """
    commit_id = _repo(ctx).prune(rev, rule="manual", reason=reason)
    click.echo(f"Pruned {commit_id[:12]}: history kept; its data goes at the next `ckptvcs gc`")


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli(prog_name="ckptvcs")


from . import cli_trust  # noqa: E402, F401  (registers verify, verify-tag, keygen, trust, protect, unprotect, audit)
