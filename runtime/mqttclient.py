"""An MQTT client driven by the asyncio event loop through paho's socket hooks (as aiomqtt does).

No thread per client: paho's socket is registered with ``loop.add_reader``/``add_writer``,
``loop_read``/``loop_write`` run when it is ready and ``loop_misc`` (keepalive) on a one-second
timer, so a simulated fleet of a thousand devices shares one process and one loop. Only the
blocking part of a connect — DNS, TCP connect, TLS handshake — runs in a small shared worker
pool, so a slow or unreachable broker never stalls inference on the loop.

``publish`` returns when the broker's PUBACK arrives (pending futures keyed by message id,
always removed); a disconnect fails every pending publish with TransportError so callers
resend. A background task reconnects with jittered, capped exponential backoff and
resubscribes every registered topic on every connect.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import random
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from runtime import mqttcompat
from runtime.errors import ConfigError, TransportError
from runtime.mqttcompat import MqttProtocol, TlsFiles, Will

__all__ = ["AsyncMqttClient", "Backoff", "MqttMessage", "parse_broker_url"]

logger = logging.getLogger(__name__)

_MISC_INTERVAL = 1.0  # seconds between loop_misc calls (keepalive pings, dead-peer detection)
_connect_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """Workers for blocking connects, shared by every client in the process (not one per client)."""
    global _connect_pool
    with _pool_lock:
        if _connect_pool is None:
            _connect_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="mqtt-connect")
        return _connect_pool


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` → ``(host, port, tls)``."""
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
    """Jittered exponential backoff: ``minimum * 2^n`` capped at ``maximum``, each wait drawn from [d/2, d]."""

    minimum: float = 0.5
    maximum: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.maximum:
            raise ConfigError(f"backoff needs 0 < min <= max, got {self.minimum} and {self.maximum}", "broker.backoff")

    def next(self) -> float:
        d = min(self.maximum, self.minimum * (2 ** min(self.attempt, 62)))
        self.attempt += 1
        return d / 2 + self.rng.random() * d / 2

    def reset(self) -> None:
        self.attempt = 0


class MqttMessage:
    """A received message. With ``manual_ack``, call :meth:`ack` once it is safely processed."""

    __slots__ = ("_ack", "_raw", "mid", "payload", "qos", "retain", "topic")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        mid: int = 0,
        *,
        raw: mqtt.MQTTMessage | None = None,
        ack: Callable[[], None] | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.mid = mid
        self._raw = raw
        self._ack = ack

    @property
    def user_properties(self) -> dict[str, str]:
        """MQTT 5 user properties ({} under 3.1.1)."""
        return mqttcompat.user_properties(self._raw) if self._raw is not None else {}

    @property
    def properties(self) -> dict[str, Any]:
        """Every MQTT 5 property by name (``ContentType``, ``UserProperty``, ...); {} under 3.1.1."""
        p = getattr(self._raw, "properties", None)
        return dict(p.json()) if p is not None else {}

    @property
    def needs_ack(self) -> bool:
        return self._ack is not None

    def ack(self) -> None:
        """Acknowledge a manual-ack message to the broker (once; a no-op for other messages).

        When the link dropped since the message arrived the ack is not sent: the broker
        redelivers the message in the resumed session, and acknowledging its old id on the
        new connection would acknowledge a different message.
        """
        if self._ack is not None:
            ack, self._ack = self._ack, None
            ack()

    def __repr__(self) -> str:
        return f"MqttMessage({self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, retain={self.retain})"


