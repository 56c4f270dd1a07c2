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
    from .trust import signing_key, verify_tag_command

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
