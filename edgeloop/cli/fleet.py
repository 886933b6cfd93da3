"""``edgeloop fleet``: the operator's view of devices and rollouts."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import typer

from edgeloop.cli.cloud import ConfigOpt, load
from edgeloop.cli.common import fail, print_json, print_table

app = typer.Typer(help="Devices and rollouts.", no_args_is_help=True)
rollout_app = typer.Typer(help="Rollouts.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")


def _store(config: Path) -> tuple[Any, Any]:
    from cloud.store import open_store

    s = load(config)
    return s, open_store(s.store)


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    d = time.time() - ts
    if d < 120:
        return f"{d:.0f}s ago"
    if d < 7200:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.1f}h ago"


def _duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 2m or 1h")
    value, unit = float(m.group(1)), m.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def _fraction(text: str) -> float:
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a fraction like 10% or 0.1") from None
    if not 0 < v <= 1:
        raise typer.BadParameter("canary must be within (0, 100%]")
    return v


@app.command("list")
def list_devices(
    config: Path = ConfigOpt,
    group: str | None = typer.Option(None, "--group"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Device, online, group, model version, last seen, live MAE, outbox depth, drops."""
    from cloud.fleet import device_view

    s, store = _store(config)
    recs = store.list_devices(fleet=s.fleet, group=group)
    if as_json:
        print_json([_device_json(r) for r in recs])
        return
    rows = []
    for r in recs:
        v = device_view(r, s.offline_after)
        rows.append(
            (
                r.id,
                "yes" if v.online else "no",
                r.group or "",
                f"{r.model_name} v{r.model_version}" if r.model_version else "-",
                r.update_state or "",
                _ago(r.last_seen),
                "" if r.live_mae is None else f"{r.live_mae:.4f}",
                r.outbox_depth if r.outbox_depth is not None else "",
                r.drops or 0,
            )
        )
    print_table(["device", "online", "group", "model", "update", "last seen", "live MAE", "outbox", "drops"], rows)
    typer.echo(f"{len(recs)} device(s)")


