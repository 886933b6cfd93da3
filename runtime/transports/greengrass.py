"""Greengrass v2 uplink: IoT Core through the nucleus's IPC (``publish_to_iot_core`` / ``subscribe_to_iot_core``).

A component does not hold the thing's certificate; the nucleus does and relays MQTT for it. The
topics are the IoT Core ones (``edgeloop/{fleet}/{thing}/…``), allowed by the component's
``aws.greengrass.ipc.mqttproxy`` access-control policy. The nucleus tells a component where it
is through ``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` and ``SVCUID``; without them
(not started by a nucleus) :meth:`GreengrassUplink.start` fails at once, and a socket that never
answers fails after :data:`CONNECT_TIMEOUT` seconds, not the SDK's 10.

The mapping of our streams to IPC requests is :func:`publish_request`, :func:`subscribe_requests`
and :func:`inbound`, built from the SDK's own model types.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Self

from runtime import protocol
from runtime.config import DeviceSettings
from runtime.errors import ProtocolError, TransportError
from runtime.transports._bridge import SdkBridge
from runtime.transports.base import Uplink

if TYPE_CHECKING:  # pragma: no cover
    from awsiot.greengrasscoreipc import model

__all__ = [
    "CONNECT_TIMEOUT",
    "ENV_SOCKET",
    "ENV_TOKEN",
    "GreengrassUplink",
    "inbound",
    "publish_request",
    "subscribe_requests",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = "the greengrass transport needs awsiotsdk: pip install 'edgeloop[aws]'"
ENV_SOCKET = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
ENV_TOKEN = "SVCUID"
ENV_THING = "AWS_IOT_THING_NAME"
#: Seconds to wait for the nucleus to accept the IPC connection (the SDK's default is 10).
CONNECT_TIMEOUT = 3.0
_CALL_TIMEOUT = 10.0
_INBOUND = (protocol.DESIRED, protocol.CMD, protocol.ACK)


def _model() -> Any:
    try:
        from awsiot.greengrasscoreipc import model as gg_model
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TransportError(INSTALL_HINT) from exc
    return gg_model


def _translate(exc: BaseException, what: str) -> TransportError:
    # Greengrass IPC errors (UnauthorizedError, ServiceError, ...) carry a message from the nucleus.
    message = getattr(exc, "message", None) or str(exc)
    return TransportError(f"greengrass: {what} failed: {type(exc).__name__}: {message}")


# --------------------------------------------------------------------------- the mapping


def publish_request(
    fleet: str, device: str, suffix: str, payload: bytes, *, retain: bool = False
) -> model.PublishToIoTCoreRequest:
    """Our outbound message as the nucleus's ``PublishToIoTCore`` request (QoS 1, IoT Core topic)."""
    m = _model()
    if suffix in _INBOUND:
        raise ProtocolError(f"{suffix!r} is an inbound stream", field="topic")
    return m.PublishToIoTCoreRequest(
        topic_name=protocol.topic(fleet, device, suffix), qos=m.QOS.AT_LEAST_ONCE, payload=payload, retain=retain
    )


def subscribe_requests(fleet: str, device: str, *, with_ack: bool = True) -> list[model.SubscribeToIoTCoreRequest]:
    """The ``SubscribeToIoTCore`` requests for our inbound streams (desired, cmd and, unless acks are
    the broker's, the cloud's ack)."""
    m = _model()
    suffixes = [s for s in _INBOUND if with_ack or s != protocol.ACK]
    return [
        m.SubscribeToIoTCoreRequest(topic_name=protocol.topic(fleet, device, s), qos=m.QOS.AT_LEAST_ONCE)
        for s in suffixes
    ]


def inbound(fleet: str, device: str, event: model.IoTCoreMessage) -> tuple[str, bytes]:
    """Our ``(suffix, payload)`` from a subscription event; ProtocolError when it is not for us."""
    message = getattr(event, "message", None)
    if message is None or message.topic_name is None:
        raise ProtocolError("IoT Core event without a message", field="topic")
    got_fleet, got_device, suffix = protocol.parse_topic(message.topic_name)
    if (got_fleet, got_device) != (fleet, device) or suffix not in _INBOUND:
        raise ProtocolError(f"not one of our inbound topics: {message.topic_name[:200]!r}", field="topic")
    return suffix, bytes(message.payload or b"")


