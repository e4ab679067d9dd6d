"""Sites' refusals of training tasks, as an aggregator sees them (issue 14).

A site that does not train a task it was given (its plan raised, the plan is not approved,
the dataset is revoked, the privacy budget is spent, ...) answers ``TrainRefused(src, task,
version, code, reason)`` instead of an ``Update``. Its aggregator (``aggregator_base``)
takes one only when it is believable, frees the task's slot so the federation does not
wait for an answer that will not come, and keeps what it learnt here, in a ``RefusalBook``:

* one entry per site (the latest code and reason, how many refusals, the model version of
  the last, when), at most ``MAX_SITES`` entries (past that the entry updated longest ago
  goes), codes and reasons cut to ``MAX_CODE`` / ``MAX_REASON`` characters and made
  printable (``clean_code``, ``clean_text``): a refusal's strings come from a peer;
* a backoff per direct child site: a site that refused gets no new task for
  ``backoff_s`` seconds (``BACKOFF_S`` unless set: the aggregator's ``refusal_backoff_s``),
  doubled with each refusal in a row up to ``MAX_BACKOFF_S``, and
  reset when the site answers a task again or reconnects. Without it a site whose plan
  fails at once would be handed the model again at once, in a loop as fast as the link;
* a bounded window of the ``(relaying child, site, task)`` triples already counted
  (``DEDUPE_WINDOW``): a resent or relayed-twice refusal counts once, and one region's
  refusals never make another region's look like resends;
* a token bucket per region child (``REGION_BURST`` refusals, then ``REGION_RATE_PER_S``):
  a region relays its sites' refusals, whose believability this node can only partly
  check (the site is one of that region's), so one region cannot flood the book or log.

Pure bookkeeping: no effects, no clock (times are passed in). Not durable: the book is a
view for operators (``fedloom status``, the status page), rebuilt as refusals come in
after a restart, and a backoff lost in a restart costs one more refusal.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from fedloom.algorithms.token_bucket import TokenBuckets

__all__ = [
    "BACKOFF_S",
    "DEDUPE_WINDOW",
    "KNOWN_CODES",
    "MAX_BACKOFF_S",
    "MAX_CODE",
    "MAX_REASON",
    "MAX_SITES",
    "REGION_BURST",
    "REGION_RATE_PER_S",
    "RefusalBook",
    "clean_code",
    "clean_text",
    "metric_code",
]

MAX_SITES = 4096
MAX_CODE = 40
MAX_REASON = 200
MAX_ID = 128  # a site id relayed by a region: longer ones are refused
BACKOFF_S = 5.0
MAX_BACKOFF_S = 300.0
DEDUPE_WINDOW = 4096
REGION_BURST = 64.0
REGION_RATE_PER_S = 1.0
# Codes that get their own label on the ``site_refusals`` metric; any other is "other"
# (a peer's string must not mint series without bound). The book keeps the code itself.
KNOWN_CODES = frozenset(
    {
        "failed",
        "plan_failed",
        "plan_not_approved",
        "out_of_bounds",
        "dataset_missing",
        "dataset_revoked",
        "dataset_changed",
        "dataset_mismatch",
        "unsigned_settings",
        "privacy_budget",
        "refused",
    }
)
_CODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def clean_code(code: object) -> str:
    """A refusal code fit to log and show: letters, digits and ``_.-`` only, at most
    ``MAX_CODE`` characters ("unknown" when nothing is left)."""
    text = code if isinstance(code, str) else ""
    kept = "".join(ch if ch in _CODE_CHARS else "_" for ch in text[:MAX_CODE])
    return kept or "unknown"


def clean_text(text: object, cap: int = MAX_REASON) -> str:
    """A peer's free text fit for one log line: printable characters only (others become
    ``?``), at most ``cap`` characters (``...`` marks a cut)."""
    raw = text if isinstance(text, str) else ""
    cut = len(raw) > cap
    shown = "".join(ch if ch.isprintable() else "?" for ch in raw[: cap - 3 if cut else cap])
    return shown + "..." if cut else shown


def is_clean_id(node_id: object) -> bool:
    """Whether a relayed site id is one this node could name in a log or a label."""
    return (
        isinstance(node_id, str)
        and 0 < len(node_id) <= MAX_ID
        and node_id.isprintable()
        and not any(ch.isspace() for ch in node_id)
    )


def metric_code(code: str) -> str:
    """The ``code`` label of the ``site_refusals`` metric: a known code, else "other"."""
    return code if code in KNOWN_CODES else "other"


@dataclass(slots=True)
class _Entry:
    code: str
    reason: str
    count: int
    version: int
    first: float
    last: float


class RefusalBook:
    """What an aggregator knows of its sites' refusals (see the module docstring)."""

    __slots__ = (
        "_backoff_s",
        "_buckets",
        "_entries",
        "_max_sites",
        "_retry",
        "_seen",
        "_streak",
    )

    def __init__(self, max_sites: int = MAX_SITES, backoff_s: float = BACKOFF_S) -> None:
        if max_sites < 1:
            raise ValueError(f"max_sites must be >= 1, got {max_sites}")
        self._max_sites = max_sites
        self._backoff_s = BACKOFF_S
        self.set_backoff(backoff_s)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest update first
        self._seen: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        self._buckets = TokenBuckets(REGION_BURST, REGION_RATE_PER_S)  # per region child
        self._streak: dict[str, int] = {}  # direct child site -> refusals in a row
        self._retry: dict[str, float] = {}  # direct child site -> no task before this

    def __len__(self) -> int:
        return len(self._entries)

    # ---------------------------------------------------------------- intake
    def fresh(self, src: str, task: int, via: str | None = None) -> bool:
        """False when ``src``'s refusal of ``task`` came from child ``via`` (default:
        ``src`` itself) already (within the window)."""
        key = (src if via is None else via, src, task)
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > DEDUPE_WINDOW:
            self._seen.popitem(last=False)
        return True

    def allow(self, region: str, now: float) -> bool:
        """Whether ``region`` may relay one more refusal now (its token bucket)."""
        return self._buckets.take(region, now)

    def note(self, site: str, code: str, reason: str, version: int, now: float) -> None:
        """Count one believable refusal (``code`` and ``reason`` cleaned already)."""
        entry = self._entries.pop(site, None)
        if entry is None:
            if len(self._entries) >= self._max_sites:
                self._entries.popitem(last=False)  # the site heard from longest ago
            entry = _Entry(code, reason, 0, version, now, now)
        entry.code, entry.reason, entry.version, entry.last = code, reason, version, now
        entry.count += 1
        self._entries[site] = entry

    # --------------------------------------------------------------- backoff
    @property
    def backoff_s(self) -> float:
        """The backoff after a first refusal in a row (doubled with each next one)."""
        return self._backoff_s

    def set_backoff(self, backoff_s: float) -> None:
        """The backoff after a first refusal: > 0 and at most ``MAX_BACKOFF_S`` seconds.
        Backoffs running already keep their end."""
        if not 0.0 < backoff_s <= MAX_BACKOFF_S:  # NaN fails too
            raise ValueError(
                f"backoff_s must be > 0 and at most {MAX_BACKOFF_S:g} s, got {backoff_s}"
            )
        self._backoff_s = float(backoff_s)

    def back_off(self, site: str, now: float) -> float:
        """``site`` (a direct child) refused: until when it gets no new task."""
        streak = self._streak[site] = self._streak.get(site, 0) + 1
        wait = min(MAX_BACKOFF_S, self._backoff_s * 2.0 ** min(streak - 1, 30))
        until = self._retry[site] = now + wait
        return until

    def answered(self, site: str) -> None:
        """``site`` answered a task again (or reconnected): its next refusal waits the
        base backoff only."""
        self._streak.pop(site, None)

    def forget_backoff(self, site: str) -> None:
        """``site`` went down: a reconnect starts afresh (it may have been fixed)."""
        self._streak.pop(site, None)
        self._retry.pop(site, None)

    def due(self, now: float) -> list[str]:
        """The sites whose backoff is over (each named once)."""
        done = sorted(s for s, t in self._retry.items() if t <= now)
        for site in done:
            del self._retry[site]
        return done

    def next_retry(self) -> float | None:
        """When the next backoff ends (None: none runs)."""
        retry = self._retry
        return min(retry.values()) if retry else None

    def backing_off(self, site: str) -> bool:
        return site in self._retry

    # ------------------------------------------------------------------ view
    def view(self) -> dict[str, dict[str, object]]:
        """Per site: ``code``, ``reason``, ``count``, ``version`` (of the last refusal),
        ``first`` and ``last`` (this node's clock), ``backoff_until`` (None: none runs)."""
        out: dict[str, dict[str, object]] = {}
        for site in sorted(self._entries):
            e = self._entries[site]
            retry = self._retry.get(site)
            out[site] = {
                "code": e.code,
                "reason": e.reason,
                "count": e.count,
                "version": e.version,
                "first": e.first,
                "last": e.last,
                "backoff_until": retry if retry is not None and math.isfinite(retry) else None,
            }
        return out
