"""A Hello lost on a link that stays up (the simulator's loss_effect = "drop") is said
again after the child's hello_timeout_s; a repeated Hello is harmless at the parent."""

from __future__ import annotations

from fedloom.algorithms.aggregator_base import HELLO_MODEL_RESEND_S, HELLO_RETRY_MAX_FACTOR
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Deadline, Effect, PeerDown, PeerUp
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.sync import RoundState, SyncAggregator
from fedloom.transport.wire import Hello, ModelBroadcast, TrainRequest
from tests.algorithms.alg_helpers import hello, metrics, model, recv, requests, sends

T = 100.0  # hello_timeout_s


def hellos(out: list[Effect]) -> list[str]:
    return [e.peer for e in sends(out, Hello)]


def advance(node: SiteNode | RegionalAggregator) -> tuple[float, list[Effect]]:
    """Fire the node's next deadline."""
    due = node.next_deadline()
    assert due is not None
    return due, node.handle(Deadline(), due)


def test_a_site_says_hello_again_until_its_parent_answers() -> None:
    site = SiteNode("s1", "root", hello_timeout_s=T)
    assert hellos(site.handle(PeerUp("root"), 0.0)) == ["root"]  # and say it is lost
    times = []
    for _ in range(6):
        now, out = advance(site)
        assert hellos(out) == ["root"] and len(metrics(out, "hello_resent")) == 1
        times.append(now)
    # The wait doubles, up to HELLO_RETRY_MAX_FACTOR time-outs.
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert gaps == [T, 2 * T, 4 * T, 8 * T, 8 * T, 8 * T] and HELLO_RETRY_MAX_FACTOR == 8
    # A task answers it: no more Hellos (and no deadline for them).
    out = site.handle(recv("root", TrainRequest(1, 0, model(0.0))), times[-1] + 1.0)
    assert site.next_deadline() is None and hellos(out) == []


def test_a_site_without_a_hello_timeout_says_it_once_and_down_parent_stops_it() -> None:
    plain = SiteNode("s1", "root")
    plain.handle(PeerUp("root"), 0.0)
    assert plain.next_deadline() is None
    site = SiteNode("s1", "root", hello_timeout_s=T)
    site.handle(PeerUp("root"), 0.0)
    site.handle(PeerDown("root"), 10.0)
    assert site.next_deadline() is None  # the next PeerUp greets again
    assert hellos(site.handle(PeerUp("root"), 20.0)) == ["root"]
    assert site.next_deadline() == 20.0 + T


def test_a_region_says_hello_again_until_it_has_a_model() -> None:
    r = RegionalAggregator(
        "r1", "root", {"s1": "site"}, buffer_size=1, concurrency=1, hello_timeout_s=T
    )
    assert hellos(r.handle(PeerUp("root"), 0.0)) == ["root"]
    now, out = advance(r)
    assert now == T and hellos(out) == ["root"] and metrics(out, "hello_resent")
    now, out = advance(r)
    assert now == 3 * T and hellos(out) == ["root"]
    r.handle(recv("root", ModelBroadcast(0, model(0.0))), now + 1.0)
    assert r.next_deadline() is None and r.current_model() is not None


def test_a_repeated_site_hello_neither_doubles_its_task_nor_resets_it() -> None:
    root = FedBuffAggregator(
        "root", {"a": "site", "b": "site", "c": "site"}, model(0.0), buffer_size=2,
        concurrency=2, task_timeout_s=1000.0,
    )  # fmt: skip
    [(peer, first)] = requests(root.handle(hello("a"), 0.0))
    assert peer == "a"
    for t in (100.0, 300.0, 700.0):  # a's retries: its task (maybe lost) still stands
        out = root.handle(hello("a"), t)
        assert requests(out) == [] and len(metrics(out, "hello_repeated")) == 1
    assert root.children_up() == 1
    # One slot left of two: b gets it, c waits (a's Hellos took no second slot).
    assert [p for p, _ in requests(root.handle(hello("b"), 800.0))] == ["b"]
    assert requests(root.handle(hello("c"), 800.0)) == []
    # a's task times out at its original deadline (the Hellos did not restart it); the
    # freed slot goes to the site that waited, c.
    out = root.handle(Deadline(), 1000.0)
    assert [p for p, _ in requests(out)] == ["c"] and len(metrics(out, "job_timeout")) == 1
    assert first.task != requests(out)[0][1].task


def test_a_repeated_region_hello_gets_the_model_again_at_most_once_per_interval() -> None:
    root = FedBuffAggregator("root", {"r1": "region"}, model(0.0), buffer_size=1, concurrency=1)
    assert len(sends(root.handle(hello("r1", "region"), 0.0), ModelBroadcast)) == 1
    # The model was lost: the region says Hello again. Too soon: nothing (a flood buys none).
    out = root.handle(hello("r1", "region"), HELLO_MODEL_RESEND_S / 2)
    assert sends(out, ModelBroadcast) == [] and metrics(out, "hello_repeated")
    out = root.handle(hello("r1", "region"), HELLO_MODEL_RESEND_S)
    assert len(sends(out, ModelBroadcast)) == 1 and metrics(out, "model_resent")
    for t in (HELLO_MODEL_RESEND_S + 1, HELLO_MODEL_RESEND_S * 1.5):
        assert sends(root.handle(hello("r1", "region"), t), ModelBroadcast) == []
    assert root.children_up() == 1
    # A new session (PeerDown, Hello) gets the model at once, as before.
    root.handle(PeerDown("r1"), 100.0)
    assert len(sends(root.handle(hello("r1", "region"), 100.0), ModelBroadcast)) == 1


def test_a_sync_round_waits_for_distinct_sites_however_often_one_says_hello() -> None:
    sites = {"s1": "site", "s2": "site", "s3": "site"}
    agg = SyncAggregator(
        "root", sites, model(0.0), clients_per_round=2, min_available=2, round_timeout_s=1e3
    )
    for t in (0.0, 100.0, 300.0):  # s1's retries do not make it two sites
        out = agg.handle(hello("s1"), t)
        assert requests(out) == [] and agg.state is RoundState.WAITING
    reqs = requests(agg.handle(hello("s2"), 400.0))
    assert sorted(p for p, _ in reqs) == ["s1", "s2"]
    out = agg.handle(hello("s1"), 401.0)  # a retry in the round: no second task for s1
    assert requests(out) == [] and agg.state is RoundState.COLLECTING
