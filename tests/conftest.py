"""Shared fixtures: brokers on loopback, free ports, unique ids, signing keys.

Broker fixtures (the Mosquitto process itself lives in tests/brokers.py):

- ``mosquitto_bin`` — path of the mosquitto binary (skip, or fail under CI=true, when missing)
- ``machine_broker`` — URL of the machine's broker at 127.0.0.1:1883, or of a private one when
  nothing answers there (session-wide; use unique topics)
- ``private_broker`` — a started plain :class:`brokers.Broker` this test may kill and restart
- ``make_broker`` — factory: ``make_broker(tls=..., max_queued_messages=..., ...)`` → a started
  Broker; every one is stopped at teardown
- ``pki`` — a throwaway CA (:class:`brokers.Pki`) for TLS and mutual TLS
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import brokers
import pytest
from brokers import Broker, Pki


@pytest.fixture(autouse=True)
def _restore_gc_thresholds() -> Iterator[None]:
    """A test that starts a CloudService in this process raises the collector's thresholds
    (``cloud.service.relax_gc``, process-wide by design); put them back, so no test changes when
    garbage left by the next ones is collected."""
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


@pytest.fixture
def unique_id() -> str:
    """A short random id for topics, fleets and client ids on a shared broker."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(name="free_port")
def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return brokers.free_port()


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    return brokers.mosquitto_binary()


@pytest.fixture(scope="session")
def machine_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Mosquitto at 127.0.0.1:1883, or a private one when nothing answers there."""
    if brokers.port_open(1883):
        yield "mqtt://127.0.0.1:1883"
        return
    with Broker(tmp_path_factory.mktemp("machine-broker")) as b:
        yield b.url


@pytest.fixture
def make_broker(tmp_path: Path, mosquitto_bin: str) -> Iterator[Callable[..., Broker]]:
    """Start private brokers with the given options (see :class:`brokers.Broker`); stopped after the test."""
    started: list[Broker] = []

    def make(**options: Any) -> Broker:
        b = Broker(tmp_path / f"broker{len(started)}", **options)
        started.append(b)
        return b.start()

    try:
        yield make
    finally:
        for b in started:
            b.stop()


@pytest.fixture
def private_broker(make_broker: Callable[..., Broker]) -> Broker:
    """A private plain Mosquitto this test may kill and restart (same port, persistent sessions)."""
    return make_broker()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture(scope="session")
def fleet_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private, public) ed25519 key files for signing models."""
    from runtime.artifacts import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))
