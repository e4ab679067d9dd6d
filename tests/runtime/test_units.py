"""The systemd units in deploy/systemd: required directives, hardening score, clean verify.

The score and verify checks need ``systemd-analyze`` (Debian: ``apt-get install systemd``);
without it they are skipped, the directive checks still run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedloom.runtime.malloc_tuning import GLIBC_TUNABLES

UNITS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNITS = ["fedloom-site.service", "fedloom-aggregator.service"]
MAX_EXPOSURE = 2.0  # systemd's "OK"

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (Debian: apt-get install -y systemd)",
)


def directives(unit: str) -> dict[str, list[str]]:
    """``Section.Key -> [values]`` (repeated keys accumulate; no line continuations used)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS_DIR / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_the_required_directives(unit: str) -> None:
    d = directives(unit)
    one = {k: v[-1] for k, v in d.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.WatchdogSec"] == "30"
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.DynamicUser"] == "yes"
    assert one["Service.StateDirectory"].startswith("fedloom")
    assert one["Service.LoadCredential"] == "identity.key:/etc/fedloom/identity.key"
    assert one["Service.UMask"] == "0077"
    # The daemons' malloc settings, the same string fedloom demo and the benchmarks use.
    assert one["Service.Environment"] == f"GLIBC_TUNABLES={GLIBC_TUNABLES}"
    assert re.fullmatch(
        r"/usr/bin/env fedloom run --config /etc/fedloom/\w+\.toml", one["Service.ExecStart"]
    )
    for key in (
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "PrivateUsers=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "RestrictNamespaces=yes",
        "MemoryDenyWriteExecute=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
    ):
        name, _, value = key.partition("=")
        assert one[f"Service.{name}"] == value, key
    assert one["Service.RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert d["Service.SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_ok_or_better(unit: str) -> None:
    res = analyze("security", "--offline=true", "--no-pager", str(UNITS_DIR / unit))
    assert res.returncode == 0, res.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", res.stdout)
    assert match is not None, res.stdout[-2000:]
    exposure, rating = float(match.group(1)), match.group(2)
    assert exposure <= MAX_EXPOSURE and rating in {"PERFECT", "SAFE", "OK"}, (exposure, rating)
    # The tool's own gate agrees (its threshold is in tenths).
    gated = analyze(
        "security", "--offline=true", f"--threshold={round(MAX_EXPOSURE * 10)}",
        str(UNITS_DIR / unit),
    )  # fmt: skip
    assert gated.returncode == 0, gated.stdout[-500:]


def _unit_warnings(path: Path) -> list[str]:
    res = analyze("verify", "--man=no", str(path))
    lines = (res.stdout + res.stderr).splitlines()
    # verify also reports on system units it pulls in; only ours is under test.
    mine = [ln for ln in lines if path.name in ln]
    return mine if res.returncode == 0 else [*mine, f"exit status {res.returncode}"]


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_verify_is_clean(unit: str, tmp_path: Path) -> None:
    assert _unit_warnings(UNITS_DIR / unit) == []
    # The check can fail: a copy with a typo and a missing binary is reported.
    bad = tmp_path / unit
    text = (UNITS_DIR / unit).read_text()
    text = text.replace("WatchdogSec=30", "WatchdogSecs=30")
    text = text.replace("ExecStart=/usr/bin/env fedloom", "ExecStart=/nonexistent/fedloom")
    bad.write_text(text)
    warnings = _unit_warnings(bad)
    assert any("WatchdogSecs" in w for w in warnings), warnings
    assert any("/nonexistent/fedloom" in w for w in warnings), warnings


# The example configs (deploy/examples) must parse and agree with the units they run under.
EXAMPLES_DIR = UNITS_DIR.parent / "examples"
EXAMPLE_UNIT = {
    "site.toml": "fedloom-site.service",
    "peer.toml": "fedloom-site.service",
    "aggregator.toml": "fedloom-aggregator.service",
    "region.toml": "fedloom-aggregator.service",
    "relay.toml": "fedloom-aggregator.service",
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES_DIR.glob("*.toml")) == sorted(EXAMPLE_UNIT)


@pytest.mark.parametrize("example", sorted(EXAMPLE_UNIT))
def test_example_config_parses_and_matches_its_unit(example: str) -> None:
    import tomllib

    from fedloom.runtime.config import parse_config
    from fedloom.transport.identity import Identity, key_text

    raw = tomllib.loads((EXAMPLES_DIR / example).read_text())
    # The consortium key file only exists on a deployed host; the key itself is what counts.
    assert raw["roster"].pop("consortium_key_file") == "/etc/fedloom/consortium.pub"
    raw["roster"]["consortium_key"] = key_text(Identity.generate("c", "root").public_key)
    cfg = parse_config(raw, base_dir=EXAMPLES_DIR, check_files=False)
    unit = EXAMPLE_UNIT[example]
    d = {k: v[-1] for k, v in directives(unit).items()}
    assert cfg.state_dir == Path("/var/lib") / d["Service.StateDirectory"]
    credential, _, source = d["Service.LoadCredential"].partition(":")
    assert cfg.identity_key == Path("/run/credentials") / unit / credential
    assert source == "/etc/fedloom/identity.key"
    if example in ("site.toml", "aggregator.toml"):
        assert d["Service.ExecStart"].endswith(f"--config /etc/fedloom/{example}")
