"""``fedloom run-report``: an RO-Crate (https://w3id.org/ro/crate) describing a federation.

``write_report(config, out, ...)`` reads, and never changes, the root's config and state
directory (a running root's too, as ``runtime.export`` does) and what the sites gave the
coordinator (their state directories, or their ``fedloom audit export`` files), and writes
``OUT/ro-crate-metadata.json`` with the ``rocrate`` library. The crate describes; it
holds no data of any site:

* ``#roster``: the roster's version and digest (the newer one the root installed while
  running, if any) and ``#node-<id>`` for every member with its role (no keys);
* ``#plan``: the training plan (its table from the root's config, and the plan digest
  when ``runtime.governance`` is installed); ``#run``: the training as a CreateAction,
  instrument the plan, objects the sites' datasets, result the model;
* ``#approval-<site>-<digest>``: each plan a site's operator approved (an
  AuthorizeAction: digest, bounds, note, when, revoked when), from its approvals file
  (``runtime.governance``) or its audit export (``plan_approved``/``plan_revoked``);
* ``#dataset-<site>-<name>``: each dataset a site registered (tags, content SHA-256, row
  count, declared columns, status), from ``runtime.datasets.DatasetRegistry(state_dir)``
  or from the site's audit export (its dataset entries);
* ``#model-v<N>``: the root's current model (version, digest, lineage, signature if held:
  ``runtime.export``); with ``--model FILE`` the exported file itself is in the crate;
* ``#metrics``: the root's published federated evaluation (JSON files its reports write
  in its state directory), when there are any;
* ``#privacy``: the privacy budget spent (``runtime.privacy_cli.read_ledger``: ε at the
  root's δ, its budget) when the root has a ledger;
* ``#audit-<node>``: the head (last seq and hash) of each audit log read.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.config import DaemonConfig, load_config
from fedloom.runtime.export import (
    ExportInUseError,
    RootModel,
    fedloom_version,
    read_root_model,
    root_roster,
    verify_export,
)
from fedloom.transport.roster import Roster

__all__ = ["write_report"]

_MAX_AUDIT_BYTES = 512 << 20  # a site's audit export read whole (it is hashed line by line)
_MAX_TEXT = 200  # strings read from a site's files are capped before they enter the crate
# What the root's reports publish in its state directory (federated evaluation, analytics).
_METRIC_FILES = ("evaluation.json", "analytics/*.json")
# Properties schema.org (the RO-Crate context) has no term for: declared in the crate's
# @context under fedloom's own namespace, so JSON-LD processors keep them.
TERMS = {
    term: f"urn:fedloom:terms:{term}"
    for term in (
        "declaredExamples",
        "lineage",
        "signature",
        "signer",
        "rows",
        "features",
        "label",
        "added_at",
        "revoked_at",
        "seq",
        "hash",
        "releases",
        "accountant",
        "delta",
        "epsilon",
        "epsilon_budget",
        "epsilon_note",
        "bounds",
    )
}


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _optional(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _text(value: Any) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))[:_MAX_TEXT]


def _roster(cfg: DaemonConfig) -> Roster:
    """The roster the root uses: its file's, or a newer one it installed while running
    (kept in its state directory, verified again here)."""
    return root_roster(cfg)


def _audit_entries(state_dir: Path) -> list[dict[str, Any]]:
    read_entries = _optional("fedloom.runtime.audit", "read_entries")
    if read_entries is None or not (state_dir / "audit").exists():
        return []
    try:
        return list(read_entries(state_dir))
    except Exception as exc:
        raise ConfigError(
            f"{state_dir}: its audit log does not verify ({_text(exc)}); see `fedloom audit verify`"
        ) from None


def _jsonl_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of a site's ``fedloom audit export`` file (each chained to the one
    before: an edited export is refused here too)."""
    if not path.is_file():
        raise ConfigError(f"--site-audit {path}: no such file")
    entries: list[dict[str, Any]] = []
    entry_hash = _optional("fedloom.runtime.audit", "entry_hash")
    try:
        if path.stat().st_size > _MAX_AUDIT_BYTES:
            raise ConfigError(
                f"--site-audit {path}: larger than {_MAX_AUDIT_BYTES >> 20} MiB; export "
                "the entries since the run began (`fedloom audit export --since SEQ`)"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--site-audit {path}: cannot read ({_text(exc)})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise ConfigError(f"--site-audit {path}: line {n} is not JSON") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("fields"), dict):
            raise ConfigError(f"--site-audit {path}: line {n} is not an audit entry")
        if entry_hash is not None:
            body = {k: v for k, v in entry.items() if k != "hash"}
            if entry_hash(body) != entry.get("hash"):
                raise ConfigError(f"--site-audit {path}: line {n} does not match its hash")
        if entries and entry.get("prev") != entries[-1].get("hash"):
            raise ConfigError(
                f"--site-audit {path}: line {n} does not follow line {n - 1} (entries "
                "missing or reordered; an export filtered with --kind cannot be checked)"
            )
        entries.append(entry)
    return entries


