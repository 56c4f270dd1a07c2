"""Commands that inspect and look after the repository: stats, gc, fsck, repair, status, prune."""

from __future__ import annotations

import json
from typing import Any

import click

from ..errors import RepositoryDamagedError
from ..objects import Commit
from ._app import (
    _complete_rev,
    _human,
    _local_time,
    _metric_text,
    _phase_progress,
    _repo,
    cli,
)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Logical vs stored size, dedup and compression ratios, commit and chunk counts, and which
    tier holds each commit (local only, local + remote, only on the remote, not fetched)."""
    repo = _repo(ctx)
    s = repo.stats()
    tiers = _tiers(repo)
    if as_json:
        click.echo(json.dumps({**s.__dict__, "dedup_ratio": s.dedup_ratio, "compression_ratio": s.compression_ratio,
                               "tiers": tiers.as_dict()}, indent=2))
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
        ("tiers", tiers.line()),
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
@click.option("--remote", "remote_name", metavar="NAME", help="Collect on remote NAME instead (docs/remotes.md).")
@click.option("--grace", metavar="AGE", help="With --remote: only delete what is older than AGE (default 1d; "
              "longer than any push takes).")
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, expire: str | None, as_json: bool, remote_name: str | None,
       grace: str | None) -> None:
    """Reclaim the space of chunks no kept commit needs (pruned or unreachable commits).

    Kept: every commit a branch, tag or HEAD reaches, and (git's grace) every commit
    a reflog entry younger than the expiry names, with its history. With --remote NAME:
    the remote's packs and objects no remote ref needs, older than --grace.
    """
    if remote_name is not None:
        from .remote import gc_remote_cmd

        gc_remote_cmd(_repo(ctx), remote_name, dry_run, grace, as_json)
        return
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


@cli.command()
@click.option("--read-data", is_flag=True, help="Also read every chunk back and verify it against its BLAKE3 id.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--remote", "remote_name", metavar="NAME", help="Check remote NAME instead (docs/remotes.md).")
@click.pass_context
def fsck(ctx: click.Context, read_data: bool, as_json: bool, remote_name: str | None) -> None:
    """Check the repository: refs, commits, manifests, index and packs (and data with --read-data).

    Prints one line per finding. Garbage (left by interrupted commits, removed by gc)
    is listed but is not an error; any damage makes the exit code non-zero.
    """
    repo = _repo(ctx)
    if remote_name is not None:
        from .remote import fsck_remote

        fsck_remote(repo, remote_name, read_data, as_json)
        return
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
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be re-encoded; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def repack(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Store the newest checkpoint of every branch as keyframes (reverse deltas, as git's repack).

    Chunks of branch tips stored as deltas are re-encoded whole; their older versions
    become deltas against the newer ones. Commits do not change; loading a tip reads no
    delta chain. Runs under the exclusive repository lock, like gc.
    """
    repo = _repo(ctx)
    with _phase_progress({"chains": "re-encoding chains"}) as progress:
        report = repo.repack(dry_run=dry_run,
                             progress=None if progress is None else lambda d, t: progress("chains", d, t))
    if as_json:
        click.echo(json.dumps(report.__dict__, indent=2))
        return
    click.echo(report.summary())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--gc", "with_gc", is_flag=True,
              help="Also run gc's dry run: what gc would reclaim (reads every commit; slow on long histories).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, with_gc: bool) -> None:
    """Where HEAD is (branch, commit, step, metrics), the last fsck's verdict, and with
    --gc what gc would reclaim.

    Reads HEAD's commit and small records only, so it takes the same time on any
    history length; --gc adds gc's dry run (briefly under the repository lock, like
    `gc --dry-run`), which reads every commit. Reads no tensor data.
    """
    repo = _repo(ctx)
    branch_name, head_id = repo.head()
    head = repo.show(head_id) if head_id else None
    report = repo.gc(dry_run=True) if with_gc else None
    checked = repo.last_fsck()
    from .trust import last_verification, verification_line

    verified = last_verification(repo, head_id) if head_id else None
    tiers = _tiers(repo)
    if as_json:
        click.echo(json.dumps({
            "branch": branch_name, "head": head_id,
            "step": head.step if head else None, "epoch": head.epoch if head else None,
            "metrics": head.metrics if head else None, "message": head.message if head else None,
            "time": head.time if head else None,
            "gc": None if report is None else {
                "reclaimable_bytes": report.bytes_reclaimed, "pruned_commits": report.pruned_commits,
                "dead_chunks": report.dead_chunks},
            "fsck": checked,
            "verified": verified,
            "tiers": {k: v for k, v in tiers.as_dict().items() if k != "commits"},
        }, indent=2))
        return
    for line in _status_lines(branch_name, head, report, checked):
        click.echo(line)
    click.echo(f"tiers:   {tiers.line()}")
    click.echo(f"verify:  {verification_line(verified) or 'HEAD never verified; run `ckptvcs verify`'}")


def _tiers(repo: Any) -> Any:
    """Which tier holds each commit (ckptvcs.remotes.tiers.where)."""
    from ..remotes import where

    return where(repo)


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
    pruned = f" ({report.pruned_commits} pruned commit(s))" if report is not None and report.pruned_commits else ""
    if report is None:
        lines.append("gc:      not checked; `ckptvcs status --gc` says what gc would reclaim")
    elif report.bytes_reclaimed:
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
@click.option("--remote", "remote_name", metavar="NAME",
              help="Also prune it on remote NAME (a remote prune record: `gc --remote` reclaims its data).")
@click.pass_context
def prune(ctx: click.Context, rev: str, reason: str, remote_name: str | None) -> None:
    """Drop REV's tensor data at the next gc, keeping its history record.

    The commit stays in log and show (marked pruned) with its metadata and metrics, and
    its children keep their parent; loading it fails from now on. A commit a branch,
    tag or HEAD points at cannot be pruned. The space returns with `ckptvcs gc`.
    """
    if remote_name is not None:
        from .remote import prune_remote_cmd

        prune_remote_cmd(_repo(ctx), remote_name, rev, reason)
    commit_id = _repo(ctx).prune(rev, rule="manual", reason=reason)
    click.echo(f"Pruned {commit_id[:12]}: history kept; its data goes at the next `ckptvcs gc`")
