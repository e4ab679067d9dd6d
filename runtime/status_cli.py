"""``fedloom status``: the federation as its root (or a region) sees it, from its metrics port.

    fedloom status --config ROOT.toml      # the port from the config's [metrics]
    fedloom status --url http://127.0.0.1:9100 [--json]

Fetches ``/status.json`` (``runtime.status``) and prints the tiers with who is connected,
the last update of every child and site, the model version, accuracy, refusals and the
privacy budget; ``--json`` prints the document as it came. Plain text; on a terminal the
link markers are coloured (not with ``NO_COLOR`` set).

Exit 0; 1 with one line when the daemon cannot be reached or serves no status (its
``[metrics] port`` is not set, it is down, it is not an aggregator); 2 (``ConfigError``)
for a mistake on the command line or in the config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.status_page import age_text, member_link

__all__ = ["add_status_command", "cmd_status", "fetch_status", "format_status", "status_lines"]

EXIT_OK = 0
EXIT_UNREACHABLE = 1
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
DEFAULT_TIMEOUT_S = 5.0


class StatusUnavailableError(Exception):
    """The status document could not be fetched (the message is the one line to print)."""


def add_status_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser(
        "status",
        help="print the federation as its root sees it (tiers, links, last updates, "
        "versions, accuracy, refusals, privacy budget)",
        description="Fetch /status.json from a running root's (or region's) metrics port\n"
        "and print the federation: the tiers with who is connected, the last update of\n"
        "each child and site, the model version and its history, the accuracy of the\n"
        "root's own evaluation, refusals, federated evaluation and the privacy budget.\n"
        "The daemon needs [metrics] port set; the same view is served as a web page on\n"
        "http://HOST:PORT/status (no JavaScript). Exit status 1 when it cannot be reached,\n"
        "2 for a mistake on the command line or in the config (a malformed --url).",
        epilog="examples:\n"
        "  fedloom status --config /etc/fedloom/root.toml\n"
        "  fedloom status --url http://127.0.0.1:9100 --json | jq .model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--config", type=Path, metavar="FILE", help="the daemon's config (its [metrics] host/port)"
    )
    where.add_argument("--url", metavar="URL", help="its metrics endpoint, http://HOST:PORT")
    status.add_argument("--json", action="store_true", help="print the raw status document")
    status.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for the daemon (default {DEFAULT_TIMEOUT_S:g})",
    )


MAX_TIMEOUT_S = 86400.0


def _base_url(config: Path | None, url: str | None) -> str:
    if url is not None:
        usage = f"--url {url!r}: give the metrics endpoint as http://HOST:PORT"
        try:  # a typo'd host or port is the command line's fault, not an unreachable daemon
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
        except ValueError:
            raise ConfigError(usage) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(usage)
        return url.rstrip("/").removesuffix("/status.json").removesuffix("/status")
    assert config is not None
    from fedloom.runtime.config import load_config

    cfg = load_config(config, check_files=False)
    if not cfg.metrics_port:
        raise StatusUnavailableError(
            f"{config}: {cfg.node_id} has no metrics endpoint: set [metrics] port in its "
            "config (and restart it) to serve /status.json"
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        cfg.metrics_host, cfg.metrics_host
    )
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.metrics_port}"


def fetch_status(base_url: str, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """The status document at ``base_url`` (``StatusUnavailableError`` with one line if not)."""
    url = f"{base_url}/status.json"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(MAX_DOCUMENT_BYTES + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise StatusUnavailableError(
                f"{url}: no status here (404): only aggregators (root, region) serve it"
            ) from None
        raise StatusUnavailableError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        raise StatusUnavailableError(
            f"cannot reach {base_url}: {why} (is the daemon running, with [metrics] port set?)"
        ) from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise StatusUnavailableError(f"{url}: the document is over {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = json.loads(body)
    except ValueError:
        raise StatusUnavailableError(f"{url}: not a JSON document") from None
    from fedloom.runtime.status import SCHEMA

    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        schema = doc.get("schema") if isinstance(doc, dict) else None
        if isinstance(schema, str) and schema.startswith("fedloom.status/"):
            raise StatusUnavailableError(
                f"{url}: a status document of schema {_clean(schema)[:40]!r}, which this "
                f"fedloom does not read (it reads {SCHEMA!r}): use the daemon's fedloom"
            )
        raise StatusUnavailableError(f"{url}: not a fedloom status document")
    return doc


def status_lines(doc: Mapping[str, Any], where: str) -> list[str]:
    """``format_status(doc)``, or ``StatusUnavailableError`` (one line) for a document
    that is not shaped as a board writes it."""
    try:
        return format_status(doc)
    except (AttributeError, TypeError, IndexError, KeyError, ValueError) as exc:
        raise StatusUnavailableError(
            f"{where}: the status document is malformed ({type(exc).__name__}: "
            f"{_clean(exc)[:120]}); --json prints it as it came"
        ) from None


def _clean(value: object) -> str:
    """Printable text (a peer's string may carry terminal escapes)."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))


def _num(value: object, fmt: str = ".4f") -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt)
    return "-"


