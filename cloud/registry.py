"""The model registry: versions with lineage, signed by the cloud's key, artifacts on the filesystem.

Bundles live at ``{artifacts_dir}/{name}/v{version}/`` (``manifest.json`` + ``model.onnx``) and are
served read-only over HTTP (:mod:`cloud.artifact_server`) for devices to download; the manifest
carries the artifact's URL, size and sha256, so the HTTP server need not be trusted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.errors import RegistryError
from runtime.artifacts import Bundle, read_bundle, sha256_file, sign_manifest, write_bundle
from runtime.protocol import ArtifactRef, FeatureStats, ModelManifest, TrainingInfo

__all__ = ["Registry"]

logger = logging.getLogger(__name__)


class Registry:
    def __init__(self, store: Any, artifacts_dir: Path, signing_key: Ed25519PrivateKey, base_url: str) -> None:
        self.store = store
        self.root = Path(artifacts_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = signing_key
        self.base_url = base_url.rstrip("/")

    def _next_version(self, name: str) -> int:
        return int(self.store.next_model_version(name))

    def bundle_dir(self, name: str, version: int) -> Path:
        return self.root / name / f"v{version}"

    def _register(self, manifest: ModelManifest, artifact: bytes | None, status: str) -> ModelManifest:
        signed = sign_manifest(manifest, self.key)
        write_bundle(self.bundle_dir(signed.name, signed.version), signed, artifact)
        self.store.add_model_version(
            signed.model_dump_json(by_alias=True), status=status, source=signed.training.source
        )
        logger.info("registered %s v%d (%s)", signed.name, signed.version, signed.model_kind)
        return signed

    def register_linear(
        self,
        name: str,
        features: Sequence[str],
        weights: Sequence[float],
        intercept: float,
        *,
        metrics: dict[str, float] | None = None,
        training: TrainingInfo | None = None,
        feature_stats: FeatureStats | None = None,
        target: str = "y",
        version: int | None = None,
        status: str = "registered",
    ) -> ModelManifest:
        m = ModelManifest(
            name=name,
            version=version or self._next_version(name),
            model_kind="linear",
            features=tuple(features),
            target=target,
            created_at=time.time(),
            training=training or TrainingInfo(),
            metrics=metrics or {},
            feature_stats=feature_stats,
            weights=tuple(float(w) for w in weights),
            intercept=float(intercept),
        )
        return self._register(m, None, status)

    def import_onnx(
        self,
        path: Path,
        name: str,
        features: Sequence[str],
        *,
        target: str = "y",
        metrics: dict[str, float] | None = None,
        feature_stats: FeatureStats | None = None,
    ) -> ModelManifest:
        """Version and sign an ONNX model exported from scikit-learn, PyTorch or TensorFlow."""
        from runtime.predictors.compile import inspect_onnx

        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RegistryError(f"cannot read {path}: {exc.strerror}") from exc
        info = inspect_onnx(data, len(features))
        version = self._next_version(name)
        digest, size = sha256_file(path)
        m = ModelManifest(
            name=name,
            version=version,
            model_kind="onnx",
            features=tuple(features),
            dtype=info.dtype,
            target=target,
            created_at=time.time(),
            training=TrainingInfo(source="import"),
            metrics=metrics or {},
            feature_stats=feature_stats,
            artifact=ArtifactRef(
                filename="model.onnx",
                url=f"{self.base_url}/artifacts/{name}/v{version}/model.onnx",
                size=size,
                sha256=digest,
            ),
        )
        return self._register(m, data, "registered")

    def get(self, name: str, version: int | None = None) -> ModelManifest:
        rec = self.store.get_model_version(name, version)
        if rec is None:
            what = f"{name} v{version}" if version else name
            raise RegistryError(f"no model {what} in the registry")
        return ModelManifest.model_validate_json(rec.manifest_json)

    def bundle(self, name: str, version: int) -> Bundle:
        return read_bundle(self.bundle_dir(name, version))

    def list(self, name: str | None = None) -> list[Any]:
        return list(self.store.list_model_versions(name))

    def export(self, name: str, version: int | None, out_dir: Path) -> Path:
        m = self.get(name, version)
        src = self.bundle_dir(m.name, m.version)
        art = (src / m.artifact.filename).read_bytes() if m.artifact else None
        write_bundle(Path(out_dir), m, art)
        return Path(out_dir)
