"""Daemon configuration: one TOML file per node, read strictly.

Example (a hospital site)::

    role = "site"                     # site | region | root | peer | relay
    node_id = "hospital-a"
    state_dir = "/var/lib/fedloom"    # durable state (systemd StateDirectory=)
    seed = 1

    [identity]
    key = "/run/credentials/fedloom-site.service/identity.key"

    [roster]
    path = "/etc/fedloom/roster.toml"
    consortium_key = "<base64 public key>"   # or consortium_key_file = "consortium.pub"

    [parent]                          # sites and regions dial their parent
    id = "region-eu"
    url = "ws://region-eu.example.org:7443/fedloom"
    # failover_after_s = 60           # sites: switch to a fallback after the parent has
    # max_held = 32                   #   been down this long; updates kept until settled
    # [[parent.fallback]]             # sites: the region's standby (same children list)
    # id = "region-eu-b"
    # url = "ws://region-eu-b.example.org:7443/fedloom"

    [plan]                            # the training plan: a built-in workload ...
    dataset = "breast_cancer"         # (scikit-learn's: the data extra; "synthetic": numpy)
    model = "softmax"                 # numpy; "mlp" and "cnn" need the torch extra
    n_sites = 6                       # ... with this node's share of the data
    site_index = 0
    seed = 1
    # factory = "mypkg.train:make_client"   # ... or any TrainingPlan / NumPyClient factory
    # [plan.args]                            # keyword arguments for the factory
    # kind = "tabular"                       # ... or the site's registered table by tag
    #                                        #   (README, "Bringing your own data")

    [training]                        # lr, local_steps, batch_size, mu
    [aggregation]                     # aggregators: algorithm + federation.params'
                                      # AlgorithmConfig (the simulator's arms read it too)
                                      # (start_quorum = "all", start_wait_s = 5: hold the
                                      # first dispatch until the children are up;
                                      # refusal_backoff_s = 5: no task for a site that
                                      # refused one, doubled per refusal in a row)
    [codec]                           # up, down, topk_fraction
    [connection]                      # keepalive_s, down_after_s, backoff_base_s, backoff_cap_s,
                                      # max_session_s (a session's maximum lifetime),
                                      # ciphers (record ciphers, preferred first),
                                      # offload ("auto" | "pool": where records are sealed),
                                      # listening: handshake_timeout_s, max_pending,
                                      # max_pending_per_address (admission before auth)
    [metrics]                         # port (0 = off), host
    [outbox]                          # sites and regions: max_mib, the backpressure bound
    [executor]                        # kind = "thread" | "process", workers
    [secure_aggregation]              # enabled, min_cohort, cohort_size, clip, ... (README,
                                      # "Secure aggregation"): sites and aggregators alike
    [dp_sgd]                          # sites with a torch plan (mlp, cnn): noise_multiplier,
                                      # max_grad_norm, delta, epsilon_budget (README,
                                      # "Differential privacy"; workloads.dp_sgd)
    [privacy]                         # the root: mechanism = "central", noise_multiplier,
                                      # clip, delta, epsilon_budget, accountant (README,
                                      # "Differential privacy"; federation.privacy)
    [evaluation]                      # the root: every = N (sites evaluate every N-th version),
                                      # min_sites; [[analytics]] name, dataset_tag, columns,
                                      # bins, bounds, min_cell (README, "Federated evaluation
                                      # and statistics"; runtime.reports)
    [governance]                      # sites: require_approval (runtime.governance)

Aggregators (``region``, ``root``) have ``[listen]`` (host, port) and ``children``, and may
declare ``[subtrees]`` (region child id = [its site ids]): that region's forwards are then
checked against its sites and each site update is counted once, whichever region (a
standby) delivers it (``algorithms.incorporation``); a region and its standby are both
listed as children and given the same subtree, and both set ``[failover] has_standby =
true`` (each keeps the deltas of its unsettled forwards, to rebuild one the root refuses
for site updates the other delivered). Gossip
peers have ``[[peers]]`` (id, url optional, weight optional) and may listen. A peer that
does not listen reaches the neighbours that have no url (and do not listen either)
through ``[relay]`` (id, url): a ``role = "relay"`` daemon, which only listens. Relative paths
are relative to the config file. Every mistake raises ``ConfigError`` naming the field
and what to write instead; unknown fields are refused with a did-you-mean hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedloom.algorithms.incorporation import (
    DEFAULT_FAILOVER_AFTER_S,
    DEFAULT_MAX_HELD,
    MAX_HELD_LIMIT,
)
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.factory import DEFAULT_LINK_DOWN_AFTER_S
from fedloom.federation.params import (
    ALGORITHMS,
    AlgorithmConfig,
    CodecConfig,
    TrainingConfig,
    read_algorithm,
    read_codec,
    read_training,
)
from fedloom.federation.privacy import NO_PRIVACY, PrivacyConfig, read_privacy
from fedloom.federation.secagg_params import (
    SecureAggregationConfig,
    check_codec,
    read_secure_aggregation,
)
from fedloom.runtime.governance import NO_GOVERNANCE, GovernanceConfig, read_governance
from fedloom.runtime.reports import NO_REPORTS, ReportsConfig, read_reports
from fedloom.transport.channel import (
    DEFAULT_GATE_HANDSHAKE_TIMEOUT_S,
    DEFAULT_MAX_PENDING,
    OFFLOAD_MODES,
)
from fedloom.transport.identity import IdentityError, check_node_id, parse_key
from fedloom.transport.records import CIPHERS, available_ciphers, unavailable
from fedloom.workloads.dp_sgd import DpSgdConfig, check_model, read_dp_sgd
from fedloom.workloads.workload import DATASET_NAMES

ROLES = ("site", "region", "root", "peer", "relay")
AGGREGATORS = ("region", "root")
EXECUTORS = ("thread", "process")
_WORKLOAD_KEYS = frozenset(
    (
        "dataset",
        "model",
        "hidden",
        "n_sites",
        "seed",
        "eval_sites",
        "cache_size",
        "alpha",
        "beta",
        "iid",
        "samples_per_site",
        "max_samples_per_site",
        "dirichlet_alpha",
        "test_fraction",
        "min_samples_per_site",
    )
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A neighbour: its roster id and, when it accepts connections, its URL."""

    id: str
    url: str | None = None
    weight: float | None = None  # gossip mixing weight (None: the daemon decides)


