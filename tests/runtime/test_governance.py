"""Approving what runs on a site's data (``runtime.governance``): the plan digest, the
approvals file, the gate in front of the trainer, ``[governance]`` and ``fedloom plans``."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import sys
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.cli import main
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.training import SITE_CONFIG_KEYS, TrainingRefusedError
from fedloom.runtime.config import DaemonConfig, load_config, parse_config
from fedloom.runtime.governance import (
    APPROVALS_FILE,
    Approvals,
    ApprovalsError,
    GovernedTrainer,
    approval_required,
    parse_bound,
    plan_digest,
    read_approvals,
    show_bound,
    site_gate,
)

BOUNDS = {"lr": [0.001, 0.1], "local_steps": [1, 20], "batch_size": [8, 128], "mu": [0, 1]}
GOOD = {"lr": 0.05, "local_steps": 5, "batch_size": 32, "mu": 0.0, "seed": 7, "server_round": 3}
DIGEST = "sha256:" + "ab" * 32

SITE_TOML = """\
role = "site"
node_id = "hospital-a"
state_dir = "state"

[identity]
key = "hospital-a.key"

[roster]
path = "roster.toml"
consortium_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="

[parent]
id = "root"
url = "ws://127.0.0.1:9/fedloom"

{plan}
"""


def write_site(directory: Path, plan: str, name: str = "site.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(SITE_TOML.format(plan=plan), encoding="utf-8")
    return path


def load(path: Path) -> DaemonConfig:
    return load_config(path, check_files=False)


class Recorder:
    """An inner trainer that records the jobs it ran (and the thread they ran in)."""

    def __init__(self) -> None:
        self.jobs: list[Mapping[str, Any]] = []
        self.threads: list[str] = []

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        self.jobs.append(dict(config))
        self.threads.append(threading.current_thread().name)
        return TrainResult(weights, 10, {})


def weights() -> Weights:
    return {"w": np.zeros(3, dtype=np.float32)}


# ------------------------------------------------------------------------ the digest


@pytest.fixture
def factory_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A fresh plan package on sys.path (a unique name: find_spec must not see a cached
    module of another test)."""
    name = f"h4plan_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / "code" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "train.py").write_text("def make(lr=0.1):\n    return None\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    return name, pkg


def factory_plan(name: str, scale: int = 2) -> str:
    return f'[plan]\nfactory = "{name}.train:make"\n[plan.args]\nscale = {scale}\n'


def test_the_digest_changes_with_the_code_and_not_with_bytecode(
    tmp_path: Path, factory_pkg: tuple[str, Path]
) -> None:
    name, pkg = factory_pkg
    cfg = load(write_site(tmp_path, factory_plan(name)))
    first = plan_digest(cfg)
    assert first.startswith("sha256:") and len(first) == 71
    assert plan_digest(cfg) == first  # deterministic
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\x00compiled")
    assert plan_digest(cfg) == first
    (pkg / "train.py").write_text("def make(lr=0.1):\n    return 1\n", encoding="utf-8")
    changed = plan_digest(cfg)
    assert changed != first
    (pkg / "helpers.py").write_text("X = 1\n", encoding="utf-8")  # a new file of the package
    assert plan_digest(cfg) not in (first, changed)
    # find_spec only: the plan's package was never imported to digest it.
    assert name not in sys.modules


