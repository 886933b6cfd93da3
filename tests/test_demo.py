"""The demo closes the loop, headless and short, as CI runs it."""

from __future__ import annotations

import asyncio
import json

from devices.demo import DemoOptions, run_demo


def test_demo_closes_the_loop(tmp_path, machine_broker):
    opts = DemoOptions(devices=6, duration=75.0, broker=machine_broker, out=tmp_path / "demo", headless=True, rate=6.0)
    result = asyncio.run(asyncio.wait_for(run_demo(opts), 200))
    assert result.ok, result.failed
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert summary["readings_accepted"] == summary["results_stored"] > 0
    png = (tmp_path / "demo" / "fleet_mae.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "demo" / "cloud.db").stat().st_size > 0
