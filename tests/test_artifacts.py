"""Signed bundles: keys, canonical bytes, sign and verify, bundle read/write and its refusals."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.artifacts import (
    MANIFEST,
    atomic_write,
    canonical_bytes,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    read_bundle,
    sha256_file,
    sign_manifest,
    verify_bundle,
    verify_manifest,
    write_bundle,
)
from runtime.errors import ArtifactError, ConfigError, SignatureError
from runtime.protocol import ArtifactRef, ModelManifest, decode, encode


def linear(weights: tuple[float, ...] = (0.1, -2.0, 3e-12), intercept: float = 1.0, **kw: object) -> ModelManifest:
    feats = tuple(f"f{i}" for i in range(len(weights)))
    return ModelManifest.model_validate(
        {
            "name": "m",
            "version": 1,
            "kind": "linear",
            "features": feats,
            "weights": weights,
            "intercept": intercept,
            **kw,
        }
    )


def onnx_manifest(data: bytes) -> ModelManifest:
    import hashlib

    return ModelManifest.model_validate(
        {
            "name": "o",
            "version": 2,
            "kind": "onnx",
            "features": ("a", "b"),
            "artifact": ArtifactRef(size=len(data), sha256=hashlib.sha256(data).hexdigest()),
        }
    )


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


# --------------------------------------------------------------------------- keys


def test_keypair_files_and_modes(keys):
    key, pub = keys
    assert key.name == "fleet.key" and pub.name == "fleet.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert key_id(load_private_key(key).public_key()) == key_id(load_public_key(pub))
    assert len(key_id(load_public_key(pub))) == 16


def test_keypair_is_not_overwritten_unless_asked(keys):
    key, _ = keys
    before = key.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keypair(key.parent)
    assert key.read_bytes() == before
    generate_keypair(key.parent, overwrite=True)
    assert key.read_bytes() != before
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_private_key_readable_by_others_is_refused(keys):
    key, _ = keys
    os.chmod(key, 0o640)
    with pytest.raises(ConfigError, match="readable by others"):
        load_private_key(key)


def test_key_files_that_are_not_ed25519(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key")
    os.chmod(bad, 0o600)
    with pytest.raises(ConfigError, match="not a PEM"):
        load_private_key(bad)
    with pytest.raises(ConfigError, match="not a PEM"):
        load_public_key(bad)
    ecc = ec.generate_private_key(ec.SECP256R1())
    pem = ecc.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    bad.write_bytes(pem)
    with pytest.raises(ConfigError, match="not an ed25519 private key"):
        load_private_key(bad)
    pub = ecc.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ConfigError, match="not an ed25519 public key"):
        load_public_key(pub)
    with pytest.raises(ConfigError, match="cannot read"):
        load_private_key(tmp_path / "missing.key")


# --------------------------------------------------------------------------- sign / verify


def test_sign_and_verify(keys):
    key, pub = keys
    signed = sign_manifest(linear(), load_private_key(key))
    assert signed.key_id == key_id(load_public_key(pub))
    assert len(base64.b64decode(signed.signature or "")) == 64
    verify_manifest(signed, load_public_key(pub))


def test_wrong_key_is_refused(keys, tmp_path):
    key, _ = keys
    _, other_pub = generate_keypair(tmp_path / "other")
    signed = sign_manifest(linear(), load_private_key(key))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(signed, load_public_key(other_pub))


def test_unsigned_and_garbled_signatures_are_refused(keys):
    key, pub = keys
    public = load_public_key(pub)
    with pytest.raises(SignatureError, match="not signed"):
        verify_manifest(linear(), public)
    signed = sign_manifest(linear(), load_private_key(key))
    with pytest.raises(SignatureError, match="base64"):
        verify_manifest(signed.model_copy(update={"signature": "***"}), public)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(signed.model_copy(update={"signature": base64.b64encode(b"\0" * 64).decode()}), public)


@pytest.mark.parametrize(
    "change",
    [
        {"weights": (0.1, -2.0, 3.0000001e-12)},
        {"intercept": 1.0000000001},
        {"version": 2},
        {"nan_policy": "reject", "target": "z"},
    ],
)
def test_any_changed_field_breaks_the_signature(keys, change):
    key, pub = keys
    signed = sign_manifest(linear(), load_private_key(key))
    with pytest.raises(SignatureError):
        verify_manifest(signed.model_copy(update=change), load_public_key(pub))


# --------------------------------------------------------------------------- canonical bytes


def test_canonical_bytes_exclude_the_signature_and_sort_keys(keys):
    key, _ = keys
    m = linear()
    signed = sign_manifest(m, load_private_key(key))
    cb = canonical_bytes(signed)
    data = json.loads(cb)
    assert "signature" not in data and data["key_id"] == signed.key_id
    assert list(data) == sorted(data)
    assert b" " not in cb.replace(b'" "', b"")  # compact separators
    # key order in the JSON a device receives does not matter
    wire = json.loads(encode(signed))
    shuffled = json.dumps(dict(reversed(list(wire.items()))))
    assert canonical_bytes(decode(ModelManifest, shuffled)) == cb


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=12),
    intercept=st.floats(allow_nan=False, allow_infinity=False),
    created=st.floats(min_value=0, max_value=4e9),
)
def test_canonical_bytes_stable_across_json_round_trip(weights, intercept, created):
    m = linear(tuple(weights), intercept, created_at=created, metrics={"mae": 0.1, "r2": -3.5e-7})
    cb = canonical_bytes(m)
    once = decode(ModelManifest, encode(m))
    twice = decode(ModelManifest, json.dumps(json.loads(encode(once)), indent=3))
    assert canonical_bytes(once) == cb
    assert canonical_bytes(twice) == cb


def test_canonical_bytes_survive_a_bundle_on_disk(keys, tmp_path):
    key, pub = keys
    signed = sign_manifest(linear(), load_private_key(key))
    write_bundle(tmp_path / "b", signed)
    back = read_bundle(tmp_path / "b").manifest
    assert canonical_bytes(back) == canonical_bytes(signed)
    verify_manifest(back, load_public_key(pub))


# --------------------------------------------------------------------------- bundles


def test_onnx_bundle_verifies_and_hash_mismatches_are_refused(keys, tmp_path):
    key, pub = keys
    public = load_public_key(pub)
    data = bytes(range(256)) * 4
    write_bundle(tmp_path / "b", sign_manifest(onnx_manifest(data), load_private_key(key)), data)
    b = verify_bundle(tmp_path / "b", public)
    assert b.artifact_path == tmp_path / "b" / "model.onnx"
    assert sha256_file(tmp_path / "b" / "model.onnx") == (b.manifest.artifact.sha256, len(data))  # type: ignore[union-attr]

    art = tmp_path / "b" / "model.onnx"
    tampered = bytearray(data)
    tampered[100] ^= 0xFF
    art.write_bytes(bytes(tampered))
    with pytest.raises(SignatureError, match="sha256"):
        verify_bundle(tmp_path / "b", public)
    art.write_bytes(data + b"x")
    with pytest.raises(SignatureError, match="bytes, manifest says"):
        verify_bundle(tmp_path / "b", public)
    art.write_bytes(data)
    with pytest.raises(ArtifactError, match="exceeds the cap"):
        verify_bundle(tmp_path / "b", public, max_artifact_bytes=100)
    art.unlink()
    with pytest.raises(ArtifactError, match="artifact missing"):
        verify_bundle(tmp_path / "b", public)
    (tmp_path / "elsewhere.onnx").write_bytes(data)
    art.symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(SignatureError, match="symlink"):
        verify_bundle(tmp_path / "b", public)


def test_manifest_edit_on_disk_is_refused(keys, tmp_path):
    key, pub = keys
    write_bundle(tmp_path / "b", sign_manifest(linear(), load_private_key(key)))
    path = tmp_path / "b" / MANIFEST
    data = json.loads(path.read_text())
    data["weights"][0] = 0.2
    path.write_text(json.dumps(data))
    with pytest.raises(SignatureError):
        verify_bundle(tmp_path / "b", load_public_key(pub))
    data["signature"] = None
    path.write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="not signed"):
        verify_bundle(tmp_path / "b", load_public_key(pub))


def test_unreadable_or_invalid_manifests(tmp_path):
    with pytest.raises(ArtifactError, match="cannot read manifest"):
        read_bundle(tmp_path / "nothing")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid manifest"):
        read_bundle(tmp_path / "b")
    (tmp_path / "b" / MANIFEST).write_text(json.dumps({"name": "m", "version": 1, "kind": "linear", "features": ["a"]}))
    with pytest.raises(ArtifactError, match="weights and intercept"):
        read_bundle(tmp_path / "b")
    (tmp_path / "b" / MANIFEST).write_bytes(b" " * (1024 * 1024 + 1))
    with pytest.raises(ArtifactError, match="larger than"):
        read_bundle(tmp_path / "b")


def test_write_bundle_needs_the_artifact_bytes(keys, tmp_path):
    key, _ = keys
    signed = sign_manifest(onnx_manifest(b"abc"), load_private_key(key))
    with pytest.raises(ArtifactError, match="no bytes"):
        write_bundle(tmp_path / "b", signed, None)


def test_atomic_write_sets_mode_and_leaves_no_temp_files(tmp_path):
    atomic_write(tmp_path / "f", b"one", mode=0o600)
    atomic_write(tmp_path / "f", b"two", mode=0o640)
    assert (tmp_path / "f").read_bytes() == b"two"
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
