"""GossipPeer: consensus on ring vs exponential graphs, pruning, push-sum mass conservation."""

from __future__ import annotations

import heapq
import itertools
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.gossip import GossipPeer, PeerState
from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Event,
    Metric,
    PeerDown,
    PeerUp,
    ProtocolMisuseError,
    Received,
    Send,
    Train,
    TrainDone,
    TrainedDelta,
    TrainFailed,
    TrainResult,
)
from fedloom.transport.wire import GossipShare, Heartbeat, Update

DIM = 6  # entries of the "w" tensor; each model also has a one-entry "b" tensor

# ------------------------------------------------------------------ graphs (in-test)


def ring(n: int) -> dict[int, set[int]]:
    return {i: {(i - 1) % n, (i + 1) % n} for i in range(n)}


def exponential(n: int) -> dict[int, set[int]]:
    adj: dict[int, set[int]] = {i: set() for i in range(n)}
    hop = 1
    while hop < n:
        for i in range(n):
            adj[i].add((i + hop) % n)
            adj[(i + hop) % n].add(i)
        hop *= 2
    return adj


def complete(n: int) -> dict[int, set[int]]:
    return {i: {j for j in range(n) if j != i} for i in range(n)}


def metropolis(adj: Mapping[int, set[int]]) -> dict[int, tuple[dict[str, float], float]]:
    """W_ij = 1 / (1 + max(d_i, d_j)), W_ii = 1 - sum_j W_ij."""
    out = {}
    for i, nbrs in adj.items():
        row = {f"p{j}": 1.0 / (1 + max(len(nbrs), len(adj[j]))) for j in nbrs}
        out[i] = (row, 1.0 - sum(row.values()))
    return out


def make_peers(
    adj: Mapping[int, set[int]],
    init: Mapping[int, np.ndarray],
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, GossipPeer]:
    mh = metropolis(adj)
    seeds = np.random.SeedSequence(seed).spawn(len(adj))
    opts: dict[str, Any] = {
        "gossip_interval_s": 1.0,
        "heartbeat_interval_s": 1.0,
        "suspect_after_s": 3.0,
        "prune_after_s": 6.0,
    }
    opts.update(kwargs)
    return {
        f"p{i}": GossipPeer(
            f"p{i}",
            mh[i][0],
            mh[i][1],
            {"w": np.asarray(init[i], np.float64).reshape(2, DIM // 2), "b": np.array([float(i)])},
            rng=np.random.default_rng(seeds[i]),
            **opts,
        )
        for i in adj
    }


def vec(peer: GossipPeer) -> np.ndarray:
    _, model = peer.current_model()
    return np.concatenate([model["w"].ravel(), model["b"].ravel()])


def consensus_error(peers: Mapping[str, GossipPeer]) -> float:
    xs = np.stack([vec(p) for p in peers.values()])
    return float(np.abs(xs - xs.mean(axis=0)).max())


# --------------------------------------------------------------- a tiny event loop


@dataclass
class Loop:
    """A heap of (time, seq, dst, event); Send → Received after a latency; lazy deadlines."""

    nodes: dict[str, GossipPeer]
    latency: Callable[[str, str], float]
    train: Callable[[str, Train], TrainResult] | None = None
    train_time: float = 1.0
    now: float = 0.0
    dead: set[str] = field(default_factory=set)
    heap: list[tuple[float, int, str, Event]] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    armed: dict[str, float | None] = field(default_factory=dict)
    effects: list[tuple[float, str, Effect]] = field(default_factory=list)
    # When the link between two nodes comes up (PeerUp to both ends); None: all at 0.
    # Before that a Send on it is dropped, as a real peer set drops it (not connected).
    link_up: Callable[[str, str], float] | None = None
    dropped: list[tuple[float, str, Send]] = field(default_factory=list)

    def start(self) -> None:
        # Every link comes up with a PeerUp, as the drivers say it (a neighbour is down
        # until then); then the first deadline.
        for nid, node in self.nodes.items():
            states = getattr(node, "peer_states", None)  # a test's hostile node has none
            for peer in states() if states is not None else ():
                self.push(self.up_at(nid, peer), nid, PeerUp(peer))
            self.push(0.0, nid, Deadline())
            self.armed[nid] = 0.0

    def up_at(self, a: str, b: str) -> float:
        return 0.0 if self.link_up is None else self.link_up(*sorted((a, b)))

    def push(self, t: float, dst: str, event: Event) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), dst, event))

    def run(self, until: float) -> None:
        while self.heap and self.heap[0][0] <= until:
            t, _, dst, event = heapq.heappop(self.heap)
            if dst in self.dead:
                continue
            if isinstance(event, Deadline):
                if self.armed.get(dst) != t:
                    continue  # superseded deadline
                self.armed[dst] = None
            self.now = t
            self.apply(dst, self.nodes[dst].handle(event, t))
        self.now = until

    def apply(self, src: str, effects: list[Effect]) -> None:
        for eff in effects:
            self.effects.append((self.now, src, eff))
            if isinstance(eff, Send):
                if self.now < self.up_at(src, eff.peer):
                    self.dropped.append((self.now, src, eff))
                elif src not in self.dead and eff.peer not in self.dead:
                    at = self.now + self.latency(src, eff.peer)
                    self.push(at, eff.peer, Received(src, eff.msg))
            elif isinstance(eff, Train):
                assert self.train is not None
                self.push(self.now + self.train_time, src, TrainDone(eff.job, self.train(src, eff)))
        dl = self.nodes[src].next_deadline()
        if dl is not None:
            assert dl > self.now or self.armed.get(src) is not None, "deadline did not advance"
            at = max(dl, self.now)
            if self.armed.get(src) != at:
                self.armed[src] = at
                self.push(at, src, Deadline())

    def in_flight_shares(self) -> list[GossipShare]:
        return [
            ev.msg
            for _, _, dst, ev in self.heap
            if isinstance(ev, Received) and isinstance(ev.msg, GossipShare) and dst not in self.dead
        ]

    def metrics(self, name: str) -> list[tuple[str, Metric]]:
        return [(src, e) for _, src, e in self.effects if isinstance(e, Metric) and e.name == name]


