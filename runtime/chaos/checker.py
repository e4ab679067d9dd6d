"""The chaos checker: proves or refutes, after a run, what the README promises.

Jepsen-style: the checker reads only what a run left behind (the run-directory contract,
``runtime.chaos.record`` and ``run.json``; the daemons' state directories as the run ended)
and gives one verdict per property:

* ``exactly_once``: every update a child's outbox considers acknowledged (seq up to its
  counter, not pending) is in its parent's applied ledger (or that of the parent's
  standby), and no ledger holds a seq its child never produced; no aggregator recorded one
  ``(src, seq)`` as applied twice, nor folded one site update into two applied forwards
  (in the "applied" records still in its write-ahead log). At every tier: site outbox vs
  region ledger, region forwards vs root ledger. The counts through the tiers (forwards,
  site updates they carry) go into the verdict's data; what cannot be proven from the
  final state (updates a region decided stale) is not claimed.
* ``conservation``: in each region, every update it applied is in exactly one place: in a
  forward it built, in an aggregate it dropped as not finite, or still in its buffer
  (per child, from the counts its checkpoint keeps apart and the records after it; the
  buffer never holds ``buffer_size`` entries). Its other decisions (stale, rejected) are
  ``exactly_once``'s. Where the root keeps a pair ledger, it holds no more updates of a
  site than regions forwarded, and exactly those (less the ones still pending) when one
  region alone, with no standby, forwarded them to a root that applied all its forwards.
* ``versions_monotonic``: from the samples, no aggregator's (or gossip peer's) model
  version decreases while one incarnation runs, and the root's and a peer's never decrease
  across a restart (a version published then lost; a region's, which is only the newest
  global it was sent, is noted); no site's durable state holds a version above the root's
  final.
* ``resumed``: after each fault's end and each intended kill's restart (or pause's
  resume), the root's version (in gossip: every peer's) grows within ``resume_within_s``
  (unless the run ends first, or the nodes are stopped on purpose again: "not observed";
  none observed is "nothing to check", still a pass).
* ``no_unintended_exit``: no daemon exited by itself, except those the scenario expects
  (``expect.refuses_start``: its log must then name the file and offset, its own verdict
  ``refuses_start``; ``expect.allowed_exits``).
* ``progress`` (only when ``expect.min_version`` or ``expect.min_accuracy`` is set): the
  root's (in gossip: every peer's) highest sampled model version and last evaluated
  accuracy reach them.
* ``healthz``: every daemon answered ``/healthz`` ok in every sample, except while
  expected down (an intended kill or pause until its restart or resume) and for a
  start-up grace after each start.

State directories are read on a copy (``StateStore.load`` takes the lock and may repair),
with ``repair=False``. A missing or unreadable file is a FAIL verdict with its reason,
never a traceback. ``check_run`` returns the ``Report``; ``runtime.chaos.report`` writes
``report.json``, ``timeline.png`` and the verdict lines.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloom.algorithms.incorporation import FORWARDS_KEY
from fedloom.algorithms.ledger import AppliedLedger
from fedloom.algorithms.outbox import Outbox
from fedloom.runtime.exit_status import EXIT_CORRUPT_STATE, EXIT_FAILED
from fedloom.transport.error_text import describe

__all__ = [
    "START_GRACE_S",
    "NodeState",
    "Report",
    "RunData",
    "Verdict",
    "check_run",
    "load_run",
    "load_state",
]

# After a process_start a daemon may be unready this long at least: it reports ready once
# its dialled links are up or after runtime.daemon.READY_WAIT_S (10 s) anyway, plus 5 s to
# start; on a loaded machine, START_GRACE_FACTOR times the slowest start-up the run measured.
START_GRACE_S = 15.0
START_GRACE_FACTOR = 2.0
VERSION = "fedloom_model_version"
ACCURACY = "fedloom_eval_accuracy"
AGGREGATORS = ("root", "region")
# Nodes whose model version is checked; a region's is only the newest global it holds (it
# comes back from its checkpoint older and catches up), the others own what they publish.
MODEL_OWNERS = ("root", "region", "peer")
# A parent's per-child counters of updates it decided: a child's progress after a heal.
PROGRESS_COUNTERS = (
    "fedloom_updates_applied_total",
    "fedloom_updates_stale_total",
    "fedloom_updates_late_total",
)
OUTBOX_KEYS = {"site": "site/pending", "region": "region/pending"}
# Where a region's applied updates are: ``applied`` is the sum of the other three.
CONSERVED = ("applied", "forwarded", "nonfinite", "buffered")
# Expectation keys of a scenario (``runtime.chaos.scenario``) that turn a check off.
EXPECT_FLAG = {
    "exactly_once": "exactly_once",
    "conservation": "exactly_once",
    "versions_monotonic": "versions_monotonic",
    "resumed": "resumes",
    "no_unintended_exit": "no_unintended_exits",
    "healthz": "healthz",
}
# A clear refusal to start names the damaged file and a byte offset in one ERROR line.
_OFFSET = re.compile(r"\boffset \d+")
_TRACEBACK = "Traceback (most recent call last)"
REFUSAL_CONTEXT = 30  # log lines before a refusal that belong to the refusing start
# A duplicate on a locked state directory exits with the restartable status (the lock may
# be held by an earlier incarnation still stopping: systemd must try again).
DUPLICATE_REFUSED_STATUS = EXIT_FAILED


@dataclass(frozen=True, slots=True)
class Verdict:
    """One property's outcome: ``detail`` is the one-line reason, ``data`` the evidence."""

    name: str
    passed: bool
    detail: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


@dataclass(slots=True)
class Report:
    """The verdicts of one run, in check order."""

    run_dir: Path
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.verdicts) and all(v.passed for v in self.verdicts)

    @property
    def exit_status(self) -> int:
        return 0 if self.ok else 1

    def __getitem__(self, name: str) -> Verdict:
        for v in self.verdicts:
            if v.name == name:
                return v
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "ok": self.ok,
            "verdicts": [
                {"name": v.name, "passed": v.passed, "detail": v.detail, "data": v.data}
                for v in self.verdicts
            ],
        }


# ------------------------------------------------------------------------------ input


@dataclass(slots=True)
class RunData:
    """``run.json``, the timeline and the samples (bad lines skipped and counted)."""

    run_dir: Path
    run: dict[str, Any]
    timeline: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    problems: list[str]

    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        nodes = self.run.get("nodes")
        return nodes if isinstance(nodes, dict) else {}

    @property
    def expect(self) -> dict[str, Any]:
        expect = self.run.get("expect")
        return expect if isinstance(expect, dict) else {}

    def role(self, node: str) -> str:
        return str(self.nodes.get(node, {}).get("role", ""))

    def by_role(self, role: str) -> list[str]:
        return sorted(n for n in self.nodes if self.role(n) == role)

    @property
    def end_t(self) -> float:
        """When the run ended (``duration_s``, else the last line's ``t``)."""
        duration = self.run.get("duration_s")
        if isinstance(duration, int | float) and math.isfinite(duration):
            return float(duration)
        times = [float(x["t"]) for x in (*self.timeline, *self.samples)]
        return max(times, default=0.0)

    @property
    def start_grace_s(self) -> float:
        """How long a started daemon may take to answer ``/healthz``: ``expect``'s, else
        twice the slowest start-up this run measured (``run.json``'s ``startup_s``, each
        start's ``ready_after_s``: a loaded machine starts slowly, and a restart under
        faults is no faster), at least ``START_GRACE_S``."""
        value = self.expect.get("start_grace_s")
        if isinstance(value, int | float) and math.isfinite(value) and value > 0:
            return float(value)
        measured = [self.run.get("startup_s")] + [
            _detail(e).get("ready_after_s")
            for e in self.timeline
            if e.get("event") == "process_start"
        ]
        slowest = max(
            (float(v) for v in measured if isinstance(v, int | float) and math.isfinite(v)),
            default=0.0,
        )
        return max(START_GRACE_S, START_GRACE_FACTOR * slowest)

    @property
    def resume_within_s(self) -> float:
        for value in (self.expect.get("resume_within_s"), self.run.get("resume_within_s")):
            if isinstance(value, int | float) and value > 0:
                return float(value)
        return 30.0

    def listed(self, key: str) -> set[str]:
        value = self.expect.get(key)
        if isinstance(value, str):
            return {value}
        if isinstance(value, list):
            return {str(v) for v in value}
        return set()

    def versions(self, node: str) -> list[tuple[float, float]]:
        """(t, model version) of ``node``'s samples that carry one, in time order."""
        out = []
        for s in self.samples:
            if s.get("node") != node:
                continue
            value = _metric(s, VERSION)
            if value is not None:
                out.append((float(s["t"]), value))
        return sorted(out)


