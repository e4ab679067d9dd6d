"""Nodes told which metrics their driver drops unread (``omit_metrics``: the simulator's
live gauges) leave those out and nothing else: the same effects less those, the same
deadlines, whatever happens (``federation.step`` tells them)."""

from __future__ import annotations

from typing import Any

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.outbox import OUTBOX_GAUGES
from fedloom.algorithms.protocol import Deadline, Effect, Metric, Persist, Send
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.federation.step import NodeStep
from fedloom.sim.driver import LIVE_GAUGES
from tests.algorithms.alg_helpers import MiniNet, model

SITES = ("s1", "s2", "s3")


def federation(omit: frozenset[str]) -> MiniNet:
    """A root, a region under it and three sites under the region (every link up), each
    node stepped as a driver that drops ``omit`` unread would step it."""
    nodes: dict[str, Any] = {
        "root": FedBuffAggregator("root", {"r1": "region"}, model(), buffer_size=2, concurrency=1),
        "r1": RegionalAggregator(
            "r1", "root", dict.fromkeys(SITES, "site"), buffer_size=2, concurrency=2
        ),
        **{s: SiteNode(s, "r1") for s in SITES},
    }
    for node in nodes.values():
        NodeStep(node, sink=None, skip_metrics=omit)  # type: ignore[arg-type]
    net = MiniNet(nodes)
    net.link("root", "r1", True)
    for s in SITES:
        net.link("r1", s, True)
    net.drain()
    return net


def kept(effects: list[Effect], omitted: frozenset[str]) -> list[tuple[Any, ...]]:
    """The effects less the omitted metrics, each as comparable fields (no arrays)."""
    out: list[tuple[Any, ...]] = []
    for e in effects:
        if isinstance(e, Metric):
            if e.name not in omitted:
                out.append(("metric", e.name, e.value, e.labels))
        elif isinstance(e, Send):
            fields = ("seq", "task", "version", "base_version", "n_examples", "count")
            out.append(
                ("send", e.peer, type(e.msg).__name__, *(getattr(e.msg, f, None) for f in fields))
            )
        elif isinstance(e, Persist):
            out.append(("persist", e.key, e.append))
        else:
            out.append((type(e).__name__,))
    return out


def test_omitted_gauges_are_all_that_changes() -> None:
    plain, quiet = federation(frozenset()), federation(LIVE_GAUGES)
    for step in range(12):
        for net in (plain, quiet):
            net.now = 7.0 * step
            net.drain()
            net.finish_jobs(bump=0.5)
            net.drain()
            for name in net.nodes:  # every node's deadline, due or not (a gauge refresh)
                net.feed(name, Deadline())
    names = {e.name for _, e in plain.effects if isinstance(e, Metric)}
    assert {"outbox_updates", "dispatch_paused", "buffer_fill", "forwards_kept"} <= names
    assert not {e.name for _, e in quiet.effects if isinstance(e, Metric)} & LIVE_GAUGES
    by_node: dict[str, list[list[Effect]]] = {}
    for net in (plain, quiet):
        for name in net.nodes:
            effects = [e for n, e in net.effects if n == name]
            by_node.setdefault(name, []).append(kept(effects, LIVE_GAUGES))
    for name, (a, b) in by_node.items():
        assert a == b, name
        assert plain.nodes[name].next_deadline() == quiet.nodes[name].next_deadline()
    assert plain.nodes["root"].applied == quiet.nodes["root"].applied > 0


def test_an_outbox_leaves_out_only_what_it_is_told() -> None:
    site = SiteNode("s", "p")
    site.omit_metrics({"outbox_bytes"})
    outbox = site._outbox
    assert outbox.wants("outbox_updates") and not outbox.wants("outbox_bytes")
    assert OUTBOX_GAUGES <= LIVE_GAUGES
