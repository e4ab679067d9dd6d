from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from fedloom.algorithms.protocol import (
    NO_RECORDS,
    Deadline,
    Effect,
    Event,
    Metric,
    Send,
    Train,
    TrainDone,
)
from fedloom.federation.signing import restarted_guard
from fedloom.sim.availability import Availability
from fedloom.sim.compute import ComputeModel
from fedloom.sim.driver import SimDriver, neighbours_from_plan, region_nodes, roles_from_plan
from fedloom.sim.executors import InlineExecutor, PoolExecutor
from fedloom.sim.kernel import SimulationError
from fedloom.sim.network import UniformLinks
from fedloom.topology.specs import Site
from fedloom.topology.star import star as star_plan
from fedloom.transport.wire import Heartbeat
from tests.conformance.toy_nodes import (
    NoisyTrainer,
    Pinger,
    Ponger,
    ToyAggregator,
    ToySite,
    star,
)


def toy_driver(
    n_sites: int = 4,
    *,
    seed: int = 0,
    compute: ComputeModel | None = None,
    availability: Availability | None = None,
    links: Any = None,
    executor: Any = None,
    agg_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> SimDriver:
    nodes, roles, pairs = star(n_sites, **(agg_kwargs or {}))
    trainer = NoisyTrainer()
    return SimDriver(
        nodes,
        roles,
        links or UniformLinks(latency_s=0.05, bandwidth_bps=10e6),
        neighbours=pairs,
        compute=compute
        or ComputeModel.from_config({"distribution": "exponential", "mean_s": 5.0}, seed=seed),
        availability=availability,
        trainer=trainer,
        executor=executor,
        seed=seed,
        **kwargs,
    )


def agg_of(d: SimDriver) -> ToyAggregator:
    return cast(ToyAggregator, d.nodes["agg"])


def site_of(d: SimDriver, site: str) -> ToySite:
    return cast(ToySite, d.nodes[site])


def test_ping_pong_timing() -> None:
    a, b = Pinger("a", "b", n=5), Ponger("b", "a", n=5)
    d = SimDriver(
        {"a": a, "b": b},
        {"a": "peer", "b": "peer"},
        UniformLinks(latency_s=0.1, bandwidth_bps=1e12),
        neighbours=[("a", "b")],
    )
    stats = d.run()
    # PeerUp at 0.1, then each hop takes 0.1 s (bandwidth is effectively unlimited).
    assert [s for _, s in b.seen] == [0, 2, 4]
    assert [s for _, s in a.seen] == [1, 3, 5]
    assert [t for t, _ in b.seen] == pytest.approx([0.2, 0.4, 0.6], abs=1e-6)
    assert stats.messages_sent == 6 and stats.messages_delivered == 6
    assert stats.bytes_by_tier["peer->peer"] == stats.bytes_sent > 0
    assert stats.deliveries == 2 + 6  # two PeerUp notices, six messages


def test_toy_star_runs_and_collects_stats() -> None:
    d = toy_driver(4, record_persist=True)
    stats = d.run(until=60.0)
    agg = agg_of(d)
    assert agg.version > 20
    assert stats.updates_applied == agg.version == stats.metric_counts["update_applied"]
    assert stats.updates_duplicated == 0
    assert len(stats.staleness) == agg.version
    assert stats.metric_totals["update_applied"] == sum(stats.staleness)
    assert stats.jobs_started >= stats.jobs_finished >= agg.version
    assert set(stats.bytes_by_tier) == {"root->site", "site->root"}
    assert stats.persists == 2 * agg.version
    assert len(d.store["updates"]) == agg.version and d.store["model"] == agg.version
    assert d.versions["agg"] == agg.version
    assert stats.virtual_time == 60.0
    # The model moved by roughly mix * step per update from zero.
    assert float(np.mean(agg.weights["w"])) > 0.5


def test_same_seed_same_stats_and_other_seed_differs() -> None:
    def run(seed: int) -> dict[str, Any]:
        d = toy_driver(5, seed=seed, availability=Availability(dropout=0.2, seed=seed))
        stats = d.run(until=80.0).to_dict(wall=False)
        stats["weights"] = agg_of(d).weights["w"].tolist()
        return stats

    first = run(1)
    assert run(1) == first
    assert run(2) != first


def test_dropout_delivers_train_failed_and_parent_times_out() -> None:
    av = Availability(dropout=0.5, seed=3)
    d = toy_driver(3, availability=av, keep_logs=True, agg_kwargs={"task_timeout_s": 20.0}, seed=3)
    stats = d.run(until=300.0)
    agg = agg_of(d)
    failed = sum(site_of(d, s).failed for s in agg.children)
    assert stats.jobs_dropped == failed > 0
    assert agg.timeouts > 0
    assert stats.metric_counts["job_timeout"] == agg.timeouts
    assert stats.logs_by_level["warning"] == failed
    assert any("failed: dropout" in log.text for _, _, log in d.logs)
    assert stats.jobs_started == stats.jobs_finished + stats.jobs_dropped + _running(d)


def _running(d: SimDriver) -> int:
    return sum(len(site_of(d, s).jobs) for s in d.nodes if s != "agg")


def test_killed_site_gets_nothing_and_parent_hears_after_delay() -> None:
    d = toy_driver(3, keep_logs=True)
    d.kill_at(10.0, "site-01", detection_delay_s=7.0)
    d.run(until=9.999)
    before = d.stats.deliveries
    assert d.is_alive("site-01")
    d.run(until=60.0)
    assert not d.is_alive("site-01")
    agg = agg_of(d)
    assert "site-01" not in agg.up
    downs = [(t, log.text) for t, n, log in d.logs if n == "agg" and "down" in log.text]
    assert downs == [(17.0, "site-01 down")]
    assert d.stats.deaths == 1
    assert d.stats.deliveries > before
    site = site_of(d, "site-01")
    applied_from_dead = [k for k in agg.applied if k[0] == "site-01"]
    assert all(seq <= site.seq for _, seq in applied_from_dead)
    # Nothing reached the dead site after its death.
    n_msgs = site.seq
    d.run(until=100.0)
    assert site_of(d, "site-01").seq == n_msgs


def test_scheduled_deaths_from_availability() -> None:
    av = Availability.from_config(
        {"deaths": [{"at_s": 5.0, "ids": ["site-00", "site-02"]}], "detection_delay_s": 1.0},
        sites=["site-00", "site-01", "site-02"],
    )
    d = toy_driver(3, availability=av)
    d.run(until=30.0)
    assert not d.is_alive("site-00") and not d.is_alive("site-02") and d.is_alive("site-01")
    assert agg_of(d).up == {"site-01"}


def test_partition_then_resend_is_deduplicated() -> None:
    d = toy_driver(
        2,
        compute=ComputeModel.constant(1.0),
        links=UniformLinks(latency_s=0.5, bandwidth_bps=1e9),
    )
    # Request arrives at 1.0, training ends at 2.0, the update would arrive at 2.5: cut at 2.2.
    d.partition(["site-00"], 2.2, 5.0)
    stats = d.run(until=20.0)
    assert stats.messages_lost == 1
    site = site_of(d, "site-00")
    assert site.seq > 3
    assert 1 not in site.unacked  # resent after PeerUp and acknowledged
    assert stats.updates_duplicated == 0
    agg = agg_of(d)
    assert ("site-00", 1) in agg.applied


def test_lost_ack_causes_a_duplicate_that_is_not_applied() -> None:
    d = toy_driver(
        1,
        compute=ComputeModel.constant(1.0),
        links=UniformLinks(latency_s=0.5, bandwidth_bps=1e9),
    )
    # The update arrives at the aggregator at 2.5; its Ack would arrive at 3.0: cut at 2.7.
    d.partition(["site-00"], 2.7, 4.0)
    stats = d.run(until=10.0)
    agg = agg_of(d)
    assert agg.duplicates >= 1
    assert stats.metric_counts["update_duplicate"] == agg.duplicates
    assert stats.updates_duplicated == 0
    assert stats.updates_applied == agg.version


class DeadlineNode:
    """Asks for deadlines from a script; records when it got them."""

    def __init__(self, script: list[float | None]) -> None:
        self.script = script
        self.fired: list[float] = []
        self.wanted: float | None = script[0] if script else None

    @property
    def node_id(self) -> str:
        return "d"

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, Deadline):
            self.fired.append(now)
            self.script.pop(0)
            self.wanted = self.script[0] if self.script else None
        return []

    def next_deadline(self) -> float | None:
        return self.wanted


