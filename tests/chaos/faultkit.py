"""Fault-injection kit shared by the chaos, fuzz and security tests.

Import it as ``from chaos.faultkit import ...`` (``tests/`` is on ``sys.path``; ``tests/chaos`` is a
namespace package). It holds:

- ONNX models built with ``onnx.helper`` (a linear one, compiled to numpy by the runtime, and a
  ReLU one, which runs on onnxruntime) and signed manifests for them;
- :class:`FaultServer`: an HTTP server in a thread on a free loopback port that serves artifacts
  and misbehaves on purpose (cut halfway, hang, redirect loop, oversized body, slow drip);
- helpers to write a device config file, read what the cloud stored, and start daemon processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifacts import load_private_key, sign_manifest
from runtime.config import dump_toml
from runtime.protocol import ArtifactRef, ModelManifest

__all__ = [
    "FIGURES",
    "REPO",
    "FaultServer",
    "daemon_process",
    "linear_onnx",
    "onnx_manifest",
    "relu_onnx",
    "report",
    "stored_seqs",
    "write_device_config",
]

REPO = Path(__file__).resolve().parents[2]
#: Figures the chaos and fuzz tests print; ``tests/chaos/conftest.py`` repeats them in the terminal
#: summary so a CI log shows them without ``-s``.
FIGURES: list[str] = []


def report(line: str) -> None:
    """Print a figure line and keep it for the end-of-run summary."""
    print(f"\n{line}")
    FIGURES.append(line)


# --------------------------------------------------------------------------- ONNX models


def linear_onnx(weights: Sequence[float], intercept: float, *, dtype: str = "float32") -> bytes:
    """``Y = X @ W + b`` as MatMul + Add, input ``[None, d]``: the runtime compiles it to numpy."""
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.DOUBLE
    d = len(weights)
    W = numpy_helper.from_array(np.asarray(weights, dtype=dtype).reshape(d, 1), "W")
    B = numpy_helper.from_array(np.asarray([intercept], dtype=dtype), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])],
        "linear",
        [helper.make_tensor_value_info("X", elem, [None, d])],
        [helper.make_tensor_value_info("Y", elem, [None, 1])],
        initializer=[W, B],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def relu_onnx(weights: Sequence[float], intercept: float) -> bytes:
    """``Y = relu(X @ W) + b``: not linear, so it runs on onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper

    d = len(weights)
    W = numpy_helper.from_array(np.asarray(weights, dtype=np.float32).reshape(d, 1), "W")
    B = numpy_helper.from_array(np.asarray([intercept], dtype=np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Relu", ["XW"], ["R"]),
            helper.make_node("Add", ["R", "B"], ["Y"]),
        ],
        "relu",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, d])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])],
        initializer=[W, B],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def onnx_manifest(
    key_path: Path | None,
    version: int,
    data: bytes,
    *,
    url: str | None = None,
    name: str = "m",
    features: Sequence[str] = ("a", "b"),
    size: int | None = None,
    sha256: str | None = None,
    filename: str = "model.onnx",
    dtype: str = "float32",
) -> ModelManifest:
    """A manifest for ``data`` (size and sha256 may be overridden to lie), signed unless key is None."""
    m = ModelManifest.model_validate(
        {
            "name": name,
            "version": version,
            "kind": "onnx",
            "features": tuple(features),
            "dtype": dtype,
            "artifact": ArtifactRef(
                filename=filename,
                url=url,
                size=len(data) if size is None else size,
                sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
            ),
        }
    )
    return m if key_path is None else sign_manifest(m, load_private_key(key_path))


# --------------------------------------------------------------------------- a misbehaving HTTP server


