"""The report's numbers: one JSON-ready dict built from a repository's history and records.

Read-only, torch-free, and tolerant: whatever cannot be read (a damaged ref, record or
manifest) becomes an attention item naming it, never an exception, so a report can be
built of a damaged repository too (that is when it is needed most).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from ..backends import Backend
from ..catalog import metric_value
from ..components import COMPONENTS, blob_components
from ..errors import CkptvcsError
from ..objects import Commit
from ..repo import Repo

__all__ = ["build_summary", "SUMMARY_VERSION", "metric_mode"]

SUMMARY_VERSION = 1
VERIFIED_DIRNAME = "verified"  # verification records, one per commit (`ckptvcs verify`)
_MAX_RECORD = 1 << 20
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_MAX_HIGHER = ("acc", "accuracy", "f1", "auc", "score", "bleu", "rouge", "precision", "recall", "reward", "map",
               "iou", "r2", "top1", "top5", "throughput")
STALE_FSCK_DAYS = 7


def metric_mode(name: str) -> str:
    """``"max"`` for metrics where higher is better (accuracy, f1, reward, ...), else ``"min"`` (losses)."""
    words = re.split(r"[^a-z0-9]+", name.lower())
    return "max" if any(w in _MAX_HIGHER for w in words) else "min"


def build_summary(repo: Repo) -> dict[str, Any]:
    """Everything the report shows, as plain JSON values (``ckptvcs report --json``); see docs/report.md."""
    attention: list[dict[str, str]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = _build(repo, attention)
    for warning in caught:
        _attend(attention, "error", f"{warning.message}")
    summary["attention"] = _dedup(attention)
    return summary


def _attend(attention: list[dict[str, str]], level: str, text: str) -> None:
    attention.append({"level": level, "text": text})


def _dedup(items: list[dict[str, str]]) -> list[dict[str, str]]:
    order = {"error": 0, "warning": 1, "info": 2}
    unique = list({(i["level"], i["text"]): i for i in items}.values())
    return sorted(unique, key=lambda i: order.get(i["level"], 3))


def _build(repo: Repo, attention: list[dict[str, str]]) -> dict[str, Any]:
    branches = repo.branches()
    tags = repo.tags()
    head_branch, head_commit = repo.head()
    commits = sorted(repo.all_commits(), key=lambda c: (c.time, c.id))  # oldest first
    by_id = {c.id: c for c in commits}
    chains = _first_parent_chains(branches, by_id, head_branch)
    tags_of: dict[str, list[str]] = {}
    for name, tag in tags.items():
        tags_of.setdefault(tag.object, []).append(name)
    best = _best(commits)
    best_of: dict[str, list[str]] = {}
    for metric, entry in best.items():
        best_of.setdefault(entry["commit"], []).append(metric)
    restores = _records(repo, "restore", attention)
    gcs = _records(repo, "gc", attention)
    verified = _verified(repo.backend, attention)
    manifests = _manifest_chunks(repo, commits, attention)
    stored_len = {entry.chunk_id: entry.stored_len for entry in repo.chunks.index}

    branch_of: dict[str, str] = {}
    for name, chain in chains.items():
        for cid in chain:
            branch_of.setdefault(cid, name)
    last_restore = {r["commit"]: r for r in restores["records"] if isinstance(r.get("commit"), str)}
    commit_rows = [
        _commit_row(c, branch_of.get(c.id), tags_of.get(c.id, []), best_of.get(c.id, []),
                    last_restore.get(c.id), verified.get(c.id), manifests.get(c.id))
        for c in commits
    ]
    tips = set(branches.values()) | {t.object for t in tags.values()} | ({head_commit} if head_commit else set())
    summary: dict[str, Any] = {
        "format": "ckptvcs-report",
        "version": SUMMARY_VERSION,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "repository": str(repo.root),
        "repository_id": repo.config.get("id"),
        "head": {"branch": head_branch, "commit": head_commit},
        "branches": {
            name: {"tip": tip, "chain": chains.get(name, []), "commits": len(chains.get(name, []))}
            for name, tip in sorted(branches.items())
        },
        "tags": [
            {"name": name, "commit": tag.object, "message": tag.message, "tagger": tag.tagger, "time": tag.time}
            for name, tag in sorted(tags.items())
        ],
        "commits": commit_rows,
        "best": best,
        "retention": _retention(commits, branches, tags_of, best_of, head_commit, tips),
        "storage": _storage(repo, commits, chains, branches, tags, head_commit, manifests, stored_len, gcs),
        "gc": gcs,
        "restores": restores,
        "verifications": {"records": sorted(verified.values(), key=lambda r: str(r.get("time", "")))},
        "fsck": repo.last_fsck(),
        "remotes": _tiers(repo),
    }
    _health(summary, attention)
    return summary


def _tiers(repo: Repo) -> dict[str, Any]:
    """Which tier holds what (ckptvcs.remotes.tiers.where): remotes, counts per tier, one line in words."""
    from ..remotes import where

    try:
        tiers = where(repo)
    except CkptvcsError as err:  # a damaged ref or manifest: the rest of the report still renders
        return {"remotes": {}, "lazy_remote": None, "counts": {}, "line": f"unknown ({err})"}
    return {"remotes": tiers.remotes, "lazy_remote": tiers.lazy_remote, "counts": tiers.counts, "line": tiers.line()}


def _first_parent_chains(branches: dict[str, str], by_id: dict[str, Commit], head: str | None) -> dict[str, list[str]]:
    """Each branch's first-parent history, oldest first: the run as its trainer saw it."""
    chains = {}
    for name, tip in branches.items():
        chain = []
        seen = set()
        oid: str | None = tip
        while oid is not None and oid in by_id and oid not in seen:
            seen.add(oid)
            chain.append(oid)
            parents = by_id[oid].parents
            oid = parents[0] if parents else None
        chains[name] = chain[::-1]
    ordered = sorted(chains, key=lambda n: (n != head, n))  # the checked-out branch first
    return {n: chains[n] for n in ordered}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _json_metric(value: Any) -> Any:
    number = _finite(value)
    if number is not None:
        return number
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _best(commits: list[Commit]) -> dict[str, dict[str, Any]]:
    """Per metric, the best commit whose data is still kept (as ``ckptvcs best`` picks it; newer wins ties)."""
    names = sorted({name for c in commits for name in c.metrics})
    best: dict[str, dict[str, Any]] = {}
    for name in names:
        mode = metric_mode(name)
        chosen: tuple[float, Commit] | None = None
        for commit in reversed(commits):  # newest first: a tie keeps the newer
            value = metric_value(commit, name)
            if value is None or commit.pruned is not None or not math.isfinite(value):
                continue
            score = value if mode == "min" else -value
            if chosen is None or score < chosen[0]:
                chosen = (score, commit)
        if chosen is not None:
            value = chosen[0] if mode == "min" else -chosen[0]
            best[name] = {"mode": mode, "commit": chosen[1].id, "value": value, "step": chosen[1].step}
    return best


