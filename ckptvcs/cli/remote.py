"""Commands on remotes: remote (add, remove, -v), push, fetch, pull, clone (docs/remotes.md)."""

from __future__ import annotations

import json

import click

from ..errors import RepositoryDamagedError
from ..remotes import add_remote, archive, clone, fetch, list_remotes, pull, push, remove_remote
from ..remotes.check import check_remote
from ..repo import Repo
from ._app import _human, _progress, _repo, cli


def _short(value: str | None) -> str:
    return value[:12] if value else "(none)"


@cli.group(invoke_without_command=True)
@click.option("-v", "--verbose", is_flag=True, help="Show each remote's URL (and endpoint).")
@click.pass_context
def remote(ctx: click.Context, verbose: bool) -> None:
    """List remotes (-v: with URLs), or add and remove them."""
    if ctx.invoked_subcommand is not None:
        return
    for name, cfg in list_remotes(_repo(ctx)).items():
        if verbose:
            endpoint = f"  (endpoint {cfg.endpoint_url})" if cfg.endpoint_url else ""
            click.echo(f"{name}\t{cfg.url}{endpoint}")
        else:
            click.echo(name)


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--endpoint-url", help="S3-compatible server (MinIO, SeaweedFS, ...); default $AWS_ENDPOINT_URL or AWS.")
@click.pass_context
def remote_add(ctx: click.Context, name: str, url: str, endpoint_url: str | None) -> None:
    """Add remote NAME at URL (s3://bucket/prefix, a path, memory://name). Credentials: the AWS variables."""
    add_remote(_repo(ctx), name, url, endpoint_url)
    click.echo(f"Added remote {name}: {url}")


@remote.command("remove")
@click.argument("name")
@click.pass_context
def remote_remove(ctx: click.Context, name: str) -> None:
    """Forget remote NAME and its remote-tracking branches (the remote's data is untouched)."""
    remove_remote(_repo(ctx), name)
    click.echo(f"Removed remote {name}")


@cli.command("push")
@click.argument("name", default="origin")
@click.argument("refs", nargs=-1)
@click.option("-f", "--force", is_flag=True, help="Move remote branches and tags even when not a fast-forward.")
@click.pass_context
def push_cmd(ctx: click.Context, name: str, refs: tuple[str, ...], force: bool) -> None:
    """Upload what remote NAME lacks for REFS (default: the current branch), then move its refs."""
    repo = _repo(ctx)
    with _progress(f"pushing to {name}") as progress:
        report = push(repo, name, list(refs) or None, force=force, progress=progress)
    for ref in report.up_to_date:
        click.echo(f"  {ref}: up to date")
    for ref, (old, new) in report.updated.items():
        click.echo(f"  {ref}: {_short(old)} -> {_short(new)}")
    click.echo(f"Pushed to {report.remote}: {len(report.packs_sent)} packs, {report.objects_sent} objects, "
               f"{_human(report.bytes_sent)}")


@cli.command("fetch")
@click.argument("name", default="origin")
@click.pass_context
def fetch_cmd(ctx: click.Context, name: str) -> None:
    """Download what remote NAME has and this repository lacks (verified); update NAME/<branch>."""
    with _progress(f"fetching from {name}") as progress:
        report = fetch(_repo(ctx), name, progress=progress)
    for ref, (old, new) in report.updated.items():
        click.echo(f"  {ref}: {_short(old)} -> {_short(new) if new else '(deleted)'}")
    click.echo(f"Fetched from {report.remote}: {len(report.packs_received)} packs, {report.objects_received} objects, "
               f"{_human(report.bytes_received)}, {report.chunks_verified} chunks verified")


@cli.command("pull")
@click.argument("name", default="origin")
@click.pass_context
def pull_cmd(ctx: click.Context, name: str) -> None:
    """fetch NAME, then fast-forward the current branch to NAME's (diverged histories are refused)."""
    repo = _repo(ctx)
    with _progress(f"fetching from {name}") as progress:
        _, moved = pull(repo, name, progress=progress)
    branch, head = repo.head()
    click.echo(f"Fast-forwarded {branch} to {_short(moved)}" if moved else f"{branch} is up to date ({_short(head)})")


@cli.command("clone")
@click.argument("url")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--endpoint-url", help="S3-compatible server; default $AWS_ENDPOINT_URL or AWS.")
@click.option("-o", "--origin", "name", default="origin", show_default=True, help="Name of the remote.")
@click.option("--lazy", is_flag=True, help="History only; each load fetches just the chunks it reads (verified, kept).")
def clone_cmd(url: str, directory: str, endpoint_url: str | None, name: str, lazy: bool) -> None:
    """Create repository DIRECTORY from the remote at URL and check out its default branch."""
    with _progress("cloning") as progress:
        repo = clone(url, directory, endpoint_url=endpoint_url, name=name, progress=progress, lazy=lazy)
    with repo:
        branch, head = repo.head()
        click.echo(f"Cloned {url} into {repo.root} ({branch} at {_short(head)})")


def fsck_remote(repo: Repo, name: str, read_data: bool, as_json: bool) -> None:
    """``fsck --remote NAME``: one line per finding, a summary, exit 10 on damage."""
    report = check_remote(repo, name, read_data=read_data)
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "summary": report.summary(), "findings": report.findings}, indent=2))
    else:
        for finding in report.findings:
            click.echo(click.style(finding, fg="red"))
        click.echo(report.summary())
    if not report.ok:
        raise RepositoryDamagedError(f"fsck found {len(report.findings)} problem(s) on remote {name}")


@cli.command("archive")
@click.argument("name", default="origin")
@click.option("--keep-last", type=click.IntRange(min=1), required=True,
              help="Keep the data of the newest N commits local (and every tag and branch tip).")
@click.option("--dry-run", is_flag=True, help="Only say what would be archived.")
@click.pass_context
def archive_cmd(ctx: click.Context, name: str, keep_last: int, dry_run: bool) -> None:
    """Release the local data of older commits that remote NAME holds (verified); loads fetch it back."""
    report = archive(_repo(ctx), name, keep_last=keep_last, dry_run=dry_run)
    verb = "would archive" if dry_run else "archived"
    click.echo(f"{verb} {len(report.archived)} commit(s) to {report.remote}; kept {len(report.kept)} local"
               + (f"; {len(report.not_on_remote)} older commit(s) not on the remote (push them first)"
                  if report.not_on_remote else ""))
    if report.gc is not None:
        click.echo(f"freed {_human(report.gc.bytes_reclaimed)} locally")