def _head(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    if not entries:
        return None
    last = entries[-1]
    return {"seq": last.get("seq"), "hash": _text(last.get("hash"))}


_DATASET_FIELDS = ("name", "tags", "sha256", "rows", "size", "format", "added_at", "revoked_at")


def _dataset_props(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a registered dataset's record may say in the crate (``runtime.datasets``'
    ``DatasetRecord.to_json()``, or an audit entry's fields): never its path, never data;
    its declared columns as "name:type"."""
    out: dict[str, Any] = {}
    for key in _DATASET_FIELDS:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, list | tuple):
            out[key] = [_text(v) for v in value][:256]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value
        else:
            out[key] = _text(value)
    schema = record.get("schema")
    if isinstance(schema, Mapping):
        features = schema.get("features")
        if isinstance(features, list):
            out["features"] = [
                f"{_text(f.get('name'))}:{_text(f.get('type'))}"
                for f in features[:1024]
                if isinstance(f, Mapping)
            ]
        label = schema.get("label")
        if isinstance(label, Mapping):
            out["label"] = f"{_text(label.get('name'))}:{_text(label.get('type'))}"
    if "revoked_at" in record:
        out["status"] = "active" if record.get("revoked_at") is None else "revoked"
    return out


def _registry_records(state_dir: Path) -> list[dict[str, Any]]:
    registry = _optional("fedloom.runtime.datasets", "DatasetRegistry")
    if registry is None:
        return []
    try:
        records = registry(state_dir).records()
    except Exception as exc:
        raise ConfigError(
            f"--site-state {state_dir}: cannot read its datasets ({_text(exc)})"
        ) from None
    out = []
    for rec in records:
        data = rec.to_json() if hasattr(rec, "to_json") else rec
        if isinstance(data, str):
            data = json.loads(data)
        if isinstance(data, Mapping):
            out.append(_dataset_props(data))
    return out


_DATASET_KINDS = ("dataset_added", "dataset_revoked")  # what `fedloom dataset` records


def _audit_datasets(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Datasets a site registered, from its audit entries: ``dataset_added``, then
    ``dataset_revoked`` (the latest state). ``dataset_used`` (a job's) names no new
    dataset: it is not read here."""
    found: dict[str, dict[str, Any]] = {}
    for entry in entries:
        kind = entry.get("kind")
        fields = entry.get("fields")
        if kind not in _DATASET_KINDS or not isinstance(fields, Mapping):
            continue
        raw = fields.get("name")
        if not isinstance(raw, str) or not raw:
            continue
        name = _text(raw)
        props = found.setdefault(name, {"name": name})
        props.update({k: v for k, v in _dataset_props(fields).items() if k != "name"})
        if "revoke" in kind:
            props["status"] = "revoked"
    return list(found.values())


def _when(value: Any) -> str | None:
    """A unix time as ISO 8601 (UTC), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.datetime.fromtimestamp(value, datetime.UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return None


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _approval(digest: Any, bounds: Any, note: Any, at: Any, revoked: Any) -> dict[str, Any] | None:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        return None
    out: dict[str, Any] = {"digest": digest}
    if isinstance(bounds, Mapping):
        out["bounds"] = {_text(k)[:40]: _bound(v) for k, v in list(bounds.items())[:64]}
    if note:
        out["note"] = _text(note)
    out["approved_at"] = _when(at)
    out["revoked_at"] = _when(revoked)
    return out


def _bound(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_bound(v) for v in value[:64]]
    if isinstance(value, bool | int | float) or value is None:
        return value
    return _text(value)[:40]


def _site_approvals(state_dir: Path) -> list[dict[str, Any]]:
    """The plans the site's operator approved (``runtime.governance``'s approvals.json):
    digest, bounds, note, when; revoked ones with when."""
    approvals_of = _optional("fedloom.runtime.governance", "Approvals")
    if approvals_of is None:
        return []
    try:
        entries = approvals_of(state_dir).entries()
    except ValueError as exc:  # ApprovalsError: a damaged file
        raise ConfigError(f"--site-state {state_dir}: {_text(exc)}") from None
    out = []
    for e in entries:
        j = e.to_json()
        found = _approval(
            j.get("digest"),
            j.get("bounds"),
            j.get("note"),
            j.get("approved_at"),
            j.get("revoked_at"),
        )
        if found is not None:
            out.append(found)
    return out


def _audit_approvals(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The approvals a site's audit entries record (``plan_approved``, ``plan_revoked``)."""
    found: dict[str, dict[str, Any]] = {}
    for entry in entries:
        kind, fields = entry.get("kind"), entry.get("fields")
        if not isinstance(fields, Mapping):
            continue
        if kind == "plan_approved":
            a = _approval(
                fields.get("digest"),
                fields.get("bounds"),
                fields.get("note"),
                entry.get("ts"),
                None,
            )
            if a is not None:
                found[a["digest"]] = a
        elif kind == "plan_revoked" and fields.get("digest") in found:
            found[fields["digest"]]["revoked_at"] = _when(entry.get("ts"))
    return list(found.values())


def _node_of(entries: Sequence[Mapping[str, Any]], fallback: str, members: set[str]) -> str:
    """The roster member whose audit log this is: the first entry naming one (commands
    run by hand record as "local"), else ``fallback`` (the directory's or file's name)."""
    for entry in entries:
        node = entry.get("node")
        if isinstance(node, str) and node in members:
            return node
    return _text(fallback)


def _named(arg: Path, members: set[str]) -> tuple[str | None, Path]:
    """``SITE=PATH`` (SITE a roster member) or a plain path."""
    name, sep, rest = str(arg).partition("=")
    if sep and name in members:
        return name, Path(rest)
    if sep and not arg.exists() and Path(rest).exists():  # SITE=PATH, SITE a typo
        shown = sorted(members)[:10]
        more = ", ..." if len(members) > len(shown) else ""
        raise ConfigError(
            f"{arg}: {name!r} is not a member of the roster ({', '.join(shown)}{more})"
        )
    return None, arg


def _metrics(state_dir: Path) -> dict[str, Any]:
    """The root's published figures (JSON files its report middlewares write)."""
    out: dict[str, Any] = {}
    for pattern in _METRIC_FILES:
        for path in sorted(state_dir.glob(pattern)):
            try:
                if path.stat().st_size > 1 << 20:
                    continue
                out[str(path.relative_to(state_dir))] = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError):
                continue
    return out