def link_latency(seed: int) -> Callable[[str, str], float]:
    """A fixed latency per directed link, 20-200 ms."""

    def latency(a: str, b: str) -> float:
        h = zlib.crc32(f"{seed}:{a}:{b}".encode()) % 1000
        return 0.02 + 0.18 * h / 1000

    return latency


def initial(n: int, seed: int = 1) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.normal(size=DIM) * 10 for i in range(n)}


def steps_to_consensus(adj: Mapping[int, set[int]], tol: float, limit: float) -> float:
    peers = make_peers(adj, initial(len(adj)))
    loop = Loop(peers, link_latency(0))
    loop.start()
    scale = consensus_error(peers)
    t = 0.0
    while t < limit:
        t += 1.0
        loop.run(t)
        if consensus_error(peers) <= tol * scale:
            return t
    return float("inf")


# --------------------------------------------------------------------------- tests


def test_exponential_graph_reaches_consensus_faster_than_ring() -> None:
    n = 16
    t_exp = steps_to_consensus(exponential(n), 1e-3, 400)
    t_ring = steps_to_consensus(ring(n), 1e-3, 400)
    assert t_exp < float("inf")
    assert t_ring < float("inf")
    # The ring's spectral gap is Θ(1/n²), the exponential graph's Θ(1/log n).
    assert t_exp * 4 < t_ring


