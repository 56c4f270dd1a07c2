"""The ``ckptvcs`` command: a thin click layer over :class:`ckptvcs.Repo`.

Commands parse arguments, call the library and print. Library errors become one line
on stderr (``error: ...``) and the error's exit code; no traceback reaches the user.
The repository is ``--repo``, else ``$CKPTVCS_REPO``, else a ``.ckptvcs`` directory in
the working directory or one of its parents.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .errors import CkptvcsError, InvalidInputError, RepositoryDamagedError
from .exchange import FORMATS, guess_format, read_state_file, write_state_file
from .graph import graph_lines
from .objects import Commit
from .repo import DEFAULT_CHUNK_SIZE, DEFAULT_KEYFRAME_INTERVAL, STORE_DIRNAME, Repo
from .state import TORCH_DTYPES, iter_tensors
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


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


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
    """A progress bar on stderr for long reads and writes, when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            if total < _PROGRESS_MIN_BYTES:
                return
            bar = click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True).__enter__()
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


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
              help="Repository path (default: $CKPTVCS_REPO, else .ckptvcs here or in a parent).")
@click.version_option(__version__, prog_name="ckptvcs")
@click.pass_context
def cli(ctx: click.Context, repo_path: str | None) -> None:
    """Git-like version control for model training checkpoints."""
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
            raise InvalidInputError(f"--metric wants NAME=NUMBER, got {pair!r}") from None
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
        parts.append(click.style(f"[pruned: {c.pruned.get('rule', '?')}]", fg="red"))
    parts.append(c.message.splitlines()[0] if c.message else "")
    return " ".join(p for p in parts if p)


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
    if c.pruned is not None:
        why = f": {c.pruned['reason']}" if c.pruned.get("reason") else ""
        lines.append(click.style(f"Pruned: by {c.pruned.get('rule', '?')} on {_local_time(c.pruned.get('time', ''))}{why} "
                                 "(tensor data released)", fg="red"))
    lines.append("")
    lines += [f"    {line}" for line in (c.message or "(no message)").splitlines()]
    lines.append("")
    return lines


@cli.command()
@click.argument("rev", default="HEAD")
@click.option("-n", "max_count", type=click.IntRange(min=0), help="Show at most N commits.")
@click.option("--oneline", is_flag=True, help="One line per commit.")
@click.option("--graph", is_flag=True, help="Draw the commit graph.")
@click.option("--all", "all_refs", is_flag=True, help="Start from every branch and tag, not just REV.")
@click.pass_context
def log(ctx: click.Context, rev: str, max_count: int | None, oneline: bool, graph: bool, all_refs: bool) -> None:
    """Show the history reachable from REV (default HEAD)."""
    repo = _repo(ctx)
    commits = repo.all_commits()[:max_count] if all_refs else repo.log(rev, n=max_count)
    labels = _decorations(repo)
    texts = [[_oneline(c, labels)] if oneline else _long(c, labels) for c in commits]
    if graph:
        for line in graph_lines([(c.id, c.parents) for c in commits], texts):
            click.echo(line)
    else:
        for block in texts:
            for line in block:
                click.echo(line)


def _tensor_bytes(body: dict) -> int:
    import torch

    name, shape = body.get("dtype"), body.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
        return 0  # a malformed manifest: `load` reports it; `show` just prints what it can
    dtype = TORCH_DTYPES.get(name) if isinstance(name, str) else None
    itemsize = torch.empty(0, dtype=dtype).element_size() if dtype is not None else _numpy_itemsize(body)
    return math.prod(shape) * itemsize


def _numpy_itemsize(body: dict) -> int:
    import numpy as np

    try:
        return np.dtype(body.get("dtype")).itemsize
    except (TypeError, ValueError):
        return 0


@cli.command()
@click.argument("rev", default="HEAD")
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
@click.argument("rev_a")
@click.argument("rev_b", default="HEAD")
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
@click.pass_context
def diff(ctx: click.Context, rev_a: str, rev_b: str, as_json: bool) -> None:
    """Compare two commits tensor by tensor (REV_B defaults to HEAD)."""
    repo = _repo(ctx)
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
@click.argument("rev")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the state to this file instead of moving HEAD.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Output format (default: from the extension).")
@click.pass_context
def checkout(ctx: click.Context, rev: str, output: str | None, fmt: str | None) -> None:
    """Move HEAD to REV (a branch, or a detached commit), or with -o write REV's state to a file."""
    repo = _repo(ctx)
    if output:
        _export(repo, rev, output, fmt)
        return
    commit_id = repo.checkout(rev)
    branch, _ = repo.head()
    if branch:
        click.echo(f"Switched to branch '{branch}' ({commit_id[:12]})")
    else:
        click.echo(f"HEAD is now at {commit_id[:12]} (detached)")


