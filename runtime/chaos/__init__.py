"""Failure injection against real daemons: fault proxy, netem detection, chaos runs."""
