"""The SDK-to-asyncio bridge: timeouts on every wait, pending futures always removed, callbacks on the loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest
from helpers_cloudsdk import run_async

from runtime.errors import TransportError
from runtime.transports._bridge import SdkBridge


def _translate(exc: BaseException, what: str) -> TransportError:
    return TransportError(f"sdk: {what}: {type(exc).__name__}: {exc}")


def test_a_future_completed_from_another_thread_resolves_on_the_loop() -> None:
    async def scenario() -> tuple[int, bool]:
        bridge = SdkBridge("t", _translate)
        bridge.bind()
        cf: concurrent.futures.Future[int] = concurrent.futures.Future()
        threading.Timer(0.05, cf.set_result, args=(42,)).start()
        value = await bridge.wait(cf, "op", timeout=5)
        return value, bridge.pending == 0

    assert run_async(scenario()) == (42, True)


def test_timeouts_errors_and_late_answers_leave_nothing_pending() -> None:
    async def scenario() -> None:
        bridge = SdkBridge("t", _translate)
        bridge.bind()
        never: concurrent.futures.Future[int] = concurrent.futures.Future()
        with pytest.raises(TransportError, match=r"publish: no answer within 0\.1 s"):
            await bridge.wait(never, "publish", timeout=0.1)
        assert bridge.pending == 0

        late: concurrent.futures.Future[int] = concurrent.futures.Future()
        with pytest.raises(TransportError, match="no answer"):
            await bridge.wait(late, "late", timeout=0.05)
        if late.set_running_or_notify_cancel():  # the SDK answers after we gave up: ignored, no error
            late.set_result(1)
        await asyncio.sleep(0)

        failed: concurrent.futures.Future[int] = concurrent.futures.Future()
        failed.set_exception(OSError("socket closed"))
        with pytest.raises(TransportError, match="sdk: sub: OSError: socket closed") as info:
            await bridge.wait(failed, "sub", timeout=1)
        assert isinstance(info.value.__cause__, OSError)
        assert bridge.pending == 0

    run_async(scenario())


def test_fail_all_releases_every_waiter() -> None:
    async def scenario() -> None:
        bridge = SdkBridge("t", _translate)
        bridge.bind()
        futures = [concurrent.futures.Future[int]() for _ in range(3)]
        waiters = [asyncio.ensure_future(bridge.wait(f, f"op{i}", timeout=30)) for i, f in enumerate(futures)]
        await asyncio.sleep(0)
        assert bridge.pending == 3
        bridge.fail_all("link lost")
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, TransportError) and "link lost" in str(r) for r in results)
        assert bridge.pending == 0

    run_async(scenario())


def test_a_blocking_call_that_never_returns_times_out_and_does_not_hold_the_loop() -> None:
    release = threading.Event()

    async def scenario() -> float:
        bridge = SdkBridge("t", _translate)
        bridge.bind()
        t0 = time.monotonic()
        with pytest.raises(TransportError, match=r"get_twin: no answer within 0\.2 s"):
            await bridge.call(release.wait, "get_twin", timeout=0.2)
        assert await bridge.call(lambda: "ok", "quick", timeout=5) == "ok"
        return time.monotonic() - t0

    t0 = time.monotonic()
    elapsed = run_async(scenario())
    total = time.monotonic() - t0  # includes asyncio.run()'s shutdown: the stuck thread is not joined
    release.set()
    assert elapsed < 2 and total < 2


def test_coroutines_get_a_timeout_and_are_cancelled() -> None:
    async def scenario() -> None:
        bridge = SdkBridge("t", _translate)
        bridge.bind()
        cancelled = asyncio.Event()

        async def hangs() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(TransportError, match=r"no answer within 0\.1 s"):
            await bridge.run(hangs(), "get_twin", timeout=0.1)
        assert cancelled.is_set() and bridge.pending == 0

        async def fails() -> None:
            raise ValueError("bad twin")

        with pytest.raises(TransportError, match="sdk: patch: ValueError: bad twin"):
            await bridge.run(fails(), "patch", timeout=1)

    run_async(scenario())


def test_callbacks_from_sdk_threads_run_on_the_loop_thread() -> None:
    async def scenario() -> bool:
        bridge = SdkBridge("t", _translate)
        bridge.bind()
        loop_thread = threading.get_ident()
        seen: list[tuple[int, str]] = []
        done = asyncio.Event()

        def on_event(value: str) -> None:
            seen.append((threading.get_ident(), value))
            done.set()

        threading.Thread(target=bridge.threadsafe(on_event), args=("hello",)).start()
        async with asyncio.timeout(5):
            await done.wait()
        return seen == [(loop_thread, "hello")]

    assert run_async(scenario())
    # after the loop is gone, late SDK callbacks are dropped quietly
    bridge = SdkBridge("t", _translate)
    bridge.bind(asyncio.new_event_loop())
    bridge.loop.close()
    bridge.soon(print, "never")
