"""Read-only HTTP server for model artifacts (``GET /artifacts/{name}/v{version}/{file}``) in a thread.

Devices check size, sha256 and the manifest's signature themselves, so this server only has to
serve bytes; it still refuses paths outside the artifacts folder.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["ArtifactServer"]

logger = logging.getLogger(__name__)


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if not self.path.startswith("/artifacts/") or ".." in self.path:
            self.send_error(404)
            return
        self.path = self.path[len("/artifacts") :]
        super().do_GET()

    def list_directory(self, path: Any) -> None:
        self.send_error(404)
        return None

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http %s " + format, self.address_string(), *args)


class ArtifactServer:
    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 8780) -> None:
        self.root = Path(root)
        self.httpd = ThreadingHTTPServer((host, port), partial(_Handler, directory=str(self.root)))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="artifact-http", daemon=True)
        self._thread.start()
        logger.info("serving artifacts from %s on port %d", self.root, self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