def _commit_row(
    c: Commit, branch: str | None, tags: list[str], best_for: list[str], restore: dict[str, Any] | None,
    verified: dict[str, Any] | None, manifest: dict[str, Any] | None,
) -> dict[str, Any]:
    stats = c.stats if isinstance(c.stats, dict) else {}
    components = stats.get("components") if isinstance(stats.get("components"), dict) else None
    if components is None and manifest is not None:
        components = {k: {"logical_bytes": v} for k, v in manifest["logical_by_component"].items()}
    return {
        "id": c.id,
        "parents": list(c.parents),
        "branch": branch,
        "time": c.time,
        "step": c.step,
        "epoch": c.epoch,
        "message": c.message,
        "author": c.author,
        "metrics": {k: _json_metric(v) for k, v in c.metrics.items()},
        "data_version": c.data_version,
        "tags": sorted(tags),
        "best_for": sorted(best_for),
        "logical_bytes": _finite(stats.get("logical_bytes")),
        "new_stored_bytes": _finite(stats.get("new_stored_bytes")),
        "new_chunks": _finite(stats.get("new_chunks")),
        "tensors": _finite(stats.get("tensors")),
        "save_seconds": _finite(stats.get("save_seconds")),  # None: not recorded (older ckptvcs)
        "components": components,
        "restore_seconds": None if restore is None else _finite(restore.get("restore_seconds")),
        "load_seconds": None if restore is None else _finite(restore.get("load_seconds")),
        "verified": None if verified is None else {
            "ok": verified.get("ok"), "time": verified.get("time"),
            "restore_seconds": _finite(verified.get("restore_seconds")), "error": verified.get("error"),
        },
        "pruned": None if c.pruned is None else {
            "rule": c.pruned.get("rule"), "reason": c.pruned.get("reason"), "time": c.pruned.get("time"),
            "collected": c.pruned.get("collected"),
        },
    }


