"""The one interface between the daemon and a cloud: :class:`Uplink`.

Everything above ``runtime/transports/`` talks in our topic suffixes (``results``, ``telemetry``,
``stats``, ``reported``, ``status``, ``cmd/result`` out; ``desired``, ``cmd``, ``ack`` in) and raw
payload bytes; each transport maps them onto its cloud (plain MQTT topics, IoT Core topics,
Greengrass IPC, IoT Hub messages/twin/direct methods).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

__all__ = ["ConnectionHandler", "InboundHandler", "Uplink"]

#: Called on the event loop with ``(suffix, payload)`` for every inbound message.
InboundHandler = Callable[[str, bytes], None]
#: Called on the event loop with ``True`` after every (re)connect and ``False`` on a disconnect.
ConnectionHandler = Callable[[bool], None]


class Uplink(abc.ABC):
    """A device's link to its cloud. All methods are called from, and call back on, the event loop."""

    #: Short name for logs and reported state ("mqtt", "aws-iot", "greengrass", "azure-iot", ...).
    name: str = "uplink"
    #: True when the broker's acknowledgement is the only confirmation there will be (``ack = broker``).
    broker_ack_only: bool = False

    def __init__(self) -> None:
        self._inbound: InboundHandler = lambda suffix, payload: None
        self._on_connection: ConnectionHandler = lambda up: None

    def set_handlers(self, inbound: InboundHandler, on_connection: ConnectionHandler) -> None:
        self._inbound = inbound
        self._on_connection = on_connection

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin connecting in the background (reconnecting with backoff forever); return at once."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect cleanly (publishing ``offline`` status where the cloud has one) and release resources."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the link is up and subscribed."""

    @abc.abstractmethod
    async def publish(self, suffix: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> None:
        """Send one message at least once; return when the cloud/broker acknowledged it.

        Raises :class:`runtime.errors.TransportError` when not connected, on timeout, or when
        the broker refused the message (for example MQTT 5 reason code 0x87, not authorized).
        """
