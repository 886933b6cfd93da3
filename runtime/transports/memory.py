"""In-memory uplinks for tests and embedding: a :class:`MemoryHub` stands in for the broker.

The hub records every publish, keeps retained messages per topic (so a device that connects
late still gets its ``desired`` state, as with MQTT), and can refuse connections or publishes
and drop links — the daemon's logic is tested against it without a socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.errors import TransportError
from runtime.protocol import STATUS, Status
from runtime.transports.base import Uplink

if TYPE_CHECKING:
    from runtime.config import DeviceSettings

__all__ = ["MemoryHub", "MemoryUplink", "Sent"]

logger = logging.getLogger(__name__)

_INBOUND = ("desired", "cmd", "ack")


@dataclass(frozen=True)
class Sent:
    """One accepted publish."""

    device: str
    suffix: str
    payload: bytes
    retain: bool


@dataclass
class MemoryHub:
    """The broker stand-in: ``messages`` in publish order, ``retained`` per ``(device, suffix)``.

    ``accepting = False`` refuses (re)connects; ``refuse_publish`` makes every publish fail with
    that reason (like an MQTT 5 PUBACK >= 0x80); ``stall_publish`` leaves publishes unanswered
    until their timeout.
    """

    messages: list[Sent] = field(default_factory=list)
    retained: dict[tuple[str, str], bytes] = field(default_factory=dict)
    accepting: bool = True
    refuse_publish: str | None = None
    stall_publish: bool = False
    uplinks: dict[str, MemoryUplink] = field(default_factory=dict)

    def uplink(self, device: str = "dev") -> MemoryUplink:
        """A new uplink for ``device`` attached to this hub."""
        return MemoryUplink(device, hub=self)

    def deliver(self, device: str, suffix: str, payload: bytes, *, retain: bool = False) -> None:
        """Send ``payload`` to ``device`` (the cloud's side); retained ones reach it again on every connect."""
        if retain:
            self.retained[(device, suffix)] = payload
        up = self.uplinks.get(device)
        if up is not None and up.connected:
            up.receive(suffix, payload)

    def set_accepting(self, accepting: bool) -> None:
        """Refuse or allow connections; links that were refused connect once it allows them."""
        self.accepting = accepting
        for up in list(self.uplinks.values()):
            if accepting and up.started and not up.connected:
                up.set_link(True)
            elif not accepting and up.connected:
                up.set_link(False)

    def of(self, suffix: str, device: str | None = None) -> list[bytes]:
        return [m.payload for m in self.messages if m.suffix == suffix and (device is None or m.device == device)]


class MemoryUplink(Uplink):
    """An uplink on a :class:`MemoryHub` (its own hub when none is given).

    ``published`` holds this device's accepted publishes; ``deliver`` injects an inbound
    message; ``set_link`` simulates the link going down or up; ``refuse`` makes publishes fail.
    """

    name = "memory"

    def __init__(self, device: str = "dev", *, hub: MemoryHub | None = None) -> None:
        super().__init__()
        self.device = device
        self.hub = hub if hub is not None else MemoryHub()
        self.hub.uplinks[device] = self
        self.published: list[Sent] = []
        self.refuse: str | None = None
        self.started = False
        self._up = False

    @classmethod
    def from_settings(cls, settings: DeviceSettings) -> MemoryUplink:
        u = cls(settings.device_id)
        u.broker_ack_only = settings.broker.ack == "broker"
        return u

    @property
    def connected(self) -> bool:
        return self._up

    async def start(self) -> None:
        self.started = True
        if self.hub.accepting:
            self.set_link(True)
        else:
            logger.info("memory hub refuses %s: staying disconnected until it accepts", self.device)

    async def stop(self) -> None:
        if self._up:
            self._record(STATUS, self._status("offline"), True)
        self.started = False  # a clean stop: no will
        self.set_link(False)

    def _status(self, state: str) -> bytes:
        return Status(device=self.device, state=state, ts=time.time()).to_bytes()

    def set_link(self, up: bool) -> None:
        """Simulate the link going up or down (calls the connection handler like a real transport)."""
        if up == self._up:
            return
        if up and not self.hub.accepting:
            raise TransportError("memory hub refuses connections")
        self._up = up
        if up:  # like MqttUplink: a retained online status; an abrupt drop fires the offline will
            self._record(STATUS, self._status("online"), True)
        elif self.started:
            self._record(STATUS, self._status("offline"), True)
        self._on_connection(up)
        if up:  # like a resubscribe: retained messages for this device arrive again
            for (device, suffix), payload in list(self.hub.retained.items()):
                if device == self.device and suffix in _INBOUND and self._up:
                    self._inbound(suffix, payload)

    def deliver(self, suffix: str, payload: bytes) -> None:
        """Inject an inbound message (``desired``, ``cmd``, ``ack``), connected or not."""
        self._inbound(suffix, payload)

    def receive(self, suffix: str, payload: bytes) -> None:
        """The hub's delivery path (only while connected)."""
        if self._up:
            self._inbound(suffix, payload)

    async def publish(self, suffix: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> None:
        if not self._up:
            raise TransportError("memory link is down")
        reason = self.refuse or self.hub.refuse_publish
        if reason is not None:
            raise TransportError(f"the broker refused the message: {reason}")
        if self.hub.stall_publish:
            await asyncio.sleep(timeout)
            raise TransportError(f"no acknowledgement for {suffix} within {timeout:g} s")
        self._record(suffix, payload, retain)

    def _record(self, suffix: str, payload: bytes, retain: bool) -> None:
        sent = Sent(self.device, suffix, payload, retain)
        self.published.append(sent)
        self.hub.messages.append(sent)
        if retain:
            self.hub.retained[(self.device, suffix)] = payload

    def of(self, suffix: str) -> list[bytes]:
        return [s.payload for s in self.published if s.suffix == suffix]
