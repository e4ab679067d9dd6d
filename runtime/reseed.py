"""``fedloom state reseed``: a root that lost its state resumes from a model it signed.

A root whose state directory was lost (or restored from an old backup) restarts at an
older version than it published: its regions refuse its models as stale, and it refuses
their forwards as based on a future version (it logs one ERROR naming this command). The
federation is stuck until the root holds a version at least as new as what they hold.

    fedloom state reseed --config ROOT.toml [--from DIR ...] [--backup DIR ...]
                         [--above N [--force]]

Each ``--from`` is a region's state directory (its checkpoint holds the newest global
model it had made durable and the root's signature of it; read without its lock, so the
region may keep running). Its model is used only if it carries THIS root's signature over
exactly those weights (the root trusts nothing else: a region cannot plant a model),
checked with the root's identity key; anything else found there is refused, a checkpoint
of a root's kind included (its node id is public: a region could write one). Each
``--backup`` is the operator's own backup copy of this root's state directory, restored
whole (ledger and buffer too); it is trusted as the root's own disk is. The newest version
found wins.

The root's state directory (the root must be stopped: its lock is taken) is then given a
checkpoint of a fresh root (this config's children and settings) holding that model under
that version, or under ``N + 1`` with ``--above N`` when that is higher. A region keeps its
newest model durable only now and then, so it may hold (in memory) a newer version than
its state directory: the root's ERROR names the newest version its children sent updates
on, and ``--above`` that version makes the reseeded root's first model newer than anything
they hold (a model under a number a region holds, with other weights, would be refused as
``model_conflict``; an older one as ``stale_model``). Refused when the root already holds a
version at least as new, and, when the root's own state loads cleanly, an ``--above``
``ABOVE_SLACK`` or more versions beyond the newest model found, unless ``--force``: a
healthy root would lose its ledger and what it applied, on a claim nothing here can check.
What the root took after the seed model and had acked is lost with its state (the
regions dropped it when it was acked); forwards not acked are resent by the regions and
taken once. A damaged root state directory is refused (exit status 65) with the file and
offset: repair it (``fedloom state repair``) or move it aside first.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fedloom.algorithms.aggregator_base import OwnModel
from fedloom.algorithms.protocol import Node, Persist, Weights
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.store import (
    CHECKPOINT_KEY,
    CorruptStateError,
    StateIOError,
    StateStore,
    StoreError,
    _read_single,
)
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import build_node, build_plan, load_identity, load_roster, restore_node
from fedloom.runtime.exit_status import EXIT_CORRUPT_STATE, EXIT_ENVIRONMENT
from fedloom.transport.e2e import model_signed_bytes, tensors_digest
from fedloom.transport.identity import Identity, verify_signature
from fedloom.transport.settings import NO_SETTINGS

__all__ = [
    "ABOVE_SLACK",
    "Seed",
    "cmd_state_reseed",
    "reseed_root",
    "seed_from",
    "seed_from_backup",
]

_ROOT_KINDS = ("fedbuff", "fedasync", "sync")
# How far ``--above`` may go beyond the newest model found while the root's own state is
# intact: a region's durable model lags the one it holds by the versions published between
# two of its checkpoints (every ``checkpoint_every`` of its forwards), far fewer than this.
ABOVE_SLACK = 1000


@dataclass(frozen=True, slots=True)
class Seed:
    """A model to resume from: its version and weights, or a whole root state."""

    version: int
    weights: Weights
    source: Path
    root_state: Mapping[str, Any] | None = None  # a backup of the root's own state


def _checkpoint(directory: Path, *, flag: str = "--from") -> Any:
    """The checkpoint value of a state directory, read without its lock: the file is only
    ever replaced atomically, so a running node's is whole."""
    path = directory / f"{CHECKPOINT_KEY}.ckpt"
    if not path.is_file():
        raise ConfigError(f"{flag} {directory}: no checkpoint there (is it a state directory?)")
    try:
        tree = _read_single(path)
    except (StoreError, OSError) as exc:
        raise ConfigError(f"{flag} {directory}: cannot read its checkpoint: {exc}") from None
    if not isinstance(tree, Mapping) or tree.get("key") != CHECKPOINT_KEY:
        raise ConfigError(f"{flag} {directory}: {path.name} is not a checkpoint")
    return tree.get("data")


