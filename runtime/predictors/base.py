"""The Predictor interface and the one input check every backend uses.

``Predictor.predict(X)`` takes ``X[n, d]`` and returns ``y[n]`` as float64. Input problems —
wrong width, values that are not numbers, NaN or infinity — raise
:class:`runtime.errors.InputError` naming the row (0-based) and the feature. A model's
``nan_policy`` is either ``reject`` or ``impute`` (NaN replaced by the training mean from
``manifest.feature_stats``; infinity is always an error: it is a broken reading, not a missing one).

The checks are split in two so a backend can keep its hot path cheap: :meth:`InputSpec.coerce`
(shape and type, a few attribute reads for an array that is already right) and
:meth:`InputSpec.fix_nonfinite` (NaN/inf), which a backend may call only when it has reason to
believe a value is not finite (the linear backend: when an output is not finite).
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from runtime.errors import InputError
from runtime.protocol import ModelManifest

__all__ = ["DTYPES", "InputSpec", "Predictor", "spec_for"]

DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
_NUMERIC_KINDS = frozenset("iuf")


class InputSpec:
    """What a model accepts: feature names (for messages), dtype, NaN policy and fill values."""

    __slots__ = ("dtype", "features", "fill", "n_features", "nan_policy")

    def __init__(
        self,
        features: Sequence[str],
        dtype: np.dtype[Any] | str,
        nan_policy: Literal["reject", "impute"] = "reject",
        fill: Sequence[float] | None = None,
    ) -> None:
        self.features = tuple(features)
        self.n_features = len(self.features)
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"model dtype must be a float type, not {self.dtype}")
        self.nan_policy = nan_policy
        if nan_policy == "impute":
            if fill is None or len(fill) != self.n_features:
                raise ValueError("nan_policy 'impute' needs one fill value per feature")
            self.fill: np.ndarray | None = np.asarray(fill, dtype=self.dtype)
        else:
            self.fill = None

    # ------------------------------------------------------------------ shape and type

    def coerce(self, X: Any) -> np.ndarray:
        """``X`` as a 2-D array of the model dtype; InputError for a wrong shape or a non-number.

        An array that already has the right dtype and width is returned as is (not copied)."""
        if X.__class__ is np.ndarray and X.dtype == self.dtype and X.ndim == 2 and X.shape[1] == self.n_features:
            return X
        return self._coerce_slow(X)

    def _width_error(self, got: int, row: int | None = None) -> InputError:
        names = ", ".join(self.features[:8]) + (", …" if self.n_features > 8 else "")
        return InputError(f"expected {self.n_features} features ({names}), got {got}", row=row)

    def _coerce_slow(self, X: Any) -> np.ndarray:
        if isinstance(X, np.ndarray):
            arr = X
        else:
            if isinstance(X, str | bytes) or not isinstance(X, Sequence):
                raise InputError(f"expected a 2-D array [rows, {self.n_features}], got {type(X).__name__}")
            try:
                arr = np.asarray(X)
            except (ValueError, TypeError):  # ragged: name the first row that does not fit
                arr = self._ragged(X)
            if arr.dtype.kind not in _NUMERIC_KINDS and arr.ndim == 2:
                # numpy turned a mix into strings or objects: look at the values as given
                arr = self._ragged(X)
        if arr.ndim != 2:
            raise InputError(f"expected a 2-D array [rows, {self.n_features}], got shape {arr.shape}")
        if arr.shape[1] != self.n_features:
            raise self._width_error(arr.shape[1])
        kind = arr.dtype.kind
        if kind in _NUMERIC_KINDS:
            # A float64 value beyond float32's range becomes inf here; fix_nonfinite names it.
            with np.errstate(over="ignore", invalid="ignore"):
                return np.asarray(arr, dtype=self.dtype)
        if kind == "O":
            return self._from_objects(arr)
        if kind == "b":
            raise InputError(f"values are booleans ({arr.dtype}), not numbers")
        # strings, bytes, complex, datetimes...: name the first cell
        raise InputError(f"{arr.flat[0]!r} is not a number ({arr.dtype})", row=0, column=self.features[0])

    def _ragged(self, X: Sequence[Any]) -> np.ndarray:
        for i, row in enumerate(X):
            if isinstance(row, str | bytes) or not isinstance(row, Sequence | np.ndarray):
                raise InputError(f"row is a {type(row).__name__}, not a sequence of numbers", row=i)
            if len(row) != self.n_features:
                raise self._width_error(len(row), row=i)
        arr = np.empty((len(X), self.n_features), dtype=object)
        for i, row in enumerate(X):
            arr[i, :] = list(row)
        return arr

    def _from_objects(self, arr: np.ndarray) -> np.ndarray:
        out = np.empty(arr.shape, dtype=np.float64)
        for (i, j), v in np.ndenumerate(arr):
            if v is None:
                out[i, j] = np.nan  # missing: the NaN policy decides
            elif isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_):
                out[i, j] = float(v)
            else:
                raise InputError(f"{v!r} is not a number", row=i, column=self.features[j])
        with np.errstate(over="ignore", invalid="ignore"):
            return out.astype(self.dtype, copy=False)

    # ------------------------------------------------------------------ NaN and infinity

    def fix_nonfinite(self, X: np.ndarray, original: Any = None) -> np.ndarray:
        """Return ``X`` with NaN imputed (policy ``impute``) or raise InputError for the first bad value.

        ``X`` must come from :meth:`coerce`. ``original`` (what the caller passed) only improves the
        message for a value that is finite but does not fit the model's float32."""
        bad = ~np.isfinite(X)
        if not bad.any():
            return X
        nan = np.isnan(X)
        if self.fill is not None:
            hard = bad & ~nan
            if not hard.any():
                return np.where(nan, self.fill, X)
            bad = hard
        r, c = (int(i) for i in np.argwhere(bad)[0])
        v = X[r, c]
        if np.isnan(v):
            reason = "value is NaN (missing) and the model's nan_policy is 'reject'"
        else:
            reason = f"value is {'+' if v > 0 else '-'}infinity"
            src = _original_value(original, r, c)
            if src is not None and np.isfinite(src):
                reason = f"value {src!r} does not fit in the model's {self.dtype}"
        raise InputError(reason, row=r, column=self.features[c])

    def check(self, X: Any) -> np.ndarray:
        """:meth:`coerce` then :meth:`fix_nonfinite`: the full check, for backends without a fast path."""
        Xc = self.coerce(X)
        return self.fix_nonfinite(Xc, X)


