"""Can ``tc netem`` shape traffic here?  Detection only, with a one-line reason when not.

A netem backend needs: root, the ``ip`` and ``tc`` tools, network namespaces that can be
created, and a kernel with the ``sch_netem`` queueing discipline.  The last is only known by
trying, so :func:`detect_netem` adds a netem qdisc on the loopback of a throw-away namespace
and deletes both afterwards, whatever happened (a namespace holds its qdiscs, so deleting it
removes them too).  Probe namespaces are named ``fedloom-probe-<pid>-<hex>``; ones left by a
probe process that no longer exists (killed mid-probe) are deleted by the next probe.

fedloom ships no netem backend: the machines it is developed on lack ``sch_netem``, so one
could not be tested.  A chaos run prints :attr:`NetemSupport.reason` and uses the fault proxy
(:mod:`runtime.chaos.proxy`), which injects the same faults at the TCP stream level.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PROBE_PREFIX = "fedloom-probe-"
COMMAND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    output: str  # stderr, or stdout when stderr is empty


@dataclass(frozen=True)
class NetemSupport:
    available: bool
    reason: str  # one line, fit to print as is


Runner = Callable[[Sequence[str]], CommandResult]


def run_command(args: Sequence[str]) -> CommandResult:
    """Run a command with a time-out; a missing or hung tool is a failed result, not a raise."""
    try:
        done = subprocess.run(
            list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CommandResult(127, f"{args[0]}: {exc}")
    return CommandResult(done.returncode, (done.stderr.strip() or done.stdout.strip()))


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return line or "no error text"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_probes(run: Runner) -> None:
    """Delete probe namespaces whose creating process is gone (a probe killed midway)."""
    listed = run(["ip", "netns", "list"])
    if listed.returncode != 0:
        return
    for match in re.finditer(rf"^{re.escape(PROBE_PREFIX)}(\d+)-[0-9a-f]+", listed.output, re.M):
        if not _pid_alive(int(match.group(1))):
            run(["ip", "netns", "del", match.group(0)])


def detect_netem(
    run: Runner = run_command,
    which: Callable[[str], str | None] = shutil.which,
    euid: Callable[[], int] = os.geteuid,
) -> NetemSupport:
    """Whether a netem backend could run here, and why not in one line when it cannot."""
    uid = euid()
    if uid != 0:
        return NetemSupport(False, f"tc netem needs root (running as uid {uid})")
    missing = [tool for tool in ("ip", "tc") if which(tool) is None]
    if missing:
        return NetemSupport(False, f"tc netem needs {' and '.join(missing)} (not on PATH)")
    _sweep_stale_probes(run)
    name = f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    added = run(["ip", "netns", "add", name])
    if added.returncode != 0:
        return NetemSupport(
            False, f"cannot create a network namespace: {_first_line(added.output)}"
        )
    verdict: NetemSupport
    try:
        in_ns = ["ip", "netns", "exec", name]
        netem = run([*in_ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
        if netem.returncode == 0:
            run([*in_ns, "tc", "qdisc", "del", "dev", "lo", "root"])
            verdict = NetemSupport(True, "tc netem is available (root, ip, tc, sch_netem)")
        elif "unknown" in netem.output.lower() or "no such file" in netem.output.lower():
            verdict = NetemSupport(
                False,
                f"this kernel lacks sch_netem (tc: {_first_line(netem.output)})",
            )
        else:
            verdict = NetemSupport(False, f"cannot add a netem qdisc: {_first_line(netem.output)}")
    finally:
        deleted = run(["ip", "netns", "del", name])
    if deleted.returncode != 0:
        return NetemSupport(
            False,
            f"cannot delete probe namespace {name} ({_first_line(deleted.output)}); "
            f"delete it with: ip netns del {name}",
        )
    return verdict
