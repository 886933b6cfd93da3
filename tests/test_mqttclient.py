"""AsyncMqttClient against real Mosquitto: round trips, PUBACKs, faults, manual acks, TLS, refusals."""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from brokers import Broker, BrokerTls, Pki
from helpers_device import run, until

from runtime.errors import ConfigError, TransportError
from runtime.mqttclient import AsyncMqttClient, Backoff, MqttMessage, parse_broker_url
from runtime.mqttcompat import MqttProtocol, TlsFiles

FAST: dict[str, Any] = {"backoff_min": 0.05, "backoff_max": 0.2}


def client(url: str, name: str, **kw: Any) -> AsyncMqttClient:
    """A client that leaves no session behind on a shared broker unless the test asks for one."""
    kw.setdefault("clean_start", True)
    kw.setdefault("session_expiry", 0)
    return AsyncMqttClient(url, client_id=name, **{**FAST, **kw})


# --------------------------------------------------------------------------- no broker


def test_backoff_is_jittered_exponential_capped_and_resets() -> None:
    b = Backoff(0.5, 4.0, rng=random.Random(1))
    waits = [b.next() for _ in range(8)]
    for n, w in enumerate(waits):
        d = min(4.0, 0.5 * 2**n)
        assert d / 2 <= w <= d, (n, w)
    assert len({round(w, 9) for w in waits}) == len(waits)  # jitter: no two alike
    b.reset()
    assert 0.25 <= b.next() <= 0.5
    with pytest.raises(ConfigError):
        Backoff(2.0, 1.0)


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://h") == ("h", 1883, False)
    assert parse_broker_url("mqtts://h") == ("h", 8883, True)
    assert parse_broker_url("mqtt://127.0.0.1:1999") == ("127.0.0.1", 1999, False)
    for bad in ("http://h", "mqtt://", "mqtt://h:port", "h:1883"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)


def test_settings_are_checked_at_construction(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="cert and key"):
        AsyncMqttClient("mqtts://h", tls=TlsFiles(cert=tmp_path / "c.pem"))
    with pytest.raises(ConfigError, match="does not exist"):
        AsyncMqttClient("mqtts://h", tls=TlsFiles(ca=tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="not mqtts"):
        AsyncMqttClient("mqtt://h", tls=TlsFiles())
    with pytest.raises(ConfigError, match="protocol"):
        AsyncMqttClient("mqtt://h", protocol="4")  # type: ignore[arg-type]


def test_reconnects_follow_the_backoff_through_the_injected_sleep(free_port: int) -> None:
    """Nothing listens on the port: every attempt is refused and waits the next backoff delay."""

    async def go() -> None:
        delays: list[float] = []
        enough = asyncio.Event()

        async def fake_sleep(d: float) -> None:
            delays.append(d)
            if len(delays) == 8:
                enough.set()
            await asyncio.sleep(0)

        c = AsyncMqttClient(
            f"mqtt://127.0.0.1:{free_port}", backoff_min=0.1, backoff_max=0.8, sleep=fake_sleep, rng=random.Random(7)
        )
        with pytest.raises(TransportError, match="not connected"):
            await c.publish("t", b"x")
        await c.start()
        await asyncio.wait_for(enough.wait(), 20)
        await c.close()
        assert c.last_error is not None and "refused" in c.last_error.lower()
        ref = Backoff(0.1, 0.8, rng=random.Random(7))
        assert delays[:8] == pytest.approx([ref.next() for _ in range(8)])
        assert max(delays) <= 0.8 and not c.connected and c.connects == 0

    run(go())


def test_a_silent_broker_never_stalls_the_event_loop(pki: Pki) -> None:
    """TCP accepted, nothing ever answered (TLS handshake or CONNACK): the loop keeps ticking."""

    async def go() -> None:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            port = silent.getsockname()[1]
            gaps: list[float] = []

            async def ticker() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            t = asyncio.create_task(ticker())
            plain = AsyncMqttClient(f"mqtt://127.0.0.1:{port}", connect_timeout=1.0, **FAST)
            tls = AsyncMqttClient(f"mqtts://127.0.0.1:{port}", tls=TlsFiles(pki.ca), connect_timeout=1.0, **FAST)
            await plain.start()
            await tls.start()
            await until(lambda: plain.last_error is not None and tls.last_error is not None, 10, "both give up")
            errors = (plain.last_error or "", tls.last_error or "")
            await plain.close()
            await tls.close()
            t.cancel()
            assert "no answer" in errors[0] and "timed out" in errors[1], errors
            assert max(gaps) < 0.5, f"the loop stalled for {max(gaps):.2f} s"

    run(go())
    gc.collect()  # an unclosed socket would raise ResourceWarning here (warnings are errors)


# --------------------------------------------------------------------------- machine broker


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_thousand_qos1_publishes_all_arrive_exactly_once(
    machine_broker: str, unique_id: str, protocol: MqttProtocol
) -> None:
    topic = f"edgeloop-test/{unique_id}/n"

    async def go() -> None:
        got: list[MqttMessage] = []
        sentinel = asyncio.Event()

        def on_message(m: MqttMessage) -> None:
            if m.payload == b"end":
                sentinel.set()
            else:
                got.append(m)

        sub = client(machine_broker, f"s-{unique_id}", protocol=protocol)
        sub.on_message = on_message
        sub.subscribe(topic, 1)
        async with sub, client(machine_broker, f"p-{unique_id}", protocol=protocol) as pub:
            await sub.wait_connected(10)
            await pub.wait_connected(10)
            await asyncio.gather(*(pub.publish(topic, b"%d" % i) for i in range(1000)))
            await pub.publish(topic, b"end")  # the broker delivers in order: everything before it is in
            await asyncio.wait_for(sentinel.wait(), 30)
        assert sorted(int(m.payload) for m in got) == list(range(1000))  # none lost, none twice
        assert all(m.topic == topic and m.qos == 1 and not m.retain for m in got)

    run(go())


def test_publish_returns_on_puback_so_the_broker_has_the_message(machine_broker: str, unique_id: str) -> None:
    topic = f"edgeloop-test/{unique_id}/kept"

    async def go() -> None:
        async with client(machine_broker, f"p-{unique_id}") as pub:
            await pub.wait_connected(10)
            await pub.publish(topic, b"kept", retain=True)  # returned: the broker acknowledged it
            late: list[MqttMessage] = []
            sub = client(machine_broker, f"l-{unique_id}")
            sub.on_message = late.append
            sub.subscribe(topic, 1)
            async with sub:
                await until(lambda: len(late) == 1, what="the retained message")
            await pub.publish(topic, b"", retain=True)  # clear it
        assert late[0].payload == b"kept" and late[0].retain
        assert late[0].user_properties == {} and isinstance(late[0].properties, dict)

    run(go())


@pytest.mark.parametrize("max_inflight", [20, 0])
def test_ten_thousand_qos1_publishes_are_all_acknowledged(
    machine_broker: str, unique_id: str, max_inflight: int, record_property: Callable[[str, object], None]
) -> None:
    """Throughput of the loop-driven client (printed; see the report in the commit log)."""

    async def go() -> float:
        async with client(machine_broker, f"t-{unique_id}", max_inflight=max_inflight) as c:
            await c.wait_connected(10)
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(c.publish(f"edgeloop-test/{unique_id}/t", b"x" * 64) for _ in range(10_000))
            )
            rate = 10_000 / (time.perf_counter() - t0)
            assert results == [None] * 10_000 and not c._pending
        return rate

    rate = run(go())
    record_property("qos1_msgs_per_s", round(rate))
    print(f"max_inflight={max_inflight}: {rate:,.0f} QoS 1 messages/s")


