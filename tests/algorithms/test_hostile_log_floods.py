"""A stream of small messages a node ignores must not become a stream of log lines.

An ignored message (a Hello under another role or name, an Ack sent to an aggregator, a
notice for another node, a message from a non-parent) costs the node nothing but the
line it logs, so a peer sending thousands a second would otherwise write thousands of
WARNING lines a second to the daemon's log. Each is still counted (metric
``message_rejected``); the log gets one line per peer and reason a minute
(``warn_limit.WarnLimiter``), carrying how many went unlogged.
"""

from __future__ import annotations

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Effect, Log, Received, Send, Train, TrainFailed
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.warn_limit import WARN_INTERVAL_S
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.federation.secagg_params import SecureAggregationConfig
from fedloom.transport.wire import (
    Ack,
    Hello,
    Incorporated,
    MaskedUpdate,
    Message,
    Overlap,
    SecAggJoin,
    SecAggView,
    SecAggViewSig,
    TrainRefused,
    TrainRequest,
    Update,
)
from tests.algorithms.alg_helpers import hello, metrics, model
from tests.algorithms.secagg_harness import Net, metric_count

FLOOD = 2_000


def logs(effects: list[Effect]) -> list[Log]:
    return [e for e in effects if isinstance(e, Log)]


def flood(node: object, peer: str, msg: Message, start: float = 1.0) -> list[Effect]:
    out: list[Effect] = []
    for i in range(FLOOD):  # 2,000 messages within two seconds
        out += node.handle(Received(peer, msg), start + i * 0.001)  # type: ignore[attr-defined]
    return out


def root() -> FedBuffAggregator:
    agg = FedBuffAggregator(
        "root", {"evil": "site", "s1": "site"}, model(0.0), buffer_size=2, concurrency=2
    )
    agg.handle(hello("evil"), 0.0)
    return agg


def test_a_site_flooding_its_aggregator_with_ignored_messages_costs_one_line_each() -> None:
    for msg in (
        Hello("evil", "region" * 100),  # another role (its Hello still counts it up)
        Hello("s1", "site"),  # another child's name
        Ack("evil", 1),  # a type an aggregator takes from nobody
        SecAggViewSig(b"c" * 16, b""),  # secure aggregation, which this one does not run
    ):
        agg = root()
        out = flood(agg, "evil", msg)
        assert len(logs(out)) == 1, (msg, len(logs(out)))
        if not isinstance(msg, Hello) or msg.src != "evil":
            assert len(metrics(out, "message_rejected")) == FLOOD  # each still counted
        # A minute later the next one is logged again, saying how many were not.
        [line] = logs(agg.handle(Received("evil", msg), 1.0 + WARN_INTERVAL_S + 5.0))
        assert line.fields is not None and line.fields["unlogged_before"] == FLOOD - 1


def test_a_parent_flooding_a_region_or_a_site_costs_one_line_per_reason() -> None:
    region = RegionalAggregator("r1", "root", {"s1": "site"}, buffer_size=2, concurrency=2)
    out = flood(region, "root", Ack("other", 1))
    out += flood(region, "root", Incorporated("other", 1))
    out += flood(region, "root", Hello("root", "region"))
    assert len(logs(out)) == 3
    site = SiteNode("s1", "r1")
    out = flood(site, "r1", Hello("r1", "region"))
    out += flood(site, "stranger", Ack("s1", 1))
    assert len(logs(out)) == 2


def test_a_member_repeating_refused_secure_aggregation_messages_costs_one_line_each() -> None:
    """The coordinator's refusals (``secagg_refused``): a masked upload under another
    member's name, a join claiming n < 0, repeated, through the coordinator a secure
    aggregator hands them to."""
    net = Net(3)
    coord, (evil, other, _) = net.coordinator, net.sites
    out: list[Effect] = []
    for i in range(FLOOD):
        now = 1.0 + i * 0.001
        forged = MaskedUpdate(other, 1, b"c" * 16, 0, 1, b"\0" * 4, ())
        out += coord.on_masked(evil, forged, now)
        out += coord.on_join(evil, SecAggJoin(evil, 1, 0, n_examples=-1), now)
    assert metric_count(out, "secagg_refused", reason="src_mismatch") == FLOOD
    assert metric_count(out, "secagg_refused", reason="bad_join") == FLOOD
    assert len(logs(out)) == 2
    later = coord.on_join(evil, SecAggJoin(evil, 1, 0, n_examples=-1), 1.0 + WARN_INTERVAL_S + 5)
    [line] = logs(later)
    assert line.fields is not None and line.fields["unlogged_before"] == FLOOD - 1


