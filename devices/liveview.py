"""The demo's live terminal view (rich): fleet table, rollouts, event log."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

__all__ = ["LiveView"]


class LiveView:
    def __init__(self, max_devices: int = 24) -> None:
        self.max_devices = max_devices
        self.live = Live(Panel("starting…"), refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def update(self, snap: dict[str, Any]) -> None:
        fleet = Table(title=f"fleet at {snap['t']:.0f} s", expand=True)
        for col in ("device", "online", "model", "update", "live MAE", "outbox"):
            fleet.add_column(col)
        devs = snap["devices"]
        for d in devs[: self.max_devices]:
            mae = d["live_mae"]
            fleet.add_row(
                d["id"],
                "[green]yes[/]" if d["online"] else "[red]no[/]",
                f"v{d['model']}" if d["model"] else "-",
                d["update"],
                "-" if mae is None else f"{mae:.3f}",
                str(d["outbox"]),
            )
        if len(devs) > self.max_devices:
            fleet.add_row(f"… {len(devs) - self.max_devices} more", "", "", "", "", "")
        ro = Table(title="rollouts", expand=True)
        for col in ("id", "version", "state", "reason"):
            ro.add_column(col)
        for r in snap["rollouts"]:
            ro.add_row(r["id"], f"v{r['version']}", r["state"], (r["reason"] or "")[:70])
        log = "\n".join(f"{t:6.1f}s  {m}" for t, m in snap["events"])
        self.live.update(Group(fleet, ro, Panel(log or "-", title="events")))