def _export(repo: Repo, rev: str, output: str, fmt: str | None) -> None:
    fmt = fmt or guess_format(output)
    commit_id = repo.resolve(rev)
    with _progress("loading") as progress:
        state = repo.load(commit_id, map_location="cpu", progress=progress)
    skipped = write_state_file(state, output, fmt, metadata={"ckptvcs.commit": commit_id} if fmt == "safetensors" else None)
    click.echo(f"Wrote {commit_id[:12]} to {output} ({fmt})")
    if skipped:
        listed = ", ".join(skipped[:8]) + (", ..." if len(skipped) > 8 else "")
        click.echo(f"note: safetensors holds tensors only; {len(skipped)} value(s) left out: {listed} "
                   "(use --format pt to keep everything)", err=True)


@cli.command()
@click.argument("rev")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Output format (default: from the extension).")
@click.pass_context
def export(ctx: click.Context, rev: str, file: str, fmt: str | None) -> None:
    """Write the state of REV to FILE (.pt or .safetensors)."""
    _export(_repo(ctx), rev, file, fmt)


@cli.command()
@click.argument("name", required=False)
@click.argument("rev", default="HEAD")
@click.option("-d", "--delete", is_flag=True, help="Delete branch NAME.")
@click.option("-f", "--force", is_flag=True, help="Move NAME to REV if it exists.")
@click.pass_context
def branch(ctx: click.Context, name: str | None, rev: str, delete: bool, force: bool) -> None:
    """List branches, create NAME at REV, or delete NAME with -d."""
    repo = _repo(ctx)
    if name is None:
        if delete:
            raise click.UsageError("branch -d needs a NAME")
        current, _ = repo.head()
        for branch_name, cid in repo.branches().items():
            marker = "*" if branch_name == current else " "
            click.echo(f"{marker} {branch_name:<24} {cid[:12]}")
        return
    if delete:
        repo.delete_branch(name)
        click.echo(f"Deleted branch {name}")
        return
    commit_id = repo.branch(name, rev, force=force)
    click.echo(f"Branch {name} at {commit_id[:12]}")


@cli.command()
@click.argument("name", required=False)
@click.argument("rev", default="HEAD")
@click.option("-m", "--message", default="", help="Tag message (release notes, audit trail).")
@click.option("-d", "--delete", is_flag=True, help="Delete tag NAME.")
@click.option("-f", "--force", is_flag=True, help="Move an existing tag (tags never move otherwise).")
@click.pass_context
def tag(ctx: click.Context, name: str | None, rev: str, message: str, delete: bool, force: bool) -> None:
    """List tags, tag REV as NAME, or delete NAME with -d."""
    repo = _repo(ctx)
    if name is None:
        if delete:
            raise click.UsageError("tag -d needs a NAME")
        for tag_name, record in repo.tags().items():
            first = record.message.splitlines()[0] if record.message else ""
            click.echo(f"{tag_name:<24} {record.object[:12]}  {first}")
        return
    if delete:
        repo.delete_tag(name)
        click.echo(f"Deleted tag {name}")
        return
    commit_id = repo.tag(name, rev, message=message, force=force)
    click.echo(f"Tagged {commit_id[:12]} as {name}")


@cli.command()
@click.argument("ref", default="HEAD")
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Reclaim the space of chunks no kept commit needs (pruned or unreachable commits)."""
    report = _repo(ctx).gc(dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    verb = "would reclaim" if dry_run else "reclaimed"
    click.echo(f"{report.live_commits} live commits ({report.pruned_commits} pruned), "
               f"{report.live_chunks} live chunks, {report.dead_chunks} dead")
    click.echo(f"packs: {len(report.packs_deleted)} deleted, {len(report.packs_rewritten)} rewritten"
               + (f", {len(report.packs_skipped)} unreadable left alone (run fsck)" if report.packs_skipped else ""))
    click.echo(f"{verb} {_human(report.bytes_reclaimed)} ({report.bytes_reclaimed} bytes); "
               f"packs now {_human(report.pack_bytes_after)}")
@contextlib.contextmanager
def _phase_progress() -> Iterator[Any]:
    """Progress bars for fsck's phases (``(phase, done, total)``) when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    bars: dict[str, Any] = {}
    labels = {"packs": "checking packs", "data": "reading data", "commits": "walking commits"}

    def update(phase: str, done: int, total: int) -> None:
        if total <= 0:
            return  # open-ended counts (commits) get no bar
        bar = bars.get(phase)
        if bar is None:
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


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli(prog_name="ckptvcs")
