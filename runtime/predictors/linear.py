"""The numpy backend: ``y = X @ w + b`` for linear manifests and for ONNX graphs compiled to weights.

The hot path does no finiteness pass over the input. Any NaN or infinity among the inputs makes
the output non-finite (IEEE: ``nan * w`` and ``inf * w`` are never finite, and ``inf - inf`` is
NaN), so only a non-finite output sends a call to the full check, which names the bad value or
imputes it. The one hole — a BLAS kernel that skips a zero weight — is closed by checking the
columns whose weight is exactly zero explicitly (there are none in most models).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from runtime.errors import InputError, ModelError
from runtime.predictors.base import Predictor, spec_for
from runtime.protocol import ModelManifest

__all__ = ["LinearPredictor"]

logger = logging.getLogger(__name__)

_ndarray = np.ndarray
_dot = np.dot
_array = np.array
_isfinite = np.isfinite
_f64 = np.dtype(np.float64)

# The hot path runs without np.errstate (it costs more than the dot product). An infinite input
# or an overflow makes numpy warn from inside it before the full check names the bad value; the
# full check runs right after, so that warning says nothing new.
warnings.filterwarnings(
    "ignore", message=r"(overflow|invalid value) encountered in dot", category=RuntimeWarning, module=__name__
)


class LinearPredictor(Predictor):
    """``X @ w + b`` in the model's dtype (float32 or float64); output float64."""

    def __init__(
        self,
        manifest: ModelManifest,
        weights: Sequence[float] | np.ndarray | None = None,
        intercept: float | None = None,
        *,
        dtype: str | np.dtype[Any] | None = None,
        backend: str = "numpy",
    ) -> None:
        if weights is None:
            weights, intercept = manifest.weights, manifest.intercept
        if weights is None or intercept is None:
            raise ModelError(f"model {manifest.name} v{manifest.version} has no weights")
        self.manifest = manifest
        self.backend = backend
        self.spec = spec_for(manifest, dtype)
        w = np.array(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != self.spec.n_features:
            raise ModelError(f"model has {w.shape[0]} weights for {self.spec.n_features} features")
        if not np.isfinite(w).all() or not math.isfinite(float(intercept)):
            raise ModelError("model weights or intercept are not finite")
        self.weights = w.astype(self.spec.dtype)
        self.weights.flags.writeable = False
        # The intercept is added in float64 (after the dot product), on every path alike.
        self.intercept = float(intercept)
        zero = np.flatnonzero(self.weights == 0)
        self._zero_cols: np.ndarray | None = zero if zero.size else None
        self._d = self.spec.n_features
        self._dtype = self.spec.dtype
        self._f32 = self._dtype != _f64

    def predict(self, X: Any) -> np.ndarray:
        original = X
        if X.__class__ is not _ndarray or X.dtype != self._dtype or X.ndim != 2 or X.shape[1] != self._d:
            X = self.spec.coerce(X)
        try:
            if X.shape[0] == 1 and self._zero_cols is None:
                s = float(_dot(X[0], self.weights)) + self.intercept
                if s - s == 0.0:  # finite (inf - inf and nan - nan are nan)
                    return _array((s,))
                return self._slow(X, original)
            y = _dot(X, self.weights)
            if self._f32:
                y = y.astype(_f64)
            y += self.intercept
            # y·y is NaN or inf when any output is: one BLAS call instead of a finiteness pass.
            # (It also overflows for outputs beyond ~1e154; the full check then finds them finite.)
            ss = float(_dot(y, y))
        except RuntimeWarning:  # numpy's overflow/invalid warning, when warnings are errors
            return self._slow(X, original)
        if ss - ss != 0.0 or (self._zero_cols is not None and not _isfinite(X[:, self._zero_cols]).all()):
            return self._slow(X, original)
        return y

    def _slow(self, X: np.ndarray, original: Any) -> np.ndarray:
        """Some output is not finite: name or impute the bad input, or report an overflow."""
        with np.errstate(all="ignore"):
            fixed = self.spec.fix_nonfinite(X, original)
            y = _dot(fixed, self.weights).astype(_f64)
            y += self.intercept
        if not _isfinite(y).all():
            # finite inputs whose weighted sum overflows: report it rather than send inf upstream
            row = int(np.flatnonzero(~_isfinite(y))[0])
            raise InputError(f"the output overflows {self._dtype} (the inputs are finite but too large)", row=row)
        return y