def test_dead_peer_is_pruned_and_the_rest_converge() -> None:
    n = 16
    adj = exponential(n)
    peers = make_peers(adj, initial(n), seed=3)
    loop = Loop(peers, link_latency(1))
    loop.start()
    loop.run(5.0)
    loop.dead.add("p3")
    loop.run(60.0)

    neighbours_of_dead = {f"p{j}" for j in adj[3]}
    pruners = {src for src, m in loop.metrics("peer_pruned") if m.labels == {"peer": "p3"}}
    assert pruners == neighbours_of_dead
    for nid in neighbours_of_dead:
        assert peers[nid].peer_states()["p3"] is PeerState.PRUNED
    # Nobody but p3 was pruned or left suspected.
    assert all(m.labels == {"peer": "p3"} for _, m in loop.metrics("peer_pruned"))
    for nid, p in peers.items():
        if nid != "p3":
            states = p.peer_states()
            assert all(s is PeerState.ALIVE for peer, s in states.items() if peer != "p3")
    # Once pruned, p3 gets no more shares, only rare heartbeat probes.
    last_prune = max(
        t for t, _, e in loop.effects if isinstance(e, Metric) and e.name == "peer_pruned"
    )
    late = [
        e for t, _, e in loop.effects if t > last_prune and isinstance(e, Send) and e.peer == "p3"
    ]
    assert late
    assert all(isinstance(e.msg, Heartbeat) for e in late)

    survivors = {k: v for k, v in peers.items() if k != "p3"}
    assert consensus_error(survivors) < 1e-3 * np.abs(np.stack(list(initial(n).values()))).max()


