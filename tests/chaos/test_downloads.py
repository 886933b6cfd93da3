"""Artifact downloads under faults: cut halfway, a hanging server, a slow drip, a redirect loop, and
artifacts larger than the cap. Each update fails with its reason in the reported state, the old
model keeps serving, and the next desired state still applies.

The device is a real :class:`Daemon` on the in-memory uplink; the artifact comes over real HTTP
from :class:`FaultServer` on a free loopback port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from chaos.faultkit import FaultServer, linear_onnx, onnx_manifest, report
from helpers_device import desired, linear_manifest, settings, until

from runtime.daemon import Daemon
from runtime.protocol import ReportedState, decode
from runtime.transports.memory import MemoryUplink

CAP = 4096
TIMEOUT = 0.5  # download_timeout: each socket operation; the whole download gets twice that

FAULTS = {
    # name: (path kind, manifest size override, words the reported reason must contain)
    "cut-halfway": ("cut", None, ("incomplete",)),
    "server-hangs": ("hang", None, ("timed out",)),
    "slow-drip": ("drip", None, ("timed out",)),
    "redirect-loop": ("loop", None, ("redirect",)),
    "redirect-to-file-scheme": ("to-file", None, ("redirect", "not allowed")),
    "manifest-over-cap": ("good", CAP + 1, ("exceeds the cap",)),
    "server-sends-over-cap": ("big", None, ("exceeds the cap",)),
    "no-length-endless": ("nolength", None, ("larger than",)),
    "not-found": ("missing", None, ("HTTP 404",)),
}


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer(extra=1 << 20, nolength_bytes=1 << 20, drip_interval=0.2) as s:
        yield s


def reported(up: MemoryUplink) -> ReportedState:
    return decode(ReportedState, up.of("reported")[-1])


@pytest.mark.parametrize("fault", list(FAULTS))
def test_download_fault_fails_with_reason_old_model_serves_next_applies(
    fault: str, server: FaultServer, tmp_path: Path, fleet_keys
) -> None:
    key, pub = fleet_keys
    kind, size, words = FAULTS[fault]
    good = linear_onnx([1.0, 1.0], 0.0)  # y = a + b
    server.files["model.onnx"] = good

    async def go() -> float:
        s = settings(
            tmp_path,
            pub,
            "dev-1",
            transport="memory",
            update={"allowed_schemes": ["http"], "download_timeout": TIMEOUT, "max_artifact_bytes": CAP},
        )
        up = MemoryUplink.from_settings(s)
        d = Daemon(s, uplink=up)
        m1 = linear_manifest(key, 1)  # y = 2a - b + 0.5
        d.store.install(m1)
        d.store.activate(m1.ref)
        await d.start()

        bad = onnx_manifest(key, 2, good, url=server.url(kind), size=size)
        t0 = time.monotonic()
        up.deliver("desired", desired(bad, "dev-1", rollout="r-bad"))
        await until(
            lambda: bool(up.of("reported")) and reported(up).update.state == "failed",
            10 * TIMEOUT + 5,
            f"the update to fail on {fault}",
        )
        elapsed = time.monotonic() - t0
        r = reported(up)
        reason = r.update.reason or ""
        assert all(w.lower() in reason.lower() for w in words), f"{fault}: reason {reason!r} should name {words}"
        assert r.update.version == 2 and r.update.rollout_id == "r-bad"
        assert r.active is not None and r.active.version == 1
        assert not d.store.has(bad.ref)
        # the old model keeps serving: readings in, v1's predictions out
        d.pipeline.submit_arrays(np.array([[1.0, 2.0]]))
        d.pipeline.flush()
        claim = d.outbox.claim("results", 10, time.time(), 1000.0)
        assert claim is not None and claim.model_version == [1] and claim.y_pred == [0.5]
        # no partial download left behind (a dripping server's thread stops at the total deadline)
        staging = d.store.root / ".staging"
        await until(lambda: not list(staging.glob("download.*")), 2 * TIMEOUT + 2, "the partial download removed")

        # the next desired state still applies
        server.released.set()  # let a hanging or dripping handler go (its thread is ours to end)
        ok = onnx_manifest(key, 3, good, url=server.url("good"))
        up.deliver("desired", desired(ok, "dev-1", rollout="r-good"))
        await until(lambda: d.pipeline.model_version == 3, 10, "the next update to apply")
        await until(lambda: reported(up).update.state == "applied", 5, "applied in reported state")
        d.pipeline.submit_arrays(np.array([[1.0, 2.0]]))
        d.pipeline.flush()
        claim = d.outbox.claim("results", 10, time.time(), 1000.0)
        assert claim is not None and claim.model_version[-1] == 3 and claim.y_pred[-1] == pytest.approx(3.0)
        assert reported(up).previous.version == 1
        await d.shutdown(0.2)
        return elapsed

    elapsed = asyncio.run(asyncio.wait_for(go(), 60))
    report(f"download fault {fault}: refused after {elapsed:.2f} s ({dict(server.hits)})")
