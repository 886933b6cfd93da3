"""The one place that knows paho-mqtt 1.6.1 from 2.x; paho's return codes become our errors here.

azure-iot-device pins ``paho-mqtt<2``, so both must work. :func:`make_client` builds a client
for either, :func:`bind` installs callbacks with one normalised signature each, :func:`connect`
turns socket, TLS and paho failures into :class:`runtime.errors.TransportError`, and nothing
else branches on the version.

Callback API: paho 2.x runs with ``CallbackAPIVersion.VERSION2``. It is the only one whose
``on_publish`` carries the PUBACK reason code, which is how an MQTT 5 broker refuses a message
it has taken (0x87 not authorized, 0x97 quota exceeded) — VERSION1 would report that refusal
as a success. Its cost is small: paho 2.2 decodes every PUBACK into a reason-code object
whichever version is chosen. Measured here (10,000 QoS 1 publishes through AsyncMqttClient
against the local Mosquitto, median of 7 interleaved runs, 2 busy cores): MQTT 5 6,717 msg/s
with VERSION2 vs 6,716 with VERSION1; MQTT 3.1.1 6,456 vs 7,482. Results travel in batches of
thousands of rows, so the few callbacks a second matter less than either.

paho 1.6.1 has no ``manual_ack`` (readings from the local topic become at-most-once; logged once)
and no PUBACK reason code in ``on_publish``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt as _paho
import paho.mqtt.client as mqtt

from runtime.errors import ConfigError, TransportError

__all__ = [
    "PAHO_2",
    "PAHO_VERSION",
    "Callbacks",
    "MqttProtocol",
    "TlsFiles",
    "Will",
    "bind",
    "check_rc",
    "connect",
    "drop_unacknowledged",
    "error_string",
    "make_client",
    "close_socket",
    "subscribe_many",
    "supports_manual_ack",
    "user_properties",
]

logger = logging.getLogger(__name__)

PAHO_VERSION: str = str(getattr(_paho, "__version__", "1.6.1"))
PAHO_2: bool = hasattr(mqtt, "CallbackAPIVersion")
MqttProtocol = Literal["3.1.1", "5"]
_warned_manual_ack = False


def supports_manual_ack() -> bool:
    """paho 2.x can hold a message's acknowledgement until the application calls ``ack``."""
    return PAHO_2


@dataclass(frozen=True)
class TlsFiles:
    """TLS material: ``ca`` verifies the broker (system store when None); ``cert``/``key`` for mutual TLS.

    ``insecure`` turns off host name checking (never the default; logged loudly when used).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False

    def context(self) -> ssl.SSLContext:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert and key go together (mutual TLS)", "broker.cert")
        for name, path in (("broker.ca", self.ca), ("broker.cert", self.cert), ("broker.key", self.key)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{path} does not exist or is not a file", name)
        ctx = _TrackingContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
        try:
            if self.ca is not None:
                ctx.load_verify_locations(cafile=str(self.ca))
            else:
                ctx.load_default_certs()
            if self.cert is not None:
                ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load TLS files: {exc}", "broker.tls") from exc
        if self.insecure:
            logger.warning("TLS host name checking is OFF (tls insecure): the broker's identity is not verified")
            ctx.check_hostname = False
        return ctx


class _TrackingContext(ssl.SSLContext):
    """Remembers the socket it wrapped last: paho leaves it open when the handshake fails."""

    last: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.last = sock
        return sock

    def close_orphan(self, current: Any) -> None:
        sock, self.last = self.last, None
        if sock is not None and sock is not current:
            sock.close()


@dataclass(frozen=True)
class Will:
    """A last will: published by the broker when the client vanishes without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def make_client(
    client_id: str,
    *,
    protocol: MqttProtocol = "5",
    clean_start: bool = False,
    manual_ack: bool = False,
    tls: TlsFiles | None = None,
    username: str | None = None,
    password: str | None = None,
    max_inflight: int = 20,
    will: Will | None = None,
    connect_timeout: float = 10.0,
) -> mqtt.Client:
    """A paho client for MQTT 5 or 3.1.1; ``manual_ack`` only where paho has it (2.x)."""
    global _warned_manual_ack
    if protocol not in ("3.1.1", "5"):
        raise ConfigError(f"unknown MQTT protocol {protocol!r} (use '3.1.1' or '5')", "broker.protocol")
    if not client_id:
        raise ConfigError("a persistent session needs a client id", "broker.client_id")
    if max_inflight < 0:
        raise ConfigError("max_inflight must be >= 0 (0 = unlimited)", "broker.max_inflight")
    proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    kwargs: dict[str, Any] = {"client_id": client_id, "protocol": proto, "reconnect_on_failure": False}
    if proto == mqtt.MQTTv311:
        kwargs["clean_session"] = clean_start  # MQTT 5 takes clean_start at connect()
    if PAHO_2:
        kwargs["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION2
        kwargs["manual_ack"] = manual_ack
    elif manual_ack and not _warned_manual_ack:
        _warned_manual_ack = True
        logger.warning(
            "paho-mqtt %s has no manual acknowledgement: readings from the local topic are at-most-once "
            "(install paho-mqtt>=2 for at-least-once)",
            PAHO_VERSION,
        )
    client = mqtt.Client(**kwargs)
    # paho scans its whole in-flight list on every PUBACK: 20 (its default) or 0 (unlimited) are
    # fast, 1000 measured 2-3x slower.
    client.max_inflight_messages_set(max_inflight)
    if PAHO_2:
        client.connect_timeout = connect_timeout
    else:
        client._connect_timeout = connect_timeout  # 1.6.1 has no setter; the attribute is what it reads
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls.context())
    if will is not None:
        try:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        except ValueError as exc:
            raise ConfigError(f"bad last will: {exc}", "will") from exc
    return client


