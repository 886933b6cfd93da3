"""An MQTT client driven by the asyncio event loop through paho's socket hooks (as aiomqtt does).

No thread per client: paho's socket is registered with ``loop.add_reader``/``add_writer`` and
``loop_read``/``loop_write`` run when it is ready, ``loop_misc`` on a timer — so a simulated
fleet of a thousand devices shares one process. ``publish`` returns when the broker's PUBACK
arrives (pending futures keyed by message id, always removed); a disconnect fails every pending
publish with TransportError so callers resend. Reconnects use jittered, capped exponential
backoff and resubscribe every registered topic on every connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from runtime import mqttcompat
from runtime.errors import ConfigError, TransportError

__all__ = ["AsyncMqttClient", "MqttMessage", "Backoff", "parse_broker_url"]

logger = logging.getLogger(__name__)


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` → (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise ConfigError(f"unsupported broker URL scheme {parts.scheme!r} (use mqtt:// or mqtts://)", "broker.url")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"bad port in {url!r}", "broker.url") from None
    if not parts.hostname:
        raise ConfigError(f"no host in {url!r}", "broker.url")
    return parts.hostname, port, tls


@dataclass
class Backoff:
    """Jittered exponential backoff: ``min * 2^n`` capped at ``max``, each wait drawn from [d/2, d]."""

    minimum: float = 0.5
    maximum: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        d = min(self.maximum, self.minimum * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return d / 2 + self.rng.random() * d / 2

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class MqttMessage:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    user_properties: dict[str, str] = field(default_factory=dict)
    mid: int = 0
    _ack: Callable[[], None] | None = None

    def ack(self) -> None:
        """Acknowledge a manual-ack message to the broker (no-op otherwise)."""
        if self._ack is not None:
            ack, self._ack = self._ack, None
            ack()


class AsyncMqttClient:
    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        protocol: str = "5",
        clean_start: bool = False,
        session_expiry: int = 3600,
        keepalive: int = 30,
        tls: mqttcompat.TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
        manual_ack: bool = False,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        will: tuple[str, bytes, int, bool] | None = None,
        max_inflight: int = 20,
        connect_timeout: float = 10.0,
    ) -> None:
        self.host, self.port, use_tls = parse_broker_url(url)
        if use_tls and tls is None:
            tls = mqttcompat.TlsFiles()
        self.url = url
        self.client_id = client_id or f"edgeloop-{uuid.uuid4().hex[:12]}"
        self.protocol = protocol
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.manual_ack = manual_ack and mqttcompat.supports_manual_ack()
        self.connect_timeout = connect_timeout
        self._paho = mqttcompat.make_client(
            self.client_id,
            protocol=protocol,
            clean_start=clean_start,
            manual_ack=self.manual_ack,
            tls=tls,
            username=username,
            password=password,
            max_inflight=max_inflight,
        )
        if will is not None:
            self._paho.will_set(will[0], will[1], qos=will[2], retain=will[3])
        mqttcompat.bind(
            self._paho,
            mqttcompat.Callbacks(
                self._on_connect, self._on_disconnect, self._on_publish, self._on_subscribe, self._on_message
            ),
        )
        self._paho.on_socket_open = self._on_socket_open
        self._paho.on_socket_close = self._on_socket_close
        self._paho.on_socket_register_write = self._on_register_write
        self._paho.on_socket_unregister_write = self._on_unregister_write
        self.backoff = Backoff(backoff_min, backoff_max)
        self.subscriptions: dict[str, int] = {}
        self.on_message: Callable[[MqttMessage], None] = lambda m: None
        self.on_connection: Callable[[bool], None] = lambda up: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._sub_pending: dict[int, asyncio.Future[None]] = {}
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._sock: Any = None
        self._running = False
        self._ever_connected = False
        self.last_error: str | None = None

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Register a subscription; it is (re)made on every connect."""
        self.subscriptions[topic] = qos
        if self.connected:
            rc, _ = self._paho.subscribe(topic, qos)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                logger.warning("%s: subscribe %s failed: %s", self.client_id, topic, mqtt.error_string(rc))

    async def start(self) -> None:
        """Begin connecting in the background; return at once."""
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._tasks = [
            asyncio.create_task(self._connection_loop(), name=f"mqtt:{self.client_id}:connect"),
            asyncio.create_task(self._misc_loop(), name=f"mqtt:{self.client_id}:misc"),
        ]

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no will) and stop reconnecting."""
        if not self._running:
            return
        self._running = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.connected:
            self._paho.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), timeout)
        self._drop_socket()
        self._fail_pending("client stopped")
        self._connected.clear()
        self._disconnected.set()

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 30.0
    ) -> None:
        """Publish; for QoS 1 return when the broker acknowledged (TransportError on refusal or loss)."""
        if not self.connected:
            raise TransportError(f"not connected to {self.url}")
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return
        assert self._loop is not None
        fut = self._loop.create_future()
        self._pending[info.mid] = fut
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise TransportError(f"no PUBACK for {topic} within {timeout:g} s") from None
        finally:
            self._pending.pop(info.mid, None)

    # ------------------------------------------------------------------ connection loop

    async def _connection_loop(self) -> None:
        assert self._loop is not None
        while self._running:
            try:
                await self._connect_once()
            except (OSError, TransportError, ValueError, TimeoutError) as exc:
                self.last_error = str(exc)
                self._drop_socket()
                delay = self.backoff.next()
                log = logger.info if self._ever_connected else logger.debug
                log("%s: cannot reach %s (%s); retrying in %.1f s", self.client_id, self.url, exc, delay)
                await asyncio.sleep(delay)
                continue
            # wait for this connection to end, then back off before reconnecting
            await self._disconnected.wait()
            if self._running:
                await asyncio.sleep(self.backoff.next())

    async def _connect_once(self) -> None:
        self._disconnected.clear()
        self._connack: asyncio.Future[tuple[bool, str]] = self._loop.create_future()  # type: ignore[union-attr]
        props = mqttcompat.connect_properties(self.protocol, self.session_expiry)
        kwargs: dict[str, Any] = {"keepalive": self.keepalive}
        if self.protocol == "5":
            kwargs["clean_start"] = self.clean_start
            kwargs["properties"] = props
        # A blocking connect() to a loopback or LAN broker returns at once; the socket then
        # belongs to the event loop through the hooks below.
        self._paho.connect(self.host, self.port, **kwargs)
        try:
            ok, reason = await asyncio.wait_for(self._connack, self.connect_timeout)
        except TimeoutError:
            self._paho.disconnect()
            self._disconnected.set()
            raise TransportError(f"no CONNACK from {self.url} within {self.connect_timeout:g} s") from None
        if not ok:
            self._disconnected.set()
            raise TransportError(f"broker refused the connection: {reason}")
        subs = list(self.subscriptions.items())
        if subs:
            if self.protocol == "5":
                from paho.mqtt.subscribeoptions import SubscribeOptions

                rc, mid = self._paho.subscribe([(t, SubscribeOptions(qos=q)) for t, q in subs])
            else:
                rc, mid = self._paho.subscribe(subs)
            if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
                raise TransportError(f"subscribe failed: {mqtt.error_string(rc)}")
            fut = self._loop.create_future()  # type: ignore[union-attr]
            self._sub_pending[mid] = fut
            try:
                await asyncio.wait_for(fut, self.connect_timeout)
            except TimeoutError:
                raise TransportError("no SUBACK within the connect timeout") from None
            finally:
                self._sub_pending.pop(mid, None)
        self.backoff.reset()
        self._ever_connected = True
        self._connected.set()
        logger.info("%s: connected to %s", self.client_id, self.url)
        self.on_connection(True)

    async def _misc_loop(self) -> None:
        while self._running:
            await asyncio.sleep(1.0)
            if self._sock is not None:
                self._paho.loop_misc()

    # ------------------------------------------------------------------ paho callbacks (loop thread)

    def _on_connect(self, ok: bool, reason: str, session_present: bool) -> None:
        fut = getattr(self, "_connack", None)
        if fut is not None and not fut.done():
            fut.set_result((ok, reason))

    def _on_disconnect(self, reason: str) -> None:
        was = self.connected
        self._connected.clear()
        self._disconnected.set()
        self._fail_pending(f"connection lost ({reason})")
        if was:
            logger.info("%s: disconnected from %s: %s", self.client_id, self.url, reason)
            self.on_connection(False)

    def _on_publish(self, mid: int, ok: bool, reason: str) -> None:
        fut = self._pending.get(mid)
        if fut is None or fut.done():
            return
        if ok:
            fut.set_result(None)
        else:
            fut.set_exception(TransportError(f"broker refused the publish: {reason}"))

    def _on_subscribe(self, mid: int, ok: bool, reason: str) -> None:
        if not ok:
            logger.warning("%s: subscription refused: %s", self.client_id, reason)
        fut = self._sub_pending.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        props: dict[str, str] = {}
        p = getattr(msg, "properties", None)
        if p is not None and getattr(p, "UserProperty", None):
            props = {str(k): str(v) for k, v in p.UserProperty}
        ack: Callable[[], None] | None = None
        if self.manual_ack and msg.qos > 0:
            mid, qos = msg.mid, msg.qos

            def ack() -> None:
                self._paho.ack(mid, qos)

        m = MqttMessage(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), props, msg.mid, ack)
        try:
            self.on_message(m)
        except Exception:  # a handler bug must not kill the connection
            logger.exception("%s: message handler failed on %s", self.client_id, msg.topic)

    def _fail_pending(self, why: str) -> None:
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(TransportError(why))
        for fut in list(self._sub_pending.values()):
            if not fut.done():
                fut.set_exception(TransportError(why))
        c = getattr(self, "_connack", None)
        if c is not None and not c.done():
            c.set_result((False, why))

    # ------------------------------------------------------------------ socket hooks

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._sock = sock
        self._loop.add_reader(sock, self._read)

    def _read(self) -> None:
        rc = self._paho.loop_read()
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN) and self._sock is not None:
            # paho calls on_disconnect itself for a closed connection; make sure the socket is gone.
            self._drop_socket()

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
        if sock is self._sock:
            self._sock = None

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, self._paho.loop_write)

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(sock)

    def _drop_socket(self) -> None:
        sock = self._sock
        if sock is None or self._loop is None:
            return
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        self._sock = None
