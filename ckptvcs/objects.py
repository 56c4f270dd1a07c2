"""Immutable history objects (commits, manifests, tags) and their loose-object store.

An object's bytes are ``<kind>\\n<canonical JSON>``; its id is the BLAKE3 of those
bytes, so equal content always has one id and any change to a stored object is
detected when it is read. Canonical JSON: sorted keys, no whitespace, UTF-8, no NaN.
Objects are stored zstd-compressed, one file each, under ``objects/<2 hex>/<62 hex>``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from . import _fs, codec, layout
from .backends import Backend, LocalBackend, put_many
from .errors import CorruptObjectError, IntegrityError, UnsupportedValueError

__all__ = ["Commit", "Manifest", "Tag", "ObjectStore", "PreparedObject", "canonical_json", "encode_float", "decode_float",
           "KINDS", "json_text_depth_exceeds"]

KINDS = ("commit", "manifest", "tag")
_MAX_OBJECT_SIZE = 1 << 30  # bound on decompression of one object
_PEEK_BYTES = 256 << 10
# What a reader expands one stored object to is bounded by what the file holds: at most
# _MAX_EXPANSION times its stored size (real manifests and commits, mostly hex ids, shrink
# 2-5x), but always up to _EXPANSION_FLOOR. The writer refuses an object past the same
# bound, so every object ckptvcs wrote stays readable. docs/format.md, "Reader limits".
_MAX_EXPANSION = 64
_EXPANSION_FLOOR = 8 << 20
MAX_JSON_DEPTH = 256  # nesting of JSON arrays and objects in one object (a state level takes 3)


def object_size_limit(stored_size: int) -> int:
    """How many bytes a stored object of ``stored_size`` bytes may decompress to."""
    return min(_MAX_OBJECT_SIZE, max(_EXPANSION_FLOOR, _MAX_EXPANSION * stored_size))


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests arrays and objects deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return False


# Every byte but the four brackets and the quote: deleted before counting depth in JSON text.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_text_depth_exceeds(text: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``text`` nests arrays and objects deeper than ``limit``.

    The same answer as :func:`json_depth_exceeds` on the parsed value, in time linear in
    the bytes and without a Python step per node (a manifest of 100,000 tensors has over
    a million): brackets inside strings are skipped by the parity of the quotes before
    them (a string's escaped quotes are first removed with the string). ``text`` must be
    valid JSON (what ``canonical_json`` writes, or what ``json.loads`` accepted); bytes
    before it without quotes or brackets (an object's ``<kind>\\n``) do not matter.
    """
    if text.count(b"[") + text.count(b"{") <= limit:  # cheap, and true of most commits and tags
        return False
    if b"\\" in text:  # backslashes occur only inside strings: drop those strings' contents
        text = _JSON_STRING.sub(b'""', text)
    marks = np.frombuffer(text.translate(None, _NOT_STRUCTURE), dtype=np.uint8)
    inside = (np.cumsum(marks == ord('"'), dtype=np.int64) & 1).astype(bool)  # after an odd count of quotes
    steps = ((marks == ord("[")) | (marks == ord("{"))).astype(np.int64) - ((marks == ord("]")) | (marks == ord("}")))
    steps[inside] = 0
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value that hashing relies on."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_float(x: float) -> float | str:
    """JSON has no NaN or infinity: those travel as strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def decode_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise CorruptObjectError(f"expected a number, found {type(v).__name__}")
    if isinstance(v, str) and v not in ("nan", "inf", "-inf"):
        raise CorruptObjectError(f"expected a number, found string {v!r}")
    return float(v)


def _expect(obj: dict[str, Any], key: str, types: type | tuple[type, ...], kind: str) -> Any:
    if key not in obj:
        raise CorruptObjectError(f"{kind} object has no field {key!r}")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise CorruptObjectError(f"{kind} field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


_HEX_ID = re.compile(r"[0-9a-f]{64}")


def _is_hex_id(value: Any) -> bool:
    return isinstance(value, str) and _HEX_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Manifest:
    """A commit's state tree (``root``) and the blobs (chunk lists) it refers to.

    ``parse`` validates the shape every reader relies on (blob sizes, chunk ids) and
    raises CorruptObjectError otherwise; the tree itself is checked as it is decoded.
    """

    id: str
    root: Any
    blobs: list[dict[str, Any]]

    @classmethod
    def parse(cls, oid: str, body: Any) -> Manifest:
        if not isinstance(body, dict) or "root" not in body or not isinstance(body.get("blobs"), list):
            raise CorruptObjectError(f"manifest {oid} is malformed")
        for blob in body["blobs"]:
            nbytes = blob.get("nbytes") if isinstance(blob, dict) else None
            chunks = blob.get("chunks") if isinstance(blob, dict) else None
            if (
                isinstance(nbytes, bool)
                or not isinstance(nbytes, int)
                or nbytes < 0
                or not isinstance(chunks, list)
                or not all(_is_hex_id(c) for c in chunks)
            ):
                raise CorruptObjectError(f"manifest {oid} has a malformed blob entry")
        return cls(oid, body["root"], body["blobs"])


@dataclass(frozen=True)
class Commit:
    """One checkpoint in the history. ``id`` is filled in once the commit is stored."""

    manifest: str
    parents: tuple[str, ...]
    message: str
    author: str
    time: str  # UTC, ISO 8601 with a trailing Z
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    config: Any = None
    data_version: str | None = None
    code_version: dict[str, Any] | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # sizes and timings (docs/format.md 4.1)
    id: str = ""
    # Not part of the object (nor of its id): the pruned record (``pruned/<id>``) when a
    # retention rule released this commit's tensor data; filled in by Repo.log/show.
    pruned: dict[str, Any] | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        del body["id"]
        del body["pruned"]
        body["parents"] = list(self.parents)
        body["metrics"] = {k: encode_float(v) for k, v in self.metrics.items()}
        return body

    @classmethod
    def from_json(cls, obj: Any, oid: str) -> Commit:
        if not isinstance(obj, dict):
            raise CorruptObjectError(f"commit {oid} is not a JSON object")
        manifest = _expect(obj, "manifest", str, "commit")
        parents = _expect(obj, "parents", list, "commit")
        if not _is_hex_id(manifest) or not all(_is_hex_id(p) for p in parents):
            raise CorruptObjectError(f"commit {oid} has a malformed manifest or parent id")
        metrics = _expect(obj, "metrics", dict, "commit")
        try:
            decoded_metrics = {str(k): decode_float(v) for k, v in metrics.items()}
        except CorruptObjectError as err:
            raise CorruptObjectError(f"commit {oid} metrics: {err}") from None
        return cls(
            manifest=manifest,
            parents=tuple(parents),
            message=_expect(obj, "message", str, "commit"),
            author=_expect(obj, "author", str, "commit"),
            time=_expect(obj, "time", str, "commit"),
            step=_expect(obj, "step", (int, type(None)), "commit"),
            epoch=_expect(obj, "epoch", (int, type(None)), "commit"),
            metrics=decoded_metrics,
            config=obj.get("config"),
            data_version=_expect(obj, "data_version", (str, type(None)), "commit"),
            code_version=_expect(obj, "code_version", (dict, type(None)), "commit"),
            environment=_expect(obj, "environment", dict, "commit"),
            stats=_expect(obj, "stats", dict, "commit"),
            id=oid,
        )


@dataclass(frozen=True)
class Tag:
    """An annotated tag: a named, immutable pointer to a commit with a message."""

    object: str
    name: str
    message: str
    tagger: str
    time: str
    id: str = ""
    # A signed tag's ``{"alg", "key", "sig"}`` (ckptvcs.signing; docs/format.md "Signed
    # tags"); absent from unsigned tags, whose bytes and ids are as before.
    signature: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        del body["id"]
        if self.signature is None:
            del body["signature"]
        return body

    @classmethod
    def from_json(cls, obj: Any, oid: str) -> Tag:
        if not isinstance(obj, dict):
            raise CorruptObjectError(f"tag {oid} is not a JSON object")
        target = _expect(obj, "object", str, "tag")
        if not _is_hex_id(target):
            raise CorruptObjectError(f"tag {oid} points at a malformed id")
        return cls(
            object=target,
            name=_expect(obj, "name", str, "tag"),
            message=_expect(obj, "message", str, "tag"),
            tagger=_expect(obj, "tagger", str, "tag"),
            time=_expect(obj, "time", str, "tag"),
            id=oid,
            signature=_signature(obj, oid),
        )


def _signature(obj: dict[str, Any], oid: str) -> dict[str, str] | None:
    """A tag's ``signature`` field: absent, or ``{"alg": "ed25519", "key": 64 hex, "sig": 128 hex}``."""
    value = obj.get("signature")
    if value is None:
        return None
    if (not isinstance(value, dict) or set(value) != {"alg", "key", "sig"}
            or not all(isinstance(v, str) and len(v) <= 256 for v in value.values())):
        raise CorruptObjectError(f"tag {oid} has a malformed signature field")
    return dict(value)


