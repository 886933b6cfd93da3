"""Send a command to one device over the broker and wait for its correlated result."""

from __future__ import annotations

import asyncio
import uuid

from cloud.errors import CloudError
from runtime.errors import ProtocolError
from runtime.mqttclient import AsyncMqttClient, MqttMessage
from runtime.protocol import CommandResult, decode, decode_command, topic

__all__ = ["send_command"]


async def send_command(
    broker: str, fleet: str, device: str, name: str, *, timeout: float = 15.0, rate: float | None = None
) -> CommandResult:
    """Publish ``cmd`` to ``device`` and return its ``cmd/result``; CloudError on timeout."""
    cid = f"cli-{uuid.uuid4().hex[:12]}"
    body: dict[str, object] = {"type": name, "id": cid}
    if name == "set_capture_rate":
        body["rate"] = rate
    import json

    payload = json.dumps(body).encode()
    decode_command(payload)  # validate before sending
    loop = asyncio.get_running_loop()
    done: asyncio.Future[CommandResult] = loop.create_future()

    def on_message(msg: MqttMessage) -> None:
        try:
            res = decode(CommandResult, msg.payload)
        except ProtocolError:
            return
        if res.id == cid and not done.done():
            done.set_result(res)

    client = AsyncMqttClient(broker, client_id=f"edgeloop-cli-{uuid.uuid4().hex[:8]}")
    client.on_message = on_message
    client.subscribe(topic(fleet, device, "cmd/result"), qos=1)
    await client.start()
    try:
        await asyncio.wait_for(client.wait_connected(), timeout=timeout)
        await client.publish(topic(fleet, device, "cmd"), payload, qos=1)
        return await asyncio.wait_for(done, timeout=timeout)
    except TimeoutError:
        raise CloudError(f"no answer from {device} within {timeout:g} s (is it online?)") from None
    finally:
        await client.stop()
