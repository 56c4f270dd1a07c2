"""Pack files: append-only, self-describing containers of stored chunks.

A pack is written through the storage backend's streamed writer (locally: under
``tmp/``, sealed by footer, fsync, rename into ``packs/``, fsync of the directory) and
never modified afterwards; it is read by ranges through the backend's reader. Each entry carries its own
header (chunk id, codec, lengths), so the LMDB index can always be rebuilt from the
packs alone, and the footer lets a reader tell a complete pack from a torn one.
Layout (all integers little-endian) is specified in docs/format.md.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import blake3

from . import _fs, layout, scratch
from .backends import Backend, LocalBackend, RangeReader
from .backends.local import LocalRangeReader
from .codec import CODEC_NAMES, USES_BASE
from .errors import CorruptObjectError

__all__ = [
    "PackWriter", "PackEntry", "PackFiles", "iter_pack_entries", "entry_size", "with_delta_bases", "ENTRY_HEADER_SIZE",
    "FLAG_HAS_BASE",
]

PACK_MAGIC = b"CKPTPACK"
PACK_VERSION = 1
_PACK_HEADER = struct.Struct("<8sII")  # magic, version, reserved
_ENTRY_HEADER = struct.Struct("<2sBBII32s")  # magic, codec, flags, raw_len, stored_len, chunk id
_ENTRY_MAGIC = b"CE"
_FOOTER = struct.Struct("<QQ32s8s")  # entry count, end of entries, BLAKE3(entry headers), magic
_FOOTER_MAGIC = b"CKPTEND1"
ENTRY_HEADER_SIZE = _ENTRY_HEADER.size
FLAG_HAS_BASE = 0x01  # entry flags bit: a 32-byte base chunk id follows the entry header
_KNOWN_FLAGS = FLAG_HAS_BASE
_BASE_ID_SIZE = 32
_MAX_OFFSET = 1 << 62  # far beyond any pack; a larger offset (a damaged index value) names no entry


def _prefix_size(base: bytes | None) -> int:
    """Bytes between an entry's start and its payload: the header, and the base id if any."""
    return ENTRY_HEADER_SIZE + (_BASE_ID_SIZE if base is not None else 0)


@dataclass(frozen=True)
class PackEntry:
    """Where one chunk sits: ``offset`` points at its payload, after the entry header.

    ``base`` is the id of the chunk a delta codec refers to (None for self-contained
    codecs): reading this chunk needs the base chunk first, and gc must keep it.
    """

    chunk_id: bytes
    pack: str
    offset: int
    stored_len: int
    raw_len: int
    codec: int
    base: bytes | None = None


def entry_size(entry: PackEntry) -> int:
    """Bytes an entry takes in its pack: header, base id (if any) and payload."""
    return _prefix_size(entry.base) + entry.stored_len


def with_delta_bases(chunk_ids: Iterable[bytes], entries: Mapping[bytes, PackEntry]) -> set[bytes]:
    """``chunk_ids`` plus, transitively, the delta base of each (looked up in ``entries``).

    A chunk stored against a base cannot be read without it, so whatever needs a chunk
    (gc's live set, fsck's notion of garbage) needs its whole chain.
    """
    needed = set(chunk_ids)
    frontier = list(needed)
    while frontier:
        entry = entries.get(frontier.pop())
        if entry is not None and entry.base is not None and entry.base not in needed:
            needed.add(entry.base)
            frontier.append(entry.base)
    return needed


def _as_backend(store: Backend | Path) -> Backend:
    """A backend, or (the old form) the local store holding the ``packs/`` folder ``store``."""
    return LocalBackend(Path(store).parent) if isinstance(store, (str, Path)) else store


# PackWriter gathers writes below this size into one backend write.
_GATHER_BYTES = 256 * 1024


