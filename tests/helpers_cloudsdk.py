"""Helpers for the cloud-SDK transport tests: a throwaway PKI and private Mosquitto brokers with TLS.

Everything listens on loopback only. The PKI is made with ``cryptography``: a CA, a server
certificate for 127.0.0.1 / localhost (SAN), and client certificates whose common name is the
MQTT identity (Mosquitto's ``use_identity_as_username``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
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


# --------------------------------------------------------------------------- PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


@dataclass
class Pki:
    """A CA in ``folder`` that issues a server certificate and client certificates on demand."""

    folder: Path
    ca_cert: Path
    ca_key_obj: ec.EllipticCurvePrivateKey
    ca_obj: x509.Certificate

    @classmethod
    def create(cls, folder: Path, name: str = "edgeloop test CA") -> Pki:
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        path = folder / "ca.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(folder=folder, ca_cert=path, ca_key_obj=key, ca_obj=cert)

    def _issue(self, cn: str, *, server: bool, stem: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.ca_obj.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key_obj.public_key()), critical=False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]),
                critical=False,
            )
        cert = builder.sign(self.ca_key_obj, hashes.SHA256())
        cert_path = self.folder / f"{stem}.pem"
        key_path = self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return cert_path, key_path

    def server(self) -> tuple[Path, Path]:
        """A server certificate for ``localhost`` and ``127.0.0.1``."""
        return self._issue("localhost", server=True, stem="server")

    def client(self, cn: str) -> tuple[Path, Path]:
        """A client certificate whose common name (the MQTT identity) is ``cn``."""
        return self._issue(cn, server=False, stem=f"client-{cn}")


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
