"""Artifact downloads for model updates: allowed schemes, size cap, timeout, redirect limit, sha256 on the fly."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from runtime.errors import UpdateError

__all__ = ["download"]

logger = logging.getLogger(__name__)
_CHUNK = 64 * 1024
MAX_REDIRECTS = 5


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS
    max_repeats = 2

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        scheme = urlsplit(newurl).scheme
        if scheme not in self.allowed:
            raise UpdateError(f"redirect to a {scheme!r} URL is not allowed (allowed: {', '.join(self.allowed)})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(
    url: str,
    dest_dir: Path,
    *,
    expected_size: int,
    expected_sha256: str,
    max_bytes: int,
    allowed_schemes: tuple[str, ...],
    timeout: float,
    ca_file: Path | None = None,
    total_timeout: float | None = None,
) -> Path:
    """Download ``url`` into a new file under ``dest_dir``; check size and sha256 while streaming.

    Blocking: the caller runs it in a worker thread. ``timeout`` bounds each socket operation and
    ``total_timeout`` (default twice ``timeout``, as long as the reconciler waits) the whole
    download, so a server that drips a byte now and then cannot keep the thread forever.
    Raises UpdateError with the reason on any failure.
    """
    scheme = urlsplit(url).scheme
    if scheme not in allowed_schemes:
        raise UpdateError(f"artifact URL scheme {scheme!r} is not allowed (allowed: {', '.join(allowed_schemes)})")
    if expected_size > max_bytes:
        raise UpdateError(f"artifact of {expected_size} bytes exceeds the cap of {max_bytes}")
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    handlers: list[urllib.request.BaseHandler] = [
        _LimitedRedirects(allowed_schemes),
        urllib.request.HTTPSHandler(context=ctx),
    ]
    opener = urllib.request.build_opener(*handlers)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix="download.", suffix=".part")
    h = hashlib.sha256()
    got = 0
    deadline = time.monotonic() + (2 * timeout if total_timeout is None else total_timeout)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                resp = opener.open(url, timeout=timeout)
            except urllib.error.HTTPError as exc:
                exc.close()  # it holds the response's socket
                raise UpdateError(f"download failed: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise UpdateError(f"download failed: {reason}") from None
            with resp:
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > max_bytes:
                    raise UpdateError(f"artifact of {length} bytes exceeds the cap of {max_bytes}")
                # read1: return what has arrived, so the deadline is checked while a server drips
                read = getattr(resp, "read1", resp.read)
                while True:
                    try:
                        chunk = read(_CHUNK)
                    except (OSError, ValueError) as exc:
                        raise UpdateError(f"download interrupted after {got} bytes: {exc}") from None
                    if not chunk:
                        break
                    if time.monotonic() > deadline:
                        raise UpdateError(f"download timed out after {got} bytes")
                    got += len(chunk)
                    if got > max_bytes or got > expected_size:
                        raise UpdateError(f"artifact is larger than the {min(max_bytes, expected_size)} bytes expected")
                    h.update(chunk)
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if got != expected_size:
            raise UpdateError(f"download incomplete: {got} of {expected_size} bytes")
        if h.hexdigest() != expected_sha256:
            raise UpdateError("artifact sha256 does not match the manifest")
        return Path(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
