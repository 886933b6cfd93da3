"""Signed model bundles: canonical manifest bytes, sha256, ed25519 keys, sign, verify, read, write.

A bundle is a folder holding ``manifest.json`` and, for ONNX models, the artifact named in the
manifest (``model.onnx``). The signature covers the canonical bytes of the manifest without its
``signature`` field; those bytes include the artifact's sha256 and size, so one signature
protects both.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.ed25519 import PublicKey
from runtime.errors import ArtifactError, ConfigError, ProtocolError, SignatureError
from runtime.protocol import ModelManifest, decode

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# Signing (cloud, CLI) uses the ``cryptography`` package, imported where it is needed; verifying
# (devices) uses runtime.ed25519, which keeps that package's 9 MB out of the daemon.

__all__ = [
    "MANIFEST",
    "Bundle",
    "atomic_write",
    "canonical_bytes",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "read_bundle",
    "sha256_file",
    "sign_manifest",
    "verify_bundle",
    "verify_manifest",
    "write_bundle",
]

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1024 * 1024
_CHUNK = 1 << 20


def canonical_bytes(manifest: ModelManifest) -> bytes:
    """Sorted-key, compact JSON of the manifest without its signature: what is signed."""
    data = manifest.model_dump(mode="json", by_alias=True, exclude={"signature"})
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


# --------------------------------------------------------------------------- keys


def key_id(key: PublicKey | Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The key id manifests carry: of a public key, or of a private key's public half."""
    return (key if isinstance(key, PublicKey) else _public_of(key)).key_id


def _public_of(key: Ed25519PublicKey | Ed25519PrivateKey) -> PublicKey:
    """A ``cryptography`` key (public, or the public half of a private one) as a :class:`PublicKey`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return PublicKey(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write temp, fsync, rename, fsync the folder: a crash leaves the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def generate_keypair(out_dir: Path, name: str = "fleet", overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``{name}.key`` (PEM, mode 0600) and ``{name}.pub`` (PEM) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if not overwrite and (key_path.exists() or pub_path.exists()):
        raise ConfigError(f"{key_path} or {pub_path} already exists (refusing to overwrite a signing key)", "out")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write(key_path, pem, mode=0o600)
    atomic_write(pub_path, _public_of(key).to_pem(), mode=0o644)
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read signing key: {exc.strerror}", str(path)) from exc
    if mode & 0o077:
        raise ConfigError(f"signing key is readable by others (mode {mode:o}); chmod 600 it", str(path))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("not a PEM ed25519 private key", str(path)) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("not an ed25519 private key", str(path))
    return key


def load_public_key(path: Path | bytes) -> PublicKey:
    """The fleet's public key from a PEM file (or PEM bytes)."""
    where = "public key" if isinstance(path, bytes) else str(path)
    try:
        data = path if isinstance(path, bytes) else Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read public key: {exc.strerror}", where) from exc
    try:
        return PublicKey.from_pem(data)
    except ValueError as exc:
        raise ConfigError(str(exc), where) from None


# --------------------------------------------------------------------------- sign / verify


def sign_manifest(manifest: ModelManifest, key: Ed25519PrivateKey) -> ModelManifest:
    unsigned = manifest.model_copy(update={"key_id": key_id(key), "signature": None})
    # model_copy skips validation; round-trip so the signed object is exactly what a reader sees.
    unsigned = ModelManifest.model_validate(unsigned.model_dump(by_alias=True))
    sig = key.sign(canonical_bytes(unsigned))
    return unsigned.model_copy(update={"signature": base64.b64encode(sig).decode()})


def verify_manifest(manifest: ModelManifest, public_key: PublicKey) -> None:
    """Raise SignatureError unless the manifest carries a valid signature by ``public_key``."""
    if not manifest.signature:
        raise SignatureError(f"model {manifest.name} v{manifest.version} is not signed")
    try:
        sig = base64.b64decode(manifest.signature, validate=True)
    except ValueError:
        raise SignatureError("signature is not valid base64") from None
    if not public_key.verify(sig, canonical_bytes(manifest)):
        raise SignatureError(
            f"signature of model {manifest.name} v{manifest.version} does not verify with the fleet key"
        )


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: ModelManifest

    @property
    def artifact_path(self) -> Path | None:
        if self.manifest.artifact is None:
            return None
        return self.path / self.manifest.artifact.filename


def read_bundle(path: Path) -> Bundle:
    """Read and validate ``manifest.json`` (no signature check: see :func:`verify_bundle`)."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"manifest larger than {MAX_MANIFEST_BYTES} bytes", str(mpath))
        raw = mpath.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read manifest: {exc.strerror}", str(mpath)) from exc
    try:
        manifest = decode(ModelManifest, raw)
    except ProtocolError as exc:
        raise ArtifactError(f"invalid manifest: {exc}", str(mpath)) from exc
    return Bundle(path, manifest)


def verify_bundle(path: Path, public_key: PublicKey, max_artifact_bytes: int | None = None) -> Bundle:
    """Read a bundle, verify the signature, then the artifact's size and sha256. Raise on failure."""
    bundle = read_bundle(path)
    verify_manifest(bundle.manifest, public_key)
    art = bundle.manifest.artifact
    if art is not None:
        apath = bundle.path / art.filename
        if apath.is_symlink():
            raise SignatureError("artifact is a symlink", str(apath))
        try:
            size = apath.stat().st_size
        except OSError as exc:
            raise ArtifactError(f"artifact missing: {exc.strerror}", str(apath)) from exc
        if max_artifact_bytes is not None and size > max_artifact_bytes:
            raise ArtifactError(f"artifact of {size} bytes exceeds the cap of {max_artifact_bytes}", str(apath))
        if size != art.size:
            raise SignatureError(f"artifact is {size} bytes, manifest says {art.size}", str(apath))
        digest, _ = sha256_file(apath)
        if digest != art.sha256:
            raise SignatureError(
                f"artifact sha256 {digest[:12]}… does not match the manifest's {art.sha256[:12]}…", str(apath)
            )
    return bundle


def write_bundle(out_dir: Path, manifest: ModelManifest, artifact: bytes | None = None) -> Bundle:
    """Write a (signed) manifest and its artifact bytes into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if manifest.artifact is not None:
        if artifact is None:
            raise ArtifactError("manifest names an artifact but no bytes were given", str(out_dir))
        atomic_write(out_dir / manifest.artifact.filename, artifact)
    text = manifest.model_dump_json(by_alias=True, indent=2).encode()
    atomic_write(out_dir / MANIFEST, text)
    return Bundle(out_dir, manifest)
