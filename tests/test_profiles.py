"""Device profiles in devices/profiles/ are valid configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.config import load_settings

PROFILES = sorted((Path(__file__).resolve().parent.parent / "devices" / "profiles").glob("*.toml"))


def test_three_profiles_ship():
    assert {p.stem for p in PROFILES} >= {"raspberry-pi", "greengrass-core", "container"}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_loads(profile: Path):
    s = load_settings(profile, env={"EDGELOOP_DEVICE_ID": "pi-0001"})
    assert s.device_id == "pi-0001"
    assert s.state_dir.is_absolute() and s.public_key.is_absolute()
