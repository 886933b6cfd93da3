"""``edgeloop demo``: the whole loop on one machine, watched live, with a report."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgeloop.cli.common import fail


def demo(
    devices: int = typer.Option(20, "--devices", min=1, max=2000, help="Simulated devices."),
    duration: float = typer.Option(180.0, "--duration", min=30.0, help="Seconds the story takes."),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", "--broker", help="Used when it answers; else one is started."),
    out: Path = typer.Option(Path("demo-out"), "--out", help="Report folder: chart, summary, store."),
    headless: bool = typer.Option(False, "--headless", help="Plain progress lines instead of the live view."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON at the end."),
    rate: float = typer.Option(5.0, "--rate", min=0.1, help="Readings per second per device."),
) -> None:
    """A fleet drifts, the cloud retrains, canaries and promotes — and rolls a bad model back."""
    import asyncio
    import logging

    from devices.demo import DemoOptions, fmt, run_demo

    logging.getLogger().setLevel(logging.WARNING)
    opts = DemoOptions(
        devices=devices, duration=duration, broker=broker, out=out, headless=headless or as_json, rate=rate
    )
    if opts.headless:
        result = asyncio.run(run_demo(opts))
    else:
        from devices.liveview import LiveView

        view = LiveView()
        with view:
            result = asyncio.run(run_demo(opts, progress=view.update))
    s = result.summary
    if as_json:
        typer.echo(json.dumps(s, indent=2, default=str))
    else:
        typer.echo("")
        typer.echo(f"MAE before drift {fmt(s['mae_before_drift'])}, after recovery {fmt(s['mae_after_recovery'])}")
        typer.echo(
            f"readings accepted {s['readings_accepted']}, results stored {s['results_stored']}, "
            f"lost {s['lost']}, duplicated {s['duplicated']}, dropped {s['dropped']}"
        )
        for name, ok in result.checks.items():
            typer.echo(f"  [{'ok' if ok else 'FAILED'}] {name}")
        typer.echo(f"report: {out}/fleet_mae.png, {out}/summary.json, {out}/events.log, {out}/cloud.db")
    if not result.ok:
        fail("the loop did not close: " + "; ".join(result.failed))