def _member_line(node: Mapping[str, Any], indent: str) -> str:
    connected = node.get("connected")
    mark = "●" if connected is True else "○" if connected is False else "·"
    link, others = member_link(node)
    if link == "disconnected":
        link = "DISCONNECTED"
    elif link == "claimed":
        link = f"claimed by {_clean(node.get('parent'))}"
    if others:
        link += f" (ALSO CLAIMED BY {', '.join(_clean(r) for r in others)})"
    return (
        f"{indent}{mark} {_clean(node.get('id'))} ({_clean(node.get('role'))})  {link}  "
        f"last update {age_text(node.get('last_update_age_s'))}  "
        f"{_clean(node.get('updates', 0))} updates"
    )


def format_status(doc: Mapping[str, Any]) -> list[str]:
    """The document as plain text lines."""
    node = doc.get("node") or {}
    model = doc.get("model") or {}
    tiers: Sequence[Sequence[Mapping[str, Any]]] = doc.get("tiers") or [[], [], []]
    acc = doc.get("accuracy") or []
    last = acc[-1] if acc else None
    lines = [
        f"{_clean(node.get('id'))} ({_clean(node.get('role'))}), "
        f"{_clean(node.get('algorithm') or '-')}, up {_num(node.get('uptime_s'), '.0f')} s, "
        f"roster v{_clean(node.get('roster_version'))}, secure aggregation "
        f"{'on' if node.get('secure_aggregation') else 'off'}",
        f"model: version {_clean(model.get('version'))} "
        f"(last new version {age_text(model.get('version_age_s'))}, "
        f"{_clean(model.get('versions_seen', 0))} versions seen)",
        "accuracy: "
        + (
            f"{_num(last[2])} (loss {_num(last[3])}) at version {_clean(last[1])}"
            if last
            else "not evaluated yet"
        ),
    ]
    privacy = doc.get("privacy")
    if isinstance(privacy, Mapping):
        budget = privacy.get("epsilon_budget")
        text = f"privacy: epsilon = {_num(privacy.get('epsilon'), '.4g')}"
        if budget is not None:
            text += f" of epsilon_budget = {_num(budget, '.4g')}"
        if privacy.get("exhausted"):
            text += " (EXHAUSTED: no more releases)"
        lines.append(text)
    else:
        lines.append("privacy: no central DP")
    lines.append("tiers:")
    top = tiers[0][0] if tiers and tiers[0] else node
    lines.append(f"  {_clean(top.get('id'))} ({_clean(top.get('role'))})")
    children = list(tiers[1]) if len(tiers) > 1 else []
    sites = list(tiers[2]) if len(tiers) > 2 else []
    for child in children:
        lines.append(_member_line(child, "    "))
        for site in sites:
            if site.get("parent") == child.get("id"):
                lines.append(_member_line(site, "        "))
    known = {c.get("id") for c in children}
    for site in sites:
        if site.get("parent") not in known:
            lines.append(_member_line(site, "    "))
    refusals = doc.get("refusals")
    if isinstance(refusals, Mapping) and refusals:
        lines.append("refusals:")
        for site, entry in refusals.items():
            e = entry if isinstance(entry, Mapping) else {"reason": entry}
            lines.append(
                f"  {_clean(site)}: {_clean(e.get('code', '?'))} x{_clean(e.get('count', '?'))}"
                f" (version {_clean(e.get('version', '?'))}, {age_text(e.get('last_age_s'))}): "
                f"{_clean(e.get('reason', ''))}"
            )
    else:
        lines.append("refusals: none")
    lines.extend(_federated_lines(doc.get("federated_evaluation")))
    versions = doc.get("versions") or []
    if versions:
        tail = ", ".join(f"v{_clean(v)} at {_num(t, '.0f')} s" for t, v in versions[-5:])
        lines.append(f"recent versions: {tail}")
    return lines


