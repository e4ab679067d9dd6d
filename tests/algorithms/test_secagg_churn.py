"""Members dying on the seal and restarting, round after round, through the real nodes (a
FedBuff root with its cohort coordinator, ``SiteNode``s restored from what they persisted),
as bench/secagg.py's dropouts do on daemons: every dropped member's update joins the next
cohort, every cohort seals all N members, and no site is left without a task (issue 12's
50-site stall was suspected here; it was the bench's gate, see bench/secagg.py)."""

from __future__ import annotations

import pytest

from fedloom.algorithms.protocol import Send
from fedloom.transport.wire import SecAggSeal
from tests.algorithms.test_secagg_nodes import Fed, secagg

N, D, ROUNDS = 10, 2, 5


@pytest.mark.parametrize("restart", ["in_the_view", "after_the_release"])
def test_members_dying_on_the_seal_rejoin_and_every_site_keeps_a_task(restart: str) -> None:
    fed = Fed(N, buffer_size=N, cfg=secagg(min_cohort=3, max_dropout=0.3))
    root = fed.nodes["root"]
    dispatcher = root._dispatcher
    seals_seen = 0
    for rnd in range(ROUNDS):
        # A site trains only with nothing unacknowledged (the bench's gate).
        fed.train([s for s in fed.sites if fed.nodes[s].pending == 0])
        for s in fed.sites:
            fed.flush_link(s, "root")  # the joins
        seals = [
            e.msg
            for n, e in fed.effects
            if n == "root" and isinstance(e, Send) and isinstance(e.msg, SecAggSeal)
        ]
        assert len(seals) == seals_seen + N, f"round {rnd}: no cohort of all {N}"
        seals_seen = len(seals)
        seal = seals[-1]
        assert sorted(seal.members) == fed.sites
        doomed = [seal.members[(3 * rnd + k) % N] for k in range(D)]
        for s in doomed:
            fed.drop(s)  # dies holding the seal: nothing masked, nothing sent
        for s in fed.sites:
            if s not in doomed:
                fed.flush_link("root", s)  # the seals
        for s in fed.sites:
            if s not in doomed:
                fed.flush_link(s, "root")  # the uploads: the view goes out
        if restart == "after_the_release":
            fed.drain()
            assert root.version == rnd + 1
        for s in doomed:  # restarted from what it persisted, its update not uploaded
            ckpt, records = fed.durable(s)
            fresh = fed.build_site(s)
            fresh.restore(ckpt, records)
            assert fresh.pending == 1
            fed.nodes[s] = fresh
            fed.jobs = [(n, j) for n, j in fed.jobs if n != s]  # its job died with it
            fed.link(s, "root", True)
        fed.drain()
        assert root.version == rnd + 1
        holders = {dispatcher.task_site(t) for t in dispatcher.tasks()}
        training = {n for n, _ in fed.jobs}
        assert [s for s in fed.sites if s not in holders and s not in training] == []
        for s in doomed:
            assert fed.nodes[s].pending == 1  # joined again, waiting for the next cohort