def test_a_single_module_factory_is_digested_by_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"h4mod_{uuid.uuid4().hex[:8]}"
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{name}.py").write_text("def make():\n    return None\n", encoding="utf-8")
    (code / "unrelated.py").write_text("Y = 2\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(code))
    cfg = load(write_site(tmp_path, f'[plan]\nfactory = "{name}:make"\n'))
    first = plan_digest(cfg)
    (code / "unrelated.py").write_text("Y = 3\n", encoding="utf-8")  # not the plan's code
    assert plan_digest(cfg) == first
    (code / f"{name}.py").write_text("def make():\n    return 0\n", encoding="utf-8")
    assert plan_digest(cfg) != first


def test_the_digest_changes_with_the_plan_table_not_with_comments_spacing_or_order(
    tmp_path: Path, factory_pkg: tuple[str, Path]
) -> None:
    name, _ = factory_pkg
    base = plan_digest(load(write_site(tmp_path, factory_plan(name, 2))))
    reformatted = (
        "# the consortium's plan\n[plan.args]\nscale   =   2   # the same value\n\n"
        f'[plan]\n  factory = "{name}.train:make"\n'
    )
    assert plan_digest(load(write_site(tmp_path, reformatted, "b.toml"))) == base
    assert plan_digest(load(write_site(tmp_path, factory_plan(name, 3), "c.toml"))) != base
    # A built-in plan: the [plan] values are covered too.
    builtin = '[plan]\ndataset = "synthetic"\nmodel = "softmax"\nn_sites = 2\nsite_index = {i}\n'
    one = plan_digest(load(write_site(tmp_path, builtin.format(i=0), "d.toml")))
    assert one != plan_digest(load(write_site(tmp_path, builtin.format(i=1), "e.toml")))
    assert one == plan_digest(
        load(write_site(tmp_path, builtin.format(i=0).replace("\n", "  \n"), "f.toml"))
    )


def test_a_factory_that_cannot_be_found_is_a_config_error(tmp_path: Path) -> None:
    cfg = load(write_site(tmp_path, '[plan]\nfactory = "no_such_pkg_h4_xyz.mod:make"\n'))
    with pytest.raises(ConfigError, match="cannot find the module 'no_such_pkg_h4_xyz'"):
        plan_digest(cfg)


# ------------------------------------------------------------------------ bounds


def test_bounds_parse_numbers_ranges_and_value_sets() -> None:
    assert parse_bound("lr=0.001:0.1") == ("lr", [0.001, 0.1])
    _, b = parse_bound("local_steps=1:20")
    assert b == [1, 20] and all(type(v) is int for v in b)  # ints stay ints
    assert parse_bound("batch_size=16,32,64") == ("batch_size", {"values": [16, 32, 64]})
    assert parse_bound("optimizer=sgd,adam") == ("optimizer", {"values": ["sgd", "adam"]})
    assert parse_bound("nesterov=true") == ("nesterov", {"values": [True]})
    for bad, why in [
        ("lr", "expected NAME=MIN:MAX"),
        ("lr=", "expected NAME=MIN:MAX"),
        ("lr=0.5:0.1", "minimum 0.5 is above the maximum 0.1"),
        ("lr=a:b", "a range needs two numbers"),
        ("lr=fast", "lr is a number"),
        ("lr=0:inf", "not a finite number"),
        ("seed=1:5", "set by the site itself"),
        ("9lives=1:2", "not a valid setting name"),
        ("opt=sgd,,adam", "an empty value"),
        # An integer beyond a float's range was an OverflowError traceback at approve
        # (and one of 4,300+ digits Python's own int() message).
        ("local_steps=1:" + "9" * 400, "out of range"),
        ("local_steps=1:" + "9" * 5000, "out of range"),
        ("batch_size=" + "9" * 400, "out of range"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_bound(bad)


values = st.one_of(
    st.integers(-(10**9), 10**9),
    st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False),
)


@given(st.lists(values, min_size=2, max_size=2))
def test_a_range_bound_round_trips_through_its_text(pair: list[Any]) -> None:
    lo, hi = sorted(pair)
    name, bound = parse_bound(f"x={lo!r}:{hi!r}")
    assert bound == [lo, hi] and [type(v) for v in bound] == [type(lo), type(hi)]
    assert parse_bound(f"x={show_bound(bound)}") == (name, bound)


@given(
    st.lists(
        st.one_of(values, st.booleans(), st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)),
        min_size=1,
        max_size=5,
    )
)
def test_a_value_set_round_trips_through_its_text(items: list[Any]) -> None:
    items = [v for v in items if not (isinstance(v, str) and v in ("true", "false"))] or [1]
    text = ",".join(
        ("true" if v else "false")
        if isinstance(v, bool)
        else repr(v)
        if not isinstance(v, str)
        else v
        for v in items
    )
    _, bound = parse_bound(f"opt={text}")
    assert isinstance(bound, dict)
    assert [(type(v), v) for v in bound["values"]] == [(type(v), v) for v in items]


# ------------------------------------------------------------------------ approvals


def test_approve_list_revoke_round_trip(tmp_path: Path) -> None:
    store = Approvals(tmp_path)
    assert store.entries() == []
    entry, old = store.approve(DIGEST, BOUNDS, name="study-42", note="ethics ref 17", by="alice")
    assert old is None and entry.active and entry.approved_by == "alice"
    again = read_approvals(tmp_path / APPROVALS_FILE)
    assert again == [entry]
    assert again[0].bounds["local_steps"] == [1, 20] and type(again[0].bounds["mu"][1]) is int
    second, replaced = store.approve(DIGEST, {"lr": [0.01, 0.02]}, by="bob")
    assert replaced == entry
    entries = store.entries()
    assert [e.active for e in entries] == [False, True] and entries[1] == second
    revoked = store.revoke(DIGEST[:15], by="carol")  # a unique prefix will do
    assert revoked.revoked_by == "carol" and not any(e.active for e in store.entries())
    with pytest.raises(ApprovalsError, match="already revoked"):
        store.revoke(DIGEST)
    with pytest.raises(ApprovalsError, match="unknown digest"):
        store.revoke("sha256:" + "cd" * 32)
    # Written atomically: no temporary file is left behind, and it is readable by others.
    assert sorted(p.name for p in tmp_path.iterdir()) == [APPROVALS_FILE, "approvals.lock"]
    assert (tmp_path / APPROVALS_FILE).stat().st_mode & 0o777 == 0o644


def _approve_many(state_dir: str, start: int, n: int) -> None:
    store = Approvals(Path(state_dir))
    for i in range(start, start + n):
        store.approve(f"sha256:{i:064x}", {"lr": [0.0, 1.0]}, by="proc")


def test_concurrent_approvals_from_two_processes_all_land(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_approve_many, args=(str(tmp_path), k * 100, 25)) for k in (1, 2)]
    for p in procs:
        p.start()
    _approve_many(str(tmp_path), 0, 25)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    digests = {e.digest for e in Approvals(tmp_path).entries()}
    assert len(digests) == 75  # the lock serialised every read-modify-write


