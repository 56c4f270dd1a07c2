"""Commands of recovery readiness and release trust: verify, verify-tag, keygen, trust, protect,
unprotect, audit (docs/audit.md). None imports torch here: `verify` restores in a child process."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from ..errors import AuditLogDamagedError, CorruptObjectError
from ._app import _complete_rev, _complete_tag, _human, _local_time, _repo, cli

SIGNING_KEY_ENV = "CKPTVCS_SIGNING_KEY"


def _metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items()))


def last_verification(repo: Any, commit_id: str) -> dict[str, Any] | None:
    """The commit's verification record for show/status; a damaged one is a warning, not a failure."""
    try:
        record: dict[str, Any] | None = repo.last_verification(commit_id)
    except CorruptObjectError as err:
        click.echo(f"warning: {err}", err=True)
        return None
    return record


def verification_line(record: dict[str, Any] | None) -> str | None:
    """One line about a commit's last verification (show, status), or None when never verified."""
    if record is None:
        return None
    when = _local_time(str(record.get("time", "?")))
    if not record.get("ok"):
        return f"FAILED {when}: {str(record.get('error'))[:200]}"
    restore = record.get("restore_seconds")
    took = f" in {restore:.2f} s" if isinstance(restore, (int, float)) else ""
    checked = f"; {record['check']}: {_metrics(record.get('metrics') or {})}" if record.get("check") else ""
    return f"ok {when} (restored {_human(record.get('bytes') or 0)}{took}{checked})"


@cli.command()
@click.argument("rev", default="HEAD", shell_complete=_complete_rev)
@click.option("--check", metavar="MODULE:FUNC", help="Call FUNC(state) from MODULE on the restored state; it returns "
              "a dict of metrics, and raising fails the verification.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Fail if the restore takes longer (s).")
@click.option("--json", "as_json", is_flag=True, help="Print the verification record as JSON.")
@click.pass_context
def verify(ctx: click.Context, rev: str, check: str | None, timeout: float | None, as_json: bool) -> None:
    """Restore REV in a fresh process, re-hash every chunk, run --check, and record the result.

    The record (verified/<commit id>) is what `show`, `status` and the report display;
    the audit log keeps every run. Exit status 17 when the restore or the check fails.
    """
    record = _repo(ctx).verify(rev, check=check, timeout=timeout)
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    click.echo(f"Verified {record['commit'][:12]}: restored {_human(record.get('bytes') or 0)} "
               f"({record.get('chunks')} chunks, every one re-hashed) in {record['restore_seconds']:.2f} s "
               "in a fresh process")
    if check:
        click.echo(f"Check {check}: {_metrics(record['metrics']) or 'passed (no metrics)'}")


def verify_tag_command(ctx: click.Context, name: str, trusted: tuple[str, ...]) -> None:
    """`tag -v NAME` and `verify-tag NAME`."""
    result = _repo(ctx).verify_tag(name, list(trusted) or None)
    click.echo(f"Good signature on tag {name} by key {result['key'][:16]}; commit {result['commit'][:12]}, "
               f"{result['chunks']} chunks ({_human(result['bytes'])}) re-hashed and intact")


@cli.command("verify-tag")
@click.argument("name", shell_complete=_complete_tag)
@click.option("--trusted-key", "trusted", multiple=True, type=click.Path(dir_okay=False),
              help="A trusted public key (PEM; repeatable). Default: the keys in the repository's keys/.")
@click.pass_context
def verify_tag(ctx: click.Context, name: str, trusted: tuple[str, ...]) -> None:
    """Check tag NAME's signature, then re-hash every object and chunk it pins (same as `tag -v`)."""
    verify_tag_command(ctx, name, trusted)


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--trust", "add_to_repo", is_flag=True, help="Also trust the new public key in this repository.")
@click.pass_context
def keygen(ctx: click.Context, path: str, add_to_repo: bool) -> None:
    """Create an Ed25519 signing key: PATH (private, PEM, mode 0600) and PATH.pub (public, PEM)."""
    from ..signing import generate_key

    private, public, kid = generate_key(path)
    click.echo(f"Wrote private key {private} (keep it secret) and public key {public}")
    click.echo(f"Key id {kid}")
    if add_to_repo:
        _repo(ctx).trust_key(str(public))
        click.echo("Trusted in this repository (keys/)")
    click.echo(f"Sign with: ckptvcs tag -s NAME --key {private}   (or set ${SIGNING_KEY_ENV})")


