"""Catalog queries: a small, safe ``FIELD OP VALUE`` grammar over commit records.

``ckptvcs log --where "val_loss < 0.3"`` and ``Repo.find("val_loss < 0.3")`` parse each
expression here (never ``eval``) and test it against :class:`~ckptvcs.objects.Commit`
records. Torch-free: the CLI's history commands must not import torch.

Grammar::

    FIELD OP VALUE
    FIELD  step | epoch | message | author | time | data_version
           | metrics.NAME | config.KEY[.SUBKEY...] | NAME (a bare name is a metric)
    OP     == != < <= > >= ~      (~ : regular-expression search, strings only)
    VALUE  a number | 'quoted' or "quoted" string | true | false | null

``time`` compares as UTC instants; its value is an ISO 8601 date or date-time (a value
without a zone is UTC). A commit lacking the field (no such metric, no step, a config
without that key) does not match; ``FIELD == null`` matches a field that is present and
null. Ordering operators need both sides to be numbers or both strings; otherwise the
commit does not match.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .errors import UsageError
from .objects import Commit

__all__ = ["Condition", "parse_where", "parse_all", "matches", "metric_value", "shown_parents"]

FIELDS = ("step", "epoch", "message", "author", "time", "data_version")
OPERATORS = ("==", "!=", "<=", ">=", "<", ">", "~")

_MISSING = object()
_EXPR = re.compile(r"^\s*([A-Za-z_][\w.\-/]*)\s*(==|!=|<=|>=|<|>|~)\s*(.*?)\s*$", re.DOTALL)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$")
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt,
    "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


@dataclass(frozen=True)
class Condition:
    """One parsed ``FIELD OP VALUE``: ``path`` is the field split on dots."""

    text: str
    path: tuple[str, ...]
    op: str
    value: Any
    pattern: re.Pattern[str] | None = None

    def matches(self, commit: Commit) -> bool:
        """Whether ``commit`` satisfies the condition (a missing field never does)."""
        actual = field_value(commit, self.path)
        if actual is _MISSING:
            return False
        if self.pattern is not None:
            return isinstance(actual, str) and self.pattern.search(actual) is not None
        return _compare(actual, self.op, self.value)


def parse_where(text: str) -> Condition:
    """Parse one expression; a malformed one raises :class:`UsageError` naming it."""
    if not isinstance(text, str):
        raise UsageError(f"where: expected a string like \"val_loss < 0.3\", got {type(text).__name__}")
    match = _EXPR.match(text)
    if match is None:
        raise UsageError(f"where {text!r}: expected FIELD OP VALUE, with OP one of {' '.join(OPERATORS)}")
    name, op, raw = match.groups()
    path = _field_path(name, text)
    value = _parse_value(raw, text)
    if op == "~":
        if not isinstance(value, str):
            raise UsageError(f"where {text!r}: ~ needs a quoted string (a regular expression)")
        try:
            return Condition(text, path, op, value, re.compile(value))
        except re.error as err:
            raise UsageError(f"where {text!r}: bad regular expression: {err}") from None
    if path == ("time",):
        if not isinstance(value, str):
            raise UsageError(f"where {text!r}: time needs a quoted ISO 8601 date or time")
        value = parse_time(value, text)
    return Condition(text, path, op, value)


def parse_all(where: Iterable[str] | str) -> list[Condition]:
    """Parse several expressions (a lone string is one expression); they AND together."""
    return [parse_where(where)] if isinstance(where, str) else [parse_where(w) for w in where]


def matches(commit: Commit, conditions: Iterable[Condition]) -> bool:
    """Whether ``commit`` satisfies every condition."""
    return all(c.matches(commit) for c in conditions)


def metric_value(commit: Commit, name: str) -> float | None:
    """The commit's metric ``name`` (``metrics.`` prefix allowed), or None when absent or NaN."""
    value = commit.metrics.get(name.removeprefix("metrics."))
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def shown_parents(shown: list[Commit], history: Iterable[Commit]) -> list[tuple[str, tuple[str, ...]]]:
    """(id, parents) of each shown commit with parents rewritten to its nearest shown
    ancestors (git's parent rewriting), so a graph of a filtered log stays connected."""
    by_id = {c.id: c for c in history}
    keep = {c.id for c in shown}
    edges = []
    for commit in shown:
        found: list[str] = []
        seen: set[str] = set()
        queue = list(commit.parents)
        while queue:
            oid = queue.pop(0)
            if oid in seen:
                continue
            seen.add(oid)
            if oid in keep:
                found.append(oid)
            elif oid in by_id:
                queue.extend(by_id[oid].parents)
        edges.append((commit.id, tuple(found)))
    return edges


def parse_time(value: str, text: str = "") -> datetime:
    """An ISO 8601 date or date-time as an aware UTC datetime (naive values are UTC)."""
    try:
        stamp = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError(f"where {text or value!r}: {value!r} is not an ISO 8601 date or time") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.astimezone(timezone.utc)


def field_value(commit: Commit, path: tuple[str, ...]) -> Any:
    """The value at ``path`` in the commit record, or the private missing marker."""
    head = path[0]
    if head == "metrics":
        return commit.metrics.get(path[1], _MISSING)
    if head == "config":
        node: Any = commit.config
        for key in path[1:]:
            if not isinstance(node, dict) or key not in node:
                return _MISSING
            node = node[key]
        return node
    if head == "time":
        try:
            return parse_time(commit.time)
        except UsageError:
            return _MISSING
    value = getattr(commit, head)
    return _MISSING if value is None and head in ("step", "epoch", "data_version") else value


def _field_path(name: str, text: str) -> tuple[str, ...]:
    parts = tuple(name.split("."))
    if any(not p for p in parts):
        raise UsageError(f"where {text!r}: empty part in field name {name!r}")
    if parts[0] == "metrics":
        if len(parts) < 2:
            raise UsageError(f"where {text!r}: metrics needs a name (metrics.val_loss)")
        return ("metrics", ".".join(parts[1:]))
    if parts[0] == "config":
        if len(parts) < 2:
            raise UsageError(f"where {text!r}: config needs a key (config.lr, config.optim.lr)")
        return parts
    if name in FIELDS:
        return (name,)
    # A bare name that is no known field is a metric (metric names may hold dots).
    return ("metrics", name)


def _parse_value(raw: str, text: str) -> Any:
    if not raw:
        raise UsageError(f"where {text!r}: missing value after the operator")
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    if raw in ("true", "false"):
        return raw == "true"
    if raw == "null":
        return None
    if _NUMBER.match(raw):
        number = float(raw)
        return int(raw) if number.is_integer() and re.fullmatch(r"[+-]?\d+", raw) else number
    raise UsageError(f"where {text!r}: value {raw!r} is not a number, a quoted string, true, false or null")


def _compare(actual: Any, op: str, expected: Any) -> bool:
    if op in ("==", "!="):
        equal = _same_kind(actual, expected) and actual == expected
        return equal if op == "==" else not equal
    numbers = _is_number(actual) and _is_number(expected)
    strings = isinstance(actual, str) and isinstance(expected, str)
    times = isinstance(actual, datetime) and isinstance(expected, datetime)
    if not (numbers or strings or times):
        return False
    return bool(_COMPARE[op](actual, expected))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same_kind(a: Any, b: Any) -> bool:
    """Equality never crosses kinds: ``true`` is not 1, ``null`` only equals null."""
    if _is_number(a) and _is_number(b):
        return True
    return type(a) is type(b) or (isinstance(a, datetime) and isinstance(b, datetime))