@dataclass(frozen=True)
class PreparedObject:
    """An object encoded for storage (:meth:`ObjectStore.prepare`): id, kind, stored bytes."""

    oid: str
    kind: str
    stored: bytes


def _readable(kind: str, body: Any, data: bytes) -> bytes:
    """``data`` compressed, refused (UnsupportedValueError) when a reader would refuse it."""
    if json_text_depth_exceeds(data):  # ``data`` is ``body`` as canonical JSON: the same answer, linear
        raise UnsupportedValueError(f"<{kind}>", f"it nests deeper than {MAX_JSON_DEPTH} levels (docs/format.md, Reader limits)")
    compressed = codec.compress_object(data)
    if len(data) > object_size_limit(len(compressed)):
        raise UnsupportedValueError(
            f"<{kind}>",
            f"its {len(data)} bytes shrink to {len(compressed)}, more than readers expand "
            "(docs/format.md, Reader limits)",
        )
    return compressed


class ObjectStore:
    """Loose, content-addressed objects under ``objects/``, stored through a backend.

    Built from a backend, or (the old form) from a local ``objects/`` directory path.
    """

    def __init__(self, backend: Backend | Path) -> None:
        self.backend: Backend = LocalBackend(backend.parent) if isinstance(backend, Path) else backend
        local = self.backend.local_root()
        self.root = None if local is None else local / layout.OBJECTS

    def path(self, oid: str) -> Path:
        """The file of an object in a local store (tests damage it)."""
        assert self.root is not None, "an object file exists only in a local store"
        return self.root / oid[:2] / oid[2:]

    def put(self, kind: str, body: Any) -> str:
        """Store an object durably (fsync, rename, fsync dir); returns its id."""
        assert kind in KINDS, kind
        data = kind.encode() + b"\n" + canonical_json(body)
        oid = blake3.blake3(data).hexdigest()
        key = layout.object_key(oid)
        with _fs.storage_errors(f"writing {kind} object {oid}"):
            if self.backend.size(key) is None:
                self.backend.put(key, _readable(kind, body, data), if_absent=True)
        return oid

    def prepare(self, kind: str, body: Any) -> PreparedObject:
        """An object's id and stored bytes, checked as :meth:`put` checks them, not yet
        written (for :meth:`put_prepared`)."""
        assert kind in KINDS, kind
        data = kind.encode() + b"\n" + canonical_json(body)
        oid = blake3.blake3(data).hexdigest()
        return PreparedObject(oid, kind, _readable(kind, body, data))

    def put_prepared(self, objects: Sequence[PreparedObject]) -> None:
        """Store prepared objects, all durable when this returns (one backend batch: locally
        every file fsynced, then renamed, then each folder fsynced once)."""
        with _fs.storage_errors("writing " + " and ".join(f"{o.kind} object {o.oid}" for o in objects)):
            put_many(self.backend, [(layout.object_key(o.oid), o.stored) for o in objects])

    def has(self, oid: str) -> bool:
        return self.backend.size(layout.object_key(oid)) is not None

    def get(self, oid: str, expected_kind: str | None = None) -> tuple[str, Any]:
        """Read, verify and parse an object; returns ``(kind, body)``."""
        with _fs.storage_errors(f"reading object {oid}"):
            try:
                stored = self.backend.get(layout.object_key(oid), max_size=_MAX_OBJECT_SIZE)
            except (FileNotFoundError, NotADirectoryError):  # inside: storage_errors would make it a StorageError
                raise self._damage(IntegrityError, oid, "is missing") from None
            except CorruptObjectError as err:
                raise self._damage(CorruptObjectError, oid, f"is damaged on disk: {err}", on_disk=True) from None
        try:
            data = codec.decompress_object(stored, object_size_limit(len(stored)))
        except CorruptObjectError as err:
            raise self._damage(CorruptObjectError, oid, f"is damaged on disk: {err}", on_disk=True) from None
        if blake3.blake3(data).hexdigest() != oid:
            raise self._damage(IntegrityError, oid, "fails its BLAKE3 check (damaged on disk)", on_disk=True)
        kind, _, payload = data.partition(b"\n")
        kind_name = kind.decode("ascii", "replace")
        if kind_name not in KINDS:
            raise self._damage(CorruptObjectError, oid, f"has unknown kind {kind_name!r}")
        if expected_kind is not None and kind_name != expected_kind:
            raise self._damage(CorruptObjectError, oid, f"is a {kind_name}, expected a {expected_kind}")
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as err:
            raise self._damage(CorruptObjectError, oid, f"does not parse: {err}") from None
        except RecursionError:
            raise self._damage(CorruptObjectError, oid, f"nests deeper than {MAX_JSON_DEPTH} levels") from None
        # On the text json.loads accepted: linear, and objects with fewer opening brackets than
        # the limit (most commits and tags) are answered by counting bytes.
        if json_text_depth_exceeds(payload):
            raise self._damage(CorruptObjectError, oid, f"nests deeper than {MAX_JSON_DEPTH} levels")
        return kind_name, body

    def _damage(self, cls: type[IntegrityError], oid: str, problem: str, *, on_disk: bool = False) -> IntegrityError:
        """``cls("object <oid> <problem>")`` carrying the object's id, file and finding as fields."""
        return cls(f"object {oid} {problem}", object_id=oid, path=layout.object_key(oid), damaged_on_disk=on_disk,
                   problem=problem)

    def kind(self, oid: str) -> str:
        return self.get(oid)[0]

    def peek_kind(self, oid: str) -> str | None:
        """The kind of a stored object from its first bytes only, unverified (None: unreadable).

        For scans over every object (gc looking for unreachable commits) that would
        otherwise decompress and parse every manifest; read with :meth:`get` to trust it.
        """
        try:
            reader = self.backend.open_reader(layout.object_key(oid))  # never a FIFO, a device or a link
            try:
                start = reader.read(0, _PEEK_BYTES)  # holds the whole first zstd block (at most 128 KiB)
            finally:
                reader.close()
            head = codec.decompress_prefix(start, 16)
        except (OSError, CorruptObjectError):
            return None
        kind = head.partition(b"\n")[0].decode("ascii", "replace")
        return kind if kind in KINDS else None

    def read_commit(self, oid: str) -> Commit:
        return Commit.from_json(self.get(oid, "commit")[1], oid)

    def read_tag(self, oid: str) -> Tag:
        return Tag.from_json(self.get(oid, "tag")[1], oid)

    def with_prefix(self, prefix: str) -> list[str]:
        """Ids of stored objects starting with a hex ``prefix`` of at least 4 characters."""
        if len(prefix) < 4:
            return []
        start = layout.object_key(prefix)
        with _fs.storage_errors("listing objects"):
            keys = list(self.backend.list(layout.object_folder(prefix)))
        return sorted(layout.join(*k.split("/")[1:]).replace("/", "") for k in keys
                      if k.startswith(start) and len(k.rsplit("/", 1)[-1]) == 62)

    def __iter__(self) -> Iterator[str]:
        with _fs.storage_errors("listing objects"):
            keys = list(self.backend.list(layout.OBJECTS))
        for key in keys:
            parts = key.split("/")
            if len(parts) == 3 and len(parts[1]) == 2 and len(parts[2]) == 62:
                yield parts[1] + parts[2]
