"""torch.distributed.checkpoint (DCP) into a ckptvcs repository: sharded saves as one commit.

``dcp.save(state, storage_writer=RepoWriter(repo))`` / ``dcp.load(state,
storage_reader=RepoReader(repo, rev))``, also with ``dcp.async_save``. See docs/distributed.md.

Protocol. The coordinator picks the parent commit (the branch head) in
``prepare_global_plan`` and sends it to every rank in its plan. Every rank stages its own
write items (``Repo.stage``: chunks deduplicated, delta-coded against the parent's same
shard, durable; no ref moves) and returns its ``Staged`` in each ``WriteResult``'s
``storage_data``. DCP gathers the results to the coordinator only after every rank's
``write_data`` returned, and the coordinator's ``finish`` stages DCP's metadata (plain
values), combines every part into one manifest (``Repo.combine_staged``) and publishes
ONE commit by compare-and-swap. A rank that dies before that leaves staged garbage and no
commit.

The commit's state is a flat dict: ``"<fqn>@<offsets>"`` → the shard tensor (plain, CPU,
contiguous), ``"<fqn>@"`` → a non-tensor value (stored by ckptvcs's own encoder, never
pickled), and ``"@dcp"`` → DCP's Metadata as plain values. Loading never unpickles: the
reader hands non-tensor values to the planner as objects (:class:`RepoLoadPlanner`, or
DefaultLoadPlanner's own bookkeeping), never as bytes for ``torch.load``.

Everything reaches storage through the public Repo API, so a repository on another
Backend (object storage, for ranks on several hosts) uses this same code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any, Union

import torch
from torch.distributed.checkpoint import (
    DefaultLoadPlanner,
    Metadata,
    StorageReader,
    StorageWriter,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ckptvcs import InvalidInputError, Repo, Staged, UnsupportedValueError, UsageError
from ckptvcs.backends import Backend
from ckptvcs.errors import CorruptObjectError
from ckptvcs.refs import Refs

__all__ = ["METADATA_KEY", "RepoLoadPlanner", "RepoReader", "RepoWriter", "is_dcp_commit", "load_consolidated"]

METADATA_KEY = "@dcp"
_FORMAT = 1


def item_key(index: MetadataIndex, tensor: bool) -> str:
    """The commit's top-level key of one DCP item: stable across saves, so deltas pair."""
    if not tensor:
        return f"{index.fqn}@"
    return f"{index.fqn}@{','.join(str(int(o)) for o in (index.offset or ()))}"


RepoTarget = Union[Repo, str, "os.PathLike[str]", Backend]


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and "://" in value and not value.startswith("file://")


class _RepoHandle:
    """A repository given as a Repo, a path, a URL (``s3://bucket/prefix``) or a Backend.

    A path or URL is opened for each step and closed after it (DCP's async process mode
    and spawned ranks carry the writer to other processes, and a writer per save must not
    leave repositories open). On a backend without local files each open builds this
    process's own chunk index in a temporary directory from the packs then on the remote,
    so one host sees the packs every other host staged before it (the index refresh this
    code path needs). A Repo or a Backend object is used as is, in the process that made it.
    """

    def __init__(self, target: RepoTarget, storage_options: dict[str, Any] | None = None) -> None:
        self._repo = target if isinstance(target, Repo) else None
        self._backend = target if isinstance(target, Backend) else None
        self._url: str | None = None
        self._path: str | None = None
        self._options = dict(storage_options or {})
        if self._repo is not None and self._repo.backend.local_root() is None:
            raise InvalidInputError(
                "pass the URL or the Backend of a repository on object storage, not an open Repo: each step opens "
                "it afresh, so its chunk index holds the packs the other hosts staged"
            )
        if self._repo is not None:
            self._path = str(self._repo.root)
        elif self._backend is not None:
            self._url = self._backend.describe()
        elif _is_url(target):
            self._url = str(target)
        elif isinstance(target, (str, os.PathLike)):
            self._path = str(target)
        else:
            raise InvalidInputError(f"expected a Repo, a path, a URL or a Backend, got {type(target).__name__}")
        if self._options and self._url is None:
            raise InvalidInputError("storage_options apply to a URL (s3://...) only")

    @contextlib.contextmanager
    def open(self) -> Iterator[Repo]:
        if self._repo is not None:
            yield self._repo
            return
        if self._url is not None:
            backend = self._backend if self._backend is not None else _url_backend(self._url, self._options)
            with Repo.open(backend=backend) as repo:
                yield repo
            return
        with Repo.open(self._path) as repo:
            yield repo

    def branch_head(self, branch: str | None) -> str | None:
        """The commit a commit onto ``branch`` (or HEAD) would have as parent. On object
        storage from the refs alone: opening the repository there builds a chunk index."""
        if self._url is None:
            with self.open() as repo:
                return _branch_head(repo, branch)
        refs = Refs(self._backend if self._backend is not None else _url_backend(self._url, self._options))
        if branch is not None:
            value = refs.read_raw(f"refs/heads/{branch}")
            if value is not None:
                return value
        return refs.follow("HEAD")[1]  # a new branch starts at HEAD

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_repo": None, "_backend": None}


