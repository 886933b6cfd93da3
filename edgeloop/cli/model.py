"""``edgeloop model``: build a signed bundle, inspect and verify one, predict on a table with one."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import typer

from edgeloop.cli.common import print_json

if TYPE_CHECKING:
    from runtime.artifacts import Bundle
    from runtime.protocol import FeatureStats, ModelManifest

app = typer.Typer(help="Build, inspect and run signed model bundles.", no_args_is_help=True)

# Compiled weights must agree with onnxruntime's outputs to this (relative to the output scale)
# before a bundle is built; the acceptance bound is 1e-5.
_AGREE_RTOL = 1e-5


def _features(text: str) -> tuple[str, ...]:
    names = tuple(f.strip() for f in text.split(","))
    if not names or any(not f for f in names):
        raise typer.BadParameter("give feature names separated by commas, e.g. a,b,c", param_hint="--features")
    dup = sorted({f for f in names if names.count(f) > 1})
    if dup:
        raise typer.BadParameter(f"feature names repeat: {dup}", param_hint="--features")
    return names


def _read_json(path: Path, hint: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint=hint) from None
    except ValueError as exc:
        raise typer.BadParameter(f"{path} is not valid JSON: {exc}", param_hint=hint) from None


def _number(v: Any, what: str, hint: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise typer.BadParameter(f"{what} must be a finite number, not {json.dumps(v)[:40]}", param_hint=hint)
    return float(v)


def _coefficients(path: Path, n_features: int) -> tuple[tuple[float, ...], float]:
    data = _read_json(path, "--coef")
    if not isinstance(data, dict) or "weights" not in data or "intercept" not in data:
        raise typer.BadParameter('expected {"weights": [...], "intercept": b}', param_hint="--coef")
    extra = sorted(set(data) - {"weights", "intercept"})
    if extra:
        raise typer.BadParameter(f"unknown keys {extra}", param_hint="--coef")
    ws = data["weights"]
    if not isinstance(ws, list):
        raise typer.BadParameter("weights must be a list of numbers", param_hint="--coef")
    if len(ws) != n_features:
        raise typer.BadParameter(f"{len(ws)} weights for {n_features} features", param_hint="--coef")
    weights = tuple(_number(w, f"weights[{i}]", "--coef") for i, w in enumerate(ws))
    return weights, _number(data["intercept"], "intercept", "--coef")


def _feature_stats(path: Path) -> FeatureStats:
    from pydantic import ValidationError

    from runtime.protocol import FeatureStats

    data = _read_json(path, "--feature-stats")
    try:
        return FeatureStats.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise typer.BadParameter(
            f'{where}: {err.get("msg")} (expected {{"mean": [...], "std": [...]}})', param_hint="--feature-stats"
        ) from None


def _manifest(fields: dict[str, Any]) -> ModelManifest:
    from pydantic import ValidationError

    from runtime.protocol import ModelManifest

    try:
        return ModelManifest.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "manifest"
        raise typer.BadParameter(f"{where}: {err.get('msg')}") from None


def _check_onnx_runs(manifest: ModelManifest, data: bytes, compiled: Any) -> str:
    """Run the model in onnxruntime when it is installed; for a compiled graph, compare the two."""
    import numpy as np

    from runtime.predictors.linear import LinearPredictor
    from runtime.predictors.onnx import OnnxRuntimePredictor

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "not run (onnxruntime not installed here)"
    ort = OnnxRuntimePredictor(manifest, data)
    rng = np.random.default_rng(0)
    stats = manifest.feature_stats
    mean = np.asarray(stats.mean) if stats else np.zeros(len(manifest.features))
    std = np.asarray(stats.std) if stats else np.ones(len(manifest.features))
    X = mean + rng.standard_normal((64, len(manifest.features))) * np.where(std > 0, std, 1.0)
    y_ort = ort.predict(X)
    if y_ort.shape != (64,) or not np.isfinite(y_ort).all():
        raise typer.BadParameter("onnxruntime gives non-finite outputs on sample inputs", param_hint="--onnx")
    if compiled is None:
        return "ran on onnxruntime"
    lin = LinearPredictor(manifest, compiled.weights, compiled.intercept, dtype=compiled.dtype)
    y_np = lin.predict(X)
    scale = float(np.max(np.abs(y_ort))) + 1e-12
    err = float(np.max(np.abs(y_np - y_ort))) / scale
    if err > _AGREE_RTOL:
        raise typer.BadParameter(
            f"the compiled weights disagree with onnxruntime by {err:.2g} (relative); not building", param_hint="--onnx"
        )
    return f"compiled weights agree with onnxruntime to {err:.1e} (relative)"


@app.command("build")
def build(
    onnx: Path | None = typer.Option(None, "--onnx", help="An ONNX regression model (one float [n, d] input)."),
    coef: Path | None = typer.Option(None, "--coef", help='Linear coefficients: {"weights": [...], "intercept": b}.'),
    name: str = typer.Option(..., "--name", help="Model name (letters, digits, _ . -)."),
    version: int = typer.Option(..., "--version", min=1, help="Integer version, >= 1."),
    features: str = typer.Option(..., "--features", help="Feature names in input order, comma-separated."),
    target: str = typer.Option("y", "--target", help="Name of the predicted quantity."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32 or float64 (linear: default float64; ONNX: the model's input type)."
    ),
    nan_policy: str = typer.Option("reject", "--nan-policy", help="reject, or impute (NaN → training mean)."),
    feature_stats: Path | None = typer.Option(
        None, "--feature-stats", help='Training feature statistics: {"mean": [...], "std": [...]}.'
    ),
    key: Path = typer.Option(..., "--key", help="The fleet's signing key (from `edgeloop keys init`)."),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite a bundle already in --out."),
) -> None:
    """Build a signed model bundle from an ONNX file or a coefficients file."""
    from runtime.artifacts import MANIFEST, load_private_key, sign_manifest, write_bundle

    if (onnx is None) == (coef is None):
        raise typer.BadParameter("give exactly one of --onnx FILE or --coef FILE")
    names = _features(features)
    if dtype is not None and dtype not in ("float32", "float64"):
        raise typer.BadParameter("must be float32 or float64", param_hint="--dtype")
    if nan_policy not in ("reject", "impute"):
        raise typer.BadParameter("must be reject or impute", param_hint="--nan-policy")
    stats = _feature_stats(feature_stats) if feature_stats is not None else None
    if nan_policy == "impute" and stats is None:
        raise typer.BadParameter("impute needs --feature-stats (the training means)", param_hint="--nan-policy")
    if (out / MANIFEST).exists() and not force:
        raise typer.BadParameter(f"{out} already holds a bundle (use --force to overwrite)", param_hint="--out")
    signing_key = load_private_key(key)
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "features": names,
        "target": target,
        "created_at": time.time(),
        "nan_policy": nan_policy,
        "feature_stats": stats,
    }
    artifact: bytes | None = None
    check = ""
    if coef is not None:
        weights, intercept = _coefficients(coef, len(names))
        fields.update(kind="linear", dtype=dtype or "float64", weights=weights, intercept=intercept)
        backend = "numpy"
    else:
        assert onnx is not None
        import hashlib

        from runtime.errors import ArtifactError
        from runtime.predictors.compile import inspect_onnx

        try:
            artifact = onnx.read_bytes()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {onnx}: {exc.strerror}", param_hint="--onnx") from None
        try:
            info = inspect_onnx(artifact, len(names))
        except ArtifactError as exc:
            raise ArtifactError(exc.reason, str(onnx)) from None
        if dtype is not None and dtype != info.dtype:
            raise typer.BadParameter(f"the model's input is {info.dtype}, not {dtype}", param_hint="--dtype")
        fields.update(
            kind="onnx",
            dtype=info.dtype,
            artifact={"filename": "model.onnx", "size": len(artifact), "sha256": hashlib.sha256(artifact).hexdigest()},
        )
        backend = info.backend
        check = _check_onnx_runs(_manifest(fields), artifact, info.compiled)
    manifest = sign_manifest(_manifest(fields), signing_key)
    write_bundle(out, manifest, artifact)
    typer.echo(f"built      {manifest.name} v{manifest.version} ({manifest.model_kind}, {manifest.dtype}) in {out}")
    typer.echo(f"features   {', '.join(manifest.features)} → {manifest.target}")
    typer.echo(f"backend    {backend}")
    if check:
        typer.echo(f"checked    {check}")
    if manifest.artifact is not None:
        typer.echo(
            f"artifact   {manifest.artifact.filename} {manifest.artifact.size} bytes sha256 {manifest.artifact.sha256}"
        )
    typer.echo(f"signed     key id {manifest.key_id}")


def _verify(bundle: Bundle, public: Any) -> tuple[str | None, str | None]:
    """(signature error, artifact error); None means it verified (or there is no artifact)."""
    from runtime.artifacts import sha256_file, verify_manifest
    from runtime.errors import SignatureError

    sig_err: str | None = None
    try:
        verify_manifest(bundle.manifest, public)
    except SignatureError as exc:
        sig_err = str(exc)
    art = bundle.manifest.artifact
    art_err: str | None = None
    if art is not None:
        apath = bundle.path / art.filename
        if apath.is_symlink():
            art_err = "artifact is a symlink"
        else:
            try:
                digest, size = sha256_file(apath)
            except OSError as exc:
                art_err = f"cannot read {apath}: {exc.strerror}"
            else:
                if size != art.size:
                    art_err = f"artifact is {size} bytes, manifest says {art.size}"
                elif digest != art.sha256:
                    art_err = f"artifact sha256 {digest[:12]}… does not match the manifest's {art.sha256[:12]}…"
    return sig_err, art_err


def _short(values: tuple[float, ...] | None, limit: int = 12) -> str:
    if values is None:
        return "-"
    head = ", ".join(f"{v:.6g}" for v in values[:limit])
    return f"[{head}{', …' if len(values) > limit else ''}] ({len(values)})"


@app.command("inspect")
def inspect(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle folder."),
    public_key: Path = typer.Option(..., "--public-key", help="The fleet's public key (fleet.pub)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    onnx_threads: int = typer.Option(1, "--onnx-threads", min=1, help="onnxruntime intra-op threads."),
) -> None:
    """Show a bundle's manifest, whether its signature and hash verify, and which backend runs it."""
    from runtime.artifacts import load_public_key, read_bundle
    from runtime.errors import EdgeloopError
    from runtime.predictors import load_predictor

    public = load_public_key(public_key)
    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    sig_err, art_err = _verify(bundle, public)
    backend: str | None = None
    load_err: str | None = None
    if sig_err is None and art_err is None:
        try:
            backend = load_predictor(bundle, onnx_threads=onnx_threads).backend
        except EdgeloopError as exc:
            load_err = str(exc)
    else:
        load_err = "not loaded: verification failed"
    ok = sig_err is None and art_err is None and load_err is None
    if as_json:
        print_json(
            {
                "manifest": m.model_dump(mode="json", by_alias=True),
                "signature": {"ok": sig_err is None, "error": sig_err},
                "artifact": None if m.artifact is None else {"ok": art_err is None, "error": art_err},
                "backend": backend,
                "load_error": load_err,
                "ok": ok,
            }
        )
    else:
        rows: list[tuple[str, str]] = [
            ("model", f"{m.name} v{m.version}"),
            ("kind", f"{m.model_kind} ({m.dtype})"),
            ("features", f"{', '.join(m.features)} ({len(m.features)})"),
            ("target", m.target),
            ("created", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m.created_at))),
            ("nan policy", m.nan_policy),
            ("training", m.training.model_dump_json()),
            ("metrics", json.dumps(m.metrics) if m.metrics else "-"),
            ("feature mean", _short(m.feature_stats.mean if m.feature_stats else None)),
            ("feature std", _short(m.feature_stats.std if m.feature_stats else None)),
        ]
        if m.model_kind == "linear":
            rows += [("weights", _short(m.weights)), ("intercept", f"{m.intercept:.10g}")]
        if m.artifact is not None:
            a = m.artifact
            rows.append(
                ("artifact", f"{a.filename} {a.size} bytes sha256 {a.sha256}{' url ' + a.url if a.url else ''}")
            )
        rows += [
            ("key id", m.key_id or "-"),
            ("signature", "ok" if sig_err is None else f"FAILED: {sig_err}"),
        ]
        if m.artifact is not None:
            rows.append(("hash", "ok" if art_err is None else f"FAILED: {art_err}"))
        rows.append(("backend", backend or load_err or "-"))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            typer.echo(f"{k.ljust(width)}  {v}")
    if not ok:
        typer.echo(f"error: {sig_err or art_err or load_err}", err=True)
        raise typer.Exit(1)