def test_a_damaged_approvals_file_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    (tmp_path / APPROVALS_FILE).write_text('{"format": 1, "approvals": [{"digest": 5}]}')
    with pytest.raises(ApprovalsError, match="bad digest"):
        Approvals(tmp_path).entries()
    (tmp_path / APPROVALS_FILE).write_text("{not json")
    with pytest.raises(ApprovalsError, match="not valid JSON"):
        Approvals(tmp_path).entries()
    # A hand-edited integer of hundreds of digits parses as JSON but overflows a float:
    # an OverflowError traceback (plans list; the gate) rather than a damaged file.
    huge = "9" * 400
    entry = f'"digest": "{DIGEST}", "approved_at": 1, "bounds": {{"local_steps": [1, {huge}]}}'
    (tmp_path / APPROVALS_FILE).write_text(f'{{"format": 1, "approvals": [{{{entry}}}]}}')
    with pytest.raises(ApprovalsError, match="bad range"):
        Approvals(tmp_path).entries()
    entry = f'"digest": "{DIGEST}", "approved_at": {huge}, "bounds": {{}}'
    (tmp_path / APPROVALS_FILE).write_text(f'{{"format": 1, "approvals": [{{{entry}}}]}}')
    with pytest.raises(ApprovalsError, match="approved_at"):
        Approvals(tmp_path).entries()


# ------------------------------------------------------------------------ the gate


def gate(tmp_path: Path, **kw: Any) -> tuple[GovernedTrainer, Recorder]:
    inner = Recorder()
    return GovernedTrainer(inner, tmp_path, DIGEST, True, **kw), inner


def refusal(trainer: GovernedTrainer, config: Mapping[str, Any]) -> TrainingRefusedError:
    with pytest.raises(TrainingRefusedError) as info:
        trainer("hospital-a", weights(), config)
    return info.value


def test_the_gate_refuses_an_unapproved_plan_saying_what_to_run(tmp_path: Path) -> None:
    trainer, inner = gate(tmp_path)
    exc = refusal(trainer, GOOD)
    assert exc.code == "plan_not_approved"
    assert f"fedloom plans approve --digest {DIGEST}" in str(exc)
    assert "--bound lr=MIN:MAX" in str(exc) and "--bound seed" not in str(exc)
    Approvals(tmp_path).approve("sha256:" + "cd" * 32, BOUNDS)  # another plan's approval
    assert refusal(trainer, GOOD).code == "plan_not_approved"
    assert inner.jobs == []