def _url_backend(url: str, storage_options: dict[str, Any]) -> Backend:
    from ckptvcs.backends.fsspec_backend import FsspecBackend  # fsspec/s3fs only for a URL

    return FsspecBackend(url, **storage_options)


def _done(value: Any) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A write item's data as a plain CPU tensor owning exactly its bytes (one blob each)."""
    local = getattr(t, "to_local", None)
    if callable(local) and type(t) is not torch.Tensor:
        t = local()
    t = t.detach()
    if type(t) is not torch.Tensor:
        t = t.as_subclass(torch.Tensor)
    t = t.to("cpu").contiguous()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


class RepoWriter(StorageWriter):
    """A DCP StorageWriter committing one sharded save as one ckptvcs commit.

    ``message``, ``step``, ``epoch``, ``metrics``, ``config``, ``data_version``,
    ``code_version`` and ``author`` go to the commit (:meth:`Repo.commit`'s meaning);
    ``branch`` to commit onto (default: where HEAD points). After a save,
    ``commit_id`` holds the new commit on the coordinator, and on every rank
    ``dcp.save(...).storage_meta.save_id`` does. Non-tensor values are
    taken from the planner with ``lookup_object`` (DefaultSavePlanner has it), never
    as the pickled bytes of ``resolve_data``; a planner without it is refused.
    """

    def __init__(
        self,
        repo_or_path: RepoTarget,
        message: str = "",
        step: int | None = None,
        branch: str | None = None,
        metrics: dict[str, float] | None = None,
        *,
        epoch: int | None = None,
        config: Any = None,
        data_version: str | None = None,
        code_version: Any = True,
        author: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._handle = _RepoHandle(repo_or_path, storage_options)
        self._commit_args: dict[str, Any] = {
            "message": message, "step": step, "branch": branch, "metrics": metrics, "epoch": epoch,
            "config": config, "data_version": data_version, "code_version": code_version, "author": author,
        }
        self.checkpoint_id: str | os.PathLike[str] | None = None
        self.is_coordinator = False
        self.commit_id: str | None = None
        self._parent: str | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.checkpoint_id = checkpoint_id
        self.commit_id = None
        self._parent = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise UsageError(
                "RepoWriter needs use_collectives=True: one coordinator publishes the commit once every rank's data "
                "is durable"
            )
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: every rank stages against the same parent, the branch head now."""
        self._parent = self._handle.branch_head(self._commit_args["branch"])
        return [dataclasses.replace(plan, storage_data={"parent": self._parent}) for plan in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        """Stage this rank's items durably; the futures' WriteResults carry the Staged."""
        parent = (plan.storage_data or {}).get("parent") if isinstance(plan.storage_data, dict) else None
        state: dict[str, Any] = {}
        sizes: list[tuple[Any, str, int]] = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                lookup = getattr(planner, "lookup_object", None)
                if lookup is None:
                    raise UnsupportedValueError(
                        item.index.fqn, f"the save planner {type(planner).__name__} has no lookup_object: its "
                        "non-tensor values come only as pickled bytes, which ckptvcs never stores",
                    )
                key = item_key(item.index, tensor=False)
                state[key] = lookup(item.index)
                sizes.append((item.index, key, 0))
            else:
                key = item_key(item.index, tensor=True)
                data = _plain_tensor(planner.resolve_data(item))  # type: ignore[arg-type]
                state[key] = data
                sizes.append((item.index, key, data.numel() * data.element_size()))
        if not state:
            return _done([])
        with self._handle.open() as repo:
            staged = repo.stage(state, parent=parent)
        record = dataclasses.asdict(staged)
        return _done([WriteResult(index=index, size_in_bytes=n, storage_data={"key": key, "staged": record})
                      for index, key, n in sizes])

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator, after every rank's write_data returned: publish ONE commit."""
        parts: dict[str, Staged] = {}
        keys: dict[MetadataIndex, str] = {}
        for rank_results in results:
            for result in rank_results:
                record = result.storage_data
                parts.setdefault(record["staged"]["manifest"], Staged(**record["staged"]))
                keys[result.index] = record["key"]
        args = dict(self._commit_args)
        with self._handle.open() as repo:
            meta = repo.stage({METADATA_KEY: _metadata_state(metadata, keys)}, parent=self._parent)
            combined = repo.combine_staged([meta, *parts.values()])
            self.commit_id = repo.publish(combined, args.pop("message"), args.pop("branch"), **args)
        # DCP broadcasts this Metadata to every rank as dcp.save's return value: the commit id travels with it.
        metadata.storage_meta = dataclasses.replace(metadata.storage_meta or StorageMeta(), save_id=self.commit_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never auto-selected: pass storage_writer=RepoWriter(...)


def _branch_head(repo: Repo, branch: str | None) -> str | None:
    """The commit a commit onto ``branch`` (or HEAD) would have as parent."""
    if branch is None:
        return repo.head()[1]
    if branch in repo.branches():
        return repo.resolve(branch)
    return repo.head()[1]  # a new branch starts at HEAD


def _metadata_state(metadata: Metadata, keys: dict[MetadataIndex, str]) -> dict[str, Any]:
    """DCP's Metadata as plain values ckptvcs stores natively (no pickle)."""
    tensors: dict[str, Any] = {}
    objects: dict[str, str] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            objects[fqn] = keys.get(MetadataIndex(fqn), f"{fqn}@")
            continue
        chunks = []
        for chunk in md.chunks:
            index = MetadataIndex(fqn, chunk.offsets)
            chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes),
                           "key": keys.get(index, item_key(index, tensor=True))})
        tensors[fqn] = {"dtype": md.properties.dtype, "size": list(md.size),
                        "requires_grad": bool(md.properties.requires_grad), "chunks": chunks}
    return {"format": _FORMAT, "version": metadata.version, "tensors": tensors, "objects": objects,
            "planner_data": metadata.planner_data}


