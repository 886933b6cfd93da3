"""``edgeloop cloud``: create, run and train the cloud side; the model registry."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from edgeloop.cli.common import fail, print_json, print_table

app = typer.Typer(help="The cloud service: ingest, training, registry, rollouts.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")

ConfigOpt = typer.Option(
    Path("cloud.toml"), "--config", "-c", help="The cloud config written by `edgeloop cloud init`."
)


def registry(s: Any) -> Any:
    """The registry of a loaded cloud config (store, artifacts, signing key)."""
    from cloud.registry import Registry
    from cloud.store import open_store
    from runtime.artifacts import load_private_key

    return Registry(open_store(s.store), s.artifacts_dir, load_private_key(s.signing_key), s.artifact_base_url)


def load(config: Path) -> Any:
    from cloud.config import load_cloud_settings

    if not config.is_file():
        fail(f"{config} not found (create one with `edgeloop cloud init --dir DIR`)")
    return load_cloud_settings(config)


@app.command("init")
def init(
    dir: Path = typer.Option(..., "--dir", help="Folder for cloud.toml, the signing key and artifacts."),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", "--broker"),
    store: str | None = typer.Option(None, "--store", help="sqlite:///path (default DIR/cloud.db) or postgresql://…"),
    fleet: str = typer.Option("default", "--fleet"),
    http_port: int = typer.Option(8780, "--http-port"),
    model: str = typer.Option("model", "--model", help="Name of the model the trainer maintains."),
    features: str = typer.Option("", "--features", help="Feature names for training: a,b,c"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Create the cloud's config and signing key."""
    from cloud.config import load_cloud_settings
    from runtime.artifacts import generate_keypair
    from runtime.config import dump_toml

    dir.mkdir(parents=True, exist_ok=True)
    cfg = dir / "cloud.toml"
    if cfg.exists() and not force:
        fail(f"{cfg} exists (use --force to overwrite)")
    key, pub = dir / "fleet.key", dir / "fleet.pub"
    if not key.exists():
        generate_keypair(dir)
    data: dict[str, Any] = {
        "fleet": fleet,
        "broker": broker,
        "store": store or "sqlite:///cloud.db",
        "signing_key": "fleet.key",
        "public_key": "fleet.pub",
        "artifacts_dir": "artifacts",
        "http_port": http_port,
        "retrain": {"model": model, "features": [f for f in features.split(",") if f]},
    }
    cfg.write_text(dump_toml(data))
    load_cloud_settings(cfg)  # never leave a config the service would refuse
    typer.echo(f"wrote {cfg}\nsigning key {key} (0600)\npublic key  {pub} (install on devices)")


@app.command("serve")
def serve(config: Path = ConfigOpt) -> None:
    """Run ingest, the trainer, the rollout controller and the artifact server."""
    import asyncio
    import logging
    import signal

    from cloud.service import CloudService

    s = load(config)
    logging.getLogger().setLevel(s.log_level)

    async def main() -> None:
        svc = CloudService(s)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, svc.request_stop)
        typer.echo(f"edgeloop cloud: fleet {s.fleet}, broker {s.broker}, artifacts on {s.artifact_base_url}")
        await svc.run_forever()

    asyncio.run(main())


