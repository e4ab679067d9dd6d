"""``fedloom dataset add|list|show|revoke``: a site's registered tables (``runtime.datasets``).

    fedloom dataset add FILE --state-dir DIR --name NAME --tag TAG [--tag ...] --label COL
                        [--features C1,C2,...] [--type COL=int|float|category|bool ...]
    fedloom dataset list --state-dir DIR [--json]
    fedloom dataset show NAME --state-dir DIR [--json]
    fedloom dataset revoke NAME --state-dir DIR

``--config SITE.toml`` may stand for ``--state-dir`` (the config's ``state_dir``). Mistakes
end with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, TextIO

from fedloom.federation.config_reader import ConfigError

__all__ = ["add_dataset_command", "cmd_dataset"]

_EXAMPLE = """\
example (a hospital site):
  fedloom dataset add /srv/data/cohort.csv --config /etc/fedloom/site.toml \\
      --name cohort-2026 --tag diabetes --label outcome --type sex=category
  fedloom dataset list --config /etc/fedloom/site.toml
  fedloom dataset revoke cohort-2026 --config /etc/fedloom/site.toml

A plan then names the data by tag: [plan] kind = "tabular", dataset_tag = "diabetes".
Run these as the service's user (sudo -u fedloom ...) so the daemon can read the registry.
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def _where(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--state-dir", type=Path, metavar="DIR", help="the site's state directory")
    g.add_argument(
        "--config", type=Path, metavar="SITE.toml", help="the site's config (its state_dir)"
    )


def add_dataset_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    ds = sub.add_parser(
        "dataset",
        help="register, list, show or revoke the site's own tables (CSV/Parquet)",
        description=_wrap(
            "A site's dataset registry (STATE_DIR/datasets.json): each table's path, "
            "SHA-256, row count, schema (feature and label columns with their types, the label's "
            "classes) and tags; never the data. Training plans name their data by tag; revoking "
            "a dataset stops any training on it at the next job."
        ),
        epilog=_EXAMPLE,
        formatter_class=fmt,
    )
    acts = ds.add_subparsers(dest="dataset_command", metavar="ACTION")
    add = acts.add_parser(
        "add",
        help="register a CSV or Parquet file",
        description=_wrap(
            "Read FILE (CSV or Parquet), check that the declared columns exist and "
            "that every value fits its type (the first bad row is named), and record it. Column "
            "types not given with --type are inferred (bool for true/false, int, float, else "
            "category; declare yes/no or 0/1 columns bool). Every "
            "row must be complete."
        ),
        epilog=_EXAMPLE,
        formatter_class=fmt,
    )
    add.add_argument("file", type=Path, metavar="FILE", help="a .csv or .parquet file")
    _where(add)
    add.add_argument("--name", required=True, help="a new, unique name (letters, digits, ._-)")
    add.add_argument(
        "--tag",
        dest="tags",
        action="append",
        required=True,
        metavar="TAG",
        help="a tag plans ask for (repeat for several); one active dataset per tag",
    )
    add.add_argument("--label", required=True, metavar="COL", help="the label column")
    add.add_argument(
        "--features",
        metavar="C1,C2,...",
        help="the feature columns, comma-separated (default: every column but the label)",
    )
    add.add_argument(
        "--type",
        dest="types",
        action="append",
        default=[],
        metavar="COL=TYPE",
        help="a column's type: int, float, category or bool (repeat for several)",
    )
    for action, text in (
        ("list", "list the registered datasets"),
        ("show", "show one dataset's record"),
    ):
        p = acts.add_parser(action, help=text, epilog=_EXAMPLE, formatter_class=fmt)
        if action == "show":
            p.add_argument("name", metavar="NAME")
        _where(p)
        p.add_argument("--json", action="store_true", help="print JSON")
    rv = acts.add_parser(
        "revoke",
        help="stop all training on a dataset (the file is not touched)",
        description=_wrap(
            "Mark NAME revoked: the next job that asks for its tag is refused "
            "(dataset_revoked), whatever runs. The record stays, for the audit trail; the name "
            "is never reused."
        ),
        epilog=_EXAMPLE,
        formatter_class=fmt,
    )
    rv.add_argument("name", metavar="NAME")
    _where(rv)


def _state_dir(args: argparse.Namespace) -> tuple[Path, Any]:
    """The state directory, and the node's identity when ``--config`` names a key this
    process can read (it signs the audit log's head after a change)."""
    if args.state_dir is not None:
        return Path(args.state_dir), None
    from fedloom.runtime.audit import readable_identity
    from fedloom.runtime.config import load_config

    cfg = load_config(args.config, check_files=False)
    if cfg.role not in ("site", "peer"):
        raise ConfigError(
            f"{args.config}: a {cfg.role} holds no datasets; give a site's config or --state-dir"
        )
    return cfg.state_dir, readable_identity(cfg)


def _hand_over(state_dir: Path) -> None:
    """Run as root, leave the registry files to the state directory's owner (the
    daemon's user must still read them; ``runtime.audit.hand_to_state_owner``)."""
    from fedloom.runtime.audit import hand_to_state_owner
    from fedloom.runtime.datasets import LOCK_FILE, REGISTRY_FILE

    hand_to_state_owner(state_dir, state_dir / REGISTRY_FILE, state_dir / LOCK_FILE)


def _types(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        col, sep, kind = item.partition("=")
        if not sep or not col or not kind:
            raise ConfigError(f"--type {item!r}: expected COL=TYPE, e.g. --type sex=category")
        if col in out:
            raise ConfigError(f"--type {col}: given twice")
        out[col.strip()] = kind.strip()
    return out


def cmd_dataset(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``fedloom dataset ACTION``; ``ConfigError`` (exit 2) on a mistake."""
    from fedloom.runtime.datasets import DatasetRegistry, RegistryError

    out = out if out is not None else sys.stdout
    action = args.dataset_command
    if action is None:
        raise ConfigError("dataset: choose an action: add, list, show or revoke")
    state_dir, identity = _state_dir(args)
    reg = DatasetRegistry(state_dir, identity)
    if action == "add":
        features = None
        if args.features is not None:
            features = [c.strip() for c in args.features.split(",") if c.strip()]
        rec = reg.add(
            args.file,
            name=args.name,
            tags=args.tags,
            label=args.label,
            features=features,
            types=_types(args.types),
        )
        _hand_over(state_dir)
        print(
            f"registered {rec.name}: {rec.rows} rows, {len(rec.features)} features, label "
            f"{rec.label} ({len(rec.classes)} classes), sha256 {rec.sha256[:16]}..., tags "
            f"{', '.join(rec.tags)}",
            file=out,
        )
        return 0
    if action == "list":
        records = reg.records()
        if args.json:
            print(json.dumps([r.to_json() for r in records], indent=2), file=out)
            return 0
        if not records:
            print(f"no datasets registered in {reg.state_dir}", file=out)
            return 0
        rows = [("NAME", "TAGS", "ROWS", "SHA256", "STATUS")]
        rows += [(r.name, ",".join(r.tags), str(r.rows), r.sha256[:12], r.status) for r in records]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            print(
                "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out
            )
        return 0
    found = reg.get(args.name)
    if found is None:
        from fedloom.runtime.datasets import _unknown

        raise RegistryError(_unknown(args.name, reg.records()))
    if action == "show":
        if args.json:
            print(json.dumps(found.to_json(), indent=2), file=out)
        else:
            _show(found, out)
        return 0
    if action == "revoke":
        done = reg.revoke(args.name)
        _hand_over(state_dir)
        print(
            f"revoked {done.name} at {done.revoked_at}: no job trains on it from now on "
            f"(tags {', '.join(done.tags)}; {done.path} is untouched)",
            file=out,
        )
        return 0
    raise ConfigError(f"dataset: unknown action {action!r}")


def _show(rec: Any, out: TextIO) -> None:
    features = ", ".join(f"{c} ({t})" for c, t in rec.features)
    classes = ", ".join(str(c) for c in rec.classes)
    lines = [
        f"name:      {rec.name}",
        f"status:    {rec.status}" + (f" (revoked at {rec.revoked_at})" if rec.revoked_at else ""),
        f"path:      {rec.path} ({rec.format}, {rec.size} bytes)",
        f"sha256:    {rec.sha256}",
        f"rows:      {rec.rows}",
        f"label:     {rec.label} ({rec.label_type}); classes: {classes}",
        f"tags:      {', '.join(rec.tags)}",
        f"added at:  {rec.added_at}",
    ]
    for line in lines:
        print(line, file=out)
    print(
        textwrap.fill(features, 88, initial_indent="features:  ", subsequent_indent=" " * 11),
        file=out,
    )
