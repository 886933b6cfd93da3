"""The MQTT layer under paho-mqtt 1.6.1 (what azure-iot-device pins), in the .venv-azure environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from brokers import require_service

REPO = Path(__file__).resolve().parent.parent
PY16 = REPO / ".venv-azure" / "bin" / "python"

SCRIPT = r"""
import asyncio, sys
import paho.mqtt as p
assert p.__version__.startswith("1."), p.__version__
from runtime import mqttcompat
from runtime.mqttclient import AsyncMqttClient
assert not mqttcompat.PAHO_2

async def main(url, topic):
    got = []
    sub = AsyncMqttClient(url, client_id=topic.replace("/", "-") + "-s", protocol="5")
    sub.on_message = lambda m: got.append(m.payload)
    sub.subscribe(topic, 1)
    await sub.start(); await asyncio.wait_for(sub.wait_connected(), 10)
    pub = AsyncMqttClient(url, client_id=topic.replace("/", "-") + "-p", protocol="3.1.1", manual_ack=True)
    await pub.start(); await asyncio.wait_for(pub.wait_connected(), 10)
    for i in range(200):
        await pub.publish(topic, b"%d" % i, qos=1)
    for _ in range(500):
        if len(got) == 200: break
        await asyncio.sleep(0.01)
    await pub.stop(); await sub.stop()
    assert sorted(int(x) for x in got) == list(range(200)), len(got)
    print("ok", p.__version__)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_mqtt_client_round_trip_under_paho_1_6(machine_broker, unique_id):
    require_service(PY16.exists(), "needs .venv-azure with paho-mqtt 1.6.1 (make venv-azure)")
    out = subprocess.run(
        [str(PY16), "-W", "error::DeprecationWarning", "-c", SCRIPT, machine_broker, f"paho16/{unique_id}"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok 1.6")