class PackWriter:
    """Streams chunks into the backend's writer; ``seal()`` makes it a durable pack.

    Built from a backend, or (the old form) from the local ``tmp/`` and ``packs/`` folders.
    """

    def __init__(self, backend: Backend | Path, packs_dir: Path | None = None) -> None:
        self.name = uuid.uuid4().hex
        self.backend = _as_backend(packs_dir if packs_dir is not None else backend)
        self.key = layout.pack_key(self.name)
        self._out = self.backend.open_writer(self.key)
        self._headers = blake3.blake3()
        self.entries: list[PackEntry] = []
        self.size = 0
        self._small = bytearray()  # small writes, gathered into one backend write
        self._write(_PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0))

    def _write(self, data: bytes | memoryview) -> None:
        # Entry headers and small payloads are gathered (a tiny state's chunks would
        # otherwise cost two write calls each); large payloads go straight through.
        if len(data) < _GATHER_BYTES:
            self._small += data
            if len(self._small) >= _GATHER_BYTES:
                self._flush()
        else:
            self._flush()
            self._out.write(data)
        self.size += len(data)

    def _flush(self) -> None:
        if self._small:
            self._out.write(memoryview(self._small))
            self._small = bytearray()

    def add(
        self, chunk_id: bytes, codec: int, raw_len: int, payload: bytes | memoryview, base: bytes | None = None
    ) -> PackEntry:
        """Append one chunk; ``base`` is the chunk id a delta payload refers to (else None)."""
        if base is not None and len(base) != _BASE_ID_SIZE:
            raise ValueError("a base chunk id is 32 bytes")
        flags = FLAG_HAS_BASE if base is not None else 0
        header = _ENTRY_HEADER.pack(_ENTRY_MAGIC, codec, flags, raw_len, len(payload), chunk_id)
        if base is not None:
            header += base
        self._headers.update(header)
        self._write(header)
        entry = PackEntry(chunk_id, self.name, self.size, len(payload), raw_len, codec, base)
        self._write(payload)
        self.entries.append(entry)
        return entry

    def seal(self) -> Path:
        """Write the footer and commit the pack durably (locally: fsync, rename into
        ``packs/``, fsync of the folder). Returns its file (local) or its key."""
        end = self.size
        self._write(_FOOTER.pack(len(self.entries), end, self._headers.digest(), _FOOTER_MAGIC))
        self._flush()
        self._out.commit()
        local = self.backend.local_root()
        return Path(self.key) if local is None else local / self.key

    def abort(self) -> None:
        """Drop an unsealed pack (the commit that wrote it failed)."""
        self._out.abort()


def _entry_damage(entry: PackEntry, what: str) -> CorruptObjectError:
    """``CorruptObjectError("pack <pack> <what>")`` naming the entry's pack, offset and chunk as fields."""
    return CorruptObjectError(f"pack {entry.pack} {what}", pack=entry.pack, offset=entry.offset,
                              chunk_id=entry.chunk_id.hex())


def _entry_start(entry: PackEntry, prefix: int) -> int:
    """Where an entry's header starts, refusing offsets no entry can have (a damaged index)."""
    start = entry.offset - prefix
    if not _PACK_HEADER.size <= start < _MAX_OFFSET:
        raise _entry_damage(entry, f"has no entry at offset {entry.offset}")
    return start


class PackFiles:
    """Reads chunk payloads from sealed packs through the backend, keeping readers open.

    Built from a backend, or (the old form) from a local ``packs/`` folder.
    """

    def __init__(self, backend: Backend | Path) -> None:
        self.backend = _as_backend(backend)
        self._readers: dict[str, RangeReader] = {}
        self._guard = threading.Lock()

    def path(self, pack: str) -> Path:
        """The file of a pack in a local store (tests damage it)."""
        local = self.backend.local_root()
        assert local is not None, "a pack file exists only in a local store"
        return local / layout.pack_key(pack)

    def exists(self, pack: str) -> bool:
        return self.backend.size(layout.pack_key(pack)) is not None

    def _fd(self, pack: str) -> RangeReader:
        reader = self._readers.get(pack)
        if reader is None:
            try:
                reader = self.backend.open_reader(layout.pack_key(pack))
            except FileNotFoundError:
                raise CorruptObjectError(f"pack {pack} is missing", pack=pack) from None
            # Another thread may have opened it meanwhile; keep one, close the other.
            with self._guard:
                existing = self._readers.setdefault(pack, reader)
            if existing is not reader:
                reader.close()
                reader = existing
        return reader

    def read_payload(self, entry: PackEntry) -> memoryview:
        """Read one payload, checking the entry header in front of it names the chunk."""
        prefix = _prefix_size(entry.base)
        want = prefix + entry.stored_len
        data = self._fd(entry.pack).read(_entry_start(entry, prefix), want)
        if len(data) != want:
            raise _entry_damage(entry, f"is truncated at offset {entry.offset}")
        self._check_header(entry, data)
        return memoryview(data)[prefix:]

    def read_payload_reusing(self, entry: PackEntry) -> memoryview:
        """:meth:`read_payload` into this thread's scratch buffer (valid until its next call)."""
        prefix = _prefix_size(entry.base)
        want = prefix + entry.stored_len
        buf = memoryview(scratch.buffer("pack-read", want))
        got = self._fd(entry.pack).readinto([buf], _entry_start(entry, prefix))
        if got != want:
            raise _entry_damage(entry, f"is truncated at offset {entry.offset}")
        self._check_header(entry, buf)
        return buf[prefix:]

    def read_raw_into(self, entry: PackEntry, out: memoryview) -> None:
        """Read a raw-codec payload directly into ``out`` (one syscall, no copy)."""
        if entry.base is not None:
            raise _entry_damage(entry, f"entry at offset {entry.offset}: a raw chunk has no base")
        header = bytearray(ENTRY_HEADER_SIZE)
        got = self._fd(entry.pack).readinto([header, out], _entry_start(entry, ENTRY_HEADER_SIZE))
        if got != ENTRY_HEADER_SIZE + len(out) or len(out) != entry.stored_len:
            raise _entry_damage(entry, f"is truncated at offset {entry.offset}")
        self._check_header(entry, header)

    @staticmethod
    def _check_header(entry: PackEntry, data: bytes | bytearray | memoryview) -> None:
        magic, codec, flags, raw_len, stored_len, chunk_id = _ENTRY_HEADER.unpack_from(data)
        base = None
        if flags & FLAG_HAS_BASE:
            base = bytes(data[ENTRY_HEADER_SIZE : ENTRY_HEADER_SIZE + _BASE_ID_SIZE])
        # The whole flags byte must be what the index implies: unknown bits are refused
        # (docs/format.md 5.1), not ignored.
        expected_flags = FLAG_HAS_BASE if entry.base is not None else 0
        if (magic, codec, flags, raw_len, stored_len, chunk_id, base) != (
            _ENTRY_MAGIC, entry.codec, expected_flags, entry.raw_len, entry.stored_len, entry.chunk_id, entry.base
        ):
            raise _entry_damage(entry, f"entry at offset {entry.offset} does not match the index")

    def forget(self, pack: str) -> None:
        """Close the reader of a pack that gc is about to delete."""
        with self._guard:
            reader = self._readers.pop(pack, None)
        if reader is not None:
            reader.close()

    def close(self) -> None:
        with self._guard:
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.close()


