"""A region that inflates ``count`` to claim more site updates than it could have folded in.

The parent checks a forward's ``pairs`` against its ``count`` (``PairLedger.problem``) and
clamps ``count`` to what the region's subtree can produce in one flush
(``ClaimBounds.count_bound``). The pairs must be bounded by the count the parent believes,
not by the one the region wrote: otherwise one forward of weight 2 settles hundreds of site
updates at the root, and the standby's honest forwards of them are refused as overlaps.
"""

from __future__ import annotations

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.incorporation import PAIR_AHEAD
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.protocol import Persist
from fedloom.transport.wire import Ack, Overlap, Update
from tests.algorithms.alg_helpers import hello, labels, metrics, model, recv, sends

SITES = ("s1", "s2", "s3")
REGION_COUNT = 2  # what one flush of the region's buffer carries


def fresh_root() -> FedBuffAggregator:
    root = FedBuffAggregator(
        "root",
        {"r0": "region", "r0b": "region"},
        model(0.0),
        buffer_size=4,
        concurrency=1,
        claim_bounds=ClaimBounds(region_counts={"r0": REGION_COUNT, "r0b": REGION_COUNT}),
    )
    root.set_subtrees({"r0": SITES, "r0b": SITES})
    for r in ("r0", "r0b"):
        root.handle(hello(r, "region"), 0.0)
    return root


def test_a_region_inflating_its_count_cannot_claim_more_pairs_than_its_bound() -> None:
    root = fresh_root()
    # Every update each site will make for a while: far more than one flush can carry.
    claimed = tuple((s, q) for s in SITES for q in range(1, PAIR_AHEAD + 1))
    evil = Update("r0", 1, 0, model(0.01), 10, count=10**15, pairs=claimed)
    out = root.handle(recv("r0", evil), 1.0)
    assert [m.labels for m in metrics(out, "update_rejected")] == [{"reason": "pairs_exceed_count"}]
    assert not sends(out, Ack) and not [e for e in out if isinstance(e, Persist)]
    assert root.applied == 0
    assert all(root._pairs.watermark(s) == 0 for s in SITES)
    # The standby's honest forward of the sites' next updates is taken, not refused.
    honest = Update("r0b", 1, 0, model(0.1), 20, count=2, pairs=(("s1", 1), ("s2", 1)))
    out = root.handle(recv("r0b", honest), 2.0)
    assert sends(out, Ack) and not sends(out, Overlap) and root.applied == 1


def test_pairs_within_the_clamped_count_are_still_taken() -> None:
    root = fresh_root()
    # An inflated count is clamped as before; its pairs fit the clamped count: taken.
    fwd = Update("r0", 1, 0, model(0.01), 10, count=10**15, pairs=(("s1", 1), ("s2", 1)))
    out = root.handle(recv("r0", fwd), 1.0)
    assert sends(out, Ack) and root.applied == 1
    clamped = [labels(m) for m in metrics(out, "update_claim_clamped")]
    assert {"src": "r0", "field": "count"} in clamped
