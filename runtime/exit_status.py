"""Exit statuses of ``fedloom run`` (and ``fedloom state``), for systemd to act on.

The units in deploy/systemd list the configuration and corrupt-state statuses in
``RestartPreventExitStatus=``: restarting cannot fix them. The environmental one (the disk
refused a read or write) is restarted, and succeeds once the disk is fixed. Values follow
sysexits.h where one fits.
"""

from __future__ import annotations

__all__ = [
    "EXIT_CONFIG",
    "EXIT_CORRUPT_STATE",
    "EXIT_ENVIRONMENT",
    "EXIT_FAILED",
    "EXIT_IN_USE",
    "EXIT_OK",
    "EXIT_STATUS_HELP",
]

EXIT_OK = 0
EXIT_FAILED = 1  # anything else expected that stopped it (a port in use, ...): restarted
EXIT_CONFIG = 2  # a mistake in the command line, config, identity key or roster
EXIT_CORRUPT_STATE = 65  # EX_DATAERR: damaged state directory (see `fedloom state check`)
EXIT_ENVIRONMENT = 75  # EX_TEMPFAIL: disk full, read-only, I/O error, permissions
# `fedloom state check` only: a running daemon checkpointed during every read: no verdict.
EXIT_IN_USE = 69  # EX_UNAVAILABLE

EXIT_STATUS_HELP = f"""exit status:
  {EXIT_OK:<3} stopped cleanly (SIGTERM, SIGINT)
  {EXIT_FAILED:<3} could not run, e.g. the listen port is in use or another process holds
      the state directory's lock (systemd restarts it)
  {EXIT_CONFIG:<3} configuration error: config file, identity key, roster, command line
      (not restarted: fix the configuration)
  {EXIT_CORRUPT_STATE:<3} corrupt state: a damaged file in the state directory, named with its
      byte offset (not restarted: see `fedloom state check STATE_DIR`)
  {EXIT_ENVIRONMENT:<3} the disk refused a read or write of the state directory: full, read-only,
      I/O error, permissions (restarted; starts once the disk is fixed)
"""
