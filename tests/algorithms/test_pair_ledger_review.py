"""Review of the root's site-update pair ledger after far pairs are taken unrecorded
(``PairLedger.take``): an honest site whose run of updates its region decided stale."""

from __future__ import annotations

import dataclasses

import tests.algorithms.test_failover as tf
from fedloom.algorithms.incorporation import PAIR_AHEAD, PAIR_BEHIND
from fedloom.transport.wire import Ack, Overlap
from tests.algorithms.alg_helpers import metrics, recv, sends


def test_an_honest_straggler_is_not_left_outside_the_ledger_for_good() -> None:
    """Its region decided more than ``PAIR_AHEAD`` of its updates stale (a gap no forward
    fills), so its later pairs are all far: taken, kept apart from the watermark, and a
    standby's second delivery of one is still named taken."""
    root = tf.fresh_root()
    assert sends(root.handle(recv("r0", tf.forward(1, (("s1", 1),), count=1)), 1.0), Ack)
    # r0 decided s1's updates 2 .. PAIR_AHEAD + 2 stale: no forward carries them. The
    # site goes on; r0 forwards each of its next updates, many more than PAIR_BEHIND.
    nxt = PAIR_AHEAD + 3
    run = 3 * PAIR_BEHIND
    for k in range(run):
        out = root.handle(recv("r0", tf.forward(2 + k, (("s1", nxt + k),), count=1)), 2.0)
        assert sends(out, Ack) and metrics(out, "update_applied"), k
    # The site failed over before hearing its last update settled, and its standby
    # delivers it again: the ledger must name it taken, not apply it a second time.
    again = dataclasses.replace(tf.forward(1, (("s1", nxt + run - 1),), count=1), src="r0b")
    out = root.handle(recv("r0b", again), 3.0)
    assert sends(out, Overlap) and not metrics(out, "update_applied")
