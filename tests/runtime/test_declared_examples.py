"""A running root daemon weighs a site by the examples the signed roster declares for it,
never by what the site claims (issue 10, review finding 3).

Under ``weighting = "examples"`` (what ``fedloom demo`` runs) an update's weight is its
``n_examples``, written and signed by the site itself. The hostile site here is one of the
root's rostered sites, speaking through the real WebSocket, channel and end-to-end
signature checks: it answers its task with ``n_examples = 10**12`` and a large delta. With
``examples`` declared in the roster, the flush moves the model exactly as if it had
claimed its declaration; undeclared, only ``max_examples_per_site`` holds (and the daemon
says so at start), until a newer roster declaring it is installed with SIGHUP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.robust import NormClip
from fedloom.cli import main
from fedloom.runtime.config import load_config
from fedloom.runtime.connection import ProgressLink
from fedloom.runtime.daemon import Daemon, open_daemon
from fedloom.runtime.federation_files import (
    ROOT_ID,
    Federation,
    site_examples,
    write_federation,
    write_roster,
)
from fedloom.transport import ws
from fedloom.transport.channel import SecureChannel, client_channel
from fedloom.transport.e2e import sign_update, update_digest_sent
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster
from fedloom.transport.wire import Ack, Hello, TrainRequest, Update
from tests.runtime.test_daemon import SYNTHETIC, running
from tests.runtime.test_model_limits import next_ack
from tests.runtime.test_signatures import FP32

pytestmark = pytest.mark.timeout(60)

SITES = ["site-1", "site-2", "site-3"]
HOSTILE = "site-1"
CLAIM = 10**12


def federation(tmp_path: Path, *, declare: bool) -> Federation:
    """A root whose children are three sites (buffer 3, weighting by examples)."""
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan=SYNTHETIC,
        root_aggregation={"buffer_size": 3, "weighting": "examples"},
        declare_examples=declare,
    )
    root = fed.config(ROOT_ID)
    root["children"] = SITES
    fed.nodes[ROOT_ID].config.write_text(tomli_w.dumps(root), encoding="utf-8")
    return fed


def declared(fed: Federation) -> dict[str, int]:
    found = site_examples(fed.plan, SITES)
    assert found is not None
    return found


def key(fed: Federation, node_id: str) -> Identity:
    return Identity.load(fed.workdir / "keys" / f"{node_id}.key")


async def site_link(fed: Federation, site: str) -> tuple[SecureChannel, TrainRequest]:
    """``site``'s authenticated channel to the root, and the task the root gives it."""
    roster = Roster.load(fed.roster, key(fed, "consortium").public_key)
    url = fed.nodes[ROOT_ID].url
    assert url is not None
    link = ProgressLink(await ws.connect(url))
    channel = await client_channel(link, key(fed, site), roster, ROOT_ID)
    await channel.send_tensors(Hello(site, "site", declared(fed)[site]))
    while True:
        msg = await channel.recv_tensors()
        if isinstance(msg, TrainRequest):
            return channel, msg


def answer(
    fed: Federation, site: str, task: TrainRequest, delta: Mapping[str, np.ndarray], n: int
) -> Update:
    digest = update_digest_sent(dict(delta), FP32)
    sig = sign_update(key(fed, site), site, 1, task.version, ROOT_ID, n, digest)
    return Update(site, 1, task.version, dict(delta), n, count=1, task=task.task, sig=sig)


Tensors = dict[str, np.ndarray]


async def attack(d: Daemon, fed: Federation) -> tuple[Tensors, Tensors, Tensors]:
    """Each site answers its task; the hostile one claims ``CLAIM`` examples. Returns the
    step the flush took, and the hostile and honest deltas."""
    root = d.node
    assert isinstance(root, FedBuffAggregator)
    version, start = root.current_model()
    bound = NormClip("auto", start).bound()
    assert bound is not None
    # Both well inside the auto clip's starting bound: the weights alone decide the step.
    size = sum(v.size for v in start.values())
    hostile = {
        k: np.full(v.shape, -0.5 * bound / np.sqrt(size), np.float32) for k, v in start.items()
    }
    honest = {
        k: np.full(v.shape, 0.1 * bound / np.sqrt(size), np.float32) for k, v in start.items()
    }
    links = {s: await site_link(fed, s) for s in SITES}
    async with asyncio.timeout(20):
        for site, (channel, task) in links.items():
            delta, n = (hostile, CLAIM) if site == HOSTILE else (honest, declared(fed)[site])
            await channel.send_tensors(answer(fed, site, task, delta, n))
            assert await next_ack(channel) == Ack(site, 1)
    assert root.version == version + 1
    after = root.current_model()[1]
    for channel, _ in links.values():
        await channel.close()
    return {k: after[k].astype(np.float64) - start[k] for k in start}, hostile, honest