def _records(repo: Repo, kind: str, attention: list[dict[str, str]]) -> dict[str, Any]:
    log = repo.read_records(kind)
    if log.error:
        _attend(attention, "warning", f"{log.error}; the report shows no {kind} history")
    if log.damaged_lines:
        _attend(attention, "warning", f"records/{kind}.jsonl has {log.damaged_lines} damaged line(s), left out")
    path = repo.root / "records" / f"{kind}.jsonl"
    return {
        "recorded": log.error is None and (bool(log.records) or os.path.lexists(path)),
        "records": [_clean(r, _SCHEMAS[kind]) for r in log.records],
        "damaged_lines": log.damaged_lines,
        "truncated": log.truncated,
    }


_NUM, _STR, _BOOL, _ID = "number", "string", "bool", "id"
_SCHEMAS: dict[str, dict[str, str]] = {
    "gc": {"time": _STR, "seconds": _NUM, "restricted": _BOOL, "pack_bytes_before": _NUM, "pack_bytes_after": _NUM,
           "bytes_reclaimed": _NUM, "packs_deleted": _NUM, "packs_rewritten": _NUM, "packs_written": _NUM,
           "live_commits": _NUM, "live_chunks": _NUM, "chunks_freed": _NUM, "commits_collected": _NUM, "who": _STR},
    "restore": {"time": _STR, "commit": _ID, "branch": _STR, "step": _NUM, "load_seconds": _NUM,
                "restore_seconds": _NUM, "logical_bytes": _NUM},
    "verified": {"time": _STR, "commit": _ID, "ok": _BOOL, "restore_seconds": _NUM, "check_seconds": _NUM,
                 "seconds": _NUM, "error": _STR, "error_type": _STR},
}


def _clean(record: dict[str, Any], schema: dict[str, str]) -> dict[str, Any]:
    """The record's known fields with the types the report relies on (anything else: None).

    Records come from the repository, which is untrusted: a string where a size belongs
    must not break a chart, and a 1 MiB "time" must not flood the page.
    """
    out: dict[str, Any] = {}
    for name, kind in schema.items():
        value = record.get(name)
        if kind == _NUM:
            number = _finite(value)
            out[name] = None if number is None else (int(number) if isinstance(value, int) else number)
        elif kind == _BOOL:
            out[name] = value if isinstance(value, bool) else None
        elif kind == _ID:
            out[name] = value if isinstance(value, str) and _HEX_ID.match(value) else None
        else:
            out[name] = value[:500] if isinstance(value, str) else None
    return out


