"""Federated evaluation and federated statistics: daemon services at sites, regions, root.

They are not the training protocol, so they are middlewares (``runtime.middleware``)
layered around the node: each intercepts the messages it speaks (``EvalReport``,
``StatsRequest``, ``StatsReport``) before the node, and observes the node's own events.

Schedule. The root sends every child, each time it connects (``PeerUp``), the reserved
``StatsRequest(query="evaluate", spec={"every": N})`` and one ``StatsRequest(name, spec)``
per ``[[analytics]]`` query (``federation.analytics``: the flat spec); a region keeps the
newest of each and passes them to its children (at once, and whenever one connects). This
rides the per-connection control path, not the settings map the root signs and sites
bound per key, so the training protocol, its signatures and the sites' approval bounds are
untouched, and a restarted root (or a re-configured one) re-synchronises every subtree.
A root with neither ``[evaluation] every`` nor ``[[analytics]]`` sends nothing.

Site (``SiteReports``). ``every = N > 0``: the site evaluates the first model version v it
holds (from a ``TrainRequest`` or a ``ModelBroadcast`` of its parent) with ``v // N``
greater than that of the last one it evaluated, and reports it under the bucket's start
``(v // N) * N``: under FedBuff a site sees only some versions, so reports of nearby
versions land in one bucket. ``plan.evaluate(weights)`` (its own held-out split) runs in a
thread, one job at a time (a newer bucket waits; older ones are skipped), never on the
event loop; the result goes to the current parent as ``EvalReport(src, bucket,
n_examples, metrics)``. ``n_examples`` is the plan's own ``n_examples`` (or ``n_test``)
figure, else the size of its evaluation split where the plan has one, else 1. A
statistics query is computed over the site's registered dataset with the query's tag
(``runtime.datasets``: ``DatasetRegistry.active_by_tag``, ``load_frame``), in a thread;
the answer (or a refusal: ``dataset_missing``, ``dataset_revoked``, ``dataset_changed``,
``bad_spec``, ``bad_column``, ``too_few_rows``, ``failed``; ``tag_not_allowed`` and
``plan_not_approved`` from the site's ``[governance]``, ``runtime.governance.ReportsGate``,
which also gates evaluation; ``noise_too_low`` under ``[governance]
statistics_min_noise``; ``privacy_budget`` past ``statistics_epsilon_budget``, or for an
exact query while one is set; ``statistics_limit`` when ``MAX_ANSWERS`` noisy answers are
kept already) goes to the parent. Answers are kept per statistic (the canonical spec
without its name: a renamed query is the same statistic) and dataset hash in
``STATE_DIR/analytics-answers.json`` with the ε spent (each noisy release
``gaussian_epsilon(z, STATISTICS_DELTA)``, basic composition), written before the answer
leaves, and repeated, not recomputed: a noisy answer is released once, even across a
restart, and never evicted. A damaged file makes the site refuse every query (``failed``,
naming the file) until its operator moves it aside.

Region (``RegionReports``). Reports from a child are relayed to the parent when their
``src`` is that child (a site) or a site of its ``[subtrees]`` entry (a nested region; any
site of the roster but this region's own children when the subtree is undeclared), at
most ``RELAY_BURST`` at once and ``RELAY_PER_S`` per second per child, each
``(src, version)`` / ``(src, query)`` once. A send to a peer that is down is dropped by the
driver, so a site resends its last evaluation report when its parent link comes back; a
region keeps what comes while its parent link is down (at most ``RELAY_HELD``) and, once it
is back, sends it and asks its children for their (kept) answers again.

Root (``RootReports``). A report is refused (``Metric report_rejected{kind, reason}``, a
bounded log line) unless its ``src`` is a site the tree puts under the child that sent it
(a site itself; for a region, a site its ``[subtrees]`` entry lists, or without one a
roster site the region forwarded an update of: a pair of a forward the root acknowledged;
until then its reports wait, at most ``RELAY_HELD`` per region), it comes within the
``RELAY_BURST`` / ``RELAY_PER_S`` of its (child, site), its version a bucket start
not above the root's model, its ``n_examples`` between 1 and the site's declared examples
(the roster's ``examples``, else ``max_examples_per_site``), its metrics finite, at most
``MAX_METRICS``, with accuracy in [0, 1] and ``|loss| <= MAX_LOSS``. An unchanged repeat is
a duplicate (nothing recomputed or written); two children reporting one site's figures
differently are both dropped (``conflict``, counted twice) and that site's figures for that
bucket or query refused from then on. A site opens at most ``MAX_BUCKETS_PER_SITE``
pending buckets (its own with the fewest reports gives way), ``MAX_PENDING_BUCKETS`` in
all (the one with the fewest reports gives way). A bucket is published (gauges
``fedloom_node_federated_eval_accuracy_ratio``, ``..._loss_gauge``, ``..._sites_gauge``,
``..._version``; ``view()``; ``STATE_DIR/evaluation.json``) once at least ``min_sites``
sites reported it: example-weighted means of accuracy and loss, the number of sites and
examples; never a site's own figures. Statistics reports are checked by
``federation.analytics.check_values`` and aggregated by ``aggregate`` (published in
``STATE_DIR/analytics/<name>.json`` and ``view()``). What the root holds per site (needed
to go on aggregating after a restart) is kept in ``STATE_DIR/reports/`` (one file for the
evaluation, one per query), never published, and loaded through the checks a live report
gets. Means are computed without overflow and a figure that is not finite is left out.
Files are encoded and written atomically (tmp, fsync, rename, fsync dir) by one writer
thread at a time, never raising on the loop (a value that cannot be written is skipped with
one warning); a value not yet written gives way to a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import logging
import math
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloom.algorithms.protocol import (
    Effect,
    Event,
    Log,
    Metric,
    PeerDown,
    PeerUp,
    Received,
    Send,
)
from fedloom.algorithms.token_bucket import TokenBuckets
from fedloom.federation.analytics import (
    EVALUATE,
    MAX_SPEC_KEYS,
    QuerySpec,
    SiteAnswer,
    SpecError,
    aggregate,
    check_name,
    check_values,
    compute_site,
    gaussian_epsilon,
    parse_wire,
)
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.training import TrainingRefusedError
from fedloom.runtime.middleware import LayeredNode, Poster, ServiceEvent
from fedloom.transport.error_text import describe as describe_exc
from fedloom.transport.errors import describe
from fedloom.transport.identity import write_atomic
from fedloom.transport.wire import (
    Ack,
    EvalReport,
    ModelBroadcast,
    StatsReport,
    StatsRequest,
    TrainRequest,
    Update,
)

__all__ = [
    "NO_REPORTS",
    "EvaluationConfig",
    "RegionReports",
    "ReportsConfig",
    "RootReports",
    "SiteReports",
    "add_reports",
    "read_reports",
    "root_reports",
]

log = logging.getLogger("fedloom.daemon")

MAX_EVERY = 1_000_000
MAX_METRICS = 16
MAX_QUERIES = 32  # analytics queries a node keeps (the root's config, a region's, a site's)
MAX_PENDING_BUCKETS = 64  # evaluation buckets the root holds per-site figures for
MAX_PUBLISHED_BUCKETS = 256
MAX_REASON = 200
RELAY_BURST = 64.0
RELAY_PER_S = 2.0
RELAY_SEEN = 8192
RELAY_HELD = 512  # reports a region keeps while its parent link is down
STATE_FORMAT = "fedloom/reports/1"
ANSWERS_FORMAT = "fedloom/analytics-answers/2"
MAX_ANSWERS = 256  # distinct statistics a site keeps (noisy ones are never evicted)
STATISTICS_DELTA = 1e-5  # δ of each noisy release a site accounts ([governance] budget)
MAX_LOSS = 1e6  # |loss| a site may report
MAX_BUCKETS_PER_SITE = 4  # pending evaluation buckets one site may have opened
_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_EVAL_SIZE_KEYS = ("n_examples", "n_test", "eval_sites")


# ------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class EvaluationConfig:
    """``[evaluation]`` (the root's): evaluate every ``every``-th version at the sites (0:
    off); publish a version only once ``min_sites`` sites reported it."""

    every: int = 0
    min_sites: int = 3


@dataclass(frozen=True, slots=True)
class ReportsConfig:
    """``[evaluation]`` and ``[[analytics]]`` of a root (empty elsewhere)."""

    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    analytics: tuple[QuerySpec, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.evaluation.every > 0 or bool(self.analytics)


NO_REPORTS = ReportsConfig()


def read_reports(
    evaluation: Table, analytics: Sequence[Any], role: str, privacy: Any = None
) -> ReportsConfig:
    """``[evaluation]`` and the ``[[analytics]]`` tables (the root's only). A query without
    ``noise_multiplier`` takes the root's ``[privacy]`` one when central DP is on (and its
    ``delta``); with noise, every column needs ``bounds``."""
    every = evaluation.integer("every", 0, min=0, max=MAX_EVERY)
    min_sites = evaluation.integer("min_sites", 3, min=1, max=100_000)
    evaluation.finish()
    if not isinstance(analytics, list):
        raise ConfigError("analytics: expected [[analytics]] tables")
    if (every or analytics) and role != "root":
        what = "evaluation.every" if every else "analytics"
        raise ConfigError(
            f"{what}: the root schedules federated evaluation and statistics; remove it "
            f"for a {role} (sites and regions follow the root's)"
        )
    if len(analytics) > MAX_QUERIES:
        raise ConfigError(f"analytics: at most {MAX_QUERIES} queries")
    specs = [
        _read_query(Table(item, f"analytics[{i}]"), privacy) for i, item in enumerate(analytics)
    ]
    names = [s.name for s in specs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"analytics[{i}].name: {name!r} names two queries")
    return ReportsConfig(EvaluationConfig(every, min_sites), tuple(specs))


def _lists(t: Table, key: str) -> dict[str, list[Any]]:
    """``key = {column = [numbers...]}``: a table of lists of numbers."""
    raw = t.raw(key, {})
    if not isinstance(raw, Mapping):
        raise t.fail(key, "a table {column = [numbers, ...]}", raw)
    out: dict[str, list[Any]] = {}
    for col, value in raw.items():
        if not isinstance(value, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value
        ):
            raise ConfigError(f"{t.where(key)}.{col}: expected a list of numbers")
        out[str(col)] = value
    return out


def _read_query(t: Table, privacy: Any) -> QuerySpec:
    name = t.text("name")
    tag = t.text("dataset_tag")
    columns = t.array("columns")
    bins = _lists(t, "bins")
    bounds = _lists(t, "bounds")
    for col, pair in bounds.items():
        if len(pair) != 2:
            raise ConfigError(f"{t.where('bounds')}.{col}: expected [lo, hi]")
    min_cell = t.integer("min_cell", 5)
    min_sites = t.integer("min_sites", 3, min=1, max=100_000)
    z = t.number("noise_multiplier", None, min=0.0, exclusive_min=True)
    delta = t.number("delta", None, min=0.0, max=1e-3, exclusive_min=True)
    t.finish()
    central = privacy is not None and getattr(privacy, "enabled", False)
    if z is None and central:
        z = float(privacy.noise_multiplier)
    if delta is None:
        delta = float(privacy.delta) if central else 1e-5
    try:
        return QuerySpec(
            name=name,
            tag=tag,
            columns=tuple(columns),
            bins={c: tuple(v) for c, v in bins.items()},
            bounds={c: (v[0], v[1]) for c, v in bounds.items()},
            min_cell=min_cell,
            noise_multiplier=z,
            min_sites=min_sites,
            delta=delta,
        )
    except SpecError as exc:
        hint = " ([privacy] is on: its noise applies)" if central and "bounds" in str(exc) else ""
        raise ConfigError(f"{t.where('name')} = {name!r}: {exc}{hint}") from None


# ------------------------------------------------------------------------- plumbing

Runner = Callable[[Callable[[], ServiceEvent | None]], None]


def thread_runner(loop: asyncio.AbstractEventLoop, post: Poster) -> Runner:
    """Run each job in a daemon thread (never on the event loop) and post the event it
    returns through ``post`` on ``loop``. A job finishing after the daemon stopped (its
    loop closed) is dropped."""

    def run(job: Callable[[], ServiceEvent | None]) -> None:
        def work() -> None:
            event = job()
            if event is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: we stopped
                    loop.call_soon_threadsafe(post, event)

        threading.Thread(target=work, name="fedloom-reports", daemon=True).start()

    return run


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True, allow_nan=False).encode()


def write_json_atomic(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path`` (``write_bytes_atomic``)."""
    write_bytes_atomic(path, _json_bytes(value))


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """``data`` at ``path``, whole or not at all (``transport.identity.write_atomic``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=mode)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); starting without it", path, describe_exc(exc))
        return None


class JsonFiles:
    """Atomic JSON writes off the loop by one writer at a time; a value not yet written is
    replaced by a newer one for the same path (memory: one pending value per path).

    ``save`` never raises: the value (a snapshot the caller never changes afterwards) is
    encoded in the writer's thread, and one that cannot be (a non-finite number) is
    skipped with one warning per path."""

    def __init__(self, run: Runner) -> None:
        self._run = run
        self._lock = threading.Lock()
        self._pending: dict[Path, Any] = {}
        self._writing = False
        self._warned: set[Path] = set()

    def save(self, path: Path, value: Any) -> None:
        with self._lock:
            self._pending[path] = value
            if self._writing:
                return
            self._writing = True
        try:
            self._run(self._drain)
        except Exception as exc:  # no thread to be had: the value waits for the next save
            with self._lock:
                self._writing = False
            log.warning("%s: cannot write (%s)", path, describe_exc(exc))

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._writing = False
                    return
                path = next(iter(self._pending))
                value = self._pending.pop(path)
            try:
                data = json.dumps(value, sort_keys=True, allow_nan=False).encode()
            except (TypeError, ValueError, RecursionError) as exc:
                if path not in self._warned:
                    self._warned.add(path)
                    log.warning("%s: not written, a value cannot be (%s)", path, exc)
                continue
            try:
                write_bytes_atomic(path, data)
            except OSError as exc:
                log.warning("%s: cannot write (%s)", path, describe_exc(exc))


def _bad(
    kind: str, reason: str, peer: str, fields: Mapping[str, Any] | None = None
) -> list[Effect]:
    extra = {"peer": describe(peer), "reason": reason, **(fields or {})}
    return [
        Metric("report_rejected", 1.0, {"kind": kind, "reason": reason}),
        Log("warning", f"{kind} report rejected", extra),
    ]


# ------------------------------------------------------------------------- site


@dataclass(frozen=True, slots=True)
class EvalDone(ServiceEvent):
    owner: int
    bucket: int
    version: int
    n_examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True)
class StatsDone(ServiceEvent):
    owner: int
    query: str
    answer: SiteAnswer | None
    code: str = ""
    reason: str = ""


class DatasetSource:
    """The site's registered datasets by tag (``runtime.datasets``, imported lazily: the
    ``tabular`` extra). ``open(tag) -> (identity, frame)``; ``SpecError`` with code
    ``dataset_missing`` / ``dataset_revoked`` when there is no active one."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def open(self, tag: str) -> tuple[str, Any]:
        try:
            datasets: Any = importlib.import_module("fedloom.runtime.datasets")
        except ImportError:
            raise SpecError("this site has no dataset registry", "dataset_missing") from None
        registry = datasets.DatasetRegistry(self.state_dir)
        record = registry.active_by_tag(tag)
        if record is None:
            revoked = any(
                tag in getattr(r, "tags", ()) and getattr(r, "revoked_at", None)
                for r in registry.records()
            )
            code = "dataset_revoked" if revoked else "dataset_missing"
            raise SpecError(f"no active dataset tagged {tag!r} at this site", code)
        ident = str(getattr(record, "sha256", "") or getattr(record, "name", tag))
        try:
            return ident, datasets.load_frame(record)
        except TrainingRefusedError as exc:  # the file is gone or not the registered one
            raise SpecError(str(exc)[:MAX_REASON], exc.code) from None