def pack_names(backend: Backend) -> list[str]:
    """The names of the sealed packs, sorted (``packs/<name>.pack`` keys)."""
    return [layout.pack_name(k) for k in backend.list(layout.PACKS)
            if k.endswith(layout.PACK_SUFFIX) and k.count("/") == 1]


def iter_backend_pack(backend: Backend, pack: str, *, strict: bool = True) -> Iterator[PackEntry]:
    """:func:`iter_pack_entries` of the pack ``pack`` in ``backend``."""
    if isinstance(backend, LocalBackend):  # header walks stay outside the fault tests' read seam
        yield from iter_pack_entries(backend.path(layout.pack_key(pack)), strict=strict)
        return
    try:
        reader = backend.open_reader(layout.pack_key(pack))
    except CorruptObjectError:
        if not strict:
            return  # nothing in it can be salvaged
        raise
    try:
        yield from _walk(reader, pack, strict)
    finally:
        reader.close()


class _Cursor:
    """A file-like view (seek, read) of a range reader, for the header walk."""

    def __init__(self, reader: RangeReader) -> None:
        self._reader = reader
        self._pos = 0

    def seek(self, pos: int) -> None:
        self._pos = pos

    def read(self, size: int) -> bytes:
        data = self._reader.read(self._pos, size)
        self._pos += len(data)
        return data


def iter_pack_entries(path: Path, *, strict: bool = True) -> Iterator[PackEntry]:
    """Walk a pack's entry headers (for index rebuild and fsck), validating its frame.

    Raises CorruptObjectError on a bad header, a torn entry or a missing footer. With
    ``strict=False`` (salvage, for ``repair index`` and fsck) a damaged pack yields every
    well-formed entry header it still holds, before and after the damage (see
    :func:`_salvage_entries`); every chunk read is verified against its id anyway, so a
    salvaged entry can never return wrong bytes.
    """
    pack = path.stem
    try:
        fd = _fs.open_regular(path)  # never a FIFO, a device or a link
    except CorruptObjectError:
        if not strict:
            return  # nothing in it can be salvaged
        raise
    reader = LocalRangeReader(fd, str(path), seam=False)
    try:
        yield from _walk(reader, pack, strict)
    finally:
        reader.close()


def _walk(reader: RangeReader, pack: str, strict: bool) -> list[PackEntry]:
    """The entries of an open pack (see :func:`iter_pack_entries`)."""
    size = reader.size
    f = _Cursor(reader)
    head = f.read(_PACK_HEADER.size)
    header_ok = len(head) == _PACK_HEADER.size and _PACK_HEADER.unpack(head) == (PACK_MAGIC, PACK_VERSION, 0)
    if not header_ok and strict:
        raise CorruptObjectError(f"pack {pack} has no valid header", pack=pack, damaged_on_disk=True)
    end = size
    count = digest = None
    if size >= _PACK_HEADER.size + _FOOTER.size:
        f.seek(size - _FOOTER.size)
        count, footer_end, digest, magic = _FOOTER.unpack(f.read(_FOOTER.size))
        if magic == _FOOTER_MAGIC and footer_end == size - _FOOTER.size:
            end = footer_end
        else:
            count = digest = None
    if not strict:
        return _salvage_entries(reader, pack, end)
    if count is None or digest is None:  # both None or both set
        raise CorruptObjectError(f"pack {pack} has no valid footer (torn write?)", pack=pack,
                                 damaged_on_disk=True)
    return _strict_entries(f, pack, end, count, digest)