# --------------------------------------------------------------------------- faults on a private broker


def test_broker_killed_mid_stream_fails_pending_then_reconnects_and_resubscribes(
    make_broker: Callable[..., Broker], unique_id: str
) -> None:
    broker = make_broker(autosave_changes=1)  # the retained desired state survives a SIGKILL
    desired = f"edgeloop/f{unique_id}/d1/desired"

    async def go() -> None:
        got: list[tuple[bytes, bool]] = []
        changes: list[bool] = []
        dev = AsyncMqttClient(broker.url, client_id=f"dev-{unique_id}", **FAST)
        dev.subscribe(desired, 1)
        dev.on_message = lambda m: got.append((m.payload, m.retain))
        dev.on_connection = changes.append
        cloud = client(broker.url, f"cloud-{unique_id}")
        async with dev, cloud:
            await dev.wait_connected(10)
            await cloud.wait_connected(10)
            await cloud.publish(desired, b"v1", retain=True)
            await until(lambda: got == [(b"v1", False)], what="live desired state")

            stream = [
                asyncio.create_task(dev.publish(f"edgeloop-test/{unique_id}/r", b"%d" % i)) for i in range(10_000)
            ]
            await until(lambda: sum(t.done() for t in stream) >= 50, what="the first acknowledgements")
            await asyncio.to_thread(broker.kill)
            results = await asyncio.gather(*stream, return_exceptions=True)
            failed = [r for r in results if r is not None]
            assert failed, "every publish was acknowledged before the kill: nothing tested"
            assert all(isinstance(r, TransportError) and "lost" in str(r) for r in failed)
            assert not dev.connected and changes == [True, False]
            with pytest.raises(TransportError, match="not connected"):
                await dev.publish(desired, b"x")

            await asyncio.to_thread(broker.start)  # same port, same persistence folder
            await dev.wait_connected(20)
            await until(lambda: got[-1] == (b"v1", True), what="retained desired state after the resubscribe")
            assert changes == [True, False, True] and dev.connects == 2 and dev.session_present
            await dev.publish(f"edgeloop-test/{unique_id}/r", b"after")  # and publishing works again
            await cloud.wait_connected(20)
            await cloud.publish(desired, b"", retain=True)

    run(go(), timeout=90)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_an_unacknowledged_message_is_redelivered_in_the_next_session(
    private_broker: Broker, unique_id: str, protocol: MqttProtocol
) -> None:
    """manual_ack (paho 2.x): nothing is acknowledged until the consumer says so."""
    topic = f"edgeloop/f{unique_id}/d/readings"

    async def session(received: list[MqttMessage], expect: int, ack: bool) -> None:
        c = AsyncMqttClient(
            private_broker.url, client_id=f"reader-{unique_id}", protocol=protocol, manual_ack=True, **FAST
        )
        assert c.manual_ack
        c.on_message = received.append
        c.subscribe(topic, 1)
        async with c:
            await c.wait_connected(10)
            await until(lambda: len(received) >= expect, what=f"{expect} message(s)")
            if ack:
                for m in received:
                    m.ack()
                # the PUBACK is on its way before the DISCONNECT: a ping round trip orders them
                await c.publish(f"edgeloop-test/{unique_id}/flush", b"", qos=1)

    async def go() -> None:
        pub = client(private_broker.url, f"pub-{unique_id}")
        async with pub:
            await pub.wait_connected(10)
            first: list[MqttMessage] = []
            await session([], 0, ack=False)  # create the persistent session and its subscription
            await pub.publish(topic, b"r1")
            await session(first, 1, ack=False)  # receives r1, does not acknowledge it
            again: list[MqttMessage] = []
            await session(again, 1, ack=True)  # the broker sends r1 again; now acknowledged
            await pub.publish(topic, b"r2")
            last: list[MqttMessage] = []
            await session(last, 1, ack=True)
        assert [m.payload for m in first] == [b"r1"] and all(m.needs_ack for m in first)
        assert [m.payload for m in again] == [b"r1"]
        assert [m.payload for m in last] == [b"r2"]  # r1 is not redelivered once acknowledged

    run(go(), timeout=90)