def test_a_parent_repeating_a_refused_secure_aggregation_message_costs_a_site_one_line() -> None:
    """The member's refusals (``secagg_refused``): a parent sending a view for a cohort
    this site never uploaded to, again and again, is counted each time and logged once
    a minute."""
    keys = derived_secagg_keys(["root", "s1", "s2", "s3"], seed=7)
    site = build_node(
        "site",
        "s1",
        "fedbuff",
        AlgorithmConfig(buffer_size=3, concurrency=3, clip_norm=None),
        TrainingConfig(lr=0.1, local_steps=1, batch_size=1, mu=0.0),
        Neighbours(parent="root", parent_role="root"),
        seed=0,
        n_examples=10,
        secagg=SecureAggregationConfig(enabled=True, min_cohort=3, max_dropout=0.3),
        secagg_keys=keys["s1"],
    )
    view = SecAggView(cohort=b"c" * 16, survivors=("s1", "s2", "s3"), dropped=())
    out = flood(site, "root", view)
    assert metric_count(out, "secagg_refused", reason="unknown_cohort") == FLOOD
    assert len(logs(out)) == 1
    [line] = logs(site.handle(Received("root", view), 1.0 + WARN_INTERVAL_S + 5.0))
    assert line.fields is not None and line.fields["unlogged_before"] == FLOOD - 1


def test_a_parent_repeating_a_request_the_site_refuses_to_train_costs_one_line() -> None:
    # A region re-sends the root's (signed) model as fast as the link goes, ignoring the
    # backoff an honest parent keeps: the site's trainer refuses each job at once (its
    # plan not approved, its privacy budget spent, its dataset revoked).
    site = SiteNode("s1", "r0")
    out: list[Effect] = []
    for i in range(FLOOD):
        now = 1.0 + i * 0.001
        train = site.handle(Received("r0", TrainRequest(i, 3, model(0.0), {})), now)
        (job,) = [e.job for e in train if isinstance(e, Train)]
        out += site.handle(TrainFailed(job, "plan not approved", "plan_not_approved"), now)
    # Each job still counts and is refused to the parent; the log gets a line a minute.
    assert len(metrics(out, "train_failed")) == FLOOD
    assert sum(isinstance(e, Send) and isinstance(e.msg, TrainRefused) for e in out) == FLOOD
    assert len(logs(out)) == 1
    later = site.handle(
        Received("r0", TrainRequest(FLOOD, 3, model(0.0), {})), 1.0 + WARN_INTERVAL_S
    )
    (job,) = [e.job for e in later if isinstance(e, Train)]
    more = site.handle(
        TrainFailed(job, "plan not approved", "plan_not_approved"), 2.0 + WARN_INTERVAL_S
    )
    (line,) = logs(more)
    assert line.fields is not None and line.fields["unlogged_before"] == FLOOD - 1


def test_a_region_resending_a_forward_of_pairs_taken_already_costs_one_line() -> None:
    # The root refuses it unrecorded (an Overlap naming the pairs, so an honest region
    # rebuilds it): nothing of it is written, so a region can send it again at once.
    agg = FedBuffAggregator("root", {"r0": "region"}, model(0.0), buffer_size=4, concurrency=1)
    agg.set_subtrees({"r0": ("s1",)})
    first = Update("r0", 1, 0, model(0.1), 10, count=1, pairs=(("s1", 1),))
    agg.handle(Received("r0", first), 0.5)
    again = Update("r0", 2, 0, model(0.1), 10, count=1, pairs=(("s1", 1),))
    out = flood(agg, "r0", again)
    assert len(metrics(out, "forward_overlap")) == FLOOD
    assert sum(isinstance(e, Send) and isinstance(e.msg, Overlap) for e in out) == FLOOD
    assert len(logs(out)) == 1
    [line] = logs(agg.handle(Received("r0", again), 1.0 + WARN_INTERVAL_S + 5.0))
    assert line.fields is not None and line.fields["unlogged_before"] == FLOOD - 1