def _strict_entries(f: _Cursor, pack: str, end: int, count: int, digest: bytes) -> list[PackEntry]:
    """The entries of an intact pack, walked header to header; any flaw raises."""
    pos = _PACK_HEADER.size
    headers = blake3.blake3()
    entries = []
    while pos < end:
        f.seek(pos)
        raw = f.read(ENTRY_HEADER_SIZE)
        valid = len(raw) == ENTRY_HEADER_SIZE
        base = None
        if valid:
            magic2, codec, flags, raw_len, stored_len, chunk_id = _ENTRY_HEADER.unpack(raw)
            valid = magic2 == _ENTRY_MAGIC and not flags & ~_KNOWN_FLAGS
            if valid and flags & FLAG_HAS_BASE:
                base = f.read(_BASE_ID_SIZE)
                valid = len(base) == _BASE_ID_SIZE
                raw += base
            valid = valid and pos + _prefix_size(base) + stored_len <= end
        if not valid:
            raise CorruptObjectError(f"pack {pack} entry header at {pos} is invalid or torn", pack=pack, offset=pos,
                                     damaged_on_disk=True)
        headers.update(raw)
        entries.append(PackEntry(chunk_id, pack, pos + _prefix_size(base), stored_len, raw_len, codec, base))
        pos += _prefix_size(base) + stored_len
    if len(entries) != count or headers.digest() != digest:
        raise CorruptObjectError(f"pack {pack} entry headers do not match its footer", pack=pack,
                                 damaged_on_disk=True)
    return entries


def _entry_at(data: mmap.mmap | bytes, pack: str, pos: int, end: int) -> PackEntry | None:
    """The entry whose header starts at ``pos``, if that header is well-formed, else None.

    Well-formed: the magic ``CE``, no unknown flag bits, a known codec that names a base
    exactly when the flags say one follows, and header, base id and payload inside ``end``.
    """
    if pos < _PACK_HEADER.size or pos + ENTRY_HEADER_SIZE > end:
        return None
    magic, codec, flags, raw_len, stored_len, chunk_id = _ENTRY_HEADER.unpack_from(data, pos)
    has_base = bool(flags & FLAG_HAS_BASE)
    if magic != _ENTRY_MAGIC or flags & ~_KNOWN_FLAGS or codec not in CODEC_NAMES or (codec in USES_BASE) != has_base:
        return None
    base = bytes(data[pos + ENTRY_HEADER_SIZE : pos + ENTRY_HEADER_SIZE + _BASE_ID_SIZE]) if has_base else None
    offset = pos + _prefix_size(base)
    if offset + stored_len > end:
        return None
    return PackEntry(bytes(chunk_id), pack, offset, stored_len, raw_len, codec, base)


def _salvage_entries(reader: RangeReader, pack: str, end: int) -> list[PackEntry]:
    """Every well-formed entry header of a damaged pack, in offset order (the resync rule).

    The walk follows entry to entry while headers are well-formed (:func:`_entry_at`);
    past a damaged one it resynchronises by scanning forward for the next ``CE`` at which
    a well-formed header starts. Entries are self-describing, so nothing but the damaged
    entry is lost; a header that only looks well-formed (inside a payload, or damaged in
    its chunk id or lengths) yields an entry whose reads fail verification, which
    ``repair index`` checks before indexing it. A damaged pack header or footer loses
    no entry: the scan starts right after the 16-byte header, and without a valid
    footer runs to the end of the file.
    """
    if end <= _PACK_HEADER.size:
        return []
    entries: list[PackEntry] = []
    fileno = getattr(reader, "fileno", None)
    # A local pack is mapped; elsewhere a damaged pack is read whole (repair is rare).
    mapped = mmap.mmap(fileno(), 0, access=mmap.ACCESS_READ) if fileno else None
    with mapped if mapped is not None else contextlib.nullcontext():
        data = mapped if mapped is not None else reader.read(0, reader.size)
        pos = _PACK_HEADER.size
        while pos < end:
            entry = _entry_at(data, pack, pos, end)
            if entry is not None:
                entries.append(entry)
                following = entry.offset + entry.stored_len
                if _entry_at(data, pack, following, end) is not None or following == end:
                    pos = following
                    continue
            found = data.find(_ENTRY_MAGIC, pos + 1, end)
            pos = end if found < 0 else found
    return entries
