"""Commands on names: branch, tag, reflog."""

from __future__ import annotations

from datetime import datetime

import click

from ._app import (
    _complete_branch,
    _complete_rev,
    _complete_tag,
    _exists_hint,
    _repo,
    cli,
)


@cli.command()
@click.argument("name", required=False, shell_complete=_complete_branch)
@click.argument("rev", default="HEAD", shell_complete=_complete_rev)
@click.option("-d", "--delete", is_flag=True,
              help="Delete branch NAME; refused unless another branch or tag contains its commits.")
@click.option("-D", "force_delete", is_flag=True,
              help="Delete branch NAME even if no other branch or tag contains its commits.")
@click.option("-f", "--force", is_flag=True, help="Move NAME to REV if it exists.")
@click.pass_context
def branch(ctx: click.Context, name: str | None, rev: str, delete: bool, force_delete: bool, force: bool) -> None:
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
        repo.delete_branch(name, force=force_delete)
        click.echo(f"Deleted branch {name}" + (f" (was {tip[:12]})" if tip else ""))
        return
    with _exists_hint(f"add -f to move it (ckptvcs branch -f {name} {rev})"):
        commit_id = repo.branch(name, rev, force=force)
    click.echo(f"Branch {name} at {commit_id[:12]}")


@cli.command()
@click.argument("name", required=False, shell_complete=_complete_tag)
@click.argument("rev", default="HEAD", shell_complete=_complete_rev)
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
    with _exists_hint(f"add -f to move it (ckptvcs tag -f {name} {rev})"):
        commit_id = repo.tag(name, rev, message=message, force=force)
    click.echo(f"Tagged {commit_id[:12]} as {name}")


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