class AsyncMqttClient:
    """One MQTT connection, kept up in the background. Use from one event loop only.

    ``on_message(msg)`` and ``on_connection(up)`` are called on the loop; both may be replaced
    before :meth:`start`. ``sleep`` and ``rng`` are there so tests control time and jitter.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        protocol: MqttProtocol = "5",
        clean_start: bool = False,
        session_expiry: int = 3600,
        keepalive: int = 30,
        tls: TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
        manual_ack: bool = False,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        will: Will | None = None,
        max_inflight: int = 20,
        connect_timeout: float = 10.0,
        stable_after: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.host, self.port, use_tls = parse_broker_url(url)
        if use_tls and tls is None:
            tls = TlsFiles()  # the system's CA store
        if tls is not None and not use_tls:
            raise ConfigError(f"TLS files given but {url!r} is not mqtts://", "broker.url")
        if not 0 <= session_expiry < 2**32:
            raise ConfigError("session expiry must be 0..2^32-1 seconds", "broker.session_expiry")
        if not 0 < keepalive <= 65535:
            raise ConfigError("keepalive must be 1..65535 seconds", "broker.keepalive")
        self.url = url
        self.client_id = client_id or f"edgeloop-{uuid.uuid4().hex[:12]}"
        self.protocol: MqttProtocol = protocol
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        #: Messages wait for MqttMessage.ack() (paho 2.x only; 1.6.1 acknowledges on arrival)
        self.manual_ack = manual_ack and mqttcompat.supports_manual_ack()
        self.connect_timeout = connect_timeout
        self.stable_after = stable_after
        self.backoff = Backoff(backoff_min, backoff_max, rng or random.Random())
        self._paho = mqttcompat.make_client(
            self.client_id,
            protocol=protocol,
            clean_start=clean_start,
            manual_ack=manual_ack,  # warns once under paho 1.6.1, which has none
            tls=tls,
            username=username,
            password=password,
            max_inflight=max_inflight,
            will=will,
            connect_timeout=connect_timeout,
        )
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
        self._sleep = sleep
        #: topic filter → QoS, (re)subscribed on every connect.
        self.subscriptions: dict[str, int] = {}
        self.on_message: Callable[[MqttMessage], None] = lambda m: None
        self.on_connection: Callable[[bool], None] = lambda up: None
        #: Why the last connect attempt failed (None after a success).
        self.last_error: str | None = None
        #: Successful connects so far; ``session_present`` of the latest.
        self.connects = 0
        self.session_present = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._pending: dict[int, tuple[asyncio.Future[None], float]] = {}  # mid → (future, deadline)
        self._sub_pending: dict[int, asyncio.Future[list[str]]] = {}
        self._sub_topics: dict[int, list[str]] = {}
        self._connack: asyncio.Future[tuple[bool, str, bool]] | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._task: asyncio.Task[None] | None = None
        self._connect_job: concurrent.futures.Future[None] | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._fd = -1
        self._generation = 0
        self._running = False

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True from the SUBACK of the (re)subscription after a CONNACK until the link drops."""
        return self._connected.is_set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Register a subscription; made now if connected, and again on every connect."""
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS must be 0, 1 or 2, not {qos!r}")
        self.subscriptions[topic] = qos
        if self.connected:
            try:
                mid = mqttcompat.subscribe_many(self._paho, [(topic, qos)], self.protocol)
            except (TransportError, ValueError) as exc:
                logger.warning("%s: subscribe %s failed: %s (retried on the next connect)", self.client_id, topic, exc)
                return
            self._sub_topics[mid] = [topic]

    def unsubscribe(self, topic: str) -> None:
        if self.subscriptions.pop(topic, None) is not None and self.connected:
            self._paho.unsubscribe(topic)

    async def start(self) -> None:
        """Begin connecting in the background (forever, with backoff); return at once."""
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._running = True
        self._task = asyncio.create_task(self._connection_loop(), name=f"mqtt:{self.client_id}")
        self._misc = self._loop.call_later(_MISC_INTERVAL, self._tick)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected; TransportError (with the last connect error) after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            why = f": {self.last_error}" if self.last_error else ""
            raise TransportError(f"not connected to {self.url} within {timeout:g} s{why}") from None

    async def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker keeps the session, sends no will) and stop reconnecting."""
        if self._task is None:
            return
        self._running = False
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        job = self._connect_job
        if job is not None and not job.done():  # a connect still in the worker: let it finish first
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(job), self.connect_timeout + 1)
            if not job.done():  # a loaded machine: close whatever socket it opens when it is done
                job.add_done_callback(lambda _f: mqttcompat.close_socket(self._paho))
        if self.connected:
            self._paho.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._disconnected.wait()
        mqttcompat.close_socket(self._paho)
        if self.connected:  # DISCONNECT not written in time: the socket is closed all the same
            self._on_disconnect("closed")
        self._disconnected.set()
        self._fail_pending("client closed")
        logger.debug("%s: closed", self.client_id)

    async def stop(self, timeout: float = 5.0) -> None:
        """Same as :meth:`close`."""
        await self.close(timeout)

    async def __aenter__(self) -> AsyncMqttClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 30.0
    ) -> None:
        """Publish; for QoS 1 and 2 return when the broker acknowledged it.

        Raises TransportError when not connected, when the link drops before the
        acknowledgement, after ``timeout`` (to within a second), or when an MQTT 5 broker
        refuses the message (PUBACK reason code >= 0x80).
        """
        if not self.connected:
            raise TransportError(f"not connected to {self.url}")
        try:
            info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:  # bad topic (wildcards, empty), payload too large, bad QoS
            raise TransportError(f"cannot publish to {topic!r}: {exc}") from exc
        mqttcompat.check_rc(info.rc, f"publish to {topic}")
        if qos == 0:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        # Deadlines are swept once a second by _tick: a timer per publish cost 30% of throughput.
        self._pending[info.mid] = (fut, self._loop.time() + timeout)
        try:
            await fut
        except TimeoutError:
            raise TransportError(f"no acknowledgement for {topic} within {timeout:g} s") from None
        finally:
            self._pending.pop(info.mid, None)

    # ------------------------------------------------------------------ connection loop

    async def _connection_loop(self) -> None:
        assert self._loop is not None
        failures = 0
        while self._running:
            try:
                await self._connect_once()
            except TransportError as exc:
                self.last_error = str(exc)
                failures += 1
                delay = self.backoff.next()
                log = logger.warning if failures == 1 else logger.info
                log("%s: %s (attempt %d); retrying in %.2f s", self.client_id, exc, failures, delay)
                await self._sleep(delay)
                continue
            failures = 0
            up_at = self._loop.time()
            await self._disconnected.wait()
            if not self._running:
                return
            # A connection that dies at once (a duplicate client id, a broker that kicks us) must
            # not reset the backoff, or two clients would take the session from each other forever.
            if self._loop.time() - up_at >= self.stable_after:
                self.backoff.reset()
            delay = self.backoff.next()
            logger.info("%s: reconnecting to %s in %.2f s", self.client_id, self.url, delay)
            await self._sleep(delay)

    async def _connect_once(self) -> None:
        assert self._loop is not None
        mqttcompat.close_socket(self._paho)  # leftovers close here, on the loop, not in the worker
        self._disconnected.clear()
        self._connack = self._loop.create_future()
        connect = functools.partial(
            mqttcompat.connect,
            self._paho,
            self.host,
            self.port,
            keepalive=self.keepalive,
            protocol=self.protocol,
            clean_start=self.clean_start,
            session_expiry=self.session_expiry,
        )
        try:
            self._connect_job = _pool().submit(connect)
            await asyncio.wrap_future(self._connect_job)
            async with asyncio.timeout(self.connect_timeout):
                ok, reason, session_present = await self._connack
            if not ok:
                raise TransportError(f"{self.url} refused the connection: {reason}")
            await self._resubscribe()
        except TimeoutError:
            self._abandon_connection()
            raise TransportError(f"no answer from {self.url} within {self.connect_timeout:g} s") from None
        except TransportError:
            self._abandon_connection()
            raise
        finally:
            self._connect_job = None
            self._connack = None
        if self.connects and not session_present and not self.clean_start:
            logger.info("%s: %s kept no session for us; anything queued while away is gone", self.client_id, self.url)
        self.connects += 1
        self.session_present = session_present
        self.last_error = None
        self._connected.set()
        logger.info(
            "%s: connected to %s (MQTT %s, session %s)",
            self.client_id,
            self.url,
            self.protocol,
            "resumed" if session_present else "new",
        )
        self._notify(True)

    async def _resubscribe(self) -> None:
        subs = list(self.subscriptions.items())
        if not subs:
            return
        assert self._loop is not None
        mid = mqttcompat.subscribe_many(self._paho, subs, self.protocol)
        fut: asyncio.Future[list[str]] = self._loop.create_future()
        self._sub_pending[mid] = fut
        self._sub_topics[mid] = [t for t, _ in subs]
        try:
            async with asyncio.timeout(self.connect_timeout):
                await fut
        finally:
            self._sub_pending.pop(mid, None)

    def _abandon_connection(self) -> None:
        mqttcompat.close_socket(self._paho)
        self._disconnected.set()

    def _tick(self) -> None:
        if self._connect_job is None and self._fd >= 0:
            self._paho.loop_misc()
        if self._pending and self._loop is not None:
            now = self._loop.time()
            for fut, deadline in list(self._pending.values()):
                if deadline <= now and not fut.done():
                    fut.set_exception(TimeoutError())
        if self._running and self._loop is not None:
            self._misc = self._loop.call_later(_MISC_INTERVAL, self._tick)

    def _notify(self, up: bool) -> None:
        try:
            self.on_connection(up)
        except Exception:  # a handler bug must not break the connection loop
            logger.exception("%s: connection handler failed", self.client_id)

    # ------------------------------------------------------------------ paho callbacks (on the loop)

    def _on_connect(self, ok: bool, reason: str, session_present: bool) -> None:
        if ok:  # a resumed session redelivers at once, before our SUBACK: acks count from here
            self._generation += 1
        fut = self._connack
        if fut is not None and not fut.done():
            fut.set_result((ok, reason, session_present))

    def _on_disconnect(self, reason: str) -> None:
        was = self.connected
        self._connected.clear()
        self._generation += 1  # acks of messages from the lost connection are void
        dropped = mqttcompat.drop_unacknowledged(self._paho)
        self._fail_pending(f"connection to {self.url} lost ({reason})")
        self._disconnected.set()
        if dropped:
            logger.debug("%s: %d unacknowledged messages failed back to their senders", self.client_id, dropped)
        if was:
            (logger.info if not self._running else logger.warning)(
                "%s: disconnected from %s: %s", self.client_id, self.url, reason
            )
            self._notify(False)

    def _on_publish(self, mid: int, ok: bool, reason: str) -> None:
        entry = self._pending.get(mid)
        if entry is None or entry[0].done():
            return
        fut = entry[0]
        if ok:
            fut.set_result(None)
        else:
            fut.set_exception(TransportError(f"the broker refused the message: {reason}"))

    def _on_subscribe(self, mid: int, refused: list[str]) -> None:
        topics = self._sub_topics.pop(mid, [])
        if refused:
            logger.warning("%s: subscription to %s refused: %s", self.client_id, ", ".join(topics), ", ".join(refused))
        fut = self._sub_pending.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(refused)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        ack: Callable[[], None] | None = None
        if self.manual_ack and msg.qos > 0:
            ack = functools.partial(self._ack, msg.mid, msg.qos, self._generation)
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        m = MqttMessage(msg.topic, payload, msg.qos, bool(msg.retain), msg.mid, raw=msg, ack=ack)
        try:
            self.on_message(m)
        except Exception:  # a handler bug must not kill the connection
            logger.exception("%s: message handler failed on %s", self.client_id, msg.topic)

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        if generation != self._generation:
            logger.debug(
                "%s: ack of message %d skipped: the link dropped since; it will be redelivered", self.client_id, mid
            )
            return
        rc = self._paho.ack(mid, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            logger.debug("%s: ack of message %d not sent: %s", self.client_id, mid, mqttcompat.error_string(rc))

    def _fail_pending(self, why: str) -> None:
        for fut, _ in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(TransportError(why))
        for sub in list(self._sub_pending.values()):
            if not sub.done():
                sub.set_exception(TransportError(why))
        c = self._connack
        if c is not None and not c.done():
            c.set_exception(TransportError(why))

    # ------------------------------------------------------------------ socket hooks

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the loop: now when paho calls from it, soon when from a connect worker."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        elif self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        self._call(self._attach, sock)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        # Always called on the loop (connects close leftovers before handing over to a worker).
        self._detach()

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._call(self._want_write, sock)

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._call(self._no_write, sock)

    def _attach(self, sock: Any) -> None:
        fd: int = sock.fileno()
        if self._loop is None or fd < 0 or self._paho.socket() is not sock:
            return  # closed before the loop got to it
        self._detach()
        self._fd = fd
        self._loop.add_reader(fd, self._read)

    def _detach(self) -> None:
        if self._fd < 0 or self._loop is None:
            return
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._fd = -1

    def _want_write(self, sock: Any) -> None:
        if self._loop is not None and self._fd >= 0 and self._paho.socket() is sock:
            self._loop.add_writer(self._fd, self._write)

    def _no_write(self, sock: Any) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_writer(self._fd)

    def _read(self) -> None:
        self._paho.loop_read()  # a lost connection calls on_socket_close and on_disconnect itself

    def _write(self) -> None:
        self._paho.loop_write()
