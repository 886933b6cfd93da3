"""Inference speed and memory: compiled numpy Predictor vs onnxruntime, scikit-learn and raw numpy.

One 8-feature linear model (scikit-learn LinearRegression exported with skl2onnx, in float32 and
float64), all in this process, BLAS and onnxruntime on one thread. Measured, interleaved so load
from other processes hits every contender alike:

- single-row latency: µs per call, median over repeats;
- 4096-row batch throughput: rows/s, from the median time per call.

Then a fresh process loads a linear bundle with ``load_bundle``, predicts, and reports its
resident memory and whether onnxruntime got imported (it must not be). Prints a table and, as
its last line, one JSON object with the figures and the ratios against their targets.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

D = 8
BATCH = 4096
TARGETS = {
    "single_row_predict_over_raw": ("<=", 2.0),
    "single_row_ort_over_predict": (">=", 2.0),
    "batch_float32_predict_over_ort": (">=", 1.5),
    "batch_float64_predict_over_ort": (">=", 4.0),
}


def bench(contenders: dict[str, Callable[[], Any]], repeats: int, block_s: float = 0.004) -> dict[str, float]:
    """Median seconds per call for each contender, measured in interleaved rounds.

    Each contender runs in blocks of about ``block_s`` (calibrated during warm-up), so a slow one
    (scikit-learn) does not stretch the run and a fast one is not dominated by the loop."""
    calls: dict[str, int] = {}
    for name, f in contenders.items():
        n = 20
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        per = (time.perf_counter() - t0) / n
        calls[name] = max(5, int(block_s / max(per, 1e-9)))
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, f in contenders.items():
            n = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            samples[name].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in samples.items()}


def build_models(tmp: Path) -> dict[str, Any]:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LinearRegression

    from runtime.artifacts import generate_keypair, load_private_key, sha256_file, sign_manifest, write_bundle
    from runtime.protocol import ArtifactRef, ModelManifest

    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, D))
    y = X @ rng.normal(size=D) + 1.5 + rng.normal(scale=0.01, size=2000)
    est = LinearRegression().fit(X, y)
    key_path, pub_path = generate_keypair(tmp / "keys")
    key = load_private_key(key_path)
    out: dict[str, Any] = {"sklearn": est, "X": X, "pub": pub_path, "bundles": {}}
    features = tuple(f"x{i}" for i in range(D))
    for dt in ("float32", "float64"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = to_onnx(est, X[:1].astype(dt)).SerializeToString()
        path = tmp / f"onnx-{dt}"
        path.mkdir()
        (path / "model.onnx").write_bytes(data)
        digest, size = sha256_file(path / "model.onnx")
        m = ModelManifest.model_validate(
            {
                "name": "bench",
                "version": 1,
                "kind": "onnx",
                "features": features,
                "dtype": dt,
                "artifact": ArtifactRef(size=size, sha256=digest),
            }
        )
        write_bundle(path, sign_manifest(m, key), data)
        out["bundles"][dt] = (path, data)
    lin = ModelManifest.model_validate(
        {
            "name": "bench",
            "version": 2,
            "kind": "linear",
            "features": features,
            "weights": tuple(float(w) for w in est.coef_),
            "intercept": float(est.intercept_),
        }
    )
    write_bundle(tmp / "linear", sign_manifest(lin, key))
    out["linear"] = tmp / "linear"
    return out


_CHILD = """
import sys, numpy as np
sys.path.insert(0, {root!r})
mode = {mode!r}
if mode == "numpy only":
    x = np.zeros((1, 8)) @ np.ones(8)
elif mode == "runtime imports (no model)":
    import runtime.artifacts, runtime.protocol
elif mode == "onnxruntime session":
    import onnxruntime as ort
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
    s = ort.InferenceSession(open({onnx!r}, "rb").read(), sess_options=opts, providers=["CPUExecutionProvider"])
    s.run(None, {{s.get_inputs()[0].name: np.zeros((4, 8), dtype=np.float32)}})
