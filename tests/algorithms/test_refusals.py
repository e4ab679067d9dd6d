"""Refusals reach the aggregator (issue 14): a site answers a failed job with TrainRefused;
root, region and sync root count it, warn once per (site, code), free the task's slot and
keep training with the others; what is not believable is dropped, bounded."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Log,
    Metric,
    PeerDown,
    Send,
    Train,
    TrainFailed,
)
from fedloom.algorithms.refusals import (
    BACKOFF_S,
    MAX_REASON,
    REGION_BURST,
    RefusalBook,
    clean_code,
    clean_text,
)
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.sync import SyncAggregator
from fedloom.runtime.metrics import MetricsSink
from fedloom.transport.wire import TrainRefused, TrainRequest
from tests.algorithms.alg_helpers import (
    MiniNet,
    hello,
    labels,
    metrics,
    model,
    recv,
    requests,
    sends,
    star_net,
)

SITES = {"s1": "site", "s2": "site", "s3": "site"}


def warnings(out: list[Effect], needle: str = "refused training") -> list[Log]:
    return [e for e in out if isinstance(e, Log) and e.level == "warning" and needle in e.text]


def refusals_sent(out: list[Effect]) -> list[tuple[str, TrainRefused]]:
    return [(e.peer, e.msg) for e in sends(out, TrainRefused) if isinstance(e.msg, TrainRefused)]


def rejected(out: list[Effect]) -> list[str]:
    return [labels(m)["reason"] for m in metrics(out, "refusal_rejected")]


def fedbuff(**kw: Any) -> FedBuffAggregator:
    args: dict[str, Any] = {"buffer_size": 2, "concurrency": 3, "clip_norm": None}
    args.update(kw)
    return FedBuffAggregator("root", SITES, model(0.0), **args)


def started(root: FedBuffAggregator, now: float = 0.0) -> dict[str, int]:
    """Every site says Hello; returns site -> the task it was given."""
    tasks: dict[str, int] = {}
    for s in SITES:
        for peer, req in requests(root.handle(hello(s), now)):
            tasks[peer] = req.task
    return tasks


# ----------------------------------------------------------------------- the site


def test_a_failed_job_is_reported_to_the_parent_with_its_task_version_and_code() -> None:
    site = SiteNode("s1", "agg")
    [train] = [
        e
        for e in site.handle(recv("agg", TrainRequest(9, 3, model(), {"lr": 0.1})), 0.0)
        if isinstance(e, Train)
    ]
    assert train.config["server_round"] == 4  # Flower's rounds start at 1
    out = site.handle(TrainFailed(train.job, "x" * 5000, "plan_not_approved"), 1.0)
    [(peer, msg)] = refusals_sent(out)
    assert peer == "agg" and (msg.src, msg.task, msg.version) == ("s1", 9, 3)
    assert msg.code == "plan_not_approved" and msg.reason == "x" * 200
    assert metrics(out, "train_failed")  # the site's own count stays


def test_a_dropout_says_nothing_and_a_job_without_a_task_still_reports() -> None:
    site = SiteNode("s1", "agg")
    site.handle(recv("agg", TrainRequest(1, 0, model(), {})), 0.0)
    assert refusals_sent(site.handle(TrainFailed(1, "gone", "dropout"), 1.0)) == []
    site.handle(recv("agg", TrainRequest(-1, 2, model(), {})), 2.0)
    [(_, msg)] = refusals_sent(site.handle(TrainFailed(2, "boom"), 3.0))
    assert (msg.task, msg.version, msg.code) == (-1, 2, "failed")


# ------------------------------------------------------------------- FedBuff root


def test_root_counts_warns_once_per_site_and_code_and_frees_the_slot() -> None:
    root = fedbuff(concurrency=2)
    tasks = started(root)
    assert set(tasks) == {"s1", "s2"}  # s3 waits for a slot
    out = root.handle(recv("s1", TrainRefused("s1", tasks["s1"], 0, "failed", "KeyError")), 1.0)
    [m] = metrics(out, "site_refusals")
    assert labels(m) == {"code": "failed", "site": "s1"}
    [w] = warnings(out)
    assert "s1" in w.text and "failed" in w.text and "KeyError" in w.text
    # the slot went to the idle site, not back to the refusing one (it backs off)
    [(peer, req3)] = requests(out)
    assert peer == "s3" and root.in_flight == 2
    entry = root.refusals_view()["s1"]
    assert (entry["code"], entry["reason"], entry["count"], entry["version"]) == (
        "failed",
        "KeyError",
        1,
        0,
    )
    assert entry["backoff_until"] == 1.0 + BACKOFF_S
    # s2 refuses with another code: a slot is free, but s1 still backs off
    out = root.handle(recv("s2", TrainRefused("s2", tasks["s2"], 0, "plan_not_approved", "r")), 2.0)
    assert len(warnings(out)) == 1 and requests(out) == []
    assert root.next_deadline() == 1.0 + BACKOFF_S
    [(peer, req1)] = requests(root.handle(Deadline(), 1.0 + BACKOFF_S))
    assert peer == "s1"
    # the same site and code again: counted, no second WARNING; another site warns once
    out = root.handle(recv("s1", TrainRefused("s1", req1.task, 0, "failed", "again")), 7.0)
    assert metrics(out, "site_refusals") and warnings(out) == []
    out = root.handle(recv("s3", TrainRefused("s3", req3.task, 0, "failed", "r")), 7.0)
    assert len(warnings(out)) == 1
    assert root.refusals_view()["s1"]["count"] == 2 and root.refused == 4


def test_backoff_doubles_and_a_reconnect_lifts_it() -> None:
    root = fedbuff(concurrency=1)
    [(site, task)] = started(root).items()
    out = root.handle(recv(site, TrainRefused(site, task, 0, "failed", "r")), 0.0)
    assert root.refusals_view()[site]["backoff_until"] == BACKOFF_S
    # the others refuse in turn; then nobody is eligible and nothing is sent
    for now in (1.0, 2.0):
        [(other, req)] = requests(out)
        assert other != site
        out = root.handle(recv(other, TrainRefused(other, req.task, 0, "failed", "r")), now)
    assert requests(out) == [] and root.in_flight == 0
    [(again, req)] = requests(root.handle(Deadline(), BACKOFF_S))
    assert again == site
    root.handle(recv(site, TrainRefused(site, req.task, 0, "failed", "r")), BACKOFF_S)
    assert root.refusals_view()[site]["backoff_until"] == 3 * BACKOFF_S  # doubled: 2 x 5 s
    root.handle(PeerDown(site), 6.0)
    assert root.refusals_view()[site]["backoff_until"] is None
    [(peer, _)] = requests(root.handle(hello(site), 6.0))  # eligible at once after a reconnect
    assert peer == site and root.refusals_view()[site]["count"] == 2


def run_with_a_failing_site(net: MiniNet, bad: str, steps: int, reason: str) -> None:
    """``steps`` seconds of ``net``: each second every job of ``bad`` fails (code "failed",
    as when its plan raises), the others finish, and the root gets a ``Deadline``."""
    for step in range(steps):
        net.now = float(step)
        jobs, net.jobs = net.jobs, []
        for node, job in jobs:
            if node == bad:
                net.feed(node, TrainFailed(job.job, reason))
            else:
                net.jobs.append((node, job))
        net.finish_jobs()
        net.drain()
        net.feed("root", Deadline())
        net.drain()


def test_a_fedbuff_root_whose_one_site_always_fails_keeps_training() -> None:
    root = fedbuff(buffer_size=2, concurrency=3)
    net = star_net(root, SITES)
    run_with_a_failing_site(net, "s3", 60, "KeyError: 'server_round'")
    assert root.version >= 20
    view = root.refusals_view()
    assert list(view) == ["s3"] and int(view["s3"]["count"]) >= 3  # type: ignore[call-overload]
    logs = [e for n, e in net.effects if n == "root" and isinstance(e, Log)]
    assert len([e for e in logs if "refused training" in e.text]) == 1  # once per site+code


# -------------------------------------------------------------------- sync rounds


def test_a_sync_root_selecting_every_site_completes_rounds_past_one_that_refuses() -> None:
    root = SyncAggregator(
        "root", SITES, model(0.0), clients_per_round=3, min_cohort=2, round_timeout_s=30.0
    )
    net = star_net(root, SITES)
    run_with_a_failing_site(net, "s2", 200, "plan raised")
    assert root.rounds_closed >= 5 and root.version == root.rounds_closed
    assert root.refusals_view()["s2"]["count"] >= 2  # type: ignore[operator]


def test_a_sync_round_lost_to_refusals_ends_at_once_with_its_survivors() -> None:
    root = SyncAggregator("root", SITES, model(0.0), clients_per_round=3, min_cohort=1)
    tasks: dict[str, int] = {}
    for s in SITES:
        tasks.update((p, r.task) for p, r in requests(root.handle(hello(s), 0.0)))
    assert len(tasks) == 3
    for s in ("s1", "s2", "s3"):
        out = root.handle(recv(s, TrainRefused(s, tasks[s], 0, "failed", "r")), 1.0)
    # every task refused: the round is abandoned at once (no deadline wait), no new round
    # starts while every site backs off
    assert root.rounds_abandoned == 1 and requests(out) == []
    out = root.handle(Deadline(), 1.0 + BACKOFF_S)
    assert len(requests(out)) == 3  # then a new round draws them again


# ------------------------------------------------------------------------ attacks


def test_forged_and_undispatched_refusals_free_nothing() -> None:
    root = fedbuff(concurrency=3)
    tasks = started(root)
    before = root.in_flight
    # s1 forges s2's refusal, with s2's real task
    out = root.handle(recv("s1", TrainRefused("s2", tasks["s2"], 0, "failed", "x")), 1.0)
    assert rejected(out) == ["src_mismatch"] and requests(out) == []
    # s1 refuses a task it does not hold (s2's), and one never dispatched
    out = root.handle(recv("s1", TrainRefused("s1", tasks["s2"], 0, "failed", "x")), 1.0)
    out += root.handle(recv("s1", TrainRefused("s1", 999, 0, "failed", "x")), 1.0)
    out += root.handle(recv("s1", TrainRefused("s1", -1, 0, "failed", "x")), 1.0)
    assert rejected(out) == ["not_outstanding"] * 3
    assert root.in_flight == before and root.refusals_view() == {}
    assert metrics(out, "site_refusals") == []
    # a stranger (not a child) is ignored as any unexpected message
    out = root.handle(recv("mallory", TrainRefused("s1", tasks["s1"], 0, "failed", "x")), 1.0)
    assert metrics(out, "message_rejected") and root.in_flight == before


def test_a_flood_of_refusals_costs_one_count_and_few_log_lines() -> None:
    root = fedbuff(concurrency=3)
    tasks = started(root)
    out: list[Effect] = []
    for i in range(5000):
        msg = TrainRefused("s1", tasks["s1"], 0, "failed", f"r{i}")
        out += root.handle(recv("s1", msg), 1.0 + i * 0.001)
    assert root.refusals_view()["s1"]["count"] == 1 and root.refused == 1
    assert len(metrics(out, "site_refusals")) == 1
    assert len(rejected(out)) == 4999  # each counted as a metric
    assert len([e for e in out if isinstance(e, Log)]) <= 3  # but logged rarely


def test_oversized_and_odd_strings_are_cut_and_made_printable() -> None:
    root = fedbuff(concurrency=3)
    tasks = started(root)
    code = "evil\n\x1b[31mcode" + "z" * 500
    reason = "line1\nline2\x00\u202e" + "y" * 100_000
    out = root.handle(recv("s1", TrainRefused("s1", tasks["s1"], 0, code, reason)), 1.0)
    entry = root.refusals_view()["s1"]
    assert len(str(entry["code"])) <= 40 and str(entry["code"]).isprintable()
    assert len(str(entry["reason"])) <= MAX_REASON and str(entry["reason"]).isprintable()
    [m] = metrics(out, "site_refusals")
    assert labels(m)["code"] == "other"  # a peer's string mints no metric series
    [w] = warnings(out)
    assert "\n" not in w.text and "\x1b" not in w.text and len(w.text) < 400
    assert clean_code("") == "unknown" and clean_text(None) == ""


def test_the_book_is_bounded() -> None:
    book = RefusalBook(max_sites=3)
    for i in range(10):
        book.note(f"site-{i}", "failed", "r", 0, float(i))
    assert list(book.view()) == ["site-7", "site-8", "site-9"]  # the newest stay
    for task in range(10_000):
        book.fresh("s", task)
    assert book.fresh("s", 9_999) is False and book.fresh("s", 0) is True  # a window


# ------------------------------------------------------------------------- regions

REGION_CHILDREN = {"s1": "site", "s2": "site"}


def region_tree() -> tuple[MiniNet, FedBuffAggregator, RegionalAggregator]:
    root = FedBuffAggregator(
        "root",
        {"r1": "region"},
        model(0.0),
        buffer_size=1,
        concurrency=0,
        clip_norm=None,
        claim_bounds=ClaimBounds(roster_sites=frozenset(REGION_CHILDREN)),
    )
    region = RegionalAggregator(
        "r1", "root", REGION_CHILDREN, buffer_size=1, concurrency=2, clip_norm=None
    )
    sites = {s: SiteNode(s, "r1") for s in REGION_CHILDREN}
    net = MiniNet({"root": root, "r1": region, **sites})
    net.link("r1", "root", True)
    for s in REGION_CHILDREN:
        net.link("r1", s, True)
    net.drain()
    return net, root, region


def test_a_region_relays_a_refusal_and_the_root_book_shows_the_site() -> None:
    net, root, region = region_tree()
    jobs, net.jobs = net.jobs, []
    assert {n for n, _ in jobs} == {"s1", "s2"}
    for node, job in jobs:
        if node == "s1":
            net.feed(node, TrainFailed(job.job, "dataset revoked", "dataset_revoked"))
        else:
            net.jobs.append((node, job))
    net.drain()
    assert region.refusals_view()["s1"]["code"] == "dataset_revoked"
    assert root.refusals_view()["s1"]["code"] == "dataset_revoked"
    root_logs = [e for n, e in net.effects if n == "root" and isinstance(e, Log)]
    [w] = [e for e in root_logs if "refused training" in e.text]
    assert "s1" in w.text and "via r1" in w.text
    # the region's other site trains on and the model advances
    net.finish_jobs()
    net.drain()
    assert root.version >= 1


def regions_root(children: dict[str, str] | None = None, **options: Any) -> FedBuffAggregator:
    """A FedBuff root over ``children`` (default: regions r1 and r2) that releases on each
    update; ``options`` go to ``FedBuffAggregator``."""
    return FedBuffAggregator(
        "root",
        children if children is not None else {"r1": "region", "r2": "region"},
        model(0.0),
        buffer_size=1,
        concurrency=1,
        clip_norm=None,
        **options,
    )


def unverified(out: list[Effect]) -> list[dict[str, str]]:
    return [labels(m) for m in metrics(out, "site_refusals") if labels(m)["site"] == "other"]


def test_a_region_cannot_speak_for_the_roots_own_children_nor_outside_its_subtree() -> None:
    root = regions_root(
        {"r1": "region", "r2": "region", "s9": "site"},
        claim_bounds=ClaimBounds(roster_sites=frozenset({"s9", "a1", "a2", "b1"})),
    )
    root.handle(hello("r1", "region"), 0.0)
    out = root.handle(recv("r1", TrainRefused("s9", 1, 0, "failed", "x")), 1.0)
    out += root.handle(recv("r1", TrainRefused("r2", 1, 0, "failed", "x")), 1.0)
    out += root.handle(recv("r1", TrainRefused("root", 1, 0, "failed", "x")), 1.0)
    out += root.handle(recv("r1", TrainRefused("no-such-site", 1, 0, "failed", "x")), 1.0)
    out += root.handle(recv("r1", TrainRefused("bad id\n", 1, 0, "failed", "x")), 1.0)
    assert rejected(out) == ["bad_src"]
    # Counted under r1 (label "other"), never in the named nodes' names; one line.
    assert len(unverified(out)) == 4 and set(root.refusals_view()) == {"r1"}
    assert root.refusals_view()["r1"]["count"] == 4
    [line] = [e for e in out if isinstance(e, Log) and "cannot speak" in e.text]
    assert "region r1" in line.text
    assert refusals_sent(out) == []  # a root relays nothing; a region relays only believed
    # A roster site outside the root's own children: believed without [subtrees].
    out = root.handle(recv("r1", TrainRefused("b1", 1, 0, "failed", "x")), 1.5)
    assert labels(metrics(out, "site_refusals")[0])["site"] == "b1"
    root.set_subtrees({"r1": ["a1", "a2"], "r2": ["b1"]})
    out = root.handle(recv("r1", TrainRefused("b1", 2, 0, "failed", "x")), 2.0)
    assert unverified(out) and root.refusals_view()["b1"]["count"] == 1
    out = root.handle(recv("r1", TrainRefused("a1", 1, 0, "failed", "x")), 2.0)
    assert rejected(out) == [] and root.refusals_view()["a1"]["count"] == 1
    # relayed twice (a region restarted, or its standby): counted once
    out = root.handle(recv("r1", TrainRefused("a1", 1, 0, "failed", "x")), 2.0)
    assert rejected(out) == ["duplicate"]


def test_without_a_roster_a_region_speaks_for_no_site() -> None:
    """A node given no roster's sites (and no [subtrees]) cannot tell a region's site from a
    made-up one: every relayed refusal is counted under the region."""
    root = FedBuffAggregator(
        "root", {"r1": "region"}, model(0.0), buffer_size=1, concurrency=1, clip_norm=None
    )
    out = root.handle(recv("r1", TrainRefused("hospital-b", 1, 0, "failed", "x")), 1.0)
    assert len(unverified(out)) == 1 and set(root.refusals_view()) == {"r1"}


def test_made_up_site_ids_mint_no_metric_series_nor_log_lines() -> None:
    """The reviewer's attack: a region names a fresh made-up site every second for an
    hour. One book entry (the region's), one label value, one line a minute."""
    root = regions_root(
        claim_bounds=ClaimBounds(roster_sites=frozenset({"hospital-a", "hospital-b"}))
    )
    sink = MetricsSink()
    out: list[Effect] = []
    for i in range(3600):
        forged = TrainRefused(f"x{i:05d}", i + 2, 0, "failed", "boom")
        step = root.handle(recv("r1", forged), 2.0 + i)
        for e in step:
            if isinstance(e, Metric):
                sink(e)
        out += [e for e in step if isinstance(e, Log)]
    series = [
        line
        for line in generate_latest(sink.registry).decode().splitlines()
        if line.startswith("fedloom_node_site_refusals_total{")
    ]
    assert len(series) == 1 and 'site="other"' in series[0]
    assert set(root.refusals_view()) == {"r1"}
    assert 55 <= len([e for e in out if e.level == "warning"]) <= 61  # one a minute
    assert not any("x0" in e.text for e in out if "refused training" in e.text)


def test_site_labels_are_capped_at_the_rosters_sites() -> None:
    """Believed sites get their own label value up to as many as the roster lists."""
    sites = {f"s{i}": "site" for i in range(4)}
    root = FedBuffAggregator(
        "root",
        {**sites, "r1": "region"},
        model(0.0),
        buffer_size=1,
        concurrency=4,
        clip_norm=None,
        claim_bounds=ClaimBounds(roster_sites=frozenset({*sites, "far-1", "far-2"})),
    )
    tasks = {}
    for s in sites:
        tasks.update({p: r.task for p, r in requests(root.handle(hello(s), 0.0))})
    out: list[Effect] = []
    for s, task in tasks.items():
        out += root.handle(recv(s, TrainRefused(s, task, 0, "failed", "x")), 1.0)
    for far in ("far-1", "far-2"):
        out += root.handle(recv("r1", TrainRefused(far, 1, 0, "failed", "x")), 1.0)
    values = {labels(m)["site"] for m in metrics(out, "site_refusals")}
    assert values == {*sites, "far-1", "far-2"}  # six roster sites: six values
    root.set_claim_bounds(ClaimBounds(roster_sites=frozenset({*sites, "far-1", "far-2", "n"})))
    # A seventh believed site under a roster of seven: its own; then none is left.
    out = root.handle(recv("r1", TrainRefused("n", 1, 0, "failed", "x")), 2.0)
    assert labels(metrics(out, "site_refusals")[0])["site"] == "n"
    root.set_claim_bounds(ClaimBounds(roster_sites=frozenset({"m", "n"})))
    out = root.handle(recv("r1", TrainRefused("m", 1, 0, "failed", "x")), 3.0)
    assert labels(metrics(out, "site_refusals")[0])["site"] == "other"


def test_one_region_cannot_make_anothers_refusals_look_like_resends() -> None:
    """The reviewer's dedupe poisoning: r1 pre-sends refusals in r2's site's name for
    tasks 1..60; r2's genuine refusal of task 5 still counts, under that site."""
    root = regions_root()
    root.set_subtrees({"r1": ["hospital-a"], "r2": ["hospital-b"]})
    for t in range(1, 61):
        lie = TrainRefused("hospital-b", t, 0, "out_of_bounds", "lr=9 outside bounds")
        root.handle(recv("r1", lie), 1.0)
    out = root.handle(recv("r2", TrainRefused("hospital-b", 5, 3, "dataset_revoked", "real")), 2.0)
    assert rejected(out) == []
    [m] = metrics(out, "site_refusals")
    assert labels(m) == {"code": "dataset_revoked", "site": "hospital-b"}
    entry = root.refusals_view()["hospital-b"]
    assert (entry["code"], entry["reason"], entry["count"]) == ("dataset_revoked", "real", 1)
    # The same again from r2 is a resend.
    out = root.handle(recv("r2", TrainRefused("hospital-b", 5, 3, "dataset_revoked", "real")), 3.0)
    assert rejected(out) == ["duplicate"]


def test_a_region_flooding_refusals_is_rate_limited() -> None:
    root = FedBuffAggregator(
        "root", {"r1": "region"}, model(0.0), buffer_size=1, concurrency=0, clip_norm=None
    )
    out: list[Effect] = []
    for i in range(1000):
        out += root.handle(recv("r1", TrainRefused(f"fake-{i}", i, 0, "failed", "x")), 5.0)
    assert rejected(out).count("rate_limited") == 1000 - int(REGION_BURST)
    assert root.refusals_view()["r1"]["count"] == int(REGION_BURST)
    assert len([e for e in out if isinstance(e, Log)]) <= 3
    # the bucket refills with time
    out = root.handle(recv("r1", TrainRefused("fake-x", 1, 0, "failed", "x")), 60.0)
    assert rejected(out) == []


def test_a_refusal_travels_site_to_region_to_root_and_no_further() -> None:
    net, _, _ = region_tree()
    jobs, net.jobs = net.jobs, []
    node, job = jobs[0]
    out = net.feed(node, TrainFailed(job.job, "x"))
    net.drain()
    relayed = [
        (n, e.peer)
        for n, e in net.effects
        if isinstance(e, Send) and isinstance(e.msg, TrainRefused)
    ]
    assert relayed == [(node, "r1"), ("r1", "root")]
    assert out