@app.command("train")
def train(
    model: str | None = typer.Argument(None, help="Model name (default: retrain.model from the config)."),
    config: Path = ConfigOpt,
    features: str | None = typer.Option(None, "--features"),
    window: float | None = typer.Option(None, "--window", help="Train on rows of the last N seconds."),
    ridge: float | None = typer.Option(None, "--ridge", help="Ridge penalty (0 = ordinary least squares)."),
    source: str | None = typer.Option(None, "--source", help="rows (stored rows) or stats (devices' statistics)"),
    force: bool = typer.Option(False, "--force", help="Register even when not better than the champion."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Fit OLS/ridge from sufficient statistics, evaluate against the champion, register if better."""
    from cloud.trainer import Trainer

    s = load(config)
    rt = s.retrain.model_copy(
        update={
            k: v
            for k, v in {
                "model": model,
                "features": tuple(f for f in features.split(",") if f) if features else None,
                "window": window,
                "ridge": ridge,
                "source": source,
            }.items()
            if v is not None
        }
    )
    if source is not None and source not in ("rows", "stats"):
        raise typer.BadParameter("must be rows or stats", param_hint="--source")
    reg = registry(s)
    out = Trainer(reg.store, reg, rt, s.fleet).run(force_register=force)
    res = out.result
    if as_json:
        print_json(
            {
                "reason": out.reason,
                "registered": out.registered,
                "weights": res.weights.tolist() if res else None,
                "intercept": res.intercept if res else None,
                "metrics": res.metrics if res else None,
                "seconds": res.seconds if res else None,
            }
        )
        return
    if res is None:
        fail(out.reason)
    typer.echo(f"trained {rt.model} on {res.n_train} rows ({res.source}) in {res.seconds:.2f} s")
    coef = ", ".join(f"{f}={w:.4f}" for f, w in zip(res.features, res.weights, strict=True))
    typer.echo(f"  y = {coef}, intercept={res.intercept:.4f}")
    if res.holdout is not None:
        typer.echo(
            f"  held-out MAE {res.holdout.mae:.4f} RMSE {res.holdout.rmse:.4f} R² {res.holdout.r2:.4f} ({res.n_holdout} rows)"
        )
    if res.champion is not None:
        typer.echo(f"  champion v{res.champion_version} MAE {res.champion.mae:.4f} on the same rows")
    typer.echo(f"  {out.reason}" + (f" → registered v{out.registered}" if out.registered else " → not registered"))


@models_app.command("list")
def models_list(
    name: str | None = typer.Argument(None), config: Path = ConfigOpt, as_json: bool = typer.Option(False, "--json")
) -> None:
    """Registered versions with lineage and metrics."""
    from cloud.store import open_store

    store = open_store(load(config).store)
    recs = store.list_model_versions(name)
    if as_json:
        print_json([_rec(r) for r in recs])
        return
    rows = [
        (
            r.name,
            r.version,
            "*" if r.is_champion else "",
            r.status,
            r.parent or "",
            r.source or "",
            _fmt(r.metrics.get("mae")),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)),
        )
        for r in recs
    ]
    print_table(["model", "version", "champion", "status", "parent", "source", "MAE", "created"], rows)


def _rec(r: Any) -> dict[str, Any]:
    return {
        "name": r.name,
        "version": r.version,
        "champion": r.is_champion,
        "status": r.status,
        "parent": r.parent,
        "source": r.source,
        "metrics": r.metrics,
        "created_at": r.created_at,
    }


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


@models_app.command("show")
def models_show(name: str, version: int | None = typer.Argument(None), config: Path = ConfigOpt) -> None:
    """The signed manifest of a version (default: latest)."""
    from cloud.store import open_store

    store = open_store(load(config).store)
    rec = store.get_model_version(name, version if version is not None else "latest")
    if rec is None:
        fail(f"no model {name}{f' v{version}' if version else ''} in the registry")
    print_json(json.loads(rec.manifest_json))


@models_app.command("import")
def models_import(
    file: Path = typer.Argument(..., help="An ONNX regression model (scikit-learn, PyTorch, TensorFlow exporters)."),
    name: str = typer.Option(..., "--name"),
    features: str = typer.Option(..., "--features", help="a,b,c in the model's input order"),
    config: Path = ConfigOpt,
) -> None:
    """Version and sign an ONNX model like a trained one."""
    s = load(config)
    reg = registry(s)
    m = reg.import_onnx(file, name, [f.strip() for f in features.split(",") if f.strip()])
    typer.echo(
        f"imported {m.name} v{m.version} (sha256 {m.artifact.sha256[:12]}…, {m.artifact.size} bytes)"
        if m.artifact
        else ""
    )


@models_app.command("register")
def models_register(
    coef: Path = typer.Option(..., "--coef", help='A coefficients file: {"weights": [...], "intercept": b}'),
    name: str = typer.Option(..., "--name"),
    features: str = typer.Option(..., "--features", help="a,b,c in the order of the weights"),
    config: Path = ConfigOpt,
) -> None:
    """Version and sign a linear model fitted elsewhere."""
    try:
        data = json.loads(coef.read_text())
        weights = [float(w) for w in data["weights"]]
        intercept = float(data["intercept"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f'{coef}: not a coefficients file ({exc}); expected {{"weights": [...], "intercept": b}}')
    feats = [f.strip() for f in features.split(",") if f.strip()]
    if len(feats) != len(weights):
        fail(f"{len(weights)} weights for {len(feats)} features")
    m = registry(load(config)).register_linear(name, feats, weights, intercept)
    typer.echo(f"registered {m.name} v{m.version}")


@models_app.command("export")
def models_export(
    name: str,
    version: int | None = typer.Argument(None),
    out: Path = typer.Option(..., "--out"),
    config: Path = ConfigOpt,
) -> None:
    """Write a signed bundle folder (for `edgeloop device install-model`)."""
    s = load(config)
    reg = registry(s)
    reg.export(name, version, out)
    typer.echo(f"wrote {out}")