# --------------------------------------------------------------------------- the uplink


class GreengrassUplink(Uplink):
    """Uplink through the Greengrass nucleus (a component's view of IoT Core)."""

    name = "greengrass"

    def __init__(self, settings: DeviceSettings, env: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._fleet = settings.fleet
        self._device = settings.device_id
        self._backoff = (settings.broker.backoff_min, settings.broker.backoff_max)
        self.broker_ack_only = settings.broker.ack == "broker"
        # The platform's variables, read here (where the platform is known), not in config.
        self._env = dict(os.environ if env is None else env)
        self._bridge = SdkBridge(f"greengrass:{self._device}", _translate)
        self._client: Any = None
        self._streams: list[Any] = []
        self._connected = False
        self._stopping = False
        self._reconnect: asyncio.Task[None] | None = None
        thing = self._env.get(ENV_THING)
        if thing and thing != self._device:
            logger.warning(
                "greengrass: device_id %r differs from the core's thing name %r: topics use %r",
                self._device,
                thing,
                self._device,
            )

    @classmethod
    def from_settings(cls, settings: DeviceSettings) -> Self:
        return cls(settings)

    @property
    def connected(self) -> bool:
        return self._connected

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        return protocol.Status(device=self._device, state=state, ts=time.time()).to_bytes()

    # ------------------------------------------------------------------ connecting

    def _where(self) -> tuple[str, str]:
        socket_path = self._env.get(ENV_SOCKET)
        token = self._env.get(ENV_TOKEN)
        if not socket_path or not token:
            missing = [n for n, v in ((ENV_SOCKET, socket_path), (ENV_TOKEN, token)) if not v]
            raise TransportError(
                f"greengrass: no Greengrass nucleus: {' and '.join(missing)} not set. This transport runs only "
                "as a Greengrass v2 component started by the nucleus; elsewhere use transport = 'aws-iot'"
            )
        if not os.path.exists(socket_path):
            raise TransportError(
                f"greengrass: the nucleus IPC socket {socket_path} does not exist (is the nucleus running?)"
            )
        return socket_path, token

    async def _connect_once(self) -> None:
        """Connect to the nucleus, subscribe, say online. Raises TransportError; leaves nothing open on failure."""
        socket_path, token = self._where()
        try:
            from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup, SocketDomain, SocketOptions
            from awsiot.eventstreamrpc import Connection, LifecycleHandler, MessageAmendment
            from awsiot.greengrasscoreipc.client import GreengrassCoreIPCClient
            from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise TransportError(INSTALL_HINT) from exc

        bridge = self._bridge
        uplink = self

        class Lifecycle(LifecycleHandler):
            def on_disconnect(self, reason: Exception | None) -> None:
                bridge.soon(uplink._lost, reason)

            def on_error(self, error: Exception) -> bool:
                logger.warning("greengrass: IPC error: %s", error)
                return True  # close the connection; on_disconnect follows

        # What awsiot.greengrasscoreipc.connect() does, but awaited with our timeout and closed on failure.
        elg = EventLoopGroup(num_threads=1)
        options = SocketOptions()
        options.domain = SocketDomain.Local
        options.connect_timeout_ms = int(CONNECT_TIMEOUT * 1000)
        connection = Connection(
            host_name=socket_path,
            port=0,
            bootstrap=ClientBootstrap(elg, DefaultHostResolver(elg)),
            socket_options=options,
            connect_message_amender=MessageAmendment.create_static_authtoken_amender(token),
        )
        try:
            await bridge.wait(
                connection.connect(Lifecycle()), f"connecting to the nucleus at {socket_path}", CONNECT_TIMEOUT
            )
        except TransportError:
            connection.close()
            raise
        client = GreengrassCoreIPCClientV2(client=GreengrassCoreIPCClient(connection), executor=None)
        try:
            streams = []
            for req in subscribe_requests(self._fleet, self._device, with_ack=not self.broker_ack_only):
                fut, op = client.subscribe_to_iot_core_async(
                    topic_name=req.topic_name,
                    qos=req.qos,
                    on_stream_event=bridge.threadsafe(self._on_event),
                    on_stream_error=self._on_stream_error,
                    on_stream_closed=bridge.threadsafe(self._on_stream_closed),
                )
                streams.append(op)
                await bridge.wait(fut, f"subscribe_to_iot_core {req.topic_name}", _CALL_TIMEOUT)
            self._client, self._streams = client, streams
            await self._publish(protocol.STATUS, self._status("online"), retain=True, timeout=_CALL_TIMEOUT)
        except BaseException:
            self._client, self._streams = None, []
            client.close(executor_wait=False)
            raise
        self._connected = True
        logger.info("greengrass: connected to the nucleus at %s", socket_path)
        self._notify(True)

    def _notify(self, up: bool) -> None:
        try:
            self._on_connection(up)
        except Exception:
            logger.exception("greengrass: connection handler failed")

    def _lost(self, reason: Exception | None) -> None:
        if self._stopping or self._client is None:
            return  # our own close, or a connection that never finished setting up
        was = self._connected
        self._connected = False
        self._client, self._streams = None, []
        self._bridge.fail_all("greengrass: IPC connection lost")
        logger.warning("greengrass: IPC connection to the nucleus lost: %s", reason)
        if was:
            self._notify(False)
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_task(
                self._reconnect_loop(), name="greengrass-reconnect"
            )

    async def _reconnect_loop(self) -> None:
        delay = self._backoff[0]
        while not self._stopping and not self._connected:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                await self._connect_once()
            except TransportError as exc:
                logger.warning("greengrass: reconnect failed: %s", exc)
                delay = min(delay * 2, self._backoff[1])

    # ------------------------------------------------------------------ stream callbacks

    def _on_event(self, event: model.IoTCoreMessage) -> None:
        try:
            suffix, payload = inbound(self._fleet, self._device, event)
        except ProtocolError as exc:
            logger.warning("greengrass: dropped message: %s", exc)
            return
        try:
            self._inbound(suffix, payload)
        except Exception:
            logger.exception("greengrass: inbound handler failed on %s", suffix)

    def _on_stream_error(self, error: Exception) -> bool:  # SDK thread; must answer synchronously
        logger.warning("greengrass: subscription stream error: %s", error)
        return False  # keep the stream open

    def _on_stream_closed(self) -> None:
        if not self._stopping and self._connected:
            logger.warning("greengrass: a subscription stream was closed by the nucleus")

    # ------------------------------------------------------------------ Uplink

    async def start(self) -> None:
        """Connect to the nucleus now: a component either has its nucleus or is misconfigured."""
        if self._client is not None:
            raise TransportError("greengrass: already started")
        self._bridge.bind()
        self._stopping = False
        await self._connect_once()

    async def stop(self) -> None:
        self._stopping = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        client, was = self._client, self._connected
        if client is None:
            return
        if was:
            try:
                await self._publish(protocol.STATUS, self._status("offline"), retain=True, timeout=5.0)
            except TransportError as exc:
                logger.warning("greengrass: could not publish offline status: %s", exc)
        self._connected = False
        for op in self._streams:
            try:
                op.close()
            except Exception as exc:
                logger.debug("greengrass: closing a stream: %s", exc)
        try:
            await self._bridge.wait(client.close(executor_wait=False), "closing the IPC connection", 5.0)
        except TransportError as exc:
            logger.debug("greengrass: %s", exc)
        self._client, self._streams = None, []
        self._bridge.fail_all("greengrass: transport stopped")
        if was:
            self._notify(False)

    async def publish(self, suffix: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> None:
        if not self._connected:
            raise TransportError("greengrass: not connected to the nucleus")
        await self._publish(suffix, payload, retain=retain, timeout=timeout)

    async def _publish(self, suffix: str, payload: bytes, *, retain: bool, timeout: float) -> None:
        client = self._client
        if client is None:
            raise TransportError("greengrass: not connected to the nucleus")
        try:
            req = publish_request(self._fleet, self._device, suffix, payload, retain=retain)
        except ProtocolError as exc:
            raise TransportError(f"greengrass: cannot publish on {suffix!r}: {exc}") from exc
        # The nucleus's response is all the confirmation a component gets (it may come from its spooler).
        fut = client.publish_to_iot_core_async(
            topic_name=req.topic_name, qos=req.qos, payload=req.payload, retain=req.retain
        )
        await self._bridge.wait(fut, f"publish_to_iot_core {req.topic_name}", timeout)