def _privacy(state_dir: Path, enabled: bool) -> dict[str, Any] | None:
    """The root's central DP ledger, None for a root without ``[privacy]``. With it, a
    ledger that cannot be read is refused: a crate without ``#privacy`` says no budget
    was spent."""
    from fedloom.runtime import privacy_cli

    try:
        found = privacy_cli.read_ledger(state_dir)
    except (ConfigError, OSError) as exc:
        if not enabled:
            return None  # no privacy ledger: a root without [privacy]
        raise ConfigError(f"the root's privacy ledger: {_text(exc)}") from None
    if found is None:
        if not enabled:
            return None
        raise ConfigError(
            f"{state_dir}: the running daemon checkpointed during every read of its "
            "privacy ledger; try again"
        )
    ledger, settings, _ = found
    out: dict[str, Any] = {
        "releases": len(ledger),
        "accountant": ledger.accountant,
        "delta": settings["delta"],
        "epsilon_budget": settings["epsilon_budget"],
    }
    delta = settings["delta"]
    if isinstance(delta, float) and 0.0 < delta < 1.0:
        try:
            out["epsilon"] = ledger.epsilon(delta)
        except (ArithmeticError, ModuleNotFoundError) as exc:
            out["epsilon_note"] = f"not computed here: {_text(exc)}"
    return out


def _plan_digest(cfg: DaemonConfig) -> str | None:
    plan_digest = _optional("fedloom.runtime.governance", "plan_digest")
    if plan_digest is None:
        return None
    try:
        return str(plan_digest(cfg))
    except Exception:
        return None


def _plan_table(config: Path) -> dict[str, Any]:
    import tomllib

    try:
        raw = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    plan = raw.get("plan")
    return dict(plan) if isinstance(plan, Mapping) else {}


