"""Helpers for the model tests: key pairs, signed bundles, scikit-learn models exported with skl2onnx."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifacts import generate_keypair, load_private_key, sign_manifest, write_bundle
from runtime.protocol import ArtifactRef, FeatureStats, ModelManifest

FEATURES8 = tuple(f"x{i}" for i in range(8))


def keypair(tmp_path: Path, name: str = "fleet") -> tuple[Path, Path]:
    return generate_keypair(tmp_path / f"keys-{name}", name=name)


def linear_bundle(
    out: Path,
    key: Path,
    weights: Any,
    intercept: float,
    *,
    features: tuple[str, ...] | None = None,
    dtype: str = "float64",
    nan_policy: str = "reject",
    stats: FeatureStats | None = None,
    version: int = 1,
) -> Path:
    feats = features or tuple(f"x{i}" for i in range(len(weights)))
    m = ModelManifest.model_validate(
        {
            "name": "lin",
            "version": version,
            "kind": "linear",
            "features": feats,
            "dtype": dtype,
            "weights": tuple(float(w) for w in weights),
            "intercept": float(intercept),
            "nan_policy": nan_policy,
            "feature_stats": stats,
        }
    )
    write_bundle(out, sign_manifest(m, load_private_key(key)), None)
    return out


def onnx_bundle(
    out: Path,
    key: Path,
    data: bytes,
    features: tuple[str, ...],
    *,
    dtype: str = "float32",
    nan_policy: str = "reject",
    stats: FeatureStats | None = None,
    name: str = "onnxmodel",
) -> Path:
    m = ModelManifest.model_validate(
        {
            "name": name,
            "version": 1,
            "kind": "onnx",
            "features": features,
            "dtype": dtype,
            "nan_policy": nan_policy,
            "feature_stats": stats,
            "artifact": ArtifactRef(size=len(data), sha256=hashlib.sha256(data).hexdigest()),
        }
    )
    write_bundle(out, sign_manifest(m, load_private_key(key)), data)
    return out


def regression_data(n: int = 300, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features on different scales and offsets, a linear target with noise."""
    rng = np.random.default_rng(seed)
    scale = np.geomspace(0.1, 50.0, d)
    X = rng.normal(size=(n, d)) * scale + np.linspace(-20, 20, d)
    w = rng.normal(size=d) / scale
    y = X @ w + 3.0 + rng.normal(scale=0.05, size=n)
    return X, y


def fit_quietly(model: Any, X: np.ndarray, y: np.ndarray) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's convergence notes are not ours to fix
        return model.fit(X, y)


def export(model: Any, X: np.ndarray, dtype: Any) -> bytes:
    from skl2onnx import to_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bytes(to_onnx(model, X[:1].astype(dtype)).SerializeToString())


def ort_run(data: bytes, X: np.ndarray) -> np.ndarray:
    """Plain onnxruntime, no edgeloop code: the reference for compiled graphs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dt = np.float32 if inp.type == "tensor(float)" else np.float64
    out = sess.run(None, {inp.name: X.astype(dt)})[0]
    return np.asarray(out, dtype=np.float64).reshape(-1)


def assert_close(a: np.ndarray, b: np.ndarray, rtol: float) -> None:
    """Relative to the outputs' scale, so values near zero do not make the check meaningless."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(float(np.max(np.abs(b))), 1e-12)
    err = float(np.max(np.abs(a - b))) / scale if a.size else 0.0
    assert err <= rtol, f"max relative difference {err:.3g} > {rtol:g}"