def test_pushsum_converges_to_the_true_average_despite_late_reordered_messages() -> None:
    n = 16
    adj = exponential(n)
    init = initial(n, seed=7)
    # Exact x conservation is the point here: the ClippedGossip clip (which trades it for a
    # bound on each share) is off; tests/algorithms/test_gossip_hostile.py runs it on.
    peers = make_peers(adj, init, mode="pushsum", seed=5, clip="off")
    truth = np.mean([vec(p) for p in peers.values()], axis=0)
    rng = np.random.default_rng(11)
    # Heavy-tailed latency, often longer than the gossip interval: shares arrive late and
    # out of order.
    loop = Loop(peers, lambda a, b: 0.01 + float(rng.exponential(0.8)))
    loop.start()
    loop.run(80.0)

    shares = loop.in_flight_shares()
    assert shares, "the test should end with mass still in flight"
    total_w = sum(p.mass()[0] for p in peers.values()) + sum(s.w for s in shares)
    assert total_w == pytest.approx(n, abs=1e-9)
    total_x = sum(p.mass()[1]["w"] for p in peers.values()) + sum(s.x["w"] for s in shares)
    assert np.allclose(total_x / n, truth[:DIM].reshape(2, -1), atol=1e-9)
    # Each x/w tends to the initial average (in-flight shares carry the same ratio).
    for p in peers.values():
        assert np.allclose(vec(p), truth, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    delays=st.lists(st.floats(0.0, 4.0), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_pushsum_loses_no_mass_while_its_links_come_up(delays: list[float], seed: int) -> None:
    """The start-up race of a real peer set: each link comes up (PeerUp to both ends) at
    its own time, up to four gossip intervals in, and a share sent on a link before that
    is dropped (DriverStats.sends_dropped on the daemons' drivers). A peer that stepped
    meanwhile keeps what it would have sent: nothing is dropped, the whole mass (n) is
    there and x/w reaches the true average."""
    n = 6
    adj = ring(n)
    init = initial(n, seed=seed)
    peers = make_peers(adj, init, mode="pushsum", seed=seed, clip="off")
    truth = np.mean([vec(p) for p in peers.values()], axis=0)
    x0 = sum(p.mass()[1]["w"] for p in peers.values())
    pairs = sorted({tuple(sorted((f"p{i}", f"p{j}"))) for i in adj for j in adj[i]})
    up = dict(zip(pairs, delays, strict=True))
    loop = Loop(peers, link_latency(seed), link_up=lambda a, b: up[(a, b)])
    loop.start()
    loop.run(max(delays) + 0.01)
    # Everyone has stepped by now, most of them before some of their links were up.
    assert all(p.current_model()[0] >= 1 for p in peers.values()) or max(delays) < 1.0
    loop.run(120.0)
    assert loop.dropped == []  # no share (and no heartbeat) sent on a link not yet up
    shares = loop.in_flight_shares()
    total_w = sum(p.mass()[0] for p in peers.values()) + sum(sh.w for sh in shares)
    assert total_w == pytest.approx(n, abs=1e-9)
    total_x = sum(p.mass()[1]["w"] for p in peers.values()) + sum(sh.x["w"] for sh in shares)
    assert np.allclose(total_x, x0, atol=1e-9)
    for p in peers.values():
        assert np.allclose(vec(p), truth, atol=1e-6)


def test_shares_for_a_neighbour_not_yet_up_stay_with_the_peer() -> None:
    """One peer, one link up and one not: its step sends only on the live link and keeps
    the rest ((x, w) minus exactly what left), then sends on both once the second is up."""
    p = GossipPeer(
        "a",
        {"b": 0.25, "c": 0.25},
        0.5,
        {"w": np.full((2, 3), 4.0)},
        mode="pushsum",
        clip="off",
        rng=np.random.default_rng(0),
    )
    assert p.peer_states() == {"b": PeerState.DOWN, "c": PeerState.DOWN}
    p.handle(PeerUp("b"), 0.0)
    t, sent = 0.0, []
    while not sent:
        t = p.next_deadline() or t
        sent = [e for e in p.handle(Deadline(), t) if isinstance(e, Send)]
    assert {e.peer for e in sent} == {"b"}
    (share,) = [e.msg for e in sent if isinstance(e.msg, GossipShare)]
    w, x = p.mass()
    assert share.w == pytest.approx(0.25) and w + share.w == pytest.approx(1.0, abs=1e-15)
    assert np.allclose(x["w"] + share.x["w"], 4.0, atol=1e-12)
    p.handle(PeerUp("c"), t)
    step = p.current_model()[0]
    while p.current_model()[0] == step:
        t = p.next_deadline() or t
        sent = [e for e in p.handle(Deadline(), t) if isinstance(e, Send)]
    assert {e.peer for e in sent if isinstance(e.msg, GossipShare)} == {"b", "c"}


def test_dpsgd_with_training_moves_towards_the_average_optimum() -> None:
    n = 8
    rng = np.random.default_rng(2)
    targets = {f"p{i}": rng.normal(size=DIM + 1) * 5 for i in range(n)}
    optimum = np.mean(list(targets.values()), axis=0)

    def train(src: str, job: Train) -> TrainResult:
        assert job.config["lr"] == 0.2
        z = np.concatenate([job.weights["w"].ravel(), job.weights["b"].ravel()])
        z = z - 0.2 * (z - targets[src])  # one step on ½‖z − t_src‖²
        return TrainResult({"w": z[:-1].reshape(2, -1), "b": z[-1:]}, n_examples=10)

    spread = max(np.linalg.norm(t - optimum) for t in targets.values())
    for mode in ("dpsgd", "pushsum"):
        peers = make_peers(
            complete(n),
            {i: np.zeros(DIM) for i in range(n)},
            mode=mode,
            train_config={"lr": 0.2},
        )
        loop = Loop(peers, link_latency(2), train=train, train_time=1.0)
        loop.start()
        loop.run(60.0)
        seeds = {e.config["seed"] for _, _, e in loop.effects if isinstance(e, Train)}
        assert len(seeds) > n  # every job gets its own seed
        for p in peers.values():
            step, _ = p.current_model()
            assert step > 30
            assert np.linalg.norm(vec(p) - optimum) < 0.35 * spread, mode
        # The peers' average tracks the global optimum closely.
        mean = np.mean([vec(p) for p in peers.values()], axis=0)
        assert np.linalg.norm(mean - optimum) < 0.02 * spread, mode


def _single(mode: str = "dpsgd", clip: object = "auto") -> GossipPeer:
    """Peer "a" with neighbours b and c, both links up at 0."""
    p = GossipPeer(
        "a",
        {"b": 0.25, "c": 0.25},
        0.5,
        {"w": np.ones((2, 3), dtype=np.float32)},
        mode=mode,
        clip=clip,
        rng=np.random.default_rng(0),
    )
    p.handle(PeerUp("b"), 0.0)
    p.handle(PeerUp("c"), 0.0)
    return p


def _share(**kw: Any) -> GossipShare:
    base: dict[str, Any] = {"src": "b", "step": 1, "x": {"w": np.zeros((2, 3), np.float32)}}
    base.update(kw)
    return GossipShare(**base)


@pytest.mark.parametrize("mode", ["dpsgd", "pushsum"])
@pytest.mark.parametrize(
    ("peer", "msg", "reason"),
    [
        ("z", _share(src="z"), "unknown peer"),
        ("b", _share(src="c"), "src mismatch"),
        ("b", Update("b", 1, 0, {}, 1), "unexpected message"),
        ("b", _share(x={"w": np.zeros((3, 2), np.float32)}), "bad shape"),
        ("b", _share(x={"w": np.zeros((2, 3), np.int32)}), "bad dtype"),
        ("b", _share(x={"w": np.zeros((2, 3), object)}), "bad dtype"),
        ("b", _share(x={"v": np.zeros((2, 3), np.float32)}), "tensor names differ"),
        ("b", _share(x={"w": [[0.0] * 3] * 2}), "tensor is not an array"),
        ("b", _share(x=b"junk"), "payload is not a tensor map"),
        ("b", _share(x={"w": np.full((2, 3), np.nan, np.float32)}), "non-finite values"),
        ("b", _share(x={"w": np.full((2, 3), np.inf, np.float32)}), "non-finite values"),
        ("b", _share(w=float("nan")), "bad weight"),
        ("b", _share(w="1"), "bad weight"),
        ("b", _share(step=-1), "bad step"),
    ],
)
def test_bad_input_is_rejected_without_raising(mode: str, peer: str, msg: Any, reason: str) -> None:
    p = _single(mode)
    p.handle(Deadline(), 0.0)
    before_w, before_x = p.mass()
    effects = p.handle(Received(peer, msg), 0.5)
    rejected = [e for e in effects if isinstance(e, Metric) and e.name == "update_rejected"]
    assert [m.labels for m in rejected] == [{"reason": reason}]
    assert not any(isinstance(e, Send) for e in effects)
    after_w, after_x = p.mass()
    assert after_w == before_w
    assert np.array_equal(after_x["w"], before_x["w"])
    # A rejected share never enters the mixing.
    p.handle(Deadline(), 10.0)
    if mode == "dpsgd":
        assert np.array_equal(p.current_model()[1]["w"], np.ones((2, 3)))


def test_pushsum_rejects_non_positive_weight() -> None:
    p = _single("pushsum")
    effects = p.handle(Received("b", _share(w=0.0)), 0.0)
    assert [e.labels for e in effects if isinstance(e, Metric)] == [{"reason": "bad weight"}]


def test_float16_share_is_accepted_and_mixed() -> None:
    p = _single("dpsgd", clip="off")  # checks the exact D-PSGD arithmetic
    p.handle(Received("b", _share(x={"w": np.full((2, 3), 3.0, np.float16)})), 0.0)
    while p.current_model()[0] == 0:  # up to the first gossip step
        dl = p.next_deadline()
        assert dl is not None
        p.handle(Deadline(), dl)
    _, model = p.current_model()
    assert model["w"].dtype == np.float32
    # 0.5·1 + 0.25·3 + 0.25·1 (c not heard from: its weight stays with self).
    assert np.allclose(model["w"], 1.5)


def test_peer_down_and_up_move_weight_to_self_and_back() -> None:
    p = _single("pushsum")
    p.handle(Deadline(), 0.0)
    effects = p.handle(PeerDown("b"), 0.1)
    assert p.peer_states()["b"] is PeerState.DOWN
    t = 0.1
    sent: list[Send] = []
    while t < 5.0:
        t = p.next_deadline() or 5.0
        effects = p.handle(Deadline(), t)
        sent += [e for e in effects if isinstance(e, Send)]
        for e in effects:  # c gives its mass back (a neighbour that never does is cut off)
            if isinstance(e, Send) and isinstance(e.msg, GossipShare):
                p.handle(Received("c", GossipShare("c", 1, e.msg.x, e.msg.w)), t)
    assert sent and all(s.peer == "c" for s in sent)
    shares = [s.msg for s in sent if isinstance(s.msg, GossipShare)]
    assert shares[0].w == pytest.approx(0.25)  # only c's fraction leaves
    p.handle(PeerUp("b"), t)
    assert p.peer_states()["b"] is PeerState.ALIVE
    step0 = p.current_model()[0]
    effects = []
    while p.current_model()[0] == step0:  # up to the next gossip step
        t = p.next_deadline() or t
        effects = p.handle(Deadline(), t)
    shared = {e.peer: e.msg for e in effects if isinstance(e, Send)}
    assert set(shared) == {"b", "c"}
    assert all(isinstance(m, GossipShare) for m in shared.values())


def test_pruned_peer_is_readmitted_by_its_next_message() -> None:
    p = _single("dpsgd")
    p.handle(Deadline(), 0.0)
    t = 0.0
    pruned: list[Metric] = []
    while t < 20.0:
        t = p.next_deadline() or 20.0
        effects = p.handle(Deadline(), t)
        # c keeps talking, b is silent
        effects += p.handle(Received("c", Heartbeat("c", 0)), t)
        pruned += [e for e in effects if isinstance(e, Metric) and e.name == "peer_pruned"]
    assert [m.labels for m in pruned] == [{"peer": "b"}]
    effects = p.handle(Received("b", _share(x={"w": np.full((2, 3), 5.0, np.float32)})), t)
    assert any(isinstance(e, Metric) and e.name == "peer_readmitted" for e in effects)
    assert p.peer_states() == {"b": PeerState.ALIVE, "c": PeerState.ALIVE}


def _training_peer() -> GossipPeer:
    """Peer "a" with one neighbour "b", a 3-entry model and training on."""
    return GossipPeer(
        "a",
        {"b": 0.5},
        0.5,
        {"w": np.zeros(3)},
        train_config={"lr": 0.1, "seed": 7},
        rng=np.random.default_rng(0),
    )


def test_training_failure_is_retried_after_an_interval() -> None:
    p = _training_peer()
    (train,) = [e for e in p.handle(PeerUp("b"), 0.0) if isinstance(e, Train)]
    assert train.config == {"lr": 0.1, "seed": 8}
    p.handle(TrainFailed(train.job, "oom"), 2.0)
    assert p.next_deadline() is not None
    effects = p.handle(Deadline(), 3.0)
    (retry,) = [e for e in effects if isinstance(e, Train)]
    assert retry.job == train.job + 1
    # A non-finite training result is not adopted.
    effects = p.handle(TrainDone(retry.job, TrainResult({"w": np.full(3, np.nan)}, 1)), 4.0)
    assert any(isinstance(e, Metric) and e.name == "train_failed" for e in effects)
    assert np.array_equal(p.current_model()[1]["w"], np.zeros(3))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"neighbours": {"b": 0.6}, "self_weight": 0.6},
        {"neighbours": {"a": 0.5}},
        {"neighbours": {"b": -0.5}, "self_weight": 1.5},
        {"mode": "gossipy"},
        {"gossip_interval_s": 0.0},
        {"suspect_after_s": 20.0},
        {"heartbeat_interval_s": 7.0},
        {"weights": {}},
        {"weights": {"w": np.zeros(2, np.int64)}},
        {"mode": "pushsum", "neighbours": {"b": 1.0}, "self_weight": 0.0},
    ],
)
def test_bad_constructor_arguments_raise_value_error(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "node_id": "a",
        "neighbours": {"b": 0.5},
        "self_weight": 0.5,
        "weights": {"w": np.zeros(2)},
        "rng": np.random.default_rng(0),
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        GossipPeer(**args)


# ------------------------------------------------------------------------ property


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(3, 5),
    dense=st.booleans(),
    actions=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 10_000)), max_size=120),
)
def test_pushsum_mass_is_conserved_under_any_delivery_order(
    n: int, dense: bool, actions: list[tuple[int, int]]
) -> None:
    adj = complete(n) if dense else ring(n)
    init = {i: np.full(DIM, float(i)) for i in range(n)}
    peers = make_peers(adj, init, mode="pushsum", clip="off")  # exact x arithmetic
    names = list(peers)
    x0 = sum(p.mass()[1]["w"] for p in peers.values())
    in_flight: list[tuple[str, Received]] = []
    now = 0.0

    def collect(src: str, effects: list[Effect]) -> None:
        in_flight.extend((e.peer, Received(src, e.msg)) for e in effects if isinstance(e, Send))

    def check() -> None:
        shares = [ev.msg for _, ev in in_flight if isinstance(ev.msg, GossipShare)]
        w = sum(p.mass()[0] for p in peers.values()) + sum(s.w for s in shares)
        x = sum(p.mass()[1]["w"] for p in peers.values()) + sum(s.x["w"] for s in shares)
        assert w == pytest.approx(n, abs=1e-9)
        assert np.allclose(x, x0, atol=1e-9)

    for nid in names:
        collect(nid, peers[nid].handle(Deadline(), now))
    for kind, k in actions:
        nid = names[k % n]
        peer = peers[nid]
        if kind in (0, 1):
            # Fire this peer's next timer.
            dl = peer.next_deadline()
            assert dl is not None
            now = max(now, dl)
            collect(nid, peer.handle(Deadline(), now))
            nxt = peer.next_deadline()
            assert nxt is None or nxt > now
        elif kind == 2 and in_flight:
            dst, ev = in_flight.pop(k % len(in_flight))
            collect(dst, peers[dst].handle(ev, now))
        else:
            other = sorted(peer.peer_states())[(k // n) % len(peer.peer_states())]
            event = PeerDown(other) if kind == 3 else PeerUp(other)
            collect(nid, peer.handle(event, now))
        check()
    while in_flight:
        dst, ev = in_flight.pop()
        assert not any(isinstance(e, Send) for e in peers[dst].handle(ev, now))
    assert sum(p.mass()[0] for p in peers.values()) == pytest.approx(n, abs=1e-9)


def _versions(effects: list[Effect]) -> list[float]:
    return [e.value for e in effects if isinstance(e, Metric) and e.name == "model_version"]


def test_every_step_reports_the_model_version_after_its_shares() -> None:
    # Without training: each gossip interval is a step.
    p = _single()
    p.handle(PeerUp("b"), 0.0)
    effects = p.handle(Deadline(), 1.0)
    assert _versions(effects) == [float(p.current_model()[0])] == [1.0]
    # With training: the step ends when the job is done, and the version follows its shares.
    t = GossipPeer(
        "a",
        {"b": 0.5},
        0.5,
        {"w": np.zeros(3)},
        train_config={"lr": 0.1},
        rng=np.random.default_rng(0),
    )
    (train,) = [e for e in t.handle(PeerUp("b"), 0.0) if isinstance(e, Train)]
    effects = t.handle(TrainDone(train.job, TrainResult({"w": np.ones(3)}, 1)), 1.0)
    assert _versions(effects) == [1.0]
    last_send = max(i for i, e in enumerate(effects) if isinstance(e, Send))
    (metric_at,) = [
        i for i, e in enumerate(effects) if isinstance(e, Metric) and e.name == "model_version"
    ]
    assert metric_at > last_send


def test_a_trained_delta_is_a_driver_mistake_for_a_gossip_peer() -> None:
    # A peer adopts the trained weights: a site's delta (TrainedDelta) is not for it, and
    # the driver is told, not the model silently replaced by a delta.
    p = _training_peer()
    (train,) = [e for e in p.handle(PeerUp("b"), 0.0) if isinstance(e, Train)]
    with pytest.raises(ProtocolMisuseError, match="needs a TrainResult"):
        p.handle(TrainDone(train.job, TrainedDelta({"w": np.ones(3)}, 1)), 1.0)
    assert np.array_equal(p.current_model()[1]["w"], np.zeros(3))
