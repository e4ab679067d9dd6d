"""A site flooding a secure FedAvg root with joins that answer no task of the open round.

Each such join is late: recorded (a durable write) and acked, never masked. A plain
update that answers no task is decided within the site's share of the round (its quota)
and held or dropped beyond it, so a flood costs a few writes per round; a join must not
be a way around that bound.
"""

from __future__ import annotations

from fedloom.algorithms.aggregator_base import APPLIED_KEY
from fedloom.algorithms.protocol import Persist, Received
from fedloom.transport.wire import SecAggJoin
from tests.algorithms.test_secagg_sync import SyncFed, secagg

FLOOD = 2_000


def writes(effects: list[object]) -> int:
    return sum(isinstance(e, Persist) and e.key == APPLIED_KEY for e in effects)


def test_unasked_joins_cost_a_secure_sync_root_a_few_writes_per_round() -> None:
    fed = SyncFed(6, k=5, cfg=secagg(min_cohort=3))
    root = fed.root
    idle = [s for s in fed.sites if s not in fed.busy()]
    evil = idle[0] if idle else fed.sites[0]
    out: list[object] = []
    for i in range(FLOOD):
        join = SecAggJoin(evil, 1_000 + i, root.version, -1, 10)
        out += root.handle(Received(evil, join), 1.0 + i * 0.001)
    assert writes(out) <= root.clients_per_round  # within its share of the round
    assert root.late == writes(out)
    # The round itself goes on: the selected sites' answers make its cohort.
    fed.train()
    fed.drain()
    assert root.version == 1 and root.rounds_closed == 1
