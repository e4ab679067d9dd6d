"""Who this daemon is: its identity key and the signed roster that lists it.

``load_identity`` reads the node's signing key (it must be ``node_id``'s);
``load_roster_text`` the signed roster, which must list this node with that key and role
(``check_lists_me``). Which roster a restart uses, the file's or a newer one kept in the
state directory, is ``runtime.recovery.current_roster``'s decision.
"""

from __future__ import annotations

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.config import DaemonConfig
from fedloom.transport.identity import Identity, IdentityError
from fedloom.transport.roster import Roster, RosterError, read_small_text


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
    check_lists_me(cfg, identity, roster)
    return roster, text


def check_lists_me(cfg: DaemonConfig, identity: Identity, roster: Roster) -> None:
    """ConfigError unless ``roster`` lists this node with ``identity``'s key and the role of
    ``cfg``."""
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
