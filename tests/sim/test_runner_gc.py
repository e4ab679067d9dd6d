"""``sim.runner.collector_paused_while_building``: the cyclic collector around one run."""

from __future__ import annotations

import gc

from fedloom.sim.runner import RUN_GC_THRESHOLD, collector_paused_while_building


def test_paused_while_building_then_frozen_for_the_run_and_released_after() -> None:
    # An earlier test in this process (a daemon's or a bench's start-up) may have frozen
    # what it built: start from nothing frozen, as `fedloom sim` does.
    gc.unfreeze()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    with collector_paused_while_building() as running:
        assert not gc.isenabled()
        built = [[i] for i in range(1000)]  # long-lived containers the run keeps
        running()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(built)
        assert gc.get_threshold()[0] == max(thresholds[0], RUN_GC_THRESHOLD)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds


def test_leaves_a_callers_disabled_collector_and_frozen_objects_alone() -> None:
    gc.disable()
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        with collector_paused_while_building() as running:
            running()
            assert not gc.isenabled()
        assert not gc.isenabled()
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        gc.enable()


def test_an_error_while_building_restores_the_collector() -> None:
    try:
        with collector_paused_while_building():
            raise RuntimeError("bad scenario")
    except RuntimeError:
        pass
    assert gc.isenabled() and gc.get_freeze_count() == 0
