"""The simulator runs the daemons' recovery log and end-to-end signing (sim.durability)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.algorithms.protocol import Metric, ModelHolder, Node
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.store import StateStore
from fedloom.federation.training import WorkloadTrainer
from fedloom.sim.driver import SimDriver, SimStats
from fedloom.sim.durability import SimStores, restore
from fedloom.sim.executors import InlineExecutor
from fedloom.sim.network import WireCodec
from fedloom.sim.runner import (
    build_nodes,
    build_plan,
    build_sites,
    build_workload,
    run_scenario,
)
from fedloom.sim.scenario import Scenario, load_scenario, parse_scenario
from fedloom.transport.wire import ModelBroadcast, Update

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "durable-hospitals.toml"
SHM = Path("/dev/shm")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A directory for recovery logs: in memory where the OS offers one (the store
    fsyncs every batch; the tests check what is written, not the disk's speed)."""
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="fedloom-test-durability-", dir=SHM))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


@pytest.fixture
def temp_in_state(state: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The runner's default (temporary) log directories go under ``state``."""
    monkeypatch.setattr(tempfile, "tempdir", str(state))
    return state


def raw_scenario(duration_min: float = 20.0) -> dict[str, Any]:
    """The shipped durability scenario's federation, without its arms."""
    raw = tomllib.loads(SCENARIO.read_text(encoding="utf-8"))
    raw.pop("baseline", None)
    raw["duration_min"] = duration_min
    base = dict(raw["arms"][0])
    raw["arms"] = [dict(base, name="off")]
    return raw


def with_arms(raw: dict[str, Any], **durability: dict[str, Any]) -> Scenario:
    base = raw["arms"][0]
    arms = [dict(base, name=name, durability=d) for name, d in durability.items()]
    return parse_scenario({**raw, "arms": arms})


class Run:
    """One arm of the scenario on a SimDriver built as the runner builds it."""

    def __init__(self, scenario: Scenario, codec: Any = None, **driver: Any) -> None:
        arm = scenario.arms[0]
        self.seed = seed = scenario.seed
        workload = build_workload(scenario, seed)
        sites = build_sites(scenario, workload, seed)
        self.plan = build_plan(scenario, arm, sites, seed)
        init = workload.init_weights(seed)
        examples = {s.id: s.n_examples for s in sites}
        durable = bool(driver.get("state_dir"))

        def make() -> dict[str, Node]:
            return build_nodes(self.plan, arm, init, seed, examples, durable=durable)

        self.make = make
        executor = InlineExecutor(WorkloadTrainer(workload, [s.id for s in sites]))
        self.driver = SimDriver.from_plan(
            self.plan, make(), executor=executor, seed=seed, codec=codec, **driver
        )
        self.applied: list[tuple[float, str, str]] = []  # (t, aggregator, src)
        self.versions: list[tuple[float, str, float]] = []

        def listen(node_id: str, now: float, m: Metric) -> None:
            if m.name == "update_applied":
                self.applied.append((now, node_id, (m.labels or {}).get("src", "")))
            elif m.name == "model_version":
                self.versions.append((now, node_id, m.value))

        self.driver.on_metric(listen)

    def run(self, until: float) -> SimStats:
        try:
            return self.driver.run(until=until)
        finally:
            self.driver.close()


# ------------------------------------------------------------------ the scenario file


def test_the_shipped_scenario_runs_with_the_log_signing_and_restarts(temp_in_state: Path) -> None:
    scenario = load_scenario(SCENARIO)
    durable = next(a for a in scenario.arms if a.name == "durable")
    assert durable.durability.log and durable.durability.signing
    assert len(durable.durability.restarts) == 2
    report = run_scenario(scenario)
    plain, logged = (next(a for a in report.arms if a.name == n) for n in ("plain", "durable"))
    assert "log_commits" not in plain.extra and "signed" not in plain.extra
    assert logged.extra["restarts"] == 2
    assert int(logged.extra["log_commits"]) > 0
    assert int(logged.extra["signed"]) > 0
    assert int(logged.extra["verified"]) > 0
    assert logged.updates_duplicated == 0
    # The crashes cost the federation some progress, not its model.
    assert logged.versions > 0.5 * plain.versions
    assert logged.final_accuracy >= plain.final_accuracy - 0.05


# ------------------------------------------------------------- same seed, same results


def test_the_log_and_signing_leave_the_results_unchanged(temp_in_state: Path) -> None:
    scenario = with_arms(
        raw_scenario(),
        off={},
        log={"log": True},
        signing={"signing": True},
        both={"log": True, "signing": True},
    )
    arms = {a.name: a for a in run_scenario(scenario).arms}
    off = arms["off"]
    for name in ("log", "signing", "both"):
        arm = arms[name]
        assert arm.accuracy_series == off.accuracy_series, name
        assert arm.versions == off.versions and arm.updates_applied == off.updates_applied
        assert arm.extra["messages_sent"] == off.extra["messages_sent"]
        assert arm.extra["events"] == off.extra["events"]
    # The log costs no virtual time nor bytes; signatures ride on the messages.
    assert arms["log"].bytes_up == off.bytes_up and arms["log"].bytes_down == off.bytes_down
    assert int(arms["log"].extra["log_commits"]) > 0
    sent = int(off.extra["messages_sent"])
    for name in ("signing", "both"):
        arm = arms[name]
        extra_bytes = arm.bytes_up + arm.bytes_down - off.bytes_up - off.bytes_down
        assert 0 < extra_bytes <= 100 * sent  # a 64-byte signature and its fields
        assert int(arm.extra["signed"]) > 0
        assert arm.extra["unverified"] == 0


def test_every_signed_message_is_verified_on_arrival(state: Path) -> None:
    run = Run(with_arms(raw_scenario(), on={}), state_dir=state / "state", signing=True)
    delivered: dict[str, int] = {}
    deliver = run.driver.network._deliver

    def count(src: str, dst: str, msg: Any) -> None:
        name = type(msg).__name__
        delivered[name] = delivered.get(name, 0) + 1
        deliver(src, dst, msg)

    run.driver.network._deliver = count
    stats = run.run(until=1200.0)
    signed_kinds = sum(delivered.get(k, 0) for k in ("Update", "TrainRequest", "ModelBroadcast"))
    assert signed_kinds > 0
    assert stats.verified == signed_kinds and stats.unverified == 0
    assert stats.signed > 0 and stats.updates_applied > 0


# ------------------------------------------------------------------ the recovery log


def test_the_log_holds_what_the_nodes_did_and_replays_to_their_state(state: Path) -> None:
    run = Run(with_arms(raw_scenario(), on={}), state_dir=state, signing=True)
    stats = run.run(until=1200.0)
    assert stats.commits > 0 and stats.persists >= stats.commits
    live = run.driver.nodes
    fresh = run.make()
    for node_id, node in live.items():
        store = StateStore(state / node_id)
        try:
            recovery = store.load()
        finally:
            store.close()
        back = fresh[node_id]
        restore(back, recovery)  # every node's log replays
        if not isinstance(node, ModelHolder) or node.current_model() is None:
            continue
        assert isinstance(back, ModelHolder)
        got, want = back.current_model(), node.current_model()
        assert want is not None
        if node_id == "root":  # a published model is durable: exactly the live one
            assert got is not None and got[0] == want[0] > 0
            for name, arr in want[1].items():
                np.testing.assert_array_equal(got[1][name], arr)
        else:  # a region need not keep the root's model (the root resends it on PeerUp)
            assert got is None or got[0] <= want[0]


def test_a_state_dir_holding_an_earlier_run_is_refused(state: Path) -> None:
    Run(with_arms(raw_scenario(5.0), on={}), state_dir=state).run(until=300.0)
    with pytest.raises(ValueError, match="earlier run"):
        SimStores(state, ["root"])


def test_restart_needs_a_log() -> None:
    run = Run(with_arms(raw_scenario(5.0), on={}))
    with pytest.raises(ValueError, match="state_dir"):
        run.driver.restart("root", lambda: run.make()["root"], 10.0)
    run.driver.close()


def test_a_region_restarted_from_its_log_continues_without_duplicates(state: Path) -> None:
    run = Run(with_arms(raw_scenario(), on={}), state_dir=state, signing=True)
    t_down, down_s = 500.0, 40.0
    run.driver.restart_at(t_down, "region-south", lambda: run.make()["region-south"], down_s)
    stats = run.run(until=1200.0)
    assert stats.restarts == 1 and stats.deaths == 0
    assert stats.updates_duplicated == 0  # the strict checker would have raised anyway
    # Nothing reached it while it was down; it applied site updates again once back.
    region = [(t, src) for t, node, src in run.applied if node == "region-south"]
    assert not [t for t, _ in region if t_down <= t < t_down + down_s]
    after = [src for t, src in region if t >= t_down + down_s]
    assert after and all(src.startswith("site-") for src in after)
    # Its (src, seq) ledger came back from the log: no site update is applied twice.
    root_versions = [v for t, node, v in run.versions if node == "root"]
    assert root_versions == sorted(root_versions)
    assert max(v for t, node, v in run.versions if node == "root" and t > t_down + down_s) > max(
        v for t, node, v in run.versions if node == "root" and t <= t_down
    )
    # The fresh checkpoint written at the restart (compaction) is in its store.
    store = StateStore(state / "region-south")
    try:
        assert store.load().epoch >= 1
    finally:
        store.close()


def test_a_job_started_before_a_restart_never_reaches_the_restarted_site(state: Path) -> None:
    run = Run(with_arms(raw_scenario(10.0), on={}), state_dir=state)
    sites = [n for n in run.driver.nodes if n.startswith("site-")]
    for site in sites:  # every site crashes at once: those training lose their job
        run.driver.restart_at(150.0, site, lambda s=site: run.make()[s], 5.0)
    stats = run.run(until=600.0)
    assert stats.restarts == len(sites)
    assert stats.jobs_abandoned > 0
    assert stats.jobs_finished + stats.jobs_abandoned + stats.jobs_dropped <= stats.jobs_started
    assert stats.updates_applied > 0 and stats.updates_duplicated == 0


NODES = ["root", "region-north", "region-south", "site-000", "site-001", "site-003", "site-006"]


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.sampled_from(NODES), st.floats(30.0, 500.0), st.floats(1.0, 90.0)),
        min_size=1,
        max_size=4,
    )
)
def test_any_restarts_keep_exactly_once_and_the_roots_versions(
    state: Path, restarts: list[tuple[str, float, float]]
) -> None:
    """Whatever crashes when, from its log: no update applied twice anywhere (the strict
    invariant checker raises), the root never publishes a version twice or backwards, and
    the federation goes on."""
    run_dir = Path(tempfile.mkdtemp(dir=state))
    run = Run(with_arms(raw_scenario(10.0), on={}), state_dir=run_dir, signing=True)
    for node, at_s, down_s in restarts:
        run.driver.restart_at(at_s, node, lambda n=node: run.make()[n], down_s)
    stats = run.run(until=600.0)
    assert stats.updates_duplicated == 0
    root = [v for _, node, v in run.versions if node == "root"]
    assert root == sorted(root) and len(set(root)) == len(root)
    assert stats.restarts <= len(restarts) and stats.restarts >= 1
    assert stats.updates_applied > 0


