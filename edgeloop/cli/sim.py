"""``edgeloop sim``: a simulated fleet of real daemons against a broker."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Simulated devices (real daemons, simulated sensors).", no_args_is_help=True)


@app.command("run")
def run(
    devices: int = typer.Option(10, "--devices", min=1, max=5000),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", "--broker"),
    fleet: str = typer.Option("default", "--fleet"),
    scenario: str = typer.Option("steady", "--scenario", help="steady, drift, sudden, gradual, stuck, nan, outage"),
    public_key: Path = typer.Option(..., "--public-key", help="The fleet's public key."),
    state_dir: Path = typer.Option(Path("sim-state"), "--state-dir"),
    duration: float = typer.Option(0.0, "--duration", help="Seconds to run (0: until stopped)."),
    rate: float = typer.Option(5.0, "--rate", help="Readings per second per device."),
    prefix: str = typer.Option("sim", "--prefix", help="Device ids are PREFIX-0000, PREFIX-0001, …"),
) -> None:
    """Run N simulated devices in this process until stopped (SIGTERM drains each outbox)."""
    import asyncio
    import signal

    from devices.sensors import SCENARIOS, make_scenario
    from devices.simfleet import FleetSpec, SimFleet

    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"choose from {', '.join(SCENARIOS)}", param_hint="--scenario")
    if not public_key.is_file():
        raise typer.BadParameter(f"{public_key} not found", param_hint="--public-key")

    async def main() -> None:
        spec = FleetSpec(devices=devices, fleet=fleet, broker=broker, rate=rate, prefix=prefix)
        sim = SimFleet(state_dir, public_key, spec, make_scenario(scenario, duration or 600.0))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await sim.start()
        typer.echo(f"{devices} simulated device(s) of fleet {fleet} running against {broker}")
        try:
            await asyncio.wait_for(stop.wait(), timeout=duration or None)
        except TimeoutError:
            pass
        typer.echo("stopping: draining outboxes")
        await sim.stop()
        acc = sim.accepted()
        typer.echo(f"accepted {sum(acc.values())} readings on {len(acc)} device(s)")

    asyncio.run(main())
