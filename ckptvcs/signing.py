"""Ed25519 signatures on tag objects (docs/audit.md, docs/format.md "Signed tags").

A signed tag is an ordinary tag object with one more field, ``signature``:
``{"alg": "ed25519", "key": <BLAKE3 hex of the raw 32-byte public key>, "sig": <128 hex>}``.
The signature covers ``b"ckptvcs-tag-v1 " + <id of the same tag object without the
signature field>``. That id is the BLAKE3 of the tag's canonical bytes, which name the
commit id; the commit id hashes the commit object, which names the manifest id; the
manifest id hashes the manifest, which lists every chunk id; a chunk id is the BLAKE3 of
the chunk's bytes. So one signature pins every byte of the tagged checkpoint.

Keys are PEM files: the private key PKCS#8 (what ``ckptvcs keygen`` and
``openssl genpkey -algorithm ed25519`` write), the public key SubjectPublicKeyInfo
(``openssl pkey -pubout``). ``cryptography`` is imported only here, only when a tag is
signed or verified (the optional extra ``ckptvcs[sign]``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from . import _fs
from .errors import BadSignatureError, InvalidInputError, UnsignedTagError, UntrustedKeyError, UsageError
from .objects import canonical_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["ALGORITHM", "generate_key", "load_private_key", "load_public_key", "key_id", "sign_tag", "verify_tag_body",
           "signed_payload", "check_signature_field"]

ALGORITHM = "ed25519"
SIGNATURE_FIELD = "signature"
_DOMAIN = b"ckptvcs-tag-v1 "
_MAX_KEY_FILE = 16 << 10
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UsageError("signed tags need the 'cryptography' package: pip install 'ckptvcs[sign]'") from None
    return serialization, ed25519


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key's id: BLAKE3 (hex) of its raw 32 bytes; ``keys/<id>.pub`` holds it."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return blake3.blake3(raw).hexdigest()


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    serialization, _ = _crypto()
    pem: bytes = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


def generate_key(path: str | os.PathLike[str]) -> tuple[Path, Path, str]:
    """Write a new Ed25519 private key to ``path`` (PEM, mode 0600, never over an existing file)
    and its public key to ``path.pub``; returns ``(private path, public path, key id)``."""
    serialization, ed25519 = _crypto()
    private = Path(path)
    public = private.with_name(private.name + ".pub")
    for target in (private, public):
        if os.path.lexists(target):
            raise InvalidInputError(f"{target} already exists; choose another path (keys are never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with _fs.storage_errors(f"writing the key {private}"):
        _fs.make_dirs(private.parent)
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            _fs.write_all(fd, pem)
            _fs.fsync_file(fd)
        finally:
            os.close(fd)
        _fs.atomic_write(public, public_pem(key.public_key()), exclusive=True)
        _fs.fsync_dir(private.parent)
    return private, public, key_id(key.public_key())


def _read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return _fs.read_record(path, _MAX_KEY_FILE)
    except (OSError, InvalidInputError) as err:
        raise InvalidInputError(f"cannot read the {what} {path}: {err}") from None
    except Exception as err:  # CorruptObjectError: too large, not a regular file
        raise InvalidInputError(f"cannot read the {what} {path}: {err}") from None


def load_private_key(source: Any) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file path, PEM bytes, or the key object itself."""
    serialization, ed25519 = _crypto()
    if isinstance(source, ed25519.Ed25519PrivateKey):
        return source
    data = source if isinstance(source, bytes) else _read_key_file(source, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise InvalidInputError(f"{_name(source)} is not an unencrypted PEM private key: {str(err)[:120]}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InvalidInputError(f"{_name(source)} is not an Ed25519 key (ckptvcs signs with Ed25519 only)")
    return key


def load_public_key(source: Any) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file path, PEM bytes, a key object, or a private key."""
    serialization, ed25519 = _crypto()
    if isinstance(source, ed25519.Ed25519PublicKey):
        return source
    if isinstance(source, ed25519.Ed25519PrivateKey):
        return source.public_key()
    data = source if isinstance(source, bytes) else _read_key_file(source, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise InvalidInputError(f"{_name(source)} is not a PEM public key: {str(err)[:120]}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InvalidInputError(f"{_name(source)} is not an Ed25519 public key")
    return key


def _name(source: Any) -> str:
    return "the key given" if isinstance(source, bytes) else str(source)


def signed_payload(unsigned_body: dict[str, Any]) -> bytes:
    """What the signature covers: the domain tag and the id of the tag object without its signature."""
    body = {k: v for k, v in unsigned_body.items() if k != SIGNATURE_FIELD}
    return _DOMAIN + blake3.blake3(b"tag\n" + canonical_json(body)).hexdigest().encode()


def sign_tag(unsigned_body: dict[str, Any], private_key: Any) -> dict[str, str]:
    """The ``signature`` field for a tag object body."""
    key = load_private_key(private_key)
    signature = key.sign(signed_payload(unsigned_body))
    return {"alg": ALGORITHM, "key": key_id(key.public_key()), "sig": signature.hex()}


def check_signature_field(value: Any) -> bool:
    """Whether a ``signature`` field has the documented shape (readers refuse others)."""
    return (isinstance(value, dict) and set(value) == {"alg", "key", "sig"} and value["alg"] == ALGORITHM
            and isinstance(value["key"], str) and _HEX64.fullmatch(value["key"]) is not None
            and isinstance(value["sig"], str) and _HEX128.fullmatch(value["sig"]) is not None)


def verify_tag_body(name: str, body: dict[str, Any], trusted: dict[str, Ed25519PublicKey]) -> str:
    """Check a tag object's signature against ``trusted`` (key id → public key); returns the key id.

    UnsignedTagError: no signature; UntrustedKeyError: signed by a key not in ``trusted``;
    BadSignatureError: the signature does not verify (the tag object changed after signing).
    """
    from cryptography.exceptions import InvalidSignature

    signature = body.get(SIGNATURE_FIELD)
    if signature is None:
        raise UnsignedTagError(f"tag {name!r} is not signed", name)
    if not check_signature_field(signature):
        raise BadSignatureError(f"tag {name!r} has a malformed signature field", name)
    key = trusted.get(signature["key"])
    if key is None:
        raise UntrustedKeyError(
            f"tag {name!r} is signed by key {signature['key'][:16]}, which is not a trusted key "
            "(add its public key with `ckptvcs trust`, or pass --trusted-key)", name)
    try:
        key.verify(bytes.fromhex(signature["sig"]), signed_payload(body))
    except InvalidSignature:
        raise BadSignatureError(
            f"tag {name!r}: the signature by key {signature['key'][:16]} does not match the tag object "
            "(it was altered or forged after signing)", name) from None
    return str(signature["key"])
