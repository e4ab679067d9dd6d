"""The wheel check (``make wheel-check``, run by ``make test``): a hospital's install works alone.

1. Builds the wheel from a copy of the source tree (no stale ``build/`` can leak into it) and
   checks it: its only top-level package is ``fedloom`` (RECORD and ``top_level.txt``), every
   subpackage and ``py.typed`` are in it, and its metadata requires none of the extras'
   packages unconditionally. setuptools must build it without a warning.
2. Creates a new virtual environment (``venv``, no system site-packages; removed first) and
   installs the wheel there WITHOUT extras (pip may download the base dependencies, through
   its cache). Checks none of the extras' packages came with it.
3. With that environment's ``fedloom`` command only: ``fedloom --help``; ``fedloom sim``
   prints one line naming the ``sim`` extra; ``keygen`` for a consortium, a root and two
   sites, ``roster sign`` and ``roster verify``; then ``fedloom run`` for the root and both
   sites (FedBuff, a numpy softmax model on the synthetic data set) over the real encrypted
   transport on 127.0.0.1, until the root's ``/metrics`` shows ``--versions`` published model
   versions. Every daemon is stopped by its PID (SIGTERM) and must exit 0. Then the same with
   the federation ``fedloom local init --dataset synthetic`` writes. ``local init`` on the
   default data set names the ``data`` extra and writes nothing; a site whose model is the
   ``mlp`` stops at start naming the ``torch`` extra; ``fedloom local up`` with a relative
   directory starts a root and a site (both ready) and stops them on SIGTERM.

Exit status 0 when all of it holds; otherwise 1 with what failed (and the daemons' last log
lines). Bounded in time: ``--timeout`` for the federation, fixed limits for each command.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What only the extras install: the base install must neither need nor bring any of them.
EXTRA_MODULES = ("networkx", "scipy", "matplotlib", "sklearn", "rich", "torch", "psutil")
EXTRA_DISTS = ("networkx", "scipy", "matplotlib", "scikit-learn", "rich", "torch", "psutil")
SUBPACKAGES = (
    "algorithms",
    "federation",
    "runtime",
    "sim",
    "topology",
    "transport",
    "workloads",
)
# Left out of the source copy: environments, build outputs, run directories, caches.
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "runs",
    "out",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".import_linter_cache",
)
COMMAND_TIMEOUT_S = 300.0  # one command (pip's install may download)
STOP_TIMEOUT_S = 20.0


class CheckError(Exception):
    pass


def _run(
    cmd: Sequence[str | Path], *, cwd: Path, env: dict[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _ok(proc: subprocess.CompletedProcess[str], what: str) -> str:
    if proc.returncode != 0:
        raise CheckError(
            f"{what}: exit status {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc.stdout


def _clean_env() -> dict[str, str]:
    """The environment without anything that points Python at another installation."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# ------------------------------------------------------------------------------ wheel


def build_wheel(source: Path, work: Path, env: dict[str, str]) -> Path:
    """Build the wheel from a fresh copy of ``source`` (symlinks kept as links)."""
    tree = work / "src"
    shutil.copytree(source, tree, symlinks=True, ignore=COPY_IGNORE)
    dist = work / "dist"
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "--wheel-dir", dist, tree],
        cwd=work,
        env=env,
        timeout=COMMAND_TIMEOUT_S,
    )
    out = _ok(proc, "pip wheel") + proc.stderr
    warnings = sorted(
        {line.strip() for line in out.splitlines() if re.search(r"Warning\b|^\s*!!", line)}
    )
    if warnings:
        raise CheckError("setuptools warned while building the wheel:\n" + "\n".join(warnings))
    shutil.rmtree(tree)
    wheels = sorted(dist.glob("fedloom-*.whl"))
    if len(wheels) != 1:
        raise CheckError(f"expected one fedloom wheel in {dist}, found {wheels}")
    return wheels[0]