def test_a_node_killed_while_down_stays_dead(state: Path) -> None:
    run = Run(with_arms(raw_scenario(10.0), on={}), state_dir=state)
    run.driver.restart_at(100.0, "site-001", lambda: run.make()["site-001"], 60.0)
    run.driver.kill_at(120.0, "site-001")
    stats = run.run(until=400.0)
    assert stats.deaths == 1 and stats.restarts == 0
    assert not run.driver.is_alive("site-001")
    with pytest.raises(ValueError, match="down_s"):
        run.driver.restart("site-002", lambda: run.make()["site-002"], 0.0)


# ------------------------------------------------------------------------- attacks


class Tampering(WireCodec):
    """The wire codec, except that what ``victim`` sends arrives altered (as an attacker
    on the path, or a broken proxy, would deliver it): one value of its deltas or
    weights changed after signing."""

    def __init__(self, victim: str) -> None:
        super().__init__()
        self.victim = victim
        self.altered = 0

    def decode(self, data: bytes) -> Any:
        msg = super().decode(data)
        if type(msg) is Update and msg.src == self.victim:
            field = "delta"
        elif type(msg) is ModelBroadcast and self.victim == "root":
            field = "weights"  # the root's model to the regions
        else:
            return msg
        tensors = dict(getattr(msg, field))
        if not tensors:
            return msg  # the simulator's tensor-less copy (it sizes the rest apart)
        name = next(iter(tensors))
        arr = np.array(tensors[name], copy=True)
        arr.reshape(-1)[0] += 1.0
        tensors[name] = arr
        self.altered += 1
        return dataclasses.replace(msg, **{field: tensors})


