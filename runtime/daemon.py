"""``fedloom run``: one node (site, region, root, gossip peer or relay) as a long-running
daemon.

Start-up (``open_daemon``, ``runtime.recovery``), all before anything touches the network:

1. read the identity key and the signed roster; refuse an identity the roster does not list
   (with that key and role), and neighbours it does not list (``runtime.identity``);
2. build the training plan (sites and peers train with it, the root builds its initial
   model from it and evaluates with it) and the node, through the one node factory the
   simulator uses (``runtime.nodes``, ``federation.factory``);
3. open the state directory (``StateStore``, flock-ed: one daemon per directory), ``load``
   it and restore the node from its checkpoint plus the log records written after it;
4. write a fresh checkpoint of the restored node (compaction: the log starts empty).

Then ``serve`` (``runtime.serve``) runs the node until SIGTERM: networking, systemd
notifications, metrics, roster reloads on SIGHUP, a last checkpoint on the way out; nodes
that hold a model and have an evaluation (the root, gossip peers) evaluate it every
``eval_interval_s`` (``runtime.evaluation``). Logging: ``runtime.logging_setup``.

``load_node(cfg)`` restores a node from its state directory without running it (reports,
the demo, tests): the same recovery the daemon performs.

This module is the entry point (``run_daemon``) and re-exports the daemon's public names.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from fedloom.runtime.config import DaemonConfig, load_config
from fedloom.runtime.evaluation import DEFAULT_EVAL_INTERVAL_S
from fedloom.runtime.exit_status import EXIT_FAILED, EXIT_OK
from fedloom.runtime.identity import load_identity, load_roster, load_roster_text
from fedloom.runtime.logging_setup import JsonFormatter, configure_logging
from fedloom.runtime.nodes import (
    bound_claims,
    build_node,
    build_plan,
    children_claim_bounds,
    model_floor,
    model_floor_digest,
    outbox_bytes,
)
from fedloom.runtime.recovery import (
    Daemon,
    DaemonError,
    load_node,
    open_daemon,
    restore_node,
    stop_reason,
)
from fedloom.runtime.serve import (
    READY_WAIT_S,
    build_peers,
    report_duplicates,
    report_refusals,
    serve,
)

__all__ = [
    "DEFAULT_EVAL_INTERVAL_S",
    "READY_WAIT_S",
    "Daemon",
    "DaemonError",
    "JsonFormatter",
    "bound_claims",
    "build_node",
    "build_peers",
    "build_plan",
    "children_claim_bounds",
    "configure_logging",
    "load_identity",
    "load_node",
    "load_roster",
    "load_roster_text",
    "model_floor",
    "model_floor_digest",
    "open_daemon",
    "outbox_bytes",
    "report_duplicates",
    "report_refusals",
    "restore_node",
    "run_daemon",
    "serve",
    "stop_reason",
]

log = logging.getLogger("fedloom.daemon")


def _new_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_daemon(
    config: Path,
    *,
    eval_interval_s: float | None = None,
    ready_wait_s: float = READY_WAIT_S,
) -> int:
    """``fedloom run``: load, recover, serve until SIGTERM; 0 on a clean stop.

    Config mistakes raise ``ConfigError`` (``EXIT_CONFIG`` from the CLI); a daemon that
    cannot run logs one line and returns ``EXIT_CORRUPT_STATE`` (damaged state),
    ``EXIT_ENVIRONMENT`` (the disk refused a read or write: full, read-only, I/O error)
    or ``EXIT_FAILED`` (anything else expected, e.g. a port in use).
    """
    cfg = load_config(config)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload during recovery: no-op, not a kill
    try:
        d = open_daemon(cfg)
    except Exception as exc:
        return _stopped(cfg, exc)
    try:
        with asyncio.Runner(loop_factory=_new_loop_factory()) as runner:
            runner.run(serve(d, eval_interval_s=eval_interval_s, ready_wait_s=ready_wait_s))
    except Exception as exc:
        return _stopped(cfg, exc)
    except asyncio.CancelledError:  # a stop forced past what serve() handles: one line
        log.error(
            "%s: stopped by force before its shutdown completed (see `fedloom state check`)",
            cfg.node_id,
            extra={"node": cfg.node_id, "exit_status": EXIT_FAILED},
        )
        return EXIT_FAILED
    finally:
        d.close()
    return EXIT_OK


def _stopped(cfg: DaemonConfig, exc: Exception) -> int:
    """Log why the daemon stopped in one line and return its exit status (re-raise a bug)."""
    reason = stop_reason(exc)
    if reason is None:
        raise exc
    log.error(
        "%s: %s",
        cfg.node_id,
        reason,
        extra={"node": cfg.node_id, "exit_status": reason.exit_code},
    )
    return reason.exit_code
