"""``fedloom state reseed``: a root that lost its state resumes from a model it signed.

A root whose state directory was lost (or restored from an old backup) restarts at an
older version than it published: its regions refuse its models as stale, and it refuses
their forwards as based on a future version (it logs one ERROR naming this command). The
federation is stuck until the root holds a version at least as new as what they hold.

    fedloom state reseed --config ROOT.toml --from DIR [--from DIR ...] [--above N]

Each ``--from`` is a state directory: a region's (its checkpoint holds the newest global
model it had made durable and the root's signature of it; read without its lock, so the
region may keep running), or a backup copy of this root's own state directory (restored
whole: ledger and buffer too). A region's model is used only if it carries THIS root's
signature over exactly those weights (the root trusts nothing else: a region cannot
plant a model), checked with the root's identity key. The newest version found wins.

The root's state directory (the root must be stopped: its lock is taken) is then given a
checkpoint of a fresh root (this config's children and settings) holding that model under
that version, or under ``N + 1`` with ``--above N`` when that is higher. A region keeps its
newest model durable only now and then, so it may hold (in memory) a newer version than
its state directory: the root's ERROR names the newest version its children sent updates
on, and ``--above`` that version makes the reseeded root's first model newer than anything
they hold (a model under a number a region holds, with other weights, would be refused as
``model_conflict``; an older one as ``stale_model``). Refused when the root already holds a
version at least as new. What the root took after the seed model and had acked is
lost with its state (the regions dropped it when it was acked); forwards not acked are
resent by the regions and taken once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from algorithms.aggregator_base import OwnModel
from algorithms.protocol import Node, Persist, Weights
from runtime.config import load_config
from runtime.daemon import build_node, build_plan, load_identity, load_roster, restore_node
from runtime.store import CHECKPOINT_KEY, StateStore, StoreError, _read_single
from sim.config_reader import ConfigError
from transport.e2e import model_signed_bytes, tensors_digest
from transport.identity import Identity, verify_signature

__all__ = ["Seed", "cmd_state_reseed", "reseed_root", "seed_from"]

_ROOT_KINDS = ("fedbuff", "fedasync", "sync")


@dataclass(frozen=True, slots=True)
class Seed:
    """A model to resume from: its version and weights, or a whole root state."""

    version: int
    weights: Weights
    source: Path
    root_state: Mapping[str, Any] | None = None  # a backup of the root's own state


def _checkpoint(directory: Path) -> Any:
    """The checkpoint value of a state directory, read without its lock: the file is only
    ever replaced atomically, so a running node's is whole."""
    path = directory / f"{CHECKPOINT_KEY}.ckpt"
    if not path.is_file():
        raise ConfigError(f"--from {directory}: no checkpoint there (is it a state directory?)")
    try:
        tree = _read_single(path)
    except (StoreError, OSError) as exc:
        raise ConfigError(f"--from {directory}: cannot read its checkpoint: {exc}") from None
    if not isinstance(tree, Mapping) or tree.get("key") != CHECKPOINT_KEY:
        raise ConfigError(f"--from {directory}: {path.name} is not a checkpoint")
    return tree.get("data")


def _signed_by(identity: Identity, version: int, proof: Any, weights: Weights) -> bool:
    """Whether ``proof`` is ``identity``'s signature of ``weights`` as model ``version``."""
    if not isinstance(proof, list | tuple) or len(proof) != 3:
        return False
    signer, parent, sig = proof
    if signer != identity.node_id or not isinstance(parent, int) or not isinstance(sig, bytes):
        return False
    try:
        data = model_signed_bytes(version, parent, tensors_digest(weights))
    except (TypeError, ValueError):
        return False
    return verify_signature(identity.public_key, data, sig)