def write_report(
    config: Path,
    out: Path,
    *,
    site_states: Sequence[Path] = (),
    site_audits: Sequence[Path] = (),
    model: Path | None = None,
) -> Path:
    """Write the RO-Crate (see the module docstring) into ``out``; its metadata file."""
    from rocrate.model.contextentity import ContextEntity
    from rocrate.rocrate import ROCrate

    cfg = load_config(config)
    if cfg.role != "root":
        raise ConfigError(f"{config}: the config of a {cfg.role}, not a root's")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty directory")
    try:
        root_model = read_root_model(config=config)
    except ExportInUseError as exc:
        raise ConfigError(str(exc)) from None
    roster = _roster(cfg)
    exported = None
    if model is not None:
        found = verify_export(model, roster)
        if not found.ok:
            why = "its tensors do not hash to its digest" if not found.digest_ok else ""
            if found.signature.startswith("INVALID"):
                why = (why + "; " if why else "") + f"its signature is {found.signature}"
            raise ConfigError(
                f"--model {model}: does not verify ({why}); see `fedloom model verify`"
            )
        exported = (None, found.metadata)

    crate = ROCrate()
    crate.metadata.extra_terms.update(TERMS)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    root = crate.root_dataset
    root["name"] = f"fedloom run report: federation of {cfg.node_id}"
    root["description"] = (
        "Provenance of a federated training run (fedloom): roster, plan, the datasets "
        "each site registered (hashes, never data), model versions, metrics, privacy "
        "budget and audit log heads."
    )
    root["datePublished"] = now
    root["license"] = "https://spdx.org/licenses/CC-BY-4.0"

    def add(ident: str, props: dict[str, Any]) -> Any:
        ident = "#" + _ID_UNSAFE.sub("_", ident.removeprefix("#"))
        unique, n = ident, 1
        while crate.get(unique) is not None:  # two sites' files with the same name
            n += 1
            unique = f"{ident}-{n}"
        return crate.add(ContextEntity(crate, unique, properties=props))

    software = add(
        "#fedloom",
        {"@type": "SoftwareApplication", "name": "fedloom", "version": fedloom_version()},
    )
    nodes = {
        e.node_id: add(
            f"#node-{e.node_id}",
            {
                "@type": "Organization",
                "name": e.node_id,
                "roleName": e.role,
                **({"declaredExamples": e.examples} if e.examples is not None else {}),
            },
        )
        for e in roster.entries
    }
    roster_entity = add(
        "#roster",
        {
            "@type": "CreativeWork",
            "name": "federation roster (signed by the consortium)",
            "version": str(roster.version),
            "identifier": "sha256:" + roster.digest.hex(),
            "hasPart": list(nodes.values()),
        },
    )
    plan_table = _plan_table(config)
    plan_props: dict[str, Any] = {
        "@type": "SoftwareSourceCode",
        "name": "training plan",
        "description": json.dumps(plan_table, sort_keys=True, default=str),
        "identifier": _plan_digest(cfg)
        or "sha256:"
        + hashlib.sha256(json.dumps(plan_table, sort_keys=True, default=str).encode()).hexdigest(),
    }
    if _plan_digest(cfg) is None:
        plan_props["disambiguatingDescription"] = "identifier: sha256 of the [plan] table's JSON"
    plan = add("#plan", plan_props)

    datasets: list[Any] = []
    members = set(nodes)
    Seen = tuple[str, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]
    sites_seen: list[Seen] = []
    for named in site_states:
        given, state_dir = _named(named, members)
        if not state_dir.is_dir():
            raise ConfigError(f"--site-state {state_dir}: no such directory")
        entries = _audit_entries(state_dir)
        site = given or _node_of(entries, state_dir.name, members)
        records = _registry_records(state_dir) or _audit_datasets(entries)
        site_approvals = _site_approvals(state_dir) or _audit_approvals(entries)
        sites_seen.append((site, records, entries, site_approvals))
    for named in site_audits:
        given, path = _named(named, members)
        entries = _jsonl_entries(path)
        site = given or _node_of(entries, path.stem, members)
        sites_seen.append((site, _audit_datasets(entries), entries, _audit_approvals(entries)))
    audit_heads = []
    approvals: list[Any] = []
    for site, records, entries, approved in sites_seen:
        for a in approved:
            approval: dict[str, Any] = {
                "@type": "AuthorizeAction",
                "name": f"{site} approved plan {a['digest'][:19]}",
                "identifier": a["digest"],
                "object": plan if a["digest"] == plan_props["identifier"] else a["digest"],
                "bounds": json.dumps(a.get("bounds", {}), sort_keys=True, default=str),
                "actionStatus": "CompletedActionStatus",
            }
            for key, prop in (("note", "description"), ("approved_at", "startTime")):
                if a.get(key):
                    approval[prop] = a[key]
            if a.get("revoked_at"):
                approval["endTime"] = a["revoked_at"]
                approval["status"] = "revoked"
            if site in nodes:
                approval["agent"] = nodes[site]
            approvals.append(add(f"#approval-{site}-{a['digest'][7:19]}", approval))
        for rec in records:
            props: dict[str, Any] = {
                "@type": "Dataset",
                "name": f"{rec.get('name', '?')} at {site}",
                "description": "registered at the site; its data never left it",
            }
            if rec.get("sha256"):
                props["identifier"] = f"sha256:{rec['sha256']}"
            if rec.get("tags"):
                props["keywords"] = rec["tags"]
            for key in ("rows", "size", "features", "label", "status", "added_at", "revoked_at"):
                if key in rec:
                    props[key] = rec[key]
            if site in nodes:
                props["provider"] = nodes[site]
            datasets.append(add(f"#dataset-{site}-{rec.get('name', len(datasets))}", props))
        head = _head(entries)
        if head is not None:
            audit_heads.append(
                add(
                    f"#audit-{site}",
                    {"@type": "PropertyValue", "name": f"audit log head of {site}", **head},
                )
            )
    root_head = _head(_audit_entries(Path(cfg.state_dir)))
    if root_head is not None:
        audit_heads.append(
            add(
                f"#audit-{cfg.node_id}",
                {"@type": "PropertyValue", "name": f"audit log head of {cfg.node_id}", **root_head},
            )
        )

    model_entities = _add_model(crate, add, root_model, model, exported, nodes.get(cfg.node_id))
    figures = _metrics(Path(cfg.state_dir))
    extras = []
    if figures:
        extras.append(
            add(
                "#metrics",
                {
                    "@type": "PropertyValue",
                    "name": "published federated evaluation and statistics",
                    "value": json.dumps(figures, sort_keys=True, default=str),
                },
            )
        )
    privacy = _privacy(Path(cfg.state_dir), cfg.privacy.enabled)
    if privacy is not None:
        extras.append(
            add(
                "#privacy",
                {
                    "@type": "PropertyValue",
                    "name": "privacy budget spent (central DP at the root)",
                    **{k: v for k, v in privacy.items() if v is not None},
                },
            )
        )
    add(
        "#run",
        {
            "@type": "CreateAction",
            "name": f"federated training up to model version {root_model.current_version}",
            "endTime": now,
            "instrument": [software, plan],
            "object": [roster_entity, *datasets],
            "result": [*model_entities, *extras],
            "agent": nodes.get(cfg.node_id, software),
        },
    )
    root["mentions"] = [roster_entity, plan, *approvals, *audit_heads]
    _write_whole(crate, out)
    return out / "ro-crate-metadata.json"


