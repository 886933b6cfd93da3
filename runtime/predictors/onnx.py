"""The onnxruntime backend, for ONNX graphs that are not linear (trees, MLPs, ...).

onnxruntime is imported here only, when such a model is loaded, so a device that runs linear
models never pays for it. Its errors are translated into ours at this boundary.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from runtime.errors import ArtifactError, ModelError
from runtime.predictors.base import Predictor, spec_for
from runtime.protocol import ModelManifest

__all__ = ["INSTALL_HINT", "OnnxRuntimePredictor", "import_onnxruntime"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edgeloop[onnx]'"
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64"}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError(f"this model needs onnxruntime, which is not installed ({INSTALL_HINT})") from exc
    return onnxruntime


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class OnnxRuntimePredictor(Predictor):
    """An ``onnxruntime.InferenceSession`` on the CPU, ``intra_op_num_threads`` threads (default 1)."""

    def __init__(self, manifest: ModelManifest, model: bytes, *, threads: int = 1, path: str | None = None) -> None:
        if threads < 1:
            raise ModelError(f"onnx threads must be >= 1, not {threads}")
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only: its warnings go to stderr, not our log
        try:
            self._session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types all derive from Exception
            raise ArtifactError(f"onnxruntime cannot load the model: {_first_line(exc)}", path) from exc
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1:
            raise ArtifactError(f"the model has {len(inputs)} inputs; edgeloop feeds one [n, d] float tensor", path)
        dtype = _ORT_DTYPES.get(inputs[0].type)
        if dtype is None:
            raise ArtifactError(f"input {inputs[0].name!r} is {inputs[0].type}; it must be float or double", path)
        shape = inputs[0].shape
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] != len(manifest.features):
            raise ArtifactError(
                f"input is {shape[1]} wide but the manifest names {len(manifest.features)} features", path
            )
        self.manifest = manifest
        self.backend = "onnxruntime"
        self.threads = threads
        self.spec = spec_for(manifest, dtype)
        self._input = inputs[0].name
        self._outputs = [outputs[0].name]

    def predict(self, X: Any) -> np.ndarray:
        Xc = self.spec.check(X)
        n = Xc.shape[0]
        if n == 0:
            return np.empty(0, dtype=np.float64)
        try:
            out = self._session.run(self._outputs, {self._input: np.ascontiguousarray(Xc)})[0]
        except Exception as exc:
            raise ModelError(f"onnxruntime failed: {_first_line(exc)}") from exc
        if not isinstance(out, np.ndarray):
            raise ModelError(f"the model returned a {type(out).__name__}, not a tensor (is it a classifier?)")
        if out.size != n:
            raise ModelError(f"the model returned {out.size} values (shape {out.shape}) for {n} rows")
        return out.reshape(n).astype(np.float64)