@pytest.mark.parametrize("victim", ["site-001", "root"])
def test_an_altered_message_is_refused_and_never_applied(victim: str, state: Path) -> None:
    codec = Tampering(victim)
    run = Run(with_arms(raw_scenario(), on={}), codec=codec, state_dir=state, signing=True)
    run.driver.network.decode_lossless = True  # every message goes through decode
    stats = run.run(until=1200.0)
    assert codec.altered > 0 and stats.unverified > 0
    reason = "update_rejected" if victim != "root" else "message_rejected"
    assert stats.metric_counts.get(reason, 0) == stats.unverified
    if victim == "root":  # no region took a model from the root: no site ever trained
        assert not [v for _, node, v in run.versions if node.startswith("region-") and v > 0]
        assert stats.jobs_started == 0 and not run.applied
    else:  # the region never applied the site's updates; the others' it did
        assert stats.unverified == codec.altered  # each update decoded once, refused once
        applied_from = {src for _, _, src in run.applied}
        assert victim not in applied_from and applied_from


# ---------------------------------------------------------------------- the options


def test_durability_options_are_read_strictly(temp_in_state: Path) -> None:
    raw = raw_scenario()
    scenario = parse_scenario({**raw, "durability": {"log": True}})
    assert scenario.arms[0].durability.log and not scenario.arms[0].durability.signing
    arm = dict(raw["arms"][0], durability={"signing": True})
    over = parse_scenario({**raw, "durability": {"log": True}, "arms": [arm]}).arms[0]
    assert over.durability.log and over.durability.signing  # the arm's table over the shared
    with pytest.raises(ConfigError, match="set log = true"):
        parse_scenario({**raw, "durability": {"restarts": [{"node": "root", "at_s": 5}]}})
    with pytest.raises(ConfigError, match="durability"):
        parse_scenario({**raw, "durability": {"log": True, "sign": True}})
    with pytest.raises(ConfigError, match="true or false"):
        parse_scenario({**raw, "durability": {"log": "yes"}})
    bad = with_arms(raw, x={"log": True, "restarts": [{"node": "nobody", "at_s": 5.0}]})
    with pytest.raises(ConfigError, match="nobody"):
        run_scenario(bad)


def test_a_given_state_dir_keeps_each_runs_logs(state: Path) -> None:
    raw = raw_scenario(5.0)
    scenario = with_arms(raw, kept={"log": True, "state_dir": str(state / "logs")})
    run_scenario(scenario)
    (run_dir,) = (state / "logs").iterdir()
    assert (run_dir / "root").is_dir() and any((run_dir / "root").iterdir())
