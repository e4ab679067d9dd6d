"""Random deliveries, duplicates, drops and reconnects against a FedBuff root and real sites."""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import (
    Deadline,
    Metric,
    Persist,
    Received,
    Send,
    TrainDone,
    TrainFailed,
    TrainResult,
)
from fedloom.algorithms.site import SiteNode
from fedloom.transport.wire import Ack, Update
from tests.algorithms.alg_helpers import MiniNet, model

SITES = ("a", "b", "c")
K = 2


class FedBuffUnderChaos(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        root = FedBuffAggregator(
            "root",
            dict.fromkeys(SITES, "site"),
            model(0.0),
            buffer_size=K,
            concurrency=2,
            task_timeout_s=5.0,
            checkpoint_every=1,
        )
        nodes: dict[str, object] = {"root": root}
        nodes.update({s: SiteNode(s, "root") for s in SITES})
        self.root = root
        self.net = MiniNet(nodes)
        self.up = dict.fromkeys(SITES, False)
        self.seen_updates: list[Update] = []
        self.applied: set[tuple[str, int]] = set()
        self.persisted: set[tuple[str, int]] = set()
        self.checked = 0
        self.last_version = 0
        for s in SITES:
            self._connect(s)

    def _connect(self, s: str) -> None:
        self.net.link(s, "root", up=True)
        self.up[s] = True

    # ------------------------------------------------------------- rules
    @rule(data=st.data(), burst=st.integers(1, 6))
    def deliver(self, data: st.DataObject, burst: int) -> None:
        """Deliver a few messages, each on a randomly chosen link (FIFO per link)."""
        for _ in range(burst):
            links = sorted(k for k, q in self.net.queues.items() if q)
            if not links:
                return
            src, dst = data.draw(st.sampled_from(links))
            q = self.net.queues[(src, dst)]
            if dst == "root" and isinstance(q[0], Update):
                self.seen_updates.append(q[0])
            self.net.deliver_one(src, dst)

    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        if not self.seen_updates:
            return
        u = data.draw(st.sampled_from(self.seen_updates))
        self.net.feed("root", Received(u.src, u))

    @rule(data=st.data(), bump=st.floats(-1.0, 1.0), fail=st.booleans())
    def finish_job(self, data: st.DataObject, bump: float, fail: bool) -> None:
        if not self.net.jobs:
            return
        i = data.draw(st.integers(0, len(self.net.jobs) - 1))
        node, train = self.net.jobs.pop(i)
        if fail:
            self.net.feed(node, TrainFailed(train.job, "chaos"))
            return
        trained = {k: (v + bump).astype(v.dtype) for k, v in train.weights.items()}
        self.net.feed(node, TrainDone(train.job, TrainResult(trained, 5)))

    @rule(bump=st.floats(-1.0, 1.0))
    def work_round(self, bump: float) -> None:
        """Every running job finishes, then one message moves on every busy link."""
        self.net.finish_jobs(bump=bump, n_examples=5)
        for src, dst in sorted(k for k, q in self.net.queues.items() if q):
            q = self.net.queues[(src, dst)]
            if dst == "root" and isinstance(q[0], Update):
                self.seen_updates.append(q[0])
            self.net.deliver_one(src, dst)

    @rule(site=st.sampled_from(SITES))
    def drop_link(self, site: str) -> None:
        if self.up[site]:
            self.net.link(site, "root", up=False)
            self.up[site] = False

    @rule(site=st.sampled_from(SITES))
    def reconnect(self, site: str) -> None:
        if not self.up[site]:
            self._connect(site)

    @rule(dt=st.floats(0.5, 8.0))
    def tick(self, dt: float) -> None:
        self.net.now += dt
        deadline = self.root.next_deadline()
        if deadline is not None and deadline <= self.net.now:
            self.net.feed("root", Deadline())

    @rule()
    def heal_and_settle(self) -> None:
        """Everything reconnects, every message gets through and training goes on (lost
        tasks time out): all updates are acked, one held over its site's intake quota as
        soon as a later flush frees a slot for it."""
        for s in SITES:
            if not self.up[s]:
                self._connect(s)
        sites = [self.net.nodes[s] for s in SITES]
        for _ in range(20):
            self.net.drain()
            if all(n.pending == 0 for n in sites):
                break
            self.net.finish_jobs(n_examples=5)
            self.net.drain()
            self.net.now += 6.0  # past task_timeout_s: a task whose job failed is freed
            self.net.feed("root", Deadline())
        assert all(n.pending == 0 for n in sites), [n.pending for n in sites]

    # -------------------------------------------------------- invariants
    @invariant()
    def root_effects_are_safe(self) -> None:
        effects = self.net.effects
        for node, e in effects[self.checked :]:
            if node != "root":
                continue
            if isinstance(e, Metric) and e.name == "update_applied":
                key = (e.labels["src"], int(e.labels["seq"]))  # type: ignore[index]
                assert key not in self.applied, f"{key} applied twice"
                self.applied.add(key)
            elif isinstance(e, Persist) and e.key == "applied":
                self.persisted.add((e.data["src"], e.data["seq"]))
            elif isinstance(e, Send) and isinstance(e.msg, Ack):
                assert (e.msg.src, e.msg.seq) in self.persisted, "Ack before its Persist"
        self.checked = len(effects)

    @invariant()
    def version_is_monotonic_and_consistent(self) -> None:
        v = self.root.version
        assert v >= self.last_version
        self.last_version = v
        assert len(self.applied) == K * v + self.root.buffer_fill
        assert self.root.in_flight <= 2


FedBuffUnderChaos.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFedBuffUnderChaos = FedBuffUnderChaos.TestCase
