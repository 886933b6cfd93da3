"""Device-side Ed25519 verification (runtime.ed25519): OpenSSL through ctypes, and its fallback.

Both backends must accept and refuse exactly the same signatures; the daemon must verify
without importing the ``cryptography`` package (its 9 MB are most of the memory budget).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime.ed25519 as ed
from runtime.artifacts import generate_keypair, load_private_key, load_public_key, sign_manifest, write_bundle
from runtime.ed25519 import PublicKey
from runtime.errors import ConfigError
from runtime.protocol import ModelManifest

REPO = Path(__file__).resolve().parents[1]
L = 2**252 + 27742317777372353535851937790883648493  # the group order

# RFC 8032 section 7.1: (secret key, public key, message, signature)
RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]


def _checks() -> dict[str, Callable[[bytes, bytes, bytes], bool]]:
    out = {}
    for name, make in ed.BACKENDS.items():
        check = make()
        assert check is not None, f"{name} backend unavailable on this machine"
        out[name] = check
    return out


CHECKS = _checks()


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_this_process_verifies_through_openssl() -> None:
    assert ed.backend_name() == "openssl"


@pytest.mark.parametrize("backend", sorted(CHECKS))
@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032)
def test_rfc8032_vectors(backend: str, secret: str, public: str, message: str, signature: str) -> None:
    # the vectors are right: the signing library derives the same key and signature from the secret
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert _raw(key).hex() == public and key.sign(bytes.fromhex(message)).hex() == signature
    check = CHECKS[backend]
    pub, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    assert check(pub, sig, msg)
    assert not check(pub, sig, msg + b"\x00")
    assert not check(pub, bytes([sig[0] ^ 0x01]) + sig[1:], msg)  # R altered
    assert not check(pub, sig[:40] + bytes([sig[40] ^ 0x80]) + sig[41:], msg)  # S altered


@settings(max_examples=150, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=300), flip=st.integers(0, 64 * 8 - 1))
def test_backends_agree_on_random_keys_messages_and_tampering(seed: bytes, message: bytes, flip: int) -> None:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    raw, sig = _raw(key), key.sign(message)
    bad = bytearray(sig)
    bad[flip // 8] ^= 1 << (flip % 8)
    for check in CHECKS.values():
        assert check(raw, sig, message)
        assert not check(raw, bytes(bad), message)
        assert not check(raw, sig, message + b"!")
    assert ed.verify(raw, sig, message) and not ed.verify(raw, bytes(bad), message)


def test_non_canonical_s_and_bad_lengths_are_refused() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    raw, msg = _raw(key), b"model manifest"
    sig = key.sign(msg)
    s = int.from_bytes(sig[32:], "little")
    malleable = sig[:32] + (s + L).to_bytes(32, "little")  # same point equation, S >= L
    for check in CHECKS.values():
        assert not check(raw, malleable, msg)
    assert not ed.verify(raw, sig[:63], msg)
    assert not ed.verify(raw, sig + b"\x00", msg)
    assert not ed.verify(raw[:31], sig, msg)


def test_a_key_that_is_not_a_curve_point_is_refused_and_leaves_no_openssl_error() -> None:
    # y = 2 has no x on the curve; OpenSSL refuses it only when verifying
    not_a_point = (2).to_bytes(32, "little")
    sig = bytes(64)
    for check in CHECKS.values():
        assert not check(not_a_point, sig, b"x")
    lib = ed._openssl()
    assert isinstance(lib, ed._LibCrypto)
    # a failed verification must not leave errors on the thread's OpenSSL queue for ssl to find
    peek = ctypes.CDLL(ed._loaded_libcrypto_paths()[0]).ERR_peek_error
    peek.restype = ctypes.c_ulong
    assert not lib(not_a_point, sig, b"x")
    assert peek() == 0


def test_without_openssl_the_cryptography_package_verifies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ed, "_openssl", lambda: None)
    monkeypatch.setattr(ed, "_chosen", None)
    key = Ed25519PrivateKey.generate()
    sig = key.sign(b"m")
    assert ed.verify(_raw(key), sig, b"m") and not ed.verify(_raw(key), sig, b"n")
    assert ed.backend_name() == "cryptography"


def test_pem_round_trip_matches_the_signing_library() -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = PublicKey.from_pem(pem)
    assert pub.raw == _raw(key)
    assert pub.to_pem() == pem
    assert PublicKey.from_pem(b"comment line\r\n" + pem.replace(b"\n", b"\r\n")) == pub
    assert len(pub.key_id) == 16 and pub.key_id in repr(pub)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no 'BEGIN PUBLIC KEY' block"),
        (b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n", "not valid base64"),
        (b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n", "another type"),
        (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "another type",
        ),
    ],
)
def test_bad_pem_is_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        PublicKey.from_pem(data)
    with pytest.raises(ConfigError, match=reason):
        load_public_key(data)


def test_the_daemon_verifies_and_predicts_without_importing_cryptography(tmp_path: Path) -> None:
    key, pub = generate_keypair(tmp_path / "keys")
    m = sign_manifest(
        ModelManifest(name="m", version=1, kind="linear", features=("a", "b"), weights=(2.0, -1.0), intercept=0.5),
        load_private_key(key),
    )
    write_bundle(tmp_path / "bundle", m)
    code = f"""
import json, sys
import runtime.daemon
from pathlib import Path
from runtime import ed25519
from runtime.artifacts import load_public_key
from runtime.modelstore import ModelStore
from runtime.predictors import load_bundle
p = load_bundle({str(tmp_path / "bundle")!r}, {str(pub)!r})
store = ModelStore(Path({str(tmp_path / "state")!r}), load_public_key(Path({str(pub)!r})))
print(json.dumps({{"y": p.predict([[1.0, 1.0]]).tolist(), "backend": ed25519.backend_name(),
                  "cryptography": sorted(m for m in sys.modules if m.split(".")[0] == "cryptography")}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"y": [1.5], "backend": "openssl", "cryptography": []}