def _verified(backend: Backend, attention: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """The verification records ``verified/<commit id>`` (one per commit, the last run of ``ckptvcs verify``)."""
    try:
        names = [key.rsplit("/", 1)[-1] for key in backend.list(VERIFIED_DIRNAME)]
    except FileNotFoundError:
        return {}
    except (OSError, CkptvcsError) as err:
        _attend(attention, "warning", f"{VERIFIED_DIRNAME}/ is unreadable ({err}); verifications are not shown")
        return {}
    found: dict[str, dict[str, Any]] = {}
    for name in names:
        if not _HEX_ID.match(name):
            continue
        try:
            record = json.loads(backend.get(f"{VERIFIED_DIRNAME}/{name}", max_size=_MAX_RECORD))
            if not isinstance(record, dict) or not isinstance(record.get("ok"), bool):
                raise ValueError("not a verification record")
        except (OSError, ValueError, RecursionError, CkptvcsError) as err:
            _attend(attention, "warning", f"verification record {VERIFIED_DIRNAME}/{name} is unreadable "
                    f"({str(err)[:120]}); left out")
            continue
        metrics = record["metrics"] if isinstance(record.get("metrics"), dict) else {}
        found[name] = {**_clean({**record, "commit": name}, _SCHEMAS["verified"]),
                       "metrics": {str(k)[:200]: _json_metric(v) for k, v in list(metrics.items())[:100]
                                   if isinstance(v, (int, float, str))}}
    return found


def _manifest_chunks(repo: Repo, commits: list[Commit], attention: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Per commit whose data is kept: its chunks (id → component) and logical bytes by component."""
    out: dict[str, dict[str, Any]] = {}
    unreadable = []
    for commit in commits:
        if commit.pruned is not None and commit.pruned.get("collected"):
            continue
        try:
            manifest = repo.manifest(commit.id)
            kinds = blob_components(manifest.root, len(manifest.blobs))
        except (CkptvcsError, ValueError, TypeError, KeyError) as err:
            unreadable.append(f"{commit.id[:12]} ({str(err)[:80]})")
            continue
        chunks: dict[bytes, str] = {}
        logical: dict[str, int] = {}
        for blob, kind in zip(manifest.blobs, kinds):
            logical[kind] = logical.get(kind, 0) + int(blob["nbytes"])
            for chunk in blob["chunks"]:
                chunks.setdefault(bytes.fromhex(chunk), kind)
        out[commit.id] = {"chunks": chunks, "logical_by_component": {k: logical[k] for k in COMPONENTS if k in logical}}
    if unreadable:
        _attend(attention, "error", f"{len(unreadable)} commit manifest(s) cannot be read: {', '.join(unreadable[:3])}; "
                "run `ckptvcs fsck`")
    return out


def _retention(
    commits: list[Commit], branches: dict[str, str], tags_of: dict[str, list[str]], best_of: dict[str, list[str]],
    head: str | None, tips: set[str],
) -> dict[str, Any]:
    """Which commits keep their data and why; which were pruned, by which rule."""
    tip_of: dict[str, list[str]] = {}
    for name, tip in branches.items():
        tip_of.setdefault(tip, []).append(name)
    kept: list[dict[str, Any]] = []
    pruned: list[dict[str, Any]] = []
    by_rule: dict[str, int] = {}
    for c in reversed(commits):  # newest first
        if c.pruned is not None:
            rule = str(c.pruned.get("rule"))
            by_rule[rule] = by_rule.get(rule, 0) + 1
            pruned.append({"commit": c.id, "step": c.step, "rule": rule, "reason": c.pruned.get("reason"),
                           "time": c.pruned.get("time"), "collected": c.pruned.get("collected")})
            continue
        why = [f"tip of branch {b}" for b in sorted(tip_of.get(c.id, []))]
        why += [f"tagged {t}" for t in sorted(tags_of.get(c.id, []))]
        why += [f"best {m}" for m in sorted(best_of.get(c.id, []))]
        if c.id == head and c.id not in tip_of:
            why.append("detached HEAD")
        if not why:
            why.append("not pruned by any rule (reachable from a branch or tag)")
        kept.append({"commit": c.id, "step": c.step, "why": why})
    return {"kept": kept, "pruned": pruned, "pruned_by_rule": dict(sorted(by_rule.items()))}


def _storage(
    repo: Repo, commits: list[Commit], chains: dict[str, list[str]], branches: dict[str, str], tags: dict[str, Any],
    head: str | None, manifests: dict[str, dict[str, Any]], stored_len: dict[bytes, int], gcs: dict[str, Any],
) -> dict[str, Any]:
    stats = repo.stats()
    # Split of the whole store by component: logical bytes over kept commits, stored bytes of the
    # distinct chunks (each counted once, for the component of the first commit that used it).
    logical: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    stored: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    counted: set[bytes] = set()
    for commit in commits:
        info = manifests.get(commit.id)
        if info is None:
            continue
        for kind, n in info["logical_by_component"].items():
            logical[kind] += n
        for chunk, kind in info["chunks"].items():
            if chunk not in counted and chunk in stored_len:
                counted.add(chunk)
                stored[kind] += stored_len[chunk]
    timeline, running = [], 0
    for c in commits:
        new = _finite(c.stats.get("new_stored_bytes")) if isinstance(c.stats, dict) else None
        running += int(new or 0)
        timeline.append({"commit": c.id, "time": c.time, "cumulative_new_stored_bytes": running})
    return {
        "commits": stats.commits,
        "chunks": stats.chunks,
        "logical_bytes": stats.logical_bytes,
        "unique_bytes": stats.unique_bytes,
        "stored_bytes": stats.stored_bytes,
        "pack_bytes": stats.pack_bytes,
        "object_bytes": stats.object_bytes,
        "dedup_ratio": stats.dedup_ratio,
        "compression_ratio": stats.compression_ratio,
        "total_ratio": stats.logical_bytes / stats.stored_bytes if stats.stored_bytes else 1.0,
        "components": {k: {"logical_bytes": logical[k], "stored_bytes": stored[k]} for k in COMPONENTS},
        "branch_own_bytes": _branch_costs(commits, chains, branches, tags, head, manifests, stored_len),
        "timeline": timeline,
        "disk_after_gc": [
            {"time": g.get("time"), "pack_bytes": _finite(g.get("pack_bytes_after")),
             "reclaimed": _finite(g.get("bytes_reclaimed"))}
            for g in gcs["records"]
        ],
    }


def _reach(starts: Iterable[str], parents: dict[str, tuple[str, ...]]) -> set[str]:
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        oid = stack.pop()
        if oid in seen or oid not in parents:
            continue
        seen.add(oid)
        stack.extend(parents[oid])
    return seen


def _branch_costs(
    commits: list[Commit], chains: dict[str, list[str]], branches: dict[str, str], tags: dict[str, Any], head: str | None,
    manifests: dict[str, dict[str, Any]], stored_len: dict[bytes, int],
) -> dict[str, int]:
    """Per branch: stored bytes of the chunks that only its commits use (what deleting it would free)."""
    parents = {c.id: c.parents for c in commits}
    ref_tips = {f"branch {n}": t for n, t in branches.items()}
    ref_tips.update({f"tag {n}": t.object for n, t in tags.items()})
    if head and head not in branches.values():
        ref_tips["HEAD"] = head
    chunks_of = {}
    for ref, tip in ref_tips.items():
        chunks: set[bytes] = set()
        for oid in _reach([tip], parents):
            info = manifests.get(oid)
            if info is not None:
                chunks.update(info["chunks"])
        chunks_of[ref] = chunks
    costs = {}
    for name in chains:
        mine = chunks_of.get(f"branch {name}", set())
        others: set[bytes] = set()
        for ref, chunks in chunks_of.items():
            if ref != f"branch {name}":
                others |= chunks
        costs[name] = sum(stored_len.get(c, 0) for c in mine - others)
    return costs


def _age_days(stamp: Any) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return (datetime.now(timezone.utc) - when).total_seconds() / 86400
    return None


def _health(summary: dict[str, Any], attention: list[dict[str, str]]) -> None:
    """Plain-words findings for the top of the report."""
    fsck = summary["fsck"]
    if fsck is None:
        _attend(attention, "warning", "fsck has never run on this repository: run `ckptvcs fsck --read-data` "
                "to prove every checkpoint is intact")
    elif not fsck.get("ok"):
        _attend(attention, "error", f"the last fsck ({fsck.get('time')}) found damage: {fsck.get('summary')}; "
                "see `ckptvcs fsck` and `ckptvcs repair`")
    else:
        age = _age_days(fsck.get("time"))
        if age is not None and age > STALE_FSCK_DAYS:
            _attend(attention, "info", f"the last fsck passed, {age:.0f} days ago: run it again")
        if not fsck.get("read_data"):
            _attend(attention, "info", "the last fsck did not read the data (no --read-data): bit rot in chunks "
                    "would not have been seen")
    verified = summary["verifications"]["records"]
    if not verified:
        _attend(attention, "warning", "no restore was ever verified: run `ckptvcs verify REV` on the checkpoint "
                "you would resume from")
    else:
        last = verified[-1]
        if not last.get("ok"):
            _attend(attention, "error", f"the last verified restore (commit {str(last.get('commit'))[:12]}, "
                    f"{last.get('time')}) FAILED: {last.get('error')}")
    for c in summary["commits"]:
        for name, value in c["metrics"].items():
            if value in ("nan", "inf", "-inf") and c["id"] in {b["tip"] for b in summary["branches"].values()}:
                _attend(attention, "warning", f"branch tip {c['id'][:12]} has {name} = {value}: the run may have diverged")
    waiting = [p for p in summary["retention"]["pruned"] if not p.get("collected")]
    if waiting:
        _attend(attention, "info", f"{len(waiting)} pruned commit(s) still hold their data: run `ckptvcs gc` "
                "to reclaim the space")
    if not summary["gc"]["recorded"]:
        _attend(attention, "info", "gc history not recorded (no gc ran since this ckptvcs started recording)")