def check_wheel(wheel: Path) -> list[str]:
    """The wheel's only top-level package is fedloom; every subpackage is in it; the
    extras' packages are required only under their extra. Returns its base requirements."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        if len(dist_info) != 1:
            raise CheckError(f"{wheel.name}: expected one .dist-info, found {sorted(dist_info)}")
        info = dist_info.pop()
        record = zf.read(f"{info}/RECORD").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
        top_level = (
            zf.read(f"{info}/top_level.txt").decode().split()
            if f"{info}/top_level.txt" in names
            else ["fedloom"]
        )
    recorded = {line.split(",")[0] for line in record.splitlines() if line}
    tops = {path.split("/")[0] for path in recorded} - {info}
    if tops != {"fedloom"}:
        raise CheckError(f"{wheel.name}: top-level entries {sorted(tops)}, expected only fedloom")
    if top_level != ["fedloom"]:
        raise CheckError(f"{wheel.name}: top_level.txt says {top_level}, expected ['fedloom']")
    missing = [
        f"fedloom/{p}/__init__.py"
        for p in SUBPACKAGES
        if f"fedloom/{p}/__init__.py" not in recorded
    ]
    shipped = ("fedloom/cli.py", "fedloom/__main__.py", "fedloom/py.typed")  # PEP 561 marker
    missing += [f for f in shipped if f not in recorded]
    if missing:
        raise CheckError(f"{wheel.name}: missing {missing}")
    base: list[str] = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        base.append(req)
        name = re.split(r"[ <>=!~;\[(]", req, maxsplit=1)[0].lower()
        if name in EXTRA_DISTS:
            raise CheckError(f"{wheel.name}: the base install requires {req!r} (an extra's)")
    return base


def make_venv(python: str, venv: Path, wheel: Path, env: dict[str, str]) -> Path:
    """A new virtual environment with the wheel installed without extras; its bin/."""
    shutil.rmtree(venv, ignore_errors=True)
    _ok(_run([python, "-m", "venv", venv], cwd=venv.parent, env=env), "python -m venv")
    cfg = (venv / "pyvenv.cfg").read_text()
    if not re.search(r"^include-system-site-packages\s*=\s*false", cfg, re.M):
        raise CheckError(f"{venv} sees the system site-packages:\n{cfg}")
    bin_dir = venv / "bin"
    _ok(
        _run(
            [bin_dir / "python", "-m", "pip", "install", "--quiet", wheel],
            cwd=venv.parent,
            env=env,
            timeout=COMMAND_TIMEOUT_S,
        ),
        "pip install (no extras)",
    )
    probe = (
        "import importlib.util, fedloom\n"
        f"print(fedloom.__file__)\n"
        f"print(*[m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m)])\n"
    )
    lines = _ok(_run([bin_dir / "python", "-c", probe], cwd=venv, env=env), "probe").splitlines()
    if not Path(lines[0]).resolve().is_relative_to(venv.resolve()):
        raise CheckError(f"fedloom imports from {lines[0]}, not from {venv}")
    extras = lines[1].split() if len(lines) > 1 else []
    if extras:
        raise CheckError(f"the base install brought extras' modules: {extras}")
    return bin_dir


# ------------------------------------------------------------------------------ commands


def _one_line_naming(proc: subprocess.CompletedProcess[str], what: str, needle: str) -> None:
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 2 or not lines or needle not in lines[-1]:
        raise CheckError(
            f"{what}: exit {proc.returncode}, expected 2 and a last line with {needle!r}; "
            f"stderr:\n{proc.stderr[-3000:]}"
        )


def check_cli(fedloom: Path, work: Path, env: dict[str, str]) -> None:
    """``--help`` works without the sim extra; ``fedloom sim`` names the extra in one line;
    ``local init`` on the default (scikit-learn) data set names the data extra and writes
    nothing."""
    _ok(_run([fedloom, "--help"], cwd=work, env=env), "fedloom --help")
    scenario = work / "scenario.toml"
    scenario.write_text("# any scenario: the simulator is not installed\n", encoding="utf-8")
    proc = _run([fedloom, "sim", scenario, "--out", work / "runs"], cwd=work, env=env)
    lines = proc.stderr.strip().splitlines()
    if (
        proc.returncode != 2
        or len(lines) != 1
        or "'sim' extra" not in lines[0]
        or "fedloom[sim]" not in lines[0]
    ):
        raise CheckError(
            f"fedloom sim without the sim extra: exit {proc.returncode}, expected 2 and one "
            f"line naming the 'sim' extra; stderr:\n{proc.stderr[-3000:]}"
        )
    proc = _run([fedloom, "local", "init", "no-data"], cwd=work, env=env)
    needle = "pip install 'fedloom[data]'; or choose `--dataset synthetic`"
    _one_line_naming(proc, "fedloom local init without the data extra", needle)
    if len(proc.stderr.strip().splitlines()) != 1 or (work / "no-data").exists():
        raise CheckError(
            f"fedloom local init without the data extra wrote or said more:\n{proc.stderr[-3000:]}"
        )


def check_local_up(fedloom: Path, work: Path, env: dict[str, str]) -> None:
    """``local init up`` and ``local up up`` with a relative directory (the daemons run
    elsewhere): every daemon reports ready, and SIGTERM stops them all (exit 0). Before
    that, its site with the ``mlp`` model stops at start naming the torch extra."""
    _ok(
        _run(
            [fedloom, "local", "init", "up", "--shape", "star", "--sites", "1",
             "--dataset", "synthetic"],
            cwd=work,
            env=env,
        ),
        "fedloom local init up (a relative directory)",
    )  # fmt: skip
    site = (work / "up" / "site-0.toml").read_text(encoding="utf-8")
    mlp = work / "site-mlp.toml"
    mlp.write_text(
        re.sub(r'(?m)^state_dir = ".*"$', f'state_dir = "{work / "mlp-state"}"', site).replace(
            'model = "softmax"', 'model = "mlp"'
        ),
        encoding="utf-8",
    )
    proc = _run([fedloom, "run", "--config", mlp], cwd=work, env=env)
    _one_line_naming(proc, "a site whose model needs torch", "pip install 'fedloom[torch]'")
    logs = work / "up" / "logs"
    up = subprocess.Popen(
        [str(fedloom), "local", "up", "up"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ready: set[str] = set()
        while up.poll() is None and ready != {"root", "site-0"}:
            if time.monotonic() > deadline:
                raise CheckError("fedloom local up: not every daemon ready within 60 s")
            time.sleep(0.2)
            ready = {log.stem for log in logs.glob("*.log") if '"ready": true' in log.read_text()}
        if up.poll() is not None:
            raise CheckError(
                f"fedloom local up up exited {up.returncode}:\n{up.communicate()[0][-3000:]}"
                + "\n".join(f"--- {log.name}\n{_tail(log)}" for log in logs.glob("*.log"))
            )
        up.send_signal(signal.SIGTERM)
        out = up.communicate(timeout=STOP_TIMEOUT_S * 2)[0]
        if up.returncode != 0 or "stopped 2 daemons" not in out:
            raise CheckError(f"fedloom local up: exit {up.returncode} on SIGTERM:\n{out[-3000:]}")
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def write_federation(
    fedloom: Sequence[str | Path], python: Path, fed: Path, env: dict[str, str], n_sites: int
) -> tuple[list[Path], str]:
    """Keys, a signed roster and one config per node of a star (a root and ``n_sites``
    sites; FedBuff, a numpy softmax model on synthetic data), written with the ``fedloom``
    command ``fedloom`` (and ``python`` sizing each site's examples). Returns the configs
    (root first) and the root's metrics URL."""
    keys = fed / "keys"
    sites = [f"site-{i}" for i in range(n_sites)]
    public: dict[str, str] = {}
    for node, role in [("consortium", "consortium"), ("root", "root")] + [
        (s, "site") for s in sites
    ]:
        out = _ok(
            _run(
                [*fedloom, "keygen", "--id", node, "--role", role, "--out", keys], cwd=fed, env=env
            ),
            f"fedloom keygen {node}",
        )
        public[node] = out.split()[-1]
    plan = {
        "dataset": '"synthetic"',
        "model": '"softmax"',
        "n_sites": str(n_sites),
        "seed": "7",
        "samples_per_site": "200",
        "eval_sites": "2",
    }
    # The examples each site declares in the roster, as the installed package computes them.
    probe = (
        "from fedloom.workloads.workload import from_config\n"
        "w = from_config({" + ", ".join(f"{k!r}: {v}" for k, v in plan.items()) + "})\n"
        f"print(*[w.n_examples(i) for i in range({n_sites})])\n"
    )
    examples = _ok(_run([python, "-c", probe], cwd=fed, env=env), "examples").split()
    roster = ["version = 1", ""]
    for node in ["root", *sites]:
        roster += [
            "[[nodes]]",
            f'id = "{node}"',
            f'role = "{"root" if node == "root" else "site"}"',
            f'public_key = "{public[node]}"',
            "endpoints = []",
        ]
        if node != "root":
            roster.append(f"examples = {examples[sites.index(node)]}")
        roster.append("")
    unsigned = fed / "roster-unsigned.toml"
    unsigned.write_text("\n".join(roster), encoding="utf-8")
    signed = fed / "roster.toml"
    _ok(
        _run(
            [
                *fedloom,
                "roster",
                "sign",
                "--key",
                keys / "consortium.key",
                "--out",
                signed,
                unsigned,
            ],
            cwd=fed,
            env=env,
        ),
        "fedloom roster sign",
    )
    _ok(
        _run(
            [*fedloom, "roster", "verify", "--consortium", keys / "consortium.pub", signed],
            cwd=fed,
            env=env,
        ),
        "fedloom roster verify",
    )
    listen, metrics = _free_port(), {n: _free_port() for n in ["root", *sites]}
    common = (
        '[roster]\npath = "{roster}"\nconsortium_key_file = "{pub}"\n\n'
        "[connection]\nkeepalive_s = 2.0\ndown_after_s = 10.0\n"
        "backoff_base_s = 0.1\nbackoff_cap_s = 1.0\n\n"
        '[codec]\nup = "fp32"\ndown = "fp32"\n\n'
        "[training]\nlr = 0.05\nlocal_steps = 5\nbatch_size = 16\n\n"
        '[metrics]\nhost = "127.0.0.1"\nport = {metrics}\n\n'
        "[plan]\n" + "".join(f"{k} = {v}\n" for k, v in plan.items())
    )
    configs = []
    for node in ["root", *sites]:
        head = [
            f'role = "{"root" if node == "root" else "site"}"',
            f'node_id = "{node}"',
            f'state_dir = "{fed / "state" / node}"',
            "seed = 7",
        ]
        if node == "root":
            head.append(f"children = {_toml_list(sites)}")
        text = "\n".join(head) + f'\n\n[identity]\nkey = "{keys / node}.key"\n\n'
        if node == "root":
            text += (
                f'[listen]\nhost = "127.0.0.1"\nport = {listen}\n\n'
                '[aggregation]\nalgorithm = "fedbuff"\nbuffer_size = 2\nmax_staleness = 100\n'
                'task_timeout_s = 60.0\nweighting = "examples"\nconcurrency = 10\n\n'
            )
        else:
            text += f'[parent]\nid = "root"\nurl = "ws://127.0.0.1:{listen}/fedloom"\n\n'
        text += common.format(roster=signed, pub=keys / "consortium.pub", metrics=metrics[node])
        if node != "root":
            text += f"site_index = {sites.index(node)}\n"
        path = fed / f"{node}.toml"
        path.write_text(text, encoding="utf-8")
        configs.append(path)
    return configs, f"http://127.0.0.1:{metrics['root']}/metrics"


_VERSION = re.compile(r"^fedloom_model_version(?:\{[^}]*\})?\s+(\S+)\s*$", re.M)


def _scrape_version(url: str) -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            text = resp.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = _VERSION.search(text)
    return float(found.group(1)) if found else None


def _tail(log: Path, n: int = 15) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def run_federation(
    fedloom: Sequence[str | Path],
    configs: list[Path],
    url: str,
    fed: Path,
    env: dict[str, str],
    *,
    versions: int,
    timeout: float,
) -> float:
    """``fedloom run`` for every config, wait for ``versions`` published model versions at the
    root (and a link from the root to every site), stop every daemon by PID; each must exit 0.
    Returns the last version seen."""
    logs = fed / "logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for config in configs:
            log = (logs / f"{config.stem}.log").open("wb")
            procs[config.stem] = subprocess.Popen(
                [*map(str, fedloom), "run", "--config", str(config)],
                cwd=fed,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            log.close()
        deadline = time.monotonic() + timeout
        seen: float | None = None
        unlinked = list(procs)[1:]
        # Both conditions are awaited together: one fast site can carry the root to the
        # target version before a slower one has connected (buffer_size is small).
        while time.monotonic() < deadline:
            for node, proc in procs.items():
                if proc.poll() is not None:
                    raise CheckError(
                        f"{node} exited with status {proc.returncode} while running:\n"
                        + _tail(logs / f"{node}.log")
                    )
            seen = _scrape_version(url)
            root_log = (logs / f"{configs[0].stem}.log").read_text(
                encoding="utf-8", errors="replace"
            )
            unlinked = [n for n in list(procs)[1:] if f"connected to {n}" not in root_log]
            if seen is not None and seen >= versions and not unlinked:
                break
            time.sleep(0.1)
        else:
            if unlinked:
                raise CheckError(
                    f"the root never logged a link to {unlinked} in {timeout:.0f} s:\n"
                    + "\n".join(f"--- {n}\n{_tail(logs / f'{n}.log')}" for n in procs)
                )
            raise CheckError(
                f"the root published model version {seen} in {timeout:.0f} s, expected >= "
                f"{versions}:\n" + "\n".join(f"--- {n}\n{_tail(logs / f'{n}.log')}" for n in procs)
            )
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        bad = []
        for node, proc in procs.items():
            try:
                status = proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                bad.append(f"{node} did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM")
                continue
            if status != 0:
                bad.append(f"{node} stopped with status {status}:\n{_tail(logs / f'{node}.log')}")
        if bad:
            raise CheckError("\n".join(bad))
        return seen
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)


# ------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--python", default=getattr(sys, "_base_executable", sys.executable))
    parser.add_argument("--work", type=Path, default=REPO / "build" / "wheel-check")
    parser.add_argument("--source", type=Path, default=REPO)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=90.0, help="federation, seconds")
    args = parser.parse_args(argv)
    start = time.monotonic()
    work: Path = args.work.absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = _clean_env()
    steps: list[str] = []

    def step(what: str) -> None:
        steps.append(f"{what} ({time.monotonic() - start:.0f} s)")

    try:
        wheel = build_wheel(args.source.absolute(), work, env)
        base = check_wheel(wheel)
        step(f"built {wheel.name}: only fedloom, base requires {', '.join(base)}")
        bin_dir = make_venv(args.python, work / "venv", wheel, env)
        step("installed it without extras in a clean venv (no extras' modules there)")
        fedloom = bin_dir / "fedloom"
        check_cli(fedloom, work, env)
        step("fedloom --help works; fedloom sim names the sim extra, local init the data extra")
        fed = work / "federation"
        fed.mkdir()
        configs, url = write_federation([fedloom], bin_dir / "python", fed, env, args.sites)
        seen = run_federation(
            [fedloom], configs, url, fed, env, versions=args.versions, timeout=args.timeout
        )
        step(f"root + {args.sites} sites: root published model v{seen:.0f}; all stopped, exit 0")
        local = work / "local"
        init: list[str | Path] = [fedloom, "local", "init", local, "--shape", "star"]
        init += ["--sites", str(args.sites), "--dataset", "synthetic"]
        _ok(_run(init, cwd=work, env=env), "fedloom local init --dataset synthetic")
        configs = [local / "root.toml"] + [local / f"site-{i}.toml" for i in range(args.sites)]
        with configs[0].open("rb") as fh:
            port = tomllib.load(fh)["metrics"]["port"]
        seen = run_federation(
            [fedloom],
            configs,
            f"http://127.0.0.1:{port}/metrics",
            local,
            env,
            versions=args.versions,
            timeout=args.timeout,
        )
        step(f"fedloom local init --dataset synthetic: its root published v{seen:.0f}; stopped")
        check_local_up(fedloom, work, env)
        step("an mlp site names the torch extra; fedloom local up (relative DIR) ran, stopped")
    except (CheckError, subprocess.TimeoutExpired) as exc:
        print("\n".join(steps), file=sys.stderr)
        print(f"wheel check FAILED: {exc}", file=sys.stderr)
        return 1
    print("\n".join(steps))
    print(f"wheel check passed in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