def seed_from(directory: Path, identity: Identity, make: Callable[[], Node]) -> Seed:
    """The model ``directory`` offers the root ``make`` builds (module docstring)."""
    state = _checkpoint(directory)
    kind = state.get("kind") if isinstance(state, Mapping) else None
    if kind == "regional":
        glob = state.get("global")
        if glob is None:
            raise ConfigError(f"--from {directory}: this region has no global model yet")
        try:
            version, weights = int(glob[0]), dict(glob[1])
        except (TypeError, ValueError, IndexError):
            raise ConfigError(f"--from {directory}: its checkpoint holds no usable model") from None
        if not _signed_by(identity, version, state.get("proof"), weights):
            raise ConfigError(
                f"--from {directory}: its model version {version} does not carry "
                f"{identity.node_id}'s signature over those weights; refused"
            )
        return Seed(version, weights, directory)
    if kind in _ROOT_KINDS:
        if state.get("node_id") != identity.node_id:
            raise ConfigError(
                f"--from {directory}: a backup of {state.get('node_id')!r}, "
                f"not of {identity.node_id!r}"
            )
        backup = make()
        try:
            with StateStore(directory) as store:
                restore_node(backup, store.load(repair=False))
        except (StoreError, OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"--from {directory}: cannot restore this backup: {exc}") from None
        assert isinstance(backup, OwnModel)
        version, weights = backup.current_model()
        return Seed(version, dict(weights), directory, backup.snapshot())  # type: ignore[attr-defined]
    raise ConfigError(
        f"--from {directory}: holds a {kind!r} state; give a region's state directory "
        "or a backup of this root's"
    )


def _with_model(root: Node, version: int, weights: Weights) -> None:
    """``root`` (fresh) holding ``weights`` as model ``version``: its own snapshot with the
    model replaced, restored (so every kind rebuilds its buffer on those weights)."""
    state = dict(root.snapshot())  # type: ignore[attr-defined]
    state["version"] = version
    state["weights"] = weights
    if state["kind"] == "fedasync":
        state["history"] = [(version, weights)]
    root.restore(state)  # type: ignore[attr-defined]


def reseed_root(config: Path, sources: Sequence[Path], *, above: int = -1) -> str:
    """Re-seed the root of ``config`` from ``sources`` (at a version > ``above``); return
    the line to print."""
    if above < -1:
        raise ConfigError(f"--above must be >= 0, got {above}")
    if not sources:
        raise ConfigError("give at least one --from STATE_DIR")
    cfg = load_config(config)
    if cfg.role != "root":
        raise ConfigError(f"{config}: reseed is for a root; this config is a {cfg.role}")
    identity = load_identity(cfg)
    roster = load_roster(cfg, identity)
    plan = build_plan(cfg)

    def make() -> Node:
        return build_node(cfg, roster, plan)

    seed = max((seed_from(Path(s), identity, make) for s in sources), key=lambda s: s.version)
    root = make()
    try:
        store = StateStore(cfg.state_dir)
    except StoreError as exc:
        raise ConfigError(f"state_dir: {exc}: stop the root before reseeding it") from None
    with store:
        try:
            current = make()
            restore_node(current, store.load())
            held = current.current_model()[0]  # type: ignore[attr-defined]
        except (StoreError, ValueError, KeyError):
            held = -1  # unreadable: what it held is lost anyway
        version = max(seed.version, above + 1)
        if held >= version:
            raise ConfigError(
                f"state_dir: the root already holds model version {held}, not older than "
                f"version {version} from {seed.source}: nothing to reseed"
            )
        if seed.root_state is not None:
            root.restore(seed.root_state)  # type: ignore[attr-defined]
            if version != seed.version:
                _with_model(root, version, seed.weights)
        else:
            _with_model(root, version, seed.weights)
        store.apply(Persist(CHECKPOINT_KEY, root.snapshot()))  # type: ignore[attr-defined]
    return (
        f"reseeded {cfg.node_id} at model version {version} (from version {seed.version} "
        f"in {seed.source}; it held {max(held, 0)}); start it again"
    )


def cmd_state_reseed(
    config: Path, sources: Sequence[Path], above: int = -1, *, out: TextIO | None = None
) -> int:
    """``fedloom state reseed``: 0 on success (user mistakes raise ``ConfigError``)."""
    line = reseed_root(config, sources, above=above)
    print(line, file=out or sys.stdout)
    return 0
