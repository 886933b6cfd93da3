"""Readings in: JSON lines from a file or stdin, the local MQTT ``readings`` topic, or Python code.

Each source parses its input into :class:`runtime.protocol.Reading` and hands it to the pipeline.
Bad lines are counted and logged with the reason; they never stop the source.
A file source resumes from the byte offset committed with its last micro-batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from runtime.errors import ProtocolError
from runtime.pipeline import Pipeline
from runtime.protocol import MAX_PAYLOAD_BYTES, Reading, decode

__all__ = ["FileSource", "StdinSource", "parse_line"]

logger = logging.getLogger(__name__)
_READ_CHUNK = 1 << 16


def parse_line(line: bytes) -> Reading | None:
    """One JSON line → Reading; None for a blank line; ProtocolError for a bad one.

    Accepts ``{"ts":…, "features": {...}|[...], "y_true":…}`` or the flat form
    ``{"ts":…, "a": 1.0, "b": 2.0, "y_true":…}`` (every other key is a feature)."""
    line = line.strip()
    if not line:
        return None
    if len(line) > MAX_PAYLOAD_BYTES:  # refuse before parsing, as decode() does
        raise ProtocolError(f"line of {len(line)} bytes exceeds {MAX_PAYLOAD_BYTES}", kind="Reading")
    if b'"features"' in line:
        return decode(Reading, line)
    import json

    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise ProtocolError(f"not valid JSON ({str(exc)[:120]})", kind="Reading") from None
    if not isinstance(obj, dict):
        raise ProtocolError("must be a JSON object", kind="Reading")
    ts = obj.pop("ts", None)
    y = obj.pop("y_true", None)
    obj.pop("v", None)
    try:
        text = json.dumps({"ts": ts, "features": obj, "y_true": y})
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"cannot be re-encoded ({str(exc)[:120]})", kind="Reading") from None
    return decode(Reading, text)


class _LineSource:
    name = "lines"

    def __init__(self, pipeline: Pipeline, *, max_lines: int = 512) -> None:
        self.pipeline = pipeline
        self.max_lines = max_lines
        self.bad = 0
        self.done = asyncio.Event()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _feed(self, lines: list[bytes], position: tuple[str, str] | None) -> None:
        readings: list[Reading] = []
        for raw in lines:
            try:
                r = parse_line(raw)
            except ProtocolError as exc:
                self.bad += 1
                self.pipeline.counters.rejected += 1
                self.pipeline.counters.readings += 1
                logger.warning("%s: bad reading skipped: %s", self.name, exc)
                continue
            if r is not None:
                readings.append(r)
        self.pipeline.submit(readings, position=position)


class FileSource(_LineSource):
    """JSON lines from a file; the read offset is stored with the rows it produced."""

    def __init__(self, pipeline: Pipeline, path: Path, *, follow: bool = False, poll: float = 0.2) -> None:
        super().__init__(pipeline)
        self.path = Path(path)
        self.follow = follow
        self.poll = poll
        self.key = f"source.file:{os.path.abspath(self.path)}"
        self.name = f"file {self.path}"

    async def run(self) -> None:
        try:
            start = int(self.pipeline.outbox.get_meta(self.key) or 0)
        except ValueError:
            start = 0
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed in finally, read across awaits
        except OSError as exc:
            logger.error("cannot open input %s: %s", self.path, exc.strerror)
            self.done.set()
            return
        try:
            f.seek(start)
            offset = start
            buf = b""
            while not self._stop.is_set():
                chunk = f.read(_READ_CHUNK)
                if not chunk:
                    if not self.follow:
                        break
                    await asyncio.sleep(self.poll)
                    continue
                buf += chunk
                lines = buf.split(b"\n")
                buf = lines.pop()  # an incomplete last line waits for more
                consumed = sum(len(x) + 1 for x in lines)
                offset += consumed
                self._feed(lines, (self.key, str(offset)))
                await asyncio.sleep(0)  # let the loop breathe between chunks
            if buf.strip() and not self._stop.is_set():
                offset += len(buf)
                self._feed([buf], (self.key, str(offset)))
            self.pipeline.flush()
            logger.info("input %s: read to offset %d (%d bad lines)", self.path, offset, self.bad)
        finally:
            f.close()
            self.done.set()


class StdinSource(_LineSource):
    """JSON lines on standard input (not replayable: at-most-once across a crash)."""

    name = "stdin"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        transport = None
        try:
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
        except (ValueError, OSError):
            # stdin is a regular file (``< file``): read it in chunks instead.
            await self._read_blocking()
            return
        try:
            batch: list[bytes] = []
            while not self._stop.is_set():
                try:
                    async with asyncio.timeout(0.05):
                        line = await reader.readline()
                except TimeoutError:
                    if batch:
                        self._feed(batch, None)
                        batch = []
                    continue
                except ValueError as exc:  # a line over the limit
                    logger.warning("stdin: line skipped: %s", exc)
                    continue
                if not line:
                    break
                batch.append(line)
                if len(batch) >= self.max_lines:
                    self._feed(batch, None)
                    batch = []
                    await asyncio.sleep(0)
            if batch:
                self._feed(batch, None)
            self.pipeline.flush()
        finally:
            if transport is not None:
                transport.close()
            self.done.set()

    async def _read_blocking(self) -> None:
        try:
            buf = b""
            while not self._stop.is_set():
                chunk = sys.stdin.buffer.read(_READ_CHUNK)
                if not chunk:
                    break
                buf += chunk
                lines = buf.split(b"\n")
                buf = lines.pop()
                self._feed(lines, None)
                await asyncio.sleep(0)
            if buf.strip():
                self._feed([buf], None)
            self.pipeline.flush()
        finally:
            self.done.set()
