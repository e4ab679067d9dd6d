"""The start quorum (``AggregatorBase.set_start_quorum``): an aggregator's first tasks and
model broadcasts wait until enough distinct rostered children are up, or the wait is over;
a dead, flapping or stranger child never holds it back longer; a restart waits again."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fedloom.algorithms.aggregator_base import AggregatorBase
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Event,
    Log,
    LogRecords,
    PeerDown,
    PeerUp,
    Persist,
    Received,
)
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.transport.wire import Hello, ModelBroadcast
from tests.algorithms.alg_helpers import acks, labels, metrics, model, requests, sends, upd

TRAINING = TrainingConfig(lr=0.1, local_steps=1, batch_size=4, mu=0.0)
WAIT = 5.0


def quorum_params(quorum: int | str = "all", wait: float = WAIT, **kw: Any) -> AlgorithmConfig:
    return AlgorithmConfig(start_quorum=quorum, start_wait_s=wait, **kw)


def root(children: dict[str, str], algorithm: str = "fedbuff", **kw: Any) -> AggregatorBase:
    node = build_node(
        "root",
        "root",
        algorithm,
        quorum_params(**kw),
        TRAINING,
        Neighbours(children=children),
        seed=1,
        weights=model(0.0),
    )
    assert isinstance(node, AggregatorBase)
    return node


def up(node: AggregatorBase, child: str, role: str, now: float) -> list[Effect]:
    """A child's link comes up and it says Hello (what a driver delivers)."""
    return node.handle(PeerUp(child), now) + node.handle(Received(child, Hello(child, role)), now)


def broadcasts(effects: list[Effect]) -> list[str]:
    return [s.peer for s in sends(effects, ModelBroadcast)]


def tasked(effects: list[Effect]) -> list[str]:
    return [peer for peer, _ in requests(effects)]


def outcome(effects: list[Effect]) -> list[str]:
    return [labels(m)["outcome"] for m in metrics(effects, "start_quorum")]


REGIONS = {"north": "region", "south": "region"}
SITES = {"a": "site", "b": "site", "c": "site"}


def test_the_root_sends_no_model_until_both_regions_are_up() -> None:
    node = root(REGIONS)
    assert node.start_quorum == (2, WAIT) and node.waiting_for_quorum
    first = up(node, "north", "region", 0.0)
    assert broadcasts(first) == [] and outcome(first) == []
    assert node.next_deadline() == WAIT  # the wait runs from the first event
    second = up(node, "south", "region", 0.4)
    assert broadcasts(second) == ["north", "south"]  # both get the same first model
    assert outcome(second) == ["met"]
    lines = [e for e in second if isinstance(e, Log)]
    assert any(e.level == "info" and "start quorum met: 2 of 2" in e.text for e in lines)
    assert not node.waiting_for_quorum and node.next_deadline() is None


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedasync", "fedavg"])
def test_a_dead_child_holds_the_first_tasks_back_for_the_wait_only(algorithm: str) -> None:
    # A synchronous root takes rounds of two here (its own min_available is 2).
    node = root(SITES, algorithm, clients_per_round=2, over_selection=1.0)
    held = up(node, "a", "site", 1.0) + up(node, "b", "site", 1.5)
    assert tasked(held) == []  # c never comes up
    assert node.next_deadline() == 1.0 + WAIT
    early = node.handle(Deadline(), 1.0 + WAIT - 0.01)
    assert tasked(early) == [] and outcome(early) == [] and node.waiting_for_quorum
    fired = node.handle(Deadline(), 1.0 + WAIT)
    assert outcome(fired) == ["expired"]
    warning = [e for e in fired if isinstance(e, Log) and e.level == "warning"]
    assert warning and "2 of the 3 children" in warning[0].text
    assert sorted(tasked(fired)) == ["a", "b"]
    assert not node.waiting_for_quorum
    late = up(node, "c", "site", 9.0)
    assert outcome(late) == []
    if algorithm != "fedavg":  # a child that comes up later joins as always: a task at once
        assert tasked(late) == ["c"]


def test_a_flapping_child_does_not_make_a_quorum_by_itself() -> None:
    node = root(SITES, quorum=2)
    now = 0.0
    for _ in range(20):  # "a" up, down, up, down ...: one distinct child at most
        effects = up(node, "a", "site", now) + node.handle(PeerDown("a"), now + 0.05)
        assert tasked(effects) == [] and outcome(effects) == []
        now += 0.1
    assert node.waiting_for_quorum and node.children_up() == 0
    effects = up(node, "a", "site", now)
    assert node.waiting_for_quorum  # still one child
    effects = up(node, "b", "site", now + 0.1)
    assert outcome(effects) == ["met"] and sorted(tasked(effects)) == ["a", "b"]


