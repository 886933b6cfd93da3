"""Shared fixtures: brokers on loopback, unique ids, signing keys."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import MosquittoBroker, port_open, require_service


@pytest.fixture
def unique_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def machine_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Mosquitto at 127.0.0.1:1883, or a private one when nothing answers there."""
    if port_open(1883):
        yield "mqtt://127.0.0.1:1883"
        return
    b = MosquittoBroker(tmp_path_factory.mktemp("machine-broker")).start()
    try:
        yield b.url
    finally:
        b.stop()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private Mosquitto this test may kill and restart (same port, persistent sessions)."""
    b = MosquittoBroker(tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def fleet_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from runtime.artifacts import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


__all__ = ["require_service"]
