"""The ``ckptvcs`` group and what its commands share: errors, repository lookup, output helpers.

Library errors become one line
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

from .. import __version__
from ..errors import CkptvcsError, RefExistsError
from ..refs import Refs
from ..repo import Repo, _locate_store, find_store
from ..store import Progress

__all__ = ["cli"]

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