def test_only_rostered_children_count() -> None:
    node = root(SITES, quorum=2)
    stranger = node.handle(PeerUp("x"), 0.0) + node.handle(Received("x", Hello("x", "site")), 0.0)
    up(node, "a", "site", 0.1)
    repeated = node.handle(Received("a", Hello("a", "site")), 0.2)  # same session again
    assert node.waiting_for_quorum and node.children_up() == 1
    assert tasked(stranger + repeated) == []


def test_a_hello_in_another_childs_name_counts_nobody() -> None:
    """Rostered "a" says Hello as "b" (and as a stranger): refused as a src mismatch, so
    neither counts; "a" counts once it says Hello as itself."""
    node = root(SITES, quorum=2)
    node.handle(PeerUp("a"), 0.0)
    spoofed = node.handle(Received("a", Hello("b", "site")), 0.0)
    spoofed += node.handle(Received("a", Hello("x", "site")), 0.0)
    assert node.waiting_for_quorum and node.children_up() == 0
    assert tasked(spoofed) == [] and outcome(spoofed) == []
    # Each counted; one log line per child and reason a minute (no log flood).
    assert [labels(m) for m in metrics(spoofed, "message_rejected")] == [
        {"reason": "src_mismatch"}
    ] * 2
    reasons = [(s.fields or {}).get("reason") for s in spoofed if isinstance(s, Log)]
    assert reasons == ["src_mismatch"]
    node.handle(Received("a", Hello("a", "site")), 0.1)
    effects = up(node, "b", "site", 0.2)
    assert outcome(effects) == ["met"] and sorted(tasked(effects)) == ["a", "b"]


def test_links_that_never_say_hello_hold_the_start_for_the_wait_only() -> None:
    """Every child's link is up but none says Hello (an authenticated peer that stays
    silent): nobody counts, and the wait's end starts the federation anyway."""
    node = root(SITES, quorum="all")
    for child in SITES:
        assert tasked(node.handle(PeerUp(child), 0.0)) == []
    assert node.waiting_for_quorum and node.children_up() == 0
    effects: list[Effect] = []
    now = 0.0
    while node.waiting_for_quorum and now <= WAIT + 1.0:
        now = max(now, node.next_deadline() or now + 0.5)
        effects += node.handle(Deadline(), now)
    assert not node.waiting_for_quorum and outcome(effects) == ["expired"]
    assert now <= WAIT + 1.0


def test_a_childs_claimed_role_does_not_change_what_it_counts_as() -> None:
    """Rostered regions count by their roster entry: one that says Hello as a "site"
    still counts once, and a stranger saying "region" never does."""
    node = root(REGIONS, quorum="all")
    node.handle(PeerUp("x"), 0.0)
    node.handle(Received("x", Hello("x", "region")), 0.0)
    up(node, "north", "site", 0.1)
    assert node.waiting_for_quorum and node.children_up() == 1
    effects = up(node, "south", "region", 0.2)
    assert outcome(effects) == ["met"] and sorted(broadcasts(effects)) == ["north", "south"]


def test_off_by_default_and_for_a_quorum_of_zero() -> None:
    for params in (AlgorithmConfig(), quorum_params(0)):
        node = build_node(
            "root",
            "r",
            "fedbuff",
            params,
            TRAINING,
            Neighbours(children=SITES),
            seed=1,
            weights=model(0.0),
        )
        assert isinstance(node, AggregatorBase)
        assert not node.waiting_for_quorum and node.start_quorum[0] == 0
        assert tasked(up(node, "a", "site", 0.0)) == ["a"]


def test_a_quorum_above_the_children_means_all_of_them() -> None:
    node = root(SITES, quorum=50)
    assert node.start_quorum == (3, WAIT)


@pytest.mark.parametrize(
    ("quorum", "wait"), [(-1, 5.0), (True, 5.0), (2, 0.0), (2, -1.0), (2, float("inf"))]
)
def test_set_start_quorum_refuses_bad_values(quorum: Any, wait: float) -> None:
    node = FedBuffAggregator("r", SITES, model(0.0), buffer_size=2, concurrency=2)
    with pytest.raises(ValueError, match="start"):
        node.set_start_quorum(quorum, wait)