@contextlib.contextmanager
def _output(target: str) -> Iterator[TextIO]:
    """stdout, or a file replaced atomically once everything was written."""
    if target == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    path = Path(target)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@app.command("predict")
def predict(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle folder."),
    public_key: Path = typer.Option(..., "--public-key", help="The fleet's public key (fleet.pub)."),
    input_: str = typer.Option(..., "--input", help="CSV (header names the features) or JSON lines; - for stdin."),
    output: str = typer.Option("-", "--output", help="Where to write the rows with y_pred; - for stdout."),
    fmt: str | None = typer.Option(None, "--format", help="csv or jsonl (default: by extension or first character)."),
    onnx_threads: int = typer.Option(1, "--onnx-threads", min=1, help="onnxruntime intra-op threads."),
) -> None:
    """Verify a bundle, load it and predict on a table; adds a y_pred column (CSV) or field (JSON lines)."""
    from runtime.errors import InputError
    from runtime.predictors import load_bundle
    from runtime.tabular import TableReader, TableWriter

    if fmt is not None and fmt not in ("csv", "jsonl"):
        raise typer.BadParameter("must be csv or jsonl", param_hint="--format")
    predictor = load_bundle(bundle_dir, public_key, onnx_threads=onnx_threads)
    if input_ == "-":
        source: TextIO = sys.stdin
        close = False
    else:
        try:
            source = open(input_, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {input_}: {exc.strerror}", param_hint="--input") from None
        close = True
    rows = 0
    try:
        reader = TableReader(source, predictor.features, fmt=fmt, name=None if input_ == "-" else input_)  # type: ignore[arg-type]
        with _output(output) as sink:
            writer = TableWriter(sink, reader.fmt, reader.header)
            for chunk in reader:
                try:
                    y = predictor.predict(chunk.X)
                except InputError as exc:
                    if exc.row is None:
                        raise
                    line = chunk.lines[exc.row]
                    raise InputError(
                        f"{exc.reason} (input line {line})", row=chunk.first_row + exc.row, column=exc.column
                    ) from None
                writer.write(chunk.records, y)
                rows += len(chunk.records)
    finally:
        if close:
            source.close()
    if output != "-":
        typer.echo(
            f"{rows} rows predicted with {predictor.manifest.name} v{predictor.manifest.version} "
            f"({predictor.backend}) → {output}",
            err=True,
        )