def test_deadlines_are_scheduled_and_rescheduled() -> None:
    node = DeadlineNode([2.0, 5.0, None])
    d = SimDriver({"d": node}, {"d": "site"}, UniformLinks())
    d.run(until=3.0)
    assert node.fired == [2.0]
    node.wanted = 4.0  # moved earlier than the 5.0 it asked for: that entry must go
    d.kernel.schedule_at(3.5, d._refresh_deadline, "d", node, 3.5)
    d.run(until=10.0)
    assert node.fired == [2.0, 4.0]


class MovingDeadline:
    """A node whose deadline moves on every event: only the last one may fire."""

    def __init__(self) -> None:
        self.deadline: float | None = 10.0
        self.fired: list[float] = []

    @property
    def node_id(self) -> str:
        return "m"

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, Deadline):
            self.fired.append(now)
            self.deadline = None
        return []

    def next_deadline(self) -> float | None:
        return self.deadline


def test_stale_deadline_entries_never_fire() -> None:
    node = MovingDeadline()
    d = SimDriver({"m": node}, {"m": "site"}, UniformLinks())

    def move(t: float) -> None:
        node.deadline = t

    def move_and_refresh(t: float) -> None:
        move(t)
        d._refresh_deadline("m", node, d.now)

    for i, t in enumerate([12.0, 8.0, 30.0]):
        d.kernel.schedule_at(float(i + 1), move_and_refresh, t)
    d.run(until=100.0)
    assert node.fired == [30.0]


