"""Security properties, each proven by a test (SECURITY.md maps the threat model onto these).

- A model runs only with a valid signature from the fleet key: a correct sha256 is not enough.
- An old signed manifest replayed with a lower version is refused unless the desired state is a
  rollback.
- Names, file names and URLs from the network cannot leave the state dir (``../``, absolute
  paths, symlinks in the models folder, artifact symlinks).
- Allowed URL schemes come from config (https only by default), downloads are capped, TLS is
  verified by default.
- Key files are 0600 and a readable signing key is refused; secrets never reach logs, reprs,
  reported state or files in the state dir; a device holds no private signing key.
- A malicious model file cannot make the loader read other files (ONNX external data).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from chaos.faultkit import FaultServer, linear_onnx, onnx_manifest
from helpers_cloudsdk import Pki
from helpers_device import desired, linear_manifest, settings, until

from runtime.artifacts import (
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_bundle,
    write_bundle,
)
from runtime.config import config_hash, load_settings
from runtime.daemon import Daemon
from runtime.errors import ArtifactError, ConfigError, EdgeloopError, ProtocolError, SignatureError, UpdateError
from runtime.fetch import download
from runtime.modelstore import ModelStore
from runtime.protocol import ArtifactRef, ModelManifest, ModelRef, ReportedState, decode
from runtime.transports.memory import MemoryUplink

SECRET = "s3cr3t-Pa55word-do-not-log"
CONN = f"HostName=hub.example.net;DeviceId=dev-1;SharedAccessKey={SECRET}Q=="


def run(coro: Any, timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def other_key(tmp_path: Path) -> Path:
    key, _ = generate_keypair(tmp_path / "attacker", name="attacker")
    return key


def memory_device(tmp_path: Path, pub: Path, **extra: Any) -> tuple[Daemon, MemoryUplink]:
    s = settings(tmp_path, pub, "dev-1", transport="memory", **extra)
    up = MemoryUplink.from_settings(s)
    return Daemon(s, uplink=up), up


def reported(up: MemoryUplink) -> ReportedState:
    return decode(ReportedState, up.of("reported")[-1])


async def failed_with(up: MemoryUplink, version: int) -> str:
    await until(
        lambda: (
            bool(up.of("reported")) and reported(up).update.state == "failed" and reported(up).update.version == version
        ),
        10,
        f"v{version} refused",
    )
    return reported(up).update.reason or ""


# --------------------------------------------------------------------------- signatures


@pytest.fixture
def artifact_server() -> Iterator[FaultServer]:
    with FaultServer() as s:
        s.files["model.onnx"] = linear_onnx([1.0, 1.0], 0.0)
        yield s


@pytest.mark.parametrize("attack", ["resigned-by-another-key", "unsigned", "signature-of-another-manifest", "edited"])
def test_hash_match_is_not_enough_a_valid_fleet_signature_is_required(
    attack: str, tmp_path: Path, fleet_keys, other_key: Path, artifact_server: FaultServer
) -> None:
    """The artifact's bytes and sha256 are right every time; only the signature is wrong. The model
    is refused at download time, never lands on disk, and v1 keeps serving."""
    key, pub = fleet_keys
    data = artifact_server.files["model.onnx"]
    url = artifact_server.url("good")
    genuine = onnx_manifest(key, 2, data, url=url)
    if attack == "resigned-by-another-key":
        bad = onnx_manifest(other_key, 2, data, url=url)
    elif attack == "unsigned":
        bad = onnx_manifest(None, 2, data, url=url)
    elif attack == "signature-of-another-manifest":
        bad = onnx_manifest(None, 2, data, url=url, name="other").model_copy(
            update={"signature": genuine.signature, "key_id": genuine.key_id}
        )
    else:  # a genuine manifest with its features edited after signing
        bad = genuine.model_copy(update={"features": ("b", "a")})
    assert bad.artifact is not None and bad.artifact.sha256 == genuine.artifact.sha256  # type: ignore[union-attr]

    async def go() -> str:
        d, up = memory_device(tmp_path, pub)
        m1 = linear_manifest(key, 1)
        d.store.install(m1)
        d.store.activate(m1.ref)
        await d.start()
        up.deliver("desired", desired(bad, "dev-1"))
        reason = await failed_with(up, 2)
        assert d.pipeline.model_version == 1 and not d.store.has(bad.ref)
        assert not [p for p in d.store.root.rglob("*") if p.suffix == ".onnx"]
        # the genuine manifest of the same bytes is accepted: the refusal was the signature's
        up.deliver("desired", desired(genuine, "dev-1"))
        await until(lambda: d.pipeline.model_version == 2, 10, "the genuine v2")
        await d.shutdown(0.2)
        return reason

    reason = run(go())
    expected = "is not signed" if attack == "unsigned" else "does not verify"
    assert expected in reason, reason


def test_unsigned_or_foreign_bundles_are_refused_on_disk_too(tmp_path: Path, fleet_keys, other_key: Path) -> None:
    """``edgeloop device install-model`` and the start-up load re-verify; a bundle swapped on disk is refused."""
    key, pub = fleet_keys
    store = ModelStore(tmp_path / "state", load_public_key(pub))
    for k in (other_key, None):
        m = (
            linear_manifest(k, 1)
            if k is not None
            else ModelManifest.model_validate(
                {"name": "m", "version": 1, "kind": "linear", "features": ["a", "b"], "weights": [1, 1], "intercept": 0}
            )
        )
        src = tmp_path / f"bundle-{k is None}"
        write_bundle(src, m)
        with pytest.raises(SignatureError):
            store.install_from_dir(src)
    # a genuine installed bundle whose manifest is later replaced on disk by a foreign one
    good = linear_manifest(key, 3)
    b = store.install(good)
    store.activate(good.ref)
    write_bundle(b.path, linear_manifest(other_key, 3, weights=(100.0, 100.0)))
    with pytest.raises(SignatureError):
        store.bundle(good.ref)


# --------------------------------------------------------------------------- replay and downgrade


def test_replayed_old_signed_manifest_is_refused_unless_rollback(tmp_path: Path, fleet_keys) -> None:
    key, pub = fleet_keys

    async def go() -> None:
        d, up = memory_device(tmp_path, pub)
        m2, m3 = linear_manifest(key, 2), linear_manifest(key, 3, weights=(1.0, 1.0))
        d.store.install(m3)
        d.store.activate(m3.ref)
        await d.start()
        up.deliver("desired", desired(m2, "dev-1", rollout="replay"))  # genuine, signed, but older
        reason = await failed_with(up, 2)
        assert "older than the active v3" in reason and d.pipeline.model_version == 3
        assert not d.store.has(m2.ref)
        up.deliver("desired", desired(m2, "dev-1", rollback=True, rollout="rb"))  # the cloud means it
        await until(lambda: d.pipeline.model_version == 2, 10, "rollback to v2")
        await until(lambda: reported(up).update.state == "rolled_back", 10, "rolled_back reported")
        # the same version with other (validly signed) content cannot replace what is installed
        twin = linear_manifest(key, 3, weights=(9.0, 9.0))
        with pytest.raises(UpdateError, match="different bundle"):
            d.store.install(twin)
        await d.shutdown(0.2)

    run(go())


# --------------------------------------------------------------------------- names, paths, URLs


@pytest.mark.parametrize("name", ["../escape", "..", "/etc/passwd", "a/b", ".hidden", "a\\b", "x" * 65, "", "m\x00"])
def test_model_names_from_the_network_are_identifiers(name: str) -> None:
    m = {"name": name, "version": 1, "kind": "linear", "features": ["a"], "weights": [1], "intercept": 0}
    with pytest.raises(ProtocolError):
        decode(ModelManifest, json.dumps(m).encode())
    with pytest.raises(ProtocolError):
        decode(ReportedState, json.dumps({"device": "d", "active": {"name": name, "version": 1}}).encode())


@pytest.mark.parametrize("filename", ["../model.onnx", "/etc/passwd", "a/model.onnx", ".model.onnx", "..", "m\\x.onnx"])
def test_artifact_file_names_cannot_be_paths(filename: str) -> None:
    with pytest.raises(ValueError):
        ArtifactRef(filename=filename, size=1, sha256="0" * 64)
    m = {
        "name": "m",
        "version": 1,
        "kind": "onnx",
        "features": ["a"],
        "artifact": {"filename": filename, "size": 1, "sha256": "0" * 64},
    }
    with pytest.raises(ProtocolError):
        decode(ModelManifest, json.dumps(m).encode())


def test_a_ref_built_around_validation_cannot_escape_the_models_dir(tmp_path: Path, fleet_keys) -> None:
    _, pub = fleet_keys
    store = ModelStore(tmp_path / "state", load_public_key(pub))
    for name in ("../../outside", "/etc", "a/../../b"):
        ref = ModelRef.model_construct(name=name, version=1)  # skips validation, as a bug elsewhere might
        with pytest.raises(UpdateError, match="escapes"):
            store.path_of(ref)


def test_symlinks_in_the_models_dir_are_not_followed_out(tmp_path: Path, fleet_keys) -> None:
    """A symlink planted where a version's folder goes (or as an artifact) is refused; nothing is
    written or read outside the state dir."""
    key, pub = fleet_keys
    outside = tmp_path / "outside"
    outside.mkdir()
    store = ModelStore(tmp_path / "state", load_public_key(pub))
    m = linear_manifest(key, 5)
    (store.root / "m-v5").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UpdateError, match="escapes"):
        store.install(m)
    assert list(outside.iterdir()) == []
    # an artifact that is a symlink to a file elsewhere (with that file's true size and hash)
    secret = outside / "secret.bin"
    secret.write_bytes(b"private bytes of another program")
    data = secret.read_bytes()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    om = onnx_manifest(key, 6, data)
    (bundle / "manifest.json").write_bytes(om.model_dump_json(by_alias=True).encode())
    (bundle / "model.onnx").symlink_to(secret)
    with pytest.raises(SignatureError, match="symlink"):
        verify_bundle(bundle, load_public_key(pub))
    # current.json naming a path is ignored, not followed
    (store.root / "current.json").write_text(json.dumps({"active": {"name": "../../outside", "version": 1}}))
    assert store.pointers() == (None, None)


def test_http_is_refused_by_the_default_config(tmp_path: Path, fleet_keys, artifact_server: FaultServer) -> None:
    """Allowed schemes come from config; the default is https only, so an http artifact URL is refused."""
    key, pub = fleet_keys
    data = artifact_server.files["model.onnx"]

    async def go() -> list[str]:
        s = settings(tmp_path, pub, "dev-1", transport="memory", update={"allowed_schemes": ["https"]})
        assert s.update.allowed_schemes == ("https",) == type(s.update)().allowed_schemes  # the default
        up = MemoryUplink.from_settings(s)
        d = Daemon(s, uplink=up)
        await d.start()
        reasons = []
        for v, url in enumerate([artifact_server.url("good"), "file:///etc/passwd", "ftp://127.0.0.1/m.onnx"], 2):
            up.deliver("desired", desired(onnx_manifest(key, v, data, url=url), "dev-1"))
            reasons.append(await failed_with(up, v))
        assert artifact_server.hits == {}  # refused before any connection
        await d.shutdown(0.2)
        return reasons

    reasons = run(go())
    for scheme, reason in zip(["http", "file", "ftp"], reasons, strict=True):
        assert f"scheme {scheme!r} is not allowed" in reason, reason


def test_download_size_is_capped_before_and_while_reading(tmp_path: Path, artifact_server: FaultServer) -> None:
    data = artifact_server.files["model.onnx"]
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    common: dict[str, Any] = {"allowed_schemes": ("http",), "timeout": 5.0}
    with pytest.raises(UpdateError, match="exceeds the cap"):  # the manifest admits it: refused before connecting
        download(
            artifact_server.url("good"), tmp_path, expected_size=2048, expected_sha256=sha, max_bytes=1024, **common
        )
    assert artifact_server.hits == {}
    with pytest.raises(UpdateError, match="exceeds the cap"):  # the server's Content-Length gives it away
        download(
            artifact_server.url("big"), tmp_path, expected_size=len(data), expected_sha256=sha, max_bytes=1024, **common
        )
    with pytest.raises(UpdateError, match="larger than"):  # no length: counted while reading
        download(
            artifact_server.url("nolength"),
            tmp_path,
            expected_size=len(data),
            expected_sha256=sha,
            max_bytes=1024,
            **common,
        )
    assert list(tmp_path.iterdir()) == []  # nothing partial left


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, Pki, FaultServer]]:
    """An https server whose certificate is issued by a CA the system does not know."""
    pki = Pki(tmp_path / "pki")
    cert, key = pki.server()
    with FaultServer() as plain:
        plain.files["model.onnx"] = linear_onnx([1.0, 1.0], 0.0)
        data = plain.files["model.onnx"]
        redirect_to = plain.url("good")

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/downgrade"):
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        t = threading.Thread(target=httpd.serve_forever, daemon=True)
        t.start()
        try:
            yield f"https://127.0.0.1:{httpd.server_address[1]}", pki, plain
        finally:
            httpd.shutdown()
            httpd.server_close()
            t.join(5)


def test_tls_is_verified_by_default(tmp_path: Path, https_server: tuple[str, Pki, FaultServer]) -> None:
    import hashlib

    base, pki, plain = https_server
    data = plain.files["model.onnx"]
    args: dict[str, Any] = {
        "expected_size": len(data),
        "expected_sha256": hashlib.sha256(data).hexdigest(),
        "max_bytes": 1 << 20,
        "allowed_schemes": ("https",),
        "timeout": 5.0,
    }
    dest = tmp_path / "dl"
    dest.mkdir()
    with pytest.raises(UpdateError, match="CERTIFICATE_VERIFY_FAILED"):
        download(f"{base}/model.onnx", dest, **args)
    # the same server with its CA trusted works: the refusal above was the verification
    got = download(f"{base}/model.onnx", dest, ca_file=pki.ca, **args)
    assert got.read_bytes() == data
    got.unlink()
    # and a trusted https server cannot redirect the device to plain http
    with pytest.raises(UpdateError, match="redirect to a 'http' URL is not allowed"):
        download(f"{base}/downgrade", dest, ca_file=pki.ca, **args)
    assert plain.hits == {}
    assert list(dest.iterdir()) == []


# --------------------------------------------------------------------------- keys and secrets


def test_key_files_are_0600_and_readable_keys_are_refused(tmp_path: Path) -> None:
    key, pub = generate_keypair(tmp_path / "k")
    assert (key.stat().st_mode & 0o777) == 0o600
    assert (pub.stat().st_mode & 0o777) == 0o644  # a public key is meant to be read
    load_private_key(key)
    for mode in (0o640, 0o604, 0o644, 0o660):
        os.chmod(key, mode)
        with pytest.raises(ConfigError, match="readable by others"):
            load_private_key(key)
    os.chmod(key, 0o600)


def test_the_cloud_refuses_a_readable_signing_key(tmp_path: Path, fleet_keys) -> None:
    from helpers_cloud import cloud_settings

    from cloud.service import CloudService

    key, pub = generate_keypair(tmp_path / "ck")
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        CloudService(cloud_settings(tmp_path, (key, pub), "mqtt://127.0.0.1:1", "f"))


def test_a_device_holds_no_private_signing_key(tmp_path: Path, fleet_keys) -> None:
    """A stolen device yields its state dir: models, outbox, status — and no key that signs models."""
    key, pub = fleet_keys

    async def go() -> None:
        d, _ = memory_device(tmp_path, pub)
        m = linear_manifest(key, 1)
        d.store.install(m)
        d.store.activate(m.ref)
        await d.start()
        d.pipeline.submit_arrays(np.ones((10, 2)))
        d.pipeline.flush()
        await d.shutdown(0.2)

    run(go())
    for p in (tmp_path / "dev-1").rglob("*"):
        if p.is_file():
            assert b"PRIVATE KEY" not in p.read_bytes(), p


def test_secrets_never_reach_logs_reprs_reported_state_or_files(
    tmp_path: Path, fleet_keys, caplog: pytest.LogCaptureFixture, machine_broker: str, unique_id: str
) -> None:
    key, pub = fleet_keys
    caplog.set_level(logging.DEBUG)
    extra = {"broker": {"username": "dev-1", "password": SECRET, "connection_string": CONN}}
    s = settings(tmp_path, pub, "dev-1", url=machine_broker, fleet=f"sec{unique_id}", **extra)
    assert SECRET not in repr(s) and SECRET not in str(s) and SECRET not in repr(s.broker)
    assert SECRET not in config_hash(s)

    async def go() -> list[bytes]:
        d = Daemon(s)  # the real MQTT uplink, logging in with the password
        m = linear_manifest(key, 1)
        d.store.install(m)
        d.store.activate(m.ref)
        await d.start()
        await until(lambda: d.uplink.connected, 10, "connected")
        d.pipeline.submit_arrays(np.ones((5, 2)))
        d.pipeline.flush()
        out = [d.reported_state().to_bytes(), d.telemetry().to_bytes()]
        d._on_inbound("cmd", b'{"type": "get_state", "id": "g1"}')  # what an operator can ask for
        await asyncio.sleep(0.2)
        await d.shutdown(0.5)
        return out

    payloads = run(go())
    for p in payloads:
        assert SECRET.encode() not in p
    assert SECRET not in caplog.text
    for p in (tmp_path / "dev-1").rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def test_config_errors_do_not_echo_secrets(tmp_path: Path, fleet_keys) -> None:
    _, pub = fleet_keys
    cfg = tmp_path / "device.toml"
    cfg.write_text(f'device_id = "dev-1"\nstate_dir = "{tmp_path}"\npublic_key = "{pub}"\nbogus = 1\n')
    env = {
        "EDGELOOP_BROKER__PASSWORD": SECRET,
        "EDGELOOP_BROKER__CONNECTION_STRING": CONN,
        "EDGELOOP_BROKER__URL": "gopher://x",
    }
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env=env)
    assert "bogus" in str(err.value) and "broker.url" in str(err.value)
    assert SECRET not in str(err.value)


# --------------------------------------------------------------------------- malicious model files


def test_onnx_external_data_cannot_read_other_files(tmp_path: Path, fleet_keys) -> None:
    """A signed ONNX model whose weights point at a file elsewhere (``external_data``) is refused:
    the loader never opens paths named inside a model."""
    from onnx import TensorProto, helper

    from runtime.predictors import load_bundle

    key, pub = fleet_keys
    target = tmp_path / "host-secret.bin"
    target.write_bytes(np.arange(2, dtype=np.float32).tobytes())
    for location in (str(target), "../host-secret.bin", "host-secret.bin"):
        w = TensorProto(name="W", data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
        w.dims.extend([2, 1])
        entry = w.external_data.add()
        entry.key, entry.value = "location", location
        g = helper.make_graph(
            [helper.make_node("MatMul", ["X", "W"], ["Y"])],
            "ext",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])],
            initializer=[w],
        )
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        data = bytes(model.SerializeToString())
        out = tmp_path / f"bundle-{abs(hash(location))}"
        write_bundle(out, onnx_manifest(key, 1, data), data)
        (out / "host-secret.bin").write_bytes(target.read_bytes())  # even beside the model
        with pytest.raises(ArtifactError):
            load_bundle(out, pub)


def test_every_refusal_is_one_of_our_errors(tmp_path: Path, fleet_keys, other_key: Path) -> None:
    """The errors above are EdgeloopErrors with reasons: the daemon reports them, nothing crashes."""
    key, pub = fleet_keys
    store = ModelStore(tmp_path / "s", load_public_key(pub))
    for bad in (linear_manifest(other_key, 1), sign_manifest(linear_manifest(key, 2), load_private_key(other_key))):
        with pytest.raises(EdgeloopError) as err:
            store.install(bad)
        assert isinstance(err.value, SignatureError) and "does not verify" in str(err.value)
