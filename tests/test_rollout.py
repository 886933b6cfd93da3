"""The rollout lifecycle, driven with explicit time and fleet views (no sockets)."""

from __future__ import annotations

import random

import pytest

from cloud.rollout import (
    TERMINAL,
    DeviceView,
    Rollout,
    RolloutParams,
    RolloutState,
    SetDesired,
    abort,
    choose_canaries,
    parse_target,
    start,
    step,
    supersede,
)

DEVICES = tuple(f"d{i}" for i in range(10))


def make(params: RolloutParams | None = None) -> Rollout:
    rng = random.Random(1)
    views = [DeviceView(d, online=True, active_name="m", active_version=1) for d in DEVICES]
    canaries = choose_canaries(views, 0.2, rng)
    return Rollout(
        id="r1",
        model="m",
        version=2,
        target="all",
        devices=DEVICES,
        canaries=canaries,
        previous=dict.fromkeys(DEVICES, 1),
        params=params or RolloutParams(canary=0.2, bake=10, report_timeout=30, min_labelled=5),
        state=RolloutState.CANARY,
    )


def fleet(r: Rollout, *, canary_version: int, canary_mae: float, control_mae: float, others: int = 1) -> dict:
    out = {}
    for d in r.devices:
        if d in r.canaries:
            out[d] = DeviceView(
                d,
                online=True,
                active_name="m",
                active_version=canary_version,
                live_mae=canary_mae,
                live_n=50,
                model_version_at_telemetry=canary_version,
            )
        else:
            out[d] = DeviceView(
                d,
                online=True,
                active_name="m",
                active_version=others,
                live_mae=control_mae,
                live_n=50,
                model_version_at_telemetry=others,
            )
    return out


def test_parse_target():
    assert parse_target("all") == ("all", ())
    assert parse_target("group:north") == ("group", ("north",))
    assert parse_target("devices:a, b") == ("devices", ("a", "b"))
    for bad in ("", "group:", "devices:", "everyone", "group:a,b"):
        with pytest.raises(ValueError, match="target must be"):
            parse_target(bad)


def test_canaries_at_least_one_and_online_first():
    views = [DeviceView("a", online=False), DeviceView("b", online=True), DeviceView("c", online=False)]
    assert choose_canaries(views, 0.01, random.Random(0)) == ("b",)
    assert len(choose_canaries([DeviceView(str(i), online=True) for i in range(100)], 0.1, random.Random(0))) == 10
    assert choose_canaries([], 0.5, random.Random(0)) == ()


def test_good_canary_is_promoted_then_completed():
    r = make()
    assert len(r.canaries) == 2
    # canaries have not switched yet: nothing happens
    r, d = step(r, 1.0, fleet(r, canary_version=1, canary_mae=1.0, control_mae=1.0))
    assert r.state == RolloutState.CANARY and d == []
    r, d = step(r, 2.0, fleet(r, canary_version=2, canary_mae=1.0, control_mae=1.0))
    assert r.state == RolloutState.BAKING
    r, d = step(r, 5.0, fleet(r, canary_version=2, canary_mae=1.0, control_mae=1.0))
    assert r.state == RolloutState.BAKING  # still baking
    r, d = step(r, 12.5, fleet(r, canary_version=2, canary_mae=1.05, control_mae=1.0))
    assert r.state == RolloutState.PROMOTING
    assert len(d) == 1 and set(d[0].devices) == set(DEVICES) - set(r.canaries) and d[0].version == 2
    assert r.metrics["canary_mae"] == pytest.approx(1.05)
    r, d = step(r, 13.0, fleet(r, canary_version=2, canary_mae=1.0, control_mae=1.0, others=2))
    assert r.state == RolloutState.COMPLETED and r.state in TERMINAL


