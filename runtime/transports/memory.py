"""In-memory uplink for tests and embedding: records what is published, injects what arrives."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.config import DeviceSettings
from runtime.errors import TransportError
from runtime.transports.base import Uplink

__all__ = ["MemoryUplink"]


@dataclass
class Sent:
    suffix: str
    payload: bytes
    retain: bool


class MemoryUplink(Uplink):
    """``published`` holds every accepted publish; ``refuse`` makes the next publishes fail."""

    name = "memory"

    def __init__(self, device: str = "dev") -> None:
        super().__init__()
        self.device = device
        self.published: list[Sent] = []
        self.refuse: str | None = None
        self.broker_ack_only = False
        self._up = False
        self._started = False

    @classmethod
    def from_settings(cls, settings: DeviceSettings) -> MemoryUplink:
        u = cls(settings.device_id)
        u.broker_ack_only = settings.broker.ack == "broker"
        return u

    @property
    def connected(self) -> bool:
        return self._up

    async def start(self) -> None:
        self._started = True
        self.set_link(True)

    async def stop(self) -> None:
        self.set_link(False)
        self._started = False

    def set_link(self, up: bool) -> None:
        """Simulate the link going up or down (calls the connection handler like a real transport)."""
        if up != self._up:
            self._up = up
            self._on_connection(up)

    def deliver(self, suffix: str, payload: bytes) -> None:
        """Inject an inbound message (``desired``, ``cmd``, ``ack``)."""
        self._inbound(suffix, payload)

    async def publish(self, suffix: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> None:
        if not self._up:
            raise TransportError("memory link is down")
        if self.refuse is not None:
            raise TransportError(f"broker refused the publish: {self.refuse}")
        self.published.append(Sent(suffix, payload, retain))

    def of(self, suffix: str) -> list[bytes]:
        return [s.payload for s in self.published if s.suffix == suffix]