@dataclass(frozen=True, slots=True)
class PlanConfig:
    """The training plan: a built-in workload (``workload``: ``workloads.workload``'s table,
    ``site_index``: this node's share), ``factory`` ("module:callable") with ``args``, or
    ``kind = "tabular"`` (``tabular``: ``workloads.tabular``; a site's registered table,
    found through the dataset registry in ``state_dir``: None where the node has no data)."""

    workload: Mapping[str, Any] | None = None
    site_index: int | None = None
    factory: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    tabular: Any = None  # workloads.tabular.TabularSpec
    state_dir: Path | None = None


MAX_SESSION_S = 30 * 86400.0  # a month: a revoked key must not keep a session for longer
RELAY_MESSAGE_MIB = 256.0  # a relay's cap on one envelope unless [connection] says otherwise
MAX_MESSAGE_MIB = 2048.0  # the decoders' own ceiling (``transport.limits.Limits``)
MAX_OUTBOX_MIB = float(1 << 24)  # 16 TiB: any real disk; refuses inf


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    keepalive_s: float = 10.0
    down_after_s: float = DEFAULT_LINK_DOWN_AFTER_S  # the simulator's links use it too
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    # Record ciphers to offer and accept, preferred first; None: all of them, the
    # fastest on this CPU first (``transport.records.preferred_ciphers``).
    ciphers: tuple[str, ...] | None = None
    # Where records are sealed/opened: "auto" (cheap AEGIS records on the event loop) or
    # "pool" (every large record in the thread pool; for machines with cores to spare).
    offload: str = "auto"
    # A session's maximum lifetime: then it closes between two messages and the dialler
    # reconnects with a fresh handshake against the current roster (revocation backstop).
    max_session_s: float = 3600.0
    # A listening node's admission of unauthenticated connections: how long a handshake
    # may take, how many may be in progress, and how many of those from one source
    # address (None: max_pending // 8), so that one host's idle connections cannot keep
    # the roster's sites out (``transport.channel.GateLimits``).
    handshake_timeout_s: float = DEFAULT_GATE_HANDSHAKE_TIMEOUT_S
    max_pending: int = DEFAULT_MAX_PENDING
    max_pending_per_address: int | None = None
    # A relay holds no model to derive its decode caps from (other nodes do, see
    # ``transport.limits.Limits.for_model``): the largest envelope it takes, in MiB.
    max_message_mib: float | None = None


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    kind: str = "thread"
    workers: int = 1


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """A validated daemon configuration (see the module docstring)."""

    role: str
    node_id: str
    state_dir: Path
    identity_key: Path
    roster_path: Path
    # The trusted consortium public key: given inline, or read from consortium_key_file
    # (read when the files are checked; see ``read_consortium_key``).
    consortium_key: bytes | None
    consortium_key_file: Path | None = None
    seed: int = 0
    listen: tuple[str, int] | None = None
    parent: Endpoint | None = None
    children: tuple[str, ...] = ()
    peers: tuple[Endpoint, ...] = ()
    relay: Endpoint | None = None
    plan: PlanConfig | None = None
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(lr=0.05, local_steps=5, batch_size=10, mu=0.0)
    )
    algorithm: str = "fedbuff"
    aggregation: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    codec: CodecConfig = field(
        default_factory=lambda: CodecConfig(up="fp32", down="fp32", topk_fraction=0.01)
    )
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no metrics endpoint
    # Sites and regions: updates waiting for the parent's ack, in MiB of tensors, beyond
    # which no new task is dispatched (region) or training started (site). None:
    # ``algorithms.outbox.DEFAULT_OUTBOX_UPDATES`` updates' worth of the model.
    outbox_max_mib: float | None = None
    source: Path | None = None
    # Failover (sites): the parent's standbys, how long the parent may be down before the
    # site switches, and how many acked updates it keeps until they are settled.
    fallbacks: tuple[Endpoint, ...] = ()
    failover_after_s: float = DEFAULT_FAILOVER_AFTER_S
    max_held: int = DEFAULT_MAX_HELD
    # Regions: ``[failover] has_standby``, keep forwards' parts for a rebuild.
    has_standby: bool = False
    # Aggregators: region child -> the sites under it (``[subtrees]``).
    subtrees: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # ``[secure_aggregation]`` (federation.secagg_params): a site with it sends no plain
    # update; an aggregator with it takes none from its sites.
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    # ``[dp_sgd]`` (workloads.dp_sgd): a site trains with DP-SGD and keeps a privacy ledger.
    dp_sgd: DpSgdConfig | None = None
    # ``[privacy]`` (federation.privacy): a root's central DP, ledger and budget.
    privacy: PrivacyConfig = NO_PRIVACY
    # ``[evaluation]``, ``[[analytics]]`` (runtime.reports): federated evaluation, statistics.
    reports: ReportsConfig = NO_REPORTS
    # ``[governance]`` (runtime.governance): whether a site trains only approved plans.
    governance: GovernanceConfig = NO_GOVERNANCE

    @property
    def is_aggregator(self) -> bool:
        return self.role in AGGREGATORS

    def read_consortium_key(self) -> bytes:
        """The consortium public key (reading ``consortium_key_file`` if that is how it
        was given); ``ConfigError`` naming the field when it cannot be read."""
        if self.consortium_key is not None:
            return self.consortium_key
        assert self.consortium_key_file is not None
        return _read_key_file(self.consortium_key_file)