def _signed_by(
    identity: Identity, version: int, proof: Any, weights: Weights, settings: Any = None
) -> bool:
    """Whether ``proof`` is ``identity``'s signature of ``weights`` as model ``version``
    (sent with the settings digest of the region's ``(config, digest)``; none: empty)."""
    if not isinstance(proof, list | tuple) or len(proof) != 3:
        return False
    signer, parent, sig = proof
    if signer != identity.node_id or not isinstance(parent, int) or not isinstance(sig, bytes):
        return False
    try:
        signed = settings[1] if isinstance(settings, list | tuple) and len(settings) == 2 else b""
        data = model_signed_bytes(
            version, parent, tensors_digest(weights), bytes(signed) or NO_SETTINGS
        )
    except (TypeError, ValueError):
        return False
    return verify_signature(identity.public_key, data, sig)


def seed_from(directory: Path, identity: Identity) -> Seed:
    """The root-signed model a region's state ``directory`` offers (module docstring)."""
    state = _checkpoint(directory)
    kind = state.get("kind") if isinstance(state, Mapping) else None
    if kind in _ROOT_KINDS:
        raise ConfigError(
            f"--from {directory}: holds a root's state, not a region's; refused (a region "
            "could write one). A backup of this root's own state directory is given with "
            "--backup DIR"
        )
    if kind == "regional":
        glob = state.get("global")
        if glob is None:
            raise ConfigError(f"--from {directory}: this region has no global model yet")
        try:
            version, weights = int(glob[0]), dict(glob[1])
        except (TypeError, ValueError, IndexError):
            raise ConfigError(f"--from {directory}: its checkpoint holds no usable model") from None
        if not _signed_by(identity, version, state.get("proof"), weights, state.get("settings")):
            raise ConfigError(
                f"--from {directory}: its model version {version} does not carry "
                f"{identity.node_id}'s signature over those weights; refused"
            )
        return Seed(version, weights, directory)
    raise ConfigError(
        f"--from {directory}: holds a {kind!r} state; give a region's state directory "
        "(or a backup of this root's own with --backup DIR)"
    )