def expected_step(
    weights: Mapping[str, float],
    hostile: Mapping[str, np.ndarray],
    honest: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    total = sum(weights.values())
    return {
        k: (
            weights[HOSTILE] * hostile[k]
            + (total - weights[HOSTILE]) * honest[k].astype(np.float64)
        )
        / total
        for k in hostile
    }


@pytest.mark.parametrize("declare", [True, False])
async def test_a_site_claiming_1e12_examples_weighs_what_the_roster_declares(
    tmp_path: Path, declare: bool, caplog: pytest.LogCaptureFixture
) -> None:
    fed = federation(tmp_path, declare=declare)
    examples = declared(fed)
    caplog.set_level(logging.WARNING, logger="fedloom.daemon")
    d = open_daemon(load_config(fed.nodes[ROOT_ID].config))
    warned = [r.getMessage() for r in caplog.records if "declares no examples" in r.getMessage()]
    assert isinstance(d.node, FedBuffAggregator)
    assert dict(d.node.claim_bounds.site_examples) == (examples if declare else {})
    async with running(d, fed.nodes[ROOT_ID].listen_port) as task:
        step, hostile, honest = await attack(d, fed)
        # Declared: the hostile site weighs its declaration, like an honest update of that
        # size. Undeclared: only the config's cap holds, and the flush is the attacker's.
        weight = examples[HOSTILE] if declare else 1_000_000
        want = expected_step({**examples, HOSTILE: weight}, hostile, honest)
        for k in want:
            np.testing.assert_allclose(step[k], want[k], rtol=1e-4, atol=1e-7)
        attacker_share = weight / (weight + examples["site-2"] + examples["site-3"])
        assert (attacker_share < 0.5) if declare else (attacker_share > 0.99)
        assert d.node.claim_bounds.site_examples.get(HOSTILE) == (weight if declare else None)
        assert not task.done()  # clamped, acknowledged, and the root serves on
    if declare:
        assert warned == []
    else:
        # One startup warning names every undeclared site and the cap in force.
        assert len(warned) == 1
        assert "site-1, site-2, site-3" in warned[0]
        assert "max_examples_per_site = 1000000" in warned[0]


async def test_a_newer_roster_declaring_examples_bounds_a_running_root(tmp_path: Path) -> None:
    """SIGHUP installs a roster that declares the sites' examples; the running root clamps
    the next inflated claim to it."""
    fed = federation(tmp_path, declare=False)
    examples = declared(fed)
    d = open_daemon(load_config(fed.nodes[ROOT_ID].config))
    hangup = asyncio.Event()
    root = d.node
    assert isinstance(root, FedBuffAggregator)
    assert dict(root.claim_bounds.site_examples) == {}
    async with running(d, fed.nodes[ROOT_ID].listen_port, hangup) as task:
        everyone = [key(fed, n) for n in fed.nodes]
        write_roster(fed.roster, everyone, key(fed, "consortium"), version=2, examples=examples)
        hangup.set()
        async with asyncio.timeout(10):
            while dict(root.claim_bounds.site_examples) != examples:
                await asyncio.sleep(0.02)
        assert d.roster.version == 2
        # Every site declares: the cap for anything undeclared is the largest declaration.
        assert root.claim_bounds.max_examples_per_site == max(examples.values())
        step, hostile, honest = await attack(d, fed)
        want = expected_step(examples, hostile, honest)
        for k in want:
            np.testing.assert_allclose(step[k], want[k], rtol=1e-4, atol=1e-7)
        assert not task.done()


def test_roster_sign_keeps_and_verify_counts_declared_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    consortium = Identity.generate("consortium", "consortium")
    consortium.save(tmp_path / "keys")
    site, root = Identity.generate("site-a", "site"), Identity.generate("root", "root")
    unsigned = tmp_path / "roster.toml"
    unsigned.write_text(
        "version = 3\n"
        + "".join(
            f'\n[[nodes]]\nid = "{i.node_id}"\nrole = "{i.role}"\npublic_key = "{k}"\n{extra}'
            for i, k, extra in (
                (root, i_key(root), ""),
                (site, i_key(site), "examples = 225\n"),
            )
        )
    )
    signed = tmp_path / "signed.toml"
    key_file = str(tmp_path / "keys" / "consortium.key")
    assert main(["roster", "sign", str(unsigned), "--key", key_file, "--out", str(signed)]) == 0
    assert "examples = 225" in signed.read_text()
    assert main(["roster", "verify", str(signed), "--consortium", key_file]) == 0
    assert "1 of 1 sites declare examples" in capsys.readouterr().out
    entry = Roster.load(signed, consortium.public_key).lookup("site-a")
    assert entry is not None and entry.examples == 225


def i_key(ident: Identity) -> str:
    return ident.public_line().split()[2]


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_undeclared_examples_are_warned_of_at_start_by_the_root_and_a_region(
    tmp_path: Path, weighting: str, caplog: pytest.LogCaptureFixture
) -> None:
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": ["site-1", "site-2"]},
        plan=SYNTHETIC,
        root_aggregation={"weighting": weighting},
        region_aggregation={"weighting": weighting},
        declare_examples=False,
    )
    caplog.set_level(logging.WARNING, logger="fedloom.daemon")
    for node in (ROOT_ID, "region-a"):
        open_daemon(load_config(fed.nodes[node].config)).close()
    warned = [r.getMessage() for r in caplog.records if "weighting" in r.getMessage()]
    if weighting == "uniform":  # a site's weight is its count, 1: nothing to declare
        assert warned == []
        return
    assert len(warned) == 2
    root_line, region_line = warned
    assert root_line.startswith("root:") and "does not declare every site's" in root_line
    assert "its count times max_examples_per_site = 1000000" in root_line
    assert region_line.startswith("region-a:") and "site-1, site-2" in region_line
