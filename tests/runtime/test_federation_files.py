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