def load_config(path: str | Path, *, check_files: bool = True) -> DaemonConfig:
    """Read and validate a daemon config file (``ConfigError`` on any mistake)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the config file ({exc})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    # Another fedloom file given as --config (they sit side by side): say so, rather than
    # "role: required field is missing" about a file the operator did not mean to give.
    other = "a node identity" if "private_key" in raw else None
    if "role" not in raw and "nodes" in raw:
        other = "a roster"
    if other is not None:
        raise ConfigError(f"{p}: {other}, not a daemon config (give the node's own config file)")
    return parse_config(raw, base_dir=p.parent, check_files=check_files, source=p)


def _require_switch(t: Table, switch: str, settings: list[str], fix: str) -> None:
    """A ``[privacy]`` or ``[secure_aggregation]`` table with settings but no switch: its
    default (off) would ignore them, so a node its operator believed private would send
    plain updates or accept any seal's noise. (A scenario arm may inherit a shared table
    without a switch; a daemon config is its own.)"""
    if not t.has(switch):
        for key in (k for k in settings if t.has(k)):
            raise ConfigError(f"{t.where(key)}: written without {switch}, so ignored: write {fix}")


def parse_config(
    raw: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    check_files: bool = False,
    source: Path | None = None,
) -> DaemonConfig:
    """Validate a parsed TOML document; relative paths are resolved against ``base_dir``."""
    base = base_dir if base_dir is not None else Path.cwd()
    t = Table(raw, "")
    role = t.text("role", choices=ROLES)
    node_id = _node_id(t)
    seed = t.integer("seed", 0, min=0)
    state_dir = _path(t, "state_dir", base)
    if state_dir.resolve() == Path(state_dir.anchor or "/").resolve():
        # A daemon writes its lock, checkpoints, logs and audit log into it.
        raise ConfigError(
            f"{t.where('state_dir')}: {state_dir} is the file system's root; give the node a "
            "directory of its own (e.g. /var/lib/fedloom)"
        )

    ident = t.table("identity")
    if not t.has("identity"):
        raise ConfigError(
            "identity.key: required field is missing (create a key with "
            f"`fedloom keygen --id {node_id} --role {role} --out DIR`)"
        )
    identity_key = _path(ident, "key", base)
    ident.finish()

    roster_t = t.table("roster")
    if not t.has("roster"):
        raise ConfigError(
            "roster.path: required field is missing (the consortium's signed roster file)"
        )
    roster_path = _path(roster_t, "path", base)
    consortium_key, consortium_key_file = _consortium_key(roster_t, base)
    roster_t.finish()

    listen = _listen(t) if t.has("listen") else None
    t.table("listen")  # mark seen even when absent
    failover: dict[str, Any] = {}
    parent = _parent(t.table("parent"), failover) if t.has("parent") else None
    subtrees = _subtrees(t.table("subtrees"))
    failover_t = t.table("failover")
    has_standby = failover_t.flag("has_standby", False)
    failover_t.finish()
    children = tuple(_ids(t, "children"))
    peers = tuple(_peers(t, node_id))
    relay = _endpoint(t.table("relay"), url_required=True) if t.has("relay") else None
    t.table("relay")  # mark seen even when absent
    data_dir = state_dir if role in ("site", "peer") else None  # its registered datasets
    plan = _plan(t.table("plan"), data_dir) if t.has("plan") else None
    training = read_training(t.table("training"))
    algorithm, aggregation = _aggregation(t.table("aggregation"))
    codec = read_codec(t.table("codec"))
    connection = _connection(t.table("connection"))
    executor = _executor(t.table("executor"))
    metrics = t.table("metrics")
    metrics_host = metrics.text("host", "127.0.0.1")
    metrics_port = metrics.integer("port", 0, min=0, max=65535)
    metrics.finish()
    if listen is not None and metrics_port and metrics_port == listen[1]:
        # Two sockets on one port fail to bind at every restart (exit 1): say it here.
        wildcard = {"0.0.0.0", "::", ""}
        if metrics_host == listen[0] or metrics_host in wildcard or listen[0] in wildcard:
            raise ConfigError(
                f"metrics.port: {metrics_port} is listen.port too; give the metrics endpoint "
                "a port of its own"
            )
    outbox = t.table("outbox")
    outbox_max_mib = outbox.number("max_mib", None, min=0.0, max=MAX_OUTBOX_MIB, exclusive_min=True)
    outbox.finish()
    secagg_t, privacy_t = t.table("secure_aggregation"), t.table("privacy")
    _require_switch(
        secagg_t,
        "enabled",
        [f.name for f in fields(SecureAggregationConfig)],
        "enabled = true to mask updates (or enabled = false)",
    )
    _require_switch(
        privacy_t,
        "mechanism",
        ["noise_multiplier", "clip", "delta", "accountant"],
        'mechanism = "central" (or mechanism = "none")',
    )
    secagg = read_secure_aggregation(secagg_t)
    dp_sgd = read_dp_sgd(t.table("dp_sgd")) if t.has("dp_sgd") else None
    privacy = read_privacy(privacy_t)
    reports = read_reports(t.table("evaluation"), t.array("analytics", []), role, privacy)
    governance = read_governance(t.table("governance"))
    t.finish()
    if privacy.enabled and role not in ("root", "region", "site"):
        raise ConfigError(
            f"privacy.mechanism: central DP is the root's (it keeps the ledger); remove "
            f"[privacy] for a {role}"
        )
    if privacy.enabled and role != "root" and not secagg.enabled:
        # Under secure aggregation a region seals its cohorts with the members' noise and
        # a site refuses seals with less noise than its z (federation.factory).
        raise ConfigError(
            f"privacy.mechanism: central DP is the root's (it adds the noise and keeps the "
            f"ledger); a {role}'s [privacy] only sets the noise its secure-aggregation "
            "cohorts carry: enable [secure_aggregation] or remove [privacy]"
            + (" (a site's own record-level DP is [dp_sgd])" if role == "site" else "")
        )
    if t.has("governance") and role not in ("site", "peer"):
        # Only a node that trains on its own data enforces it: elsewhere it was read and
        # ignored, while its operator believed it bound the sites below.
        raise ConfigError(
            f"governance: a {role} holds no data and enforces no approval or noise floor "
            "for the sites below it; put [governance] in each site's config"
        )
    if dp_sgd is not None:
        _check_dp_sgd(role, plan)
    _check_federated_scaler(role, plan, aggregation, secagg.enabled, privacy.enabled)
    if secagg.enabled:
        check_codec(codec)  # the cohort's size is checked with the children's roles (factory)

    cfg = DaemonConfig(
        role=role,
        node_id=node_id,
        state_dir=state_dir,
        identity_key=identity_key,
        roster_path=roster_path,
        consortium_key=consortium_key,
        consortium_key_file=consortium_key_file,
        seed=seed,
        listen=listen,
        parent=parent,
        children=children,
        peers=peers,
        relay=relay,
        plan=plan,
        training=training,
        algorithm=algorithm,
        aggregation=aggregation,
        codec=codec,
        connection=connection,
        executor=executor,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        outbox_max_mib=outbox_max_mib,
        source=source,
        subtrees=subtrees,
        has_standby=has_standby,
        secure_aggregation=secagg,
        dp_sgd=dp_sgd,
        privacy=privacy,
        reports=reports,
        governance=governance,
        **failover,
    )
    _check_role(cfg)
    if check_files:
        _check_files(cfg)
        cfg = dataclasses.replace(cfg, consortium_key=cfg.read_consortium_key())
    return cfg


# --------------------------------------------------------------------------- sections


def _node_id(t: Table) -> str:
    value = t.text("node_id")
    try:
        return check_node_id(value)
    except IdentityError as exc:
        raise ConfigError(f"node_id: {exc}") from None


def _path(t: Table, key: str, base: Path) -> Path:
    value = t.text(key)
    if not value.strip():
        raise ConfigError(f"{t.where(key)}: expected a path, got an empty string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _consortium_key(t: Table, base: Path) -> tuple[bytes | None, Path | None]:
    given = [k for k in ("consortium_key", "consortium_key_file") if t.has(k)]
    if len(given) != 1:
        which = "both" if given else "neither"
        raise ConfigError(
            f"{t.where('consortium_key')}: give the consortium public key once, either as "
            f'consortium_key = "<base64>" or consortium_key_file = "PATH" (found {which})'
        )
    if given[0] == "consortium_key_file":
        return None, _path(t, "consortium_key_file", base)
    try:
        return parse_key(t.text("consortium_key"), t.where("consortium_key")), None
    except IdentityError as exc:
        raise ConfigError(f"{exc} (the consortium's 32-byte Ed25519 public key)") from None


def _read_key_file(path: Path) -> bytes:
    where = f"roster.consortium_key_file ({path})"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read ({exc})") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise ConfigError(f"{where}: expected one line holding the base64 public key")
    try:
        return parse_key(lines[0].split()[-1], where)  # a keygen .pub line: "<id> <role> <key>"
    except IdentityError as exc:
        raise ConfigError(f"{exc} (the consortium's 32-byte Ed25519 public key)") from None


def _listen(t: Table) -> tuple[str, int]:
    lt = t.table("listen")
    host = lt.text("host", "0.0.0.0")
    port = lt.integer("port", min=0, max=65535)
    lt.finish()
    return host, port


def _check_url(t: Table, key: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(
            f"{t.where(key)}: expected a WebSocket URL like ws://host:port/fedloom, got {url!r}"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(f"{t.where(key)}: bad port in {url!r}") from None
    return url


def _endpoint(t: Table, *, url_required: bool) -> Endpoint:
    node = t.text("id")
    try:
        check_node_id(node)
    except IdentityError as exc:
        raise ConfigError(f"{t.where('id')}: {exc}") from None
    url = t.text("url") if url_required else t.text("url", None)
    if url is not None:
        _check_url(t, "url", url)
    weight = t.number("weight", None, min=0.0, exclusive_min=True)
    t.finish()
    return Endpoint(node, url, weight)


def _parent(t: Table, failover: dict[str, Any]) -> Endpoint:
    """``[parent]`` and, for sites, its failover keys (written into ``failover``)."""
    fallbacks: list[Endpoint] = []
    for i, raw in enumerate(t.array("fallback", [])):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{t.where('fallback')}[{i}]: expected a table with id and url")
        fallbacks.append(_endpoint(Table(raw, f"parent.fallback[{i}]"), url_required=True))
    if fallbacks:
        failover["fallbacks"] = tuple(fallbacks)
    if t.has("failover_after_s"):
        failover["failover_after_s"] = t.number("failover_after_s", min=0.0, exclusive_min=True)
    if t.has("max_held"):
        failover["max_held"] = t.integer("max_held", min=1, max=MAX_HELD_LIMIT)
    parent = _endpoint(t, url_required=True)
    ids = [parent.id, *(f.id for f in fallbacks)]
    if len(set(ids)) != len(ids):
        dup = next(v for v in ids if ids.count(v) > 1)
        raise ConfigError(f"parent.fallback: {dup!r} is listed twice (parent and fallbacks)")
    return parent


def _subtrees(t: Table) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for region in list(t._data):
        try:
            check_node_id(region)
        except IdentityError as exc:
            raise ConfigError(f"{t.where(region)}: {exc}") from None
        out[region] = tuple(_ids(t, region))
    return out


def _ids(t: Table, key: str) -> list[str]:
    values = t.array(key, [])
    for i, v in enumerate(values):
        try:
            check_node_id(v)
        except IdentityError as exc:
            raise ConfigError(f"{t.where(key)}[{i}]: {exc}") from None
    if len(set(values)) != len(values):
        dup = next(v for v in values if values.count(v) > 1)
        raise ConfigError(f"{t.where(key)}: {dup!r} is listed twice")
    return list(values)


def _peers(t: Table, node_id: str) -> list[Endpoint]:
    out: list[Endpoint] = []
    for i, raw in enumerate(t.array("peers", [])):
        out.append(_endpoint(Table(raw, f"peers[{i}]"), url_required=False))
    ids = [p.id for p in out]
    if node_id in ids:
        raise ConfigError(f"peers[{ids.index(node_id)}].id: a node cannot be its own peer")
    if len(set(ids)) != len(ids):
        dup = next(v for v in ids if ids.count(v) > 1)
        raise ConfigError(f"peers: {dup!r} is listed twice")
    return out


def _plan(t: Table, state_dir: Path | None = None) -> PlanConfig:
    if t.has("kind"):
        # A site's own registered table (``fedloom dataset add``); no Python.
        from fedloom.workloads.tabular import read_tabular

        spec = read_tabular(t)
        t.finish()
        return PlanConfig(tabular=spec, state_dir=state_dir)
    if t.has("factory"):
        factory = t.text("factory")
        module, sep, attr = factory.partition(":")
        if not sep or not module or not attr:
            raise ConfigError(
                f'{t.where("factory")}: expected "module:callable" '
                f'(e.g. "mypkg.train:make_client"), got {factory!r}'
            )
        args = dict(t.table("args")._data)
        clash = sorted(k for k in t._data if k in _WORKLOAD_KEYS or k == "site_index")
        if clash:
            raise ConfigError(
                f"{t.where(clash[0])}: a plan with a factory takes its settings from "
                "plan.args; remove this field or the factory"
            )
        t.finish()
        return PlanConfig(factory=factory, args=args)
    if not t.has("dataset"):
        raise ConfigError(
            f"{t.where('dataset')}: required field is missing: give a built-in data set "
            f'({", ".join(DATASET_NAMES)}), factory = "module:callable" or kind = "tabular" '
            "(a registered table: fedloom dataset add)"
        )
    t.text("dataset", choices=DATASET_NAMES)
    n_sites = t.integer("n_sites", min=1)
    site_index = t.integer("site_index", None, min=0)
    if site_index is not None and site_index >= n_sites:
        raise ConfigError(
            f"{t.where('site_index')}: {site_index} is out of range for n_sites = {n_sites} "
            f"(use 0 .. {n_sites - 1})"
        )
    workload = {k: t.raw(k) for k in t._data if k in _WORKLOAD_KEYS}
    t.finish()
    # The workload reader checks types, ranges and dataset-specific fields.
    from fedloom.workloads.workload import from_config

    try:
        from_config(workload)
    except ValueError as exc:
        raise ConfigError(f"{t.where('')[:-1] or 'plan'}.{exc}") from None
    return PlanConfig(workload=workload, site_index=site_index)


def _aggregation(t: Table) -> tuple[str, AlgorithmConfig]:
    algorithm = t.text("algorithm", "fedbuff", choices=ALGORITHMS)
    params = {k: v for k, v in t._data.items() if k != "algorithm"}
    return algorithm, read_algorithm(Table(params, t.where("").rstrip(".")), algorithm)


def _connection(t: Table) -> ConnectionConfig:
    d = ConnectionConfig()
    cfg = ConnectionConfig(
        keepalive_s=t.number("keepalive_s", d.keepalive_s, min=0.0, exclusive_min=True),
        down_after_s=t.number("down_after_s", d.down_after_s, min=0.0, exclusive_min=True),
        backoff_base_s=t.number("backoff_base_s", d.backoff_base_s, min=0.0, exclusive_min=True),
        backoff_cap_s=t.number("backoff_cap_s", d.backoff_cap_s, min=0.0, exclusive_min=True),
        ciphers=_ciphers(t),
        offload=t.text("offload", d.offload, choices=OFFLOAD_MODES),
        max_session_s=t.number(
            "max_session_s", d.max_session_s, min=0.0, max=MAX_SESSION_S, exclusive_min=True
        ),
        handshake_timeout_s=t.number(
            "handshake_timeout_s", d.handshake_timeout_s, min=0.0, max=60.0, exclusive_min=True
        ),
        max_pending=t.integer("max_pending", d.max_pending, min=1),
        max_pending_per_address=t.integer("max_pending_per_address", None, min=1),
        max_message_mib=t.number(
            "max_message_mib", None, min=0.0, max=MAX_MESSAGE_MIB, exclusive_min=True
        ),
    )
    if cfg.max_pending_per_address is not None and cfg.max_pending_per_address > cfg.max_pending:
        raise ConfigError(
            f"{t.where('max_pending_per_address')}: must be <= max_pending ({cfg.max_pending})"
        )
    if cfg.down_after_s <= cfg.keepalive_s:
        raise ConfigError(
            f"{t.where('down_after_s')}: must exceed keepalive_s ({cfg.keepalive_s}); "
            "an idle but live peer only sends keep-alives (3-5x keepalive_s is typical)"
        )
    if cfg.backoff_cap_s < cfg.backoff_base_s:
        raise ConfigError(
            f"{t.where('backoff_cap_s')}: must be >= backoff_base_s ({cfg.backoff_base_s})"
        )
    t.finish()
    return cfg


def _ciphers(t: Table) -> tuple[str, ...] | None:
    names = t.array("ciphers", None)
    if names is None:
        return None
    if not names:
        raise ConfigError(f"{t.where('ciphers')}: name at least one of {', '.join(CIPHERS)}")
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in CIPHERS:
            hint = difflib.get_close_matches(str(name), CIPHERS, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{t.where('ciphers')}[{i}]: {name!r} is not one of {', '.join(CIPHERS)}{extra}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"{t.where('ciphers')}: a cipher is named twice")
    if not set(names) & set(available_ciphers()):  # else ChannelOptions raised, exit 1
        why = "; ".join(f"{name}: {unavailable(name)}" for name in names)
        raise ConfigError(f"{t.where('ciphers')}: none of them can be used here ({why})")
    return tuple(names)


def _executor(t: Table) -> ExecutorConfig:
    cfg = ExecutorConfig(
        kind=t.text("kind", "thread", choices=EXECUTORS),
        workers=t.integer("workers", 1, min=1, max=256),
    )
    t.finish()
    return cfg


# --------------------------------------------------------------------------- checks


def _check_federated_scaler(
    role: str, plan: PlanConfig | None, agg: AlgorithmConfig, secagg: bool, dp: bool
) -> None:
    """A tabular plan's federated scaler (``workloads.tabular``) is raw-unit moments in the
    update: anything bounding the whole delta shrinks it and the model's update with it."""
    spec = plan.tabular if plan is not None else None
    if spec is None or spec.standardize != "federated" or role not in ("root", "region"):
        return
    if agg.clip_norm is not None:
        field_ = "aggregation.clip_norm"
        fix = 'set clip_norm = "off" in [aggregation]'
    elif agg.server_optimizer != "sgd" or agg.server_momentum > 0:
        # The scaler jumps to its target in one plain step; momentum or an adaptive step
        # overshoots it, and with stale deltas it diverges.
        field_ = "aggregation.server_optimizer/server_momentum"
        fix = 'use server_optimizer = "sgd" with server_momentum = 0'
    elif secagg or dp:
        field_ = "secure_aggregation.enabled" if secagg else "privacy.mechanism"
        fix = "remove it"
    else:
        return
    raise ConfigError(
        f'plan.standardize: "federated" carries raw-unit feature moments in every update, '
        f"which {field_} cannot carry (it shrinks or overshoots them): {fix}, or write "
        'standardize = "declared" with [plan.declared_scaling] col = [mean, std]'
    )