def seed_from_backup(directory: Path, identity: Identity, make: Callable[[], Node]) -> Seed:
    """The whole state a backup of the root's own state ``directory`` holds."""
    state = _checkpoint(directory, flag="--backup")
    kind = state.get("kind") if isinstance(state, Mapping) else None
    if kind not in _ROOT_KINDS:
        raise ConfigError(f"--backup {directory}: holds a {kind!r} state, not a root's")
    if state.get("node_id") != identity.node_id:
        raise ConfigError(
            f"--backup {directory}: a backup of {state.get('node_id')!r}, "
            f"not of {identity.node_id!r}"
        )
    backup = make()
    try:
        with StateStore(directory) as store:
            restore_node(backup, store.load(repair=False))
    except (StoreError, OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--backup {directory}: cannot restore this backup: {exc}") from None
    assert isinstance(backup, OwnModel)
    version, weights = backup.current_model()
    return Seed(version, dict(weights), directory, backup.snapshot())  # type: ignore[attr-defined]


def _with_model(root: Node, version: int, weights: Weights) -> None:
    """``root`` (fresh) holding ``weights`` as model ``version``: its own snapshot with the
    model replaced, restored (so every kind rebuilds its buffer on those weights)."""
    state = dict(root.snapshot())  # type: ignore[attr-defined]
    state["version"] = version
    state["weights"] = weights
    if state["kind"] == "fedasync":
        state["history"] = [(version, weights)]
    root.restore(state)  # type: ignore[attr-defined]


def _refuse_unaccounted(snapshot: Any, version: int) -> None:
    """A root with central DP publishes every version as a private release: a reseed to a
    version its privacy ledger does not reach would publish models nobody accounted for
    (the root refuses such a state at start). Refuse it here, before writing anything."""
    privacy = snapshot.get("privacy") if isinstance(snapshot, Mapping) else None
    if not isinstance(privacy, Mapping):
        return
    releases = privacy.get("releases") or []
    last = releases[-1].get("version", 0) if releases else 0
    if last < version:
        raise ConfigError(
            f"state_dir: this root runs with [privacy] and its privacy ledger ends at version "
            f"{last}: reseeding it at model version {version} would publish versions no "
            "ledger accounts for, so `fedloom state reseed` refuses on a private root; "
            "restore its state directory from a backup, or start a new federation"
        )


def reseed_root(
    config: Path,
    sources: Sequence[Path],
    *,
    above: int = -1,
    backups: Sequence[Path] = (),
    force: bool = False,
) -> str:
    """Re-seed the root of ``config`` from regions' ``sources`` and its own ``backups`` (at
    a version > ``above``); return the line to print. A damaged root state directory
    raises ``CorruptStateError`` (its message is the line to print)."""
    if above < -1:
        raise ConfigError(f"--above must be >= 0, got {above}")
    if not sources and not backups:
        raise ConfigError("give at least one --from STATE_DIR (a region's) or --backup DIR")
    cfg = load_config(config)
    if cfg.role != "root":
        raise ConfigError(f"{config}: reseed is for a root; this config is a {cfg.role}")
    identity = load_identity(cfg)
    roster = load_roster(cfg, identity)
    plan = build_plan(cfg)

    def make() -> Node:
        return build_node(cfg, roster, plan)

    seeds = [seed_from(Path(s), identity) for s in sources]
    seeds += [seed_from_backup(Path(b), identity, make) for b in backups]
    seed = max(seeds, key=lambda s: s.version)
    root = make()
    try:
        store = StateStore(cfg.state_dir)
    except StoreError as exc:
        raise ConfigError(f"state_dir: {exc}: stop the root before reseeding it") from None
    with store:
        try:
            recovery = store.load()
        except CorruptStateError as exc:
            # A checkpoint cannot be repaired (it is the node's whole state); a log can.
            fix = (
                f"move {cfg.state_dir} aside (keep it)"
                if exc.path is not None and exc.path.name.endswith(".ckpt")
                else f"repair it (`fedloom state repair {cfg.state_dir} ...`) or move it aside"
            )
            raise CorruptStateError(
                f"state_dir damaged: {exc}; {fix}, then reseed again",
                path=exc.path,
                offset=exc.offset,
            ) from None
        try:
            current = make()
            restore_node(current, recovery)
            held = current.current_model()[0]  # type: ignore[attr-defined]
            intact = recovery.checkpoint is not None
        except (StoreError, ValueError, KeyError):
            held, intact = -1, False  # unreadable: what it held is lost anyway
        version = max(seed.version, above + 1)
        if held >= version:
            raise ConfigError(
                f"state_dir: the root already holds model version {held}, not older than "
                f"version {version} from {seed.source}: nothing to reseed"
            )
        if intact and not force and above >= seed.version + ABOVE_SLACK:
            raise ConfigError(
                f"--above {above} is {above - seed.version} versions beyond the newest model "
                f"found (version {seed.version} in {seed.source}) while the root's own state "
                f"is intact (version {held}): a healthy root would lose its ledger and what "
                "it applied; check which region claims that version, or add --force"
            )
        own = seed.root_state if seed.root_state is not None else root.snapshot()  # type: ignore[attr-defined]
        _refuse_unaccounted(own, version)
        if seed.root_state is not None:
            root.restore(seed.root_state)  # type: ignore[attr-defined]
            if version != seed.version:
                _with_model(root, version, seed.weights)
        else:
            _with_model(root, version, seed.weights)
        # Its record of the site updates it took is empty (--from) or old (--backup):
        # the sites' numbers have moved on, so it relearns them.
        relearn = getattr(root, "relearn_site_pairs", None)
        if relearn is not None:
            relearn()
        store.apply(Persist(CHECKPOINT_KEY, root.snapshot()))  # type: ignore[attr-defined]
    return (
        f"reseeded {cfg.node_id} at model version {version} (from version {seed.version} "
        f"in {seed.source}; it held {max(held, 0)}); start it again"
    )


def cmd_state_reseed(
    config: Path,
    sources: Sequence[Path],
    above: int = -1,
    *,
    backups: Sequence[Path] = (),
    force: bool = False,
    out: TextIO | None = None,
) -> int:
    """``fedloom state reseed``: 0 on success; one line and 65 when the root's state
    directory is damaged, 75 when the disk refuses it (user mistakes raise
    ``ConfigError``)."""
    try:
        line = reseed_root(config, sources, above=above, backups=backups, force=force)
    except CorruptStateError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return EXIT_CORRUPT_STATE
    except StateIOError as exc:  # the disk refused: fix it and run this again
        print(f"fedloom: error: state_dir: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    print(line, file=out or sys.stdout)
    return 0
