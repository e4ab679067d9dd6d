"""``runtime.federation_files``: the ports it hands the daemons of a local federation."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedloom.runtime import federation_files
from fedloom.runtime.federation_files import free_port, write_federation


def test_free_ports_are_never_handed_out_twice_even_when_the_kernel_repeats_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The failure seen in CI: the kernel gave the same ephemeral port to two bind(0) calls
    # in a row, so a root's listener and its metrics endpoint got one port between them.
    # Here every pick below the range is taken and the kernel's choice repeats.
    monkeypatch.setattr(federation_files, "_bindable", lambda host, port: False)
    repeats = iter([40001, 40001, 40001, 40002, 40002, 40003])

    class Repeating:
        def __init__(self, *args: object) -> None:
            self.port = 0

        def __enter__(self) -> Repeating:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def bind(self, address: tuple[str, int]) -> None:
            self.port = next(repeats)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(federation_files, "_HANDED_OUT", set())
    monkeypatch.setattr(socket, "socket", Repeating)
    assert [free_port(), free_port(), free_port()] == [40001, 40002, 40003]


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low, _ = federation_files._ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port < low for port in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free, as promised


def test_a_written_federation_uses_each_port_once(tmp_path: Path) -> None:
    fed = write_federation(tmp_path / "fed", {"region-a": ["site-1"], "region-b": ["site-2"]})
    ports = [p for n in fed.nodes.values() for p in (n.listen_port, n.metrics_port) if p]
    assert len(ports) == len(set(ports)) >= 6


def test_free_ports_come_from_the_range_the_environment_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Processes that share a machine (parallel test workers, two local federations) are
    kept apart by giving each its own range."""
    monkeypatch.setenv(federation_files.PORT_RANGE_ENV, "23100-23149")
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20 and all(23100 <= p <= 23149 for p in ports)


@pytest.mark.parametrize("value", ["23100", "23149-23100", "80-90", "a-b", "23100-70000"])
def test_a_bad_port_range_is_one_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(federation_files.PORT_RANGE_ENV, value)
    with pytest.raises(OSError, match=r"FEDLOOM_PORT_RANGE=.*expected LOW-HIGH"):
        free_port()
