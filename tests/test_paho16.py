"""The MQTT layer under paho-mqtt 1.6.1 (what azure-iot-device pins), in a subprocess.

paho 1.6.1 is installed once with ``pip install --target`` into a cache folder and put first on
PYTHONPATH, so the child runs our code with this interpreter's other packages and the old paho.
Without the registry it falls back to .venv-azure (``make venv-azure``), else skips (fails under CI=true).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from brokers import Broker, BrokerTls, Pki, require_service

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeloop-test" / "paho16"
AZURE_PY = REPO / ".venv-azure" / "bin" / "python"


def _install() -> str | None:
    """The cache folder with paho 1.6.1 in it (installed now if missing), or None when pip cannot."""
    if (CACHE / "paho" / "mqtt" / "client.py").exists():
        return str(CACHE)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = CACHE.parent / f"paho16.{os.getpid()}.tmp"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--target", str(tmp), "paho-mqtt==1.6.1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if out.returncode != 0:
        return None
    try:
        tmp.rename(CACHE)
    except OSError:  # another session got there first
        pass
    return str(CACHE)


@pytest.fixture(scope="module")
def paho16() -> tuple[str, dict[str, str]]:
    """(python, environment) that runs the repository's code on paho-mqtt 1.6.1."""
    target = _install()
    if target is not None:
        return sys.executable, {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{REPO}"}
    require_service(
        AZURE_PY.exists(),
        "cannot pip install paho-mqtt==1.6.1 (no package registry?) and no .venv-azure (make venv-azure)",
    )
    return str(AZURE_PY), {**os.environ, "PYTHONPATH": str(REPO)}


SCRIPT = r"""
import asyncio, logging, sys
import paho.mqtt as p
assert p.__version__.startswith("1.6"), p.__version__
from runtime import mqttcompat
from runtime.errors import TransportError
from runtime.mqttclient import AsyncMqttClient
from runtime.mqttcompat import TlsFiles

assert not mqttcompat.PAHO_2 and not mqttcompat.supports_manual_ack()
warned = []
logging.getLogger("runtime.mqttcompat").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: warned.append(r.getMessage())})())

url, tls_url, ca, cert, key, tag = sys.argv[1:7]
FAST = dict(backoff_min=0.05, backoff_max=0.2)

async def until(pred, what, timeout=20):
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)

async def round_trip(protocol, url, tls=None):
    topic = f"paho16/{tag}/{protocol}"
    got = []
    sub = AsyncMqttClient(url, client_id=f"s-{tag}-{protocol}", protocol=protocol, tls=tls, manual_ack=True, **FAST)
    assert not sub.manual_ack  # 1.6.1: at-most-once from the readings topic, said once in the log
    sub.on_message = lambda m: got.append(m)
    sub.subscribe(topic, 1)
    changes = []
    pub = AsyncMqttClient(url, client_id=f"p-{tag}-{protocol}", protocol=protocol, tls=tls, **FAST)
    pub.on_connection = changes.append
    async with sub, pub:
        await sub.wait_connected(10); await pub.wait_connected(10)
        await asyncio.gather(*(pub.publish(topic, b"%d" % i, qos=1) for i in range(200)))
        await until(lambda: len(got) >= 200, "200 messages")
    assert sorted(int(m.payload) for m in got) == list(range(200)), len(got)
    assert not any(m.needs_ack for m in got)
    assert changes == [True, False], changes

async def broker_restart():
    # the parent kills the broker when told, and starts it again on the same port
    changes = []
    c = AsyncMqttClient(url, client_id=f"k-{tag}", **FAST)
    c.on_connection = changes.append
    c.subscribe(f"paho16/{tag}/k", 1)
    got = []
    c.on_message = lambda m: got.append(m.payload)
    async with c:
        await c.wait_connected(10)
        stream = [asyncio.create_task(c.publish(f"paho16/{tag}/s", b"x", qos=1)) for _ in range(5000)]
        await until(lambda: sum(t.done() for t in stream) >= 20, "first acks")
        print("kill", flush=True)
        results = await asyncio.gather(*stream, return_exceptions=True)
        failed = [r for r in results if r is not None]
        assert failed and all(isinstance(r, TransportError) for r in failed), set(map(type, failed))
        await until(lambda: changes == [True, False, True], "reconnect", 30)
        await c.publish(f"paho16/{tag}/k", b"after", qos=1)
        await until(lambda: got == [b"after"], "resubscribed")

async def main():
    await round_trip("5", url)
    await round_trip("3.1.1", url)
    await round_trip("5", tls_url, TlsFiles(ca, cert, key))  # mutual TLS
    assert sum("no manual acknowledgement" in w for w in warned) == 1, warned
    await broker_restart()
    print("ok", p.__version__, flush=True)

asyncio.run(main())
"""


def test_mqtt_client_under_paho_1_6(
    paho16: tuple[str, dict[str, str]], make_broker: Callable[..., Broker], pki: Pki, unique_id: str
) -> None:
    python, env = paho16
    plain = make_broker()
    tls = make_broker(tls=BrokerTls.from_pki(pki, require_certificate=True))
    cert, key = pki.client(f"dev-{unique_id}")
    args = [plain.url, tls.url, str(pki.ca), str(cert), str(key), unique_id]
    with subprocess.Popen(
        [python, "-W", "error", "-c", SCRIPT, *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as p:  # fmt: skip
        assert p.stdout is not None and p.stderr is not None
        line = p.stdout.readline()
        if line == "kill\n":
            plain.kill()
            plain.start()
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
    assert line == "kill\n", err[-3000:]
    assert p.returncode == 0, err[-3000:]
    assert out.startswith("ok 1.6"), (out, err[-2000:])