def test_past_deadline_fires_now_and_stuck_node_is_reported() -> None:
    class Stuck(MovingDeadline):
        def handle(self, event: Event, now: float) -> list[Effect]:
            self.fired.append(now)
            return []

    node = Stuck()
    node.deadline = -5.0
    d = SimDriver({"m": node}, {"m": "site"}, UniformLinks(), start_time=1.0)
    with pytest.raises(SimulationError, match="keeps asking for a deadline"):
        d.run(until=2.0)
    assert node.fired[0] == 1.0


def test_observer_ticks_on_the_interval_across_runs() -> None:
    d = toy_driver(2)
    seen: list[tuple[float, int]] = []
    d.observe(10.0, lambda now: seen.append((now, agg_of(d).version)))
    d.run(until=25.0)
    d.run(until=40.0)
    assert [t for t, _ in seen] == [0.0, 10.0, 20.0, 30.0, 40.0]
    versions = [v for _, v in seen]
    assert versions == sorted(versions) and versions[0] == 0
    with pytest.raises(ValueError, match="observers"):
        d.run()


def test_training_seed_is_derived_unless_the_node_gives_one() -> None:
    seen: list[Any] = []

    class Once:
        def __init__(self, node_id: str, seed: int | None) -> None:
            self._id, self.seed = node_id, seed
            self.started = False

        @property
        def node_id(self) -> str:
            return self._id

        def handle(self, event: Event, now: float) -> list[Effect]:
            if isinstance(event, TrainDone):
                return []
            if not self.started:
                self.started = True
                cfg = {} if self.seed is None else {"seed": self.seed}
                return [Train(1, {"w": np.zeros(2, np.float32)}, cfg)]
            return []

        def next_deadline(self) -> float | None:
            return None if self.started else 0.0

    def trainer(node_id: str, weights: Any, config: Any) -> Any:
        seen.append((node_id, config["seed"]))
        return NoisyTrainer()(node_id, weights, config)

    nodes = {"x": Once("x", None), "y": Once("y", 1234)}
    d = SimDriver(nodes, {"x": "site", "y": "site"}, UniformLinks(), trainer=trainer, seed=9)
    d.run(until=100.0)
    seeds = dict(seen)
    assert seeds["y"] == 1234
    from fedloom.federation.seeds import derived_seed

    assert seeds["x"] == derived_seed(9, "train", "x", 1)


def test_pool_executor_gives_identical_results() -> None:
    def run(executor: Any) -> tuple[dict[str, Any], list[list[float]]]:
        d = toy_driver(4, seed=5, executor=executor)
        try:
            stats = d.run(until=40.0).to_dict(wall=False)
        finally:
            d.close()
        return stats, agg_of(d).weights["w"].tolist()

    inline = run(InlineExecutor(NoisyTrainer()))
    pooled = run(PoolExecutor(NoisyTrainer(), workers=2))
    assert pooled == inline


def test_node_errors_carry_context() -> None:
    class Broken(ToySite):
        def handle(self, event: Event, now: float) -> list[Effect]:
            raise KeyError("boom")

    d = SimDriver(
        {"a": Broken("a", "b"), "b": ToySite("b", "a")},
        {"a": "site", "b": "site"},
        UniformLinks(),
        neighbours=[("a", "b")],
    )
    with pytest.raises(KeyError) as info:
        d.run()
    assert any("while a handled PeerUp" in note for note in info.value.__notes__)


