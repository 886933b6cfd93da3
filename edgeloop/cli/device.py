"""``edgeloop device``: configure, provision and run the device daemon."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

from edgeloop.cli.common import fail, print_json, print_table

app = typer.Typer(help="Run and inspect the device daemon.", no_args_is_help=True)


@app.command("init")
def init(
    device_id: str = typer.Option(..., "--device-id", help="This device's id (letters, digits, _ . -)."),
    fleet: str = typer.Option("default", "--fleet"),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", "--broker", help="mqtt://host:port or mqtts://host:port"),
    public_key: Path = typer.Option(..., "--public-key", help="The fleet's public key (fleet.pub)."),
    out: Path = typer.Option(Path("device.toml"), "--out"),
    group: str | None = typer.Option(None, "--group"),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Default: ./state-<device-id> beside the config."),
    transport: str = typer.Option("mqtt", "--transport", help="mqtt, aws-iot, greengrass, azure-iot, azure-edge"),
    features: str | None = typer.Option(None, "--features", help="Input feature names in order: a,b,c"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing config."),
) -> None:
    """Write a working device config (TOML)."""
    from runtime.config import dump_toml, load_settings

    if out.exists() and not force:
        fail(f"{out} exists (use --force to overwrite)")
    if not public_key.is_file():
        fail(f"public key {public_key} not found")
    data: dict[str, Any] = {
        "device_id": device_id,
        "fleet": fleet,
        "group": group,
        "state_dir": str(state_dir or f"state-{device_id}"),
        "public_key": str(public_key.resolve()),
        "broker": {"transport": transport, "url": broker},
        "source": {"kind": "mqtt"},
    }
    if features:
        data["features"] = [f.strip() for f in features.split(",") if f.strip()]
    text = dump_toml(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    try:
        load_settings(tmp, env={})  # never write a config the daemon would refuse
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    typer.echo(f"wrote {out}")


@app.command("install-model")
def install_model(
    bundle: Path = typer.Argument(..., help="A signed bundle folder (manifest.json [+ model.onnx])."),
    config: Path = typer.Option(..., "--config"),
    activate: bool = typer.Option(True, "--activate/--no-activate"),
) -> None:
    """Install a signed bundle locally, with the same checks as an update."""
    from runtime.artifacts import load_public_key
    from runtime.config import load_settings
    from runtime.modelstore import ModelStore
    from runtime.predictors import load_predictor
    from runtime.reconcile import validate_candidate

    s = load_settings(config)
    store = ModelStore(s.state_dir, load_public_key(s.public_key), max_artifact_bytes=s.update.max_artifact_bytes)
    b = store.install_from_dir(bundle)
    predictor = load_predictor(b, onnx_threads=s.update.onnx_threads)
    import numpy as np

    validate_candidate(predictor, None, np.zeros((0, 0)), (), s.update.max_output_shift)
    if activate:
        store.activate(b.manifest.ref)
    m = b.manifest
    typer.echo(f"installed {m.name} v{m.version} ({predictor.backend}){' and activated' if activate else ''}")


@app.command("run", context_settings={"allow_extra_args": False})
def run(
    config: Path = typer.Option(..., "--config", help="Device config (TOML)."),
    input: str | None = typer.Option(None, "--input", help="JSON-lines readings from a file, or - for stdin."),
) -> None:
    """Run the daemon (SIGTERM drains the outbox and exits 0)."""
    from runtime.config import load_settings

    load_settings(config)  # fail here, with the CLI's clear message, before exec
    argv = [sys.executable, "-m", "runtime.daemon", "--config", str(config)]
    if input is not None:
        argv += ["--input", input]
    sys.stdout.flush()
    sys.stderr.flush()
    # exec: the daemon process carries no CLI libraries (typer, rich) in its memory.
    os.execv(sys.executable, argv)


def _status(config: Path) -> dict[str, Any]:
    from runtime.config import load_settings
    from runtime.modelstore import ModelStore
    from runtime.outbox import Outbox

    s = load_settings(config)
    from runtime.artifacts import load_public_key

    store = ModelStore(s.state_dir, load_public_key(s.public_key))
    active, previous = store.pointers()
    out: dict[str, Any] = {
        "device": s.device_id,
        "fleet": s.fleet,
        "active": f"{active.name} v{active.version}" if active else None,
        "previous": f"{previous.name} v{previous.version}" if previous else None,
        "installed": [f"{r.name} v{r.version}" for r in store.installed()],
    }
    db = s.state_dir / "outbox.db"
    if db.exists():
        ob = Outbox(db, max_rows=s.outbox.max_rows, max_bytes=s.outbox.max_bytes)
        try:
            out["outbox_depth"] = ob.depth()
            out["outbox_dropped"] = ob.dropped()
            out["outbox_bytes"] = ob.size_bytes()
            ls = ob.get_meta("last_sync")
            out["last_sync"] = float(ls) if ls else None
        finally:
            ob.close()
    st = s.state_dir / "status.json"
    running = False
    if st.exists():
        try:
            data = json.loads(st.read_text())
            pid = int(data.get("pid", 0))
            running = pid > 0 and _alive(pid)
            out["update"] = data.get("update")
            out["status_written"] = data.get("ts")
            if data.get("last_sync") and not out.get("last_sync"):
                out["last_sync"] = data["last_sync"]
        except (OSError, ValueError):
            pass
    out["running"] = running
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"runtime.daemon" in cmd or b"edgeloop" in cmd


@app.command("status")
def status(
    config: Path = typer.Option(..., "--config"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Active and previous model, outbox depth and drops, last sync — read from the state dir."""
    st = _status(config)
    if as_json:
        print_json(st)
        return
    ls = st.get("last_sync")
    rows = [
        ("device", st["device"]),
        ("running", "yes" if st["running"] else "no"),
        ("active model", st["active"] or "-"),
        ("previous model", st["previous"] or "-"),
        ("outbox depth", st.get("outbox_depth", "-")),
        ("outbox dropped", st.get("outbox_dropped", "-")),
        ("last sync", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ls)) if ls else "never"),
    ]
    upd = st.get("update") or {}
    if upd.get("state") and upd.get("state") != "idle":
        rows.append(("last update", f"{upd.get('state')} v{upd.get('version')} {upd.get('reason') or ''}".strip()))
    print_table(["field", "value"], rows)