def connect(
    client: mqtt.Client,
    host: str,
    port: int,
    *,
    keepalive: int,
    protocol: MqttProtocol,
    clean_start: bool,
    session_expiry: int,
) -> None:
    """Open the socket, TLS handshake, send CONNECT (blocking: run it off the event loop).

    MQTT 5 sends a Session Expiry Interval — without one the broker ends the session at
    disconnect — and ``clean_start`` on every connect, not paho's default of the first only.
    """
    kwargs: dict[str, Any] = {"keepalive": keepalive}
    if protocol == "5":
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        kwargs["clean_start"] = clean_start
        kwargs["properties"] = props
    try:
        rc = client.connect(host, port, **kwargs)
    except (OSError, ValueError) as exc:  # ssl.SSLError and socket errors are OSErrors
        ctx = getattr(client, "_ssl_context", None)
        if isinstance(ctx, _TrackingContext):
            ctx.close_orphan(client.socket())
        raise _connect_error(exc, host, port) from exc
    check_rc(rc, f"connect to {host}:{port}")


def _connect_error(exc: OSError | ValueError, host: str, port: int) -> TransportError:
    at = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransportError(f"TLS: cannot verify {at}: {exc.verify_message or exc}")
    if isinstance(exc, ssl.SSLError):
        return TransportError(f"TLS handshake with {at} failed: {exc.reason or exc}")
    if isinstance(exc, ssl.CertificateError):  # host name mismatch where paho checks it itself
        return TransportError(f"TLS: {at}: {exc}")
    if isinstance(exc, TimeoutError):
        return TransportError(f"cannot reach {at}: timed out")
    if isinstance(exc, OSError):
        return TransportError(f"cannot reach {at}: {exc.strerror or exc}")
    return TransportError(f"cannot connect to {at}: {exc}")


def subscribe_many(client: mqtt.Client, subs: list[tuple[str, int]], protocol: MqttProtocol) -> int:
    """One SUBSCRIBE for all ``(topic, qos)``; returns its message id."""
    if protocol == "5":
        from paho.mqtt.subscribeoptions import SubscribeOptions

        rc, mid = client.subscribe([(t, SubscribeOptions(qos=q)) for t, q in subs])
    else:
        rc, mid = client.subscribe(subs)
    check_rc(rc, "subscribe")
    if mid is None:
        raise TransportError("subscribe failed: no message id")
    return int(mid)


def close_socket(client: mqtt.Client) -> None:
    """Close paho's socket now, on the calling thread (``on_socket_close`` runs first).

    paho has no public call for this (``disconnect`` waits for the DISCONNECT to be written);
    ``_reset_sockets`` is the same in 1.6.1 and 2.x.
    """
    client._reset_sockets()