def _device_json(r: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(r)


@app.command("show")
def show(device: str, config: Path = ConfigOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Everything the cloud knows about one device."""
    _, store = _store(config)
    r = store.get_device(device)
    if r is None:
        fail(f"no device {device!r} has reported to this cloud")
    data = _device_json(r)
    if as_json:
        print_json(data)
        return
    rows = [(k, v) for k, v in data.items() if k not in ("telemetry", "desired")]
    print_table(["field", "value"], rows)
    tele = data.get("telemetry") or {}
    if tele:
        typer.echo("")
        keys = ("readings", "predictions", "rejected", "latency_p50_us", "latency_p99_us", "rss_bytes", "bytes_written")
        print_table(["telemetry", "value"], [(k, tele.get(k)) for k in keys])


@app.command("deploy")
def deploy(
    model: str = typer.Argument(..., help="MODEL or MODEL:VERSION (default: the latest version)"),
    config: Path = ConfigOpt,
    target: str = typer.Option("all", "--target", help="all | group:G | devices:a,b"),
    canary: str = typer.Option("10%", "--canary", help="Share of target devices in the canary stage."),
    bake: str = typer.Option("2m", "--bake", help="How long canaries run before they are judged."),
    max_mae_ratio: float = typer.Option(
        1.1, "--max-mae-ratio", help="Canary live MAE may exceed control's by this factor."
    ),
    max_failures: int = typer.Option(0, "--max-failures", help="Canary devices allowed to fail the update."),
    report_timeout: str = typer.Option("2m", "--report-timeout", help="How long devices get to report the version."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a staged rollout; the cloud service carries it out."""
    from cloud.fleet import create_deployment
    from cloud.rollout import RolloutParams, parse_target

    name, _, ver = model.partition(":")
    version = None
    if ver:
        if not ver.isdigit():
            raise typer.BadParameter(f"version {ver!r} is not a number", param_hint="MODEL[:VERSION]")
        version = int(ver)
    try:
        parse_target(target)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--target") from None
    if max_mae_ratio <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--max-mae-ratio")
    params = RolloutParams(
        canary=_fraction(canary),
        bake=_duration(bake),
        max_mae_ratio=max_mae_ratio,
        max_failures=max(0, max_failures),
        report_timeout=_duration(report_timeout),
    )
    _, store = _store(config)
    rec = create_deployment(store, name, version, target, params)
    if as_json:
        print_json({"rollout": rec.id, "model": rec.model, "version": rec.version, "target": rec.target})
        return
    typer.echo(
        f"rollout {rec.id}: {rec.model} v{rec.version} to {target}, canary {params.canary:.0%}, bake {params.bake:g}s"
    )
    typer.echo(f"follow it with: edgeloop fleet rollout status {rec.id}")


@app.command("rollback")
def rollback(
    model: str | None = typer.Argument(None, help="Model name (default: the config's retrain.model)."),
    to: int | None = typer.Option(
        None, "--to", help="Version to return to (default: the one before the last rollout)."
    ),
    target: str = typer.Option("all", "--target"),
    config: Path = ConfigOpt,
) -> None:
    """Return devices to an earlier version now (desired state marked rollback; no canary)."""
    from cloud.fleet import create_deployment, rollback_target
    from cloud.rollout import RolloutParams

    s, store = _store(config)
    name = model or s.retrain.model
    version = to if to is not None else rollback_target(store, name, s.fleet)
    rec = create_deployment(store, name, version, target, RolloutParams(canary=1.0, bake=0), rollback=True)
    typer.echo(f"rollout {rec.id}: rolling {target} back to {name} v{version}")


@app.command("abort")
def abort(rollout_id: str, config: Path = ConfigOpt) -> None:
    """Stop a rollout where it is."""
    from cloud.fleet import abort_rollout

    _, store = _store(config)
    rec = abort_rollout(store, rollout_id)
    typer.echo(f"rollout {rec.id} aborted")


@rollout_app.command("status")
def rollout_status(
    rollout_id: str | None = typer.Argument(None, help="A rollout id (default: list recent rollouts)."),
    config: Path = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One rollout with its events, or the recent rollouts."""
    _, store = _store(config)
    if rollout_id is None:
        recs = store.list_rollouts(limit=20)
        if as_json:
            print_json([_rollout_json(r) for r in recs])
            return
        rows = [
            (r.id, f"{r.model} v{r.version}", r.target, r.state, (r.reason or "")[:60], _ago(r.updated_at))
            for r in recs
        ]
        print_table(["rollout", "model", "target", "state", "reason", "updated"], rows)
        return
    rec = store.get_rollout(rollout_id)
    if rec is None:
        fail(f"no rollout {rollout_id}")
    events = store.rollout_events(rollout_id)
    if as_json:
        print_json(
            {**_rollout_json(rec), "events": [{"ts": e.ts, "message": e.message, "state": e.state} for e in events]}
        )
        return
    p = rec.params
    typer.echo(f"rollout {rec.id}: {rec.model} v{rec.version} → {rec.target}   state: {rec.state}")
    if p.get("canaries"):
        typer.echo(f"canaries: {', '.join(p['canaries'][:10])}{' …' if len(p['canaries']) > 10 else ''}")
    m = p.get("metrics") or {}
    if m.get("canary_mae") is not None:
        typer.echo(f"canary MAE {m['canary_mae']:.4f}  control MAE {m.get('control_mae') or float('nan'):.4f}")
    if rec.reason:
        typer.echo(f"reason: {rec.reason}")
    print_table(["time", "event"], [(time.strftime("%H:%M:%S", time.localtime(e.ts)), e.message) for e in events])


def _rollout_json(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "target": r.target,
        "state": r.state,
        "reason": r.reason,
        "canary_fraction": r.canary_fraction,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "canaries": r.params.get("canaries", []),
        "metrics": r.params.get("metrics", {}),
    }


@app.command("command")
def command(
    device: str,
    name: str = typer.Argument(..., help="ping | rollback | flush | get_state | set_capture_rate"),
    rate: float | None = typer.Option(None, "--rate", help="For set_capture_rate: 0..1"),
    timeout: float = typer.Option(15.0, "--timeout"),
    config: Path = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Send a command to a device and wait for its result."""
    import asyncio

    from cloud.commands import send_command

    s = load(config)
    if name not in ("ping", "rollback", "flush", "get_state", "set_capture_rate"):
        raise typer.BadParameter("must be ping, rollback, flush, get_state or set_capture_rate", param_hint="NAME")
    if name == "set_capture_rate" and (rate is None or not 0 <= rate <= 1):
        raise typer.BadParameter("set_capture_rate needs --rate between 0 and 1", param_hint="--rate")
    result = asyncio.run(send_command(s.broker, s.fleet, device, name, timeout=timeout, rate=rate))
    if as_json:
        print_json(result.model_dump())
    else:
        typer.echo(f"{device}: {'ok' if result.ok else 'failed'}" + (f" — {result.error}" if result.error else ""))
        for k, v in result.data.items():
            typer.echo(f"  {k}: {v}")
    if not result.ok:
        raise typer.Exit(1)