def _metric(sample: Mapping[str, Any], name: str) -> float | None:
    metrics = sample.get("metrics")
    if not isinstance(metrics, dict):
        return None
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) else None


def _json_lines(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not path.exists():
        problems.append(f"{path.name}: missing")
        return out
    bad = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(obj, dict) and isinstance(obj.get("t"), int | float):
                out.append(obj)
            else:
                bad += 1
    if bad:
        problems.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return sorted(out, key=lambda x: float(x["t"]))


def load_run(run_dir: Path) -> RunData:
    """Read ``run_dir``; raises ``ValueError`` only when ``run.json`` is unusable."""
    problems: list[str] = []
    path = run_dir / "run.json"
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {describe(exc)}") from None
    if not isinstance(run, dict) or not isinstance(run.get("nodes"), dict):
        raise ValueError(f"{path}: no 'nodes' table")
    odd = sorted(n for n, info in run["nodes"].items() if not isinstance(info, dict))
    if odd:
        problems.append(f"run.json: node entries that are not tables: {', '.join(odd)}")
        run["nodes"] = {n: i for n, i in run["nodes"].items() if isinstance(i, dict)}
    timeline = _json_lines(run_dir / "timeline.jsonl", problems)
    samples = _json_lines(run_dir / "samples.jsonl", problems)
    return RunData(run_dir, run, timeline, samples, problems)


# ------------------------------------------------------------------------------ state


@dataclass(slots=True)
class NodeState:
    """What a node's state directory says, reduced to what the checks need."""

    node: str
    seq: int = 0  # its outbox counter: updates it produced
    pending: set[int] = field(default_factory=set)  # produced, not acknowledged
    pending_pairs: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    ledger: AppliedLedger | None = None  # what it recorded from its children
    pairs: AppliedLedger | None = None  # site updates it incorporated through forwards
    # Whether it took site updates numbered far ahead of that ledger (kept apart from it:
    # ``far_pairs`` records, the checkpoint's ``pairs.far``), which the ledger's counts miss.
    far_pairs: bool = False
    applied: list[dict[str, Any]] = field(default_factory=list)  # "applied" records in the WAL
    # Per child, its updates' outcomes (applied, stale, ...) as the aggregator restores
    # them (checkpoint plus records); None: its checkpoint predates the counters.
    outcomes: dict[str, Counter[str]] | None = None
    # A region's per-child account of its applied updates (``_conservation``); None: its
    # checkpoint predates the counts. ``conserved_at_checkpoint`` holds the checkpoint's.
    conservation: dict[str, dict[str, int]] | None = None
    conserved_at_checkpoint: dict[str, dict[str, int]] | None = None
    buffer_size: int | None = None
    # A region's last "applied" record applied an update (not stale, rejected...) that no
    # forward built since the checkpoint carries: the buffer it filled may be full, its
    # forward written in the next group, which a kill can cut off (``_conservation``).
    ends_unforwarded: bool = False
    version: int | None = None  # the model version its durable state holds
    version_note: str = "the checkpoint's version"  # how ``version`` was found
    # ``version`` is what a restart restores (else the checkpoint's: a lower bound only)
    version_restored: bool = False

    @property
    def acknowledged(self) -> list[int]:
        return [s for s in range(1, self.seq + 1) if s not in self.pending]


def _copy_state(src: Path, dst: Path) -> None:
    # The lock file is the live daemon's business; the copy gets a fresh one.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock"))


def load_state(state_dir: Path, node: str, role: str, config: Path | None = None) -> NodeState:
    """Read ``state_dir`` on a copy (never the run's own files); raises ``ValueError`` with
    the reason when it cannot be read. With the node's ``config``, a root's or peer's
    durable version is the one a restart restores (checkpoint plus the records after it)."""
    from fedloom.federation.store import StateStore, StoreError

    if not state_dir.is_dir():
        raise ValueError(f"{state_dir}: missing")
    with tempfile.TemporaryDirectory(prefix="fedloom-check-") as tmp:
        copy = Path(tmp) / "state"
        try:
            _copy_state(state_dir, copy)
            store = StateStore(copy)
            try:
                rec = store.load(repair=False)
            finally:
                store.close()
        except (OSError, StoreError, ValueError) as exc:
            raise ValueError(f"{state_dir}: {describe(exc)}") from None
        except Exception as exc:  # a decoder bug must not end the checker
            why = f"unreadable ({type(exc).__name__}: {describe(exc)})"
            raise ValueError(f"{state_dir}: {why}") from None
        try:
            state = _reduce(node, role, rec.checkpoint, rec.logs)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{state_dir}: unexpected content ({describe(exc)})") from None
        if role in ("root", "peer") and config is not None and config.is_file():
            restored, state.version_note = _restored_version(config, copy)
            if restored is not None:
                state.version, state.version_restored = restored, True
    return state


def _restored_version(config: Path, state_dir: Path) -> tuple[int | None, str]:
    """The model version the node restores from ``state_dir`` (a copy) under ``config``,
    or None and why not."""
    import dataclasses

    from fedloom.runtime.config import load_config
    from fedloom.runtime.daemon import load_node

    try:
        cfg = dataclasses.replace(load_config(config), state_dir=state_dir)
        current = getattr(load_node(cfg), "current_model", None)
        if callable(current):
            return int(current()[0]), "restored from checkpoint and records"
        return None, "no model to restore: the checkpoint's version"
    except Exception as exc:  # the checker reports, never raises
        why = f"{type(exc).__name__}: {describe(exc)}"
        return None, f"not restored ({why}): the checkpoint's version"


def _reduce(node: str, role: str, ckpt: Any, logs: Mapping[str, list[Any]]) -> NodeState:
    state = NodeState(node)
    cp: Mapping[str, Any] = ckpt if isinstance(ckpt, Mapping) else {}
    key = OUTBOX_KEYS.get(role)
    if key is not None:
        outbox = Outbox(key)
        outbox.restore(cp.get("outbox") or {"seq": 0, "pending": []}, logs.get(key, []))
        state.seq = outbox.seq
        for u in outbox.pending():
            state.pending.add(int(u.seq))
            pairs = getattr(u, "pairs", None) or ()
            state.pending_pairs[int(u.seq)] = [(str(p[0]), int(p[1])) for p in pairs]
    applied = _per_update([r for r in logs.get("applied", []) if isinstance(r, Mapping)])
    if role in AGGREGATORS or "ledger" in cp or applied:
        state.ledger = AppliedLedger.from_snapshot(cp.get("ledger") or {})
        state.pairs = AppliedLedger.from_snapshot(cp.get("pairs") or {})
        for r in applied:
            state.ledger.record(str(r["src"]), int(r["seq"]))
            for p in r.get("pairs") or ():  # a decided forward's, applied or not, as live
                state.pairs.record(str(p[0]), int(p[1]))
        state.applied = [{k: v for k, v in r.items() if k != "delta"} for r in applied]
        cp_pairs = cp.get("pairs")
        state.far_pairs = bool(isinstance(cp_pairs, Mapping) and cp_pairs.get("far")) or any(
            r.get("far_pairs") for r in applied
        )
        counted = cp.get("outcomes")
        if isinstance(counted, Mapping) or not cp:  # a fresh one: its records say it all
            state.outcomes = {
                str(src): Counter({str(k): int(v) for k, v in c.items()})
                for src, c in (counted or {}).items()
            }
            after = int(cp.get("log_n") or 0)  # records the checkpoint already holds
            for r in applied:
                if int(r.get("n", after + 1)) > after:
                    state.outcomes.setdefault(str(r["src"]), Counter())[str(r["outcome"])] += 1
    if role == "region" and state.outcomes is not None and ("flushed" in cp or not cp):
        _conservation(state, cp, applied, logs.get(FORWARDS_KEY, []))
        state.ends_unforwarded = _ends_unforwarded(applied, logs.get(OUTBOX_KEYS[role], []))
    state.version = _durable_version(cp)
    return state


def _per_update(records: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The "applied" records with each secure-aggregation cohort record (``"op": "cohort"``:
    the survivors' updates, applied together) read as one applied record per update it
    holds, as the aggregator's own replay does (``_replay_cohort_record``)."""
    out: list[Mapping[str, Any]] = []
    for r in records:
        if r.get("op") != "cohort":
            out.append(r)
            continue
        for src, seq in r.get("pairs") or ():
            out.append(
                {"n": r.get("n"), "src": str(src), "seq": int(seq), "outcome": "applied",
                 "version": r.get("version"), "cohort": True}
            )  # fmt: skip
    return out


def _conservation(
    state: NodeState, cp: Mapping[str, Any], applied: list[Mapping[str, Any]], flushes: list[Any]
) -> None:
    """Per child of a region: applied here, forwarded, dropped as a non-finite aggregate,
    and still buffered, at the checkpoint (three counters the region keeps apart) and at
    the end (the records after it: each applied one enters the buffer, each "flushed"
    record names what left it)."""
    rows: dict[str, dict[str, int]] = {}

    def row(src: str) -> dict[str, int]:
        return rows.setdefault(src, dict.fromkeys(CONSERVED, 0))

    for src, counts in (cp.get("flushed") or {}).items():
        for k in ("forwarded", "nonfinite"):
            row(str(src))[k] = int(counts.get(k, 0))
    buf = cp.get("buffer")
    n = int(buf.get("n_updates", 0)) if isinstance(buf, Mapping) else 0
    filling = (cp.get("forwards") or {}).get("filling") or []
    for note in filling[-n:] if n else []:
        row(str(note["src"]))["buffered"] += 1
    after = int(cp.get("log_n") or 0)
    checkpointed = Counter(
        str(r["src"])
        for r in applied
        if r.get("outcome") == "applied" and int(r.get("n", after + 1)) > after
    )
    assert state.outcomes is not None
    for src, counts in state.outcomes.items():
        row(src)["applied"] = counts.get("applied", 0) - checkpointed[src]
    state.conserved_at_checkpoint = {src: dict(r) for src, r in rows.items()}
    for src, m in checkpointed.items():
        row(src)["applied"] += m
        row(src)["buffered"] += m
    for rec in flushes:
        if not isinstance(rec, Mapping) or rec.get("op") != "flushed":
            continue
        for k in ("forwarded", "nonfinite"):
            for src, m in (rec.get(k) or {}).items():
                row(str(src))[k] += int(m)
                row(str(src))["buffered"] -= int(m)
    state.conservation = rows
    size = cp.get("buffer_size")
    state.buffer_size = int(size) if isinstance(size, int) else None


def _ends_unforwarded(applied: list[Mapping[str, Any]], outbox: list[Any]) -> bool:
    """Whether a region's last "applied" record (after its checkpoint) applied an update
    that no forward added to its outbox since then carries (its site pairs, or its own
    ``(src, seq)`` for a site child)."""
    last = max(applied, key=lambda r: int(r.get("n", 0)), default=None)
    if last is None or last.get("outcome") != "applied":
        return False
    mine = {(str(p[0]), int(p[1])) for p in last.get("pairs") or ()}
    mine.add((str(last["src"]), int(last["seq"])))
    for rec in outbox:
        update = rec.get("update") if isinstance(rec, Mapping) and rec.get("op") == "add" else None
        pairs = getattr(update, "pairs", None) or ()
        if mine & {(str(p[0]), int(p[1])) for p in pairs}:
            return False
    return True


def _durable_version(cp: Mapping[str, Any]) -> int | None:
    if isinstance(cp.get("version"), int):  # an aggregator that owns its model
        return int(cp["version"])
    for key in ("global", "model"):  # a region's global, a site's view
        value = cp.get(key)
        if isinstance(value, list | tuple) and value and isinstance(value[0], int):
            newest = cp.get("newest_version")
            return max(int(value[0]), int(newest) if isinstance(newest, int) else -1)
    newest = cp.get("newest_version")
    return int(newest) if isinstance(newest, int) and newest >= 0 else None


# ------------------------------------------------------------------------------ checks


def _off(data: RunData, name: str) -> Verdict | None:
    key = EXPECT_FLAG.get(name)
    if key is not None and data.expect.get(key) is False:
        return Verdict(name, True, f"not held to it (expect.{key} = false)")
    return None


def _parents_of(data: RunData, node: str) -> list[str]:
    """The node's parent and the parent's standbys (either may have acknowledged it)."""
    parent = data.nodes.get(node, {}).get("parent")
    if not isinstance(parent, str) or parent not in data.nodes:
        return []
    standbys = [n for n, info in data.nodes.items() if info.get("standby_for") == parent]
    return [parent, *sorted(standbys)]


def check_exactly_once(data: RunData, states: Mapping[str, NodeState | str]) -> Verdict:
    name = "exactly_once"
    off = _off(data, name)
    if off is not None:
        return off
    refusing = data.listed("refuses_start")  # their state is expected not to load
    tiered = {
        n
        for c in data.nodes
        if data.role(c) in OUTBOX_KEYS and _parents_of(data, c)
        for n in (c, *_parents_of(data, c))
    }
    bad = {n: s for n, s in states.items() if isinstance(s, str) and n in tiered}
    unreadable = {n: s for n, s in bad.items() if n not in refusing}
    skipped = {n: s for n, s in bad.items() if n in refusing}
    lost: dict[str, list[int]] = {}
    phantom: dict[str, dict[str, int]] = {}
    doubles: dict[str, list[Any]] = {}
    tiers: dict[str, dict[str, int]] = {}
    checked = 0
    for child in sorted(data.nodes):
        role = data.role(child)
        if role not in OUTBOX_KEYS:
            continue
        parents = _parents_of(data, child)
        if not parents:
            continue
        cs = states.get(child)
        ledgers = [(p, states.get(p)) for p in parents]
        if not isinstance(cs, NodeState) or not any(isinstance(s, NodeState) for _, s in ledgers):
            continue  # reported as unreadable
        checked += 1
        known = [(p, s.ledger) for p, s in ledgers if isinstance(s, NodeState) and s.ledger]
        acked = cs.acknowledged
        missing = [q for q in acked if not any(led.seen(child, q) for _, led in known)]
        if missing:
            lost[child] = missing
        for p, led in known:
            mark = led.watermark(child)
            above = led.snapshot()["above"].get(child, [])
            top = max([mark, *above])
            if top > cs.seq:
                phantom.setdefault(child, {})[p] = top
        tiers[child] = {
            "produced": cs.seq,
            "acknowledged": len(acked),
            "pending": len(cs.pending),
            "pending_site_updates": sum(len(v) for v in cs.pending_pairs.values()),
        }
    for node, st in sorted(states.items()):
        if not isinstance(st, NodeState) or not st.applied:
            continue
        once = Counter(
            (str(r["src"]), int(r["seq"])) for r in st.applied if r.get("outcome") == "applied"
        )
        twice = [list(k) for k, n in once.items() if n > 1]
        # A root records the site updates numbered far ahead of its pair ledger apart
        # (``far_pairs``): applied all the same, so counted here too.
        pair_count = Counter(
            (str(p[0]), int(p[1]))
            for r in st.applied
            if r.get("outcome") == "applied"
            for key in ("pairs", "far_pairs")
            for p in r.get(key) or ()
        )
        twice += [["pair", *k] for k, n in pair_count.items() if n > 1]
        if twice:
            doubles[node] = twice[:20]
    decided = _decided_once(states)
    root_pairs = _root_pairs(data, states)
    for root, pairs in root_pairs.items():
        for site in data.by_role("site"):
            site_state = states.get(site)
            if isinstance(site_state, NodeState) and pairs.watermark(site) > site_state.seq:
                phantom.setdefault(site, {})[f"{root} (pairs)"] = pairs.watermark(site)
    evidence = {
        "tiers": tiers,
        "lost": {k: v[:50] for k, v in lost.items()},
        "lost_counts": {k: len(v) for k, v in lost.items()},
        "phantom": phantom,
        "applied_twice": doubles,
        "decisions_vs_seen": decided,
        "unreadable": unreadable,
        "not_checked_refused_start": skipped,
        "root_site_updates": {r: _pair_total(p) for r, p in root_pairs.items()},
        "site_updates": _site_accounting(data, states, root_pairs),
    }
    problems = []
    if lost:
        worst = ", ".join(
            f"{c} seq {v[0]}" + (f" (+{len(v) - 1})" if len(v) > 1 else "")
            for c, v in sorted(lost.items())
        )
        problems.append(f"acknowledged but in no parent's ledger: {worst}")
    if phantom:
        shown = ", ".join(
            f"{c} up to {max(v.values())} (produced {_seq(states, c)})"
            for c, v in sorted(phantom.items())
        )
        problems.append(f"ledger holds seqs the child never produced: {shown}")
    if doubles:
        shown = ", ".join(f"{n}: {v[0]}" for n, v in sorted(doubles.items()))
        problems.append(f"applied twice: {shown}")
    for node, rows in sorted(decided.items()):
        for src, row in sorted(rows.items()):
            if row["decided"] > row["seen"]:
                problems.append(
                    f"{node} decided {row['decided']} updates of {src} but saw {row['seen']} "
                    "(one decided twice)"
                )
            elif row["decided"] < row["seen"] and len(_parents_of(data, src)) < 2:
                problems.append(
                    f"{node}'s ledger counts {row['seen']} updates of {src} as seen but "
                    f"decided {row['decided']} (seqs skipped without a decision)"
                )
    problems += _skipped_across_standbys(data, states, decided)
    if unreadable:
        problems.append(
            "unreadable state: " + "; ".join(f"{k}: {v}" for k, v in unreadable.items())
        )
    if problems:
        return Verdict(name, False, "; ".join(problems), evidence)
    if not checked:
        if not tiered:
            return Verdict(name, True, "not applicable: no child acknowledged by a parent")
        return Verdict(name, False, "no child with a readable outbox and parent ledger", evidence)
    total = sum(t["acknowledged"] for t in tiers.values())
    pending = sum(t["pending"] for t in tiers.values())
    return Verdict(
        name,
        True,
        f"{total} acknowledged updates of {checked} children each in a parent's ledger, "
        f"none applied twice, none unknown to its child ({pending} still pending)",
        evidence,
    )


def check_conservation(data: RunData, states: Mapping[str, NodeState | str]) -> Verdict:
    name = "conservation"
    off = _off(data, name)
    if off is not None:
        return off
    problems: list[str] = []
    unchecked: dict[str, str] = {}
    regions: dict[str, dict[str, dict[str, int]]] = {}
    refusing = data.listed("refuses_start")
    for node in data.by_role("region"):
        st = states.get(node)
        if not isinstance(st, NodeState):
            # Not checked is not conserved: only a region expected to refuse its start
            # (its state damaged on purpose) is let off, and named.
            if node in refusing:
                unchecked[node] = "its state is unreadable, as expected (refuses_start)"
            else:
                problems.append(f"{node} not checked: its state is unreadable (see exactly_once)")
            continue
        if st.conservation is None or st.conserved_at_checkpoint is None:
            unchecked[node] = "its checkpoint predates the counts"
            continue
        regions[node] = st.conservation
        # The three counters the checkpoint keeps apart; after it, the records (each
        # applied one enters the buffer) must leave a buffer that could exist.
        for src, r in sorted(st.conserved_at_checkpoint.items()):
            if r["applied"] != r["forwarded"] + r["nonfinite"] + r["buffered"]:
                problems.append(
                    f"{node} applied {r['applied']} updates of {src} by its checkpoint but "
                    f"forwarded {r['forwarded']}, dropped {r['nonfinite']}, buffered "
                    f"{r['buffered']}"
                )
        negative = sorted(s for s, r in st.conservation.items() if r["buffered"] < 0)
        if negative:
            problems.append(f"{node} forwarded updates of {', '.join(negative)} it never applied")
        held = sum(r["buffered"] for r in st.conservation.values())
        # Exactly full is a state a kill can leave: the update that filled the buffer is
        # written in one group, the forward its flush built in the next (the driver's group
        # commit keeps their order); a restart's replay fills the buffer and rebuilds that
        # forward. Only when that update is the last record and no forward carries it: any
        # later record is written after the forward, so a full buffer behind it, or behind
        # a forward that did carry it, lost a forward.
        full_ok = held == st.buffer_size and st.ends_unforwarded
        if st.buffer_size is not None and held >= st.buffer_size and not full_ok:
            problems.append(
                f"{node} would buffer {held} updates, a full buffer is {st.buffer_size}: "
                "updates left its buffer without a forward"
            )
    root_rows = _root_conservation(data, states, regions, problems)
    evidence = {"regions": regions, "root_pairs": root_rows, "not_checked": unchecked}
    if problems:
        return Verdict(name, False, "; ".join(problems), evidence)
    if not regions:
        why = "; ".join(f"{k}: {v}" for k, v in unchecked.items()) or "no region"
        return Verdict(name, True, f"not applicable: {why}", evidence)
    total = sum(r["applied"] for rows in regions.values() for r in rows.values())
    fwd = sum(r["forwarded"] for rows in regions.values() for r in rows.values())
    exact = sum(1 for r in root_rows.values() if r.get("exact"))
    at_root = (
        f"the root's pair ledger agrees ({exact} of {len(root_rows)} sites exactly)"
        if root_rows
        else "not checked at the root: its state holds no site updates (no [subtrees] "
        "declared, none incorporated yet, or its state unreadable: see exactly_once)"
    )
    skipped = "".join(f"; {k} not checked: {v}" for k, v in unchecked.items())
    return Verdict(
        name,
        True,
        f"{total} updates applied in {len(regions)} regions: {fwd} forwarded, the rest "
        f"dropped as non-finite or buffered; {at_root}{skipped}",
        evidence,
    )


def _root_conservation(
    data: RunData,
    states: Mapping[str, NodeState | str],
    regions: Mapping[str, Mapping[str, Mapping[str, int]]],
    problems: list[str],
) -> dict[str, dict[str, Any]]:
    """Per site: the updates regions forwarded vs those in the root's pair ledger. Exact
    only when one region alone (no standby) forwarded them straight to a root that applied
    every forward of it: else a stale forward or a failover's Overlap (``pairs_lost``,
    announced, not durable) leaves fewer at the root, never more."""
    out: dict[str, dict[str, Any]] = {}
    for root, ledger in _root_pairs(data, states).items():
        root_state = states[root]
        assert isinstance(root_state, NodeState)
        for site in data.by_role("site"):
            carriers = [r for r in regions if site in regions[r]]
            if not carriers:
                continue
            forwarded = sum(regions[r][site]["forwarded"] for r in carriers)
            snap = ledger.snapshot()
            at_root = int(snap["mark"].get(site, 0)) + len(snap["above"].get(site, []))
            pending = 0
            for r in carriers:
                rs = states[r]
                assert isinstance(rs, NodeState)
                carried = {p for ps in rs.pending_pairs.values() for p in ps if p[0] == site}
                pending += sum(1 for p in carried if not ledger.seen(*p))
            # Site updates a region decided and never forwarded (stale, rejected...): the
            # root's pair ledger gives up such a gap once it is far enough behind, and
            # then counts it in its watermark, so the ledger may hold up to that many more.
            undelivered = 0
            for r in carriers:
                rs = states[r]
                assert isinstance(rs, NodeState)
                counts = (rs.outcomes or {}).get(site, Counter())
                undelivered += sum(n for o, n in counts.items() if o != "applied")
            region = carriers[0] if len(carriers) == 1 else None
            decided = (root_state.outcomes or {}).get(region or "", Counter())
            exact = (
                region is not None
                and data.nodes.get(region, {}).get("parent") == root
                and not [n for n, i in data.nodes.items() if i.get("standby_for") == region]
                and root_state.outcomes is not None
                and set(decided) <= {"applied"}
                and not root_state.far_pairs  # counted apart from the ledger's watermark
            )
            out[site] = {
                "forwarded": forwarded,
                "at_root": at_root,
                "pending": pending,
                "undelivered": undelivered,
                "exact": exact,
            }
            if at_root > forwarded + undelivered:
                problems.append(
                    f"{root}'s pair ledger holds {at_root} updates of {site}, "
                    f"regions forwarded {forwarded} (and decided {undelivered} others)"
                )
            elif exact and not forwarded <= at_root + pending <= forwarded + undelivered:
                problems.append(
                    f"{region} forwarded {forwarded} updates of {site}: {at_root} at {root}, "
                    f"{pending} pending, {forwarded - at_root - pending} nowhere"
                )
    return out


def _skipped_across_standbys(
    data: RunData,
    states: Mapping[str, NodeState | str],
    decided: Mapping[str, Mapping[str, Mapping[str, int]]],
) -> list[str]:
    """For a child that a region and its standby both took updates from: every seq either
    ledger counts as seen was decided by one of them. (A standby's ledger starts where the
    child's kept updates start and gives up the gap below, which the primary decided, so one
    ledger alone may count seqs it never decided.)"""
    problems = []
    for child in sorted(data.nodes):
        parents = _parents_of(data, child)
        if len(parents) < 2:
            continue
        seen: set[int] = set()
        total = 0
        for p in parents:
            st = states.get(p)
            if not isinstance(st, NodeState) or st.ledger is None or p not in decided:
                continue
            row = decided[p].get(child)
            if row is None:
                continue
            snap = st.ledger.snapshot()
            seen.update(range(1, int(snap["mark"].get(child, 0)) + 1))
            seen.update(int(q) for q in snap["above"].get(child, []))
            total += row["decided"]
        if total < len(seen):
            problems.append(
                f"{' and '.join(parents)} count {len(seen)} updates of {child} as seen but "
                f"decided {total} between them (seqs skipped without a decision)"
            )
    return problems


def _decided_once(states: Mapping[str, NodeState | str]) -> dict[str, dict[str, dict[str, int]]]:
    """Per aggregator and child: the seqs its ledger has seen and the outcomes it counted
    for them (each seen seq is decided exactly once: a double apply counts one more)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for node, st in sorted(states.items()):
        if not isinstance(st, NodeState) or st.ledger is None or st.outcomes is None:
            continue
        snap = st.ledger.snapshot()
        srcs = set(snap["mark"]) | set(snap["above"]) | set(st.outcomes)
        rows = {}
        for src in sorted(srcs):
            seen = int(snap["mark"].get(src, 0)) + len(snap["above"].get(src, []))
            counts = st.outcomes.get(src, Counter())
            rows[src] = {"seen": seen, "decided": sum(counts.values()), **counts}
        out[node] = rows
    return out


def _site_accounting(
    data: RunData, states: Mapping[str, NodeState | str], root_pairs: Mapping[str, AppliedLedger]
) -> dict[str, dict[str, int]]:
    """Where each site's acknowledged updates are at the end, as far as durable state
    tells: incorporated at the root (its pair ledger, when the root keeps one), or in a
    region's forward still pending. The rest were buffered in a region or decided there
    (stale, rejected): the final state does not tell those apart, so nothing is claimed."""
    in_forwards: Counter[str] = Counter()
    for node in data.by_role("region"):
        st = states.get(node)
        if isinstance(st, NodeState):
            for carried in st.pending_pairs.values():
                in_forwards.update(site for site, _ in carried)
    out = {}
    for site in data.by_role("site"):
        st = states.get(site)
        if not isinstance(st, NodeState):
            continue
        row = {"acknowledged": len(st.acknowledged), "in_pending_forwards": in_forwards[site]}
        for root, ledger in root_pairs.items():
            snap = ledger.snapshot()
            at_root = int(snap["mark"].get(site, 0)) + len(snap["above"].get(site, []))
            row[f"at_{root}"] = at_root
            # buffered in a region, or decided there (stale, rejected): not told apart
            row[f"elsewhere_{root}"] = row["acknowledged"] - at_root - in_forwards[site]
        out[site] = row
    return out


def _seq(states: Mapping[str, NodeState | str], node: str) -> int | str:
    st = states.get(node)
    return st.seq if isinstance(st, NodeState) else "?"


def _root_pairs(data: RunData, states: Mapping[str, NodeState | str]) -> dict[str, AppliedLedger]:
    out = {}
    for root in data.by_role("root"):
        st = states.get(root)
        if isinstance(st, NodeState) and st.pairs is not None and st.pairs.snapshot()["mark"]:
            out[root] = st.pairs
    return out


def _pair_total(ledger: AppliedLedger) -> int:
    snap = ledger.snapshot()
    return int(sum(snap["mark"].values()) + sum(len(v) for v in snap["above"].values()))


def _incarnations(data: RunData, node: str) -> list[float]:
    """Start times of ``node``'s incarnations (its process_start events)."""
    return [
        float(e["t"])
        for e in data.timeline
        if e.get("event") == "process_start" and node in (e.get("targets") or [])
    ]


def check_versions(data: RunData, states: Mapping[str, NodeState | str]) -> Verdict:
    name = "versions_monotonic"
    off = _off(data, name)
    if off is not None:
        return off
    drops: list[str] = []
    notes: list[str] = []
    finals: dict[str, float] = {}
    for node in sorted(data.nodes):
        if data.role(node) not in MODEL_OWNERS:
            continue
        # The scrapes, and between them the "model vN" lines each incarnation logged. A
        # logged line is an evaluation of the model in memory when it began (possibly not
        # yet durable, so never sent), logged when it ended: within one incarnation each
        # series is compared only with itself, and only a scrape (the gauge moves once the
        # version is durable) is a version the node published.
        series = sorted(
            [(t, v, "scrape") for t, v in data.versions(node)]
            + [(t, v, "log") for t, v in _logged_versions(data, node)]
        )
        starts = _incarnations(data, node)
        best = -math.inf  # across incarnations
        prev: tuple[float, float] | None = None
        last: dict[str, float] = {}  # per series, in this incarnation
        for t, v, source in series:
            new_life = prev is not None and any(prev[0] < s <= t for s in starts)
            if new_life:
                last = {}
            before = last.get(source)
            if before is not None and v < before:
                drops.append(f"{node} {before:g} -> {v:g} at t={t:.1f} s (same incarnation)")
            if new_life and v < best:
                text = f"{node} restarted at {v:g} after publishing {best:g} (t={t:.1f} s)"
                (notes if data.role(node) == "region" else drops).append(text)
            if source == "scrape":
                best = max(best, v)
            last[source] = max(v, before if before is not None else v)
            prev = (t, v)
        if series:
            finals[node] = max(v for t, v, _ in series if t >= series[-1][0] - 1e-9)
        st = states.get(node)
        # Published, then not durable; only what a restart restores proves it (the
        # checkpoint alone is older than the records after it).
        lost = (
            data.role(node) in ("root", "peer")
            and isinstance(st, NodeState)
            and st.version_restored
            and st.version is not None
            and st.version < best
        )
        if lost and isinstance(st, NodeState):
            drops.append(
                f"{node} published v{best:g} but its state holds v{st.version} ({st.version_note})"
            )
    above: list[str] = []
    compared = []  # roots whose final version the sites were held to
    for root in data.by_role("root"):
        st = states.get(root)
        final = max(
            finals.get(root, -math.inf),
            float(st.version)
            if isinstance(st, NodeState) and st.version is not None
            else -math.inf,
        )
        if not math.isfinite(final):
            continue
        compared.append(root)
        for site in data.by_role("site"):
            ss = states.get(site)
            if isinstance(ss, NodeState) and ss.version is not None and ss.version > final:
                above.append(f"{site} holds v{ss.version} above {root}'s final v{final:g}")
    evidence = {
        "drops": drops,
        "region_restart_drops": notes,
        "final": finals,
        "sites_above": above,
    }
    if not any(data.versions(n) for n in data.nodes if data.role(n) in MODEL_OWNERS):
        return Verdict(name, False, f"no {VERSION} sample from any root, region or peer", evidence)
    if drops or above:
        return Verdict(name, False, "; ".join(drops + above), evidence)
    # Only a comparison made is claimed (a gossip run has no root; a root may leave no
    # version to compare with).
    detail = "every model version only grew"
    if compared:
        detail += "; no site above the root's final version"
    elif data.by_role("root"):
        detail += "; sites not compared with the root: its final version is unknown"
    if notes:
        detail += f" ({len(notes)} region restart(s) came back older and caught up)"
    return Verdict(name, True, detail, evidence)


def _logged_versions(data: RunData, node: str) -> list[tuple[float, float]]:
    """(t, version) of ``node``'s "model vN" log lines (JSON records with a version)."""
    out = []
    for t, msg, record in _log_records(data, node):
        version = record.get("version")
        if t is not None and isinstance(version, int) and f"model v{version}" in msg:
            out.append((t, float(version)))
    return out


def _heal_points(data: RunData) -> list[tuple[float, str, list[str]]]:
    """(t, what, nodes it healed) after which training must resume: fault ends (a link's
    two ends, or the nodes named), restarts after an intended kill, resumes after a pause."""
    points: list[tuple[float, str, list[str]]] = []
    killed: set[str] = set()
    for e in data.timeline:
        kind, targets = e.get("event"), [str(x) for x in e.get("targets") or []]
        detail = _detail(e)
        if kind == "fault_end":
            healed = sorted(
                {n for target in targets for n in target.split("->") if n in data.nodes}
            )
            what = f"end of {e.get('fault')} on {', '.join(targets)}"
            points.append((float(e["t"]), what, healed))
        elif kind in ("process_kill", "process_pause") and e.get("intended", True):
            if not detail.get("end"):
                killed.update(targets)
        elif kind in ("process_start", "process_resume"):
            back = [n for n in targets if n in killed]
            if back:
                killed.difference_update(back)
                what = "restart" if kind == "process_start" else "resume"
                points.append((float(e["t"]), f"{what} of {', '.join(back)}", back))
    return sorted(points)


def _counted_at(data: RunData, parent: str, child: str) -> list[tuple[float, float]]:
    """(t, updates of ``child`` its parent decided: applied, stale or late) per sample."""
    keys = [f'{m}{{src="{child}"}}' for m in PROGRESS_COUNTERS]
    out = []
    for s in data.samples:
        if s.get("node") != parent:
            continue
        values = [v for k in keys for v in [_metric(s, k)] if v is not None]
        if values:
            out.append((float(s["t"]), sum(values)))
    return sorted(out)


def _first_growth(series: list[tuple[float, float]], t: float) -> float | None:
    """When a counter first grew after ``t``: a sample above the one before it (a restart
    of its owner starts it from zero again, which is no growth)."""
    prev: float | None = None
    for s, v in series:
        if s > t and prev is not None and v > prev:
            return s
        prev = v
    return None


def _progress_series(data: RunData, node: str) -> list[tuple[str, str, list[tuple[float, float]]]]:
    """What shows ``node`` taking part in training again, by role, as (label, whose
    samples, series): a site's or region's updates decided by its parent (or the parent's
    standby); a root's or peer's version."""
    role = data.role(node)
    if role in ("root", "peer"):
        return [(f"{node}'s version", node, data.versions(node))]
    if role in ("site", "region"):
        # A region and its standby stand for the same sites: whichever of them the sites
        # use, its updates reaching the parent is the pair taking part again.
        partners = [node, *_standby_partners(data, node)]
        return [
            (f"{who}'s updates at {p}", p, _counted_at(data, p, who))
            for who in partners
            for p in _parents_of(data, who)
        ]
    return []


def _standby_partners(data: RunData, node: str) -> list[str]:
    """The other regions standing for the same sites as ``node`` (its standbys, or the
    primary it stands by for and that primary's other standbys)."""
    primary = data.nodes.get(node, {}).get("standby_for") or node
    group = {primary} | {n for n, i in data.nodes.items() if i.get("standby_for") == primary}
    return sorted(group - {node})


def check_resumed(data: RunData) -> Verdict:
    """After each heal, training moves again within ``resume_within_s``: the root's version
    (in gossip: every peer's), and at each healed node itself (a site's updates reach its
    parent again, a region's forwards reach the root again)."""
    name = "resumed"
    off = _off(data, name)
    if off is not None:
        return off
    # Training's progress: the root's version; in a gossip federation, every peer's.
    movers = data.by_role("root") or data.by_role("peer")
    if not movers:
        return Verdict(name, False, "run.json names no root and no gossip peer")
    bound, end = data.resume_within_s, data.end_t
    late: list[str] = []
    results: list[dict[str, Any]] = []
    for t, what, healed in _heal_points(data):
        waits: list[float] = []
        again = False  # a node to wait for was stopped on purpose (again) by then
        for node in movers:
            if _down_at(data, node, t + bound):
                again = True
                continue  # stopped on purpose (again): nothing to wait for
            series = data.versions(node)
            base = max((v for s, v in series if s <= t), default=-math.inf)
            grew = next((s for s, v in series if s > t and v > base), None)
            if grew is not None and grew - t <= bound:
                waits.append(grew - t)
            elif grew is None and t + bound > end:
                continue  # not observed: the run ended first
            else:
                after = "never" if grew is None else f"after {grew - t:.1f} s"
                late.append(
                    f"{what} at t={t:.1f} s: {node}'s version grew {after} (bound {bound:g} s)"
                )
                waits.append(math.inf)
        unmeasured: list[str] = []
        for node in healed:
            if node in movers:
                continue
            if _down_at(data, node, t + bound):
                again = True
                continue
            options = [
                (label, series)
                for label, owner, series in _progress_series(data, node)
                if series and not _down_at(data, owner, t + bound)
            ]
            if not options:
                if _progress_series(data, node):
                    unmeasured.append(node)
                continue
            grown = [
                g for _, series in options for g in [_first_growth(series, t)] if g is not None
            ]
            first = min(grown, default=None)
            if first is not None and first - t <= bound:
                waits.append(first - t)
            elif first is None and t + bound > end:
                continue
            else:
                after = "never" if first is None else f"after {first - t:.1f} s"
                late.append(
                    f"{what} at t={t:.1f} s: {options[0][0]} grew {after} (bound {bound:g} s)"
                )
                waits.append(math.inf)
        row: dict[str, Any] = {"t": t, "what": what, "healed": healed}
        if unmeasured:
            row["unmeasured"] = unmeasured
        if waits:
            worst = max(waits)
            row["resumed_after_s"] = round(worst, 3) if math.isfinite(worst) else None
        else:
            note = "stopped again on purpose" if again else "run ended"
            row["resumed_after_s"], row["note"] = None, note
        results.append(row)
    evidence = {"bound_s": bound, "nodes": movers, "points": results}
    if late:
        return Verdict(name, False, "; ".join(late), evidence)
    if not results:
        return Verdict(name, True, "no fault healed during the run", evidence)
    notes = Counter(str(r["note"]) for r in results if r.get("note"))
    seen = len(results) - sum(notes.values())
    unseen = [f"{n} not observed: {note}" for note, n in sorted(notes.items())]
    # Nothing observed is said as such, not as training that resumed.
    parts = [f"training resumed within {bound:g} s after {seen} heal(s)"] if seen else []
    detail = "; ".join(parts + unseen) if seen else "nothing to check: " + "; ".join(unseen)
    return Verdict(name, True, detail, evidence)


def check_progress(data: RunData) -> Verdict | None:
    """``expect.min_version`` and ``expect.min_accuracy``: the root's (in gossip: every
    peer's) highest sampled model version and last evaluated accuracy reach them. None when
    the scenario asks for neither."""
    min_version, min_accuracy = data.expect.get("min_version"), data.expect.get("min_accuracy")
    if min_version is None and min_accuracy is None:
        return None
    name = "progress"
    movers = data.by_role("root") or data.by_role("peer")
    if not movers:
        return Verdict(name, False, "run.json names no root and no gossip peer")
    problems: list[str] = []
    reached: dict[str, dict[str, float | None]] = {}
    for node in movers:
        top = max((v for _, v in data.versions(node)), default=None)
        accuracies = sorted(
            (float(s["t"]), a)
            for s in data.samples
            if s.get("node") == node
            for a in [_metric(s, ACCURACY)]
            if a is not None
        )
        last = accuracies[-1][1] if accuracies else None
        reached[node] = {"version": top, "accuracy": last}
        if min_version is not None:
            if top is None:
                problems.append(f"no {VERSION} sample from {node}")
            elif top < min_version:
                problems.append(
                    f"{node}'s model reached version {int(top)}, expected at least {min_version}"
                )
        if min_accuracy is not None:
            if last is None:
                problems.append(f"no {ACCURACY} sample from {node}")
            elif last < min_accuracy:
                problems.append(
                    f"{node}'s last evaluated accuracy {last:g}, expected at least {min_accuracy:g}"
                )
    evidence = {"min_version": min_version, "min_accuracy": min_accuracy, "reached": reached}
    if problems:
        return Verdict(name, False, "; ".join(problems), evidence)
    shown = ", ".join(
        node
        + (f" version {int(r['version'])}" if r["version"] is not None else "")
        + (f" accuracy {r['accuracy']:g}" if r["accuracy"] is not None else "")
        for node, r in reached.items()
    )
    return Verdict(name, True, f"reached what the scenario expects: {shown}", evidence)


def _down_at(data: RunData, node: str, t: float) -> bool:
    """Whether ``node`` is stopped on purpose (killed or paused, not yet back) at ``t``."""
    down = False
    for e in data.timeline:
        if float(e["t"]) > t:
            break
        if node not in (e.get("targets") or []):
            continue
        kind = e.get("event")
        if kind in ("process_kill", "process_pause") and not _detail(e).get("end"):
            down = True  # the stop at the end of the run is not a fault's
        elif kind in ("process_start", "process_resume"):
            down = False
    return down


def _detail(event: Mapping[str, Any]) -> dict[str, Any]:
    detail = event.get("detail")
    return detail if isinstance(detail, dict) else {}


def _exits(data: RunData) -> list[dict[str, Any]]:
    return [e for e in data.timeline if e.get("event") == "process_exit" and not e.get("intended")]


def check_exits(data: RunData) -> Verdict:
    """No daemon exits by itself (unless the scenario expects it), and every SIGTERM the
    runner sends ends its daemon cleanly: status 0, without the SIGKILL after the grace
    period (the runner's ``process_exit`` with ``intended``: a stop's outcome)."""
    name = "no_unintended_exit"
    off = _off(data, name)
    if off is not None:
        return off
    bad, hung = [], []
    for e in _exits(data):
        for node in e.get("targets") or []:
            if _excused_exit(data, node, float(e["t"])):
                continue
            detail = _detail(e)
            bad.append(
                f"{node} at t={float(e['t']):.1f} s (status {detail.get('returncode')}: "
                f"{detail.get('last_log_line', '')})"
            )
    for e in data.timeline:
        detail = _detail(e)
        if not (
            e.get("event") == "process_exit"
            and e.get("intended")
            and detail.get("signal") == "SIGTERM"
        ):
            continue  # a SIGKILL on purpose ends a daemon however it was doing
        for node in e.get("targets") or []:
            if detail.get("sigkill"):
                hung.append(f"{node} at t={float(e['t']):.1f} s needed SIGKILL after SIGTERM")
            elif detail.get("returncode") not in (0, None):
                hung.append(
                    f"{node} at t={float(e['t']):.1f} s exited with status "
                    f"{detail.get('returncode')} on SIGTERM"
                )
    evidence = {"exits": bad, "unclean_stops": hung}
    if bad or hung:
        text = "; ".join(
            (["exited by itself: " + "; ".join(bad)] if bad else [])
            + (["unclean stop: " + "; ".join(hung)] if hung else [])
        )
        return Verdict(name, False, text, evidence)
    return Verdict(name, True, "no daemon exited except when stopped on purpose", evidence)


def _corrupted_at(data: RunData, node: str) -> tuple[float, str] | None:
    """When ``node``'s state was first damaged, and the file (a corrupt fault that did
    damage something; one that found nothing to damage is not counted)."""
    for e in data.timeline:
        detail = _detail(e)
        if (
            e.get("event") == "fault_start"
            and detail.get("kind") == "corrupt"
            and node in (e.get("targets") or [])
            and isinstance(detail.get("file"), str)
        ):
            return float(e["t"]), Path(detail["file"]).name
    return None


def _excused_exit(data: RunData, node: str, t: float) -> bool:
    """Whether an exit of ``node`` at ``t`` is one the scenario expects: any of an
    ``allowed_exits`` node's, a ``refuses_start`` node's once its state was damaged."""
    if node in data.listed("allowed_exits"):
        return True
    if node not in data.listed("refuses_start"):
        return False
    damaged = _corrupted_at(data, node)
    return damaged is not None and t >= damaged[0]


def _error_level(line: str, record: Mapping[str, Any]) -> bool:
    level = record.get("level")
    if isinstance(level, str):
        return level.lower() in ("error", "critical")
    return line.lstrip().lower().startswith("fedloom: error:")


def check_refuses_start(data: RunData) -> Verdict | None:
    """Each ``refuses_start`` node, once its state was damaged, exits with the corrupt-state
    status after one ERROR line naming the damaged file and an offset (no traceback); it
    does not exit by itself before the damage."""
    nodes = sorted(data.listed("refuses_start"))
    if not nodes:
        return None
    name = "refuses_start"
    problems, lines = [], {}
    for node in nodes:
        damaged = _corrupted_at(data, node)
        exits = [e for e in _exits(data) if node in (e.get("targets") or [])]
        if damaged is None:
            problems.append(f"{node}: no corrupt fault damaged its state")
            continue
        t0, damaged_file = damaged
        early = [e for e in exits if float(e["t"]) < t0]
        if early:
            problems.append(
                f"{node} exited by itself at t={float(early[0]['t']):.1f} s, before its state "
                f"was damaged at t={t0:.1f} s (status {_detail(early[0]).get('returncode')})"
            )
        after = [e for e in exits if float(e["t"]) >= t0]
        if not after:
            problems.append(f"{node} did not refuse to start (no exit after the damage)")
            continue
        bad_status = [
            _detail(e).get("returncode")
            for e in after
            if _detail(e).get("returncode") != EXIT_CORRUPT_STATE
        ]
        if bad_status:
            problems.append(
                f"{node} exited with status {bad_status[0]}, not {EXIT_CORRUPT_STATE} "
                "(damaged state)"
            )
        rel = data.nodes.get(node, {}).get("log") or f"federation/logs/{node}.log"
        path = data.run_dir / str(rel)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            problems.append(f"{node}: cannot read {path}: {describe(exc)}")
            continue
        all_lines = text.splitlines()
        at = []
        for i, line in enumerate(all_lines):
            message = _message(line)
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if (
                damaged_file in message
                and _OFFSET.search(message)
                and _error_level(line, record if isinstance(record, dict) else {})
            ):
                at.append(i)
        clear = [_message(all_lines[i]) for i in at]
        # Earlier incarnations' lines are not the refusal's business: from a few lines
        # before the first refusal on (a traceback printed on the way out comes first).
        window = "\n".join(all_lines[max(0, at[0] - REFUSAL_CONTEXT) :]) if at else ""
        if not clear:
            problems.append(
                f"{node}: no ERROR line names the damaged file ({damaged_file}) and an offset"
            )
        elif _TRACEBACK in window:
            problems.append(f"{node}: refused with a traceback, not one clear line")
        else:
            lines[node] = clear[-1]
    if problems:
        return Verdict(name, False, "; ".join(problems), {"lines": lines})
    shown = "; ".join(f"{n}: {line.strip()}" for n, line in lines.items())
    return Verdict(name, True, shown, {"lines": lines})


def _log_records(data: RunData, node: str) -> list[tuple[float | None, str, dict[str, Any]]]:
    """``node``'s log lines as (t since the run's start or None, message, JSON record)."""
    rel = data.nodes.get(node, {}).get("log") or f"federation/logs/{node}.log"
    try:
        text = (data.run_dir / str(rel)).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    started = data.run.get("started_unix")
    out: list[tuple[float | None, str, dict[str, Any]]] = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            out.append((None, line.strip(), {}))
            continue
        ts = record.get("ts")
        t = (
            float(ts) - float(started)
            if isinstance(ts, int | float) and isinstance(started, int | float)
            else None
        )
        msg = record.get("msg")
        out.append((t, msg if isinstance(msg, str) else line.strip(), record))
    return out


def check_duplicates(data: RunData) -> Verdict | None:
    """A second daemon with a live node's identity must be refused, never swapped in: with
    the same state directory it exits by itself with the configuration status (the lock);
    with a copy of it, its parent counts ``duplicate_identity`` for the node and never
    replaces the original's session while the duplicate runs."""
    starts = [
        e
        for e in data.timeline
        if e.get("event") == "fault_start" and _detail(e).get("kind") == "duplicate"
    ]
    if not starts:
        return None
    name = "duplicate"
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    for e in starts:
        t0, fault = float(e["t"]), e.get("fault")
        node = str((e.get("targets") or ["?"])[0])
        ends = [
            x
            for x in data.timeline
            if x.get("event") == "fault_end" and x.get("fault") == fault and float(x["t"]) >= t0
        ]
        t1 = float(ends[0]["t"]) if ends else data.end_t
        row: dict[str, Any] = {"node": node, "t": t0, "same_state": _detail(e).get("same_state")}
        if _detail(e).get("same_state", True):
            end = _detail(ends[0]) if ends else {}
            row["returncode"] = end.get("returncode")
            if not end.get("exited_by_itself"):
                problems.append(f"{node}'s duplicate (same state) was not refused: it ran on")
            elif end.get("returncode") != DUPLICATE_REFUSED_STATUS:
                problems.append(
                    f"{node}'s duplicate (same state) exited with status "
                    f"{end.get('returncode')}, not {DUPLICATE_REFUSED_STATUS} (the lock)"
                )
            elif "state_dir" not in str(end.get("last_log_line", "")):
                # The status is also any other failure's: its last words name the lock.
                problems.append(
                    f"{node}'s duplicate (same state) did not name the state directory's "
                    f"lock: {end.get('last_log_line', '')!r}"
                )
        else:
            parents = _parents_of(data, node)
            key = f'fedloom_duplicate_identity_total{{peer="{node}"}}'
            counted = max(
                (
                    v
                    for s in data.samples
                    if s.get("node") in parents and float(s["t"]) >= t0
                    for v in [_metric(s, key)]
                    if v is not None
                ),
                default=0.0,
            )
            swaps = [
                f"{p} at t={t:.1f} s"
                for p in parents
                for t, msg, rec in _log_records(data, p)
                if t is not None
                and t0 <= t <= t1
                and "replaced by a newer connection" in msg
                and rec.get("peer") == node
            ]
            row["refused_count"], row["swaps"] = counted, swaps[:20]
            if swaps:
                problems.append(
                    f"{node}'s duplicate replaced the original's session: {', '.join(swaps[:3])}"
                    + (f" (+{len(swaps) - 3})" if len(swaps) > 3 else "")
                )
            if counted <= 0:
                problems.append(f"no parent of {node} counted a duplicate identity")
        rows.append(row)
    if problems:
        return Verdict(name, False, "; ".join(problems), {"duplicates": rows})
    return Verdict(
        name,
        True,
        f"{len(rows)} duplicate daemon(s) refused, none swapped in",
        {"duplicates": rows},
    )


def _message(line: str) -> str:
    """A log line's message: the ``msg`` of a JSON line, else the line itself."""
    try:
        record = json.loads(line)
    except ValueError:
        return line.strip()
    msg = record.get("msg") if isinstance(record, dict) else None
    return msg if isinstance(msg, str) else line.strip()


def _down_spans(data: RunData, node: str) -> list[tuple[float, float]]:
    """When ``node`` is expected not to answer: not yet started, from an intended kill or
    pause to its restart or resume, after each start until it first answers ok (at most
    ``start_grace_s``), after the end."""
    spans: list[tuple[float, float]] = []
    down_from: float | None = -math.inf
    oks = [
        float(s["t"]) for s in data.samples if s.get("node") == node and s.get("healthz") == "ok"
    ]
    for e in data.timeline:
        if node not in (e.get("targets") or []):
            continue
        t, kind = float(e["t"]), e.get("event")
        if down_from is None and (
            kind in ("process_kill", "process_pause")
            or (kind == "process_exit" and _excused_exit(data, node, t))
        ):
            down_from = t
        elif kind in ("process_start", "process_resume"):
            up = t
            if kind == "process_start":  # until it first answers ok, at most the grace
                grace = data.start_grace_s
                up = min([t + grace, *(s for s in oks if t <= s <= t + grace)])
            spans.append((down_from if down_from is not None else t, up))
            down_from = None
    if down_from is not None:
        spans.append((down_from, math.inf))
    return spans


def check_healthz(data: RunData) -> Verdict:
    name = "healthz"
    off = _off(data, name)
    if off is not None:
        return off
    if not data.samples:
        return Verdict(name, False, "no samples")
    failures: Counter[str] = Counter()
    first: dict[str, str] = {}
    spans = {n: _down_spans(data, n) for n in data.nodes}
    started = {n for n in data.nodes if _incarnations(data, n)}
    # A daemon whose first samples came before the runner logged its start is not excused.
    end = data.end_t
    for s in data.samples:
        node, t, health = s.get("node"), float(s["t"]), s.get("healthz")
        if node not in data.nodes or health == "ok" or t > end:
            continue
        if node in started and any(a <= t <= b for a, b in spans[node]):
            continue
        failures[str(node)] += 1
        first.setdefault(str(node), f"{node} {health} at t={t:.1f} s")
    # A daemon with a /healthz and no sample at all was not checked: not a pass (a load
    # site is sampled as its process, the load generator).
    sampled = {s.get("node") for s in data.samples}
    unsampled = sorted(
        n
        for n, info in data.nodes.items()
        if info.get("healthz_url") and not info.get("process") and n not in sampled
    )
    evidence = {"failed_samples": dict(failures), "first": first, "never_sampled": unsampled}
    if failures or unsampled:
        parts = ["not ok while expected up: " + "; ".join(first.values())] if failures else []
        if unsampled:
            parts.append(f"never sampled: {', '.join(unsampled)}")
        return Verdict(name, False, "; ".join(parts), evidence)
    return Verdict(
        name,
        True,
        f"every daemon answered ok in all {len(data.samples)} samples when expected up",
        evidence,
    )


# ------------------------------------------------------------------------------ run


def load_states(data: RunData) -> dict[str, NodeState | str]:
    """Every node's reduced state, or the reason it could not be read."""
    out: dict[str, NodeState | str] = {}
    for node, info in sorted(data.nodes.items()):
        if data.role(node) == "loadgen":  # no state of its own: its sites are listed
            continue
        rel = info.get("state_dir") or f"federation/state/{node}"
        try:
            cfg = info.get("config")
            config = data.run_dir / str(cfg) if isinstance(cfg, str) else None
            out[node] = load_state(data.run_dir / str(rel), node, data.role(node), config)
        except ValueError as exc:
            out[node] = str(exc)
    return out


def check_run(run_dir: Path, *, write: bool = True) -> Report:
    """Check the run in ``run_dir``; with ``write``, also write ``report.json`` and
    ``timeline.png`` and print one line per verdict (``runtime.chaos.report``)."""
    run_dir = Path(run_dir)
    report = Report(run_dir)
    try:
        data = load_run(run_dir)
    except ValueError as exc:
        report.verdicts.append(Verdict("run_dir", False, str(exc)))
    else:
        report.verdicts.extend(_verdicts(data))
    if write:
        from fedloom.runtime.chaos.report import write_report

        write_report(run_dir, report)
    return report


def _verdicts(data: RunData) -> Iterable[Verdict]:
    if data.problems:
        yield Verdict("run_dir", False, "; ".join(data.problems))
    unfinished = _unfinished(data)
    if unfinished:
        yield Verdict("run_dir", False, unfinished)
    states = load_states(data)
    checks: list[tuple[str, Any]] = [
        ("exactly_once", lambda: check_exactly_once(data, states)),
        ("conservation", lambda: check_conservation(data, states)),
        ("versions_monotonic", lambda: check_versions(data, states)),
        ("resumed", lambda: check_resumed(data)),
        ("no_unintended_exit", lambda: check_exits(data)),
        ("refuses_start", lambda: check_refuses_start(data)),
        ("duplicate", lambda: check_duplicates(data)),
        ("healthz", lambda: check_healthz(data)),
        ("progress", lambda: check_progress(data)),
    ]
    for name, check in checks:
        try:
            verdict = check()
        except Exception as exc:  # a checker bug is a failed check, never a traceback
            verdict = Verdict(name, False, f"checker error: {type(exc).__name__}: {describe(exc)}")
        if verdict is not None:
            yield verdict


def _unfinished(data: RunData) -> str:
    """Why the run is partial ("" when it ran to its end, or ``run.json`` does not say):
    its checks hold on a part in which faults may never have healed nor pauses ended."""
    if data.run.get("interrupted") is True:
        return (
            f"the run was interrupted after {data.end_t:.1f} s (Ctrl-C or SIGTERM): a partial "
            "run, whose verdicts cover only that part"
        )
    if data.run.get("finished") is False:
        return (
            "the run did not finish (run.json: finished = false: its runner stopped before "
            "the end): a partial run, whose verdicts cover only that part"
        )
    return ""


def main(argv: list[str] | None = None) -> int:
    """``python -m fedloom.runtime.chaos.checker RUN_DIR``: the verdicts, exit 1 if any failed."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m fedloom.runtime.chaos.checker RUN_DIR"
    if args in (["-h"], ["--help"]):
        print(
            f"{usage}\n\nCheck a run directory of `fedloom chaos`: one verdict line per check "
            "and report.json; exit status 1 if any check failed, 2 on a usage error."
        )
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    return check_run(Path(args[0])).exit_status


if __name__ == "__main__":
    raise SystemExit(main())
