"""Prometheus metrics for one daemon: the sink for the node's ``Metric`` effects.

``MetricsSink`` is the ``metrics`` callable the asyncio driver hands every ``Metric`` effect
to, plus the few methods the daemon calls itself (connected peers, bytes, link round-trip,
readiness, identity). Every sink owns its own ``CollectorRegistry`` (never the global one),
so tests and several daemons in one process do not share series.

Well-known names (``algorithms.protocol.Metric``) map to named collectors, e.g.
``update_applied`` -> ``fedloom_updates_applied_total{src}`` plus the staleness histogram
``fedloom_update_staleness`` (the effect's value is the staleness). Any other name becomes
a generic collector ``fedloom_node_<sanitised name>``: a gauge when the name reads like a
level (``*_version``, ``*_fill``, ``*_size``, ...), a counter of the values otherwise.
Observability must never take the node down, so odd input (a label set that changes, a
negative counter increment, NaN) is dropped and counted in
``fedloom_metric_errors_total{reason}``, never raised.

High-cardinality labels (``seq``, ``job``, ``update_id``) are always dropped; per-source
labels (``src``, ``site``, ``peer``) are kept unless ``per_source=False`` (an aggregator
with thousands of sites).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

from fedloom.algorithms.protocol import Metric

__all__ = [
    "LINK_RTT_BUCKETS",
    "NAMESPACE",
    "STALENESS_BUCKETS",
    "HealthSnapshot",
    "MetricsSink",
    "sanitise_label_name",
    "sanitise_metric_name",
]

_log = logging.getLogger(__name__)

NAMESPACE = "fedloom"
# Staleness counts model versions: small integers, with a long tail under churn.
STALENESS_BUCKETS: tuple[float, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
# Loopback is ~0.1 ms, a continent ~0.1 s, a congested hospital uplink seconds.
LINK_RTT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_DROPPED_LABELS = frozenset({"seq", "job", "update_id"})  # one series per update: unbounded
_SOURCE_LABELS = frozenset({"src", "site", "peer"})
_GAUGE_SUFFIXES = ("_version", "_fill", "_size", "_gauge", "_level", "_ratio", "_peers", "_round")
_UNKNOWN_PREFIX = f"{NAMESPACE}_node_"  # keeps generic names apart from the named collectors

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


def sanitise_metric_name(name: str) -> str:
    """A valid Prometheus metric name made from ``name`` (bad characters become ``_``)."""
    out = _NAME_BAD.sub("_", name.strip()) or "unnamed"
    return f"_{out}" if out[0].isdigit() else out


def sanitise_label_name(name: str) -> str:
    """A valid Prometheus label name (``__`` is reserved for Prometheus itself)."""
    out = _LABEL_BAD.sub("_", name.strip()) or "label"
    if out[0].isdigit():
        out = f"_{out}"
    return f"l{out}" if out.startswith("__") else out


class _Op(Enum):
    COUNT = "count"  # counter += 1 (the value means something else, e.g. staleness)
    SUM = "sum"  # counter += value
    SET = "set"  # gauge = value
    OBSERVE = "observe"  # histogram.observe(value)


@dataclass(frozen=True, slots=True)
class _Rule:
    op: _Op
    name: str  # without the namespace; counters without "_total"
    doc: str
    labels: tuple[str, ...] = ()


def _rules() -> dict[str, tuple[_Rule, ...]]:
    count, total, gauge = _Op.COUNT, _Op.SUM, _Op.SET
    return {
        "update_applied": (
            _Rule(count, "updates_applied", "Updates applied to the model.", ("src",)),
            _Rule(_Op.OBSERVE, "update_staleness", "Staleness (versions) of applied updates."),
        ),
        "update_duplicate": (
            _Rule(count, "updates_duplicate", "Updates received again and ignored.", ("src",)),
        ),
        "update_rejected": (
            _Rule(total, "updates_rejected", "Updates rejected, by reason.", ("reason",)),
        ),
        "message_rejected": (
            _Rule(total, "messages_rejected", "Messages rejected, by reason.", ("reason",)),
        ),
        "update_stale": (_Rule(count, "updates_stale", "Updates dropped as too stale.", ("src",)),),
        "update_late": (
            _Rule(count, "updates_late", "Updates that arrived after their round.", ("src",)),
        ),
        "update_clipped": (_Rule(count, "updates_clipped", "Updates norm-clipped.", ("src",)),),
        "update_deferred": (
            _Rule(count, "updates_deferred", "Updates deferred to a later flush.", ("src",)),
        ),
        "update_discarded": (
            _Rule(count, "updates_discarded", "Buffered updates discarded.", ("src",)),
        ),
        "job_timeout": (_Rule(count, "job_timeouts", "Training jobs that timed out.", ("site",)),),
        "train_failed": (_Rule(count, "train_failures", "Local training jobs that failed."),),
        "peer_suspected": (_Rule(count, "peers_suspected", "Peers suspected.", ("peer",)),),
        "peer_pruned": (_Rule(count, "peers_pruned", "Peers pruned as dead.", ("peer",)),),
        "peer_readmitted": (_Rule(count, "peers_readmitted", "Peers readmitted.", ("peer",)),),
        "round_started": (_Rule(gauge, "round", "Current synchronous round."),),
        "round_closed": (
            _Rule(count, "rounds_closed", "Rounds closed, by reason.", ("reason",)),
            _Rule(gauge, "round_updates", "Updates aggregated in the last closed round."),
        ),
        "round_abandoned": (_Rule(count, "rounds_abandoned", "Rounds abandoned."),),
        "round_degraded": (
            _Rule(count, "rounds_degraded", "Rounds started below min_available (sites down)."),
        ),
        "root_behind_children": (
            _Rule(
                gauge,
                "root_behind_children",
                "Versions a region child's forwards are ahead of this root's model (the "
                "newest claim of a region that still makes it; 0: none): it lost its "
                "state (see fedloom state reseed).",
            ),
        ),
        "region_forward": (
            _Rule(count, "region_forwards", "Aggregates forwarded to the parent."),
            _Rule(total, "region_forwarded_updates", "Site updates inside forwarded aggregates."),
        ),
        "fedasync_history_miss": (
            _Rule(count, "fedasync_history_misses", "FedAsync base versions no longer kept."),
        ),
        "model_version": (_Rule(gauge, "model_version", "Version of the current model."),),
        "buffer_fill": (_Rule(gauge, "buffer_fill", "Updates waiting in the buffer."),),
        "relay_forwarded": (
            _Rule(count, "relay_forwarded", "Envelopes a relay passed on.", ("dst",)),
        ),
        "relay_dropped": (
            _Rule(count, "relay_dropped", "Envelopes for a peer not connected.", ("reason",)),
        ),
        "relay_rejected": (
            _Rule(count, "relay_rejected", "Messages a relay refused.", ("reason",)),
        ),
        "relay_peers": (_Rule(gauge, "relay_peers", "Peers connected to a relay."),),
        "duplicate_identity": (
            _Rule(
                total,
                "duplicate_identity",
                "Second sessions refused while the peer's first was live (one identity, "
                "two daemons), by peer.",
                ("peer",),
            ),
        ),
        "connection_refused": (
            _Rule(
                total,
                "connections_refused",
                "Connections refused before authentication, by reason.",
                ("reason",),
            ),
        ),
        # A site's or region's outbox towards its parent (``algorithms.outbox``).
        "outbox_updates": (_Rule(gauge, "outbox_updates", "Updates waiting for an ack."),),
        "outbox_bytes": (_Rule(gauge, "outbox_bytes", "Tensor bytes of the updates waiting."),),
        "outbox_in_flight": (
            _Rule(gauge, "outbox_in_flight", "Updates sent on the parent link, not yet acked."),
        ),
        "outbox_window": (
            _Rule(gauge, "outbox_window", "Updates the flow-control window lets fly at once."),
        ),
        "dispatch_paused": (
            _Rule(
                gauge,
                "dispatch_paused",
                "1 while a full outbox stops new tasks (a region) or training (a site).",
            ),
        ),
        "parent_up": (_Rule(gauge, "parent_up", "1 while the link to the parent is up."),),
        "parent_ack_age_seconds": (
            _Rule(
                gauge,
                "parent_ack_age_seconds",
                "Seconds since the parent last acked anything while updates wait (a "
                "reconnect does not reset it); 0 when none wait.",
            ),
        ),
        # Regional failover (``algorithms.incorporation``).
        "parent_failover": (
            _Rule(count, "parent_failovers", "Switches to a standby parent, by parent.", ("to",)),
        ),
        "forward_overlap": (
            _Rule(
                total,
                "forward_overlap_pairs",
                "Site updates in forwards refused as already taken, by region.",
                ("src",),
            ),
        ),
        "pairs_applied": (
            _Rule(
                total,
                "pairs_applied",
                "Site updates applied inside declared regions' forwards, by region.",
                ("src",),
            ),
        ),
        "held_updates": (
            _Rule(gauge, "held_updates", "Acked updates a site keeps until they are settled."),
        ),
        "forwards_kept": (
            _Rule(
                gauge, "forwards_kept", "Forwards a region keeps, with their parts, until settled."
            ),
        ),
        "forward_rebuilt": (
            _Rule(count, "forwards_rebuilt", "Forwards rebuilt without taken site updates."),
        ),
        "pairs_lost": (
            _Rule(total, "pairs_lost", "Site updates lost with a nested aggregate dropped."),
        ),
        # Record-level DP-SGD at a site (``workloads.dp_sgd``).
        "site_privacy_epsilon": (
            _Rule(
                gauge,
                "site_privacy_epsilon",
                "Privacy spent by this site's DP-SGD training: epsilon at the configured "
                "delta (Opacus RDP accountant over every job it trained).",
            ),
        ),
        "privacy_budget_refused": (
            _Rule(
                count,
                "privacy_budget_refusals",
                "Training jobs refused because they would pass the site's epsilon_budget.",
            ),
        ),
        # Central (user-level) DP at a root (``algorithms.dp.release``).
        "privacy_epsilon": (
            _Rule(
                gauge,
                "privacy_epsilon",
                "Privacy spent by this root's releases: epsilon at the configured delta "
                "over every model version it published (its privacy ledger).",
            ),
        ),
        "privacy_budget": (
            _Rule(gauge, "privacy_budget", "The root's epsilon_budget (absent: none set)."),
        ),
        "privacy_budget_exhausted": (
            _Rule(
                gauge,
                "privacy_budget_exhausted",
                "1 once the root's epsilon_budget allows no further release: it releases "
                "and dispatches nothing more.",
            ),
        ),
        "privacy_release_refused": (
            _Rule(
                total,
                "privacy_release_refused_updates",
                "Buffered updates discarded because their release would pass the budget.",
            ),
        ),
        "privacy_clipped": (
            _Rule(total, "privacy_clipped", "Site contributions clipped to the privacy clip."),
        ),
    }


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """What ``/healthz`` reports. ``status`` is ``ok``, ``starting`` or ``degraded``."""

    status: str
    ready: bool
    node: str
    role: str
    version: str
    connected_peers: int
    model_version: float | None
    uptime_s: float

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "ready": self.ready,
            "node": self.node,
            "role": self.role,
            "version": self.version,
            "connected_peers": self.connected_peers,
            "model_version": self.model_version,
            "uptime_s": round(self.uptime_s, 3),
        }


_Collector = Counter | Gauge | Histogram
_KIND: dict[_Op, type[_Collector]] = {
    _Op.COUNT: Counter,
    _Op.SUM: Counter,
    _Op.SET: Gauge,
    _Op.OBSERVE: Histogram,
}


class MetricsSink:
    """Maps ``Metric`` effects and daemon observations to collectors in ``self.registry``."""

    def __init__(
        self,
        *,
        per_source: bool = True,
        process_metrics: bool = False,
        staleness_buckets: Iterable[float] = STALENESS_BUCKETS,
    ) -> None:
        self.registry = CollectorRegistry()
        self._per_source = per_source
        self._rules = _rules()
        self._collectors: dict[str, _Collector] = {}
        self._labels: dict[str, tuple[str, ...]] = {}
        self._warned: set[str] = set()
        self._started = time.monotonic()
        self._ready = False
        self._was_ready = False
        self._node, self._role, self._version = "", "", ""
        self._peers = 0
        self._model_version: float | None = None

        reg = self.registry
        if process_metrics:
            ProcessCollector(registry=reg)
        self._errors = Counter(
            f"{NAMESPACE}_metric_errors",
            "Metric effects dropped as malformed, by reason.",
            ("reason",),
            registry=reg,
        )
        self._staleness = Histogram(
            f"{NAMESPACE}_update_staleness",
            "Staleness (model versions) of applied updates.",
            buckets=tuple(staleness_buckets),
            registry=reg,
        )
        # Made here so the buckets are configurable; the ``update_applied`` rule finds it.
        self._collectors[f"{NAMESPACE}_update_staleness"] = self._staleness
        self._labels[f"{NAMESPACE}_update_staleness"] = ()
        self._connected = Gauge(
            f"{NAMESPACE}_connected_peers", "Peers with an open link.", registry=reg
        )
        self._bytes = Counter(
            f"{NAMESPACE}_bytes", "Bytes on the wire, by direction.", ("direction",), registry=reg
        )
        self._rtt_last = Gauge(
            f"{NAMESPACE}_link_rtt_last_seconds",
            "Last measured round-trip time per link.",
            ("peer",),
            registry=reg,
        )
        self._rtt = Histogram(
            f"{NAMESPACE}_link_rtt_seconds",
            "Round-trip times over all links.",
            buckets=LINK_RTT_BUCKETS,
            registry=reg,
        )
        self._ready_gauge = Gauge(f"{NAMESPACE}_ready", "1 once the node is ready.", registry=reg)
        self._input_rejected = Counter(
            f"{NAMESPACE}_input_rejected",
            "Messages from a connected peer refused as bad bytes (undecodable, over a limit, "
            "a bad signature...), each ending its connection, by reason.",
            ("reason",),
            registry=reg,
        )
        self._build = Info(
            f"{NAMESPACE}_build", "Node identity and software version.", registry=reg
        )

    # ------------------------------------------------------------------ the driver's sink
    def __call__(self, metric: Metric) -> None:
        """Record one ``Metric`` effect. Never raises on odd input (it is counted instead)."""
        try:
            value = float(metric.value)
        except (TypeError, ValueError):
            self._errors.labels("bad_value").inc()
            return
        if not math.isfinite(value):
            self._errors.labels("non_finite").inc()
            return
        labels = {str(k): str(v) for k, v in (metric.labels or {}).items()}
        rules = self._rules.get(metric.name)
        if rules is None:
            self._generic(metric.name, value, labels)
            return
        if metric.name == "model_version":
            self._model_version = value
        for rule in rules:
            self._apply(rule, value, labels)

    def _apply(self, rule: _Rule, value: float, labels: Mapping[str, str]) -> None:
        keep = tuple(k for k in rule.labels if self._per_source or k not in _SOURCE_LABELS)
        collector = self._collector(f"{NAMESPACE}_{rule.name}", rule.op, rule.doc, keep)
        if collector is None:
            return
        self._record(collector, rule.op, value, tuple(labels.get(k, "") for k in keep))

    def _generic(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        base = sanitise_metric_name(name)
        base = base.removesuffix("_total")  # the counter adds it back
        op = _Op.SET if base.endswith(_GAUGE_SUFFIXES) else _Op.SUM
        clean: dict[str, str] = {}
        for k, v in sorted(labels.items()):
            ln = sanitise_label_name(k)
            if ln in _DROPPED_LABELS or (not self._per_source and ln in _SOURCE_LABELS):
                continue
            clean[ln] = v
        full = _UNKNOWN_PREFIX + base
        doc = f"Node metric {name!r} ({'gauge' if op is _Op.SET else 'counter'})."
        collector = self._collector(full, op, doc, tuple(clean))
        if collector is None:
            return
        # A label set fixed by the first effect: missing labels read "", new ones are dropped.
        names = self._labels[full]
        if set(clean) - set(names):
            self._errors.labels("label_mismatch").inc()
        self._record(collector, op, value, tuple(clean.get(k, "") for k in names))

    def _collector(
        self, full: str, op: _Op, doc: str, labels: tuple[str, ...]
    ) -> _Collector | None:
        found = self._collectors.get(full)
        if found is not None:
            if not isinstance(found, _KIND[op]):
                self._errors.labels("type_conflict").inc()
                return None
            return found
        try:
            made: _Collector
            if op is _Op.SET:
                made = Gauge(full, doc, labels, registry=self.registry)
            elif op is _Op.OBSERVE:
                made = Histogram(full, doc, labels, registry=self.registry)
            else:
                made = Counter(full, doc, labels, registry=self.registry)
        except ValueError as exc:  # e.g. a generic name that collides with a series
            self._errors.labels("name_conflict").inc()
            if full not in self._warned:
                self._warned.add(full)
                _log.warning("metric %s dropped: %s", full, exc)
            return None
        self._collectors[full] = made
        self._labels[full] = labels
        return made

    def _record(self, c: _Collector, op: _Op, value: float, values: tuple[str, ...]) -> None:
        child = c.labels(*values) if values else c
        if op is _Op.SET:
            assert isinstance(child, Gauge)
            child.set(value)
        elif op is _Op.OBSERVE:
            assert isinstance(child, Histogram)
            child.observe(value)
        elif op is _Op.COUNT:
            assert isinstance(child, Counter)
            child.inc()
        elif value < 0:
            self._errors.labels("negative_increment").inc()
        else:
            assert isinstance(child, Counter)
            child.inc(value)

    # ------------------------------------------------------------------ the daemon's calls
    def set_connected_peers(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"connected peers must be >= 0, got {n}")
        self._peers = int(n)
        self._connected.set(n)

    def add_bytes(self, direction: str, n: int) -> None:
        """Count ``n`` bytes sent (``direction="sent"``) or received (``"received"``)."""
        if n < 0:
            raise ValueError(f"byte count must be >= 0, got {n}")
        self._bytes.labels(direction).inc(n)

    def input_rejected(self, peer: str, reason: str) -> None:
        """A connection refused bad bytes from ``peer`` (and closed): counted by reason
        (the peer is in the WARNING line, not a label: one series per reason)."""
        self._input_rejected.labels(reason or "protocol").inc()

    def observe_link_rtt(self, peer: str, seconds: float) -> None:
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"round-trip time must be finite and >= 0, got {seconds}")
        self._rtt.observe(seconds)
        if self._per_source:
            self._rtt_last.labels(peer).set(seconds)

    def forget_peer(self, peer: str) -> None:
        """Drop the per-link series of a peer that left the roster (keeps /metrics bounded)."""
        with contextlib.suppress(KeyError):
            self._rtt_last.remove(peer)

    def set_ready(self, ready: bool) -> None:
        """Ready after recovery with links up; not ready again later reads as ``degraded``."""
        self._ready = bool(ready)
        self._was_ready = self._was_ready or self._ready
        self._ready_gauge.set(1.0 if ready else 0.0)

    def set_info(self, node_id: str, role: str, version: str) -> None:
        self._node, self._role, self._version = node_id, role, version
        self._build.info({"node": node_id, "role": role, "version": version})

    # ------------------------------------------------------------------ reading back
    @property
    def ready(self) -> bool:
        return self._ready

    def health(self) -> HealthSnapshot:
        status = "ok" if self._ready else "degraded" if self._was_ready else "starting"
        return HealthSnapshot(
            status=status,
            ready=self._ready,
            node=self._node,
            role=self._role,
            version=self._version,
            connected_peers=self._peers,
            model_version=self._model_version,
            uptime_s=time.monotonic() - self._started,
        )

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample's current value by its exposed name (tests and the demo's progress)."""
        return self.registry.get_sample_value(name, dict(labels or {}))