def test_mqtt5_puback_refusal_is_an_error_and_a_bad_login_is_refused(
    make_broker: Callable[..., Broker], tmp_path: Any, unique_id: str
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic read #\ntopic write allowed/#\n")
    open_broker = make_broker(extra=f"acl_file {acl}")
    closed_broker = make_broker(allow_anonymous=False)

    async def go() -> None:
        async with client(open_broker.url, f"acl-{unique_id}") as c:
            await c.wait_connected(10)
            await c.publish("allowed/x", b"ok")
            with pytest.raises(TransportError, match="refused the message: Not authorized"):
                await c.publish("denied/x", b"no")
            assert c.connected  # a refused message does not cost the connection
        nobody = client(closed_broker.url, f"anon-{unique_id}")
        async with nobody:
            await until(lambda: nobody.last_error is not None, what="a refusal")
            with pytest.raises(TransportError, match="refused the connection: Not authorized"):
                await nobody.wait_connected(0.5)
        assert nobody.connects == 0

    run(go())


def test_tls_and_mutual_tls(make_broker: Callable[..., Broker], pki: Pki, tmp_path: Any, unique_id: str) -> None:
    tls_broker = make_broker(tls=BrokerTls.from_pki(pki))
    mtls_broker = make_broker(tls=BrokerTls.from_pki(pki, require_certificate=True))
    cert, key = pki.client(f"dev-{unique_id}")
    stranger = Pki(tmp_path / "other")

    async def round_trip(url: str, tls: TlsFiles) -> bytes:
        got: list[bytes] = []
        c = client(url, f"tls-{unique_id}", tls=tls)
        c.on_message = lambda m: got.append(m.payload)
        c.subscribe("secure/x", 1)
        async with c:
            await c.wait_connected(10)
            await c.publish("secure/x", b"over tls")
            await until(lambda: bool(got))
        return got[0]

    async def never_connects(url: str, tls: TlsFiles) -> str:
        c = client(url, f"bad-{unique_id}", tls=tls)
        async with c:
            await until(lambda: c.last_error is not None, what="a TLS failure")
        assert c.connects == 0
        return c.last_error or ""

    async def go() -> None:
        assert await round_trip(tls_broker.url, TlsFiles(pki.ca)) == b"over tls"
        assert await round_trip(mtls_broker.url, TlsFiles(pki.ca, cert, key)) == b"over tls"
        assert "cannot verify" in await never_connects(tls_broker.url, TlsFiles(stranger.ca))
        # a broker that requires a certificate refuses a client without one
        assert await never_connects(mtls_broker.url, TlsFiles(pki.ca))

    run(go())
    gc.collect()
