"""Ed25519 public keys and signature verification for devices, without the ``cryptography`` package.

A device only verifies; the cloud signs. The ``cryptography`` package bundles its own OpenSSL in
a 9 MB extension module, which would be most of the daemon's memory budget above the libraries it
cannot do without. Python's ``ssl`` module already maps the system's OpenSSL ``libcrypto`` into
every process that imports ``asyncio``, so verifying through that library (``EVP_DigestVerify``
via ctypes, the same code that checks the broker's TLS certificate) costs no memory. Where that
library cannot be found or predates Ed25519 (OpenSSL < 1.1.1), the ``cryptography`` package does
the verification instead; both agree on every input (``tests/test_ed25519.py``).

Verification is cofactorless and strict, as OpenSSL's: a signature must be 64 bytes with
``S < L``, and the public key a valid point encoding.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["BACKENDS", "PublicKey", "backend_name", "verify"]

log = logging.getLogger(__name__)

KEY_BYTES = 32
SIGNATURE_BYTES = 64
# DER of SubjectPublicKeyInfo{ AlgorithmIdentifier{ id-Ed25519 (1.3.101.112) }, BIT STRING } before the key.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN, _PEM_END = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"
_NID_ED25519 = 1087  # EVP_PKEY_ED25519 in OpenSSL 1.1.1 and 3.x


class PublicKey:
    """An Ed25519 public key: its 32 raw bytes."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            raise ValueError(f"an ed25519 public key is {KEY_BYTES} bytes")
        self.raw = raw

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        """Parse a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo), as ``openssl pkey -pubout`` writes it.

        Raises ValueError naming what is wrong: no PEM block, bad base64, or a key of another type."""
        start, end = data.find(_PEM_BEGIN), data.find(_PEM_END)
        if start < 0 or end < start:
            raise ValueError("not a PEM ed25519 public key (no 'BEGIN PUBLIC KEY' block)")
        body = b"".join(data[start + len(_PEM_BEGIN) : end].split())
        try:
            der = base64.b64decode(body, validate=True)
        except binascii.Error:
            raise ValueError("not a PEM ed25519 public key (the PEM block is not valid base64)") from None
        if len(der) != len(_SPKI_PREFIX) + KEY_BYTES or not der.startswith(_SPKI_PREFIX):
            raise ValueError("not an ed25519 public key (the PEM block holds a key of another type)")
        return cls(der[len(_SPKI_PREFIX) :])

    @classmethod
    def from_file(cls, path: Path) -> PublicKey:
        return cls.from_pem(Path(path).read_bytes())

    def to_pem(self) -> bytes:
        b64 = base64.b64encode(_SPKI_PREFIX + self.raw)
        return _PEM_BEGIN + b"\n" + b64 + b"\n" + _PEM_END + b"\n"

    @property
    def key_id(self) -> str:
        """First 16 hex digits of the sha256 of the raw key: names the key in manifests."""
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is this key's Ed25519 signature of ``message``."""
        return verify(self.raw, signature, message)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey(key_id={self.key_id!r})"


# --------------------------------------------------------------------------- OpenSSL through ctypes


class _LibCrypto:
    """The few EVP calls Ed25519 verification needs, bound to a loaded libcrypto."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        p, i, z = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        self.new_key = lib.EVP_PKEY_new_raw_public_key
        self.new_key.argtypes, self.new_key.restype = [i, p, ctypes.c_char_p, z], p
        self.free_key = lib.EVP_PKEY_free
        self.free_key.argtypes, self.free_key.restype = [p], None
        self.new_ctx = lib.EVP_MD_CTX_new
        self.new_ctx.argtypes, self.new_ctx.restype = [], p
        self.free_ctx = lib.EVP_MD_CTX_free
        self.free_ctx.argtypes, self.free_ctx.restype = [p], None
        self.init = lib.EVP_DigestVerifyInit
        self.init.argtypes, self.init.restype = [p, p, p, p, p], i
        self.verify = lib.EVP_DigestVerify
        self.verify.argtypes, self.verify.restype = [p, ctypes.c_char_p, z, ctypes.c_char_p, z], i
        self.clear_errors = lib.ERR_clear_error
        self.clear_errors.argtypes, self.clear_errors.restype = [], None

    def __call__(self, raw: bytes, signature: bytes, message: bytes) -> bool:
        key = self.new_key(_NID_ED25519, None, raw, len(raw))
        if not key:
            self.clear_errors()
            return False
        ctx = self.new_ctx()
        try:
            if not ctx or self.init(ctx, None, None, None, key) != 1:
                return False
            return bool(self.verify(ctx, signature, len(signature), message, len(message)) == 1)
        finally:
            if ctx:
                self.free_ctx(ctx)
            self.free_key(key)
            # A failed verification leaves an error on this thread's queue; the ssl module must
            # not find it there later.
            self.clear_errors()


def _loaded_libcrypto_paths() -> list[str]:
    """Paths of the libcrypto the ssl module mapped into this process (Linux), then common names."""
    import ssl  # noqa: F401  (maps libcrypto; asyncio has imported it already)

    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and "libcrypto" in Path(parts[5].strip()).name:
                    path = parts[5].strip()
                    if path not in found:
                        found.append(path)
    except OSError:
        pass
    return [*found, "libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.dylib"]


def _openssl() -> Callable[[bytes, bytes, bytes], bool] | None:
    for path in _loaded_libcrypto_paths():
        try:
            lib = _LibCrypto(ctypes.CDLL(path))
        except (OSError, AttributeError):  # not there, or too old for Ed25519
            continue
        if _self_test(lib):
            return lib
        log.warning("libcrypto at %s fails the Ed25519 self-test; not using it", path)
    return None


def _cryptography() -> Callable[[bytes, bytes, bytes], bool]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    def check(raw: bytes, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    return check


# RFC 8032, section 7.1, TEST 2: one-byte message 0x72.
_TEST_KEY = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
_TEST_SIG = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)


def _self_test(check: Callable[[bytes, bytes, bytes], bool]) -> bool:
    bad = _TEST_SIG[:-1] + bytes([_TEST_SIG[-1] ^ 1])
    return check(_TEST_KEY, _TEST_SIG, b"\x72") and not check(_TEST_KEY, bad, b"\x72")


BACKENDS: dict[str, Callable[[], Callable[[bytes, bytes, bytes], bool] | None]] = {
    "openssl": _openssl,
    "cryptography": _cryptography,
}

_lock = threading.Lock()
_chosen: tuple[str, Callable[[bytes, bytes, bytes], bool]] | None = None


def _backend() -> tuple[str, Callable[[bytes, bytes, bytes], bool]]:
    global _chosen
    with _lock:
        if _chosen is None:
            check = _openssl()
            _chosen = ("openssl", check) if check is not None else ("cryptography", _cryptography())
            log.debug("ed25519 verification through %s", _chosen[0])
        return _chosen


def backend_name() -> str:
    """Which implementation verifies in this process: ``openssl`` or ``cryptography``."""
    return _backend()[0]


def verify(raw_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by the 32-byte ``raw_key``."""
    if len(raw_key) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    return _backend()[1](raw_key, signature, message)