def test_a_region_waits_for_its_sites_before_its_first_tasks() -> None:
    node = build_node(
        "region",
        "north",
        "fedbuff",
        quorum_params("all", regional_buffer_size=3),
        TRAINING,
        Neighbours(parent="root", parent_role="root", children=SITES),
        seed=1,
    )
    assert isinstance(node, RegionalAggregator) and node.start_quorum == (3, WAIT)
    node.handle(PeerUp("root"), 0.0)
    got = node.handle(Received("root", ModelBroadcast(0, model(0.0))), 0.1)
    assert tasked(got) == []
    assert tasked(up(node, "a", "site", 0.2) + up(node, "b", "site", 0.3)) == []
    last = up(node, "c", "site", 0.4)
    assert outcome(last) == ["met"] and sorted(tasked(last)) == ["a", "b", "c"]


def region(quorum: int | str = "all") -> RegionalAggregator:
    node = build_node(
        "region",
        "north",
        "fedbuff",
        quorum_params(quorum),
        TRAINING,
        Neighbours(parent="root", parent_role="root", children=SITES),
        seed=1,
    )
    assert isinstance(node, RegionalAggregator)
    return node


def hellos(effects: list[Effect]) -> list[str]:
    return [s.peer for s in sends(effects, Hello)]


def test_a_region_says_hello_to_its_parent_once_its_own_wait_is_over() -> None:
    """A parent's quorum counts the regions that can put their sites to work: a region's
    Hello (which brings it the model) waits for its sites, or for its start wait."""
    node = region()
    assert hellos(node.handle(PeerUp("root"), 0.0)) == []
    assert hellos(up(node, "a", "site", 0.1) + up(node, "b", "site", 0.2)) == []
    assert hellos(up(node, "c", "site", 0.3)) == ["root"]
    # Later reconnects say Hello at once, as always.
    node.handle(PeerDown("root"), 1.0)
    assert hellos(node.handle(PeerUp("root"), 1.5)) == ["root"]

    expired = region()
    expired.handle(PeerUp("root"), 0.0)
    up(expired, "a", "site", 0.1)
    assert expired.next_deadline() == WAIT
    assert hellos(expired.handle(Deadline(), WAIT)) == ["root"]


def test_a_region_whose_parent_is_away_when_its_wait_ends_says_hello_on_reconnect() -> None:
    node = region()
    node.handle(PeerUp("root"), 0.0)
    node.handle(PeerDown("root"), 0.5)
    ended = up(node, "a", "site", 0.6) + up(node, "b", "site", 0.7) + up(node, "c", "site", 0.8)
    assert outcome(ended) == ["met"] and hellos(ended) == []  # nobody to greet
    assert hellos(node.handle(PeerUp("root"), 2.0)) == ["root"]


def test_without_a_quorum_a_region_says_hello_at_once() -> None:
    assert hellos(region(0).handle(PeerUp("root"), 0.0)) == ["root"]


def test_updates_are_taken_while_waiting() -> None:
    """Only what the node sends out waits: a region's forward (after a restart, say) is
    decided and acknowledged as always; the version it publishes goes out with the quorum,
    not to the one region up."""
    node = root(REGIONS, buffer_size=1)
    assert isinstance(node, FedBuffAggregator)
    up(node, "north", "region", 0.0)
    effects = node.handle(Received("north", upd("north", 1, count=3, n=30)), 0.1)
    assert acks(effects) == [("north", "north", 1)] and node.version == 1
    assert node.waiting_for_quorum and broadcasts(effects) == []
    released = up(node, "south", "region", 0.2)
    sent = [(s.peer, s.msg.version) for s in sends(released, ModelBroadcast)]
    assert sent == [("north", 1), ("south", 1)]


def test_a_restart_waits_again() -> None:
    """The quorum is per incarnation: a root restored from its checkpoint and log holds its
    model back until its regions are up again (their links are all new)."""
    node = root(REGIONS, buffer_size=1)
    log: list[dict[str, Any]] = []

    def feed(event: Event, now: float) -> list[Effect]:
        effects = node.handle(event, now)
        log.extend(e.data for e in effects if isinstance(e, Persist) and e.append)
        return effects

    feed(PeerUp("north"), 0.0)
    feed(Received("north", Hello("north", "region")), 0.0)
    feed(PeerUp("south"), 0.1)
    feed(Received("south", Hello("south", "region")), 0.1)
    effects = feed(Received("north", upd("north", 1, count=1)), 0.2)
    assert broadcasts(effects) == ["north", "south"]  # v1 published
    checkpoint = node.snapshot()
    restarted = root(REGIONS, buffer_size=1)
    assert isinstance(restarted, FedBuffAggregator)
    restarted.restore(checkpoint, LogRecords({"applied": log}))
    assert restarted.waiting_for_quorum and restarted.next_deadline() is None
    first = up(restarted, "south", "region", 100.0)
    assert broadcasts(first) == [] and restarted.next_deadline() == 100.0 + WAIT
    second = up(restarted, "north", "region", 100.5)
    assert broadcasts(second) == ["south", "north"] and outcome(second) == ["met"]
    assert restarted.current_model()[0] == 1