def eval_examples(plan: Any, result: Mapping[str, Any]) -> int:
    """How many examples ``plan.evaluate`` looked at (see the module docstring)."""
    for key in ("n_examples", "n_test"):
        v = result.get(key)
        if isinstance(v, int | float) and math.isfinite(v) and v >= 1:
            return int(v)
    inner = plan
    with contextlib.suppress(Exception):  # a workload's site plan builds its model lazily
        inner = plan._plan() if hasattr(plan, "_plan") else plan
    split = getattr(inner, "_eval", None)
    with contextlib.suppress(TypeError):
        if split is not None and len(split) >= 1:
            return len(split)
    return 1


def clean_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """At most ``MAX_METRICS`` finite numbers with plain names (accuracy, loss first)."""
    out: dict[str, float] = {}
    keys = sorted(result, key=lambda k: (k not in ("accuracy", "loss"), str(k)))
    for key in keys:
        v = result[key]
        if key in _EVAL_SIZE_KEYS or not isinstance(key, str) or not _METRIC_NAME.match(key):
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            continue
        out[key] = float(v)
        if len(out) == MAX_METRICS:
            break
    return out


def _parse_answers(raw: Any) -> tuple[dict[str, dict[str, Any]], float]:
    """``analytics-answers.json`` (``ValueError`` naming what does not hold)."""
    if not isinstance(raw, dict) or raw.get("format") != ANSWERS_FORMAT:
        raise ValueError(f"not a {ANSWERS_FORMAT} file")
    spent = raw.get("spent_epsilon")
    if isinstance(spent, bool) or not isinstance(spent, int | float) or not 0 <= spent < math.inf:
        raise ValueError("spent_epsilon is not a number >= 0")
    answers = raw.get("answers")
    if not isinstance(answers, dict) or len(answers) > MAX_ANSWERS:
        raise ValueError(f"answers is not a table of at most {MAX_ANSWERS}")
    out: dict[str, dict[str, Any]] = {}
    for key, e in answers.items():
        ok = (
            isinstance(key, str)
            and re.fullmatch(r"[0-9a-f]{64}", key) is not None
            and isinstance(e, dict)
            and set(e) == {"dataset", "n", "values", "noisy"}
            and isinstance(e["dataset"], str)
            and type(e["n"]) is int
            and e["n"] >= 0
            and type(e["noisy"]) is bool
            and isinstance(e["values"], dict)
            and all(
                isinstance(k, str)
                and not isinstance(v, bool)
                and isinstance(v, int | float)
                and math.isfinite(v)
                for k, v in e["values"].items()
            )
        )
        if not ok:
            raise ValueError("an answer is not {dataset, n, values, noisy}")
        out[key] = e
    return out, float(spent)


