"""The one place where callback SDKs (awscrt, Greengrass IPC, azure-iot-device) meet the event loop.

SDKs call back from their own threads and hand out ``concurrent.futures.Future`` objects or
coroutines that may never finish (``get_twin`` with nobody answering, a Unix socket that accepts
and stays silent). :class:`SdkBridge` turns each of them into an awaitable with a timeout, keeps
every waiting future in a map that is always cleaned in ``finally``, and moves callbacks onto the
loop with ``call_soon_threadsafe``. Error translation stays with the transport that owns the SDK:
it passes a ``translate`` function.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from runtime.errors import TransportError

__all__ = ["SdkBridge", "Translate"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: ``translate(exc, what)`` turns an SDK exception into our error (the bridge adds ``from exc``).
Translate = Callable[[BaseException, str], TransportError]


def _default_translate(exc: BaseException, what: str) -> TransportError:
    return TransportError(f"{what} failed: {type(exc).__name__}: {exc}")


class SdkBridge:
    """Bridges one transport's SDK to the asyncio loop it was bound on (see :meth:`bind`)."""

    def __init__(self, name: str, translate: Translate = _default_translate) -> None:
        self.name = name
        self._translate = translate
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ loop side

    def bind(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Remember the loop to call back on (the running loop when not given)."""
        self._loop = loop or asyncio.get_running_loop()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"{self.name}: bridge used before bind()")
        return self._loop

    @property
    def pending(self) -> int:
        """How many SDK operations are being waited for right now."""
        return len(self._pending)

    async def wait(self, cf: concurrent.futures.Future[T], what: str, timeout: float) -> T:
        """Await an SDK's concurrent future for at most ``timeout`` seconds.

        Raises :class:`TransportError` on timeout (naming ``what``) or with the translated SDK error.
        """
        loop = self.loop
        fut: asyncio.Future[T] = loop.create_future()
        key = next(self._ids)
        self._pending[key] = fut

        def transfer(done: concurrent.futures.Future[T]) -> None:  # on the loop
            if fut.done():  # timed out or failed by fail_all() already
                return
            if done.cancelled():
                fut.set_exception(TransportError(f"{what}: cancelled by the SDK"))
                return
            exc = done.exception()
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(done.result())

        cf.add_done_callback(lambda done: self.soon(transfer, done))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            cf.cancel()  # the SDKs ignore it once the operation has started; harmless
            raise TransportError(f"{what}: no answer within {timeout:g} s") from None
        except TransportError:
            raise
        except Exception as exc:
            raise self._translate(exc, what) from exc
        finally:
            self._pending.pop(key, None)

    async def call(self, fn: Callable[[], T], what: str, timeout: float) -> T:
        """Run a blocking SDK call in its own daemon thread, waiting at most ``timeout`` seconds.

        A daemon thread, not the loop's default executor: a call that never returns must not hold
        up the loop's shutdown (``asyncio.run`` joins the default executor).
        """
        cf: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not cf.set_running_or_notify_cancel():
                return
            try:
                cf.set_result(fn())
            except BaseException as exc:
                cf.set_exception(exc)

        threading.Thread(target=run, name=f"{self.name}:{what}", daemon=True).start()
        return await self.wait(cf, what, timeout)

    async def run(self, aw: Awaitable[T], what: str, timeout: float) -> T:
        """Await an SDK coroutine (azure-iot-device's aio client) for at most ``timeout`` seconds."""
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        key = next(self._ids)
        self._pending[key] = task
        try:
            async with asyncio.timeout(timeout):
                return await task
        except TimeoutError:
            raise TransportError(f"{what}: no answer within {timeout:g} s") from None
        except TransportError:
            raise
        except asyncio.CancelledError:
            if task.cancelled() and not _current_task_cancelling():
                raise TransportError(f"{what}: cancelled") from None
            raise
        except Exception as exc:
            raise self._translate(exc, what) from exc
        finally:
            self._pending.pop(key, None)
            if not task.done():
                task.cancel()

    def fail_all(self, reason: str) -> None:
        """Fail every pending wait at once (the transport is stopping or its link dropped)."""
        for fut in list(self._pending.values()):
            if not fut.done():
                if isinstance(fut, asyncio.Task):
                    fut.cancel()
                else:
                    fut.set_exception(TransportError(reason))

    # ------------------------------------------------------------------ SDK-thread side

    def soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the loop; safe from any thread. Dropped once the loop is closed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            logger.debug("%s: callback %s dropped, no loop", self.name, getattr(fn, "__name__", fn))
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the check and the call
            logger.debug("%s: callback dropped, loop closed", self.name)

    def threadsafe(self, fn: Callable[..., object]) -> Callable[..., None]:
        """Wrap a loop-side function as an SDK callback that may be invoked from any thread."""

        def callback(*args: Any) -> None:
            self.soon(fn, *args)

        return callback


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())