def test_the_gate_trains_in_bounds_and_ignores_the_keys_the_site_adds(tmp_path: Path) -> None:
    trainer, inner = gate(tmp_path)
    Approvals(tmp_path).approve(DIGEST, BOUNDS)
    result = trainer("hospital-a", weights(), GOOD)
    assert result.n_examples == 10 and inner.jobs == [GOOD]
    assert set(SITE_CONFIG_KEYS) <= set(GOOD)  # seed and server_round needed no bound
    edges = {"lr": 0.1, "local_steps": 1, "batch_size": 128, "mu": 0}  # bounds are inclusive
    trainer("hospital-a", weights(), edges)
    assert len(inner.jobs) == 2


def test_a_revocation_counts_from_the_next_job_on(tmp_path: Path) -> None:
    trainer, inner = gate(tmp_path)
    store = Approvals(tmp_path)
    store.approve(DIGEST, BOUNDS)
    trainer("hospital-a", weights(), GOOD)
    store.revoke(DIGEST)
    exc = refusal(trainer, GOOD)  # the same gate object: no restart
    assert exc.code == "plan_not_approved" and "revoked at" in str(exc)
    assert len(inner.jobs) == 1
    store.approve(DIGEST, BOUNDS)  # and an approval as well
    trainer("hospital-a", weights(), GOOD)
    assert len(inner.jobs) == 2


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"lr": 0.5}, "lr=0.5 is outside the approved lr=0.001:0.1"),
        ({"local_steps": 500}, "local_steps=500 is outside"),
        ({"batch_size": 4}, "batch_size=4 is outside"),
        ({"mu": -0.1}, "mu=-0.1 is outside"),
        ({"lr": math.nan}, "lr=nan is outside"),
        ({"lr": math.inf}, "lr=inf is outside"),
        ({"local_steps": True}, "local_steps=true is outside"),
        ({"local_steps": 10**400}, "local_steps=100000000000000000000... is outside"),
        ({"lr": "0.05"}, "lr='0.05' is outside"),
        ({"lr": [0.05]}, "lr=a list is outside"),
        ({"momentum": 0.9}, "has no bound for momentum"),
    ],
)
def test_the_gate_refuses_settings_out_of_bounds_or_without_a_bound(
    tmp_path: Path, change: dict[str, Any], why: str
) -> None:
    trainer, inner = gate(tmp_path)
    Approvals(tmp_path).approve(DIGEST, BOUNDS)
    exc = refusal(trainer, {**GOOD, **change})
    assert exc.code == "out_of_bounds"
    assert why in str(exc) and f"--digest {DIGEST}" in str(exc)
    assert inner.jobs == []


def test_value_sets_compare_types_strictly(tmp_path: Path) -> None:
    trainer, inner = gate(tmp_path)
    Approvals(tmp_path).approve(
        DIGEST, {"opt": {"values": ["sgd"]}, "nesterov": {"values": [False]}, "k": {"values": [1]}}
    )
    trainer("s", weights(), {"opt": "sgd", "nesterov": False, "k": 1.0})  # 1.0 == 1: a number
    assert refusal(trainer, {"opt": "adam", "nesterov": False, "k": 1}).code == "out_of_bounds"
    assert refusal(trainer, {"opt": "sgd", "nesterov": 0, "k": 1}).code == "out_of_bounds"
    assert refusal(trainer, {"opt": "sgd", "nesterov": False, "k": True}).code == "out_of_bounds"
    assert len(inner.jobs) == 1


def test_hostile_setting_names_and_values_are_capped_and_sanitised(tmp_path: Path) -> None:
    trainer, _ = gate(tmp_path)
    Approvals(tmp_path).approve(DIGEST, {"lr": [0.0, 1.0]})
    exc = refusal(trainer, {"lr": 0.1, "x\x1b[31m" + "A" * 5000: 1})
    text = str(exc)
    assert "\x1b" not in text and len(text) < 600 and "has no bound for x?[31mAAA" in text
    exc = refusal(trainer, {"lr": 0.1, b"raw\xff": 1, 7: 2})  # keys of other types too
    assert exc.code == "out_of_bounds" and "has no bound for 7, b'raw" in str(exc)
    exc = refusal(trainer, {"lr": "\n" + "B" * 5000})
    assert "\n" not in str(exc) and len(str(exc)) < 600
    # Not approved: names that are no setting are left out of the suggested command.
    Approvals(tmp_path).revoke(DIGEST)
    assert "x\x1b" not in str(refusal(trainer, {"lr": 0.1, "x\x1b": 1}))


