"""netem detection: each missing piece gives one clear line, and no probe namespace stays."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import pytest

from fedloom.runtime.chaos.netem import PROBE_PREFIX, CommandResult, detect_netem, run_command


class FakeSystem:
    """Answers ``ip``/``tc`` commands from a script; remembers namespaces like the kernel."""

    def __init__(self, netns_add: int = 0, netem: CommandResult | None = None) -> None:
        self.netns_add = netns_add
        self.netem = netem or CommandResult(0, "")
        self.namespaces: set[str] = set()
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str]) -> CommandResult:
        args = list(args)
        self.calls.append(args)
        if args[:3] == ["ip", "netns", "list"]:
            return CommandResult(0, "\n".join(sorted(self.namespaces)))
        if args[:3] == ["ip", "netns", "add"]:
            if self.netns_add:
                return CommandResult(self.netns_add, "mount --make-shared /run/netns failed")
            self.namespaces.add(args[3])
            return CommandResult(0, "")
        if args[:3] == ["ip", "netns", "del"]:
            self.namespaces.discard(args[3])
            return CommandResult(0, "")
        if "netem" in args:
            assert args[3] in self.namespaces  # only ever inside the probe namespace
            return self.netem
        return CommandResult(0, "")


def detect(system: FakeSystem, uid: int = 0, tools: tuple[str, ...] = ("ip", "tc")) -> str:
    found = detect_netem(
        run=system, which=lambda t: f"/usr/sbin/{t}" if t in tools else None, euid=lambda: uid
    )
    assert "\n" not in found.reason and found.reason
    assert system.namespaces == set()  # nothing left behind, whatever the outcome
    return ("yes: " if found.available else "no: ") + found.reason


def test_not_root() -> None:
    system = FakeSystem()
    assert detect(system, uid=1000) == "no: tc netem needs root (running as uid 1000)"
    assert system.calls == []


def test_missing_tools() -> None:
    assert detect(FakeSystem(), tools=("ip",)) == "no: tc netem needs tc (not on PATH)"
    assert detect(FakeSystem(), tools=()) == "no: tc netem needs ip and tc (not on PATH)"


def test_namespaces_not_creatable() -> None:
    reason = detect(FakeSystem(netns_add=1))
    assert reason.startswith("no: cannot create a network namespace: mount")


def test_a_kernel_without_sch_netem_is_named() -> None:
    unknown = CommandResult(2, "Error: Specified qdisc kind is unknown.")
    assert detect(FakeSystem(netem=unknown)) == (
        "no: this kernel lacks sch_netem (tc: Error: Specified qdisc kind is unknown.)"
    )
    old_tc = CommandResult(2, "RTNETLINK answers: No such file or directory\nWe have an error")
    assert "lacks sch_netem" in detect(FakeSystem(netem=old_tc))


def test_other_qdisc_errors_are_reported_as_such() -> None:
    reason = detect(
        FakeSystem(netem=CommandResult(2, "RTNETLINK answers: Operation not permitted"))
    )
    assert reason == "no: cannot add a netem qdisc: RTNETLINK answers: Operation not permitted"


def test_available_when_the_probe_qdisc_is_added_and_it_is_removed() -> None:
    system = FakeSystem()
    assert detect(system).startswith("yes: tc netem is available")
    assert any(c[-4:] == ["del", "dev", "lo", "root"] for c in system.calls)


def test_a_probe_namespace_left_by_a_dead_process_is_swept() -> None:
    system = FakeSystem(netem=CommandResult(2, "Error: Specified qdisc kind is unknown."))
    stale_pid = 2**22 + 1  # above Linux's largest pid_max: no such process
    system.namespaces = {f"{PROBE_PREFIX}{stale_pid}-abcd", f"{PROBE_PREFIX}{os.getpid()}-beef"}
    detect_netem(run=system, which=lambda t: t, euid=lambda: 0)
    assert system.namespaces == {f"{PROBE_PREFIX}{os.getpid()}-beef"}  # a live prober's is kept


def test_a_missing_tool_is_a_failed_command_not_a_raise() -> None:
    result = run_command(["fedloom-no-such-tool-xyz"])
    assert result.returncode != 0 and "fedloom-no-such-tool-xyz" in result.output


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs the ip tool to list namespaces")
def test_the_real_probe_gives_one_line_and_leaves_no_namespace() -> None:
    before = run_command(["ip", "netns", "list"]).output
    found = detect_netem()
    assert found.reason and "\n" not in found.reason
    assert run_command(["ip", "netns", "list"]).output == before
    if not found.available and os.geteuid() == 0 and shutil.which("tc"):
        # Root with the tools: what is missing is namespaces or the kernel's netem.
        assert "namespace" in found.reason or "netem" in found.reason