def _spec_digest(spec: Mapping[str, Any]) -> str:
    blob = json.dumps(dict(spec), sort_keys=True, allow_nan=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class SiteReports:
    """A site's evaluation and statistics service (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        parent_of: Callable[[], str],
        plan: Any,
        run: Runner,
        *,
        datasets: Any = None,
        answers_path: Path | None = None,
        gate: Any = None,
    ) -> None:
        self.node_id = node_id
        self._gate = gate  # runtime.governance.ReportsGate: approval and allowed tags
        self._parent_of = parent_of
        self._plan = plan
        self._run = run
        self._datasets = datasets
        self._answers_path = answers_path
        self.every = 0
        self.last_bucket = -1
        self._eval_busy = False
        self._eval_next: tuple[int, Any] | None = None  # (version, weights) waiting
        self._last_report: EvalReport | None = None
        self._stats_busy = False
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._lock = threading.Lock()  # the answers cache (read by jobs, written by them)
        # spec digest -> {"dataset", "n", "values", "noisy"}; the ε spent in all
        self._answers: dict[str, dict[str, Any]] = {}
        self._spent = 0.0
        self._damaged = ""  # why analytics-answers.json cannot be read: every query refused
        self._load_answers()

    def _load_answers(self) -> None:
        path = self._answers_path
        if path is None:
            return
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            self._answers, self._spent = _parse_answers(raw)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, RecursionError, OverflowError) as exc:
            self._damaged = (
                f"no statistics until the site's operator moves {path} aside "
                f"(damaged: {describe_exc(exc)[:60]})"
            )
            log.warning("%s", self._damaged)

    # -- middleware
    def intercept(self, event: Event, now: float) -> list[Effect] | None:
        if isinstance(event, EvalDone) and event.owner == id(self):
            return self._eval_done(event)
        if isinstance(event, StatsDone) and event.owner == id(self):
            return self._stats_done(event)
        if not isinstance(event, Received):
            return None
        msg = event.msg
        if isinstance(msg, StatsRequest):
            if event.peer != self._parent_of():
                return _bad("request", "not_parent", event.peer)
            return self._on_request(event.peer, msg)
        if isinstance(msg, EvalReport | StatsReport):
            return _bad("eval" if isinstance(msg, EvalReport) else "stats", "at_site", event.peer)
        return None

    def observe(self, event: Event, effects: Sequence[Effect], now: float) -> list[Effect]:
        if isinstance(event, PeerUp) and event.peer == self._parent_of():
            # The last report may have been sent while the link was down (dropped):
            # again; parents take each (src, version) once.
            last = self._last_report
            return [] if last is None else [Send(event.peer, last)]
        if self.every <= 0 or self._plan is None or not isinstance(event, Received):
            return []
        msg = event.msg
        if not isinstance(msg, TrainRequest | ModelBroadcast) or event.peer != self._parent_of():
            return []
        if msg.version < 0 or msg.version // self.every <= self.last_bucket:
            return []
        if self._eval_busy:
            held = self._eval_next
            if held is None or msg.version // self.every > held[0] // self.every:
                self._eval_next = (msg.version, msg.weights)
            return []
        self._start_eval(msg.version, msg.weights)
        return []

    # -- evaluation
    def _start_eval(self, version: int, weights: Any) -> None:
        self._eval_busy = True
        bucket = version // self.every
        self.last_bucket = max(self.last_bucket, bucket)
        start = bucket * self.every
        plan, owner, gate = self._plan, id(self), self._gate

        def job() -> ServiceEvent:
            try:
                if gate is not None:  # plan_not_approved: reported as a failed evaluation
                    gate.check_evaluate()
                result = plan.evaluate(weights)
                metrics = clean_metrics(result)
                if "accuracy" not in metrics and "loss" not in metrics:
                    raise ValueError("the plan's evaluate() gave no accuracy or loss")
                n = eval_examples(plan, result)
                return EvalDone(owner, start, version, n, metrics)
            except Exception as exc:  # the plan's code: a failure is reported, not raised
                return EvalDone(owner, start, version, error=describe_exc(exc)[:MAX_REASON])

        self._run(job)

    def _eval_done(self, done: EvalDone) -> list[Effect]:
        self._eval_busy = False
        out: list[Effect]
        if done.error:
            out = [
                Metric("federated_eval_failed"),
                Log(
                    "warning",
                    "evaluating a model failed",
                    {"version": done.version, "reason": done.error},
                ),
            ]
        else:
            report = EvalReport(self.node_id, done.bucket, done.n_examples, dict(done.metrics))
            self._last_report = report
            out = [Send(self._parent_of(), report), Metric("federated_eval_sent")]
        waiting, self._eval_next = self._eval_next, None
        if waiting is not None and self.every > 0 and waiting[0] // self.every > self.last_bucket:
            self._start_eval(*waiting)
        return out

    # -- statistics
    def _on_request(self, peer: str, msg: StatsRequest) -> list[Effect]:
        if msg.query == EVALUATE:
            every = msg.spec.get("every")
            if set(msg.spec) != {"every"} or isinstance(every, bool) or not isinstance(every, int):
                return _bad("request", "bad_schedule", peer)
            if not 0 <= every <= MAX_EVERY:
                return _bad("request", "bad_schedule", peer)
            if every != self.every:
                self.every = every
                self.last_bucket = -1
            return []
        try:
            check_name("query", msg.query)
        except SpecError:
            return _bad("request", "bad_query", peer)
        try:
            parse_wire(msg.query, msg.spec)
        except SpecError as exc:
            return [Send(peer, StatsReport(self.node_id, msg.query, 0, {}, exc.code, str(exc)))]
        if any(q == msg.query for q, _ in self._queue):
            self._queue = deque((q, s) for q, s in self._queue if q != msg.query)
        if len(self._queue) >= MAX_QUERIES:
            return _bad("request", "too_many_queries", peer)
        self._queue.append((msg.query, dict(msg.spec)))
        return self._next_stats()

    def _next_stats(self) -> list[Effect]:
        if self._stats_busy or not self._queue:
            return []
        query, wire = self._queue.popleft()
        self._stats_busy = True
        owner = id(self)

        def job() -> ServiceEvent:
            try:
                return StatsDone(owner, query, self._answer(query, wire))
            except SpecError as exc:
                return StatsDone(owner, query, None, exc.code, str(exc)[:MAX_REASON])
            except Exception as exc:  # reading the file, pandas missing, ...
                return StatsDone(owner, query, None, "failed", describe_exc(exc)[:MAX_REASON])

        self._run(job)
        return []

    def _answer(self, query: str, wire: Mapping[str, Any]) -> SiteAnswer:
        """The answer to one query (in a job's thread): the kept one for the same statistic
        (the canonical spec, whatever its name) over the same dataset, else a new release
        within ``[governance]``'s noise floor and ε budget, kept before it leaves."""
        if self._damaged:
            raise SpecError(self._damaged, "failed")
        spec = parse_wire(query, wire)
        gate = self._gate
        if gate is not None:  # SpecError: tag_not_allowed, plan_not_approved
            gate.check_statistics(spec.tag)
        min_noise = float(getattr(gate, "min_noise", 0.0) or 0.0)
        budget = getattr(gate, "epsilon_budget", None)
        z = spec.noise_multiplier
        if (z or 0.0) < min_noise:
            raise SpecError(
                f"this site answers only with noise_multiplier >= {min_noise:g} "
                "([governance] statistics_min_noise)",
                "noise_too_low",
            )
        if budget is not None and z is None:
            raise SpecError(
                "this site has an ε budget ([governance] statistics_epsilon_budget): "
                "it answers noisy queries only",
                "privacy_budget",
            )
        if self._datasets is None:
            raise SpecError("this site has no dataset registry", "dataset_missing")
        ident, frame = self._datasets.open(spec.tag)
        key = _spec_digest(spec.to_wire())  # no name: a renamed query is the same statistic
        with self._lock:
            kept = self._answers.get(key)
            if kept is not None and kept["dataset"] == ident:
                return SiteAnswer(int(kept["n"]), dict(kept["values"]))
            eps = 0.0 if z is None else gaussian_epsilon(z, STATISTICS_DELTA)
            if budget is not None and self._spent + eps > float(budget):
                raise SpecError(
                    f"this release would spend ε = {eps:.3g} beyond the site's budget "
                    f"({self._spent:.3g} of {float(budget):g} spent)",
                    "privacy_budget",
                )
            if kept is None and len(self._answers) >= MAX_ANSWERS:
                exact = [k for k, e in self._answers.items() if not e["noisy"]]
                if not exact:
                    raise SpecError(
                        f"this site keeps {MAX_ANSWERS} noisy answers already and releases "
                        "no new statistic",
                        "statistics_limit",
                    )
                del self._answers[exact[0]]
        answer = compute_site(frame, spec)
        entry = {
            "dataset": ident,
            "n": answer.n,
            "values": dict(answer.values),
            "noisy": z is not None,
        }
        self._keep(key, entry, eps)
        return answer

    def _keep(self, key: str, entry: dict[str, Any], eps: float) -> None:
        """Keep a new release and what it spent, on disk before it leaves (the job's
        thread); a noisy one that cannot be kept is not released."""
        with self._lock:
            self._answers.pop(key, None)
            self._answers[key] = entry
            self._spent += eps  # spent even if the write fails: the count errs high
            snapshot = {
                "format": ANSWERS_FORMAT,
                "answers": dict(self._answers),
                "spent_epsilon": self._spent,
                "delta_per_release": STATISTICS_DELTA,
            }
        if self._answers_path is None:
            return
        try:
            write_json_atomic(self._answers_path, snapshot)
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot write (%s)", self._answers_path, describe_exc(exc))
            if entry["noisy"]:
                with self._lock:
                    self._answers.pop(key, None)
                raise SpecError(
                    f"{self._answers_path}: cannot keep the answer, so it is not released",
                    "failed",
                ) from None

    def _stats_done(self, done: StatsDone) -> list[Effect]:
        self._stats_busy = False
        parent = self._parent_of()
        if done.answer is None:
            msg = StatsReport(self.node_id, done.query, 0, {}, done.code, done.reason)
            out: list[Effect] = [
                Send(parent, msg),
                Metric("federated_stats_refused", 1.0, {"code": done.code}),
                Log(
                    "info",
                    "statistics query refused",
                    {"query": done.query, "code": done.code, "reason": done.reason},
                ),
            ]
        else:
            msg = StatsReport(self.node_id, done.query, done.answer.n, dict(done.answer.values))
            out = [Send(parent, msg), Metric("federated_stats_sent")]
        return out + self._next_stats()


# ------------------------------------------------------------------------- region


def _allowed_src(
    src: str,
    peer: str,
    children: Mapping[str, str],
    subtrees: Mapping[str, Sequence[str]],
    roster_sites: Callable[[], frozenset[str]],
) -> bool:
    """Whether ``peer`` (a child) may carry reports of site ``src``."""
    role = children.get(peer)
    if role == "site":
        return src == peer
    if role != "region":
        return False
    if peer in subtrees:
        return src in subtrees[peer]
    return src in roster_sites() and src not in children


class RegionReports:
    """A region's relay of requests down and reports up (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        parent_of: Callable[[], str],
        children_of: Callable[[], Mapping[str, str]],
        *,
        subtrees: Mapping[str, Sequence[str]] | None = None,
        roster_sites: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.node_id = node_id
        self._parent_of = parent_of
        self._children_of = children_of
        self._subtrees = dict(subtrees or {})
        self._roster_sites = roster_sites
        self.requests: dict[str, StatsRequest] = {}
        self._up: set[str] = set()
        self._tokens = TokenBuckets(RELAY_BURST, RELAY_PER_S)
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._parent_up = False
        # Reports that came while the parent link was down, for when it is back.
        self._held: OrderedDict[tuple[str, str, str], EvalReport | StatsReport] = OrderedDict()

    def intercept(self, event: Event, now: float) -> list[Effect] | None:
        if not isinstance(event, Received):
            return None
        msg, peer = event.msg, event.peer
        if isinstance(msg, StatsRequest):
            if peer != self._parent_of():
                return _bad("request", "not_parent", peer)
            return self._on_request(peer, msg)
        if isinstance(msg, EvalReport | StatsReport):
            return self._relay(peer, msg, now)
        return None

    def observe(self, event: Event, effects: Sequence[Effect], now: float) -> list[Effect]:
        if isinstance(event, PeerUp) and event.peer in self._children_of():
            self._up.add(event.peer)
            return [Send(event.peer, r) for r in self.requests.values()]
        if isinstance(event, PeerUp) and event.peer == self._parent_of():
            # What came while the link was down goes up now. Answers relayed as it went
            # down may have been lost in it: forget them and ask the children again
            # (sites repeat their kept answers; the root keeps one per site and query).
            self._parent_up = True
            held: list[Effect] = [Send(event.peer, m) for m in self._held.values()]
            self._held.clear()
            for key in [k for k in self._seen if k[1] == "stats"]:
                del self._seen[key]
            queries = [r for q, r in self.requests.items() if q != EVALUATE]
            return held + [Send(c, r) for c in sorted(self._up) for r in queries]
        if isinstance(event, PeerDown):
            self._up.discard(event.peer)
            if event.peer == self._parent_of():
                self._parent_up = False
        return []

    def _on_request(self, peer: str, msg: StatsRequest) -> list[Effect]:
        try:
            if msg.query == EVALUATE:
                every = msg.spec.get("every")
                if (
                    set(msg.spec) != {"every"}
                    or type(every) is not int
                    or not 0 <= every <= MAX_EVERY
                ):
                    raise SpecError("bad schedule")
            else:
                if len(msg.spec) > MAX_SPEC_KEYS:
                    raise SpecError("spec too large")
                parse_wire(msg.query, msg.spec)
        except SpecError:
            return _bad("request", "bad_spec", peer)
        old = self.requests.get(msg.query)
        if old is None and len(self.requests) > MAX_QUERIES:
            return _bad("request", "too_many_queries", peer)
        if old is not None and old.spec != msg.spec:
            kind = "eval" if msg.query == EVALUATE else "stats"
            for key in [
                k for k in self._seen if k[1] == kind and (kind == "eval" or k[2] == msg.query)
            ]:
                del self._seen[key]
        self.requests[msg.query] = msg
        if old == msg:
            return []  # the children up now have it; one that connects gets it then
        children = self._children_of()
        return [Send(c, msg) for c in sorted(self._up) if c in children]

    def _relay(self, peer: str, msg: EvalReport | StatsReport, now: float) -> list[Effect]:
        kind = "eval" if isinstance(msg, EvalReport) else "stats"
        children = self._children_of()
        if peer not in children:
            return _bad(kind, "not_child", peer)
        if not _allowed_src(msg.src, peer, children, self._subtrees, self._roster_sites):
            return _bad(kind, "not_in_subtree", peer, {"src": describe(msg.src)})
        key = (msg.src, kind, str(msg.version) if isinstance(msg, EvalReport) else msg.query)
        if key in self._seen:
            return [Metric("report_duplicate", 1.0, {"kind": kind})]
        if not self._tokens.take(peer, now):
            return _bad(kind, "rate", peer)
        self._seen[key] = None
        while len(self._seen) > RELAY_SEEN:
            self._seen.popitem(last=False)
        if not self._parent_up:
            self._held[key] = msg
            while len(self._held) > RELAY_HELD:
                self._held.popitem(last=False)
            return [Metric("report_held", 1.0, {"kind": kind})]
        return [Send(self._parent_of(), msg), Metric("report_relayed", 1.0, {"kind": kind})]


# ------------------------------------------------------------------------- root


class RootReports:
    """The root's schedule, checks, aggregation and publication (module docstring).
    ``view()`` is what the status page shows (JSON-able)."""

    def __init__(
        self,
        node_id: str,
        config: ReportsConfig,
        children_of: Callable[[], Mapping[str, str]],
        *,
        model_version: Callable[[], int | None],
        declared_examples: Callable[[str], int],
        subtrees: Mapping[str, Sequence[str]] | None = None,
        roster_sites: Callable[[], frozenset[str]] = frozenset,
        state_dir: Path | None = None,
        run: Runner | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.every = config.evaluation.every
        self.min_sites = config.evaluation.min_sites
        self.specs = {s.name: s for s in config.analytics}
        self._children_of = children_of
        self._model_version = model_version
        self._declared = declared_examples
        self._subtrees = {r: frozenset(s) for r, s in (subtrees or {}).items()}
        self._roster_sites = roster_sites
        self._state_dir = state_dir
        self._files = JsonFiles(run) if run is not None and state_dir is not None else None
        # version -> {src: (n, accuracy, loss)} of buckets (the first src opened it);
        # published: version -> aggregate
        self.buckets: dict[int, dict[str, tuple[int, float | None, float | None]]] = {}
        self.published: dict[int, dict[str, Any]] = {}
        self.answers: dict[str, dict[str, SiteAnswer]] = {q: {} for q in self.specs}
        self.refused: dict[str, dict[str, str]] = {q: {} for q in self.specs}
        self.results: dict[str, dict[str, Any] | None] = {q: None for q in self.specs}
        self.rejected: dict[str, int] = {}
        self._requests = [StatsRequest(s.name, s.to_wire()) for s in config.analytics]
        self._tokens = TokenBuckets(RELAY_BURST, RELAY_PER_S)
        # Which child carried each site's figures; (kind, key, src) two children
        # contradicted each other on: refused from then on.
        self._via: dict[tuple[str, Any, str], str] = {}
        self._conflicts: set[tuple[str, Any, str]] = set()
        # Without [subtrees]: the sites a region child proved to carry (pairs of its acked
        # forwards), and reports it sent for others, kept until it does.
        self._proven: dict[str, set[str]] = {}
        self._unproven: dict[str, OrderedDict[tuple[str, str, str], EvalReport | StatsReport]] = {}
        self._load()

    # -- persistence
    def _private(self, name: str) -> Path:
        assert self._state_dir is not None
        return self._state_dir / "reports" / name

    def _load(self) -> None:
        """What ``_save_*`` wrote, through the checks a live report gets: an entry that
        fails them is left out (one warning per file)."""
        if self._state_dir is None:
            return
        ev = _read_json(self._private("evaluation.json"))
        dropped = 0
        if (
            isinstance(ev, dict)
            and ev.get("format") == STATE_FORMAT
            and ev.get("every") == self.every
        ):
            buckets = ev.get("buckets")
            for v, sites in (buckets if isinstance(buckets, dict) else {}).items():
                version = _int(v)
                if version is None or not isinstance(sites, dict) or self._version_bad(version):
                    dropped += 1
                    continue
                bucket: dict[str, tuple[int, float | None, float | None]] = {}
                for src, x in sites.items():
                    entry = self._eval_entry(src, x)
                    if entry is None:
                        dropped += 1
                    else:
                        bucket[src] = entry
                if bucket:
                    self.buckets[version] = bucket
            published = ev.get("published")
            for agg in published if isinstance(published, list) else []:
                clean = _published_entry(agg)
                if clean is None:
                    dropped += 1
                else:
                    self.published[clean["version"]] = clean
        while len(self.buckets) > MAX_PENDING_BUCKETS:
            self._evict_bucket(None)
        while len(self.published) > MAX_PUBLISHED_BUCKETS:
            del self.published[min(self.published)]
        if dropped:
            log.warning(
                "%s: %d entries left out (not what a site could report)",
                self._private("evaluation.json"),
                dropped,
            )
        for q, spec in self.specs.items():
            self._load_query(q, spec)

    def _load_query(self, q: str, spec: QuerySpec) -> None:
        entry = _read_json(self._private(f"analytics-{q}.json"))
        if not isinstance(entry, dict) or entry.get("format") != STATE_FORMAT:
            return
        if entry.get("spec") != _spec_digest(spec.to_wire()):
            return  # a changed query starts afresh
        answers: dict[str, SiteAnswer] = {}
        refused: dict[str, str] = {}
        dropped = 0
        raw_answers, raw_refused = entry.get("answers"), entry.get("refused")
        for src, a in (raw_answers if isinstance(raw_answers, dict) else {}).items():
            try:
                n, values = a
                if not isinstance(values, dict):
                    raise SpecError("values is not a table")
                check_values(spec, n, values, max(1, self._declared(src)))
            except (SpecError, TypeError, ValueError):
                dropped += 1
                continue
            answers[src] = SiteAnswer(int(n), {str(k): float(v) for k, v in values.items()})
        for src, code in (raw_refused if isinstance(raw_refused, dict) else {}).items():
            if isinstance(code, str) and _CODE.match(code) and src not in answers:
                refused[src] = code
            else:
                dropped += 1
        if dropped:
            log.warning(
                "%s: %d entries left out (not what a site could report)",
                self._private(f"analytics-{q}.json"),
                dropped,
            )
        try:
            result = aggregate(spec, answers, _counts(refused))
        except Exception as exc:  # never expected: checked answers aggregate
            log.warning("analytics %s: not restored (%s)", q, describe_exc(exc))
            return
        self.answers[q], self.refused[q], self.results[q] = answers, refused, result

    def _save_evaluation(self, published: bool) -> None:
        if self._files is None or self._state_dir is None:
            return
        state = {
            "format": STATE_FORMAT,
            "every": self.every,
            "buckets": {
                str(v): {s: list(x) for s, x in b.items()} for v, b in self.buckets.items()
            },
            "published": [self.published[v] for v in sorted(self.published)],
        }
        self._files.save(self._private("evaluation.json"), state)
        if published:
            self._files.save(self._state_dir / "evaluation.json", self.view()["evaluation"])

    def _save_query(self, query: str) -> None:
        if self._files is None or self._state_dir is None:
            return
        state = {
            "format": STATE_FORMAT,
            "spec": _spec_digest(self.specs[query].to_wire()),
            "answers": {s: [a.n, a.values] for s, a in self.answers[query].items()},
            "refused": dict(self.refused[query]),
        }
        self._files.save(self._private(f"analytics-{query}.json"), state)
        if self.results.get(query) is not None:
            self._files.save(self._state_dir / "analytics" / f"{query}.json", self.results[query])

    # -- middleware
    def intercept(self, event: Event, now: float) -> list[Effect] | None:
        if not isinstance(event, Received):
            return None
        msg, peer = event.msg, event.peer
        if isinstance(msg, EvalReport | StatsReport):
            return self._on_report(peer, msg, now)
        if isinstance(msg, StatsRequest):
            return self._reject("request", "at_root", peer)
        return None

    def observe(self, event: Event, effects: Sequence[Effect], now: float) -> list[Effect]:
        if isinstance(event, Received) and isinstance(event.msg, Update):
            return self._observe_forward(event.peer, event.msg, effects, now)
        if not isinstance(event, PeerUp) or event.peer not in self._children_of():
            return []
        if not self.config.enabled:
            return []  # nothing configured: the children hear nothing of it
        out: list[Effect] = [Send(event.peer, StatsRequest(EVALUATE, {"every": self.every}))]
        return out + [Send(event.peer, r) for r in self._requests]

    def _reject(
        self,
        kind: str,
        reason: str,
        peer: str,
        fields: Mapping[str, Any] | None = None,
        count: int = 1,
    ) -> list[Effect]:
        key = f"{kind}:{reason}"
        self.rejected[key] = self.rejected.get(key, 0) + count
        out = _bad(kind, reason, peer, fields)
        if count != 1:
            out[0] = Metric("report_rejected", float(count), {"kind": kind, "reason": reason})
        return out

    # -- who may speak for a site
    def _src_state(self, peer: str, src: str) -> str:
        """``ok``, ``unproven`` (a region without ``[subtrees]`` that has not yet forwarded
        an update of ``src``: the report waits) or ``no``."""
        children = self._children_of()
        role = children.get(peer)
        if role == "site":
            return "ok" if src == peer else "no"
        if role != "region":
            return "no"
        if peer in self._subtrees:
            return "ok" if src in self._subtrees[peer] else "no"
        if src in children or src not in self._roster_sites():
            return "no"
        return "ok" if src in self._proven.get(peer, ()) else "unproven"

    def _observe_forward(
        self, peer: str, msg: Update, effects: Sequence[Effect], now: float
    ) -> list[Effect]:
        """A region's forward the node acknowledged proves the sites of its pairs are
        under that region (without ``[subtrees]``); reports kept for them go on now."""
        if not msg.pairs or peer in self._subtrees or self._children_of().get(peer) != "region":
            return []
        acked = any(
            isinstance(e, Send) and e.peer == peer and e.msg == Ack(msg.src, msg.seq)
            for e in effects
        )
        if not acked:
            return []
        roster, children = self._roster_sites(), self._children_of()
        proven = self._proven.setdefault(peer, set())
        new = {s for s, _ in msg.pairs if s in roster and s not in children} - proven
        if not new:
            return []
        proven |= new
        held = self._unproven.get(peer)
        if not held:
            return []
        out: list[Effect] = []
        for key in [k for k in held if k[0] in new]:
            out += self._on_report(peer, held.pop(key), now)
        return out

    def _hold(self, peer: str, msg: EvalReport | StatsReport, kind: str) -> list[Effect]:
        key = (msg.src, kind, str(msg.version) if isinstance(msg, EvalReport) else msg.query)
        held = self._unproven.setdefault(peer, OrderedDict())
        held[key] = msg
        while len(held) > RELAY_HELD:
            held.popitem(last=False)
        return [Metric("report_held", 1.0, {"kind": kind})]

    def _on_report(self, peer: str, msg: EvalReport | StatsReport, now: float) -> list[Effect]:
        kind = "eval" if isinstance(msg, EvalReport) else "stats"
        state = self._src_state(peer, msg.src)
        if state == "no":
            return self._reject(kind, "not_in_subtree", peer, {"src": describe(msg.src)})
        if state == "unproven":
            return self._hold(peer, msg, kind)
        if not self._tokens.take((peer, msg.src), now):
            return self._reject(kind, "rate", peer)
        if isinstance(msg, EvalReport):
            return self._on_eval(peer, msg)
        return self._on_stats(peer, msg)

    def _conflict(self, kind: str, key: Any, src: str, peer: str) -> bool:
        """Whether ``peer``'s report of ``src`` for ``key`` comes through another child
        than the one its figures came through (which are then dropped, the caller says)."""
        via = self._via.get((kind, key, src))
        return via is not None and via != peer

    # -- evaluation
    def _version_bad(self, version: int) -> bool:
        return version < 0 or (self.every > 0 and version % self.every != 0)

    def _eval_entry(self, src: Any, x: Any) -> tuple[int, float | None, float | None] | None:
        """``(n, accuracy, loss)`` as a live report must have them, or None."""
        if not isinstance(src, str) or not isinstance(x, list | tuple) or len(x) != 3:
            return None
        n, acc, loss = x
        if type(n) is not int or not 1 <= n <= max(1, self._declared(src)):
            return None
        ok = _metrics_ok(acc, loss)
        return None if ok is None else (n, ok[1], ok[2])

    def _on_eval(self, peer: str, msg: EvalReport) -> list[Effect]:
        if self.every <= 0:
            return self._reject("eval", "not_scheduled", peer)
        current = self._model_version()
        if (
            type(msg.version) is not int
            or self._version_bad(msg.version)
            or current is None
            or msg.version > current
        ):
            return self._reject(
                "eval", "bad_version", peer, {"version": describe(str(msg.version))}
            )
        if type(msg.n_examples) is not int or not 1 <= msg.n_examples <= max(
            1, self._declared(msg.src)
        ):
            return self._reject("eval", "n_examples", peer)
        metrics = msg.metrics
        if len(metrics) > MAX_METRICS or not all(
            isinstance(k, str) and _METRIC_NAME.match(k) for k in metrics
        ):
            return self._reject("eval", "metrics", peer)
        for v in metrics.values():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                return self._reject("eval", "metrics", peer)
        entry = _metrics_ok(metrics.get("accuracy"), metrics.get("loss"))
        if entry is None:
            return self._reject("eval", "metrics", peer)
        figures = (int(msg.n_examples), entry[1], entry[2])
        key = ("eval", msg.version, msg.src)
        if key in self._conflicts:
            return self._reject("eval", "conflict", peer)
        bucket = self.buckets.get(msg.version)
        if bucket is not None and msg.src in bucket:
            if bucket[msg.src] == figures or not self._conflict("eval", msg.version, msg.src, peer):
                return [Metric("report_duplicate", 1.0, {"kind": "eval"})]
            # Two children report this site's figures for this bucket differently: neither
            # is believed.
            del bucket[msg.src]
            self._conflicts.add(key)
            self._via.pop(key, None)
            dropped = self._reject("eval", "conflict", peer, {"src": describe(msg.src)}, count=2)
            return dropped + self._publish(msg.version, bucket, out_only=True)
        if bucket is None:
            if not self._open_bucket(msg.src, msg.version):
                return self._reject("eval", "too_old", peer)
            bucket = self.buckets[msg.version]
        bucket[msg.src] = figures
        self._via[key] = peer
        out: list[Effect] = [Metric("federated_eval_received")]
        if len(bucket) < self.min_sites:
            self._save_evaluation(published=False)
            return out
        return out + self._publish(msg.version, bucket)

    def _open_bucket(self, src: str, version: int) -> bool:
        """A new bucket opened by ``src``: at most ``MAX_BUCKETS_PER_SITE`` pending ones per
        site (its own with the fewest reports gives way), ``MAX_PENDING_BUCKETS`` in all
        (the one with the fewest reports gives way, the oldest of those)."""
        mine = [
            v
            for v, b in self.buckets.items()
            if v not in self.published and b and next(iter(b)) == src
        ]
        if len(mine) >= MAX_BUCKETS_PER_SITE:
            self._evict_bucket(mine)
        elif len(self.buckets) >= MAX_PENDING_BUCKETS:
            self._evict_bucket(None)
        if len(self.buckets) >= MAX_PENDING_BUCKETS:
            return False
        self.buckets[version] = {}
        return True

    def _evict_bucket(self, among: Sequence[int] | None) -> None:
        pool = list(self.buckets) if among is None else list(among)
        if not pool:
            return
        victim = min(pool, key=lambda v: (len(self.buckets[v]), v))
        for src in self.buckets.pop(victim):
            self._via.pop(("eval", victim, src), None)
        self._conflicts = {k for k in self._conflicts if k[0] != "eval" or k[1] != victim}

    def _publish(
        self,
        version: int,
        bucket: Mapping[str, tuple[int, float | None, float | None]],
        out_only: bool = False,
    ) -> list[Effect]:
        """Publish (or, below ``min_sites`` after a conflict, withdraw) ``version``."""
        out: list[Effect] = []
        if len(bucket) < self.min_sites:
            if version in self.published:
                del self.published[version]
                self._save_evaluation(published=True)
            else:
                self._save_evaluation(published=False)
            return out
        agg = _eval_aggregate(version, bucket)
        self.published[version] = agg
        while len(self.published) > MAX_PUBLISHED_BUCKETS:
            del self.published[min(self.published)]
        self._save_evaluation(published=True)
        if version == max(self.published):
            out += [
                Metric("federated_eval_version", float(version)),
                Metric("federated_eval_sites_gauge", float(agg["sites"])),
            ]
            if agg["accuracy"] is not None:
                out.append(Metric("federated_eval_accuracy_ratio", agg["accuracy"]))
            if agg["loss"] is not None:
                out.append(Metric("federated_eval_loss_gauge", agg["loss"]))
        if not out_only:
            out.append(Log("info", "federated evaluation", dict(agg)))
        return out

    # -- statistics
    def _refusal_counts(self, query: str) -> dict[str, int]:
        return _counts(self.refused[query])

    def _on_stats(self, peer: str, msg: StatsReport) -> list[Effect]:
        spec = self.specs.get(msg.query)
        if spec is None:
            return self._reject("stats", "unknown_query", peer, {"query": describe(msg.query)})
        q, src = msg.query, msg.src
        key = ("stats", q, src)
        if key in self._conflicts:
            return self._reject("stats", "conflict", peer)
        answers, refused = dict(self.answers[q]), dict(self.refused[q])
        out: list[Effect]
        if msg.code:
            code = msg.code if _CODE.match(msg.code) else "other"
            if msg.values or msg.n:
                return self._reject("stats", "refusal_with_values", peer)
            if refused.get(src) == code and src not in answers:
                return [Metric("report_duplicate", 1.0, {"kind": "stats"})]
            refused[src] = code
            answers.pop(src, None)
            out = [Metric("federated_stats_refused", 1.0, {"code": code})]
            out.append(
                Log(
                    "warning",
                    "statistics query refused by a site",
                    {
                        "query": q,
                        "src": src,
                        "code": code,
                        "reason": describe(msg.reason, MAX_REASON),
                    },
                )
            )
        else:
            try:
                check_values(spec, msg.n, msg.values, max(1, self._declared(src)))
            except SpecError as exc:
                return self._reject("stats", "values", peer, {"detail": str(exc)})
            answer = SiteAnswer(int(msg.n), {k: float(v) for k, v in msg.values.items()})
            if answers.get(src) == answer:
                return [Metric("report_duplicate", 1.0, {"kind": "stats"})]
            refused.pop(src, None)
            answers[src] = answer
            out = [Metric("federated_stats_received")]
        if self._conflict("stats", q, src, peer):
            # Two children give this site's answer differently: neither is believed.
            self._conflicts.add(key)
            self._via.pop(key, None)
            answers.pop(src, None)
            refused.pop(src, None)
            out = self._reject("stats", "conflict", peer, {"src": describe(src)}, count=2)
        else:
            self._via[key] = peer
        try:
            result = aggregate(spec, answers, _counts(refused))
        except Exception as exc:  # never expected: checked answers aggregate
            return self._reject("stats", "values", peer, {"detail": describe_exc(exc)[:80]})
        self.answers[q], self.refused[q], self.results[q] = answers, refused, result
        if result is not None:
            out.append(Metric("federated_stats_sites_gauge", float(result["sites"]), {"query": q}))
        self._save_query(q)
        return out

    # -- the status page
    def view(self) -> dict[str, Any]:
        """JSON-able: published evaluation buckets (newest last), how many sites each
        unpublished bucket has (no figures), each query's published result (None until
        ``min_sites`` sites answered) and refusal codes, and rejected reports by reason."""
        return {
            "evaluation": {
                "every": self.every,
                "min_sites": self.min_sites,
                "published": [self.published[v] for v in sorted(self.published)],
                "pending": {
                    str(v): len(b)
                    for v, b in sorted(self.buckets.items())
                    if v not in self.published
                },
            },
            "analytics": {
                q: {
                    "tag": self.specs[q].tag,
                    "sites_answered": len(self.answers[q]),
                    "refused": self._refusal_counts(q),
                    "result": self.results[q],
                }
                for q in self.specs
            },
            "rejected": dict(sorted(self.rejected.items())),
        }


def _counts(refused: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for code in refused.values():
        counts[code] = counts.get(code, 0) + 1
    return counts


def _int(text: Any) -> int | None:
    try:
        v = int(text)
    except (TypeError, ValueError):
        return None
    return v if 0 <= v <= 2**62 else None


def _metrics_ok(acc: Any, loss: Any) -> tuple[int, float | None, float | None] | None:
    """``(0, accuracy, loss)`` when they are what a site may report (accuracy in [0, 1],
    ``|loss| <= MAX_LOSS``, finite, at least one of them), else None."""
    for v in (acc, loss):
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
        ):
            return None
    if acc is None and loss is None:
        return None
    if acc is not None and not 0.0 <= acc <= 1.0:
        return None
    if loss is not None and not abs(loss) <= MAX_LOSS:
        return None
    return (0, None if acc is None else float(acc), None if loss is None else float(loss))


def _finite_mean(pairs: Sequence[tuple[int, float]]) -> float | None:
    """The example-weighted mean of ``pairs``, None when there is none or it is not
    finite (``math.fsum``: no intermediate overflow)."""
    total = sum(n for n, _ in pairs)
    if not total:
        return None
    try:
        m = math.fsum(n * v for n, v in pairs) / total
    except (OverflowError, ValueError):
        return None
    return m if math.isfinite(m) else None


def _eval_aggregate(
    version: int, bucket: Mapping[str, tuple[int, float | None, float | None]]
) -> dict[str, Any]:
    def mean(i: int) -> float | None:
        return _finite_mean([(x[0], v) for x in bucket.values() if (v := x[i]) is not None])

    return {
        "version": version,
        "sites": len(bucket),
        "n_examples": sum(x[0] for x in bucket.values()),
        "accuracy": mean(1),
        "loss": mean(2),
    }


def _published_entry(agg: Any) -> dict[str, Any] | None:
    """A published evaluation as ``_eval_aggregate`` makes them, or None."""
    if not isinstance(agg, dict) or set(agg) != {
        "version",
        "sites",
        "n_examples",
        "accuracy",
        "loss",
    }:
        return None
    if not all(type(agg[k]) is int and agg[k] >= 0 for k in ("version", "sites", "n_examples")):
        return None
    acc, loss = agg["accuracy"], agg["loss"]
    if acc is None and loss is None:
        return dict(agg)
    if _metrics_ok(acc, loss) is None:
        return None
    return dict(agg)


# ------------------------------------------------------------------------- wiring


def _roster_sites(d: Any) -> Callable[[], frozenset[str]]:
    def sites() -> frozenset[str]:
        return frozenset(e.node_id for e in d.roster.entries if e.role == "site")

    return sites


def _declared(d: Any) -> Callable[[str], int]:
    cap = int(d.cfg.aggregation.max_examples_per_site)

    def declared(site: str) -> int:
        entry = d.roster.lookup(site)
        if entry is not None and entry.examples is not None:
            return int(entry.examples)
        return cap

    return declared


def add_reports(layered: LayeredNode, d: Any, post: Poster, gate: Any = None) -> None:
    """Layer the role's service onto the daemon's node (sites, regions and the root;
    gossip peers and relays have none). Called in ``serve`` once ``post`` exists."""
    cfg = d.cfg
    node = layered.inner
    run = thread_runner(asyncio.get_running_loop(), post)
    default_parent = cfg.parent.id if cfg.parent is not None else ""

    def parent_of() -> str:
        parent = getattr(node, "parent", None)
        return parent if isinstance(parent, str) else default_parent

    def children_of() -> Mapping[str, str]:
        children = getattr(node, "children", None)
        return children if isinstance(children, Mapping) else {}

    if cfg.role == "site":
        layered.add(
            SiteReports(
                cfg.node_id,
                parent_of,
                d.plan,
                run,
                datasets=DatasetSource(cfg.state_dir),
                answers_path=cfg.state_dir / "analytics-answers.json",
                gate=gate,
            )
        )
    elif cfg.role == "region":
        layered.add(
            RegionReports(
                cfg.node_id,
                parent_of,
                children_of,
                subtrees=cfg.subtrees,
                roster_sites=_roster_sites(d),
            )
        )
    elif cfg.role == "root":

        def model_version() -> int | None:
            current = getattr(node, "current_model", None)
            model = current() if callable(current) else None
            return None if model is None else int(model[0])

        layered.add(
            RootReports(
                cfg.node_id,
                getattr(cfg, "reports", NO_REPORTS),
                children_of,
                model_version=model_version,
                declared_examples=_declared(d),
                subtrees=cfg.subtrees,
                roster_sites=_roster_sites(d),
                state_dir=cfg.state_dir,
                run=run,
            )
        )


def root_reports(node: Any) -> RootReports | None:
    """The ``RootReports`` layered onto ``node`` (a ``LayeredNode``), if any."""
    for m in getattr(node, "middlewares", ()):
        if isinstance(m, RootReports):
            return m
    return None
