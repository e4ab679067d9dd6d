"""Opening a daemon: identity, roster, node, then recovery from its state directory.

``open_daemon`` (everything before the network): read the identity and the roster, build
the node, open the ``StateStore`` (flock-ed: one daemon per directory), restore the node
from its checkpoint plus the log records after it (``restore_node``: one call for every
node kind, ``algorithms.protocol.Restorable``), then write a fresh checkpoint (compaction:
the log starts empty). ``load_node`` performs the same recovery without running the node
(reports, the demo, tests). ``stop_reason`` turns what ends a daemon into one line and an
exit status.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedloom.algorithms.protocol import Node, Persist, Restorable
from fedloom.algorithms.training import TrainingPlan
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.store import (
    CHECKPOINT_KEY,
    CorruptStateError,
    Recovery,
    StateIOError,
    StateStore,
    StoreError,
)
from fedloom.runtime.config import DaemonConfig
from fedloom.runtime.exit_status import EXIT_CORRUPT_STATE, EXIT_ENVIRONMENT, EXIT_FAILED
from fedloom.runtime.identity import check_lists_me, load_identity, load_roster, load_roster_text
from fedloom.runtime.nodes import bound_claims, build_node, build_plan
from fedloom.runtime.roster_updates import ROSTER_SEEN_KEY
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterError

log = logging.getLogger("fedloom.daemon")


class DaemonError(RuntimeError):
    """The daemon cannot start or had to stop (not a config mistake): one line, and
    ``exit_code`` (``EXIT_FAILED`` unless the cause is the state's or the environment's)."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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


def _check_owner(cfg: DaemonConfig) -> None:
    """Refuse another node's state directory (a config copied from that node's, state_dir
    left as it was), before anything is written there: its audit log names its node."""
    from fedloom.runtime.audit import UNKNOWN_NODE, AuditError, check_tail

    try:
        owner = check_tail(cfg.state_dir)
    except (AuditError, OSError):
        return  # a damaged log or an unreadable disk: the store and open_audit say so
    if owner not in (None, UNKNOWN_NODE, cfg.node_id):
        raise ConfigError(
            f"state_dir: {cfg.state_dir} holds the state of node {owner!r} (its audit log "
            f"says so), not of {cfg.node_id!r}; give each node its own state_dir"
        )


def _open_store(cfg: DaemonConfig) -> tuple[StateStore, Recovery]:
    _check_owner(cfg)
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
        if exc.errno == errno.EEXIST:  # mkdir's word for "a file is in the way"
            raise ConfigError(f"state_dir: {cfg.state_dir} is not a directory") from None
        raise ConfigError(f"state_dir: cannot open {cfg.state_dir}: {exc.strerror}") from None
    try:
        return store, store.load()
    except BaseException as exc:
        store.close()
        reason = stop_reason(exc)
        if reason is not None:
            raise reason from None
        raise


def restore_node(node: Node, recovery: Recovery) -> None:
    """Load the checkpoint (or the fresh node's own state) and replay the log after it:
    every durable node restores through ``algorithms.protocol.Restorable``."""
    if isinstance(node, Restorable):
        node.restore(recovery.checkpoint, recovery)


def current_roster(
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
    check_lists_me(cfg, identity, roster)
    return roster


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
        roster, text = current_roster(cfg, identity, roster, text, recovery, store)
        bound_claims(cfg, node, roster)
        _recover(cfg, node, recovery)
        if isinstance(node, Restorable):
            # Compaction: from here on the log holds only what happens after this start.
            store.apply(Persist(CHECKPOINT_KEY, node.snapshot()))
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


def recovery_summary(recovery: Recovery) -> str:
    records = sum(len(v) for v in recovery.logs.values())
    if recovery.checkpoint is None and not records:
        return "fresh start (no saved state)"
    ckpt = "a checkpoint" if recovery.checkpoint is not None else "no checkpoint"
    torn = f", dropped a torn tail of {recovery.torn_bytes} bytes" if recovery.torn_bytes else ""
    return f"recovered {ckpt} (epoch {recovery.epoch}) and {records} log records{torn}"
