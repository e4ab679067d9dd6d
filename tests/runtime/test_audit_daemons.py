"""The daemons' audit logs (``runtime.audit.AuditMiddleware`` in ``serve()``): a real star
federation (a root and 2 sites, in process, on loopback, the encrypted channel and the
end-to-end signatures) leaves at each site ``update_sent`` entries whose digests are the
ones the root records as ``update_applied``, and at the root ``model_version`` entries whose
signed digest is the one the sites received, with the root's signature; every log verifies
against its node's signed head. Bounded (``pytest.mark.timeout``); every daemon stopped."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.runtime.audit import read_entries, verify_log
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import DaemonError, open_daemon, serve
from fedloom.runtime.exit_status import EXIT_CORRUPT_STATE
from fedloom.runtime.federation_files import ROOT_ID, Federation
from fedloom.transport.e2e import model_signed_bytes
from fedloom.transport.identity import Identity, verify_signature
from tests.runtime import daemon_nets
from tests.runtime.daemon_nets import serving

pytestmark = pytest.mark.timeout(90)

SITES = ["site-1", "site-2"]


def star(tmp_path: Path) -> Federation:
    return daemon_nets.star(tmp_path, SITES, root_aggregation={"buffer_size": 2, "concurrency": 2})


def by_kind(entries: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e["fields"] for e in entries if e["kind"] == kind]


async def test_a_star_federation_leaves_matching_audit_logs(tmp_path: Path) -> None:
    fed = star(tmp_path)
    async with serving(fed) as daemons:
        root = daemons[ROOT_ID].node
        assert isinstance(root, FedBuffAggregator)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while root.version < 3:
            assert loop.time() < deadline, f"the root reached only version {root.version}"
            await asyncio.sleep(0.05)
    keys = {k: Identity.load(load_config(n.config).identity_key) for k, n in fed.nodes.items()}
    logs: dict[str, list[dict[str, Any]]] = {}
    for k, n in fed.nodes.items():
        state = load_config(n.config).state_dir
        verdict = verify_log(state, keys[k].public_key)
        assert verdict.intact, (k, verdict.problem)
        assert verdict.head_checked and verdict.head_seq == len(verdict.entries)
        logs[k] = read_entries(state)
        kinds = [e["kind"] for e in logs[k]]
        assert kinds[0] == "daemon_start" and kinds[-1] == "daemon_stop"
        start = logs[k][0]["fields"]
        assert start["role"] == ("root" if k == ROOT_ID else "site")
        assert start["public_key"] and len(start["config_sha256"]) == 64
        assert {e["node"] for e in logs[k]} == {k}

    root_log = logs[ROOT_ID]
    applied = {(f["src"], f["seq"]): f["digest"] for f in by_kind(root_log, "update_applied")}
    assert {src for src, _ in applied} == set(SITES)
    for s in SITES:
        sent = {f["seq"]: f for f in by_kind(logs[s], "update_sent")}
        assert sent, f"{s} recorded no update sent"
        mine = {seq: digest for (src, seq), digest in applied.items() if src == s}
        assert mine, f"the root recorded no update from {s}"
        for seq, digest in mine.items():
            assert sent[seq]["digest"] == digest  # the same delta, byte for byte
            assert sent[seq]["to"] == ROOT_ID
        used = by_kind(logs[s], "dataset_used")
        assert used and all(f["plan"] == "SitePlan" for f in used)

    versions = {f["version"]: f for f in by_kind(root_log, "model_version")}
    assert {0, 1, 2, 3} <= set(versions)  # the model it started with, then each release
    signed = {f["version"]: f for f in by_kind(root_log, "model_signed")}
    assert {0, 1, 2} <= set(signed)  # (the last release may be signed after the stop)
    root_key = keys[ROOT_ID].public_key
    for v, proof in signed.items():
        assert proof["digest"] == versions[v]["signed_digest"]
        message = model_signed_bytes(
            v, proof["parent"], bytes.fromhex(proof["digest"]), bytes.fromhex(proof["settings"])
        )
        assert verify_signature(root_key, message, bytes.fromhex(proof["sig"]))
    for s in SITES:
        received = by_kind(logs[s], "model_received")
        assert received  # (which versions depends on the timing)
        for f in received:
            assert f["digest"] == versions[f["version"]]["signed_digest"]
            if f["version"] in signed:
                assert f["sig"] == signed[f["version"]]["sig"]


async def serve_root_once(fed: Federation) -> None:
    """Start the root in process, wait until it listens, stop it (bounded)."""
    async with serving({ROOT_ID: fed.nodes[ROOT_ID].config}) as daemons:
        d = daemons[ROOT_ID]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not by_kind(read_entries(d.cfg.state_dir), "daemon_start"):
            assert loop.time() < deadline, "no daemon_start entry"
            await asyncio.sleep(0.02)


async def test_a_restart_seals_a_torn_tail_and_a_damaged_log_stops_the_start(
    tmp_path: Path,
) -> None:
    fed = star(tmp_path)
    cfg = tomllib.loads(fed.nodes[ROOT_ID].config.read_text(encoding="utf-8"))
    cfg["listen"]["port"] = 0  # restarted at once: any free port
    cfg.pop("metrics", None)
    fed.nodes[ROOT_ID].config.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    await serve_root_once(fed)
    state = load_config(fed.nodes[ROOT_ID].config).state_dir
    log = state / "audit" / "audit.jsonl"
    whole = log.read_bytes()
    log.write_bytes(whole + b'{"fields":{"clean":tr')  # a crash in the middle of a write
    await serve_root_once(fed)
    entries = read_entries(state)
    kinds = [e["kind"] for e in entries]
    assert kinds == [
        "daemon_start",
        "model_version",
        "daemon_stop",
        "torn_tail",
        "daemon_start",
        "model_version",
        "daemon_stop",
    ]
    assert entries[3]["fields"]["offset"] == len(whole)
    # A complete last line that is not an entry is no crash's doing: the root refuses to
    # start (exit 65, like a corrupt state directory) rather than append after it.
    lines = log.read_bytes().splitlines(keepends=True)
    lines[-1] = lines[-1].replace(b'"clean":true', b'"clean":false')
    log.write_bytes(b"".join(lines))
    d = open_daemon(load_config(fed.nodes[ROOT_ID].config))
    try:
        with pytest.raises(DaemonError, match="damaged, which a crash cannot do") as caught:
            await serve(d, install_signals=False, shutdown=asyncio.Event())
    finally:
        d.close()
    assert caught.value.exit_code == EXIT_CORRUPT_STATE