else:
    from runtime.predictors import load_bundle
    p = load_bundle({bundle!r} if mode == "load_bundle (linear manifest)" else {onnx_bundle!r}, {pub!r})
    p.predict(np.zeros((4, 8)))
    print("backend", p.backend)
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
print("rss_kb", rss)
print("onnxruntime_imported", "onnxruntime" in sys.modules)
"""


def child_memory(mode: str, models: dict[str, Any]) -> dict[str, Any]:
    path32, _ = models["bundles"]["float32"]
    code = _CHILD.format(
        root=str(ROOT),
        mode=mode,
        bundle=str(models["linear"]),
        onnx_bundle=str(path32),
        onnx=str(path32 / "model.onnx"),
        pub=str(models["pub"]),
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    info: dict[str, Any] = {}
    for line in res.stdout.splitlines():
        k, _, v = line.partition(" ")
        info[k] = int(v) if k == "rss_kb" else (v == "True" if k == "onnxruntime_imported" else v)
    return info


def main() -> None:
    import onnxruntime as ort
    from threadpoolctl import threadpool_info, threadpool_limits

    from runtime.predictors import load_bundle

    with tempfile.TemporaryDirectory() as tmpdir:
        models = build_models(Path(tmpdir))
        est = models["sklearn"]
        rng = np.random.default_rng(1)
        results: dict[str, Any] = {"single_us": {}, "batch_rows_per_s": {}, "backend": {}}
        with threadpool_limits(limits=1):
            blas = [
                {k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for i in threadpool_info()
            ]
            for dt in ("float32", "float64"):
                path, data = models["bundles"][dt]
                p = load_bundle(path, models["pub"])
                results["backend"][dt] = p.backend
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.inter_op_num_threads = 1
                sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
                in_name = sess.get_inputs()[0].name
                w = np.asarray(p.weights, dtype=dt)
                b = np.asarray(p.intercept, dtype=dt)
                x1 = rng.normal(size=(1, D)).astype(dt)
                xb = rng.normal(size=(BATCH, D)).astype(dt)
                # the contenders agree before they race
                ref = est.predict(xb.astype(np.float64))
                for got in (p.predict(xb), sess.run(None, {in_name: xb})[0].reshape(-1), xb @ w + b):
                    err = np.max(np.abs(np.asarray(got, dtype=np.float64) - ref)) / np.max(np.abs(ref))
                    assert err < (1e-5 if dt == "float32" else 1e-12), err
                single = bench(
                    {
                        "raw x @ w + b": lambda x1=x1, w=w, b=b: x1 @ w + b,
                        "Predictor.predict": lambda x1=x1, p=p: p.predict(x1),
                        "onnxruntime run": lambda x1=x1, s=sess, n=in_name: s.run(None, {n: x1}),
                        "sklearn predict": lambda x1=x1: est.predict(x1),
                    },
                    repeats=61,
                )
                batch = bench(
                    {
                        "raw x @ w + b": lambda xb=xb, w=w, b=b: xb @ w + b,
                        "Predictor.predict": lambda xb=xb, p=p: p.predict(xb),
                        "onnxruntime run": lambda xb=xb, s=sess, n=in_name: s.run(None, {n: xb}),
                        "sklearn predict": lambda xb=xb: est.predict(xb),
                    },
                    repeats=61,
                )
                results["single_us"][dt] = {k: v * 1e6 for k, v in single.items()}
                results["batch_rows_per_s"][dt] = {k: BATCH / v for k, v in batch.items()}
        memory = {
            mode: child_memory(mode, models)
            for mode in (
                "numpy only",
                "runtime imports (no model)",
                "load_bundle (linear manifest)",
                "load_bundle (compiled onnx)",
                "onnxruntime session",
            )
        }

    s, bt = results["single_us"], results["batch_rows_per_s"]
    ratios = {
        "single_row_predict_over_raw": max(
            s[dt]["Predictor.predict"] / s[dt]["raw x @ w + b"] for dt in ("float32", "float64")
        ),
        "single_row_ort_over_predict": min(
            s[dt]["onnxruntime run"] / s[dt]["Predictor.predict"] for dt in ("float32", "float64")
        ),
        "batch_float32_predict_over_ort": bt["float32"]["Predictor.predict"] / bt["float32"]["onnxruntime run"],
        "batch_float64_predict_over_ort": bt["float64"]["Predictor.predict"] / bt["float64"]["onnxruntime run"],
    }
    met = {k: (ratios[k] <= t if op == "<=" else ratios[k] >= t) for k, (op, t) in TARGETS.items()}

    print(
        f"edgeloop inference benchmark: {D} features, python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"onnxruntime {ort.__version__}, BLAS and onnxruntime limited to 1 thread"
    )
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')!r} BLAS: {blas}")
    for dt in ("float32", "float64"):
        print(f"\n{dt}: backend {results['backend'][dt]}")
        print(f"  {'contender':<20} {'single row µs/call':>19} {'4096-row batch rows/s':>22}")
        for name in s[dt]:
            print(f"  {name:<20} {s[dt][name]:>19.2f} {bt[dt][name]:>22,.0f}")
    print("\nratios (target)")
    for k, v in ratios.items():
        op, t = TARGETS[k]
        print(f"  {k:<32} {v:7.2f}  ({op} {t})  {'ok' if met[k] else 'MISSED'}")
    print("\nmemory of a fresh process (VmRSS)")
    for mode, info in memory.items():
        extra = f", backend {info['backend']}" if "backend" in info else ""
        print(
            f"  {mode:<32} {info['rss_kb'] / 1024:7.1f} MiB  onnxruntime imported: {info['onnxruntime_imported']}{extra}"
        )
    summary = {
        "features": D,
        "batch_rows": BATCH,
        "single_us": results["single_us"],
        "batch_rows_per_s": results["batch_rows_per_s"],
        "backend": results["backend"],
        "ratios": ratios,
        "targets": {k: f"{op} {t}" for k, (op, t) in TARGETS.items()},
        "targets_met": met,
        "memory_kb": {k: v["rss_kb"] for k, v in memory.items()},
        "onnxruntime_imported": {k: v["onnxruntime_imported"] for k, v in memory.items()},
    }
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
