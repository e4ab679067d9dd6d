"""Outbox replay after a repaired log (issue 13 review): every record's seq was issued once,
so none may be numbered again, even when the "add" before it was dropped."""

from __future__ import annotations

import numpy as np

from fedloom.algorithms.outbox import Outbox
from fedloom.transport.wire import Update


def _update(seq: int) -> Update:
    return Update("s", seq, 0, {"w": np.zeros(4, dtype=np.float32)}, 1)


def _add(seq: int) -> dict[str, object]:
    return {"op": "add", "seq": seq, "update": _update(seq)}


def test_an_ack_whose_add_was_dropped_still_raises_the_seq() -> None:
    box = Outbox("site/pending")
    box.restore({"seq": 0, "pending": []}, [_add(1), _add(2), {"op": "ack", "seq": 3}])
    assert box.seq == 3 and [u.seq for u in box.pending()] == [1, 2]
    assert box.next_seq() == 4  # not 3: the parent may have applied update 3


def test_a_floor_record_raises_the_seq_and_nothing_else() -> None:
    box = Outbox("site/pending")
    box.restore({"seq": 2, "pending": [_update(2)]}, [{"op": "floor", "seq": 40}])
    assert box.seq == 40 and [u.seq for u in box.pending()] == [2]


def test_replay_still_skips_adds_of_known_seqs() -> None:
    box = Outbox("site/pending")
    box.restore({"seq": 5, "pending": [_update(5)]}, [_add(4), _add(5), {"op": "ack", "seq": 5}])
    assert box.seq == 5 and box.pending() == []