@cli.command()
@click.argument("public_key", required=False, type=click.Path(dir_okay=False, exists=True))
@click.pass_context
def trust(ctx: click.Context, public_key: str | None) -> None:
    """Trust PUBLIC_KEY (PEM) for `tag -v` in this repository, or list the trusted key ids."""
    repo = _repo(ctx)
    if public_key is None:
        for kid in repo.trusted_keys():
            click.echo(kid)
        return
    click.echo(f"Trusted key {repo.trust_key(public_key)}")


@cli.command()
@click.argument("pattern", required=False)
@click.pass_context
def protect(ctx: click.Context, pattern: str | None) -> None:
    """Protect refs matching PATTERN from deletion and forced moves, or list the patterns.

    PATTERN is a glob over full ref names, e.g. 'refs/tags/release-*'. A protected ref
    moves or goes only with --override-protection, which the reflog and the audit log record.
    """
    repo = _repo(ctx)
    patterns = repo.protected_refs() if pattern is None else repo.protect(pattern)
    for p in patterns:
        click.echo(p)


@cli.command()
@click.argument("pattern")
@click.pass_context
def unprotect(ctx: click.Context, pattern: str) -> None:
    """Remove the protection PATTERN (recorded in the audit log)."""
    remaining = _repo(ctx).unprotect(pattern)
    click.echo(f"Unprotected {pattern}; still protected: {', '.join(remaining) or 'nothing'}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the events and the chain's verdict as JSON.")
@click.option("--check", "check_only", is_flag=True, help="Only check the hash chain (exit status 10 when broken).")
@click.option("-n", "max_count", type=click.IntRange(min=0), help="Show only the last N events.")
@click.option("--no-refs", is_flag=True, help="Leave out the ref moves (audit/refs.jsonl).")
@click.pass_context
def audit(ctx: click.Context, as_json: bool, check_only: bool, max_count: int | None, no_refs: bool) -> None:
    """Print the audit log (tags, signatures, verifications, protections, overrides) and every ref move
    (who, when, old, new, why; sequence numbers rN), oldest first."""
    repo = _repo(ctx)
    verdict = repo.check_audit()
    if check_only:
        if not verdict.ok:
            raise AuditLogDamagedError(f"the audit log is damaged: {verdict.problems[0]}", path="audit/log.jsonl")
        click.echo(f"audit log intact: {verdict.events} events, head {verdict.head}; "
                   f"{verdict.ref_events} ref moves, head {verdict.ref_head}")
        for note in verdict.notes:
            click.echo(f"note: {note}")
        return
    events = repo.audit_events()
    moves = [] if no_refs else repo.ref_events()
    if max_count is not None:
        events = events[-max_count:] if max_count else []
        moves = moves[-max_count:] if max_count else []
    if as_json:
        click.echo(json.dumps({"events": [e.to_json() for e in events], "ref_events": [e.to_json() for e in moves],
                               "check": {"ok": verdict.ok, "events": verdict.events, "head": verdict.head,
                                         "ref_events": verdict.ref_events, "ref_head": verdict.ref_head,
                                         "problems": verdict.problems, "notes": verdict.notes}}, indent=2))
        return
    merged = sorted([(e.time, 0, f"{e.seq:>5}", e) for e in events] + [(e.time, 1, f"{'r' + str(e.seq):>5}", e) for e in moves],
                    key=lambda item: item[:2])
    if max_count:
        merged = merged[-max_count:]
    for _, _, seq, e in merged:
        order = {"ref": 0, "old": 1, "new": 2, "why": 3}  # a ref move reads ref, old, new, why
        items = sorted(e.data.items(), key=lambda kv: order.get(kv[0], 4))
        details = " ".join(f"{k}={_short(v)}" for k, v in items if v not in (None, False, ""))
        click.echo(f"{seq} {_local_time(e.time)} {e.who:<20} {e.event:<20} {details}")
    if not verdict.ok:
        click.echo(f"warning: the audit log's hash chain is broken: {verdict.problems[0]}", err=True)


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text[:120]


def signing_key(key: str | None) -> str | None:
    """The key file of `tag -s`: --key, else $CKPTVCS_SIGNING_KEY."""
    return key or os.environ.get(SIGNING_KEY_ENV)
