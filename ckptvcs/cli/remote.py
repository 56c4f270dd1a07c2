"""Commands on remotes: remote (add, remove, -v), push, fetch, pull, clone (docs/remotes.md)."""

from __future__ import annotations

import json

import click

from ..errors import RepositoryDamagedError, UsageError
from ..remotes import add_remote, archive, clone, fetch, list_remotes, pull, push, remove_remote
from ..remotes.check import check_remote
from ..remotes.policy import TierPolicy, clear_policy, get_policy, set_policy
from ..repo import ARCHIVED_RULE, Repo
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
    repo = _repo(ctx)
    policy = get_policy(repo) if verbose else None
    for name, cfg in list_remotes(repo).items():
        if verbose:
            endpoint = f"  (endpoint {cfg.endpoint_url})" if cfg.endpoint_url else ""
            tier = f"  [tier policy: {policy.line()}]" if policy is not None and policy.remote == name else ""
            click.echo(f"{name}\t{cfg.url}{endpoint}{tier}")
        else:
            click.echo(name)


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--endpoint-url", help="S3-compatible server (MinIO, SeaweedFS, ...); default $AWS_ENDPOINT_URL or AWS.")
@click.option("--keep-local-last", type=int, metavar="N",
              help="Also set the tier policy: the newest N checkpoints stay local, the rest only on NAME.")
@click.option("--prune-remote", is_flag=True, help="With --keep-local-last: what the training manager's keep "
              "policy drops is pruned on the remote too (gc --remote reclaims it).")
@click.pass_context
def remote_add(ctx: click.Context, name: str, url: str, endpoint_url: str | None, keep_local_last: int | None,
               prune_remote: bool) -> None:
    """Add remote NAME at URL (s3://bucket/prefix, a path, memory://name). Credentials: the AWS variables."""
    repo = _repo(ctx)
    if keep_local_last is None and prune_remote:
        raise UsageError("--prune-remote needs --keep-local-last N (it is part of the tier policy)")
    if keep_local_last is not None:
        TierPolicy(name, keep_local_last, prune_remote)  # refuse bad input before adding anything
    add_remote(repo, name, url, endpoint_url)
    click.echo(f"Added remote {name}: {url}")
    if keep_local_last is not None:
        click.echo(f"Tier policy: {set_policy(repo, name, keep_local_last, prune_remote=prune_remote).line()}")


@cli.group(invoke_without_command=True)
@click.pass_context
def tier(ctx: click.Context) -> None:
    """Show the tier policy (which checkpoints stay local), or set and unset it (docs/remotes.md)."""
    if ctx.invoked_subcommand is not None:
        return
    policy = get_policy(_repo(ctx))
    click.echo("no tier policy (archive with `ckptvcs archive NAME --keep-last N`)" if policy is None
               else f"tier policy: {policy.line()}")


@tier.command("set")
@click.argument("name")
@click.option("--keep-local-last", type=int, required=True, metavar="N",
              help="The newest N checkpoints (and every tagged one and ref tip) keep their data local.")
@click.option("--prune-remote", is_flag=True, help="What the training manager's keep policy drops is pruned on "
              "the remote too (gc --remote reclaims it), instead of archived.")
@click.pass_context
def tier_set(ctx: click.Context, name: str, keep_local_last: int, prune_remote: bool) -> None:
    """Set the tier policy: keep the newest N checkpoints local, the rest only on remote NAME."""
    policy = set_policy(_repo(ctx), name, keep_local_last, prune_remote=prune_remote)
    click.echo(f"tier policy: {policy.line()}")


@tier.command("unset")
@click.pass_context
def tier_unset(ctx: click.Context) -> None:
    """Remove the tier policy (nothing is fetched back or archived by this)."""
    click.echo("tier policy removed" if clear_policy(_repo(ctx)) else "no tier policy was set")


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
@click.argument("name", required=False)
@click.option("--keep-last", type=click.IntRange(min=1),
              help="Keep the data of the newest N commits local (and every tag and branch tip); "
                   "default: the tier policy's (`ckptvcs tier set`).")
@click.option("--dry-run", is_flag=True, help="Only say what would be archived.")
@click.pass_context
def archive_cmd(ctx: click.Context, name: str | None, keep_last: int | None, dry_run: bool) -> None:
    """Release the local data of older commits that remote NAME holds (verified); loads fetch it back.

    NAME and --keep-last default to the tier policy (else NAME is origin and --keep-last is required)."""
    report = archive(_repo(ctx), name, keep_last=keep_last, dry_run=dry_run)
    verb = "would archive" if dry_run else "archived"
    click.echo(f"{verb} {len(report.archived)} commit(s) to {report.remote}; kept {len(report.kept)} local"
               + (f"; {len(report.not_on_remote)} older commit(s) not on the remote (push them first)"
                  if report.not_on_remote else ""))
    if report.gc is not None:
        click.echo(f"freed {_human(report.gc.bytes_reclaimed)} locally")


def gc_remote_cmd(repo: Repo, name: str, dry_run: bool, grace: str | None, as_json: bool) -> None:
    """``gc --remote NAME``: delete what no remote ref needs, older than the grace period."""
    from ..expiry import parse_expiry
    from ..remotes.remote_gc import DEFAULT_GRACE, gc_remote

    seconds = DEFAULT_GRACE if grace is None else parse_expiry(grace)
    report = gc_remote(repo, name, grace=seconds, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    for line in report.lines():
        click.echo(line)


def prune_remote_cmd(repo: Repo, name: str, rev: str, reason: str) -> None:
    """``prune --remote NAME REV``: the remote prune record (before the local prune)."""
    from ..remotes.remote_gc import prune_on_remote

    commit_id = repo.resolve(rev)
    if commit_id in repo._all_tips():
        return  # the local prune refuses it (a ref tip), before anything changes on the remote
    if not prune_on_remote(repo, name, [commit_id], "manual", reason):
        raise UsageError(f"commit {commit_id[:12]} is a branch tip or tagged commit on remote {name}: it cannot be "
                         "pruned there")
    record = repo.pruned_record(commit_id)
    if record is not None and record.get("rule") == ARCHIVED_RULE:  # its only copy is going: not archived any more
        repo._write_pruned_record(commit_id, "manual", reason)
    click.echo(f"Pruned {commit_id[:12]} on remote {name}: its data goes at the next `ckptvcs gc --remote {name}` "
               "past the grace period")