def test_bad_canary_rolls_back_to_previous_version():
    r = make()
    r, _ = step(r, 2.0, fleet(r, canary_version=2, canary_mae=3.0, control_mae=1.0))
    r, d = step(r, 13.0, fleet(r, canary_version=2, canary_mae=3.0, control_mae=1.0))
    assert r.state == RolloutState.ROLLING_BACK
    assert "canary live MAE 3 > 1.1 x control 1" in (r.reason or "")
    assert d and d[0].rollback and d[0].version == 1 and set(d[0].devices) == set(r.canaries)
    r, d = step(r, 14.0, fleet(r, canary_version=1, canary_mae=1.0, control_mae=1.0))
    assert r.state == RolloutState.ROLLED_BACK and d == []


def test_failed_apply_and_report_timeout_roll_back():
    r = make()
    f = fleet(r, canary_version=1, canary_mae=1.0, control_mae=1.0)
    c = r.canaries[0]
    f[c] = DeviceView(
        c,
        online=True,
        active_version=1,
        update_state="failed",
        update_version=2,
        update_rollout="r1",
        update_reason="signature does not verify",
    )
    r2, _ = step(r, 1.0, f)
    assert r2.state == RolloutState.ROLLING_BACK and "signature does not verify" in (r2.reason or "")
    # nobody reports within the timeout
    r3, _ = step(r, 31.0, fleet(r, canary_version=1, canary_mae=1.0, control_mae=1.0))
    assert r3.state == RolloutState.ROLLING_BACK and "did not report" in (r3.reason or "")


def test_no_live_error_waits_then_gives_up():
    r = make()
    views = {
        d: DeviceView(d, online=True, active_name="m", active_version=2 if d in r.canaries else 1) for d in DEVICES
    }
    r, _ = step(r, 1.0, views)
    r, _ = step(r, 20.0, views)
    assert r.state == RolloutState.BAKING  # waits for labelled readings
    r, _ = step(r, 50.0, views)
    assert r.state == RolloutState.ROLLING_BACK and "no live error" in (r.reason or "")


def test_baseline_used_without_controls():
    r = make(RolloutParams(canary=1.0, bake=1, min_labelled=5))
    r = Rollout(**{**r.__dict__, "canaries": DEVICES})
    r, _ = step(r, 1.0, fleet(r, canary_version=2, canary_mae=2.0, control_mae=0))
    r, _ = step(r, 3.0, fleet(r, canary_version=2, canary_mae=2.0, control_mae=0), baseline_mae=1.0)
    assert r.state == RolloutState.ROLLING_BACK and "baseline" in (r.reason or "")


def test_abort_and_supersede_are_terminal():
    r = make()
    a, d = abort(r, 1.0)
    assert a.state == RolloutState.ABORTED and d == []
    assert abort(a, 2.0)[0] is a
    s = supersede(r, 1.0, "r2")
    assert s.state == RolloutState.SUPERSEDED and "r2" in (s.reason or "")
    with pytest.raises(AssertionError):
        s.move(RolloutState.BAKING, 3.0, "no")


def test_start_tells_canaries_and_records_previous_versions():
    views = [DeviceView(d, online=True, active_name="m", active_version=1) for d in DEVICES]
    r = Rollout("r9", "m", 2, "all", (), (), {}, RolloutParams(canary=0.3))
    assert step(r, 0.0, {})[0] is r  # pending waits for start()
    r2, d = start(r, 5.0, views, random.Random(3))
    assert r2.state == RolloutState.CANARY and len(r2.canaries) == 3 and r2.devices == DEVICES
    assert r2.previous == dict.fromkeys(DEVICES, 1)
    assert d == [SetDesired(r2.canaries, 2)]
    rb = Rollout("r10", "m", 1, "all", (), (), {}, RolloutParams(), rollback=True)
    rb2, d = start(rb, 5.0, views, random.Random(3))
    assert rb2.state == RolloutState.PROMOTING and d == [SetDesired(DEVICES, 1, rollback=True)]
    empty, told = start(r, 5.0, [], random.Random(3))
    assert empty.state == RolloutState.ABORTED and told == []
