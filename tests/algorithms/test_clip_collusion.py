"""Colluding senders against the "auto" norm clip (second review, finding 2).

Two rostered sites that answer every task at once with a huge delta each learn their bound
from the other's clipped norms; when a sender could hold many entries of the window, the
two ratcheted the bound x3 per window and took over the model. The bound now comes from
each other sender's LATEST clipped norm, one entry per sender, so a minority of colluders
cannot move the median. The attacks are run on ``NormClip`` and through a FedBuff root with
its defaults (robust mean, auto clip).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.robust import AUTO_FACTOR, AUTO_WINDOW, NormClip
from fedloom.algorithms.weights_math import is_finite, l2_norm, sub
from tests.algorithms.alg_helpers import acks, hello, model, recv, requests, upd

HONEST = ("s0", "s1", "s2", "s3", "s4")
EVIL = ("evil1", "evil2")


def test_two_colluders_cannot_ratchet_the_clip() -> None:
    clip = NormClip("auto", {"w": np.ones(100, np.float32)})  # starts at 10
    honest = {"w": np.full(100, 0.1, np.float32)}  # norm 1
    for s in HONEST:
        clip.apply(honest, l2_norm(honest), s)
    huge = {"w": np.full(100, 1e6, np.float32)}
    for _ in range(320):  # 640 updates, every window's worth many times over
        for e in EVIL:
            out, clipped = clip.apply(huge, l2_norm(huge), e)
            assert clipped and l2_norm(out) <= AUTO_FACTOR * 1.0 * (1 + 1e-6)
    for s in (*HONEST, *EVIL):  # everybody's bound stays within 3x the honest median
        bound = clip.bound(s)
        assert bound is not None and bound <= AUTO_FACTOR * 1.0 * (1 + 1e-6), s


def test_a_flooding_sender_holds_one_entry_and_cannot_push_the_others_out() -> None:
    clip = NormClip("auto", {"w": np.ones(4, np.float32)})
    for s in HONEST:
        clip.apply({"w": np.ones(4, np.float32)}, 2.0, s)
    for _ in range(10_000):  # one sender's flood
        clip.apply({"w": np.ones(4, np.float32)}, 1e30, "evil")
    assert clip.bound("evil") == AUTO_FACTOR * 2.0
    assert len(clip.snapshot()["recent"]) == len(HONEST) + 1
    # Only distinct senders take room: AUTO_WINDOW of them are kept, the latest heard.
    for i in range(AUTO_WINDOW):
        clip.apply({"w": np.ones(4, np.float32)}, 2.0, f"site{i}")
    senders = [s for s, _ in clip.snapshot()["recent"]]
    assert len(senders) == AUTO_WINDOW and "evil" not in senders


def test_fewer_than_enough_other_senders_leave_the_starting_bound() -> None:
    clip = NormClip("auto", {"w": np.array([3.0, 4.0], np.float32)})  # starts at 5
    for e in EVIL:  # two senders alone never leave it, however often they send
        for _ in range(100):
            clip.apply({"w": np.array([3e6, 4e6], np.float32)}, 5e6, e)
    assert clip.bound("evil1") == clip.bound("evil2") == 5.0


def test_the_clip_state_survives_a_checkpoint_exactly_and_reads_older_ones() -> None:
    ref = {"w": np.ones(4, np.float32)}
    clip = NormClip("auto", ref)
    for i, s in enumerate((*HONEST, "evil", "s0", None, None)):
        clip.apply(ref, 0.5 + i, s)
    back = NormClip("auto", {"w": np.zeros(4, np.float32)})  # a later model: another start
    back.restore(clip.snapshot())
    assert back.snapshot() == clip.snapshot()
    for s in (*HONEST, "evil", "new", None):
        assert back.bound(s) == clip.bound(s)
    # Older checkpoints: several norms per sender (the newest wins) or bare norms.
    old = NormClip("auto", ref)
    old.restore({"recent": [["a", 9.0], ["b", 1.0], ["a", 1.0], ["c", 1.0], ["d", 1.0]]})
    assert [s for s, _ in old.snapshot()["recent"]] == ["b", "a", "c", "d"]
    old.restore({"recent": [1.0, 1.0, 1.0, 1.0, 1.0]})
    assert old.bound("a") == AUTO_FACTOR * 1.0


def test_two_colluding_sites_do_not_take_over_a_fedbuff_root() -> None:
    sites = {s: "site" for s in (*HONEST, *EVIL)}
    agg = FedBuffAggregator("root", sites, model(0.5), buffer_size=2, concurrency=7)
    task: dict[str, int] = {}
    for s in sites:
        task.update((p, r.task) for p, r in requests(agg.handle(hello(s), 0.0)))
    for s in HONEST:  # each honest site answers once
        out = agg.handle(recv(s, upd(s, 1, agg.version, 0.1, task=task.pop(s))), 1.0)
        task.update((p, r.task) for p, r in requests(out))
    honest_norm = l2_norm(model(0.1))
    v0, start = agg.current_model()
    for seq in range(1, 201):  # then the colluders answer every task they get at once
        before = agg.current_model()[1]
        for e in EVIL:
            out = agg.handle(recv(e, upd(e, seq, agg.version, -1e5, task=task.pop(e, -1))), 2.0)
            task.update((p, r.task) for p, r in requests(out))
        # A flush is a mean of clipped deltas: it moves by at most 3x the honest norm.
        assert l2_norm(sub(agg.current_model()[1], before)) <= AUTO_FACTOR * honest_norm * 1.001
    assert agg.version >= 200  # FedBuff takes every answer to a task it gave (finding 5)
    weights = agg.current_model()[1]
    assert is_finite(weights)
    drift = l2_norm(sub(weights, start))
    assert drift <= (agg.version - v0) * AUTO_FACTOR * honest_norm * 1.001  # linear, no run-away
    # Still serving: an honest answer is taken.
    out = agg.handle(recv("s0", upd("s0", 2, agg.version, 0.1, task=task.get("s0", -1))), 3.0)
    assert ("s0", "s0", 2) in acks(out)


def test_a_restored_clip_refuses_norms_no_live_clip_learns() -> None:
    """A NaN, infinite or negative norm in a checkpoint would switch the clip off (every
    comparison with NaN is false); a zero norm (a zero delta's) is kept."""
    ref = {"w": np.ones(4, np.float32)}
    clip = NormClip("auto", ref)
    clip.restore({"recent": [["a", 0.0], ["b", 1.0]], "initial": 2.0})
    assert clip.snapshot() == {"recent": [["a", 0.0], ["b", 1.0]], "initial": 2.0}
    bad: list[object] = [
        {"recent": [[f"x{i}", float("nan")] for i in range(4)]},
        {"recent": [[f"x{i}", float("inf")] for i in range(4)]},
        {"recent": [["a", -1.0]]},
        {"recent": [-1.0]},
        {"recent": [["a", "1"]]},
        {"recent": [["a", 1.0, 2.0]]},
        {"recent": [[5, 1.0]]},
        {"recent": 5},
        {"initial": float("nan")},
        {"initial": "x"},
        [1],
    ]
    for state in bad:
        with pytest.raises(ValueError, match="clip"):
            clip.restore(state)  # type: ignore[arg-type]