def _check_dp_sgd(role: str, plan: PlanConfig | None) -> None:
    """``[dp_sgd]`` needs a site training a built-in torch model."""
    if role != "site":
        raise ConfigError(f"dp_sgd: only a site trains with DP-SGD; remove [dp_sgd] for a {role}")
    if plan is None or plan.workload is None:
        raise ConfigError(
            "dp_sgd: needs a built-in [plan] workload with a torch model (a plan.factory "
            "trains itself and cannot be made private here)"
        )
    check_model(str(plan.workload.get("model", "softmax")), "dp_sgd")


def _check_role(cfg: DaemonConfig) -> None:
    role = cfg.role
    if role in ("site", "region") and cfg.parent is None:
        raise ConfigError(
            f'parent: required for a {role}: add [parent] with id = "..." and '
            'url = "ws://host:port/fedloom"'
        )
    if role in ("root", "peer") and cfg.parent is not None:
        raise ConfigError(f"parent: a {role} has no parent; remove the [parent] table")
    if role == "site" and cfg.listen is not None:
        raise ConfigError(
            "listen: sites only dial out (hospital firewalls); remove the [listen] table"
        )
    if role in AGGREGATORS:
        if cfg.listen is None:
            raise ConfigError(
                f"listen: required for a {role}: add [listen] with port = N (and host)"
            )
        if not cfg.children:
            raise ConfigError(
                f"children: required for a {role}: list the ids of the nodes it aggregates"
            )
        if cfg.node_id in cfg.children:
            raise ConfigError("children: a node cannot be its own child")
        unknown = [r for r in cfg.subtrees if r not in cfg.children]
        if unknown:
            raise ConfigError(
                f"subtrees.{unknown[0]}: not one of children; a subtree names the sites under "
                "a region child (list the region and its standby in children)"
            )
    elif cfg.children:
        raise ConfigError(f"children: only aggregators have children; remove it for a {role}")
    elif cfg.subtrees:
        raise ConfigError(f"subtrees: only aggregators have subtrees; remove it for a {role}")
    if role != "site" and (cfg.fallbacks or cfg.failover_after_s != DEFAULT_FAILOVER_AFTER_S):
        raise ConfigError(
            "parent.fallback: only sites fail over to a standby parent; remove "
            "[[parent.fallback]] and failover_after_s"
        )
    if cfg.has_standby and role != "region":
        raise ConfigError(
            f"failover.has_standby: only a region (and its standby) sets it; remove it for a {role}"
        )
    if cfg.node_id in {f.id for f in cfg.fallbacks}:
        raise ConfigError("parent.fallback: a node cannot be its own parent")
    if role == "peer":
        if not cfg.peers:
            raise ConfigError("peers: a gossip peer needs at least one [[peers]] entry")
        unreachable = [p.id for p in cfg.peers if p.url is None] if cfg.listen is None else []
        if unreachable and cfg.relay is None:
            raise ConfigError(
                f"peers: this peer does not listen and {unreachable[:3]} have no url, so "
                "neither side can connect; add [listen], a url to those peers, or a [relay] "
                'with id = "..." and url = "ws://host:port/fedloom" that both sides use'
            )
        if cfg.relay is not None and not unreachable:
            raise ConfigError(
                "relay: every peer is reached directly (this node listens, or each peer has "
                "a url); remove the [relay] table"
            )
        if cfg.relay is not None and cfg.relay.id in {p.id for p in cfg.peers}:
            raise ConfigError(f"relay.id: {cfg.relay.id!r} is also listed in [[peers]]")
    elif cfg.peers:
        raise ConfigError(f"peers: only gossip peers have [[peers]]; remove them for a {role}")
    elif cfg.relay is not None:
        raise ConfigError(f"relay: only gossip peers use a relay; remove it for a {role}")
    if role == "relay":
        if cfg.listen is None:
            raise ConfigError("listen: required for a relay: add [listen] with port = N")
        if cfg.plan is not None:
            raise ConfigError("plan: a relay neither trains nor evaluates; remove [plan]")
    elif cfg.connection.max_message_mib is not None:
        raise ConfigError(
            "connection.max_message_mib: only a relay takes it; every other node caps "
            "what it decodes from the size of its model"
        )
    if cfg.outbox_max_mib is not None and role not in ("site", "region"):
        raise ConfigError(
            f"outbox.max_mib: only sites and regions send updates to a parent; remove "
            f"[outbox] for a {role}"
        )
    if role in ("site", "peer", "root") and cfg.plan is None:
        what = "train" if role != "root" else "build the initial model"
        raise ConfigError(
            f"plan: a {role} needs a training plan to {what}: add [plan] with dataset = ... "
            'or factory = "module:callable"'
        )
    plan = cfg.plan
    if (
        plan is not None
        and plan.workload is not None
        and role in ("site", "peer")
        and plan.site_index is None
    ):
        raise ConfigError(
            f"plan.site_index: required for a {role} using a built-in data set "
            "(which share of the data this node holds, 0 .. n_sites-1)"
        )


def _check_files(cfg: DaemonConfig) -> None:
    # A directory is there: "not found" would send the operator looking for it.
    if cfg.identity_key.is_dir():
        raise ConfigError(
            f"identity.key: {cfg.identity_key} is a directory; point it at the key file "
            f"(e.g. {cfg.identity_key / cfg.node_id}.key, which `fedloom keygen` writes)"
        )
    if cfg.roster_path.is_dir():
        raise ConfigError(
            f"roster.path: {cfg.roster_path} is a directory; point it at the signed roster file"
        )
    if not cfg.identity_key.is_file():
        raise ConfigError(
            f"identity.key: {cfg.identity_key} not found (create it with `fedloom keygen "
            f"--id {cfg.node_id} --role {cfg.role} --out DIR`)"
        )
    if not cfg.roster_path.is_file():
        raise ConfigError(
            f"roster.path: {cfg.roster_path} not found (the consortium signs it with "
            "`fedloom roster sign`)"
        )
