"""Commands that move tensor data in and out: init, commit, checkout, export."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from ..errors import InvalidInputError, UsageError
from ..exchange import FORMATS, export_metadata, export_state, guess_format, read_state_file, subtree
from ..objects import Commit
from ..repo import DEFAULT_CHUNK_SIZE, DEFAULT_KEYFRAME_INTERVAL, STORE_DIRNAME, Repo
from ._app import (
    _complete_rev,
    _exists_hint,
    _human,
    _progress,
    _repo,
    cli,
)


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
