"""Signed release tags: sign, verify, and each way verification must fail; protected refs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ckptvcs import (
    BadSignatureError,
    IntegrityError,
    ProtectedCommitError,
    ProtectedRefError,
    Repo,
    TagSignatureError,
    UnsignedTagError,
    UntrustedKeyError,
)
from ckptvcs.objects import canonical_json
from ckptvcs.signing import generate_key
from helpers import flip_payload_byte


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Two key pairs: the release key and someone else's."""
    release, release_pub, _ = generate_key(tmp_path / "keys" / "release.pem")
    other, other_pub, _ = generate_key(tmp_path / "keys" / "other.pem")
    return {"release": release, "release.pub": release_pub, "other": other, "other.pub": other_pub}


def _commit(repo: Repo, seed: int = 0) -> str:
    w = np.random.default_rng(seed).standard_normal(20_000).astype(np.float32)
    return repo.commit({"w": w}, f"state {seed}")


def test_generated_key_is_private(keys: dict[str, Path]) -> None:
    assert keys["release"].stat().st_mode & 0o077 == 0
    assert b"BEGIN PRIVATE KEY" in keys["release"].read_bytes()
    assert b"BEGIN PUBLIC KEY" in keys["release.pub"].read_bytes()


def test_sign_then_verify(repo: Repo, keys: dict[str, Path]) -> None:
    commit_id = _commit(repo)
    repo.tag("v1.0", message="release", key=keys["release"])
    tag = repo.tags()["v1.0"]
    assert tag.signature is not None and tag.object == commit_id
    result = repo.verify_tag("v1.0", trusted_keys=[keys["release.pub"]])
    assert result["commit"] == commit_id and result["key"] == tag.signature["key"]
    assert result["bytes"] == 20_000 * 4 and result["chunks"] >= 1
    kid = repo.trust_key(keys["release.pub"])  # the repository's own trusted keys
    assert repo.trusted_keys() == [kid] and repo.verify_tag("v1.0")["key"] == kid
    events = [e.event for e in repo.audit_events()]
    assert events.count("tag.create") == 1 and "key.trust" in events and events.count("tag.verify") == 2


def test_unsigned_tag_still_works_and_is_refused_by_verify(repo: Repo, keys: dict[str, Path]) -> None:
    commit_id = _commit(repo)
    repo.tag("plain", message="no signature")
    assert repo.resolve("plain") == commit_id and repo.tags()["plain"].signature is None
    with pytest.raises(UnsignedTagError, match="not signed") as err:
        repo.verify_tag("plain", trusted_keys=[keys["release.pub"]])
    assert err.value.exit_code == 18 and err.value.tag == "plain"


def test_other_key_is_untrusted(repo: Repo, keys: dict[str, Path]) -> None:
    _commit(repo)
    repo.tag("v1.0", key=keys["other"])
    with pytest.raises(UntrustedKeyError, match="not a trusted key"):
        repo.verify_tag("v1.0", trusted_keys=[keys["release.pub"]])
    with pytest.raises(UntrustedKeyError):
        repo.verify_tag("v1.0")  # keys/ is empty: nothing is trusted
    failed = [e for e in repo.audit_events() if e.event == "tag.verify"]
    assert failed and all(e.data["ok"] is False for e in failed)


def _forge(repo: Repo, name: str, **changes: object) -> None:
    """Write a new tag object with ``changes`` but the old signature, and point the tag at it."""
    _, body = repo.objects.get(repo.refs.read_raw(f"refs/tags/{name}"), "tag")
    body.update(changes)
    forged = repo.objects.put("tag", body)
    (repo.root / "refs" / "tags" / name).write_text(forged + "\n")


def test_tampered_tag_object_is_a_bad_signature(repo: Repo, keys: dict[str, Path]) -> None:
    _commit(repo, 0)
    other_commit = _commit(repo, 1)
    repo.tag("v1.0", "HEAD~1", key=keys["release"])
    _forge(repo, "v1.0", object=other_commit)  # re-point the signed release at another checkpoint
    with pytest.raises(BadSignatureError, match="does not match the tag object"):
        repo.verify_tag("v1.0", trusted_keys=[keys["release.pub"]])


def test_signed_tag_copied_under_another_name_is_refused(repo: Repo, keys: dict[str, Path]) -> None:
    _commit(repo)
    repo.tag("v1.0", key=keys["release"])
    (repo.root / "refs" / "tags" / "v2.0").write_text(repo.refs.read_raw("refs/tags/v1.0") + "\n")
    with pytest.raises(BadSignatureError, match="another name"):
        repo.verify_tag("v2.0", trusted_keys=[keys["release.pub"]])


def test_edited_tag_file_fails_its_hash(repo: Repo, keys: dict[str, Path]) -> None:
    _commit(repo)
    repo.tag("v1.0", key=keys["release"])
    path = repo.objects.path(repo.refs.read_raw("refs/tags/v1.0"))
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(IntegrityError) as err:
        repo.verify_tag("v1.0", trusted_keys=[keys["release.pub"]])
    assert not isinstance(err.value, TagSignatureError)