def _read_dcp_metadata(repo: Repo, commit_id: str) -> dict[str, Any]:
    if not is_dcp_commit(repo, commit_id):
        raise InvalidInputError(f"commit {commit_id[:12]} was not saved through RepoWriter (no {METADATA_KEY!r} entry)")
    meta = repo.load(commit_id, keys=[METADATA_KEY])[METADATA_KEY]
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CorruptObjectError(f"commit {commit_id[:12]}: unreadable DCP metadata")
    return meta


def is_dcp_commit(repo: Repo, rev: str = "HEAD") -> bool:
    """Whether ``rev`` holds a sharded save written by :class:`RepoWriter`."""
    root = repo.manifest(rev).root
    return isinstance(root, dict) and any(pair[0] == METADATA_KEY for pair in root.get("dict", ()))


def _to_metadata(meta: dict[str, Any]) -> Metadata:
    state: dict[str, Any] = {}
    storage: dict[MetadataIndex, str] = {}
    for fqn, t in meta["tensors"].items():
        chunks = []
        for c in t["chunks"]:
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"])))
            storage[MetadataIndex(fqn, c["offsets"])] = c["key"]
        props = TensorProperties(dtype=t["dtype"], requires_grad=t["requires_grad"])
        state[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(t["size"]), chunks=chunks)
    for fqn, key in meta["objects"].items():
        state[fqn] = BytesStorageMetadata()
        storage[MetadataIndex(fqn)] = key
    return Metadata(state_dict_metadata=state, planner_data=meta["planner_data"], storage_data=storage,
                    version=meta["version"])


class RepoLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that takes non-tensor values as objects and refuses bytes.

    DefaultLoadPlanner.load_bytes would ``torch.load(weights_only=False)`` them;
    RepoReader calls :meth:`load_object` instead. RepoReader also serves a plain
    DefaultLoadPlanner (it does the same bookkeeping for it), but a planner that
    overrides ``load_bytes`` must provide ``load_object``.
    """

    def load_object(self, read_item: ReadItem, value: Any) -> None:
        if self.flatten_state_dict:
            _set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise UsageError(f"{read_item.dest_index.fqn}: ckptvcs never unpickles; values arrive via load_object")


def _hand_object(planner: LoadPlanner, read_item: ReadItem, value: Any) -> None:
    load_object = getattr(planner, "load_object", None)
    if callable(load_object):
        load_object(read_item, value)
    elif isinstance(planner, DefaultLoadPlanner) and type(planner).load_bytes is DefaultLoadPlanner.load_bytes:
        RepoLoadPlanner.load_object(planner, read_item, value)  # type: ignore[arg-type]
    else:
        raise UsageError(
            f"{read_item.dest_index.fqn}: the load planner {type(planner).__name__} overrides load_bytes, which "
            "takes pickled bytes; give it a load_object(read_item, value) method (see RepoLoadPlanner)"
        )


def _set_element(root: Any, path: tuple[Any, ...], value: Any) -> None:
    """Put ``value`` at ``path`` in a nested dict/list, creating containers (DCP's set_element)."""
    node = root
    for key, following in zip(path[:-1], path[1:]):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = empty
        elif key not in node:
            node[key] = empty
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


class _Shards:
    """One commit's shard tensors: ranged reads of a box of a stored shard."""

    def __init__(self, repo: Repo, commit_id: str) -> None:
        self.repo = repo
        self.commit_id = commit_id
        self.manifest = repo.manifest(commit_id)
        self.nodes: dict[str, dict[str, Any]] = {}
        for key, node in self.manifest.root.get("dict", ()):
            if isinstance(key, str) and isinstance(node, dict) and "tensor" in node:
                self.nodes[key] = node["tensor"]

    def read(self, key: str, offsets: Any, lengths: Any) -> torch.Tensor:
        """The box ``[offsets, offsets + lengths)`` of shard ``key``, reading only the
        chunks between its first and last element."""
        node = self.nodes.get(key)
        if node is None:
            raise CorruptObjectError(f"commit {self.commit_id[:12]} has no shard {key!r}")
        dtype = _dtype(node["dtype"])
        item = torch.empty(0, dtype=dtype).element_size()
        stride, lengths = [int(s) for s in node["stride"]], [int(n) for n in lengths]
        if len(stride) != len(lengths) or any(s < 0 for s in stride):
            raise CorruptObjectError(f"commit {self.commit_id[:12]}: shard {key!r} has an unexpected layout")
        if math.prod(lengths) == 0:
            return torch.empty(lengths, dtype=dtype)
        first = int(node["offset"]) + sum(int(o) * s for o, s in zip(offsets, stride)) * item
        span = (sum((n - 1) * s for n, s in zip(lengths, stride)) + 1) * item
        data = self.repo.read_range(self.manifest, node["blob"], first, first + span)
        flat = torch.frombuffer(data, dtype=torch.uint8).view(dtype)
        return flat.as_strided(lengths, stride, 0)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptObjectError(f"unknown dtype {name!r}")
    return dtype


class RepoReader(StorageReader):
    """A DCP StorageReader loading a commit written by :class:`RepoWriter` (any world size).

    ``rev`` is resolved by every rank; the coordinator's commit is sent with the plan
    and a rank that resolved another one (the branch moved meanwhile) fails the load:
    give a commit id or a tag to be sure. Tensors are read by ranges; non-tensor values
    are handed to the planner as objects, never unpickled.
    """

    def __init__(
        self, repo_or_path: RepoTarget, rev: str = "HEAD", *, storage_options: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self._handle = _RepoHandle(repo_or_path, storage_options)
        self.rev = rev
        self.commit_id: str | None = None
        self._storage: tuple[str, dict[MetadataIndex, str]] | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.commit_id = None
        self._storage = None

    def read_metadata(self) -> Metadata:
        with self._handle.open() as repo:
            self.commit_id = repo.resolve(self.rev)
            metadata = _to_metadata(_read_dcp_metadata(repo, self.commit_id))
        self._storage = (self.commit_id, metadata.storage_data)
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return [dataclasses.replace(plan, storage_data={"commit": self.commit_id}) for plan in plans]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        wanted = (plan.storage_data or {}).get("commit") if isinstance(plan.storage_data, dict) else None
        with self._handle.open() as repo:
            commit_id = wanted or self.commit_id or repo.resolve(self.rev)
            if self.commit_id is not None and commit_id != self.commit_id:
                raise InvalidInputError(
                    f"{self.rev!r} names {self.commit_id[:12]} here but {commit_id[:12]} on the coordinator (it "
                    "moved during the load); load a commit id or a tag"
                )
            if self._storage is None or self._storage[0] != commit_id:
                self._storage = (commit_id, _to_metadata(_read_dcp_metadata(repo, commit_id)).storage_data)
            self._read_items(repo, commit_id, self._storage[1], plan, planner)
        return _done(None)

    @staticmethod
    def _read_items(
        repo: Repo, commit_id: str, storage: dict[MetadataIndex, str], plan: LoadPlan, planner: LoadPlanner
    ) -> None:
        byte_items = [item for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if byte_items:
            keys = list(dict.fromkeys(storage[item.storage_index] for item in byte_items))
            values = repo.load(commit_id, keys=keys, map_location="cpu")
            for item in byte_items:
                _hand_object(planner, item, values[storage[item.storage_index]])
        shards = _Shards(repo, commit_id)
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                continue
            src = shards.read(storage[item.storage_index], item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item).detach()
            if list(target.size()) != list(src.size()):
                raise CorruptObjectError(f"{item.storage_index.fqn}: stored {list(src.size())}, "
                                         f"wanted {list(target.size())}")
            target.copy_(src)
            planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


def load_consolidated(
    repo_or_path: RepoTarget, rev: str = "HEAD", *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A sharded commit as one state dict of full tensors, in one process, no process group.

    What DCP's ``format_utils`` do for its own files: every tensor assembled from its
    shards, the non-tensor values, nested back as saved (the planner's flattening
    undone). ``repo.load(rev)`` instead returns the stored shards as they are.
    """
    with _RepoHandle(repo_or_path, storage_options).open() as repo:
        return _consolidate(repo, repo.resolve(rev))


def _consolidate(repo: Repo, commit_id: str) -> dict[str, Any]:
    meta = _read_dcp_metadata(repo, commit_id)
    shards = _Shards(repo, commit_id)
    flat: dict[str, Any] = {}
    for fqn, t in meta["tensors"].items():
        full = torch.empty(list(t["size"]), dtype=t["dtype"])
        for c in t["chunks"]:
            box = full
            for dim, (o, n) in enumerate(zip(c["offsets"], c["sizes"])):
                box = box.narrow(dim, o, n)
            box.copy_(shards.read(c["key"], [0] * len(c["sizes"]), c["sizes"]))
        flat[fqn] = full
    if meta["objects"]:
        values = repo.load(commit_id, keys=list(meta["objects"].values()), map_location="cpu")
        flat.update({fqn: values[key] for fqn, key in meta["objects"].items()})
    mappings = meta["planner_data"]
    if not isinstance(mappings, dict) or not all(fqn in mappings for fqn in flat):
        return flat
    nested: dict[str, Any] = {}
    for fqn, value in flat.items():
        _set_element(nested, tuple(mappings[fqn]), value)
    return nested
