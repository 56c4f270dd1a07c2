"""Pack files: append-only, self-describing containers of stored chunks.

A pack is written under ``tmp/``, sealed (footer, fsync, rename into ``packs/``,
fsync of the directory) and never modified afterwards. Each entry carries its own
header (chunk id, codec, lengths), so the LMDB index can always be rebuilt from the
packs alone, and the footer lets a reader tell a complete pack from a torn one.
Layout (all integers little-endian) is specified in docs/format.md.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import blake3

from . import _fs, scratch
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


class PackWriter:
    """Accumulates chunks in a temp file; ``seal()`` makes it a durable pack."""

    def __init__(self, tmp_dir: Path, packs_dir: Path) -> None:
        self.name = uuid.uuid4().hex
        self._packs_dir = packs_dir
        self._tmp_path = tmp_dir / _fs.temp_name(f"pack-{self.name}-")
        self._fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._writeback = _fs.EarlyWriteback(self._fd)
        self._headers = blake3.blake3()
        self.entries: list[PackEntry] = []
        self.size = 0
        self._write(_PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0))

    def _write(self, data: bytes | memoryview) -> None:
        _fs.write_all(self._fd, data)
        self.size += len(data)
        self._writeback.wrote(self.size)

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
        """Write the footer, fsync, and move the pack into ``packs/`` durably."""
        end = self.size
        self._write(_FOOTER.pack(len(self.entries), end, self._headers.digest(), _FOOTER_MAGIC))
        self._writeback.finish()
        _fs.fsync_file(self._fd)
        os.close(self._fd)
        self._fd = -1
        final = self._packs_dir / f"{self.name}.pack"
        _fs.durable_rename(self._tmp_path, final)
        return final

    def abort(self) -> None:
        """Drop an unsealed pack (the commit that wrote it failed)."""
        with contextlib.suppress(Exception):
            self._writeback.finish()  # the pack is dropped: its flush errors no longer matter
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp_path)


class PackFiles:
    """Reads chunk payloads from sealed packs, keeping file descriptors open."""

    def __init__(self, packs_dir: Path) -> None:
        self._dir = packs_dir
        self._fds: dict[str, int] = {}

    def path(self, pack: str) -> Path:
        return self._dir / f"{pack}.pack"

    def _fd(self, pack: str) -> int:
        fd = self._fds.get(pack)
        if fd is None:
            try:
                fd = _fs.open_regular(self.path(pack))
            except FileNotFoundError:
                raise CorruptObjectError(f"pack {pack} is missing") from None
            # Another thread may have opened it meanwhile; keep one, close the other.
            existing = self._fds.setdefault(pack, fd)
            if existing != fd:
                os.close(fd)
                fd = existing
        return fd

    def read_payload(self, entry: PackEntry) -> memoryview:
        """Read one payload, checking the entry header in front of it names the chunk."""
        prefix = _prefix_size(entry.base)
        want = prefix + entry.stored_len
        data = _fs.pread(self._fd(entry.pack), want, entry.offset - prefix)
        if len(data) != want:
            raise CorruptObjectError(f"pack {entry.pack} is truncated at offset {entry.offset}")
        self._check_header(entry, data)
        return memoryview(data)[prefix:]

    def read_payload_reusing(self, entry: PackEntry) -> memoryview:
        """:meth:`read_payload` into this thread's scratch buffer (valid until its next call)."""
        prefix = _prefix_size(entry.base)
        want = prefix + entry.stored_len
        buf = memoryview(scratch.buffer("pack-read", want))
        got = _fs.preadv(self._fd(entry.pack), [buf], entry.offset - prefix)
        if got != want:
            raise CorruptObjectError(f"pack {entry.pack} is truncated at offset {entry.offset}")
        self._check_header(entry, buf)
        return buf[prefix:]

    def read_raw_into(self, entry: PackEntry, out: memoryview) -> None:
        """Read a raw-codec payload directly into ``out`` (one syscall, no copy)."""
        if entry.base is not None:
            raise CorruptObjectError(f"pack {entry.pack} entry at offset {entry.offset}: a raw chunk has no base")
        header = bytearray(ENTRY_HEADER_SIZE)
        got = _fs.preadv(self._fd(entry.pack), [header, out], entry.offset - ENTRY_HEADER_SIZE)
        if got != ENTRY_HEADER_SIZE + len(out) or len(out) != entry.stored_len:
            raise CorruptObjectError(f"pack {entry.pack} is truncated at offset {entry.offset}")
        self._check_header(entry, header)

    @staticmethod
    def _check_header(entry: PackEntry, data: bytes | bytearray | memoryview) -> None:
        magic, codec, flags, raw_len, stored_len, chunk_id = _ENTRY_HEADER.unpack_from(data)
        base = None
        if flags & FLAG_HAS_BASE:
            base = bytes(data[ENTRY_HEADER_SIZE : ENTRY_HEADER_SIZE + _BASE_ID_SIZE])
        if (magic, codec, raw_len, stored_len, chunk_id, base) != (
            _ENTRY_MAGIC, entry.codec, entry.raw_len, entry.stored_len, entry.chunk_id, entry.base
        ):
            raise CorruptObjectError(
                f"pack {entry.pack} entry at offset {entry.offset} does not match the index"
            )

    def forget(self, pack: str) -> None:
        """Close the descriptor of a pack that gc is about to delete."""
        fd = self._fds.pop(pack, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def iter_pack_entries(path: Path, *, strict: bool = True) -> Iterator[PackEntry]:
    """Walk a pack's entry headers (for index rebuild and fsck), validating its frame.

    Raises CorruptObjectError on a bad header, a torn entry or a missing footer. With
    ``strict=False`` (salvage, for ``repair index``) a damaged pack yields the entries
    before the first invalid header instead, ignoring the footer: every chunk read is
    verified against its id anyway, so a salvaged entry can never return wrong bytes.
    """
    pack = path.stem
    try:
        fd = _fs.open_regular(path)  # never a FIFO, a device or a link
    except CorruptObjectError:
        if not strict:
            return  # nothing in it can be salvaged
        raise
    size = os.fstat(fd).st_size
    with open(fd, "rb") as f:
        head = f.read(_PACK_HEADER.size)
        if len(head) != _PACK_HEADER.size or _PACK_HEADER.unpack(head)[:2] != (PACK_MAGIC, PACK_VERSION):
            if not strict:
                return
            raise CorruptObjectError(f"pack {pack} has no valid header")
        end = size
        count = digest = None
        if size >= _PACK_HEADER.size + _FOOTER.size:
            f.seek(size - _FOOTER.size)
            count, footer_end, digest, magic = _FOOTER.unpack(f.read(_FOOTER.size))
            if magic == _FOOTER_MAGIC and footer_end == size - _FOOTER.size:
                end = footer_end
            else:
                count = digest = None
        if count is None and strict:
            raise CorruptObjectError(f"pack {pack} has no valid footer (torn write?)")
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
                if not strict:
                    break
                raise CorruptObjectError(f"pack {pack} entry header at {pos} is invalid or torn")
            headers.update(raw)
            entries.append(PackEntry(chunk_id, pack, pos + _prefix_size(base), stored_len, raw_len, codec, base))
            pos += _prefix_size(base) + stored_len
        if strict and (len(entries) != count or headers.digest() != digest):
            raise CorruptObjectError(f"pack {pack} entry headers do not match its footer")
    yield from entries
