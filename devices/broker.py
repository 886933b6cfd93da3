"""Find or start an MQTT broker for the demo: the one that answers, a private mosquitto, or amqtt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["BrokerHandle", "answers", "ensure_broker", "free_port"]

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections at the broker URL's host and port."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class BrokerHandle:
    url: str
    kind: str  # "existing", "mosquitto", "amqtt"
    protocol: str = "5"
    _proc: subprocess.Popen[bytes] | None = None
    _amqtt: Any = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    async def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._amqtt is not None:
            with contextlib.suppress(Exception):
                await self._amqtt.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()


async def _wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if answers(f"mqtt://127.0.0.1:{port}", timeout=0.2):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"broker did not start listening on 127.0.0.1:{port} within {timeout:g} s")


async def ensure_broker(url: str = "mqtt://127.0.0.1:1883") -> BrokerHandle:
    """Use the broker at ``url`` if it answers; else a private mosquitto on a free loopback port when
    the binary is on PATH; else the embedded amqtt broker (MQTT 3.1.1 only; a demo default)."""
    if answers(url):
        return BrokerHandle(url, "existing")
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    port = free_port()
    if binary:
        tmp = tempfile.TemporaryDirectory(prefix="edgeloop-broker-")
        conf = Path(tmp.name) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\nmax_inflight_messages 0\n"
        )
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await _wait_port(port)
        except RuntimeError:
            proc.kill()
            tmp.cleanup()
            raise
        logger.info("started a private mosquitto on 127.0.0.1:%d", port)
        return BrokerHandle(f"mqtt://127.0.0.1:{port}", "mosquitto", _proc=proc, _tmp=tmp)
    try:
        from amqtt.broker import Broker
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            f"no broker answers at {url}, mosquitto is not installed, and amqtt is missing "
            "(apt-get install mosquitto, or pip install 'edgeloop[cloud]')"
        ) from exc
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 0}},
        "sys_interval": 0,
        "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
        "topic-check": {"enabled": False},
    }
    broker = Broker(config)
    await broker.start()
    await _wait_port(port)
    logger.info("started the embedded amqtt broker on 127.0.0.1:%d (MQTT 3.1.1)", port)
    return BrokerHandle(f"mqtt://127.0.0.1:{port}", "amqtt", protocol="3.1.1", _amqtt=broker)
