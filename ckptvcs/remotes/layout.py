"""What a remote holds, key by key, on any Backend (docs/remotes.md, "Layout").

```
config.json            {"format": "ckptvcs-remote", "version": 1, "chunk_size", "keyframe_interval", "id"}
HEAD                   "ref: refs/heads/<branch>\\n": the branch a clone checks out
refs/heads/<name>      "<commit id>\\n"       moved only by compare-and-swap: the commit point
refs/tags/<name>       "<tag object id>\\n"
objects/<xx>/<rest>    an object's stored bytes, exactly as in a local repository
packs/<name>.pack      a sealed pack, byte for byte as in the repository that pushed it
packs/<name>.idx       the pack's index: where each chunk of the pack sits (below)
pruned/<commit id>     a remote prune record (JSON): the commit's data is not needed (gc --remote)
```

A pack index lets a reader find a chunk by reading one small object per pack instead of
listing or reading packs; its format (ckptvcs.pack_index) is the one a repository on object
storage writes beside its own packs. Everything read from a remote is untrusted: sizes are bounded before
reading, names checked, and every chunk and object is verified against its id on arrival.
"""

from __future__ import annotations

import json
import re

from ckptvcs.backends.base import Backend, ConcurrentUpdate, KeyMissing
from ckptvcs.errors import CorruptObjectError, StorageError
from ckptvcs.layout import object_key, pack_key  # a remote's keys are a repository's keys
from ckptvcs.layout import pack_index_key as index_key
from ckptvcs.pack import PackEntry
from ckptvcs.pack_index import MAX_INDEX_SIZE, encode_pack_index
from ckptvcs.pack_index import decode_pack_index as _decode_pack_index
from ckptvcs.refs import is_valid_ref

__all__ = ["RemoteStore", "encode_pack_index", "decode_pack_index", "REMOTE_FORMAT"]

REMOTE_FORMAT = "ckptvcs-remote"
REMOTE_VERSION = 1
PRUNED_VERSION = 2  # a remote with prune records: older ckptvcs would take gc'd chunks for damage, so they refuse it
_PACK_NAME = re.compile(r"^[0-9a-f]{32}$")
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_MAX_SMALL = 1 << 20  # config, refs, HEAD
_MAX_OBJECT = 1 << 30  # an object's stored bytes (the local reader's bound too)


def decode_pack_index(pack: str, data: bytes) -> tuple[int, list[PackEntry]]:
    """``(pack size, entries)`` of a remote pack index (ckptvcs.pack_index: one format)."""
    return _decode_pack_index(pack, data, what="remote pack index")


class RemoteStore:
    """A remote repository on a Backend: config, refs, objects and packs by key."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def describe(self) -> str:
        return self.backend.describe()

    def _storage(self, what: str, err: OSError) -> StorageError:
        return StorageError(f"{self.describe()}: {what} failed: {err}")

    # -- config and HEAD ---------------------------------------------------------------

    def config(self) -> dict[str, object] | None:
        """The remote's config.json, or None when the location holds no remote yet."""
        try:
            data = self.backend.get("config.json", max_size=_MAX_SMALL)
        except KeyMissing:
            return None
        except OSError as err:
            raise self._storage("reading config.json", err) from None
        try:
            config = json.loads(data)
        except ValueError:
            config = None
        if not isinstance(config, dict) or config.get("format") != REMOTE_FORMAT:
            raise CorruptObjectError(f"{self.describe()} is not a ckptvcs remote (config.json has another format)")
        if not isinstance(config.get("version"), int) or config["version"] > PRUNED_VERSION:
            raise CorruptObjectError(f"{self.describe()} uses remote format {config.get('version')!r}, newer than "
                                     "this ckptvcs supports; upgrade ckptvcs")
        return config

    def initialize(self, config: dict[str, object], default_branch: str) -> dict[str, object]:
        """Create config.json (and HEAD) if absent; returns the config now in force."""
        found = self.config()
        if found is not None:
            return found
        body = json.dumps({"format": REMOTE_FORMAT, "version": REMOTE_VERSION, **config}, sort_keys=True).encode()
        try:
            self.backend.put("config.json", body, if_absent=True)
            self.backend.put("HEAD", f"ref: refs/heads/{default_branch}\n".encode(), if_absent=True)
        except OSError as err:
            raise self._storage("creating the remote", err) from None
        found = self.config()
        assert found is not None
        return found

    def head_branch(self) -> str | None:
        """The branch the remote's HEAD names (what a clone checks out), or None."""
        try:
            value = self.backend.get("HEAD", max_size=_MAX_SMALL).decode("utf-8", "replace").strip()
        except KeyMissing:
            return None
        except OSError as err:
            raise self._storage("reading HEAD", err) from None
        ref = value.removeprefix("ref: ")
        if value.startswith("ref: ") and ref.startswith("refs/heads/") and is_valid_ref(ref):
            return ref.removeprefix("refs/heads/")
        return None

    # -- refs --------------------------------------------------------------------------

    def refs(self) -> dict[str, str]:
        """Every branch and tag on the remote: ``refs/...`` → hex id. A damaged one raises."""
        try:
            keys = list(self.backend.list("refs"))
        except OSError as err:
            raise self._storage("listing refs", err) from None
        found = {}
        for key in keys:
            if not is_valid_ref(key) or not key.startswith(("refs/heads/", "refs/tags/")):
                continue
            value = self.read_ref(key)
            if value is not None:
                found[key] = value
        return found

    def read_ref(self, ref: str) -> str | None:
        try:
            data = self.backend.get(ref, max_size=_MAX_SMALL)
        except KeyMissing:
            return None
        except OSError as err:
            raise self._storage(f"reading {ref}", err) from None
        value = data.decode("utf-8", "replace").strip()
        if not _HEX_ID.match(value):
            raise CorruptObjectError(f"{self.describe()}: {ref} is damaged (not a 64-hex id)", path=ref)
        return value

    def swap_ref(self, ref: str, old: str | None, new: str | None) -> None:
        """Move ``ref`` from ``old`` to ``new`` (None: absent) by compare-and-swap.

        Raises :class:`ConcurrentUpdate` when the remote ref holds something else."""
        try:
            self.backend.compare_and_swap(
                ref, None if old is None else f"{old}\n".encode(), None if new is None else f"{new}\n".encode())
        except ConcurrentUpdate:
            raise
        except OSError as err:
            raise self._storage(f"updating {ref}", err) from None

    # -- objects -----------------------------------------------------------------------

    def has_object(self, oid: str) -> bool:
        try:
            return self.backend.size(object_key(oid)) is not None
        except OSError as err:
            raise self._storage(f"looking up object {oid}", err) from None

    def put_object(self, oid: str, stored: bytes) -> bool:
        try:
            return self.backend.put(object_key(oid), stored, if_absent=True)
        except OSError as err:
            raise self._storage(f"uploading object {oid}", err) from None

    def get_object(self, oid: str) -> bytes:
        """An object's stored bytes, unverified (the caller verifies before using them)."""
        try:
            return self.backend.get(object_key(oid), max_size=_MAX_OBJECT)
        except KeyMissing:
            raise CorruptObjectError(f"{self.describe()}: object {oid} is missing on the remote", object_id=oid,
                                     path=object_key(oid)) from None
        except OSError as err:
            raise self._storage(f"downloading object {oid}", err) from None

    # -- packs -------------------------------------------------------------------------

    def pack_names(self) -> set[str]:
        """Names of the remote's complete packs: those whose index exists (written last)."""
        try:
            keys = list(self.backend.list("packs"))
        except OSError as err:
            raise self._storage("listing packs", err) from None
        names = set()
        for key in keys:
            name = key.removeprefix("packs/").removesuffix(".idx")
            if key.endswith(".idx") and _PACK_NAME.match(name):
                names.add(name)
        return names

    def pack_size(self, name: str) -> int | None:
        try:
            return self.backend.size(pack_key(name))
        except OSError as err:
            raise self._storage(f"looking up pack {name}", err) from None

    def pack_index(self, name: str) -> tuple[int, list[PackEntry]]:
        try:
            data = self.backend.get(index_key(name), max_size=MAX_INDEX_SIZE)
        except KeyMissing:
            raise CorruptObjectError(f"{self.describe()}: pack index {name}.idx is missing", pack=name) from None
        except OSError as err:
            raise self._storage(f"downloading pack index {name}", err) from None
        return decode_pack_index(name, data)

    def put_pack_index(self, name: str, data: bytes) -> bool:
        try:
            return self.backend.put(index_key(name), data, if_absent=True)
        except OSError as err:
            raise self._storage(f"uploading pack index {name}", err) from None

    # -- prune records and listing with times (remote gc) --------------------------------

    def pruned_ids(self) -> set[str]:
        """Commits with a remote prune record (``pruned/<id>``): their data is no longer needed on
        the remote (``gc --remote`` reclaims it once no live commit shares it; history stays)."""
        try:
            keys = list(self.backend.list("pruned"))
        except OSError as err:
            raise self._storage("listing prune records", err) from None
        return {oid for key in keys if _HEX_ID.match(oid := key.removeprefix("pruned/"))}

    def put_pruned(self, commit_id: str, record: dict[str, str]) -> bool:
        """Write ``pruned/<commit id>`` (once: an existing record stands); the remote's config
        says version 2 first, so a ckptvcs that does not know prune records refuses the remote
        instead of reporting the chunks gc reclaimed as damage."""
        self._require_version(PRUNED_VERSION)
        try:
            return self.backend.put(f"pruned/{commit_id}", json.dumps(record, sort_keys=True).encode(), if_absent=True)
        except OSError as err:
            raise self._storage(f"writing the prune record of {commit_id}", err) from None

    def _require_version(self, version: int) -> None:
        while True:  # compare-and-swap of config.json: another writer's change makes us read it again
            try:
                raw = self.backend.get("config.json", max_size=_MAX_SMALL)
            except OSError as err:
                raise self._storage("reading config.json", err) from None
            config = self.config()
            if config is None or int(config["version"]) >= version:  # type: ignore[call-overload]
                return
            body = json.dumps({**config, "version": version}, sort_keys=True).encode()
            try:
                self.backend.compare_and_swap("config.json", raw, body)
                return
            except ConcurrentUpdate:
                continue
            except OSError as err:
                raise self._storage("updating config.json", err) from None

    def modified_times(self, prefix: str) -> dict[str, float]:
        """Key → last-modified time (seconds since the epoch, the store's clock) under ``prefix``.

        Needs a backend that reports times (``FsspecBackend.list_modified``); others raise UsageError."""
        lister = getattr(self.backend, "list_modified", None)
        if lister is None:
            from ckptvcs.errors import UsageError

            raise UsageError(f"{self.describe()}: this storage does not report modification times; gc --remote "
                             "needs them (its grace period)")
        try:
            return dict(lister(prefix))
        except OSError as err:
            raise self._storage(f"listing {prefix}", err) from None

    def delete(self, key: str) -> bool:
        try:
            return self.backend.delete(key)
        except OSError as err:
            raise self._storage(f"deleting {key}", err) from None
