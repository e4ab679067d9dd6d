import numpy as np
import pytest

from fedloom.algorithms.dispatcher import TaskDispatcher


def make(n: int = 5, concurrency: int = 2, timeout: float | None = 10.0) -> TaskDispatcher:
    return TaskDispatcher(
        [f"s{i}" for i in range(n)],
        concurrency=concurrency,
        task_timeout_s=timeout,
        rng=np.random.default_rng(0),
    )


def test_fills_to_concurrency_with_distinct_up_sites() -> None:
    d = make()
    assert d.start(0.0) == []  # nobody up yet
    for i in range(5):
        d.mark_up(f"s{i}")
    started = d.start(0.0)
    assert len(started) == 2
    assert len({s for _, s in started}) == 2
    assert d.in_flight == 2 and d.idle_count == 3
    assert d.start(1.0) == []


def test_complete_frees_the_slot_only_for_the_right_site() -> None:
    d = make()
    for i in range(3):
        d.mark_up(f"s{i}")
    (task, site), _ = d.start(0.0)
    other = next(f"s{i}" for i in range(3) if f"s{i}" != site)
    assert not d.complete(task, other)
    assert d.complete(task, site)
    assert not d.complete(task, site)
    assert d.in_flight == 1


def test_timeout_frees_slot_and_site_stays_eligible() -> None:
    d = make(n=1, concurrency=1, timeout=5.0)
    d.mark_up("s0")
    [(task, _)] = d.start(0.0)
    assert d.next_deadline() == 5.0
    assert d.expire(4.9) == []
    assert d.expire(5.0) == [(task, "s0")]
    assert d.in_flight == 0 and d.idle_count == 1
    assert d.next_deadline() is None
    [(task2, site)] = d.start(5.0)
    assert site == "s0" and task2 != task


def test_lazy_deletion_skips_completed_tasks() -> None:
    d = make(n=3, concurrency=3, timeout=5.0)
    for i in range(3):
        d.mark_up(f"s{i}")
    started = d.start(0.0)
    for task, site in started[:2]:
        d.complete(task, site)
    assert d.expire(100.0) == [started[2]]


def test_down_cancels_task_and_removes_from_idle() -> None:
    d = make(n=2, concurrency=1)
    d.mark_up("s0")
    d.mark_up("s1")
    [(task, site)] = d.start(0.0)
    assert d.mark_down(site) == task
    assert d.in_flight == 0
    assert d.idle_count == 1
    assert d.mark_down(site) is None
    d.mark_up(site)
    assert d.idle_count == 2
    assert d.expire(1e9) == []  # the cancelled task never times out


def test_random_pick_is_seeded_and_covers_sites() -> None:
    picks = []
    for _ in range(2):
        d = make(n=50, concurrency=1, timeout=None)
        for i in range(50):
            d.mark_up(f"s{i}")
        seq = []
        for _ in range(200):
            [(task, site)] = d.start(0.0)
            d.complete(task, site)
            seq.append(site)
        picks.append(seq)
    assert picks[0] == picks[1]
    assert len(set(picks[0])) > 40


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make(concurrency=-1)
    with pytest.raises(ValueError):
        make(timeout=0.0)


def test_hello_again_in_the_same_session_keeps_the_task() -> None:
    d = make(n=1, concurrency=1)
    assert d.mark_up("s0")
    [(task, _)] = d.start(0.0)
    assert not d.mark_up("s0")  # same session: the task stays, nothing to start
    assert d.in_flight == 1 and d.idle_count == 0 and d.task_site(task) == "s0"
    assert d.mark_down("s0") == task  # a new session follows a PeerDown, which cancels
    assert d.mark_up("s0") and d.idle_count == 1
    assert not d.mark_up("stranger")


def test_a_benched_site_gets_no_task_until_unbenched() -> None:
    d = make(n=2, concurrency=2)
    d.mark_up("s0")
    d.mark_up("s1")
    d.bench("s0")
    assert [site for _, site in d.start(0.0)] == ["s1"]
    [(task, _)] = [(t, "s1") for t in d.tasks()]
    d.bench("s1")  # a task in flight stays; its completion does not make s1 idle
    assert d.complete(task, "s1") and d.idle_count == 0
    d.unbench()
    assert sorted(site for _, site in d.start(0.0)) == ["s0", "s1"]
