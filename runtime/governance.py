"""What may run on a site's data: plan digests, the operator's approvals, the gate.

A site's operator approves a *plan* (``fedloom plans approve``): the digest of its code
and of its ``[plan]`` table, with a bound on every hyperparameter an aggregator may send
(``lr``, ``local_steps``, ``batch_size``, ``mu``, ...). With ``[governance]
require_approval = true`` (the default for ``[plan] kind = "tabular"``, a hospital's
registered data) the site trains a job only if the plan it runs is approved, not revoked,
every key of the job's config is within its bound and every bounded key is in the job's
config (one left out would run at the plan's default); otherwise the job is refused with
``TrainingRefusedError`` (code ``plan_not_approved`` or ``out_of_bounds``), which the
driver turns into ``TrainFailed`` and the site reports to its aggregator.

* ``plan_digest(cfg)``: ``"sha256:<hex>"`` over a canonical JSON encoding of the plan's
  code (a ``[plan] factory``'s top-level package, every file of it but bytecode, found
  with ``importlib.util.find_spec`` without importing it; for built-in plans fedloom's
  version and its ``workloads`` files) and of the ``[plan]`` table as parsed (sorted
  keys: comments, spacing and key order in the TOML do not matter).
* ``Approvals(state_dir)``: ``STATE_DIR/approvals.json``, written atomically (tmp, fsync,
  ``os.replace``, fsync of the directory) under ``STATE_DIR/approvals.lock``. Readers
  (the daemon) take no lock: a replace is atomic.
* ``GovernedTrainer(inner, state_dir, digest, required)``: the gate. It re-reads the
  approvals whenever the file changed (inode, size, mtime, ctime), so an approval or a
  revocation counts from the next job on, without a restart. In a daemon it runs in the
  driver's thread pool in the daemon's process; with a process pool (``pool``) only the
  inner trainer runs there, after the check (as ``workloads.dp_sgd.LedgerTrainer`` does).
* ``[governance]`` (``read_governance``): ``require_approval`` (unset: true for a tabular
  plan, else false, and the daemon warns once at start that any plan and settings run);
  ``statistics_tags`` (the dataset tags a statistics query may read; unset: the plan's
  own ``dataset_tag``, only while the plan is approved when approval is required);
  ``statistics_min_noise`` (the least noise multiplier a query must ask for; default 0.0:
  exact answers, protected by ``min_cell`` suppression only); ``statistics_epsilon_budget``
  (optional: the ε, at δ = ``runtime.reports.STATISTICS_DELTA`` per release, the site's
  noisy answers may spend in all, by basic composition; with it, exact answers are
  refused).
* ``ReportsGate`` (``reports_gate``): what ``runtime.reports.SiteReports`` asks before it
  evaluates a model on the site's data (the training gate's approval, when required:
  ``plan_not_approved``) and before it answers a statistics query (the tag allowed:
  ``tag_not_allowed``, or ``plan_not_approved`` for the default tag of an unapproved plan).
* ``prepare_plan_code(cfg)``: called before the plan's code is imported
  (``runtime.nodes.build_plan``); where approval is required the digest is computed there,
  once, and for a ``factory`` plan Python is made to ignore the bytecode in the source
  tree (``ignore_tree_bytecode``: ``sys.pycache_prefix`` and ``PYTHONPYCACHEPREFIX`` point
  to ``STATE_DIR/pycache``), so what runs is the source the digest covers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.training import SITE_CONFIG_KEYS, Trainer, TrainingRefusedError
from fedloom.transport.identity import write_atomic

if TYPE_CHECKING:
    import concurrent.futures as cf

    from fedloom.runtime.config import DaemonConfig

log = logging.getLogger("fedloom.daemon")

APPROVALS_FILE = "approvals.json"
LOCK_FILE = "approvals.lock"
FORMAT = 1
DIGEST_FORMAT = "fedloom-plan-digest/1"  # bumped if the canonical encoding ever changes
MAX_CODE_FILES = 20_000
MAX_CODE_BYTES = 512 * 1024 * 1024
MAX_APPROVALS_BYTES = 16 * 1024 * 1024
MAX_INT_DIGITS = 300  # an integer bound a float can still hold (it is compared with floats)
MAX_NAME = 80
MAX_NOTE = 500
KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
# What an aggregator sends today (federation.params.TrainingConfig): the keys an
# approval should bound (``fedloom plans approve`` says which ones it leaves out).
STANDARD_KEYS = ("lr", "local_steps", "batch_size", "mu")
TABULAR_KIND = "tabular"


# ------------------------------------------------------------------------ [governance]


@dataclass(frozen=True, slots=True)
class GovernanceConfig:
    """``[governance]``: ``require_approval`` None (unset): decided by the plan's kind.
    ``statistics_tags`` None (unset): statistics only over the plan's own ``dataset_tag``
    (and, when approval is required, only while the plan is approved)."""

    require_approval: bool | None = None
    statistics_tags: tuple[str, ...] | None = None
    statistics_min_noise: float = 0.0
    statistics_epsilon_budget: float | None = None


NO_GOVERNANCE = GovernanceConfig()


def read_governance(t: Table) -> GovernanceConfig:
    """A ``[governance]`` table (absent or empty: the default for the plan's kind)."""
    require = t.flag("require_approval", None)
    tags = t.array("statistics_tags", None)
    if tags is not None:
        bad = [v for v in tags if not isinstance(v, str) or not KEY_RE.fullmatch(v)]
        if bad:
            raise t.fail("statistics_tags", "a list of dataset tags", bad[0])
        tags = tuple(dict.fromkeys(tags))
    min_noise = t.number("statistics_min_noise", 0.0, min=0.0, max=1e4)
    budget = t.number("statistics_epsilon_budget", None, min=0.0, max=1e6, exclusive_min=True)
    t.finish()
    return GovernanceConfig(
        require_approval=require,
        statistics_tags=tags,
        statistics_min_noise=float(min_noise),
        statistics_epsilon_budget=None if budget is None else float(budget),
    )


def approval_required(cfg: DaemonConfig) -> tuple[bool, bool]:
    """``(required, explicit)``: whether this node's jobs need an approved plan, and
    whether ``[governance] require_approval`` says so (else the plan's kind decides)."""
    gov: GovernanceConfig = getattr(cfg, "governance", NO_GOVERNANCE)
    if gov.require_approval is not None:
        return gov.require_approval, True
    return is_tabular(cfg), False


def is_tabular(cfg: DaemonConfig) -> bool:
    plan = cfg.plan
    if plan is None:
        return False
    if getattr(plan, "tabular", None) is not None or getattr(plan, "kind", None) == TABULAR_KIND:
        return True
    workload = plan.workload
    return isinstance(workload, Mapping) and workload.get("kind") == TABULAR_KIND


# ------------------------------------------------------------------------ plan digest


def plan_table(cfg: DaemonConfig) -> dict[str, Any]:
    """The ``[plan]`` table as parsed: re-read from the config file when the config came
    from one (exactly what the operator wrote), else rebuilt from ``cfg.plan``."""
    if cfg.plan is None:
        raise ConfigError("plan: this config has no [plan] table: there is no plan to approve")
    if cfg.source is not None:
        import tomllib

        try:
            raw = tomllib.loads(Path(cfg.source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{cfg.source}: cannot re-read the [plan] table: {exc}") from None
        table = raw.get("plan")
        if isinstance(table, Mapping):
            return dict(table)
    plan = cfg.plan
    out: dict[str, Any] = dict(plan.workload or {})
    if plan.site_index is not None:
        out["site_index"] = plan.site_index
    if plan.factory is not None:
        out["factory"] = plan.factory
    if plan.args:
        out["args"] = dict(plan.args)
    spec = getattr(plan, "tabular", None)
    if spec is not None:
        out["kind"] = TABULAR_KIND
        is_instance = dataclasses.is_dataclass(spec) and not isinstance(spec, type)
        out["tabular"] = dataclasses.asdict(spec) if is_instance else repr(spec)
    return out


def _canonical(value: Any) -> Any:
    """TOML values as JSON: dates and times as ISO text, tables with string keys."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        _canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")


BYTECODE_DIR = "__pycache__"


def _refuse_entry(path: Path, is_dir: bool) -> None:
    """A hidden entry (not digested: refused) or sourceless bytecode (it would run)."""
    name = path.name
    if name.startswith("."):
        what = "directory" if is_dir else "file"
        raise ConfigError(
            f"plan: {path}: a hidden {what} in the plan's package; the digest does not cover "
            "hidden entries, so a plan that holds one cannot be approved (remove it or move "
            "it out of the package)"
        )
    if not is_dir and name.endswith((".pyc", ".pyo")):
        raise ConfigError(
            f"plan: {path}: compiled bytecode outside {BYTECODE_DIR}/ (Python would import it "
            "without a source file); ship the .py source instead"
        )


def _package_files(roots: Sequence[Path]) -> list[tuple[str, Path]]:
    """Every file under ``roots`` but ``__pycache__`` directories (ignored when the plan
    runs: ``ignore_tree_bytecode``), by relative path (a namespace package's several roots
    are merged, the first one's file winning). ``ConfigError`` naming the first hidden
    entry or sourceless ``.pyc``/``.pyo`` file."""
    found: dict[str, Path] = {}
    seen_dirs: set[str] = set()
    for root in roots:
        for here, dirs, files in os.walk(root, followlinks=True):
            real = os.path.realpath(here)
            if real in seen_dirs:  # a symlink cycle or a directory reached twice
                dirs[:] = []
                continue
            seen_dirs.add(real)
            for name in dirs:
                _refuse_entry(Path(here) / name, True)
            dirs[:] = sorted(d for d in dirs if d != BYTECODE_DIR)
            for name in sorted(files):
                path = Path(here) / name
                _refuse_entry(path, False)
                rel = path.relative_to(root).as_posix()
                found.setdefault(rel, path)
                if len(found) > MAX_CODE_FILES:
                    raise ConfigError(
                        f"plan: {root} holds more than {MAX_CODE_FILES} files; a plan's "
                        "package should be small enough to review"
                    )
    return sorted(found.items())


def _hash_files(files: Sequence[tuple[str, Path]]) -> list[list[str]]:
    out: list[list[str]] = []
    total = 0
    for rel, path in files:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
                    if total > MAX_CODE_BYTES:
                        raise ConfigError(
                            f"plan: the plan's code is larger than {MAX_CODE_BYTES >> 20} MiB"
                        )
                    h.update(chunk)
        except OSError as exc:
            raise ConfigError(f"plan: cannot read {path} to digest the plan: {exc}") from None
        out.append([rel, h.hexdigest()])
    return out


def _module_roots(module: str) -> tuple[str, list[Path]]:
    """The top-level package (or module) of ``module``: its name and where its files are,
    found without importing it."""
    top = module.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"plan.factory: cannot find {top!r}: {exc}") from None
    if spec is None:
        raise ConfigError(
            f"plan.factory: cannot find the module {top!r} (is it installed in this Python, "
            "or on PYTHONPATH?)"
        )
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return top, [Path(p) for p in locations]
    if spec.origin is None or not os.path.isfile(spec.origin):
        raise ConfigError(
            f"plan.factory: {top!r} has no source file to digest (origin {spec.origin!r})"
        )
    return top, [Path(spec.origin)]


def code_manifest(cfg: DaemonConfig) -> dict[str, Any]:
    """What the digest says about the plan's code: the package and its files' hashes."""
    plan = cfg.plan
    if plan is None:
        raise ConfigError("plan: this config has no [plan] table: there is no plan to approve")
    if plan.factory is not None:
        module = plan.factory.partition(":")[0]
        if not module:
            raise ConfigError(f'plan.factory: expected "module:callable", got {plan.factory!r}')
        top, roots = _module_roots(module)
        if len(roots) == 1 and roots[0].is_file():
            files = [(roots[0].name, roots[0])]
        else:
            files = _package_files(roots)
        return {"kind": "factory", "package": top, "files": _hash_files(files)}
    _, roots = _module_roots("fedloom")
    spec = importlib.util.find_spec("fedloom.workloads")
    assert spec is not None and spec.submodule_search_locations
    workloads = [Path(p) for p in spec.submodule_search_locations]
    return {
        "kind": "builtin",
        "fedloom": fedloom_version(),
        "files": _hash_files(_package_files(workloads)),
    }


def fedloom_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedloom")
    except PackageNotFoundError:
        return "dev"


def plan_digest(cfg: DaemonConfig) -> str:
    """``"sha256:<hex>"`` of the plan's code and its ``[plan]`` table (module docstring).
    ``ConfigError`` when there is no plan or its code cannot be found or read."""
    doc = {"format": DIGEST_FORMAT, "code": code_manifest(cfg), "plan": plan_table(cfg)}
    return "sha256:" + hashlib.sha256(canonical_json(doc)).hexdigest()


def plan_name(cfg: DaemonConfig) -> str:
    """A default name for an approval: the factory, the tabular tag, or dataset/model."""
    table = plan_table(cfg)
    if "factory" in table:
        return str(table["factory"])[:MAX_NAME]
    if table.get("kind") == TABULAR_KIND:
        return f"tabular:{table.get('dataset_tag', '?')}/{table.get('model', 'logreg')}"[:MAX_NAME]
    return f"builtin:{table.get('dataset', '?')}/{table.get('model', '?')}"[:MAX_NAME]


# ------------------------------------------------------------------------ bounds

Bound = list[Any] | dict[str, list[Any]]  # [min, max] | {"values": [...]}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    """A finite number a float can hold (a hand-edited integer of hundreds of digits
    overflows it)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _scalar(text: str) -> Any:
    """A bound's value as the operator wrote it: a bool, an int, a float or a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    t = text.strip()
    if re.fullmatch(r"[+-]?\d+", t):
        # Beyond a float's range a bound cannot be compared or stored (OverflowError).
        if len(t.lstrip("+-")) > MAX_INT_DIGITS:
            raise ValueError(f"{clean(t, 24)} is out of range (at most {MAX_INT_DIGITS} digits)")
        return int(t)
    try:
        f = float(t)
    except ValueError:
        return t
    if not math.isfinite(f):
        raise ValueError(f"{t!r} is not a finite number")
    return f


def parse_bound(text: str) -> tuple[str, Bound]:
    """``NAME=MIN:MAX`` (numbers, inclusive), ``NAME=V`` or ``NAME=V1,V2,...`` (allowed
    values: numbers, strings, true/false). ``ValueError`` says what is wrong."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name or not spec.strip():
        raise ValueError(f"expected NAME=MIN:MAX or NAME=V1,V2, got {text!r}")
    if not KEY_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid setting name")
    if name in SITE_CONFIG_KEYS:
        raise ValueError(f"{name!r} is set by the site itself, not the aggregator: no bound")
    if ":" in spec:
        lo_text, _, hi_text = spec.partition(":")
        lo, hi = _scalar(lo_text), _scalar(hi_text)
        if not (_is_number(lo) and _is_number(hi)):
            raise ValueError(f"{name}: a range needs two numbers, got {spec!r}")
        if lo > hi:
            raise ValueError(f"{name}: the minimum {lo} is above the maximum {hi}")
        return name, [lo, hi]
    values = [_scalar(v) for v in spec.split(",")]
    if any(isinstance(v, str) and not v for v in values):
        raise ValueError(f"{name}: an empty value in {spec!r}")
    if name in STANDARD_KEYS and not all(_is_number(v) for v in values):
        raise ValueError(
            f"{name} is a number: expected {name}=MIN:MAX or {name}=V1,V2, got {spec!r}"
        )
    return name, {"values": values}


def check_bounds(bounds: Any, where: str) -> dict[str, Bound]:
    """Bounds as stored, validated (a hand-edited file is checked like the CLI's input)."""
    if not isinstance(bounds, Mapping):
        raise ValueError(f"{where}: bounds must be a table")
    out: dict[str, Bound] = {}
    for key, b in bounds.items():
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise ValueError(f"{where}: bad setting name {key!r}")
        if isinstance(b, list) and len(b) == 2 and all(_is_number(v) for v in b):
            if not all(_finite(v) for v in b) or b[0] > b[1]:
                raise ValueError(f"{where}: {key}: bad range {b!r}")
            out[key] = [b[0], b[1]]
        elif (
            isinstance(b, Mapping)
            and set(b) == {"values"}
            and isinstance(b["values"], list)
            and b["values"]
            and all(isinstance(v, bool | int | float | str) for v in b["values"])
            and all(_finite(v) for v in b["values"] if _is_number(v))
        ):
            out[key] = {"values": list(b["values"])}
        else:
            raise ValueError(f"{where}: {key}: expected [min, max] or {{values = [...]}}")
    return out


def show_bound(b: Bound) -> str:
    if isinstance(b, list):
        return f"{b[0]}:{b[1]}"
    return ",".join(_show_value(v) for v in b["values"])


def _show_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _same(value: Any, allowed: Any) -> bool:
    """``value`` equals ``allowed`` as a setting: bools only equal bools, numbers numbers."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return isinstance(value, bool) and isinstance(allowed, bool) and value == allowed
    if _is_number(value) and _is_number(allowed):
        return bool(value == allowed)
    return type(value) is type(allowed) and value == allowed


def within(value: Any, bound: Bound) -> bool:
    if isinstance(bound, list):
        finite = isinstance(value, int) or (_is_number(value) and math.isfinite(value))
        return _is_number(value) and finite and bound[0] <= value <= bound[1]
    return any(_same(value, a) for a in bound["values"])


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def clean(text: str, limit: int = 40) -> str:
    """A peer's or a file's string fit for a log line: printable ASCII, capped."""
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show_peer_value(value: Any) -> str:
    if isinstance(value, bool | int | float):
        return clean(_show_value(value), 24)
    if isinstance(value, str):
        return repr(clean(value, 24))
    return f"a {clean(type(value).__name__, 16)}"


# ------------------------------------------------------------------------ approvals


@dataclass(frozen=True, slots=True)
class Approval:
    digest: str
    name: str
    note: str
    bounds: Mapping[str, Bound]
    approved_by: str
    approved_at: float
    revoked_at: float | None = None
    revoked_by: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "name": self.name,
            "note": self.note,
            "bounds": {k: v for k, v in sorted(self.bounds.items())},
            "approved_by": self.approved_by,
            "approved_at": self.approved_at,
            "revoked_at": self.revoked_at,
            "revoked_by": self.revoked_by,
        }

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Approval:
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: expected a table")
        digest = raw.get("digest")
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
            raise ValueError(f"{where}: bad digest {digest!r}")
        texts = {k: raw.get(k, "") for k in ("name", "note", "approved_by")}
        if not all(isinstance(v, str) for v in texts.values()):
            raise ValueError(f"{where}: name, note and approved_by must be strings")
        at, revoked = raw.get("approved_at"), raw.get("revoked_at")
        if not isinstance(at, int | float) or isinstance(at, bool) or not _finite(at):
            raise ValueError(f"{where}: approved_at must be a time")
        if not (revoked is None or (_is_number(revoked) and _finite(revoked))):
            raise ValueError(f"{where}: revoked_at must be a time or null")
        by = raw.get("revoked_by")
        return cls(
            digest,
            texts["name"],
            texts["note"],
            check_bounds(raw.get("bounds", {}), where),
            texts["approved_by"],
            float(at),
            None if revoked is None else float(revoked),
            by if isinstance(by, str) else None,
        )


class ApprovalsError(ValueError):
    """``approvals.json`` cannot be read or is damaged (a hand edit, a foreign file)."""


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_approvals(path: Path) -> list[Approval]:
    """The entries of an approvals file, oldest first (none when it does not exist)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_APPROVALS_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ApprovalsError(f"{path}: cannot read: {exc}") from None
    if len(data) > MAX_APPROVALS_BYTES:
        raise ApprovalsError(f"{path}: larger than {MAX_APPROVALS_BYTES >> 20} MiB")
    try:  # ValueError: bad UTF-8 or JSON, an integer of over 4300 digits; RecursionError:
        doc = json.loads(data.decode("utf-8"))  # nesting too deep for the parser
    except (ValueError, RecursionError) as exc:
        raise ApprovalsError(f"{path}: not valid JSON: {clean(str(exc), 120)}") from None
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        raise ApprovalsError(f"{path}: not an approvals file of format {FORMAT}")
    entries = doc.get("approvals")
    if not isinstance(entries, list):
        raise ApprovalsError(f"{path}: 'approvals' must be a list")
    try:
        return [Approval.from_json(e, f"{path}: approvals[{i}]") for i, e in enumerate(entries)]
    except (ValueError, RecursionError) as exc:
        raise ApprovalsError(str(exc)) from None


def active_approval(entries: Sequence[Approval], digest: str) -> Approval | None:
    for entry in reversed(entries):
        if entry.digest == digest and entry.active:
            return entry
    return None


def os_user() -> str:
    """Who runs this command (and, under sudo, who asked for it)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.geteuid()}"
    sudo = os.environ.get("SUDO_USER")
    if sudo and sudo != user:
        user = f"{user} (sudo by {clean(sudo, 32)})"
    return user


class Approvals:
    """``STATE_DIR/approvals.json``: approve, revoke, list (the CLI's side)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / APPROVALS_FILE

    def entries(self) -> list[Approval]:
        return read_approvals(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.state_dir / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ApprovalsError(
                f"{self.state_dir}: cannot lock the approvals: {exc} (run this as the "
                "daemon's user, e.g. sudo -u fedloom ...)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, entries: Sequence[Approval]) -> None:
        doc = {"format": FORMAT, "approvals": [e.to_json() for e in entries]}
        data = json.dumps(doc, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        try:
            write_atomic(self.path, data, mode=0o644)
        except OSError as exc:
            raise ApprovalsError(f"{self.path}: cannot write: {exc}") from None

    def approve(
        self,
        digest: str,
        bounds: Mapping[str, Bound],
        *,
        name: str = "",
        note: str = "",
        by: str | None = None,
        now: float | None = None,
    ) -> tuple[Approval, Approval | None]:
        """Approve ``digest`` with ``bounds``; an active approval of the same digest is
        replaced (marked revoked). Returns the new entry and the replaced one."""
        if not DIGEST_RE.fullmatch(digest):
            raise ApprovalsError(f"bad digest {digest!r} (expected sha256: and 64 hex digits)")
        when = dt.datetime.now(dt.UTC).timestamp() if now is None else now
        who = os_user() if by is None else by
        entry = Approval(
            digest,
            clean(name, MAX_NAME),
            clean(note, MAX_NOTE),
            check_bounds(bounds, "bounds"),
            who,
            when,
        )
        with self._locked():
            entries = self.entries()
            old = active_approval(entries, digest)
            out = [
                _revoked(e, when, who) if e.digest == digest and e.active else e for e in entries
            ]
            out.append(entry)
            self._write(out)
        return entry, old

    def revoke(self, digest: str, *, by: str | None = None, now: float | None = None) -> Approval:
        """Revoke the active approval of ``digest`` (a full digest or a unique prefix of
        at least 8 hex digits); returns it, revoked. ``ApprovalsError`` says why not."""
        when = dt.datetime.now(dt.UTC).timestamp() if now is None else now
        who = os_user() if by is None else by
        with self._locked():
            entries = self.entries()
            full = resolve_digest(entries, digest)
            active = active_approval(entries, full)
            if active is None:
                last = [e for e in entries if e.digest == full][-1]
                assert last.revoked_at is not None
                raise ApprovalsError(f"{full} is already revoked (at {iso(last.revoked_at)})")
            revoked = _revoked(active, when, who)
            self._write([revoked if e is active else e for e in entries])
        return revoked


def _revoked(entry: Approval, when: float, who: str) -> Approval:
    return Approval(
        entry.digest,
        entry.name,
        entry.note,
        entry.bounds,
        entry.approved_by,
        entry.approved_at,
        when,
        who,
    )


def resolve_digest(entries: Sequence[Approval], text: str) -> str:
    """The full digest ``text`` names among ``entries`` (a prefix, with or without
    ``sha256:``, of at least 8 hex digits); ``ApprovalsError`` when none or several."""
    hexpart = text.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{8,64}", hexpart):
        raise ApprovalsError(
            f"bad digest {clean(text)!r}: expected sha256:<hex> (at least 8 hex digits; "
            "see `fedloom plans list`)"
        )
    matches = sorted({e.digest for e in entries if e.digest[7:].startswith(hexpart)})
    if not matches:
        raise ApprovalsError(f"unknown digest {clean(text, 80)}: see `fedloom plans list`")
    if len(matches) > 1:
        raise ApprovalsError(f"{clean(text, 80)} matches {len(matches)} digests; give more digits")
    return matches[0]


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------ the gate


def approve_command(digest: str, keys: Sequence[str] = ()) -> str:
    """The command that fixes a refusal: approve ``digest`` with a bound for ``keys``."""
    bounds = " ".join(f"--bound {k}=MIN:MAX" for k in keys) if keys else "--bound lr=MIN:MAX ..."
    return f"fedloom plans approve --digest {digest} {bounds}"


class GovernedTrainer:
    """A ``Trainer`` that trains a job only if ``digest`` is approved in ``state_dir``'s
    approvals, every key of the job's config (but ``SITE_CONFIG_KEYS``) is within its
    bound and every bounded key is in the config; ``TrainingRefusedError``
    (``plan_not_approved`` / ``out_of_bounds``) otherwise.

    ``required`` False: no check at all. ``pool``: the executor ``inner`` runs in (a
    process pool: the check runs here, in the caller's process, before the job is handed
    over). The approvals are re-read when the file changed; one gate serves concurrent
    jobs (a lock guards the cache).
    """

    def __init__(
        self,
        inner: Trainer,
        state_dir: Path,
        digest: str,
        required: bool = True,
        *,
        pool: cf.Executor | None = None,
    ) -> None:
        self.inner = inner
        self.path = Path(state_dir) / APPROVALS_FILE
        self.digest = digest
        self.required = required
        self.pool = pool
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._entries: list[Approval] = []
        self._error: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        state["pool"] = None  # an executor does not travel; inner then runs in place
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def approval(self) -> Approval | None:
        """This plan's active approval as the file says now (``TrainingRefusedError`` when
        the file is damaged: a gate fails closed)."""
        with self._lock:
            stamp = _stamp(self.path)
            if stamp != self._stamp or stamp is None:
                try:
                    self._entries, self._error = read_approvals(self.path), None
                except ApprovalsError as exc:
                    self._entries, self._error = [], str(exc)
                self._stamp = stamp
            if self._error is not None:
                raise TrainingRefusedError(
                    f"plan not approved: the approvals file is damaged ({clean(self._error, 160)})",
                    code="plan_not_approved",
                )
            return active_approval(self._entries, self.digest)

    def check_approved(self, config: Mapping[str, Any] | None = None) -> Approval | None:
        """This plan's active approval (None when none is required);
        ``TrainingRefusedError`` (``plan_not_approved``) when it has none."""
        if not self.required:
            return None
        approval = self.approval()
        if approval is None:
            revoked = [e for e in self._entries if e.digest == self.digest]
            what = (
                f"its approval was revoked at {iso(revoked[-1].revoked_at or 0.0)}"
                if revoked
                else "it is not approved here"
            )
            raise TrainingRefusedError(
                f"plan {self.digest} not approved: {what}; the site's operator may run: "
                + approve_command(self.digest, _sent_keys(config or {})),
                code="plan_not_approved",
            )
        return approval

    def check(self, config: Mapping[str, Any]) -> None:
        """Raise ``TrainingRefusedError`` unless a job with ``config`` may run."""
        approval = self.check_approved(config)
        if approval is None:
            return
        # Keys are a peer's: any type msgpack allows (bytes too), sorted by their text.
        keys = sorted((k for k in config if k not in SITE_CONFIG_KEYS), key=str)
        unbounded = [k for k in keys if not isinstance(k, str) or k not in approval.bounds]
        if unbounded:
            shown = ", ".join(clean(str(k), 24) for k in unbounded[:5])
            raise TrainingRefusedError(
                f"out of bounds: the approval of plan {self.digest[:19]} has no bound for "
                f"{shown}; the site's operator may approve again with "
                + " ".join(f"--bound {clean(str(k), 24)}=..." for k in unbounded[:5])
                + f" (`fedloom plans approve --digest {self.digest} ...`)",
                code="out_of_bounds",
            )
        # A bounded setting the job leaves out would run at the plan's own default, which
        # no bound covers: refused too (the aggregator sends every setting it has).
        absent = sorted(k for k in approval.bounds if k not in config)
        if absent:
            raise TrainingRefusedError(
                f"out of bounds: the job's settings leave out {', '.join(absent[:5])} "
                f"(missing), bounded by the approval of plan {self.digest[:19]}: the plan "
                "would run with its own default, which no bound covers",
                code="out_of_bounds",
            )
        for k in keys:
            bound = approval.bounds[k]
            if not within(config[k], bound):
                raise TrainingRefusedError(
                    f"out of bounds: {k}={_show_peer_value(config[k])} is outside the "
                    f"approved {k}={show_bound(bound)} for plan {self.digest[:19]}; the site's "
                    f"operator may approve again with --bound {k}=... (`fedloom plans "
                    f"approve --digest {self.digest} ...`)",
                    code="out_of_bounds",
                )

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        self.check(config)
        if self.pool is not None:
            result: TrainResult = self.pool.submit(self.inner, node_id, weights, config).result()
            return result
        return self.inner(node_id, weights, config)


def _sent_keys(config: Mapping[str, Any]) -> list[str]:
    keys = sorted(k for k in config if isinstance(k, str) and k not in SITE_CONFIG_KEYS)
    return [k for k in keys if KEY_RE.fullmatch(k)][:8]


def site_gate(cfg: DaemonConfig, inner: Trainer, pool: cf.Executor | None) -> Trainer:
    """A site daemon's trainer under ``[governance]``: ``inner`` itself when approval is
    not required (one WARNING when that was the default, not the operator's choice), else
    a ``GovernedTrainer`` over this config's plan digest (logged at start, with what to
    run when that plan is not approved yet)."""
    required, explicit = approval_required(cfg)
    node = cfg.node_id
    if not required:
        log.log(
            logging.INFO if explicit else logging.WARNING,
            "%s: any plan and settings will run on this site's data: no approval is required "
            "(set [governance] require_approval = true and approve with `fedloom plans "
            "approve` to decide what runs)",
            node,
            extra={"node": node},
        )
        return inner
    digest = start_digest(cfg)
    gate = GovernedTrainer(inner, cfg.state_dir, digest, True, pool=pool)
    try:
        approved = gate.approval()
    except TrainingRefusedError as exc:
        log.warning("%s: %s", node, exc, extra={"node": node})
        return gate
    if approved is None:
        log.warning(
            "%s: plan %s is not approved: every job will be refused until the operator "
            "runs `fedloom plans approve --config %s --bound lr=MIN:MAX ...`",
            node,
            digest,
            cfg.source or "SITE.toml",
            extra={"node": node, "plan_digest": digest},
        )
    else:
        log.info(
            "%s: plan %s approved (%s) with bounds %s",
            node,
            digest,
            approved.name or "unnamed",
            " ".join(f"{k}={show_bound(b)}" for k, b in sorted(approved.bounds.items())),
            extra={"node": node, "plan_digest": digest},
        )
    return gate


# ------------------------------------------------------------------------ at start

_START_DIGESTS: dict[tuple[str, str, str], str] = {}
PYCACHE_DIR = "pycache"


def _start_key(cfg: DaemonConfig) -> tuple[str, str, str]:
    return cfg.node_id, str(cfg.state_dir), str(cfg.source)


def _gated(cfg: DaemonConfig) -> bool:
    return cfg.plan is not None and cfg.role in ("site", "peer") and approval_required(cfg)[0]


def ignore_tree_bytecode(state_dir: Path) -> None:
    """From now on this process (and the worker processes it spawns) reads and writes
    bytecode under ``STATE_DIR/pycache``, never a package's own ``__pycache__``: a plan's
    code runs from the source files its digest covers (sourceless ``.pyc`` files in its
    package are refused by the digest). Modules already imported are not affected."""
    prefix = str((Path(state_dir) / PYCACHE_DIR).resolve())
    sys.pycache_prefix = prefix
    os.environ["PYTHONPYCACHEPREFIX"] = prefix


def prepare_plan_code(cfg: DaemonConfig) -> None:
    """Before a site's plan code is imported (``runtime.nodes.build_plan``), where approval
    is required: ignore bytecode in the source tree (a ``factory`` plan) and compute the
    plan's digest, once: the daemon's gate uses this digest (``start_digest``), the one of
    the code it imports. A change to the files after this counts from the next start."""
    if not _gated(cfg):
        return
    assert cfg.plan is not None
    if cfg.plan.factory is not None:
        ignore_tree_bytecode(cfg.state_dir)
    _START_DIGESTS[_start_key(cfg)] = plan_digest(cfg)


def start_digest(cfg: DaemonConfig) -> str:
    """The digest ``prepare_plan_code`` computed for ``cfg`` (else computed now)."""
    digest = _START_DIGESTS.get(_start_key(cfg))
    return digest if digest is not None else plan_digest(cfg)


def _no_training(node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
    raise TrainingRefusedError("this gate only answers whether the plan is approved")


def plan_dataset_tag(cfg: DaemonConfig) -> str | None:
    """The ``dataset_tag`` of a tabular plan (None for any other plan)."""
    plan = cfg.plan
    tag = getattr(getattr(plan, "tabular", None), "dataset_tag", None)
    return tag if isinstance(tag, str) else None


class ReportsGate:
    """What a site's evaluation and statistics service may do with the site's data.

    ``approvals``: the training gate (None when approval is not required): evaluation runs
    only while the plan is approved. ``tags``: the dataset tags a statistics query may
    read; ``by_default``: they are the plan's own tag, not ``[governance]
    statistics_tags``, so a query also needs the plan approved (when required). Called in
    the service's job threads; each check re-reads ``approvals.json`` only if it changed.
    ``min_noise`` and ``epsilon_budget``: ``[governance] statistics_min_noise`` and
    ``statistics_epsilon_budget``, which ``runtime.reports.SiteReports`` enforces.
    """

    def __init__(
        self,
        approvals: GovernedTrainer | None,
        tags: frozenset[str],
        by_default: bool,
        min_noise: float = 0.0,
        epsilon_budget: float | None = None,
    ) -> None:
        self.approvals = approvals
        self.tags = tags
        self.by_default = by_default
        self.min_noise = min_noise
        self.epsilon_budget = epsilon_budget

    def check_evaluate(self) -> None:
        """``TrainingRefusedError`` (``plan_not_approved``) unless evaluation may run."""
        if self.approvals is not None:
            self.approvals.check_approved()

    def check_statistics(self, tag: str) -> None:
        """``SpecError`` (``tag_not_allowed`` / ``plan_not_approved``) unless a statistics
        query may read the dataset tagged ``tag``."""
        from fedloom.federation.analytics import SpecError

        if tag not in self.tags:
            allowed = ", ".join(sorted(self.tags)) or "none"
            raise SpecError(
                f"statistics over the tag {clean(tag)!r} are not allowed at this site "
                f"(allowed: {clean(allowed, 120)}; the site's [governance] statistics_tags)",
                "tag_not_allowed",
            )
        if self.by_default and self.approvals is not None:
            try:
                self.approvals.check_approved()
            except TrainingRefusedError as exc:
                raise SpecError(str(exc), exc.code) from None


def reports_gate(cfg: DaemonConfig, trainer: Trainer | None) -> ReportsGate | None:
    """A site's ``ReportsGate`` (None for other roles): ``trainer``'s own gate when it is
    one, else one over this config's plan digest when approval is required."""
    if cfg.role != "site":
        return None
    approvals: GovernedTrainer | None = None
    if _gated(cfg):
        if isinstance(trainer, GovernedTrainer):
            approvals = trainer
        else:
            approvals = GovernedTrainer(_no_training, cfg.state_dir, start_digest(cfg))
    gov: GovernanceConfig = getattr(cfg, "governance", NO_GOVERNANCE)
    privacy = (gov.statistics_min_noise, gov.statistics_epsilon_budget)
    if gov.statistics_tags is not None:
        return ReportsGate(approvals, frozenset(gov.statistics_tags), False, *privacy)
    own = plan_dataset_tag(cfg)
    return ReportsGate(approvals, frozenset({own} if own else ()), True, *privacy)
