"""The ``fedloom`` command: one entry point over the daemons and the simulator.

The simulator's commands (``sim``, ``plan``) live in ``fedloom.sim.cli``, everything a
site or aggregator runs in ``fedloom.runtime.cli``. This module sits above both layers and
loads only the side a command needs, so ``fedloom run`` never imports the simulator (nor
matplotlib or scikit-learn), and a base install without the ``sim`` extra still runs
daemons and says what to install when asked for the simulator.

User mistakes (a missing file, a bad field) end with one clear line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from fedloom.federation.config_reader import ConfigError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
SIM_COMMANDS = ("sim", "plan")
RUNTIME_COMMANDS = (
    "keygen",
    "roster",
    "run",
    "state",
    "privacy",
    "demo",
    "chaos",
    "local",
    "dataset",
    "plans",
    "audit",
    "model",
    "run-report",
    "status",
)

# Third-party modules that only an extra installs, and the smallest extra that brings each
# (``sim`` includes ``data``'s scikit-learn too).
_EXTRA_OF = {
    "networkx": "sim",
    "scipy": "sim",
    "matplotlib": "sim",
    "sklearn": "data",
    "rich": "sim",
    "torch": "torch",
    # The privacy accountant: an aggregator with [privacy], `fedloom privacy`.
    "dp_accounting": "privacy",
    # Record-level DP-SGD at a site ([dp_sgd]), and `fedloom privacy` on its state.
    "opacus": "dpsgd",
    # A site's own CSV/Parquet tables (`fedloom dataset`, the tabular plan).
    "pandas": "tabular",
    "pyarrow": "tabular",
    # `fedloom model export --format safetensors`, `fedloom run-report`.
    "safetensors": "export",
    "rocrate": "export",
    # The simulator on a Ray cluster (`executor = "ray"`, `fedloom sim --ray-address`).
    "ray": "ray",
}


def _command_of(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` names (its first word that is not an option), if any; None
    for ``-h``/``--help`` before it (``fedloom --help run``: the whole command table)."""
    for word in argv:
        if word in ("-h", "--help"):
            return None
        if not word.startswith("-"):
            return word
    return None


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedloom",
        description=(
            "Asynchronous, hierarchical and peer-to-peer federated learning. "
            "The simulator runs the same protocol code as the daemons on a virtual clock."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  fedloom sim scenarios/hospitals.toml --out runs/hospitals\n"
        "  fedloom plan scenarios/hierarchical-10k.toml --out runs/plan10k\n"
        "  fedloom keygen --id site-a --role site --out /etc/fedloom\n"
        "  fedloom run --config /etc/fedloom/site.toml\n"
        "  fedloom demo\n",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the side the command needs is imported (the whole table for --help or a typo).
    if command not in RUNTIME_COMMANDS:
        from fedloom.sim import cli as sim_cli

        sim_cli.add_commands(sub)
    if command not in SIM_COMMANDS:
        from fedloom.runtime import cli as runtime_cli

        runtime_cli.add_commands(sub)
    return parser


def _has_fd(stream: object) -> bool:
    """Whether ``stream`` writes to a file descriptor (not a test's capture buffer)."""
    try:
        stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    top = (exc.name or "").split(".")[0]
    extra = _EXTRA_OF.get(top)
    if extra is None:
        return None
    # Notes added on the way up (``fedloom local init``: another data set) follow, on the
    # same line.
    notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
    return (
        f"this command needs {top!r}, which the {extra!r} extra installs: "
        f"pip install 'fedloom[{extra}]'{notes}"
    )


class _OutputMayGoAway:
    """``sys.stdout`` for a command line: when whoever reads it goes away (``| head``, a
    closed terminal or ssh session), the command goes on and its output goes to
    /dev/null, where Python would raise ``BrokenPipeError`` at the next write and end a
    long run (a simulation, a daemon) with nothing written."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())  # what is still buffered goes there too
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    if not isinstance(sys.stdout, _OutputMayGoAway) and _has_fd(sys.stdout):
        sys.stdout = _OutputMayGoAway(sys.stdout)
    words = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(words)
    parser = _parser(command)
    args = parser.parse_args(words)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command in SIM_COMMANDS:
            from fedloom.sim import cli as sim_cli

            return sim_cli.dispatch(args, parser)
        from fedloom.runtime import cli as runtime_cli

        return runtime_cli.dispatch(args, parser)
    except ConfigError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        hint = _missing_extra(exc)
        if hint is None:
            raise
        print(f"fedloom: error: {hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedloom: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # python -m fedloom.cli (python -m fedloom runs fedloom.__main__)
    sys.exit(main())