def _original_value(original: Any, r: int, c: int) -> float | None:
    try:
        v = original[r][c]
        return float(v)
    except (TypeError, ValueError, IndexError, KeyError, OverflowError):
        return None


def spec_for(manifest: ModelManifest, dtype: np.dtype[Any] | str | None = None) -> InputSpec:
    """The InputSpec of a manifest (``dtype`` overrides the manifest's, e.g. an ONNX input type)."""
    fill = manifest.feature_stats.mean if manifest.nan_policy == "impute" and manifest.feature_stats else None
    return InputSpec(manifest.features, dtype or manifest.dtype, manifest.nan_policy, fill)


class Predictor(abc.ABC):
    """A loaded model. ``predict`` is safe to call from one thread at a time per instance."""

    manifest: ModelManifest
    backend: str
    spec: InputSpec

    @property
    def n_features(self) -> int:
        return self.spec.n_features

    @property
    def features(self) -> tuple[str, ...]:
        return self.spec.features

    @property
    def dtype(self) -> np.dtype[Any]:
        """The dtype inputs are computed in."""
        return self.spec.dtype

    @abc.abstractmethod
    def predict(self, X: Any) -> np.ndarray:
        """``X[n, d]`` → ``y[n]`` (float64). Raises InputError for unusable input, ModelError on failure."""

    def __repr__(self) -> str:
        m = self.manifest
        return f"<{type(self).__name__} {m.name} v{m.version} [{self.backend}] d={self.n_features}>"
