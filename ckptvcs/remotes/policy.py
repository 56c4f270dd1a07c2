"""The tier policy, kept in the repository's config.json under ``"tiers"`` (docs/remotes.md, "Tier policy").

``{"tiers": {"remote": "origin", "keep_local_last": 3, "prune_remote": false}}``: the newest
``keep_local_last`` checkpoints (and every tagged commit and ref tip, always) keep their
data on the local disk, everything older lives only on ``remote`` (archived,
verified first). ``prune_remote``: what the training manager's keep policy drops is
pruned on both tiers (a prune record on the remote, so ``gc --remote`` reclaims it)
instead of archived. ``ckptvcs archive NAME`` without flags and
``CheckpointManager(remote=...)`` apply it; explicit arguments override it.

Writes go through the backend's compare-and-swap of config.json (a concurrent change of
another setting makes us re-read it, as ``protect`` does), so no writer loses another's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptvcs import _fs, layout
from ckptvcs.backends.base import ConcurrentUpdate
from ckptvcs.errors import CorruptObjectError, InvalidInputError

if TYPE_CHECKING:
    from ckptvcs.repo import Repo

__all__ = ["TierPolicy", "get_policy", "set_policy", "clear_policy", "POLICY_KEY"]

POLICY_KEY = "tiers"
_MAX_CONFIG = 1 << 20


@dataclass(frozen=True)
class TierPolicy:
    """Which checkpoints keep their data local; the rest live only on ``remote`` (see the module docstring)."""

    remote: str
    keep_local_last: int
    prune_remote: bool = False

    def __post_init__(self) -> None:
        from ckptvcs.remotes.config import _check_name

        try:
            _check_name(self.remote)
        except Exception as err:
            raise InvalidInputError(str(err)) from None
        n = self.keep_local_last
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInputError(f"keep_local_last must be a positive integer, got {n!r}")
        if not isinstance(self.prune_remote, bool):
            raise InvalidInputError(f"prune_remote must be True or False, got {self.prune_remote!r}")

    def to_json(self) -> dict[str, Any]:
        return {"remote": self.remote, "keep_local_last": self.keep_local_last, "prune_remote": self.prune_remote}

    @classmethod
    def from_json(cls, raw: Any) -> TierPolicy:
        if not isinstance(raw, dict):
            raise CorruptObjectError(f"config.json: {POLICY_KEY!r} is not an object")
        try:
            return cls(raw.get("remote"), raw.get("keep_local_last"), raw.get("prune_remote", False))  # type: ignore[arg-type]
        except InvalidInputError as err:
            raise CorruptObjectError(f"config.json: the tier policy is invalid: {err}") from None

    def line(self) -> str:
        """In words: ``keep the last 3 (and tagged) local, the rest only on origin``."""
        prune = "; dropped checkpoints pruned on the remote too" if self.prune_remote else ""
        return f"keep the last {self.keep_local_last} (and tagged) local, the rest only on {self.remote}{prune}"


def _load(repo: Repo) -> tuple[bytes, dict[str, Any]]:
    raw = repo.backend.get(layout.CONFIG, max_size=_MAX_CONFIG)
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise CorruptObjectError(f"{repo.root}/config.json is not a JSON object")
    return raw, config


def get_policy(repo: Repo) -> TierPolicy | None:
    """The configured tier policy (read from config.json each time), or None."""
    with _fs.storage_errors("reading config.json"):
        _, config = _load(repo)
    raw = config.get(POLICY_KEY)
    return None if raw is None else TierPolicy.from_json(raw)


def _update(repo: Repo, value: dict[str, Any] | None) -> None:
    with _fs.storage_errors("updating config.json"):
        while True:  # compare-and-swap: a concurrent change of config.json makes us re-read it
            raw, config = _load(repo)
            if value is None:
                config.pop(POLICY_KEY, None)
            else:
                config[POLICY_KEY] = value
            try:
                repo.backend.compare_and_swap(layout.CONFIG, raw, json.dumps(config, indent=2).encode() + b"\n")
                break
            except ConcurrentUpdate:
                continue
    repo.config = config


def set_policy(repo: Repo, remote: str, keep_local_last: int, *, prune_remote: bool = False) -> TierPolicy:
    """Store the tier policy (replacing any); ``remote`` must be configured. InvalidInputError on bad input."""
    from ckptvcs.remotes.config import get_remote

    policy = TierPolicy(remote, keep_local_last, prune_remote)
    get_remote(repo, remote)
    _update(repo, policy.to_json())
    return policy


def clear_policy(repo: Repo) -> bool:
    """Remove the tier policy; False when none was set."""
    if get_policy(repo) is None:
        return False
    _update(repo, None)
    return True