def _write_whole(crate: Any, out: Path) -> None:
    """Write ``crate`` into ``out`` whole or not at all: into a new directory beside it,
    renamed onto ``out`` (absent or empty) once complete, so that a full disk or a failed
    copy of the model leaves no half crate behind."""
    tmp: Path | None = None
    if out.is_symlink():  # a link to an empty directory: the crate goes there, as before
        out = out.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        crate.write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # as mkdir would have made it (mkdtemp's is 0700)
        os.replace(tmp, out)  # replaces an empty directory; anything else: refused above
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"--out {out}: cannot write: {exc.strerror or exc}") from None


def _add_model(
    crate: Any,
    add: Any,
    root_model: RootModel,
    model: Path | None,
    exported: tuple[Any, dict[str, str]] | None,
    root_node: Any,
) -> list[Any]:
    props: dict[str, Any] = {
        "@type": "CreativeWork",
        "name": f"global model version {root_model.version}",
        "version": str(root_model.version),
        "identifier": "sha256:" + root_model.digest.hex(),
        "lineage": json.dumps(root_model.lineage, sort_keys=True),
    }
    if root_model.signature:
        props["signature"] = root_model.signature.hex()
        props["signer"] = root_model.signer
    if root_node is not None:
        props["creator"] = root_node
    entity = add(f"#model-v{root_model.version}", props)
    if model is None or exported is None:
        return [entity]
    meta = exported[1]  # verified: its digest is the tensors' (``verify_export``)
    properties: dict[str, Any] = {
        "name": f"exported model version {_text(meta.get('model_version', '?'))}",
        "encodingFormat": "application/octet-stream",
        "identifier": _text(meta.get("digest", "")),
        "version": _text(meta.get("model_version", "")),
    }
    if meta.get("digest") == "sha256:" + root_model.digest.hex():
        properties["exampleOfWork"] = entity  # the very model the root holds
    else:
        properties["description"] = (
            "an export of another model than the root's current one (its digest differs): "
            "not linked to it"
        )
    copied = crate.add_file(str(model), dest_path=model.name, properties=properties)
    return [entity, copied]
