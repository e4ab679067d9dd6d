"""The status board (``runtime.status``) fed by hand, its HTML page (``runtime.status_page``)
and the metrics port's ``/status.json`` and ``/status`` routes (``runtime.health``)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any

import aiohttp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.protocol import Metric, PeerDown, PeerUp, Received
from fedloom.runtime.health import start_observability
from fedloom.runtime.metrics import MetricsSink
from fedloom.runtime.middleware import LayeredNode
from fedloom.runtime.status import HISTORY, SCHEMA, StatusBoard
from fedloom.runtime.status_cli import _print, format_status
from fedloom.runtime.status_page import CSP, render
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.wire import Update

SITES = ("site-1", "site-2", "site-3")


def roster() -> Roster:
    ids = [
        Identity.generate("root", "root"),
        Identity.generate("region-a", "region"),
        Identity.generate("site-0", "site"),
        *(Identity.generate(s, "site") for s in SITES),
        Identity.generate("region-b", "region"),
    ]
    return Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in ids])


ROSTER = roster()


def board(**kw: Any) -> StatusBoard:
    args: dict[str, Any] = {
        "children": {"region-a": "region", "site-0": "site"},
        "roster": lambda: ROSTER,
        "algorithm": "fedbuff",
    }
    args.update(kw)
    return StatusBoard("root", "root", **args)


def forward(src: str, seq: int, pairs: tuple[tuple[str, int], ...]) -> Received:
    delta = {"w": np.zeros(2, dtype=np.float32)}
    return Received(src, Update(src, seq, 0, delta, 10, count=len(pairs), pairs=pairs))


def applied(src: str, seq: int = 1) -> Metric:
    return Metric("update_applied", 0.0, {"src": src, "seq": str(seq)})


def member(doc: Mapping[str, Any], node_id: str) -> dict[str, Any]:
    found = [n for tier in doc["tiers"] for n in tier if n["id"] == node_id]
    assert len(found) == 1, (node_id, doc["tiers"])
    return found[0]


def test_the_board_follows_links_updates_and_versions() -> None:
    b = board(started=100.0)
    b.observe(PeerUp("region-a"), [], 100.0)
    b.observe(PeerUp("site-0"), [], 100.5)
    b.observe(PeerUp("stranger"), [], 100.5)  # not a neighbour: not listed
    b.observe(forward("region-a", 1, (("site-1", 4), ("site-2", 7))), [applied("region-a")], 101)
    b.observe(Received("site-0", Update("site-0", 1, 0, {}, 5)), [applied("site-0")], 102.0)
    b.observe(PeerDown("site-0"), [], 103.0)
    for v, t in ((1, 101.0), (1, 101.5), (2, 104.0)):  # a repeated version is one point
        b.observe(PeerUp("region-a"), [Metric("model_version", float(v))], t)
    b.evaluated(2, {"accuracy": 0.75, "loss": 0.5}, 104.5)
    doc = b.document(110.0)
    assert doc["schema"] == SCHEMA
    json.dumps(doc, allow_nan=False)  # JSON as it is served
    assert doc["tiers"][0][0]["id"] == "root" and doc["node"]["roster_version"] == 1
    assert doc["connected"] == ["region-a"]
    region, site0 = member(doc, "region-a"), member(doc, "site-0")
    assert region["connected"] is True and region["last_update_age_s"] == 9.0
    assert site0["connected"] is False and site0["updates"] == 1
    assert site0["last_update_age_s"] == 8.0
    # Sites learned from the forward's pairs, under the region that delivered them.
    assert [s["id"] for s in doc["tiers"][2]] == ["site-1", "site-2"]
    assert member(doc, "site-1")["parent"] == "region-a"
    assert member(doc, "site-1")["last_update_age_s"] == 9.0
    assert "site-3" not in {n["id"] for tier in doc["tiers"] for n in tier}  # never heard of
    assert doc["model"] == {"version": 2, "version_age_s": 6.0, "versions_seen": 2}
    assert doc["versions"] == [[1.0, 1], [4.0, 2]]
    assert doc["accuracy"] == [[4.5, 2, 0.75, 0.5]]
    assert doc["privacy"] is None and doc["refusals"] is None


def test_pairs_are_believed_only_for_roster_sites_of_applied_forwards() -> None:
    b = board()
    # Not applied (rejected): nothing learned.
    b.observe(forward("region-a", 1, (("site-1", 1),)), [Metric("update_rejected")], 1.0)
    # Applied, but the pairs name a region, a child, an unknown id and the root itself.
    bogus = (("region-b", 1), ("site-0", 2), ("nobody", 3), ("root", 4), ("site-3", 5))
    b.observe(forward("region-a", 2, bogus), [applied("region-a", 2)], 2.0)
    # A site child cannot forward pairs.
    b.observe(forward("site-0", 3, (("site-2", 1),)), [applied("site-0", 3)], 3.0)
    doc = b.document(4.0)
    assert [s["id"] for s in doc["tiers"][2]] == ["site-3"]
    assert member(doc, "site-0")["updates"] == 1  # its own update, not the pair


def test_a_declared_subtree_lists_its_sites_and_refuses_others() -> None:
    b = board(subtrees={"region-a": ("site-1", "site-2")})
    doc = b.document(0.0)
    assert [(s["id"], s["parent"], s["updates"]) for s in doc["tiers"][2]] == [
        ("site-1", "region-a", 0),
        ("site-2", "region-a", 0),
    ]
    b.observe(forward("region-a", 1, (("site-2", 1), ("site-3", 1))), [applied("region-a")], 5.0)
    doc = b.document(6.0)
    assert [s["id"] for s in doc["tiers"][2]] == ["site-1", "site-2"]
    assert member(doc, "site-2")["last_update_age_s"] == 1.0
    assert member(doc, "site-1")["last_update_age_s"] is None


def test_histories_are_bounded_and_privacy_is_read_from_the_node_s_gauges() -> None:
    b = board()
    for v in range(HISTORY + 50):
        b.observe(PeerUp("x"), [Metric("model_version", float(v))], float(v))
        b.evaluated(v, {"accuracy": float("nan"), "loss": "bad"}, float(v))
    b.observe(
        PeerUp("x"),
        [
            Metric("privacy_epsilon", 1.25),
            Metric("privacy_budget", 8.0),
            Metric("model_version", float("inf")),  # ignored
        ],
        1e4,
    )
    doc = b.document(1e4)
    json.dumps(doc, allow_nan=False)
    assert len(doc["versions"]) == HISTORY and doc["versions"][-1][1] == HISTORY + 49
    assert len(doc["accuracy"]) == HISTORY and doc["accuracy"][-1][2:] == [None, None]
    assert doc["privacy"] == {"epsilon": 1.25, "epsilon_budget": 8.0, "exhausted": False}
    b.observe(PeerUp("x"), [Metric("privacy_budget_exhausted", 1.0)], 1e4)
    assert b.document(1e4)["privacy"]["exhausted"] is True


HOSTILE = '<script>alert("x")</script><img src=http://evil.example/x.png onerror=1>\x1b[31m'


class _RefusingNode:
    """A node with a refusal book (``refusals_view()``, as aggregators have)."""

    node_id = "root"

    def __init__(self, view: Mapping[str, Mapping[str, object]]) -> None:
        self.view = view

    def handle(self, event: object, now: float) -> list[object]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def refusals_view(self) -> Mapping[str, Mapping[str, object]]:
        return self.view


def test_refusals_come_from_the_node_and_every_peer_string_is_escaped() -> None:
    node = _RefusingNode(
        {
            "site-1": {
                "code": "plan_not_approved",
                "reason": HOSTILE * 20,
                "count": 3,
                "version": 7,
                "last": 10.0,
            }
        }
    )
    layered = LayeredNode(node)  # type: ignore[arg-type]
    b = board(node=layered)
    layered.add(b)
    doc = b.document(12.5)
    entry = doc["refusals"]["site-1"]
    assert entry["last_age_s"] == 2.5 and entry["count"] == 3
    assert len(entry["reason"]) <= 200 and "\x1b" not in entry["reason"]
    html = render(doc)
    assert "<script" not in html and "<img" not in html and "evil.example" in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    # The only tags are the page's own.
    tags = set(re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)", html))
    assert tags <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "div", "span", "b",
        "svg", "text", "tspan", "g", "rect", "circle", "line", "polyline", "table", "tr",
        "th", "td", "p", "pre", "a",
    }  # fmt: skip


def test_a_broken_view_of_another_part_leaves_the_document_whole() -> None:
    class Broken(_RefusingNode):
        def refusals_view(self) -> Mapping[str, Mapping[str, object]]:
            raise RuntimeError("bug")

    b = board(node=Broken({}))
    doc = b.document(1.0)
    assert doc["refusals"] is None and doc["schema"] == SCHEMA


events = st.lists(
    st.tuples(
        st.sampled_from(["up", "down", "forward", "version", "eval", "privacy"]),
        st.sampled_from(["region-a", "region-b", "site-0", "site-1", "nobody", "root"]),
        st.floats(allow_nan=True, allow_infinity=True),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(events)
def test_any_sequence_of_events_gives_a_json_document(seq: list[tuple[str, str, float]]) -> None:
    b = board()
    now = 0.0
    for kind, who, x in seq:
        now += 1.0
        if kind == "up":
            b.observe(PeerUp(who), [], now)
        elif kind == "down":
            b.observe(PeerDown(who), [], now)
        elif kind == "forward":
            b.observe(forward(who, 1, ((who, 1), ("site-1", 2))), [applied(who)], now)
        elif kind == "version":
            b.observe(PeerUp(who), [Metric("model_version", x)], now)
        elif kind == "eval":
            b.evaluated(3, {"accuracy": x}, now)
        else:
            b.observe(PeerUp(who), [Metric("privacy_epsilon", x)], now)
    doc = b.document(now)
    json.dumps(doc, allow_nan=False)
    assert set(doc["connected"]) <= {"region-a", "site-0"}
    assert len(doc["tiers"][1]) == 2
    render(doc)


async def test_the_metrics_port_serves_the_status_document_and_page() -> None:
    b = board()
    b.observe(PeerUp("region-a"), [Metric("model_version", 3.0)], 1.0)
    async with (
        await start_observability(MetricsSink(), port=0, status=lambda: b.document(2.0)) as server,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(f"{server.url}/status.json") as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            doc = await resp.json()
        assert doc["schema"] == SCHEMA and doc["model"]["version"] == 3
        async with http.get(f"{server.url}/status") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert resp.headers["Content-Security-Policy"] == CSP
            page = await resp.text()
        assert "default-src 'none'" in CSP and "script-src" not in CSP
        assert '<h1 id="node">root</h1>' in page and '<meta http-equiv="refresh"' in page
        assert "<script" not in page
        for method in ("POST", "PUT", "DELETE"):
            async with http.request(method, f"{server.url}/status") as resp:
                assert resp.status == 405
        async with http.head(f"{server.url}/status.json") as resp:
            assert resp.status == 200
    # Without a board (a site), there is no status page.
    async with (
        await start_observability(MetricsSink(), port=0) as server,
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/status") as resp,
    ):
        assert resp.status == 404


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_cli_text_carries_no_escape_from_a_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _RefusingNode({"site-1": {"code": "failed", "reason": "x\x1b[2J\x07y", "count": 1}})
    b = board(node=node)
    b.observe(PeerUp("region-a"), [], 1.0)
    doc = json.loads(json.dumps(b.document(2.0)))
    lines = format_status(doc)
    assert "  site-1: failed x1 (version ?, never): x?[2J?y" in lines
    assert not any("\x1b" in line for line in lines)
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = _Terminal()
    _print(lines, out)
    coloured = out.getvalue()
    assert "\x1b[32m●\x1b[0m region-a" in coloured and "\x1b[2J" not in coloured
    monkeypatch.setenv("NO_COLOR", "1")
    out = _Terminal()
    _print(lines, out)
    assert "\x1b" not in out.getvalue()


def test_published_federated_evaluation_is_drawn_and_printed() -> None:
    doc = board().document(1.0)
    doc["federated_evaluation"] = {
        "evaluation": {
            "every": 5,
            "min_sites": 3,
            "published": [
                {"version": 5, "sites": 3, "accuracy": 0.625, "loss": 0.9},
                {"version": 10, "sites": 4, "accuracy": 0.8125, "loss": 0.5},
                {"version": 15, "sites": "<i>", "accuracy": "x", "loss": None},  # malformed
            ],
            "pending": {"20": 2},
        },
        "analytics": {"ages": {"tag": "cohort", "sites_answered": 2, "result": None}},
    }
    html = render(doc)
    svg = re.search(r'<svg id="federated-accuracy".*?</svg>', html)
    assert svg is not None and svg.group(0).count(",") == 2  # two points: v5 and v10
    assert "0.8125 at v10" in html and "<i>" not in html and "&lt;i&gt;" in html
    lines = format_status(doc)
    assert (
        "federated evaluation (every 5 versions, at least 3 sites): accuracy - (loss -) at "
        "version 15 over <i> sites; waiting: v20 (2 sites)"
    ) in lines
    assert "statistics ages (tag cohort): 2 sites answered, not published yet" in lines
    del doc["federated_evaluation"]["evaluation"]["published"][-1]
    assert format_status(doc)[-2].startswith(
        "federated evaluation (every 5 versions, at least 3 sites): accuracy 0.8125 (loss "
        "0.5000) at version 10 over 4 sites"
    )


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:99999", "http://[::1", "http://:9100", "http://127.0.0.1:x"]
)
def test_a_malformed_url_is_a_usage_error_not_an_unreachable_daemon(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in --url (port out of range, no host, a broken IPv6 literal) is a mistake on
    the command line (exit 2), said before any connection, not 'cannot reach' (exit 1)."""
    from fedloom.cli import main

    assert main(["status", "--url", url, "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "http://HOST:PORT" in err and "cannot reach" not in err


@pytest.mark.parametrize("timeout", ["inf", "1e300", "nan", "0"])
def test_a_timeout_sockets_cannot_take_is_a_usage_error(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--timeout inf (or 1e300) ended in OverflowError's traceback from settimeout."""
    from fedloom.cli import main

    assert main(["status", "--url", "http://127.0.0.1:9", "--timeout", timeout]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--timeout {float(timeout)}" in err, err
