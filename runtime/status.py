"""The status board: what an aggregator knows about its federation, as one JSON document.

A ``StatusBoard`` is a ``runtime.middleware`` ``Middleware`` that only observes. From the
events its node handles and the effects the node returns it keeps, in bounded memory and
O(1) work per event (plus one step per site of a region's forward):

* the tiers: this node, its children (from the config, their roles from the roster), and
  the sites under each region child (the config's ``[subtrees]``, else learned from the
  ``pairs`` of the region's applied forwards, only ids the roster lists as sites). A
  forward's pairs are the region's word, which this node cannot check: without
  ``[subtrees]`` a site learned that way is marked ``"claimed": true`` (its parent and last
  update are what that region says), and a site first claimed by one region is never
  moved to another: a later claim by another region is listed in ``"disputed_by"`` and
  does not update it;
* who is connected now (``PeerUp``/``PeerDown`` of the node's children and parent);
* the last update per child and per site: a child's applied update (``update_applied``)
  and, for a region's forward, each ``(site, seq)`` pair it carried;
* the model version history (``model_version``, a ring of ``(time, version)``) and the
  accuracy history (the root's own evaluation, ``runtime.evaluation``, fed through
  ``evaluated``);
* the privacy gauges the node emits (``privacy_epsilon``, ``privacy_budget``,
  ``privacy_budget_exhausted``).

``document(now)`` adds what others keep where it exists: the node's refusal book
(``refusals_view()``), the federated evaluation (``runtime.reports.RootReports.view()``),
the roster version. Its ``"schema"`` is ``SCHEMA``; times in it are ages in seconds
(``*_age_s``) or seconds since the board started (``t``), on the node's clock.

The metrics port serves it as ``/status.json`` and renders it as ``/status``
(``runtime.health``, ``runtime.status_page``); ``fedloom status`` prints it
(``runtime.status_cli``).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedloom.algorithms.protocol import Effect, Event, Metric, PeerDown, PeerUp, Received
from fedloom.transport.roster import Roster
from fedloom.transport.wire import Update

__all__ = ["HISTORY", "MAX_SITES", "SCHEMA", "StatusBoard", "board_for_daemon"]

_log = logging.getLogger(__name__)

SCHEMA = "fedloom.status/1"
HISTORY = 720  # points kept per curve (versions, accuracy): the newest
MAX_SITES = 4096  # sites learned from forwards (the roster bounds them too)
MAX_PAIRS_SEEN = 4096  # pairs of one forward looked at
_TEXT_CAP = 200  # strings from peers in the document


@dataclass(slots=True)
class _Seen:
    """The last applied update of one child or site."""

    last: float | None = None
    updates: int = 0
    via: str | None = None  # a site's region (the one that delivered it last)
    claimed: bool = False  # learned from a region's forward, not from [subtrees]
    disputed_by: tuple[str, ...] = ()  # other regions that named it too (no [subtrees])

    def hit(self, now: float, via: str | None = None) -> None:
        self.last = now
        self.updates += 1
        if via is not None:
            self.via = via


def _cap(text: object) -> str:
    """A peer's string for the document: printable, at most ``_TEXT_CAP`` characters."""
    s = "".join(ch if ch.isprintable() else "?" for ch in str(text)[: _TEXT_CAP * 2])
    return s[:_TEXT_CAP]


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-able data (finite floats; capped strings; bounded depth)."""
    if depth > 6:
        return None
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _cap(value)
    if isinstance(value, Mapping):
        return {_cap(k): _plain(v, depth + 1) for k, v in list(value.items())[:1000]}
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value[:1000]]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _plain(item(), depth + 1)
        except (TypeError, ValueError):
            return None
    return _cap(value)


class StatusBoard:
    """Observes a node (see the module docstring); ``document(now)`` is its JSON view."""

    def __init__(
        self,
        node_id: str,
        role: str,
        *,
        children: Mapping[str, str] | None = None,
        subtrees: Mapping[str, Sequence[str]] | None = None,
        parent: str | None = None,
        roster: Callable[[], Roster | None] | None = None,
        algorithm: str = "",
        secure_aggregation: bool = False,
        node: Any = None,
        middlewares: Callable[[], Iterable[object]] | None = None,
        started: float = 0.0,
    ) -> None:
        self.node_id = node_id
        self.role = role
        self.children: dict[str, str] = dict(children or {})
        self.subtrees = {r: tuple(s) for r, s in (subtrees or {}).items()}
        self.parent = parent
        self.algorithm = algorithm
        self.secure_aggregation = secure_aggregation
        self._roster = roster
        self._node = node
        self._middlewares = middlewares
        self.started = started
        self.connected: set[str] = set()
        self._linked = set(self.children) | ({parent} if parent else set())
        self._child_seen: dict[str, _Seen] = {c: _Seen() for c in self.children}
        self._site_seen: dict[str, _Seen] = {}
        for region, sites in self.subtrees.items():
            for site in sites:
                self._site_seen.setdefault(site, _Seen(via=region))
        self.version: int | None = None
        self.version_at: float | None = None
        self.versions: deque[tuple[float, int]] = deque(maxlen=HISTORY)
        self.accuracy: deque[tuple[float, int, float | None, float | None]] = deque(maxlen=HISTORY)
        self.privacy: dict[str, float] = {}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ Middleware
    def intercept(self, event: Event, now: float) -> list[Effect] | None:
        return None  # observe only

    def observe(self, event: Event, effects: Sequence[Effect], now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            if event.peer in self._linked:
                self.connected.add(event.peer)
        elif isinstance(event, PeerDown):
            self.connected.discard(event.peer)
        applied: set[str] = set()
        for effect in effects:
            if not isinstance(effect, Metric):
                continue
            name = effect.name
            if name == "update_applied":
                src = (effect.labels or {}).get("src")
                if src is not None:
                    applied.add(src)
                    self._applied(str(src), now)
            elif name == "model_version":
                self._version(effect.value, now)
            elif name in ("privacy_epsilon", "privacy_budget", "privacy_budget_exhausted"):
                value = float(effect.value)
                if math.isfinite(value):
                    self.privacy[name] = value
        if (
            applied
            and isinstance(event, Received)
            and isinstance(event.msg, Update)
            and event.msg.pairs
            and event.msg.src in applied
            and self.children.get(event.peer) == "region"
        ):
            self._forwarded(event.peer, event.msg.pairs, now)
        return []

    # ------------------------------------------------------------------ feeding
    def evaluated(self, version: int, metrics: Mapping[str, Any], now: float) -> None:
        """The node's own evaluation of model ``version`` (``runtime.evaluation``)."""

        def finite(key: str) -> float | None:
            try:
                value = float(metrics.get(key, math.nan))
            except (TypeError, ValueError):
                return None
            return value if math.isfinite(value) else None

        self.accuracy.append((now, int(version), finite("accuracy"), finite("loss")))

    def _applied(self, src: str, now: float) -> None:
        seen = self._child_seen.get(src)
        if seen is not None:
            seen.hit(now)
            return
        site = self._site_seen.get(src)  # a site of a secure cohort, or of a subtree
        if site is not None:
            site.hit(now)
        elif self._is_site(src) and len(self._site_seen) < MAX_SITES:
            self._site_seen[src] = _Seen(last=now, updates=1)

    def _forwarded(self, region: str, pairs: Sequence[tuple[str, int]], now: float) -> None:
        declared = self.subtrees.get(region)
        for pair in pairs[:MAX_PAIRS_SEEN]:
            site = str(pair[0])
            seen = self._site_seen.get(site)
            if seen is None:
                if declared is not None or site in self.children or not self._is_site(site):
                    continue  # a declared subtree lists all its sites; others: roster sites
                if len(self._site_seen) >= MAX_SITES:
                    continue
                seen = self._site_seen[site] = _Seen(claimed=True)
            elif declared is not None and site not in declared:
                continue
            elif declared is None and seen.via is not None and seen.via != region:
                # Another region's site (declared, or claimed first): one region's word
                # does not move it, nor refresh it.
                if region not in seen.disputed_by and len(seen.disputed_by) < 8:
                    seen.disputed_by = (*seen.disputed_by, region)
                continue
            elif declared is None and seen.via is None:
                seen.claimed = True
            seen.hit(now, via=region)

    def _is_site(self, node_id: str) -> bool:
        roster = self._roster() if self._roster is not None else None
        if roster is None:
            return False
        entry = roster.lookup(node_id)
        return entry is not None and entry.role == "site"

    def _version(self, value: float, now: float) -> None:
        if not math.isfinite(value):
            return
        version = int(value)
        if version == self.version:
            return
        self.version, self.version_at = version, now
        self.versions.append((now, version))

    # ------------------------------------------------------------------ reading
    def document(self, now: float) -> dict[str, Any]:
        """The board as JSON-able data (see the module docstring)."""

        def age(t: float | None) -> float | None:
            return None if t is None else round(max(0.0, now - t), 3)

        def rel(t: float) -> float:
            return round(t - self.started, 3)

        children = []
        for child, role in self.children.items():
            seen = self._child_seen[child]
            children.append(
                {
                    "id": child,
                    "role": role,
                    "parent": self.node_id,
                    "connected": child in self.connected,
                    "last_update_age_s": age(seen.last),
                    "updates": seen.updates,
                }
            )
        sites = []
        for site, seen in sorted(self._site_seen.items()):
            entry: dict[str, Any] = {
                "id": site,
                "role": "site",
                "parent": seen.via,
                "connected": None,  # not linked to this node: its region knows
                "last_update_age_s": age(seen.last),
                "updates": seen.updates,
                # The parent and last update are that region's word (no [subtrees]).
                "claimed": seen.claimed,
            }
            if seen.disputed_by:
                entry["disputed_by"] = list(seen.disputed_by)
            sites.append(entry)
        me: dict[str, Any] = {
            "id": self.node_id,
            "role": self.role,
            "parent": self.parent,
            "connected": True,
            "last_update_age_s": None,
            "updates": sum(s.updates for s in self._child_seen.values()),
        }
        if self.parent is not None:
            me["parent_connected"] = self.parent in self.connected
        roster = self._roster() if self._roster is not None else None
        eps = self.privacy.get("privacy_epsilon")
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "node": {
                "id": self.node_id,
                "role": self.role,
                "algorithm": self.algorithm,
                "secure_aggregation": self.secure_aggregation,
                "roster_version": None if roster is None else roster.version,
                "uptime_s": round(max(0.0, now - self.started), 3),
            },
            "tiers": [[me], children, sites],
            "connected": sorted(self.connected),
            "model": {
                "version": self.version,
                "version_age_s": age(self.version_at),
                "versions_seen": len(self.versions),
            },
            "versions": [[rel(t), v] for t, v in self.versions],
            "accuracy": [[rel(t), v, a, lo] for t, v, a, lo in self.accuracy],
            "privacy": None
            if eps is None
            else {
                "epsilon": eps,
                "epsilon_budget": self.privacy.get("privacy_budget"),
                "exhausted": bool(self.privacy.get("privacy_budget_exhausted", 0.0)),
            },
            "refusals": self._view("refusals", lambda: self._refusals(now)),
            "federated_evaluation": self._view("federated evaluation", self._reports),
        }
        return doc

    def _view(self, what: str, read: Callable[[], Any]) -> Any:
        try:
            return _plain(read())
        except Exception:  # another part's view must not take the status page down
            if what not in self._warned:
                self._warned.add(what)
                _log.exception("%s: status: reading the %s failed", self.node_id, what)
            return None

    def _refusals(self, now: float) -> Any:
        """The node's refusal book (``refusals_view()``: per site its last code, reason,
        version and count), with the age of each site's last refusal."""
        view = getattr(self._node, "refusals_view", None)
        if not callable(view):
            return None
        out: dict[str, Any] = {}
        for site, entry in dict(view()).items():
            e = dict(entry) if isinstance(entry, Mapping) else {"reason": entry}
            last = e.get("last")
            if isinstance(last, int | float) and math.isfinite(last):
                e["last_age_s"] = round(max(0.0, now - float(last)), 3)
            out[str(site)] = e
        return out

    def _reports(self) -> Any:
        if self._middlewares is None:
            return None
        try:  # runtime.reports (federated evaluation) is optional here
            reports = importlib.import_module("fedloom.runtime.reports")
        except ImportError:
            return None
        kind = getattr(reports, "RootReports", None)
        if not isinstance(kind, type):
            return None
        for m in self._middlewares():
            if isinstance(m, kind):
                return m.view()  # type: ignore[attr-defined]
        return None


def board_for_daemon(d: Any, layered: Any, started: float) -> StatusBoard:
    """The board of an opened daemon ``d`` (``runtime.recovery.Daemon``) whose node runs
    as ``layered`` (a ``LayeredNode``): its config's children and subtrees, the roles of
    its children from the node (the roster's), the roster the daemon holds now."""
    cfg = d.cfg
    node = d.node
    roles = getattr(node, "children", None)
    children = (
        {c: str(roles.get(c, "site")) for c in cfg.children}
        if isinstance(roles, Mapping)
        else {c: _role_in(d.roster, c) for c in cfg.children}
    )
    return StatusBoard(
        cfg.node_id,
        cfg.role,
        children=children,
        subtrees=cfg.subtrees,
        parent=None if cfg.parent is None else cfg.parent.id,
        roster=lambda: d.roster,
        algorithm=cfg.algorithm,
        secure_aggregation=bool(getattr(cfg.secure_aggregation, "enabled", False)),
        node=layered,
        middlewares=lambda: tuple(layered.middlewares),
        started=started,
    )


def _role_in(roster: Roster, node_id: str) -> str:
    entry = roster.lookup(node_id)
    return "site" if entry is None else entry.role
