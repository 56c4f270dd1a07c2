"""ASCII commit graph for ``ckptvcs log --graph``, in the style of git's.

Commits come newest first. Each column of the drawing is a line of history waiting
for a commit; a commit takes its column and hands it to its parents, and when two
columns wait for the same commit they join with a ``|/`` line, which is how a branch
point looks:

    * 3f2a... (HEAD -> main) step=300
    | * 9c1b... (finetune) step=250
    |/
    * 77d0... step=200
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["graph_lines"]


def _rail(width: int, mark_at: int | None = None) -> str:
    return " ".join("*" if i == mark_at else "|" for i in range(width))


def _join_line(width: int, drop: int) -> str:
    """The line drawn when column ``drop`` joins the column to its left; later ones shift left."""
    return "| " * (drop - 1) + "|/" + " /" * (width - drop - 1)


def _shift_line(width: int, gone: int) -> str:
    """The line drawn when rail ``gone`` ends and the rails right of it move one left."""
    cells = [" "] * (2 * width - 1)
    for j in range(width):
        if j < gone:
            cells[2 * j] = "|"
        elif j > gone:
            cells[2 * j - 1] = "/"
    return "".join(cells).rstrip()


def graph_lines(commits: Sequence[tuple[str, Sequence[str]]], texts: Sequence[Sequence[str]]) -> list[str]:
    """Lines of the drawing: ``commits`` are ``(id, parents)`` newest first, ``texts`` their lines."""
    columns: list[str] = []
    out: list[str] = []
    for (commit_id, parents), text in zip(commits, texts):
        if commit_id not in columns:
            columns.append(commit_id)
        col = columns.index(commit_id)
        width = len(_rail(len(columns)))
        for i, line in enumerate(text or [""]):
            prefix = _rail(len(columns), col if i == 0 else None)
            out.append(f"{prefix:<{width}} {line}".rstrip())
        if not parents and col < len(columns) - 1:
            out.append(_shift_line(len(columns), col))  # a root ends its rail; the rest move left
        columns[col : col + 1] = list(parents)
        while True:  # columns now waiting for the same commit join, leftmost wins
            dup = next((i for i, cid in enumerate(columns) if cid in columns[:i]), None)
            if dup is None:
                break
            out.append(_join_line(len(columns), dup))
            columns.pop(dup)
    return out