def test_a_damaged_approvals_file_fails_closed(tmp_path: Path) -> None:
    trainer, inner = gate(tmp_path)
    Approvals(tmp_path).approve(DIGEST, BOUNDS)
    trainer("s", weights(), GOOD)
    (tmp_path / APPROVALS_FILE).write_text("{garbage", encoding="utf-8")
    exc = refusal(trainer, GOOD)
    assert exc.code == "plan_not_approved" and "approvals file is damaged" in str(exc)
    (tmp_path / APPROVALS_FILE).unlink()
    assert refusal(trainer, GOOD).code == "plan_not_approved"
    assert len(inner.jobs) == 1


def test_with_a_pool_the_check_runs_here_and_only_the_job_runs_there(tmp_path: Path) -> None:
    with ThreadPoolExecutor(1, thread_name_prefix="the-pool") as pool:
        trainer, inner = gate(tmp_path, pool=pool)
        assert refusal(trainer, GOOD).code == "plan_not_approved"
        assert inner.jobs == []  # nothing reached the pool
        Approvals(tmp_path).approve(DIGEST, BOUNDS)
        trainer("s", weights(), GOOD)
    assert inner.threads[0].startswith("the-pool")


def test_not_required_checks_nothing(tmp_path: Path) -> None:
    inner = Recorder()
    GovernedTrainer(inner, tmp_path, DIGEST, False)("s", weights(), {"anything": 1e9})
    assert len(inner.jobs) == 1


# ------------------------------------------------------------------------ [governance]


def site_raw(plan: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "role": "site",
        "node_id": "hospital-a",
        "state_dir": "state",
        "identity": {"key": "k.key"},
        "roster": {"path": "r.toml", "consortium_key": "A" * 43 + "="},
        "parent": {"id": "root", "url": "ws://127.0.0.1:9/fedloom"},
        "plan": dict(plan),
        **extra,
    }


SYNTH = {"dataset": "synthetic", "model": "softmax", "n_sites": 2, "site_index": 0}


