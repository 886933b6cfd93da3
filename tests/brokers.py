"""Private Mosquitto brokers for tests: own config on a free loopback port, kill / restart on the same
port with the same persistence folder, TLS and mutual TLS with a throwaway PKI (``cryptography``)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "Broker",
    "BrokerTls",
    "MosquittoBroker",
    "Pki",
    "free_port",
    "mosquitto_binary",
    "port_open",
    "require_service",
    "wait_port",
]

INSTALL_HINT = "install mosquitto (apt-get install mosquitto)"


def require_service(ok: bool, reason: str) -> None:
    """Skip with ``reason`` locally; under CI=true a missing service is a failure, never a skip."""
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing service fails the run)")
    pytest.skip(reason)


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    require_service(found is not None, INSTALL_HINT)
    assert found is not None
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(port: int, *, up: bool, timeout: float = 10.0, host: str = "127.0.0.1") -> bool:
    """Poll until ``port`` accepts connections (``up``) or refuses them; False on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port_open(port, host) == up:
            return True
        time.sleep(0.01)
    return False


# --------------------------------------------------------------------------- PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """A throwaway CA in ``folder`` issuing server and client certificates (EC P-256, PEM files)."""

    def __init__(self, folder: Path, name: str = "edgeloop test CA") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._servers: dict[tuple[str, ...], tuple[Path, Path]] = {}
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = self.folder / "ca.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, cn: str, stem: str, *, server: bool, hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    names.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path, key_path = self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path

    def server(self, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path]:
        """A server certificate valid for ``hosts`` (subject alternative names), issued once: a
        second issue would rewrite the files under a broker that is still reading them."""
        cached = self._servers.get(hosts)
        if cached is None:
            stem = "server" if not self._servers else f"server-{len(self._servers)}"
            cached = self._servers[hosts] = self._issue(hosts[0], stem, server=True, hosts=hosts)
        return cached

    def client(self, cn: str) -> tuple[Path, Path]:
        """A client certificate whose common name is ``cn``."""
        return self._issue(cn, f"client-{cn}", server=False)


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener: the CA that signs client certificates and the server's own pair."""

    ca: Path
    cert: Path
    key: Path
    require_certificate: bool = False

    @classmethod
    def from_pki(cls, pki: Pki, *, require_certificate: bool = False) -> BrokerTls:
        cert, key = pki.server()
        return cls(pki.ca, cert, key, require_certificate)


# --------------------------------------------------------------------------- Mosquitto


class Broker:
    """``mosquitto -c conf`` on 127.0.0.1:port; persistence in ``folder`` so restarts keep sessions.

    ``autosave_changes``: save the database after that many changes (1: every retained message,
    subscription and queued message survives a SIGKILL); None saves every second instead.
    """

    def __init__(
        self,
        folder: Path,
        *,
        port: int | None = None,
        persistence: bool = True,
        autosave_changes: int | None = None,
        max_queued_messages: int | None = None,
        tls: BrokerTls | None = None,
        allow_anonymous: bool = True,
        extra: str = "",
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self.binary = mosquitto_binary()
        self.conf = self.folder / "mosquitto.conf"
        self.log_file = self.folder / "mosquitto.log"
        # Started as root, mosquitto switches to user "mosquitto", which cannot read pytest's
        # 0700 folders (persistence, keys): run as ourselves.
        lines = [f"user {pwd.getpwuid(os.geteuid()).pw_name}", f"listener {self.port} 127.0.0.1"]
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
            lines += [f"require_certificate {str(tls.require_certificate).lower()}"]
        lines.append(f"allow_anonymous {str(allow_anonymous).lower()}")
        if persistence:
            lines += ["persistence true", f"persistence_location {self.folder}/"]
            if autosave_changes is not None:
                lines += ["autosave_on_changes true", f"autosave_interval {autosave_changes}"]
            else:
                lines.append("autosave_interval 1")
        if max_queued_messages is not None:
            lines.append(f"max_queued_messages {max_queued_messages}")
        lines += [f"log_dest file {self.log_file}", "log_type error warning notice information subscribe", extra]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> Broker:
        if self.running:
            return self
        with open(self.folder / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=err, stderr=err)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if port_open(self.port):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {self.log()[-3000:]}")
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s: {self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the abrupt death of a broker (nothing saved beyond its autosave)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        wait_port(self.port, up=False, timeout=5)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown (mosquitto saves its database)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, *, clean: bool = False) -> Broker:
        """Kill (or stop, when ``clean``) and start again on the same port and persistence folder."""
        self.stop() if clean else self.kill()
        return self.start()

    def log(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.folder / "stderr.log", self.log_file) if p.exists()]
        return "\n".join(parts)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


MosquittoBroker = Broker  # the name older tests use
