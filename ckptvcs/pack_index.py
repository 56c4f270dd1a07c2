"""Pack index objects (``packs/<name>.idx``): where each chunk of one pack sits.

One small object per pack lets a reader index a pack with one GET instead of walking its
entry headers (one ranged GET per entry on object storage, docs/scale.md). Written beside
every pack sealed into a store without local files (after the pack, before anything names
its chunks) and beside every pack a push uploads to a remote (docs/remotes.md, "Layout"):
one format, encoded and decoded here only.

Layout, little-endian: ``"CKPTIDX1" | u32 version (1) | u32 entry count | u64 pack size``
then one 82-byte record per entry ``32-byte chunk id | u64 payload offset | u32 stored_len |
u32 raw_len | u8 codec | u8 flags (bit 0: has base) | 32-byte base id (zeros without)`` and
a 32-byte BLAKE3 of all that precedes it. The checksum catches damage, not forgery: a
reader still verifies every chunk it reads against its id.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import blake3

from . import layout
from .backends import Backend
from .errors import CorruptObjectError
from .pack import PackEntry, PackWriter

__all__ = ["encode_pack_index", "decode_pack_index", "read_pack_index", "write_pack_index", "index_sealed_pack", "MAX_INDEX_SIZE"]

INDEX_VERSION = 1
_IDX_HEADER = struct.Struct("<8sIIQ")
_IDX_MAGIC = b"CKPTIDX1"
_IDX_RECORD = struct.Struct("<32sQIIBB32s")
_NO_BASE = bytes(32)
_MAX_IDX_ENTRIES = 1 << 26
MAX_INDEX_SIZE = _IDX_HEADER.size + 32 + _MAX_IDX_ENTRIES * _IDX_RECORD.size


def encode_pack_index(pack_size: int, entries: Iterable[PackEntry]) -> bytes:
    """The ``packs/<name>.idx`` bytes for a pack of ``pack_size`` bytes holding ``entries``."""
    records = [
        _IDX_RECORD.pack(e.chunk_id, e.offset, e.stored_len, e.raw_len, e.codec, 1 if e.base is not None else 0,
                         e.base if e.base is not None else _NO_BASE)
        for e in entries
    ]
    body = _IDX_HEADER.pack(_IDX_MAGIC, INDEX_VERSION, len(records), pack_size) + b"".join(records)
    return body + blake3.blake3(body).digest()


def decode_pack_index(pack: str, data: bytes, *, what: str = "pack index") -> tuple[int, list[PackEntry]]:
    """``(pack size, entries)`` of a pack index; anything malformed is CorruptObjectError."""
    def bad(why: str) -> CorruptObjectError:
        return CorruptObjectError(f"{what} {pack}.idx {why}", pack=pack, damaged_on_disk=True, problem=why)

    if len(data) < _IDX_HEADER.size + 32:
        raise bad("is truncated")
    body, digest = data[:-32], data[-32:]
    if blake3.blake3(body).digest() != digest:
        raise bad("fails its BLAKE3 check")
    magic, version, count, pack_size = _IDX_HEADER.unpack_from(body)
    if magic != _IDX_MAGIC or version != INDEX_VERSION:
        raise bad("has an unknown magic or version")
    if count > _MAX_IDX_ENTRIES or len(body) != _IDX_HEADER.size + count * _IDX_RECORD.size:
        raise bad("has a wrong length for its entry count")
    entries = []
    for i in range(count):
        chunk_id, offset, stored_len, raw_len, codec, flags, base = _IDX_RECORD.unpack_from(
            body, _IDX_HEADER.size + i * _IDX_RECORD.size)
        if flags & ~1 or offset + stored_len > pack_size:
            raise bad(f"entry {i} is invalid")
        entries.append(PackEntry(chunk_id, pack, offset, stored_len, raw_len, codec, base if flags & 1 else None))
    return pack_size, entries


def read_pack_index(backend: Backend, pack: str) -> list[PackEntry]:
    """The entries ``packs/<pack>.idx`` lists. KeyMissing when there is none (a pack of an
    older store, or one whose writer stopped between pack and index); CorruptObjectError
    when it is damaged; OSError for the store's own failures."""
    return decode_pack_index(pack, backend.get(layout.pack_index_key(pack), max_size=MAX_INDEX_SIZE))[1]


def write_pack_index(backend: Backend, pack: str, pack_size: int, entries: Iterable[PackEntry]) -> None:
    """Write ``packs/<pack>.idx`` for a sealed pack (one PUT; rewriting it writes the same bytes)."""
    backend.put(layout.pack_index_key(pack), encode_pack_index(pack_size, entries))


def index_sealed_pack(writer: PackWriter) -> None:
    """Write the index object of the pack ``writer`` just sealed, in a store without local
    files (a local store's index is the LMDB beside its packs, and its walks are cheap)."""
    if writer.backend.local_root() is None:
        write_pack_index(writer.backend, writer.name, writer.size, writer.entries)