def test_governance_table_is_strict_and_defaults_by_plan_kind(tmp_path: Path) -> None:
    cfg = parse_config(site_raw(SYNTH), base_dir=tmp_path)
    assert approval_required(cfg) == (False, False)
    cfg = parse_config(site_raw(SYNTH, governance={"require_approval": True}), base_dir=tmp_path)
    assert approval_required(cfg) == (True, True)
    with pytest.raises(ConfigError, match=r"governance\.require_approval: expected true or false"):
        parse_config(site_raw(SYNTH, governance={"require_approval": "yes"}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"governance\.require: unknown field"):
        parse_config(site_raw(SYNTH, governance={"require": True}), base_dir=tmp_path)


def test_a_site_warns_once_when_nothing_is_required_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedloom.daemon")
    inner = Recorder()
    cfg = parse_config(site_raw(SYNTH), base_dir=tmp_path)
    assert site_gate(cfg, inner, None) is inner
    warned = [r for r in caplog.records if "any plan and settings will run" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    caplog.clear()
    cfg = parse_config(site_raw(SYNTH, governance={"require_approval": False}), base_dir=tmp_path)
    assert site_gate(cfg, inner, None) is inner
    said = [r for r in caplog.records if "any plan and settings will run" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO  # the operator's own choice


def test_a_required_site_gates_its_trainer_and_says_what_to_approve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedloom.daemon")
    path = write_site(
        tmp_path,
        "[governance]\nrequire_approval = true\n"
        + "[plan]\n"
        + "\n".join(f"{k} = {json.dumps(v)}" for k, v in SYNTH.items()),
    )
    cfg = load(path)
    trainer = site_gate(cfg, Recorder(), None)
    assert isinstance(trainer, GovernedTrainer) and trainer.digest == plan_digest(cfg)
    text = caplog.text
    assert f"plan {trainer.digest} is not approved" in text
    assert f"fedloom plans approve --config {path}" in text
    Approvals(cfg.state_dir).approve(trainer.digest, BOUNDS)
    trainer("hospital-a", weights(), GOOD)


# ------------------------------------------------------------------------ the CLI


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def builtin_site(tmp_path: Path) -> Path:
    plan = "[plan]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in SYNTH.items())
    return write_site(tmp_path, plan)


def test_cli_digest_approve_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = builtin_site(tmp_path)
    cfg = load(site)
    assert main(["plans", "digest", "--config", str(site)]) == 0
    digest = capsys.readouterr().out.strip()
    assert digest == plan_digest(cfg)
    bounds = ["--bound", "lr=0.001:0.1", "--bound", "local_steps=1:20", "--bound", "mu=0:1"]
    assert main(["plans", "approve", "--config", str(site), *bounds, "--note", "study 42"]) == 0
    out = capsys.readouterr().out
    assert f"approved {digest} (builtin:synthetic/softmax)" in out
    assert "no bound for batch_size" in out  # a job sending it would be refused
    assert main(["plans", "list", "--state-dir", str(cfg.state_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["digest"], r["status"], r["note"]) for r in rows] == [
        (digest, "approved", "study 42")
    ]
    assert rows[0]["bounds"]["local_steps"] == [1, 20]
    assert main(["plans", "revoke", digest[:20], "--config", str(site)]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["plans", "list", "--config", str(site)]) == 0
    assert " revoked " in capsys.readouterr().out
    # Every change is in the node's audit log, attributed to the node.
    from fedloom.runtime.audit import read_entries

    entries = read_entries(cfg.state_dir)
    kinds = [(e["kind"], e["node"], e["fields"]["digest"]) for e in entries]
    assert kinds == [
        ("plan_approved", "hospital-a", digest),
        ("plan_revoked", "hospital-a", digest),
    ]
    assert entries[0]["fields"]["bounds"]["lr"] == [0.001, 0.1]


def test_cli_approves_a_digest_the_consortium_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = builtin_site(tmp_path)
    state = load(site).state_dir
    state.mkdir(parents=True)
    args = [
        "plans",
        "approve",
        "--state-dir",
        str(state),
        "--digest",
        DIGEST.upper().replace("SHA256", "sha256"),
    ]
    assert main([*args, "--bound", "lr=0.01:0.05", "--bound", "batch_size=16,32"]) == 0
    assert [e.digest for e in Approvals(state).entries()] == [DIGEST]
    assert Approvals(state).entries()[0].bounds["batch_size"] == {"values": [16, 32]}
    capsys.readouterr()
    # With --config too: the site's own plan is another one, and the command says so.
    assert main(["plans", "approve", "--config", str(site), "--digest", DIGEST]) == 0
    assert "own plan has another digest" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["approve", "--bound", "lr=fast"], "--bound: lr is a number"),
        (["approve", "--bound", "lr"], "--bound: expected NAME=MIN:MAX"),
        (["approve", "--bound", "lr=1:2", "--bound", "lr=1:3"], "--bound: lr is bounded twice"),
        (["approve", "--digest", "sha256:1234"], "--digest: expected sha256: and 64 hex"),
        (["approve", "--digest", "sha256:" + "zz" * 32], "is not hexadecimal"),
        (["revoke", "sha256:" + "ef" * 32], "unknown digest"),
        (["revoke", "sha256:12"], "at least 8 hex digits"),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], why: str
) -> None:
    site = builtin_site(tmp_path)
    assert main(["plans", *args, "--config", str(site)]) == 2
    assert why in one_line(capsys)


def test_cli_needs_a_state_directory_that_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plans", "list"]) == 2
    assert "--config: give the site's config" in one_line(capsys)
    assert main(["plans", "list", "--state-dir", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in one_line(capsys)
    site = write_site(tmp_path, "")  # no [plan]
    assert main(["plans", "approve", "--config", str(site), "--bound", "lr=0:1"]) == 2
    assert "a site needs a training plan" in one_line(capsys)
    assert not (tmp_path / "state").exists()
