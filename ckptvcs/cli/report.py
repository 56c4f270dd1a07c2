"""``ckptvcs report``: the repository report as one self-contained HTML page, or its numbers as JSON.

Torch-free: the report reads history, records and the chunk index, never a tensor value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .. import _fs
from ..report import build_summary, render_html
from ._app import _repo, cli


@cli.command()
@click.option("-o", "--output", "output", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the page (default: report.html in the working directory; '-' for stdout).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead (or write it to -o FILE).")
@click.pass_context
def report(ctx: click.Context, output: Path | None, as_json: bool) -> None:
    """Write an HTML report: metrics per branch, storage, latency, retention and health.

    One file with everything inline (no script, no network): open it in any browser,
    attach it to a ticket, read it offline. `--json` gives the same numbers for tools.
    """
    summary = build_summary(_repo(ctx))
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n" if as_json else render_html(summary)
    if output is None and as_json or output == Path("-"):
        click.echo(text, nl=False)
        return
    target = output or Path("report.html")
    with _fs.storage_errors(f"writing {target}"):
        target.absolute().parent.mkdir(parents=True, exist_ok=True)
        _fs.atomic_write(os.fspath(target.absolute()), text.encode("utf-8"))
    attention = [a for a in summary["attention"] if a["level"] in ("error", "warning")]
    click.echo(f"wrote {target} ({len(summary['commits'])} commits, {len(summary['branches'])} branches; "
               f"{len(attention)} item(s) need attention)")
    for item in attention:
        click.echo(f"  {item['level']}: {item['text']}")