def drop_unacknowledged(client: mqtt.Client) -> int:
    """Forget the outgoing messages paho would resend after a reconnect; return how many.

    Their callers were told the link dropped and resend them themselves — two resends would
    double the traffic after every outage and queue new messages behind stale ones.
    """
    with client._out_message_mutex:
        n = len(client._out_messages)
        client._out_messages.clear()
        client._inflight_messages = 0
    return n


def error_string(rc: int) -> str:
    return str(mqtt.error_string(rc))


def check_rc(rc: int, what: str) -> None:
    if rc != mqtt.MQTT_ERR_SUCCESS:
        raise TransportError(f"{what} failed: {error_string(rc)}")


def user_properties(msg: mqtt.MQTTMessage) -> dict[str, str]:
    """MQTT 5 user properties of a received message ({} under 3.1.1)."""
    p = getattr(msg, "properties", None)
    pairs = getattr(p, "UserProperty", None) if p is not None else None
    return {str(k): str(v) for k, v in pairs} if pairs else {}


# --------------------------------------------------------------------------- callbacks


@dataclass(frozen=True)
class Callbacks:
    """Normalised callbacks; paho calls them on the thread that runs its loop (our event loop)."""

    on_connect: Callable[[bool, str, bool], None]  # ok, reason, session_present
    on_disconnect: Callable[[str], None]  # reason
    on_publish: Callable[[int, bool, str], None]  # mid, ok, reason
    on_subscribe: Callable[[int, list[str]], None]  # mid, refusals ([] = all granted)
    on_message: Callable[[mqtt.MQTTMessage], None]


def bind(client: mqtt.Client, cb: Callbacks) -> None:
    """Install ``cb`` on ``client`` with the callback signatures of the installed paho."""
    (_bind_v2 if PAHO_2 else _bind_v1)(client, cb)
    on_message = cb.on_message
    client.on_message = lambda c, ud, msg: on_message(msg)


def _is_failure(rc: Any) -> bool:
    """A reason code (2.x ReasonCode, 1.6.1 ReasonCodes) or a granted QoS of 128 means refusal."""
    return int(getattr(rc, "value", rc)) >= 0x80


def _bind_v2(client: mqtt.Client, cb: Callbacks) -> None:
    def on_connect(c: Any, ud: Any, flags: Any, rc: Any, props: Any = None) -> None:
        cb.on_connect(not rc.is_failure, str(rc), bool(flags.session_present))

    def on_disconnect(c: Any, ud: Any, flags: Any, rc: Any, props: Any = None) -> None:
        text = str(rc)
        if getattr(flags, "is_disconnect_packet_from_server", False):
            text = f"the broker closed the session: {text}"
        elif text == "Unspecified error":  # paho's name for a lost socket
            text = "connection lost"
        elif text == "Success":
            text = "disconnected"
        cb.on_disconnect(text)

    def on_publish(c: Any, ud: Any, mid: int, rc: Any, props: Any = None) -> None:
        cb.on_publish(mid, not rc.is_failure, str(rc))

    def on_subscribe(c: Any, ud: Any, mid: int, rcs: Any, props: Any = None) -> None:
        cb.on_subscribe(mid, [str(r) for r in rcs if _is_failure(r)])

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe


def _bind_v1(client: mqtt.Client, cb: Callbacks) -> None:
    """paho 1.6.1 signatures (also paho 2.x's VERSION1); MQTT 5 adds a properties argument."""

    def on_connect(c: Any, ud: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if isinstance(rc, int):  # MQTT 3.1.1: a CONNACK return code
            ok, text = rc == 0, str(mqtt.connack_string(rc))
        else:  # MQTT 5: a reason code object
            ok, text = not _is_failure(rc), str(rc)
        cb.on_connect(ok, text, bool((flags or {}).get("session present", 0)))

    def on_disconnect(c: Any, ud: Any, rc: Any, props: Any = None) -> None:
        if isinstance(rc, int):  # paho's own error code (lost socket, keepalive, our disconnect)
            text = "disconnected" if rc == 0 else error_string(rc)
        else:  # MQTT 5 DISCONNECT from the broker
            text = f"the broker closed the session: {rc}"
        cb.on_disconnect(text)

    def on_publish(c: Any, ud: Any, mid: int) -> None:
        cb.on_publish(mid, True, "Success")  # 1.6.1 does not pass the PUBACK reason code

    def on_subscribe(c: Any, ud: Any, mid: int, granted: Any, props: Any = None) -> None:
        cb.on_subscribe(mid, [str(g) for g in granted if _is_failure(g)])

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe
