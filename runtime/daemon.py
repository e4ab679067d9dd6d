"""``fedloom run``: one node (site, region, root or gossip peer) as a long-running daemon.

Start-up (``open_daemon``), all before anything touches the network:

1. read the identity key and the signed roster; refuse an identity the roster does not list
   (with that key and role), and neighbours it does not list;
2. build the training plan (sites and peers train with it, the root builds its initial
   model from it and evaluates with it);
3. open the state directory (``StateStore``, flock-ed: one daemon per directory), ``load``
   it and restore the node from its checkpoint plus the log records written after it;
4. write a fresh checkpoint of the restored node (compaction: the log starts empty).

Then ``serve`` runs the node under ``AsyncDriver`` with a ``NetworkPeers`` (sites and
regions dial their parent with jittered exponential back-off; aggregators listen and admit
their children only; gossip peers do both), the store for ``Persist`` effects and a
``MetricsSink`` for ``Metric`` effects (served on ``/metrics`` and ``/healthz`` when
``[metrics] port`` is set). systemd (``Type=notify``): ``READY=1`` once recovery is done, the
listener is bound and the dialled links are up (or after ``ready_wait_s`` without them: a
hospital must not be restart-looped because its aggregator is down); ``WATCHDOG=1`` from the
event loop at half ``$WATCHDOG_USEC``; on SIGTERM or SIGINT ``STOPPING=1``, the driver stops
after the event it is handling, connections close in order, a last checkpoint is written and
the process exits 0. On SIGHUP the daemon re-reads ``roster.path`` and installs it if it is a
newer signed roster (``runtime.roster_updates``: revoked peers are cut off at once and the
roster is pushed to the children); a roster installed while running is kept in the state
directory and used by the next start if ``roster.path`` is older.

Nodes that hold a model and have an evaluation (the root, gossip peers) evaluate it every
``eval_interval_s`` on their plan's test set and export ``fedloom_eval_accuracy`` and
``fedloom_eval_loss`` (and log the figures).

``load_node(cfg)`` restores a node from its state directory without running it (reports,
the demo, tests): the same recovery the daemon performs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import errno
import gc
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.algorithms.aggregator_base import AggregatorBase
from fedloom.algorithms.gossip import GossipPeer, share_weight_bound
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.protocol import Metric, ModelHolder, Node, Persist, Restorable
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.relay import RelayNode
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.training import TrainingPlan
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.factory import ROOT_ALGORITHMS, build_region, build_root, claim_bounds
from fedloom.federation.seeds import derived_seed
from fedloom.federation.store import (
    CHECKPOINT_KEY,
    CorruptStateError,
    Recovery,
    StateIOError,
    StateStore,
    StoreError,
)
from fedloom.federation.training import Trainer
from fedloom.runtime import systemd
from fedloom.runtime.config import RELAY_MESSAGE_MIB, DaemonConfig, load_config
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.exit_status import EXIT_CORRUPT_STATE, EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_OK
from fedloom.runtime.log_filters import quiet_client_disconnects
from fedloom.runtime.malloc_tuning import GLIBC_TUNABLES
from fedloom.runtime.peers import (
    Backoff,
    DialTarget,
    ListenError,
    NetworkPeers,
    gossip_dial_targets,
)
from fedloom.runtime.relay_seq import RELAY_SEQ_KEY, RelaySeqState
from fedloom.runtime.roster_updates import ROSTER_SEEN_KEY, RosterKeeper
from fedloom.runtime.trainer import PlanTrainer, SitePlan, make_executor, plan_from_config
from fedloom.transport.channel import ChannelOptions, GateLimits
from fedloom.transport.codec_policy import CodecPolicy
from fedloom.transport.e2e import ModelVersionGuard, tensors_digest
from fedloom.transport.identity import Identity, IdentityError
from fedloom.transport.limits import Limits, MiB, ModelLayout
from fedloom.transport.roster import Roster, RosterError, read_small_text
from fedloom.transport.tensors import CodecSpec

__all__ = [
    "DEFAULT_EVAL_INTERVAL_S",
    "READY_WAIT_S",
    "Daemon",
    "DaemonError",
    "build_node",
    "configure_logging",
    "load_node",
    "open_daemon",
    "restore_node",
    "run_daemon",
    "serve",
]

log = logging.getLogger("fedloom.daemon")

READY_WAIT_S = 10.0  # longest wait for the dialled links before READY=1 anyway
DEFAULT_EVAL_INTERVAL_S = 60.0
OBSERVE_INTERVAL_S = 1.0  # connected peers, bytes, buffer fill -> metrics
# After SIGTERM, connections get this long to close in order (TAG_FINAL, close frames)
# before whatever is still running is cancelled again (systemd's stop timeout is longer).
STOP_GRACE_S = 6.0


class DaemonError(RuntimeError):
    """The daemon cannot start or had to stop (not a config mistake): one line, and
    ``exit_code`` (``EXIT_FAILED`` unless the cause is the state's or the environment's)."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# =================================================================== identity and roster


def load_identity(cfg: DaemonConfig) -> Identity:
    try:
        identity = Identity.load(cfg.identity_key)
    except IdentityError as exc:
        raise ConfigError(f"identity.key: {exc}") from None
    if identity.node_id != cfg.node_id:
        raise ConfigError(
            f"identity.key: {cfg.identity_key} is the key of {identity.node_id!r}, but node_id "
            f"is {cfg.node_id!r}; point identity.key at {cfg.node_id}.key"
        )
    return identity


def load_roster(cfg: DaemonConfig, identity: Identity) -> Roster:
    """The verified roster; it must list this node with this key and role."""
    return load_roster_text(cfg, identity)[0]


def load_roster_text(cfg: DaemonConfig, identity: Identity) -> tuple[Roster, str]:
    """``load_roster`` and the signed text it was read from (pushed to children)."""
    try:
        text = read_small_text(cfg.roster_path)
        try:
            roster = Roster.loads(text, cfg.read_consortium_key())
        except RosterError as exc:
            raise type(exc)(f"{cfg.roster_path}: {exc}") from None
    except (RosterError, ValueError, OSError) as exc:
        raise ConfigError(f"roster.path: {exc}") from None
    _check_lists_me(cfg, identity, roster)
    return roster, text


def _check_lists_me(cfg: DaemonConfig, identity: Identity, roster: Roster) -> None:
    me = roster.lookup(cfg.node_id)
    if me is None:
        raise ConfigError(
            f"roster.path: {cfg.node_id!r} is not in roster version {roster.version}; ask the "
            f"consortium to add the line: {identity.public_line()}"
        )
    if me.public_key != identity.public_key:
        raise ConfigError(
            f"identity.key: roster version {roster.version} lists another public key for "
            f"{cfg.node_id!r}; ask the consortium to list: {identity.public_line()}"
        )
    if me.role != cfg.role:
        raise ConfigError(
            f"role: the roster lists {cfg.node_id!r} as a {me.role}, the config says {cfg.role}"
        )


def _neighbour_role(roster: Roster, node_id: str, where: str, allowed: tuple[str, ...]) -> str:
    entry = roster.lookup(node_id)
    if entry is None:
        raise ConfigError(f"{where}: {node_id!r} is not in roster version {roster.version}")
    if entry.role not in allowed:
        raise ConfigError(
            f"{where}: {node_id!r} is a {entry.role} in the roster; expected {' or '.join(allowed)}"
        )
    return entry.role


def child_roles(cfg: DaemonConfig, roster: Roster) -> dict[str, str]:
    """``{child: "site" | "region"}`` from the roster (the config lists ids only)."""
    return {
        c: _neighbour_role(roster, c, f"children[{i}]", ("site", "region"))
        for i, c in enumerate(cfg.children)
    }


def check_neighbours(cfg: DaemonConfig, roster: Roster) -> None:
    if cfg.parent is not None:
        role = _neighbour_role(roster, cfg.parent.id, "parent.id", ("region", "root"))
        if cfg.fallbacks and role != "region":
            raise ConfigError(
                f"parent.fallback: {cfg.parent.id!r} is the root; only a region has a "
                "standby to fail over to (a root is restarted from its state instead)"
            )
    for i, f in enumerate(cfg.fallbacks):
        _neighbour_role(roster, f.id, f"parent.fallback[{i}].id", ("region",))
    for region, sites in cfg.subtrees.items():
        for site in sites:
            _neighbour_role(roster, site, f"subtrees.{region}", ("site",))
    for i, p in enumerate(cfg.peers):
        _neighbour_role(roster, p.id, f"peers[{i}].id", ("peer",))
    if cfg.relay is not None:
        _neighbour_role(roster, cfg.relay.id, "relay.id", ("relay",))


# ========================================================================== the node


def build_plan(cfg: DaemonConfig) -> TrainingPlan | None:
    """The node's training plan (``None`` for a region: it neither trains nor evaluates)."""
    if cfg.plan is None:
        return None
    return plan_from_config(cfg.plan, seed=cfg.seed)


def _n_examples(plan: TrainingPlan | None) -> int:
    if isinstance(plan, SitePlan):
        return int(plan.workload.n_examples(plan.index))
    return 0


def _declared_examples(roster: Roster) -> tuple[dict[str, int], bool]:
    """``({site: examples} the roster declares, whether it declares every site's)``."""
    sites = [e for e in roster.entries if e.role == "site"]
    declared = {e.node_id: e.examples for e in sites if e.examples is not None}
    return declared, bool(sites) and len(declared) == len(sites)


def children_claim_bounds(
    cfg: DaemonConfig, roster: Roster, children: Mapping[str, str]
) -> ClaimBounds:
    """What this aggregator's ``children`` may claim, from the signed roster and the config.

    A site child's ``n_examples`` is clamped to the ``examples`` the roster declares for it,
    else to ``max_examples_per_site``. When the roster declares every site's examples, that
    cap becomes the largest declaration, so a region's ``n_examples`` is bounded by its
    count times an honest site's most (as in the simulator). A region's ``count`` is
    clamped to ``max_region_count`` (by default the ``regional_buffer_size``): the config
    names the children, not their subtrees.
    """
    declared, every_site = _declared_examples(roster)
    return claim_bounds(
        cfg.aggregation,
        site_examples={
            c: declared[c] for c, r in children.items() if r == "site" and c in declared
        },
        max_examples_per_site=max(declared.values()) if every_site else None,
    )


def bound_claims(cfg: DaemonConfig, node: Node, roster: Roster) -> None:
    """Give an aggregator its children's claim bounds from ``roster`` (at the start and for
    each newer roster); under ``weighting = "examples"``, warn of what is undeclared."""
    if not isinstance(node, AggregatorBase):
        return
    bounds = children_claim_bounds(cfg, roster, node.children)
    node.set_claim_bounds(bounds)
    if cfg.aggregation.weighting != "examples":
        return
    sites = sorted(c for c, r in node.children.items() if r == "site")
    undeclared = [c for c in sites if c not in bounds.site_examples]
    every_site = _declared_examples(roster)[1]
    where = {"node": cfg.node_id, "roster_version": roster.version, "undeclared": undeclared}
    cap = bounds.max_examples_per_site
    if undeclared:
        log.warning(
            '%s: weighting = "examples", but roster version %d declares no examples for '
            "%s: each one's n_examples is clamped only to max_examples_per_site = %d; write "
            "`examples = N` in their [[nodes]] entries and sign the roster again",
            cfg.node_id,
            roster.version,
            ", ".join(undeclared),
            cap,
            extra=where,
        )
    if not every_site and len(sites) < len(node.children):
        log.warning(
            '%s: weighting = "examples", but roster version %d does not declare every '
            "site's examples: a region's n_examples is clamped only to its count times "
            "max_examples_per_site = %d",
            cfg.node_id,
            roster.version,
            cap,
            extra=where,
        )


def outbox_bytes(cfg: DaemonConfig) -> int | None:
    """``[outbox] max_mib`` in bytes (None: the outbox derives it from the model)."""
    mib = cfg.outbox_max_mib
    return None if mib is None else max(1, int(mib * MiB))


def build_node(cfg: DaemonConfig, roster: Roster, plan: TrainingPlan | None) -> Node:
    """A fresh state machine for ``cfg.role``, configured from the config (not restored)."""
    p = cfg.aggregation
    rng = np.random.default_rng(derived_seed(cfg.seed, "node", cfg.node_id))
    train_config = cfg.training.as_dict()
    check_neighbours(cfg, roster)
    if cfg.role == "site":
        assert cfg.parent is not None
        return SiteNode(
            cfg.node_id,
            cfg.parent.id,
            n_examples=_n_examples(plan),
            max_outbox_bytes=outbox_bytes(cfg),
            fallbacks=[f.id for f in cfg.fallbacks],
            failover_after_s=cfg.failover_after_s,
            max_held=cfg.max_held,
        )
    if cfg.role == "peer":
        assert plan is not None
        return _gossip_peer(cfg, roster, plan, rng)
    if cfg.role == "relay":
        return RelayNode(cfg.node_id)
    children = child_roles(cfg, roster)
    n_sites = sum(1 for r in children.values() if r == "site")
    concurrency = max(1, min(p.concurrency, n_sites)) if n_sites else 1
    if cfg.role == "region":
        assert cfg.parent is not None
        if cfg.algorithm != "fedbuff":
            raise ConfigError(
                f"aggregation.algorithm: a region buffers its sites FedBuff-style; write "
                f'algorithm = "fedbuff" (the root may run {cfg.algorithm})'
            )
        region = build_region(
            cfg.node_id,
            cfg.parent.id,
            children,
            p,
            buffer_size=p.buffer_size,
            concurrency=concurrency,
            train_config=train_config,
            rng=rng,
            bounds=children_claim_bounds(cfg, roster, children),
            max_outbox_bytes=outbox_bytes(cfg),
        )
        # A root's ack settles a forward; a parent region settles it later.
        parent = roster.lookup(cfg.parent.id)
        region.parent_is_root = parent is not None and parent.role == "root"
        region.keep_parts = cfg.has_standby
        region.set_subtrees(cfg.subtrees)
        return region
    assert plan is not None
    if cfg.algorithm not in ROOT_ALGORITHMS:
        raise ConfigError(
            f'aggregation.algorithm: a root runs fedbuff, fedasync, fedavg or fedprox, not "'
            f'{cfg.algorithm}" (gossip needs role = "peer")'
        )
    root = build_root(
        cfg.algorithm,
        cfg.node_id,
        children,
        plan.init(cfg.seed),
        p,
        buffer_size=p.buffer_size,
        concurrency=concurrency,
        train_config=train_config,
        rng=rng,
        bounds=children_claim_bounds(cfg, roster, children),
    )
    if isinstance(root, AggregatorBase):
        root.set_subtrees(cfg.subtrees)
    return root


def _gossip_peer(
    cfg: DaemonConfig, roster: Roster, plan: TrainingPlan, rng: np.random.Generator
) -> GossipPeer:
    p = cfg.aggregation
    # Push-sum mass: every gossip peer the roster lists starts with weight 1.
    n_peers = max(sum(1 for e in roster.entries if e.role == "peer"), len(cfg.peers) + 1)
    given = [e.weight for e in cfg.peers]
    if all(w is None for w in given):
        # Without the neighbours' degrees Metropolis-Hastings is out of reach: mix uniformly.
        share = 1.0 / (len(cfg.peers) + 1)
        neighbours = {e.id: share for e in cfg.peers}
        self_weight = share
    elif any(w is None for w in given):
        raise ConfigError("peers: give a weight to every peer or to none")
    else:
        neighbours = {e.id: float(e.weight) for e in cfg.peers if e.weight is not None}
        self_weight = 1.0 - sum(neighbours.values())
        if self_weight < -1e-9:
            raise ConfigError(
                f"peers: the weights sum to {sum(neighbours.values()):.6g} > 1; the rest "
                "(1 - sum) is this node's own weight"
            )
        self_weight = max(self_weight, 0.0)
    interval = p.gossip_interval_s
    return GossipPeer(
        cfg.node_id,
        neighbours,
        self_weight,
        plan.init(cfg.seed),
        mode=p.gossip_mode,
        train_config=cfg.training.as_dict(),
        gossip_interval_s=interval,
        heartbeat_interval_s=interval,
        suspect_after_s=4 * interval + cfg.connection.down_after_s,
        prune_after_s=8 * interval + 2 * cfg.connection.down_after_s,
        clip=p.gossip_clip,
        max_share_weight=share_weight_bound(p.gossip_max_share_weight, n_peers),
        rng=rng,
        durable=True,  # model, step and push-sum mass survive a restart
    )


def restore_node(node: Node, recovery: Recovery) -> None:
    """Load the checkpoint (or the fresh node's own state) and replay the log after it:
    every durable node restores through ``algorithms.protocol.Restorable``."""
    if isinstance(node, Restorable):
        node.restore(recovery.checkpoint, recovery)


def _has_snapshot(node: Node) -> bool:
    return callable(getattr(node, "snapshot", None))


# ======================================================================== the daemon


@dataclass(slots=True)
class Daemon:
    """Everything ``open_daemon`` prepared; ``serve`` runs it, ``close`` releases it."""

    cfg: DaemonConfig
    identity: Identity
    roster: Roster
    plan: TrainingPlan | None
    node: Node
    store: StateStore
    recovery: Recovery
    started: float = field(default_factory=time.monotonic)
    roster_text: str = ""  # the signed text of ``roster`` (pushed to children)

    def close(self) -> None:
        self.store.close()


# OS errors on the state directory that a restart cannot fix: state_dir names a file, ...
_CONFIG_ERRNOS = frozenset({errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG})


def stop_reason(exc: BaseException) -> DaemonError | None:
    """The one line and exit status for an exception that ends the daemon, if expected:
    damaged state, or the OS refusing the state directory (in a task group too). None:
    not one of these (a bug: let it raise)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (reason := stop_reason(inner)) is not None:
                return reason
        return None
    if isinstance(exc, DaemonError):
        return exc
    if isinstance(exc, CorruptStateError):
        text = f"state_dir: {exc}"
        if "fedloom state check" not in text:  # the store's own text may point there already
            text += "; see `fedloom state check`"
        return DaemonError(text, exit_code=EXIT_CORRUPT_STATE)
    if isinstance(exc, StateIOError):
        return DaemonError(f"state_dir: {exc}", exit_code=EXIT_ENVIRONMENT)
    if isinstance(exc, StoreError) and isinstance(exc.__cause__, OSError):
        cause = exc.__cause__  # a store broken by an earlier failed write
        return DaemonError(f"state_dir: {exc}: {cause}", exit_code=EXIT_ENVIRONMENT)
    return None


def _open_store(cfg: DaemonConfig) -> tuple[StateStore, Recovery]:
    try:
        store = StateStore(cfg.state_dir)
    except StoreError as exc:
        # Not a configuration error: the holder may be an earlier incarnation still stuck
        # in I/O or a `fedloom state check` for a moment, so systemd must restart us.
        raise DaemonError(
            f"state_dir: {exc} (is this node already running?)", exit_code=EXIT_FAILED
        ) from None
    except OSError as exc:
        if exc.errno not in _CONFIG_ERRNOS:
            raise DaemonError(f"state_dir: {exc}", exit_code=EXIT_ENVIRONMENT) from None
        raise ConfigError(f"state_dir: cannot open {cfg.state_dir}: {exc.strerror}") from None
    try:
        return store, store.load()
    except BaseException as exc:
        store.close()
        reason = stop_reason(exc)
        if reason is not None:
            raise reason from None
        raise


def _current_roster(
    cfg: DaemonConfig,
    identity: Identity,
    roster: Roster,
    text: str,
    recovery: Recovery,
    store: StateStore,
) -> tuple[Roster, str]:
    """The roster to start with: ``roster`` from the file, or a newer one this node
    installed while running (kept with its text in the state directory).

    Refuse a file roster older than one this node has already used (a rollback could
    re-admit a revoked key), or a different roster under the same version; remember a
    newer one durably before anything else happens."""
    seen = recovery.values.get(ROSTER_SEEN_KEY)
    if seen is not None:
        version, digest, kept = _roster_seen(cfg, seen)
        if roster.version < version and kept is not None:
            newer = _kept_roster(cfg, identity, kept, version, digest)
            log.info(
                "%s: roster.path holds roster version %d; using version %d, installed while "
                "running and kept in %s",
                cfg.node_id,
                roster.version,
                version,
                cfg.state_dir,
                extra={"node": cfg.node_id, "roster_version": version},
            )
            return newer, kept
        if roster.version < version:
            raise ConfigError(
                f"roster.path: roster version {roster.version} is older than version {version}, "
                "which this node has already used; install the consortium's current roster "
                "(an older one may still admit revoked keys)"
            )
        if roster.version == version:
            if roster.digest != digest:
                raise ConfigError(
                    f"roster.path: this is not the roster version {version} this node used "
                    "before (same version, other content); the consortium must give a "
                    "changed roster a new version"
                )
            return roster, text
    store.apply(Persist(ROSTER_SEEN_KEY, {"version": roster.version, "digest": roster.digest}))
    return roster, text


def _roster_seen(cfg: DaemonConfig, seen: Any) -> tuple[int, bytes, str | None]:
    """The version, digest and (if kept) text of ``ROSTER_SEEN_KEY``, checked: a corrupt
    value stops the start with one line, not a traceback."""
    ok = (
        isinstance(seen, Mapping)
        and type(seen.get("version")) is int
        and seen["version"] >= 0
        and isinstance(seen.get("digest"), bytes)
        and (seen.get("text") is None or isinstance(seen["text"], str))
    )
    if not ok:
        raise ConfigError(
            f"state_dir: {cfg.state_dir} holds a corrupt {ROSTER_SEEN_KEY!r} value "
            "(expected {'version': int >= 0, 'digest': bytes, 'text': str}); "
            "point state_dir at this node's own directory"
        )
    return seen["version"], seen["digest"], seen.get("text")


def _kept_roster(
    cfg: DaemonConfig, identity: Identity, text: str, version: int, digest: bytes
) -> Roster:
    """The roster kept in the state directory, verified again (the directory is not
    trusted more than the file)."""
    try:
        roster = Roster.loads(text, cfg.read_consortium_key())
    except (RosterError, ValueError) as exc:
        raise DaemonError(
            f"state_dir: the roster kept in {cfg.state_dir} is invalid: {exc}"
        ) from None
    if roster.version != version or roster.digest != digest:
        raise DaemonError(f"state_dir: the roster kept in {cfg.state_dir} is not version {version}")
    _check_lists_me(cfg, identity, roster)
    return roster


def _persist_roster(d: Daemon) -> Callable[[Roster, str], None]:
    """Keep an installed roster (and its text) in the state directory, durably."""

    def persist(roster: Roster, text: str) -> None:
        value = {"version": roster.version, "digest": roster.digest, "text": text}
        d.store.apply(Persist(ROSTER_SEEN_KEY, value))
        d.roster, d.roster_text = roster, text

    return persist


def _recover(cfg: DaemonConfig, node: Node, recovery: Recovery) -> None:
    try:
        restore_node(node, recovery)
    except Exception as exc:  # any shape the restore code did not expect: one line, exit 2
        keys = [CHECKPOINT_KEY] if recovery.checkpoint is not None else []
        keys += [k for k, records in recovery.logs.items() if records]
        raise ConfigError(
            f"state_dir: {cfg.state_dir} holds state this {cfg.role} cannot restore "
            f"(key {', '.join(map(repr, keys)) or 'none'}: {exc!r:.200}); "
            "point state_dir at this node's own directory"
        ) from None


def open_daemon(cfg: DaemonConfig) -> Daemon:
    """Identity, roster, plan, node, and recovery from ``cfg.state_dir`` (see module doc)."""
    identity = load_identity(cfg)
    roster, text = load_roster_text(cfg, identity)
    plan = build_plan(cfg)
    node = build_node(cfg, roster, plan)
    store, recovery = _open_store(cfg)
    try:
        # A newer roster kept in the state directory replaces the file's for the links;
        # the node keeps the children of its config (revoked ones are refused at the door).
        roster, text = _current_roster(cfg, identity, roster, text, recovery, store)
        bound_claims(cfg, node, roster)
        _recover(cfg, node, recovery)
        if _has_snapshot(node):
            # Compaction: from here on the log holds only what happens after this start.
            store.apply(Persist(CHECKPOINT_KEY, node.snapshot()))  # type: ignore[attr-defined]
    except BaseException:
        store.close()
        raise
    return Daemon(cfg, identity, roster, plan, node, store, recovery, roster_text=text)


def load_node(cfg: DaemonConfig) -> Node:
    """The node as a restart would recover it from ``cfg.state_dir`` (nothing is written
    except the repair of a torn log tail). The daemon must not be running."""
    identity = load_identity(cfg)
    roster = load_roster(cfg, identity)
    node = build_node(cfg, roster, build_plan(cfg))
    store, recovery = _open_store(cfg)
    try:
        _recover(cfg, node, recovery)
    finally:
        store.close()
    return node


def model_floor(node: Node) -> int | None:
    """The newest global model version a restored site or region has held (None: none)."""
    if isinstance(node, SiteNode):
        return node.newest_version if node.newest_version >= 0 else None
    if isinstance(node, RegionalAggregator):
        model = node.current_model()
        return None if model is None else int(model[0])
    return None


def model_floor_digest(node: Node, floor: int) -> bytes | None:
    """The digest of the model a restored site or region holds at version ``floor``, so
    that a second, different model under that number is noticed after a restart too
    (metric ``message_rejected{reason="model_conflict"}`` and a warning); None if its
    weights are not kept."""
    model = node.current_model() if isinstance(node, SiteNode | RegionalAggregator) else None
    if model is None or int(model[0]) != floor:
        return None
    return tensors_digest(model[1])


def _recovery_summary(recovery: Recovery) -> str:
    records = sum(len(v) for v in recovery.logs.values())
    if recovery.checkpoint is None and not records:
        return "fresh start (no saved state)"
    ckpt = "a checkpoint" if recovery.checkpoint is not None else "no checkpoint"
    torn = f", dropped a torn tail of {recovery.torn_bytes} bytes" if recovery.torn_bytes else ""
    return f"recovered {ckpt} (epoch {recovery.epoch}) and {records} log records{torn}"


# ------------------------------------------------------------------------ networking


def build_peers(d: Daemon) -> NetworkPeers:
    cfg = d.cfg
    dial: list[DialTarget] = []
    accept_from: list[str] | None = None
    allowed_roles: tuple[str, ...] | None = None
    routes: dict[str, str] = {}
    if cfg.parent is not None:
        assert cfg.parent.url is not None
        dial.append(DialTarget(cfg.parent.id, cfg.parent.url))
        # Standbys are dialled too (no Hello until the site fails over to one), so a
        # failover needs no connection set up after the parent is found dead.
        dial.extend(DialTarget(f.id, f.url) for f in cfg.fallbacks if f.url is not None)
    if cfg.role == "peer":
        listening = cfg.listen is not None
        dial = gossip_dial_targets(
            cfg.node_id, [(p.id, p.url) for p in cfg.peers], listening=listening
        )
        accept_from = [p.id for p in cfg.peers]
        if cfg.relay is not None and not listening:
            assert cfg.relay.url is not None
            dial.append(DialTarget(cfg.relay.id, cfg.relay.url))
            routes = {p.id: cfg.relay.id for p in cfg.peers if p.url is None}
    elif cfg.role == "relay":
        allowed_roles = ("peer",)  # any gossip peer of the roster may use the relay
    elif cfg.children:
        accept_from = list(cfg.children)
    codec = cfg.codec
    codecs = CodecPolicy(
        up=CodecSpec(kind=codec.up, topk_fraction=codec.topk_fraction),  # type: ignore[arg-type]
        down=CodecSpec(kind=codec.down),  # type: ignore[arg-type]
    )
    conn = cfg.connection
    peers = NetworkPeers(
        d.identity,
        d.roster,
        dial=dial,
        listen=cfg.listen,
        accept_from=accept_from,
        allowed_roles=allowed_roles,
        routes=routes,
        codecs=codecs,
        keepalive_s=conn.keepalive_s,
        down_after_s=conn.down_after_s,
        backoff=Backoff(base_s=conn.backoff_base_s, cap_s=conn.backoff_cap_s),
        rng=random.Random(derived_seed(cfg.seed, "backoff", cfg.node_id)),
        options=ChannelOptions(ciphers=conn.ciphers, offload=conn.offload),
        max_session_s=conn.max_session_s,
        roster_text=d.roster_text,
    )
    peers.gate.limits = GateLimits(
        max_pending=conn.max_pending,
        max_pending_per_address=conn.max_pending_per_address,
        handshake_timeout=conn.handshake_timeout_s,
    )
    layout = model_layout(d)
    if layout is not None:
        peers.e2e.set_layout(layout)
    elif cfg.role == "region":
        # A fresh region learns the layout from its first verified model; until then
        # its children have nothing model-sized to send it.
        peers.inbound_before_model = Limits.before_model()
    elif cfg.role == "relay":  # no model ever: the operator's cap on one envelope
        mib = conn.max_message_mib if conn.max_message_mib is not None else RELAY_MESSAGE_MIB
        cap = int(mib * MiB)
        peers.limits = Limits(max_message_bytes=cap, max_decoded_bytes=cap)
    return peers


def model_layout(d: Daemon) -> ModelLayout | None:
    """The layout of the node's model where it is known at start: the model it holds (a
    root, a gossip peer, a restored region) or the one its plan builds (a site). Its links
    then decode under caps of the model's size, and updates and models of another shape
    are refused before they are hashed (``runtime.signing``)."""
    model = _model_of(d.node)
    if model is not None:
        return ModelLayout.of(model[1])
    if d.plan is None:
        return None
    try:
        return ModelLayout.of(d.plan.init(d.cfg.seed))
    except Exception as exc:  # the plan's own code: without a layout the defaults apply
        log.warning(
            "%s: cannot build the model template from the plan (%s); links decode under "
            "the default limits until the first model arrives",
            d.cfg.node_id,
            exc,
            extra={"node": d.cfg.node_id},
        )
        return None


# ---------------------------------------------------------------------- housekeeping


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop``; True when stopping."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def _announce_ready(
    d: Daemon, peers: NetworkPeers, sink: Any, stop: asyncio.Event, wait_s: float
) -> None:
    """READY=1 once listening and the dialled links are up (or after ``wait_s`` anyway)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + wait_s
    wanted = frozenset(t.peer for t in peers.dial)
    while not stop.is_set():
        listening = d.cfg.listen is None or peers.listen_url is not None
        missing = wanted - peers.connected()
        if listening and (not missing or loop.time() >= give_up):
            break
        await asyncio.sleep(0.05)
    if stop.is_set():
        return
    parts = [f"{d.cfg.node_id} ({d.cfg.role})"]
    if peers.listen_url is not None:
        parts.append(f"listening on {peers.listen_url}")
    if wanted:
        missing = wanted - peers.connected()
        parts.append(f"waiting for {', '.join(sorted(missing))}" if missing else "links up")
    text = "; ".join(parts)
    systemd.ready(text)
    sink.set_ready(True)
    log.info(
        "ready: %s",
        text,
        extra={"node": d.cfg.node_id, "listen_url": peers.listen_url, "ready": True},
    )


def report_refusals(
    peers: NetworkPeers, sink: Callable[[Metric], None], seen: Counter[str]
) -> Counter[str]:
    """Connections refused before authentication since ``seen`` (by the gate's reasons,
    ``connection_cap`` for TCP connections over the listener's caps) into the metrics;
    returns the totals, the next call's ``seen``."""
    totals = Counter(peers.gate.refused)
    capped = getattr(peers.listener, "refused_connections", 0)
    if isinstance(capped, int) and capped:
        totals["connection_cap"] = capped
    for reason, n in (totals - seen).items():
        sink(Metric("connection_refused", float(n), labels={"reason": reason}))
    return totals


def report_duplicates(
    peers: NetworkPeers, sink: Callable[[Metric], None], seen: Counter[str]
) -> Counter[str]:
    """Second sessions refused per peer since ``seen`` (two daemons with one identity)
    into the metrics; returns the totals, the next call's ``seen``."""
    totals = Counter(peers.duplicate_identity)
    for peer, n in (totals - seen).items():
        sink(Metric("duplicate_identity", float(n), labels={"peer": peer}))
    return totals


async def _observe(d: Daemon, peers: NetworkPeers, sink: Any, stop: asyncio.Event) -> None:
    """Connected peers, bytes on the wire, refused connections and buffer fill, into the
    metrics, every second."""
    seen: dict[int, tuple[int, int]] = {}
    refused: Counter[str] = Counter()
    duplicates: Counter[str] = Counter()
    node: Any = d.node
    while True:
        sink.set_connected_peers(len(peers.connected()))
        refused = report_refusals(peers, sink, refused)
        duplicates = report_duplicates(peers, sink, duplicates)
        current: dict[int, tuple[int, int]] = {}
        for peer in peers.connected():
            conn = peers.table.get(peer)
            if conn is None:
                continue
            progress = conn.pipe.progress
            key = id(progress)
            last_in, last_out = seen.get(key, (0, 0))
            sink.add_bytes("received", max(0, progress.bytes_in - last_in))
            sink.add_bytes("sent", max(0, progress.bytes_out - last_out))
            current[key] = (progress.bytes_in, progress.bytes_out)
        seen = current
        fill = getattr(node, "buffer_fill", None)
        if isinstance(fill, int):
            sink(Metric("buffer_fill", float(fill)))
        if await _sleep_or_stop(stop, OBSERVE_INTERVAL_S):
            return


async def _either(event: asyncio.Event, stop: asyncio.Event) -> None:
    """Until ``event`` or ``stop`` is set."""
    waiter = asyncio.ensure_future(event.wait())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        stopper.cancel()


async def _on_event(
    event: asyncio.Event, stop: asyncio.Event, action: Callable[[str], None]
) -> None:
    """Call ``action`` when ``event`` is set (unless ``stop`` comes first)."""
    await _either(event, stop)
    if event.is_set():
        action("shutdown requested")


async def _reload_on_hangup(
    keeper: RosterKeeper, hangup: asyncio.Event, stop: asyncio.Event
) -> None:
    """Re-read ``roster.path`` whenever ``hangup`` is set (SIGHUP), until ``stop``."""
    while True:
        await _either(hangup, stop)
        if stop.is_set():
            return
        hangup.clear()
        log.info("%s: SIGHUP: re-reading %s", keeper.identity.node_id, keeper.path)
        try:
            await keeper.reload_file()
        except Exception:  # a bug in one reload must not end the daemon
            log.exception("%s: reloading the roster failed", keeper.identity.node_id)


def _model_of(node: Node) -> tuple[int, Any] | None:
    if isinstance(node, ModelHolder):
        return node.current_model()
    return None


async def _evaluate(d: Daemon, sink: Any, stop: asyncio.Event, interval_s: float) -> None:
    """Evaluate the node's model on its plan's test set whenever it has changed."""
    from prometheus_client import Gauge

    plan = d.plan
    assert plan is not None
    accuracy = Gauge(
        "fedloom_eval_accuracy", "Accuracy of the current model.", registry=sink.registry
    )
    loss = Gauge("fedloom_eval_loss", "Loss of the current model.", registry=sink.registry)
    version_g = Gauge(
        "fedloom_eval_model_version", "Model version last evaluated.", registry=sink.registry
    )
    last: int | None = None
    while True:
        model = _model_of(d.node)
        if model is not None and model[0] != last:
            version, weights = model
            try:
                result = await asyncio.to_thread(plan.evaluate, weights)
            except Exception:  # a broken evaluation must not take the node down
                log.exception("%s: evaluating model v%d failed", d.cfg.node_id, version)
            else:
                last = version
                acc = float(result.get("accuracy", math.nan))
                lss = float(result.get("loss", math.nan))
                accuracy.set(acc)
                loss.set(lss)
                version_g.set(version)
                log.info(
                    "%s: model v%d: accuracy %.4f, loss %.4f",
                    d.cfg.node_id,
                    version,
                    acc,
                    lss,
                    extra={"node": d.cfg.node_id, "version": version, "accuracy": acc, "loss": lss},
                )
        if await _sleep_or_stop(stop, interval_s):
            return


# ------------------------------------------------------------------------------ serve


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedloom")
    except PackageNotFoundError:
        return "dev"


async def serve(
    d: Daemon,
    *,
    eval_interval_s: float | None = None,
    ready_wait_s: float = READY_WAIT_S,
    install_signals: bool = True,
    shutdown: asyncio.Event | None = None,
    hangup: asyncio.Event | None = None,
    trainer: Trainer | None = None,
    executor: cf.Executor | None = None,
) -> None:
    """Run the daemon until SIGTERM/SIGINT or until ``shutdown`` is set (see the module
    docstring); re-read the roster on SIGHUP or whenever ``hangup`` is set.
    ``eval_interval_s`` None: the default for the role. ``trainer`` (and the ``executor``
    it runs in, left open here): instead of the plan's (``runtime.chaos.loadgen``)."""
    from fedloom.runtime.health import start_observability
    from fedloom.runtime.metrics import MetricsSink

    cfg = d.cfg
    loop = asyncio.get_running_loop()
    sink = MetricsSink(per_source=True)
    sink.set_info(cfg.node_id, cfg.role, _package_version())
    model = _model_of(d.node)
    if model is not None:
        sink(Metric("model_version", float(model[0])))
    peers = build_peers(d)
    peers.e2e.report = sink  # refused signatures count as rejected updates/messages
    # Relayed envelopes' numbers outlive a restart: no replay to this node after one.
    try:
        relay_seq = RelaySeqState(d.store, d.recovery.values.get(RELAY_SEQ_KEY))
    except ValueError as exc:
        raise ConfigError(f"state_dir: {cfg.state_dir} holds a corrupt value: {exc}") from None
    peers.e2e.keep_relay_seq(relay_seq)
    floor = model_floor(d.node)
    if floor is not None:  # no rollback to a model older than one held before the restart
        # ... nor another model under the version held: its digest is checked too.
        peers.e2e.guard = ModelVersionGuard(floor, model_floor_digest(d.node, floor))
    peers.on_link_rtt = sink.observe_link_rtt  # sampled at every connection's handshake
    keeper = RosterKeeper(
        d.identity,
        d.roster.consortium_key,
        d.roster,
        d.roster_text,
        persist=_persist_roster(d),
        path=cfg.roster_path,
        installed=lambda roster: bound_claims(cfg, d.node, roster),
    )
    keeper.attach(peers)
    if hangup is None:
        hangup = asyncio.Event()
    own_executor: cf.Executor | None = None
    if trainer is None and cfg.role in ("site", "peer") and d.plan is not None:
        trainer = PlanTrainer(d.plan)
        executor = own_executor = make_executor(cfg.executor.kind, cfg.executor.workers)
    driver = AsyncDriver(
        d.node,
        peers=peers,
        trainer=trainer,
        executor=executor,
        store=d.store,
        metrics=sink,
        seed=cfg.seed,
    )
    stop = asyncio.Event()
    main = asyncio.current_task()
    outside = asyncio.all_tasks(loop)  # tasks not ours to cancel (in-process callers)
    finished = False
    forced = False
    forced_once: list[bool] = []  # force_stop has warned (a list: set from a callback)

    def force_stop() -> None:
        # A task that swallowed its cancellation (e.g. one whose link ended at the same
        # moment) would keep the daemon alive after SIGTERM: cancel what is left, again.
        if finished:
            return
        pending = [
            t
            for t in asyncio.all_tasks(loop)
            if t is not main and t not in outside and not t.done()
        ]
        log.log(
            logging.DEBUG if forced_once else logging.WARNING,  # once is enough to know
            "%s: still stopping after %.1f s; cancelling %d task(s): %s",
            cfg.node_id,
            STOP_GRACE_S,
            len(pending),
            ", ".join(sorted(t.get_name() for t in pending))[:500],
            extra={"node": cfg.node_id},
        )
        forced_once.append(True)
        for task in pending:
            task.cancel()
        loop.call_later(1.0, force_stop)

    def request_stop(why: str) -> None:
        if stop.is_set():
            return
        log.info("%s: %s: shutting down", cfg.node_id, why, extra={"node": cfg.node_id})
        systemd.stopping()
        sink.set_ready(False)
        stop.set()
        driver.stop()
        loop.call_later(STOP_GRACE_S, force_stop)

    signals = (signal.SIGTERM, signal.SIGINT) if install_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, request_stop, sig.name)
    if install_signals:
        loop.add_signal_handler(signal.SIGHUP, hangup.set)
    interval = eval_interval_s
    if interval is None:
        interval = DEFAULT_EVAL_INTERVAL_S if cfg.role in ("root", "peer") else 0.0
    evaluating = interval > 0 and d.plan is not None and isinstance(d.node, ModelHolder)
    obs = None
    try:
        if cfg.metrics_port:
            try:
                obs = await start_observability(sink, cfg.metrics_host, cfg.metrics_port)
            except OSError as exc:
                raise DaemonError(
                    f"metrics: cannot listen on {cfg.metrics_host}:{cfg.metrics_port}: {exc}"
                ) from None
        log.info(
            "%s (%s): %s",
            cfg.node_id,
            cfg.role,
            _recovery_summary(d.recovery),
            extra={"node": cfg.node_id, "epoch": d.recovery.epoch},
        )
        if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
            log.info(
                "%s: started without GLIBC_TUNABLES; model-sized buffers will be mapped and "
                "zeroed afresh every round (the systemd units set GLIBC_TUNABLES=%s)",
                cfg.node_id,
                GLIBC_TUNABLES,
                extra={"node": cfg.node_id},
            )
        # What start-up built (modules, config, recovered state) lives as long as the
        # process: frozen, it stays out of every later full collection's scan. Garbage
        # is collected first, so none of it is frozen for good.
        gc.collect()
        gc.freeze()
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(driver.run(), name=f"driver {cfg.node_id}")
            tg.create_task(_announce_ready(d, peers, sink, stop, ready_wait_s))
            tg.create_task(systemd.watchdog_loop(stop))
            tg.create_task(_observe(d, peers, sink, stop))
            tg.create_task(_reload_on_hangup(keeper, hangup, stop))
            if evaluating:
                tg.create_task(_evaluate(d, sink, stop, interval))
            if shutdown is not None:
                tg.create_task(_on_event(shutdown, stop, request_stop))
            try:
                await run
            except asyncio.CancelledError:
                if main is None or main.cancelling():
                    raise  # our caller's cancellation, not the stop's
                # force_stop cancelled the driver after the grace period; it ended only
                # once its writes were done (see AsyncDriver.run), so stopping is safe.
                forced = True
            finally:
                stop.set()  # the helpers end with the driver, whichever way it ended
    except* ListenError as group:
        raise DaemonError(f"listen: {_leaf(group)}") from None
    finally:
        finished = True
        for sig in signals:
            loop.remove_signal_handler(sig)
        if install_signals:
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not a kill during the last checkpoint
        if obs is not None:
            await obs.stop()
        if own_executor is not None:
            own_executor.shutdown(wait=False, cancel_futures=True)
    unwritten = driver.unwritten_at_forced_stop
    if forced and unwritten is not None:
        # The disk stalled: no final checkpoint (more slow writes); the log already holds
        # everything acknowledged, and a restart recovers from it.
        log.warning(
            "%s: stopped while a state write was still in progress: waited for it, then "
            "stopped without writing the %d record(s) behind it (never acknowledged: their "
            "senders resend them) or a final checkpoint",
            cfg.node_id,
            unwritten,
            extra={"node": cfg.node_id, "unwritten_records": unwritten},
        )
        return
    if _has_snapshot(d.node):
        d.store.apply(Persist(CHECKPOINT_KEY, d.node.snapshot()))  # type: ignore[attr-defined]
    if forced:
        log.warning(
            "%s: stopped after %.1f s of grace: the driver had to be cancelled (its writes "
            "completed first)",
            cfg.node_id,
            STOP_GRACE_S,
            extra={"node": cfg.node_id},
        )
    else:
        log.info("%s: stopped cleanly", cfg.node_id, extra={"node": cfg.node_id})


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception of a (nested) task-group error."""
    first = group.exceptions[0]
    return _leaf(first) if isinstance(first, BaseExceptionGroup) else first


# --------------------------------------------------------------------------- logging

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(levels: list[str] | None = None, fmt: str = "auto") -> None:
    """Log to stderr. ``levels``: ``"info"`` or ``"logger=debug"`` items (the last bare
    level is the root level); ``fmt``: ``json``, ``text``, or ``auto`` (text on a TTY)."""
    root_level = logging.INFO
    per_logger: dict[str, int] = {}
    for item in levels or []:
        name, sep, level = item.rpartition("=")
        value = logging.getLevelName(level.strip().upper())
        if not isinstance(value, int):
            raise ConfigError(f"--log-level {item!r}: unknown level (debug, info, warning, error)")
        if sep:
            per_logger[name.strip()] = value
        else:
            root_level = value
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if use_json
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(root_level)
    # aiohttp logs every refused upgrade and dropped socket at INFO: noise for operators.
    logging.getLogger("aiohttp").setLevel(max(root_level, logging.WARNING))
    quiet_client_disconnects()  # a client that went away: one DEBUG line, no traceback
    for name, value in per_logger.items():
        logging.getLogger(name).setLevel(value)


# ------------------------------------------------------------------------------ entry


def _new_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_daemon(
    config: Path,
    *,
    eval_interval_s: float | None = None,
    ready_wait_s: float = READY_WAIT_S,
) -> int:
    """``fedloom run``: load, recover, serve until SIGTERM; 0 on a clean stop.

    Config mistakes raise ``ConfigError`` (``EXIT_CONFIG`` from the CLI); a daemon that
    cannot run logs one line and returns ``EXIT_CORRUPT_STATE`` (damaged state),
    ``EXIT_ENVIRONMENT`` (the disk refused a read or write: full, read-only, I/O error)
    or ``EXIT_FAILED`` (anything else expected, e.g. a port in use).
    """
    cfg = load_config(config)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload during recovery: no-op, not a kill
    try:
        d = open_daemon(cfg)
    except Exception as exc:
        return _stopped(cfg, exc)
    try:
        with asyncio.Runner(loop_factory=_new_loop_factory()) as runner:
            runner.run(serve(d, eval_interval_s=eval_interval_s, ready_wait_s=ready_wait_s))
    except Exception as exc:
        return _stopped(cfg, exc)
    except asyncio.CancelledError:  # a stop forced past what serve() handles: one line
        log.error(
            "%s: stopped by force before its shutdown completed (see `fedloom state check`)",
            cfg.node_id,
            extra={"node": cfg.node_id, "exit_status": EXIT_FAILED},
        )
        return EXIT_FAILED
    finally:
        d.close()
    return EXIT_OK


def _stopped(cfg: DaemonConfig, exc: Exception) -> int:
    """Log why the daemon stopped in one line and return its exit status (re-raise a bug)."""
    reason = stop_reason(exc)
    if reason is None:
        raise exc
    log.error(
        "%s: %s",
        cfg.node_id,
        reason,
        extra={"node": cfg.node_id, "exit_status": reason.exit_code},
    )
    return reason.exit_code