def test_send_to_unknown_node_and_train_without_trainer_raise() -> None:
    class Sender(ToySite):
        def handle(self, event: Event, now: float) -> list[Effect]:
            return [Send("ghost", Heartbeat(src="a"))]

    d = SimDriver({"a": Sender("a", "b")}, {"a": "site"}, UniformLinks())
    d.kernel.schedule_at(0.0, d._dispatch, "a", Deadline())
    with pytest.raises(SimulationError, match="unknown node 'ghost'"):
        d.run()

    class Trainee(ToySite):
        def handle(self, event: Event, now: float) -> list[Effect]:
            return [Train(1, {}, {})]

    d = SimDriver({"a": Trainee("a", "b")}, {"a": "site"}, UniformLinks())
    d.kernel.schedule_at(0.0, d._dispatch, "a", Deadline())
    with pytest.raises(SimulationError, match="no trainer"):
        d.run()


def test_constructor_checks() -> None:
    nodes, roles, _ = star(2)
    with pytest.raises(ValueError, match="no role"):
        SimDriver(nodes, {"agg": "root"}, UniformLinks())
    with pytest.raises(ValueError, match="unknown node"):
        SimDriver(nodes, roles, UniformLinks(), neighbours=[("agg", "nobody")])
    with pytest.raises(ValueError, match="node_id"):
        SimDriver({"x": nodes["agg"]}, {"x": "root"}, UniformLinks())


def test_metric_listeners_see_every_metric() -> None:
    d = toy_driver(2)
    got: list[tuple[str, str]] = []
    d.on_metric(lambda node, now, m: got.append((node, m.name)) if isinstance(m, Metric) else None)
    stats = d.run(until=30.0)
    assert len(got) == sum(stats.metric_counts.values())


def test_driver_from_a_real_plan() -> None:
    sites = [Site(f"h{i}", region="eu" if i < 2 else "us") for i in range(4)]
    plan = star_plan(sites)
    assert roles_from_plan(plan) == {"root": "root", **{s.id: "site" for s in sites}}
    assert neighbours_from_plan(plan) == sorted((f"h{i}", "root") for i in range(4))
    assert region_nodes(plan, "eu") == {"h0", "h1"}
    ids = [s.id for s in sites]
    nodes: dict[str, Any] = {"root": ToyAggregator("root", ids, {"w": np.zeros(3, np.float32)})}
    nodes.update({i: ToySite(i, "root") for i in ids})
    d = SimDriver.from_plan(plan, nodes, trainer=NoisyTrainer(), compute=ComputeModel.constant(2.0))
    stats = d.run(until=30.0)
    assert stats.updates_applied > 10
    assert set(stats.bytes_by_tier) == {"root->site", "site->root"}


# ------------------------------------------- a restarted node's signature version guard


class Recorder:
    """What a test driver may run in place of a node: it passes everything through,
    the restore protocol included, and is no SiteNode or RegionalAggregator."""

    def __init__(self, node: Any) -> None:
        self.inner = node

    @property
    def node_id(self) -> str:
        return cast(str, self.inner.node_id)

    def handle(self, event: Event, now: float) -> list[Effect]:
        return cast(list[Effect], self.inner.handle(event, now))

    def next_deadline(self) -> float | None:
        return cast(float | None, self.inner.next_deadline())

    def snapshot(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.inner.snapshot())

    def restore(self, checkpoint: Any, records: Any = NO_RECORDS) -> None:
        self.inner.restore(checkpoint, records)


@pytest.mark.parametrize("kind", ["site", "region"])
def test_a_wrapped_node_restarted_gets_the_guard_of_the_node_it_wraps(
    kind: str, tmp_path: Path
) -> None:
    """SimDriver.restart used to look the version guard up by the node's type, so a
    wrapper restarted with none: a rollback to an older model would have been taken."""
    from tests.sim.test_durability import Run, raw_scenario, with_arms

    guards = {}
    for wrapped in (False, True):
        run = Run(with_arms(raw_scenario(), on={}), state_dir=tmp_path / str(wrapped), signing=True)
        roles = roles_from_plan(run.plan)
        node_id = sorted(n for n in run.driver.nodes if roles[n] == kind)[0]

        def make(run: Run = run, node_id: str = node_id, wrapped: bool = wrapped) -> Any:
            node = run.make()[node_id]
            return Recorder(node) if wrapped else node

        run.driver.restart_at(500.0, node_id, make, 40.0)
        run.run(until=540.0)  # it has just come back
        assert run.driver.stats.restarts == 1
        signing = run.driver.signing
        assert signing is not None
        node = run.driver.nodes[node_id]
        bare = node.inner if wrapped else node
        expected = restarted_guard(bare)  # the daemon's: read from the node itself
        assert expected is not None and expected.current is not None
        guard = signing.ends[node_id].guard
        assert (guard.current, guard.digest) == (expected.current, expected.digest)
        guards[wrapped] = (guard.current, guard.digest)
    assert guards[True] == guards[False]  # the same run, wrapped or not
