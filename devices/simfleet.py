"""A simulated fleet: real device daemons with simulated sensors, many per process and event loop.

Each :class:`SimDevice` is a :class:`runtime.daemon.Daemon` with its own state dir, outbox and
MQTT connection; only the sensor is simulated. Readings enter through the pipeline's Python
interface (``submit_arrays``), so everything after the sensor is the code a real device runs.
Network outages are real too: the device's uplink is stopped and started again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from devices.sensors import Scenario, Sensor
from runtime.config import DeviceSettings
from runtime.daemon import Daemon

__all__ = ["FleetSpec", "SimDevice", "SimFleet"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetSpec:
    devices: int = 20
    fleet: str = "demo"
    broker: str = "mqtt://127.0.0.1:1883"
    features: tuple[str, ...] = ("x1", "x2", "x3")
    weights: tuple[float, ...] = (3.0, -2.0, 0.5)
    intercept: float = 5.0
    noise: float = 0.3
    label_share: float = 0.5
    rate: float = 5.0  # readings per second per device
    tick: float = 0.5
    telemetry_interval: float = 2.0
    groups: tuple[str, ...] = ("north", "south")
    share: str = "raw"
    resend_after: float = 10.0
    seed: int = 7
    max_delay: float = 0.2
    outbox_max_rows: int = 1_000_000
    prefix: str = "sim"
    protocol: str = "5"  # "3.1.1" for brokers without MQTT 5 (the embedded amqtt)


class SimDevice:
    def __init__(
        self,
        device_id: str,
        state_dir: Path,
        public_key: Path,
        spec: FleetSpec,
        scenario: Scenario,
        seed: int,
        group: str | None = None,
    ) -> None:
        self.id = device_id
        self.spec = spec
        self.settings = DeviceSettings.model_validate(
            {
                "device_id": device_id,
                "fleet": spec.fleet,
                "group": group,
                "state_dir": state_dir,
                "public_key": public_key,
                "features": spec.features,
                "broker": {"url": spec.broker, "resend_after": spec.resend_after, "protocol": spec.protocol},
                "source": {"kind": "none"},
                "batch": {"max_rows": 512, "max_delay": spec.max_delay},
                "outbox": {"max_rows": spec.outbox_max_rows},
                "share": {"mode": spec.share},
                "telemetry_interval": spec.telemetry_interval,
                "drain_deadline": 5.0,
                "log_level": "WARNING",
            }
        )
        rng = np.random.default_rng(seed)
        self.sensor = Sensor(
            weights=np.asarray(spec.weights, dtype=np.float64),
            intercept=spec.intercept,
            noise=spec.noise,
            label_share=spec.label_share,
            scenario=scenario,
            seed=int(rng.integers(2**31)),
        )
        self.daemon: Daemon | None = None
        self.link_up = True
        self._carry = 0.0

    async def start(self) -> None:
        self.daemon = Daemon(self.settings)
        await self.daemon.start()

    async def tick(self, t: float, dt: float) -> None:
        """Take this tick's readings; cut or restore the link as the scenario says."""
        d = self.daemon
        assert d is not None
        out = self.sensor.in_outage(t)
        if out and self.link_up:
            self.link_up = False
            logger.info("%s: network link cut at t=%.0fs", self.id, t)
            await d.uplink.stop()
        elif not out and not self.link_up:
            self.link_up = True
            logger.info("%s: network link restored at t=%.0fs", self.id, t)
            await d.uplink.start()
        self._carry += self.spec.rate * dt
        n = int(self._carry)
        if n:
            self._carry -= n
            X, y = self.sensor.sample(t, n)
            d.pipeline.submit_arrays(X, y)

    def accepted(self) -> int:
        """Rows this device committed to its outbox (its sequence numbers handed out)."""
        assert self.daemon is not None
        return int(self.daemon.outbox.next_seq("results"))

    def dropped(self) -> int:
        assert self.daemon is not None
        return int(self.daemon.outbox.dropped().get("results", 0))

    async def stop(self, deadline: float = 5.0) -> dict[str, int]:
        assert self.daemon is not None
        if not self.link_up:
            self.link_up = True
            await self.daemon.uplink.start()
        return await self.daemon.shutdown(deadline)


class SimFleet:
    """N simulated devices on one event loop, ticking together."""

    def __init__(
        self,
        root: Path,
        public_key: Path,
        spec: FleetSpec,
        scenario: Scenario,
        *,
        scenario_devices: Sequence[int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.spec = spec
        self.devices: list[SimDevice] = []
        for i in range(spec.devices):
            sc = scenario if scenario_devices is None or i in scenario_devices else Scenario("steady")
            group = spec.groups[i % len(spec.groups)] if spec.groups else None
            did = f"{spec.prefix}-{i:04d}"
            self.devices.append(SimDevice(did, self.root / did, public_key, spec, sc, spec.seed * 1000 + i, group))
        self.t0 = 0.0
        self._task: asyncio.Task[Any] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        # Connect in small waves so a large fleet does not stampede the broker.
        for i in range(0, len(self.devices), 50):
            await asyncio.gather(*(d.start() for d in self.devices[i : i + 50]))
        self.t0 = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="simfleet")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    async def _run(self) -> None:
        dt = self.spec.tick
        last = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            step = now - last
            last = now
            t = now - self.t0
            for d in self.devices:
                await d.tick(t, step)
            try:
                async with asyncio.timeout(dt):
                    await self._stop.wait()
            except TimeoutError:
                pass

    async def stop(self, deadline: float = 5.0) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await asyncio.gather(*(d.stop(deadline) for d in self.devices))

    def accepted(self) -> dict[str, int]:
        return {d.id: d.accepted() for d in self.devices}

    def dropped(self) -> dict[str, int]:
        return {d.id: d.dropped() for d in self.devices}