class FaultServer:
    """Serves ``/good/NAME`` from :attr:`files` and misbehaves on the other paths:

    - ``/cut/NAME``: announces the full length, sends half, closes the connection;
    - ``/hang/NAME``: accepts, reads the request, never answers (until :meth:`stop`);
    - ``/drip/NAME``: sends headers, then one byte every ``drip_interval`` seconds;
    - ``/loop/N``: redirects to ``/loop/N+1`` forever;
    - ``/big/NAME``: sends the file followed by ``extra`` more bytes with an honest Content-Length;
    - ``/nolength/NAME``: sends ``nolength_bytes`` bytes with no Content-Length at all;
    - ``/to-file``: redirects to a ``file://`` URL.

    ``hits`` counts requests per first path segment.
    """

    def __init__(self, *, extra: int = 1 << 20, nolength_bytes: int = 4 << 20, drip_interval: float = 0.3) -> None:
        self.files: dict[str, bytes] = {}
        self.extra = extra
        self.nolength_bytes = nolength_bytes
        self.drip_interval = drip_interval
        self.hits: dict[str, int] = {}
        self.released = threading.Event()
        kit = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self, name: str) -> bytes | None:
                data = kit.files.get(name)
                if data is None:
                    self.send_error(404)
                return data

            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/", 1)
                kind, name = parts[0], (parts[1] if len(parts) > 1 else "")
                kit.hits[kind] = kit.hits.get(kind, 0) + 1
                try:
                    getattr(self, f"_{kind.replace('-', '_')}", self._missing)(name)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the device gave up on us: that is the point

            def _missing(self, name: str) -> None:
                self.send_error(404)

            def _headers(self, length: int | None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()

            def _good(self, name: str) -> None:
                data = self._body(name)
                if data is not None:
                    self._headers(len(data))
                    self.wfile.write(data)

            def _cut(self, name: str) -> None:
                data = self._body(name)
                if data is not None:
                    self._headers(len(data))
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True

            def _hang(self, name: str) -> None:
                kit.released.wait(60)
                self.close_connection = True

            def _drip(self, name: str) -> None:
                data = self._body(name)
                if data is None:
                    return
                self._headers(len(data))
                for i in range(len(data)):
                    if kit.released.wait(kit.drip_interval):
                        break
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                self.close_connection = True

            def _loop(self, name: str) -> None:
                n = int(name) if name.isdigit() else 0
                self.send_response(302)
                self.send_header("Location", f"/loop/{n + 1}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _to_file(self, name: str) -> None:
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _big(self, name: str) -> None:
                data = self._body(name)
                if data is not None:
                    self._headers(len(data) + kit.extra)
                    self.wfile.write(data + b"\0" * kit.extra)

            def _nolength(self, name: str) -> None:
                self._headers(None)
                self.close_connection = True
                chunk = b"\0" * 65536
                sent = 0
                while sent < kit.nolength_bytes:
                    self.wfile.write(chunk)
                    sent += len(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fault-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, kind: str, name: str = "model.onnx") -> str:
        return f"http://127.0.0.1:{self.port}/{kind}/{name}"

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- devices and the cloud


def write_device_config(path: Path, settings_obj: Any, **top: Any) -> Path:
    """Write a DeviceSettings object as a TOML file the daemon process reads (``top`` overrides)."""
    data = json.loads(settings_obj.model_dump_json())
    data.update(top)
    data = {k: v for k, v in data.items() if v is not None}
    for sect in list(data):
        if isinstance(data[sect], dict):
            data[sect] = {k: v for k, v in data[sect].items() if v is not None}
    path.write_text(dump_toml(data))
    return path


def daemon_running(state_dir: Path, p: subprocess.Popen[bytes]) -> bool:
    """True once the daemon process ``p`` has started (its signal handlers are in place): its
    status file names its pid."""
    try:
        return bool(json.loads((state_dir / "status.json").read_bytes()).get("pid") == p.pid)
    except (OSError, ValueError):
        return False


def daemon_process(config: Path, input_path: Path | None = None, *, log: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m runtime.daemon --config CONFIG [--input FILE]``, stderr to ``log`` (or discarded)."""
    cmd = [sys.executable, "-m", "runtime.daemon", "--config", str(config)]
    if input_path is not None:
        cmd += ["--input", str(input_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    err = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    finally:
        if log is not None:
            err.close()  # type: ignore[union-attr]


def stored_seqs(store: Any, device: str) -> list[int]:
    """Every result sequence number the cloud store holds for ``device``, in order (repeats kept)."""
    seqs: list[int] = []
    since = -1
    while True:
        rows = store.fetch_results(device, since_seq=since, limit=100000)
        if not rows:
            return seqs
        seqs.extend(r.seq for r in rows)
        since = rows[-1].seq


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.02) -> None:
    """Blocking wait (for threads and plain tests): poll ``predicate`` until true or fail."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)