def test_flipped_byte_in_the_tagged_data_is_named(repo: Repo, keys: dict[str, Path]) -> None:
    commit_id = _commit(repo)
    repo.tag("v1.0", key=keys["release"])
    chunk = repo.manifest(commit_id).blobs[0]["chunks"][0]
    flip_payload_byte(repo, repo.chunks.index.get(bytes.fromhex(chunk)))
    with pytest.raises(IntegrityError) as err:
        repo.verify_tag("v1.0", trusted_keys=[keys["release.pub"]])
    assert err.value.chunk_id == chunk and chunk in str(err.value) and "v1.0" in str(err.value)


def test_old_readers_see_a_signed_tag_as_a_plain_tag(repo: Repo, keys: dict[str, Path]) -> None:
    """The signature is one extra field; the other fields (all an older reader parses) are unchanged."""
    _commit(repo)
    repo.tag("v1.0", message="m", key=keys["release"])
    _, body = repo.objects.get(repo.refs.read_raw("refs/tags/v1.0"), "tag")
    assert set(body) == {"object", "name", "message", "tagger", "time", "signature"}
    assert set(body["signature"]) == {"alg", "key", "sig"} and body["signature"]["alg"] == "ed25519"
    json.loads(canonical_json(body))


# -- protected refs ---------------------------------------------------------------------------


def test_protected_tag_cannot_be_deleted_or_moved_without_override(repo: Repo) -> None:
    first = _commit(repo, 0)
    second = _commit(repo, 1)
    assert repo.protect("refs/tags/release-*") == ["refs/tags/release-*"]
    repo.tag("release-1", first)  # creating is allowed
    with pytest.raises(ProtectedRefError, match="release-") as err:
        repo.delete_tag("release-1")
    assert err.value.ref == "refs/tags/release-1" and err.value.pattern == "refs/tags/release-*"
    with pytest.raises(ProtectedRefError):
        repo.tag("release-1", second, force=True)
    assert repo.resolve("release-1") == first
    repo.tag("release-1", second, force=True, override_protection=True)
    assert repo.resolve("release-1") == second
    assert "overridden" in repo.reflog("refs/tags/release-1")[0].message
    repo.delete_tag("release-1", override_protection=True)
    overrides = [e for e in repo.audit_events() if e.event == "protection.override"]
    assert [e.data["action"] for e in overrides] == ["force-move", "delete"]
    repo.tag("scratch", first)
    repo.delete_tag("scratch")  # unprotected tags are unaffected


def test_protected_branch_cannot_be_forced_or_deleted(repo: Repo) -> None:
    first = _commit(repo, 0)
    repo.branch("prod", first)
    _commit(repo, 1)
    repo.protect("refs/heads/prod")
    with pytest.raises(ProtectedRefError):
        repo.branch("prod", "HEAD", force=True)
    with pytest.raises(ProtectedRefError):
        repo.delete_branch("prod", force=True)
    repo.unprotect("refs/heads/prod")
    repo.delete_branch("prod", force=True)
    assert [e.event for e in repo.audit_events()][-3:] == ["protect", "unprotect", "branch.delete"]


def test_protection_is_seen_by_another_handle(repo: Repo) -> None:
    _commit(repo)
    repo.tag("release-1")
    with Repo.open(repo.root) as other:
        other.protect("refs/tags/release-*")
    with pytest.raises(ProtectedRefError):
        repo.delete_tag("release-1")


def test_gc_keeps_and_prune_refuses_protected_data(repo: Repo) -> None:
    released = _commit(repo, 0)
    repo.protect("refs/tags/release-*")
    repo.tag("release-1")
    _commit(repo, 1)
    with pytest.raises(ProtectedCommitError):
        repo.prune(released, "keep_last=1")
    repo.gc(prune_unreachable_after="now")
    assert repo.load("release-1")["w"].shape == (20_000,)


def test_cli_sign_verify_protect(repo: Repo, keys: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    _commit(repo)
    cli = [sys.executable, "-m", "ckptvcs", "--repo", str(repo.root)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, check=False)

    made = run("keygen", str(tmp_path / "cli.pem"), "--trust")
    assert made.returncode == 0 and "Key id" in made.stdout, made.stderr
    assert run("tag", "-s", "v1.0", "-m", "release", "--key", str(tmp_path / "cli.pem")).returncode == 0
    good = run("tag", "-v", "v1.0")
    assert good.returncode == 0 and "Good signature" in good.stdout, good.stderr
    wrong = run("verify-tag", "v1.0", "--trusted-key", str(keys["other.pub"]))
    assert wrong.returncode == 18 and wrong.stderr.startswith("error: tag 'v1.0' is signed by key")
    assert run("protect", "refs/tags/v*").returncode == 0
    refused = run("tag", "-d", "v1.0")
    assert refused.returncode == 16 and "protected" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert run("tag", "-d", "v1.0", "--override-protection").returncode == 0
    assert "protection.override" in run("audit").stdout