def _federated_lines(fed: object) -> list[str]:
    """The federated evaluation (``runtime.reports``): the newest published figures, then
    each statistics query's state."""
    if fed is None:
        return []
    if not isinstance(fed, Mapping):
        return [f"federated evaluation: {_clean(fed)[:500]}"]
    lines: list[str] = []
    ev = fed.get("evaluation")
    if isinstance(ev, Mapping):
        published = [p for p in ev.get("published") or [] if isinstance(p, Mapping)]
        pending = ev.get("pending") or {}
        text = (
            f"federated evaluation (every {_clean(ev.get('every'))} versions, at least "
            f"{_clean(ev.get('min_sites'))} sites): "
        )
        if published:
            p = published[-1]
            text += (
                f"accuracy {_num(p.get('accuracy'))} (loss {_num(p.get('loss'))}) at version "
                f"{_clean(p.get('version'))} over {_clean(p.get('sites'))} sites"
            )
        else:
            text += "nothing published yet"
        if isinstance(pending, Mapping) and pending:
            text += "; waiting: " + ", ".join(
                f"v{_clean(v)} ({_clean(n)} sites)" for v, n in list(pending.items())[:5]
            )
        lines.append(text)
    analytics = fed.get("analytics")
    if isinstance(analytics, Mapping):
        for name, q in list(analytics.items())[:20]:
            if not isinstance(q, Mapping):
                continue
            state = "published" if q.get("result") is not None else "not published yet"
            lines.append(
                f"statistics {_clean(name)} (tag {_clean(q.get('tag'))}): "
                f"{_clean(q.get('sites_answered'))} sites answered, {state}"
            )
    return lines


def _print(lines: list[str], out: TextIO) -> None:
    """``lines`` on ``out``; on a terminal (and without ``NO_COLOR``) the link markers are
    coloured with ANSI escapes (the text itself was cleaned of any by ``_clean``)."""
    colour = out.isatty() and not os.environ.get("NO_COLOR")
    for line in lines:
        if colour:
            line = line.replace("●", "\x1b[32m●\x1b[0m").replace("○", "\x1b[31m○\x1b[0m")
            line = line.replace("DISCONNECTED", "\x1b[1;31mDISCONNECTED\x1b[0m")
        out.write(line + "\n")


def cmd_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``fedloom status`` (see the module docstring)."""
    stream = sys.stdout if out is None else out
    # A socket takes no infinite (or time_t-overflowing) time-out: a day is plenty.
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        raise ConfigError(
            f"--timeout {args.timeout}: must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}"
        )
    try:
        base = _base_url(args.config, args.url)
        doc = fetch_status(base, args.timeout)
        lines = None if args.json else status_lines(doc, f"{base}/status.json")
    except StatusUnavailableError as exc:
        print(f"fedloom status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if lines is None:
        stream.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        _print(lines, stream)
    return EXIT_OK
