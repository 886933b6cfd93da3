"""The one place that knows paho-mqtt 1.6.1 from 2.x.

azure-iot-device pins ``paho-mqtt<2``; paho 2.0 requires ``callback_api_version`` and 2.1+ warns
without one. :func:`make_client` builds a client for either and :func:`bind` installs callbacks
with one normalised signature each, so nothing else branches on the version. paho's integer
return codes become :class:`runtime.errors.TransportError` here.

Version-2 callbacks build a reason-code object per call (about 22 µs each, measured); results
travel in batches of thousands of rows, so the few callbacks a second do not matter.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt as _paho
import paho.mqtt.client as mqtt

from runtime.errors import TransportError

__all__ = [
    "PAHO_2",
    "Callbacks",
    "TlsFiles",
    "bind",
    "check_rc",
    "connect_properties",
    "make_client",
    "supports_manual_ack",
]

logger = logging.getLogger(__name__)

PAHO_VERSION: str = getattr(_paho, "__version__", "1.6.1")
PAHO_2 = hasattr(mqtt, "CallbackAPIVersion")
_warned_manual_ack = False


def supports_manual_ack() -> bool:
    return PAHO_2


@dataclass(frozen=True)
class TlsFiles:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


def make_client(
    client_id: str,
    *,
    protocol: str = "5",
    clean_start: bool = False,
    manual_ack: bool = False,
    tls: TlsFiles | None = None,
    username: str | None = None,
    password: str | None = None,
    max_inflight: int = 20,
) -> mqtt.Client:
    """A paho client for MQTT 5 or 3.1.1; ``manual_ack`` only where paho has it (2.x)."""
    global _warned_manual_ack
    proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    kwargs: dict[str, Any] = {"client_id": client_id, "protocol": proto}
    if proto == mqtt.MQTTv311:
        kwargs["clean_session"] = clean_start
    if PAHO_2:
        kwargs["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION2
        if manual_ack:
            kwargs["manual_ack"] = True
    elif manual_ack and not _warned_manual_ack:
        _warned_manual_ack = True
        logger.warning(
            "paho-mqtt %s has no manual acknowledgement: readings from the local topic are at-most-once "
            "(install paho-mqtt>=2 for at-least-once)",
            PAHO_VERSION,
        )
    client = mqtt.Client(**kwargs)
    client.max_inflight_messages_set(max_inflight)
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
        if tls.cert is not None:
            ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
        client.tls_set_context(ctx)
    return client


def connect_properties(protocol: str, session_expiry: int) -> Any:
    """CONNECT properties: a Session Expiry Interval, without which an MQTT 5 session ends at disconnect."""
    if protocol != "5":
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    return props


def check_rc(rc: int, what: str) -> None:
    if rc != mqtt.MQTT_ERR_SUCCESS:
        raise TransportError(f"{what} failed: {mqtt.error_string(rc)}")


def _reason(rc: Any) -> tuple[bool, str]:
    """(failed, text) for a paho reason code object or an int."""
    if rc is None:
        return False, "success"
    if hasattr(rc, "is_failure"):
        return bool(rc.is_failure), str(rc)
    if isinstance(rc, int):
        return rc != 0, mqtt.connack_string(rc) if rc else "success"
    return False, str(rc)


@dataclass
class Callbacks:
    """Normalised callbacks (all called on the thread that runs paho's loop)."""

    on_connect: Callable[[bool, str, bool], None]  # ok, reason, session_present
    on_disconnect: Callable[[str], None]
    on_publish: Callable[[int, bool, str], None]  # mid, ok, reason
    on_subscribe: Callable[[int, bool, str], None]
    on_message: Callable[[mqtt.MQTTMessage], None]


def bind(client: mqtt.Client, cb: Callbacks) -> None:
    """Install ``cb`` on ``client`` with the callback signatures of the installed paho."""
    (_bind_v2 if PAHO_2 else _bind_v1)(client, cb)
    client.on_message = lambda c, ud, msg: cb.on_message(msg)


def _bind_v2(client: mqtt.Client, cb: Callbacks) -> None:
    def on_connect(c: Any, ud: Any, flags: Any, rc: Any, props: Any = None) -> None:
        failed, text = _reason(rc)
        cb.on_connect(not failed, text, bool(getattr(flags, "session_present", False)))

    def on_disconnect(c: Any, ud: Any, flags: Any, rc: Any, props: Any = None) -> None:
        cb.on_disconnect(_reason(rc)[1])

    def on_publish(c: Any, ud: Any, mid: int, rc: Any, props: Any = None) -> None:
        failed, text = _reason(rc)
        cb.on_publish(mid, not failed, text)

    def on_subscribe(c: Any, ud: Any, mid: int, rcs: Any, props: Any = None) -> None:
        bad = [str(r) for r in (rcs or []) if getattr(r, "is_failure", False)]
        cb.on_subscribe(mid, not bad, ", ".join(bad) or "granted")

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe


def _bind_v1(client: mqtt.Client, cb: Callbacks) -> None:
    """paho 1.6.1: VERSION1 signatures; MQTT 5 adds a properties argument."""

    def on_connect(c: Any, ud: Any, flags: Any, rc: Any, props: Any = None) -> None:
        failed, text = _reason(rc)
        cb.on_connect(not failed, text, bool((flags or {}).get("session present", 0)))

    def on_disconnect(c: Any, ud: Any, rc: Any, props: Any = None) -> None:
        cb.on_disconnect(_reason(rc)[1] if rc else "disconnected")

    def on_publish(c: Any, ud: Any, mid: int) -> None:
        cb.on_publish(mid, True, "success")

    def on_subscribe(c: Any, ud: Any, mid: int, granted: Any, props: Any = None) -> None:
        bad = [str(g) for g in (granted or []) if (getattr(g, "is_failure", False) or g == 128)]
        cb.on_subscribe(mid, not bad, ", ".join(bad) or "granted")

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe
