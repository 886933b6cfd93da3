"""Helpers for the cloud-SDK transport tests: private Mosquitto brokers with TLS, fakes of the SDKs' peers.

Everything listens on loopback only. The PKI is :class:`brokers.Pki` (re-exported here): a CA, a
server certificate for 127.0.0.1 / localhost (SAN), and client certificates whose common name is
the MQTT identity (Mosquitto's ``use_identity_as_username``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from brokers import Pki

__all__ = [
    "FakeNucleus",
    "Pki",
    "free_port",
    "mosquitto_binary",
    "require",
    "run_async",
    "run_mosquitto",
    "wait_until",
    "wait_until_async",
]

T = TypeVar("T")
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip when something the test needs is missing — but fail under CI=true, where it must be there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    require(path is not None, "the mosquitto binary is missing (apt-get install mosquitto)")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll a condition until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- Mosquitto


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    folder: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def run_mosquitto(folder: Path, config: str, port: int, host: str = "127.0.0.1") -> Iterator[Broker]:
    """Start ``mosquitto -c`` with ``config`` (which must open ``port`` on ``host``); stop it after."""
    binary = mosquitto_binary()
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "mosquitto.conf"
    log = folder / "mosquitto.log"
    # Run as ourselves: started as root, mosquitto would switch to user "mosquitto", which cannot
    # read our 0700 temp folders.
    conf.write_text(f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" + config)
    with open(log, "wb") as logf:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT)
    broker = Broker(host=host, port=port, process=proc, log=log, folder=folder)
    try:
        deadline = time.monotonic() + 10.0
        while not _listening(host, port):
            if proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {proc.returncode}:\n{broker.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not listen on {host}:{port} within 10 s:\n{broker.log_text()}")
            time.sleep(0.02)
        yield broker
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def tls_listener(port: int, pki_ca: Path, server_cert: Path, server_key: Path, *, host: str = "127.0.0.1") -> str:
    """Mosquitto config lines for a TLS listener that requires client certificates."""
    return (
        f"listener {port} {host}\n"
        f"cafile {pki_ca}\n"
        f"certfile {server_cert}\n"
        f"keyfile {server_key}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
    )


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
    """Run a test scenario on a fresh event loop, bounded in time (no pytest asyncio plugin needed)."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


# --------------------------------------------------------------------------- a Greengrass nucleus stand-in

_MSG_APPLICATION, _MSG_ERROR, _MSG_PING, _MSG_PING_RESPONSE, _MSG_CONNECT, _MSG_CONNECT_ACK = 0, 1, 2, 3, 4, 5
_FLAG_CONNECTION_ACCEPTED, _FLAG_TERMINATE_STREAM = 1, 2


def _encode_header(name: str, value: bool | int | str) -> bytes:
    n = name.encode()
    head = bytes([len(n)]) + n
    if isinstance(value, bool):
        return head + bytes([0 if value else 1])
    if isinstance(value, int):
        return head + b"\x04" + struct.pack(">i", value)
    v = value.encode()
    return head + b"\x07" + struct.pack(">H", len(v)) + v


def encode_eventstream(headers: dict[str, bool | int | str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (lengths + CRC), headers, payload, message CRC."""
    hb = b"".join(_encode_header(k, v) for k, v in headers.items())
    prelude = struct.pack(">II", 12 + len(hb) + len(payload) + 4, len(hb))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + hb + payload
    return body + struct.pack(">I", zlib.crc32(body))


def decode_eventstream_headers(data: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    fixed = {2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}
    while i < len(data):
        n = data[i]
        name = data[i + 1 : i + 1 + n].decode()
        i += 1 + n
        kind = data[i]
        i += 1
        if kind in (0, 1):
            out[name] = kind == 0
        elif kind in fixed:
            size = fixed[kind]
            out[name] = int.from_bytes(data[i : i + size], "big", signed=kind != 9)
            i += size
        else:  # 6 bytes, 7 string
            size = struct.unpack(">H", data[i : i + 2])[0]
            raw = data[i + 2 : i + 2 + size]
            out[name] = raw.decode() if kind == 7 else raw
            i += 2 + size
    return out


def _read_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class FakeNucleus:
    """The IPC side of a Greengrass nucleus on a Unix socket: event-stream RPC CONNECT with the
    component's auth token, ``PublishToIoTCore`` (recorded; refused with ``UnauthorizedError`` for
    topics in :attr:`denied`) and ``SubscribeToIoTCore`` (streams :meth:`deliver` pushes ``IoTCoreMessage``
    events into). Just enough of the nucleus to run the SDK's real client against."""

    def __init__(self, path: Path, token: str) -> None:
        self.path, self.token = path, token
        self.published: list[dict[str, Any]] = []
        self.subscriptions: dict[str, list[tuple[socket.socket, int]]] = {}
        self.denied: set[str] = set()
        self.connects = 0
        self.lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._send_locks: dict[socket.socket, threading.Lock] = {}
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(8)
        self._threads = [threading.Thread(target=self._accept, name="fake-nucleus", daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self.lock:
                self._conns.append(conn)
                self._send_locks[conn] = threading.Lock()
            t = threading.Thread(target=self._serve, args=(conn,), name="fake-nucleus-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _send(self, conn: socket.socket, mtype: int, flags: int, stream: int, payload: bytes = b"", **h: str) -> None:
        headers: dict[str, bool | int | str] = {":message-type": mtype, ":message-flags": flags, ":stream-id": stream}
        headers.update({k.replace("_", "-") if k != "content_type" else ":content-type": v for k, v in h.items()})
        with self._send_locks.get(conn, threading.Lock()):
            conn.sendall(encode_eventstream(headers, payload))

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                prelude = _read_exact(conn, 12)
                if prelude is None:
                    return
                total, hlen, _ = struct.unpack(">III", prelude)
                rest = _read_exact(conn, total - 12)
                if rest is None:
                    return
                headers = decode_eventstream_headers(rest[:hlen])
                payload = rest[hlen:-4]
                self._handle(conn, headers, payload)
        except OSError:
            return
        finally:
            self._drop(conn)

    def _handle(self, conn: socket.socket, headers: dict[str, Any], payload: bytes) -> None:
        mtype, stream = headers.get(":message-type"), headers.get(":stream-id", 0)
        flags = headers.get(":message-flags", 0)
        if mtype == _MSG_CONNECT:
            ok = json.loads(payload or b"{}").get("authToken") == self.token
            with self.lock:
                self.connects += ok
            self._send(conn, _MSG_CONNECT_ACK, _FLAG_CONNECTION_ACCEPTED if ok else 0, 0)
        elif mtype == _MSG_PING:
            self._send(conn, _MSG_PING_RESPONSE, 0, 0)
        elif mtype == _MSG_APPLICATION and flags & _FLAG_TERMINATE_STREAM and not payload:
            with self.lock:
                for subs in self.subscriptions.values():
                    subs[:] = [(c, s) for c, s in subs if (c, s) != (conn, stream)]
        elif mtype == _MSG_APPLICATION:
            op, body = headers.get("operation"), json.loads(payload or b"{}")
            j = {"content_type": "application/json"}
            if op == "aws.greengrass#PublishToIoTCore":
                topic = body.get("topicName")
                if topic in self.denied:
                    err = json.dumps({"message": f"not authorized to publish to {topic}"}).encode()
                    self._send(conn, _MSG_ERROR, _FLAG_TERMINATE_STREAM, stream, err,
                               service_model_type="aws.greengrass#UnauthorizedError", **j)  # fmt: skip
                    return
                with self.lock:
                    self.published.append(body)
                self._send(conn, _MSG_APPLICATION, _FLAG_TERMINATE_STREAM, stream, b"{}",
                           service_model_type="aws.greengrass#PublishToIoTCoreResponse", **j)  # fmt: skip
            elif op == "aws.greengrass#SubscribeToIoTCore":
                with self.lock:
                    self.subscriptions.setdefault(body["topicName"], []).append((conn, stream))
                self._send(conn, _MSG_APPLICATION, 0, stream, b"{}",
                           service_model_type="aws.greengrass#SubscribeToIoTCoreResponse", **j)  # fmt: skip
            else:
                err = json.dumps({"message": f"unsupported operation {op}"}).encode()
                self._send(conn, _MSG_ERROR, _FLAG_TERMINATE_STREAM, stream, err,
                           service_model_type="aws.greengrass#ServiceError", **j)  # fmt: skip

    def deliver(self, topic: str, payload: bytes) -> int:
        """Push a message from IoT Core to every subscriber of ``topic``; returns how many got it."""
        event = json.dumps({"message": {"topicName": topic, "payload": base64.b64encode(payload).decode()}})
        with self.lock:
            subs = list(self.subscriptions.get(topic, []))
        for conn, stream in subs:
            self._send(conn, _MSG_APPLICATION, 0, stream, event.encode(),
                       service_model_type="aws.greengrass#IoTCoreMessage", content_type="application/json")  # fmt: skip
        return len(subs)

    def payloads(self, topic: str) -> list[bytes]:
        with self.lock:
            return [base64.b64decode(p.get("payload", "")) for p in self.published if p.get("topicName") == topic]

    def _drop(self, conn: socket.socket) -> None:
        with self.lock:
            for subs in self.subscriptions.values():
                subs[:] = [(c, s) for c, s in subs if c is not conn]
            if conn in self._conns:
                self._conns.remove(conn)
            self._send_locks.pop(conn, None)
        conn.close()

    def hang_up(self) -> None:
        """Close every component connection (a nucleus restart, seen from the component)."""
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close() alone does not)
        except OSError:
            pass
        self._server.close()
        self.hang_up()
        for t in self._threads[1:]:
            t.join(5)
        self._threads[0].join(5)
