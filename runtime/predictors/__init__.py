"""Inference: load a verified bundle into a :class:`Predictor` on the best backend.

Linear manifests run on numpy; ONNX graphs that compute a linear function are compiled to numpy
weights; every other ONNX graph runs on onnxruntime (imported only then).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

from runtime.artifacts import Bundle, load_public_key, verify_bundle
from runtime.ed25519 import PublicKey
from runtime.errors import ArtifactError, ModelError, SignatureError
from runtime.predictors.base import InputSpec, Predictor
from runtime.predictors.linear import LinearPredictor

__all__ = ["Backend", "InputSpec", "LinearPredictor", "Predictor", "load_bundle", "load_predictor"]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "numpy", "onnxruntime"]


def _read_artifact(bundle: Bundle) -> bytes:
    """The artifact's bytes, hashed again: they are what runs, whatever changed on disk since."""
    apath = bundle.artifact_path
    art = bundle.manifest.artifact
    if apath is None or art is None:
        raise ArtifactError("onnx manifest names no artifact", str(bundle.path))
    try:
        data = apath.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact: {exc.strerror}", str(apath)) from exc
    if len(data) != art.size or hashlib.sha256(data).hexdigest() != art.sha256:
        raise SignatureError("artifact changed since it was verified (size or sha256 differ)", str(apath))
    return data


def load_predictor(bundle: Bundle, *, onnx_threads: int = 1, backend: Backend = "auto") -> Predictor:
    """A predictor for an already verified bundle.

    ``backend``: ``auto`` (numpy when the model is linear, else onnxruntime), or force ``numpy``
    (ModelError when the graph is not linear) or ``onnxruntime``."""
    m = bundle.manifest
    if m.model_kind == "linear":
        if backend == "onnxruntime":
            raise ModelError(f"model {m.name} v{m.version} is a linear manifest: it has no ONNX graph")
        return LinearPredictor(m)

    from runtime.predictors.compile import inspect_onnx

    data = _read_artifact(bundle)
    where = str(bundle.artifact_path)
    try:
        info = inspect_onnx(data, len(m.features))
    except ArtifactError as exc:
        raise ArtifactError(exc.reason, where) from exc
    if info.dtype != m.dtype:
        logger.warning(
            "%s v%s: manifest dtype %s, graph input %s: using the graph's", m.name, m.version, m.dtype, info.dtype
        )
    if info.compiled is not None and backend != "onnxruntime":
        c = info.compiled
        logger.info("%s v%s compiled to numpy from %s", m.name, m.version, c.source)
        return LinearPredictor(m, c.weights, c.intercept, dtype=c.dtype, backend=f"numpy (compiled from {c.source})")
    if backend == "numpy":
        raise ModelError(f"model {m.name} v{m.version} is not linear ({info.not_linear}); it needs onnxruntime")
    from runtime.predictors.onnx import OnnxRuntimePredictor

    return OnnxRuntimePredictor(m, data, threads=onnx_threads, path=where)


def load_bundle(
    path: str | Path,
    public_key: PublicKey | str | Path | bytes,
    *,
    onnx_threads: int = 1,
    backend: Backend = "auto",
    max_artifact_bytes: int | None = None,
) -> Predictor:
    """Verify a bundle folder (signature, then the artifact's size and sha256) and load it.

    ``public_key`` is a key object, a PEM file path, or PEM bytes."""
    key = (
        public_key
        if isinstance(public_key, PublicKey)
        else load_public_key(public_key if isinstance(public_key, bytes) else Path(public_key))
    )
    bundle = verify_bundle(Path(path), key, max_artifact_bytes=max_artifact_bytes)
    return load_predictor(bundle, onnx_threads=onnx_threads, backend=backend)