# --------------------------------------------------------------------- state machine

CHILDREN = {"r1": "region", "r2": "region", "s1": "site", "s2": "site", "s3": "site"}


class StartQuorum(RuleBasedStateMachine):
    """Children come up, go down, flap and repeat themselves, strangers call, time passes
    and deadlines fire, the node restarts: the quorum holds every first dispatch until
    enough distinct children are up, never beyond the wait, and ends once per incarnation."""

    @initialize(
        quorum=st.integers(1, len(CHILDREN) + 1),
        wait=st.floats(0.5, 10.0),
        algorithm=st.sampled_from(["fedbuff", "fedasync"]),
    )
    def build(self, quorum: int, wait: float, algorithm: str) -> None:
        self.quorum = min(quorum, len(CHILDREN))
        self.wait = wait
        self.algorithm = algorithm
        self.now = 0.0
        self.node = self._fresh()
        self.up: set[str] = set()
        self.since: float | None = None  # this incarnation's first event
        self.waiting = True
        self.ended = 0

    def _fresh(self) -> AggregatorBase:
        return root(CHILDREN, self.algorithm, quorum=self.quorum, wait=self.wait)

    def _handle(self, event: Event) -> list[Effect]:
        if self.since is None:
            self.since = self.now
        before = self.node.waiting_for_quorum
        effects = self.node.handle(event, self.now)
        ended = outcome(effects)
        dispatched = tasked(effects) + broadcasts(effects)
        if before and self.node.waiting_for_quorum:
            assert not dispatched and not ended
            assert len(self.up) < self.quorum
            assert self.now < self.since + self.wait
        elif before:
            assert len(ended) == 1
            self.ended += 1
            if ended == ["met"]:
                assert len(self.up) >= self.quorum
            else:
                assert len(self.up) < self.quorum and self.now >= self.since + self.wait
            # Every region up gets the model now, and the sites up their tasks.
            regions_up = {c for c in self.up if CHILDREN[c] == "region"}
            assert set(broadcasts(effects)) == regions_up
            assert set(tasked(effects)) == {c for c in self.up if CHILDREN[c] == "site"}
        else:
            assert not ended  # once per incarnation
        return effects

    @rule(dt=st.floats(0.0, 3.0))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(child=st.sampled_from(sorted(CHILDREN)))
    def come_up(self, child: str) -> None:
        if child in self.up:
            self._handle(Received(child, Hello(child, CHILDREN[child])))  # repeated Hello
            return
        self._handle(PeerUp(child))
        self.up.add(child)
        self._handle(Received(child, Hello(child, CHILDREN[child])))

    @rule(child=st.sampled_from(sorted(CHILDREN)))
    def go_down(self, child: str) -> None:
        self.up.discard(child)
        self._handle(PeerDown(child))

    @rule(child=st.sampled_from(sorted(CHILDREN)), times=st.integers(1, 5))
    def flap(self, child: str, times: int) -> None:
        for _ in range(times):
            self.come_up(child)
            self.now += 0.01
            self.go_down(child)

    @rule()
    def stranger(self) -> None:
        self._handle(PeerUp("x"))
        self._handle(Received("x", Hello("x", "site")))

    @precondition(lambda self: self.node.next_deadline() is not None)
    @rule()
    def deadline(self) -> None:
        due = self.node.next_deadline()
        assert due is not None
        self.now = max(self.now, due)
        self._handle(Deadline())

    @rule()
    def restart(self) -> None:
        checkpoint = self.node.snapshot()  # type: ignore[attr-defined]
        self.node = self._fresh()
        self.node.restore(checkpoint)  # type: ignore[attr-defined]
        self.up.clear()  # its links are gone; children say Hello again
        self.since = None
        self.waiting = True

    @invariant()
    def bounded(self) -> None:
        node = self.node
        assert node.children_up() == len(self.up)
        if node.waiting_for_quorum and self.since is not None:
            due = node.next_deadline()
            assert due is not None and due <= self.since + self.wait


TestStartQuorum = StartQuorum.TestCase
TestStartQuorum.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
