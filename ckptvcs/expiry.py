"""The reflog expiry: how long a reflog entry keeps the data of the commits it names.

Grammar (``gc --prune=...``, ``repo.gc(prune_unreachable_after=...)``, the
``reflog_expire`` key of config.json): ``now`` (no grace), ``never`` (every reflog
entry keeps its commits), or a whole number and a unit, optionally joined by a dot:
``90s``, ``30.minutes``, ``12h``, ``7d``, ``2.weeks``, ``3.months`` (30 days each),
``1.year`` (365 days). The library also takes a ``datetime.timedelta`` or a number of
seconds.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Any

from .errors import UsageError

__all__ = ["DEFAULT_REFLOG_EXPIRE", "parse_expiry"]

DEFAULT_REFLOG_EXPIRE = "30.days"

_UNITS = {
    1: ("s", "sec", "secs", "second", "seconds"),
    60: ("m", "min", "mins", "minute", "minutes"),
    3600: ("h", "hour", "hours"),
    86400: ("d", "day", "days"),
    7 * 86400: ("w", "week", "weeks"),
    30 * 86400: ("month", "months"),
    365 * 86400: ("y", "year", "years"),
}
_SECONDS = {name: seconds for seconds, names in _UNITS.items() for name in names}
_DURATION = re.compile(r"^(\d+)\.?([a-z]+)$")


def parse_expiry(value: Any) -> float:
    """Seconds a reflog entry keeps its commits: 0 for ``now``, ``math.inf`` for ``never``.

    Raises UsageError (an InvalidInputError, naming the grammar) for anything else.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value.strip().lower())
    else:
        seconds = -1.0
    if math.isnan(seconds) or seconds < 0:
        raise UsageError(
            f"invalid expiry {value!r}: use 'now', 'never' or a number and a unit such as '7d', '2.weeks', "
            "'30.days' (units: s, m, h, d, w, months, years)"
        )
    return seconds


def _parse_text(text: str) -> float:
    if text == "now":
        return 0.0
    if text == "never":
        return math.inf
    match = _DURATION.match(text)
    if match is None or match.group(2) not in _SECONDS:
        return -1.0
    return float(int(match.group(1)) * _SECONDS[match.group(2)])
