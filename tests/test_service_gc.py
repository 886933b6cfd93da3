"""The cloud service's process tunes the garbage collector (cloud.service.relax_gc).

tests/conftest.py puts the thresholds back after every test."""

from __future__ import annotations

import gc

from cloud.service import _GC_THRESHOLDS, relax_gc


def test_raises_the_default_thresholds() -> None:
    gc.set_threshold(700, 10, 10)
    relax_gc()
    assert gc.get_threshold() == _GC_THRESHOLDS


def test_never_lowers_a_higher_setting_and_leaves_collection_disabled() -> None:
    gc.set_threshold(50_000, 5, 100)
    relax_gc()
    assert gc.get_threshold() == (50_000, _GC_THRESHOLDS[1], 100)
    gc.set_threshold(0, 10, 10)
    relax_gc()
    assert gc.get_threshold()[0] == 0
