"""Getting the model out: the root's current global model from its state directory, written
as safetensors or a torch file with its provenance; and the check of such a file.

``read_root_model`` reads, and never changes, a root's state directory, a running
daemon's too: it takes no lock (``runtime.state_cli`` reads the checkpoint and the live
log as ``fedloom state check`` does, again while a checkpoint replaced files during a
read). With the root's config it restores a node built from that config exactly as a
restart would (``runtime.recovery.restore_node``: the checkpoint plus every record
logged after it), so the export is the model the root holds now. With the state
directory alone it can only take the checkpoint's model (the records after it need the
root's algorithm settings to replay) and says how many records that leaves out.

What goes with the tensors (``metadata``, str -> str; lists and maps JSON-encoded):

* ``fedloom_version``, ``node_id``, ``algorithm`` and ``model_version``;
* ``digest``: ``sha256:<hex>`` of ``transport.e2e.tensors_digest`` over the tensors in
  ``tensor_order``: the hash the root signs (its signature covers ``{version, parent,
  digest}`` of the model as its children decode it, which is these tensors when the root
  sends fp32);
* ``signer``/``signature``/``signature_parent``/``signature_settings``: the root's
  signature of this version (``{version, parent, digest, settings digest}``, the settings
  being the training config it sent with the model), from the root's audit log
  (``runtime.audit``'s "model_signed" entries) when it holds one for this version over
  this digest AND it verifies against the root's roster (read with the root's config;
  an audit log is a file anyone who can write the state directory can append to). The
  root's state directory keeps no model proofs (``federation.signing`` holds them in
  memory): without such an entry, with one that does not verify, or with the state
  directory alone (no roster to check it against) there is no signature, and
  ``signature_note`` says why;
* ``lineage``: the versions the audit log records ("model_version": with their digests;
  "model_signed": with the parent each proof names), else what the state holds (a
  root's version v is always one server step from v - 1);
* ``plan_digest`` (``runtime.governance.plan_digest`` of the config, when available).

``verify_export`` recomputes the digest of a written file and checks the signature
against a roster's root key; a signature it was not given a roster to check is not ok.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.federation.config_reader import ConfigError
from fedloom.federation.store import CorruptStateError, Recovery, read_value
from fedloom.runtime.config import DaemonConfig, load_config
from fedloom.runtime.state_cli import _CHECKPOINT_FILE, _inspect, _inspect_live, _lock_held
from fedloom.transport.e2e import tensors_digest, verify_model
from fedloom.transport.roster import Roster
from fedloom.transport.settings import NO_SETTINGS

__all__ = [
    "FORMATS",
    "ROOT_KINDS",
    "ExportInUseError",
    "RootModel",
    "Verified",
    "fedloom_version",
    "read_export",
    "read_root_model",
    "root_roster",
    "verify_export",
    "write_export",
]

FORMATS = ("safetensors", "torch")
METADATA_FORMAT = "fedloom-model/1"
# Checkpoint kinds of a root's node (a region's, a site's or a gossip peer's state is not).
ROOT_KINDS = frozenset({"fedbuff", "fedasync", "sync"})
# The root's audit entries the export reads (``runtime.audit``).
_AUDIT_KINDS = ("model_version", "model_signed")
MAX_LINEAGE = 1000  # versions in the metadata's lineage (the newest)
_NO_PROOF = (
    "the root's state keeps no model signatures and its audit log holds none of this "
    "version over this digest: the digest identifies the model, nothing signs it"
)


class ExportInUseError(RuntimeError):
    """A running daemon checkpointed during every read of its state directory."""


Weights = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class RootModel:
    """A root's model as read from its state, with what is known of its provenance."""

    node_id: str
    algorithm: str
    version: int
    weights: Weights
    digest: bytes
    current_version: int
    source: str  # "checkpoint+log" (restored as a restart would) or "checkpoint"
    skipped_records: int = 0  # log records after the checkpoint not replayed ("checkpoint")
    signer: str = ""
    signature: bytes = b""
    signature_parent: int = 0
    signature_settings: bytes = NO_SETTINGS
    lineage: list[dict[str, Any]] = field(default_factory=list)
    lineage_source: str = "state"
    plan_digest: str | None = None
    signature_note: str = ""  # why there is no signature (default: _NO_PROOF)

    def metadata(self) -> dict[str, str]:
        """The str -> str metadata written with the tensors (see the module docstring)."""
        meta = {
            "format": METADATA_FORMAT,
            "fedloom_version": fedloom_version(),
            "node_id": self.node_id,
            "algorithm": self.algorithm,
            "model_version": str(self.version),
            "current_version": str(self.current_version),
            "digest": "sha256:" + self.digest.hex(),
            "digest_algorithm": "fedloom.transport.e2e.tensors_digest",
            "tensor_order": json.dumps(list(self.weights)),
            "source": self.source,
            "lineage": json.dumps(self.lineage, sort_keys=True),
            "lineage_source": self.lineage_source,
            "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        if self.skipped_records:
            meta["skipped_log_records"] = str(self.skipped_records)
        if self.signature:
            meta.update(
                signer=self.signer,
                signature=self.signature.hex(),
                signature_parent=str(self.signature_parent),
                signature_settings="sha256:" + self.signature_settings.hex(),
            )
        else:
            meta["signature_note"] = self.signature_note or _NO_PROOF
        if self.plan_digest is not None:
            meta["plan_digest"] = self.plan_digest
        return meta


def fedloom_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedloom")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _optional(module: str, name: str) -> Any:
    """``module.name`` if that part of fedloom is installed here, else None (the audit log
    and plan governance are read when present; the export works without them)."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


# ------------------------------------------------------------------------ reading


def _read_state(directory: Path) -> tuple[Mapping[str, Any], Recovery]:
    """The root's checkpoint and a ``Recovery`` of it plus its live log, read without the
    lock (see the module docstring)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such state directory")
    held = _lock_held(directory)
    state = _inspect(directory) if not held else _inspect_live(directory)
    if state is None:
        raise ExportInUseError(
            f"{directory}: the running daemon checkpointed during every read; try again"
        )
    if state.checkpoint is None:
        for bad in state.bad_values:
            if bad.path is not None and bad.path.name == _CHECKPOINT_FILE:
                raise ConfigError(f"{bad}; see `fedloom state check`")
        what = "a site's" if state.values else "not a root's"
        raise ConfigError(
            f"{directory}: no checkpoint: {what} state directory, or a root that never started"
        )
    try:
        _, data, epoch = read_value(state.checkpoint)
    except CorruptStateError as exc:
        raise ConfigError(f"{exc}; see `fedloom state check`") from None
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind not in ROOT_KINDS:
        raise ConfigError(
            f"{directory}: the state of a {kind or 'non-aggregator'} node, not a root's "
            "(export the model from the root's state directory)"
        )
    if state.live is not None and state.live.corruption:
        damage = state.live.corruption[0]
        raise ConfigError(
            f"{damage.path}: damaged frame at offset {damage.offset} ({damage.reason}); "
            "see `fedloom state check`"
        )
    logs: dict[str, list[Any]] = {}
    for frame in state.live.frames if state.live is not None else ():
        for key, record in frame.tree or ():
            logs.setdefault(key, []).append(record)
    return data, Recovery(data, logs, {}, epoch)


def _checkpoint_weights(data: Mapping[str, Any], version: int) -> Weights | None:
    """The weights of ``version`` the checkpoint holds, if any."""
    if data.get("kind") == "fedasync":
        for v, weights in data.get("history") or ():
            if v == version:
                return dict(weights)
        return None
    if data.get("version") == version and isinstance(data.get("weights"), Mapping):
        return dict(data["weights"])
    return None


def _restored(cfg: DaemonConfig, recovery: Recovery) -> tuple[int, Weights]:
    """The model a root built from ``cfg`` holds once restored from ``recovery``."""
    from fedloom.runtime.identity import load_identity, load_roster
    from fedloom.runtime.nodes import build_node, build_plan
    from fedloom.runtime.recovery import restore_node

    roster = load_roster(cfg, load_identity(cfg))
    node: Any = build_node(cfg, roster, build_plan(cfg))
    try:
        restore_node(node, recovery)
    except Exception as exc:  # the config does not fit the state: one line
        raise ConfigError(
            f"{cfg.state_dir}: this config's root cannot restore the state there "
            f"({exc!r:.200}); is it the config of the root that wrote it?"
        ) from None
    version, weights = node.current_model()
    return int(version), dict(weights)


def _audit_models(state_dir: Path) -> list[tuple[str, dict[str, Any]]] | None:
    """The root's audit log's "model_version" and "model_signed" entries, as (kind,
    fields), in order (None: no audit log here)."""
    read_entries = _optional("fedloom.runtime.audit", "read_entries")
    if read_entries is None:
        return None
    try:
        entries = read_entries(state_dir, kinds=list(_AUDIT_KINDS))
    except Exception as exc:  # a broken or missing log: the export goes on without it
        if (state_dir / "audit").exists():
            raise ConfigError(
                f"{state_dir}: its audit log cannot be read ({str(exc)[:200]}); see "
                "`fedloom audit verify`"
            ) from None
        return None
    out = []
    for entry in entries:
        fields = entry.get("fields") if isinstance(entry, Mapping) else None
        if isinstance(fields, Mapping) and type(fields.get("version")) is int:
            out.append((str(entry.get("kind")), dict(fields)))
    return out


def _hex(value: Any) -> bytes:
    """Bytes an audit entry or export metadata holds as hex ("sha256:" optional), or
    base64; b"" when it holds none."""
    if not isinstance(value, str) or not value:
        return b""
    text = value.removeprefix("sha256:")
    try:
        return bytes.fromhex(text)
    except ValueError:
        pass
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return b""


def read_root_model(
    *, config: Path | None = None, state_dir: Path | None = None, version: int | None = None
) -> RootModel:
    """The root's model (``version``: the current one by default) with its provenance.
    ``ConfigError`` (one line) for anything the user can fix; ``ExportInUseError``."""
    cfg = None
    if config is not None:
        cfg = load_config(config)
        if cfg.role != "root":
            raise ConfigError(f"{config}: the config of a {cfg.role}, not a root's")
        if state_dir is not None and state_dir.absolute() != Path(cfg.state_dir).absolute():
            raise ConfigError(f"--state-dir {state_dir} is not the config's state_dir")
        state_dir = Path(cfg.state_dir)
    if state_dir is None:
        raise ConfigError("give the root's --config ROOT.toml (or its --state-dir DIR)")
    data, recovery = _read_state(state_dir)
    kind = str(data["kind"])
    skipped = 0
    if cfg is not None:
        current, weights = _restored(cfg, recovery)
        source = "checkpoint+log"
    else:
        current = int(data["version"])
        found = _checkpoint_weights(data, current)
        if found is None:
            raise ConfigError(f"{state_dir}: its checkpoint holds no model weights")
        weights = found
        source = "checkpoint"
        skipped = sum(len(records) for records in recovery.logs.values())
    checkpoint_version = int(data["version"])
    if version is not None and version != current:
        older = _checkpoint_weights(data, version)
        if version > current:
            raise ConfigError(f"--version {version}: the root is at version {current}")
        if older is None:
            raise ConfigError(
                f"--version {version}: the root's state holds only its current model "
                f"(version {current}) and its last checkpoint's (version "
                f"{checkpoint_version}); older models are not kept"
            )
        weights, current_version = older, current
    else:
        current_version = current
    v = current if version is None else version
    weights = {name: np.asarray(arr) for name, arr in weights.items()}
    digest = tensors_digest(weights)
    node_id = cfg.node_id if cfg is not None else str(data.get("node_id", "root"))
    model = RootModel(
        node_id=node_id,
        algorithm=kind,
        version=v,
        weights=weights,
        digest=digest,
        current_version=current_version,
        source=source,
        skipped_records=skipped,
        lineage=_state_lineage(v, checkpoint_version),
        plan_digest=_plan_digest(cfg),
    )
    return _checked(_with_audit(model, state_dir), cfg)


def root_roster(cfg: DaemonConfig) -> Roster:
    """The roster a root uses: its file's, or a newer one it installed while running
    (kept in its state directory, verified again with the consortium key)."""
    from fedloom.federation.store import _file_name
    from fedloom.runtime.roster_updates import ROSTER_SEEN_KEY
    from fedloom.transport.roster import RosterError, read_small_text

    key = cfg.read_consortium_key()
    try:
        roster = Roster.loads(read_small_text(cfg.roster_path), key)
    except (RosterError, ValueError, OSError) as exc:
        raise ConfigError(f"roster.path: {exc}") from None
    try:
        _, value, _ = read_value(Path(cfg.state_dir) / _file_name(ROSTER_SEEN_KEY))
    except (CorruptStateError, OSError):
        return roster
    kept = value.get("text") if isinstance(value, Mapping) else None
    newer = value.get("version", 0) if isinstance(value, Mapping) else 0
    if isinstance(kept, str) and isinstance(newer, int) and newer > roster.version:
        try:
            return Roster.loads(kept, key)
        except (RosterError, ValueError):
            return roster
    return roster


def _checked(model: RootModel, cfg: DaemonConfig | None) -> RootModel:
    """``model`` with its signature only if it verifies against the root's roster (the
    audit log's ``model_signed`` entry is not evidence by itself); else none, and a
    ``signature_note`` saying why."""
    from fedloom.transport.e2e import SignatureError

    if not model.signature:
        return model
    unsigned = dataclasses.replace(
        model, signer="", signature=b"", signature_parent=0, signature_settings=NO_SETTINGS
    )
    if cfg is None:
        return dataclasses.replace(
            unsigned,
            signature_note="the audit log holds a signature of this version, but with the "
            "state directory alone there is no roster to check it against: export with "
            "--config ROOT.toml to include it",
        )
    try:
        verify_model(
            root_roster(cfg),
            model.signer,
            model.signature,
            model.version,
            model.signature_parent,
            model.digest,
            model.signature_settings,
        )
    except (SignatureError, ValueError) as exc:
        return dataclasses.replace(
            unsigned,
            signature_note="the audit log's model_signed entry of this version does not "
            f"verify against the root's roster ({str(exc)[:200]}): left out",
        )
    return model


def _state_lineage(version: int, checkpoint_version: int) -> list[dict[str, Any]]:
    """What the state alone says: every root version v is one server step from v - 1."""
    out: list[dict[str, Any]] = [{"version": version, "parent": max(version - 1, 0)}]
    if checkpoint_version < version:
        out.append({"version": checkpoint_version, "checkpoint": True})
    return out


def _plan_digest(cfg: DaemonConfig | None) -> str | None:
    if cfg is None:
        return None
    plan_digest = _optional("fedloom.runtime.governance", "plan_digest")
    if plan_digest is None or cfg.plan is None:
        return None
    try:
        return str(plan_digest(cfg))
    except Exception:  # the digest is provenance, not a condition of the export
        return None


def _with_audit(model: RootModel, state_dir: Path) -> RootModel:
    """``model`` with the lineage and the root's signature its audit log records: each
    released version ("model_version": version, digest) and each proof the root made
    ("model_signed": version, parent, signer, digest, settings, sig). The signature is
    taken only from a proof of this version over this model's digest."""
    entries = _audit_models(state_dir)
    if not entries:
        return model
    parents: dict[int, int] = {}
    versions: dict[int, dict[str, Any]] = {}
    for kind, e in entries:
        v = e["version"]
        if v > model.version:
            continue
        if kind == "model_signed" and type(e.get("parent")) is int:
            parents[v] = e["parent"]
        item = versions.setdefault(v, {"version": v})
        if kind == "model_version" and isinstance(e.get("digest"), str):
            item["digest"] = "sha256:" + _hex(e["digest"]).hex()
    for v, item in versions.items():
        if v in parents:
            item["parent"] = parents[v]
    lineage = [versions[v] for v in sorted(versions)][-MAX_LINEAGE:]
    source = "audit" if len(versions) <= MAX_LINEAGE else f"audit (last {MAX_LINEAGE})"
    found = dataclasses.replace(model, lineage=lineage, lineage_source=source)
    for kind, e in reversed(entries):
        if kind != "model_signed" or e["version"] != model.version:
            continue
        if _hex(e.get("digest")) != model.digest:
            continue  # a proof over other tensors (a lossy down codec): not this file's
        sig = _hex(e.get("sig"))
        settings = _hex(e.get("settings")) or NO_SETTINGS
        if sig and isinstance(e.get("signer"), str) and type(e.get("parent")) is int:
            return dataclasses.replace(
                found,
                signer=e["signer"],
                signature=sig,
                signature_parent=e["parent"],
                signature_settings=settings,
            )
    return found


# ------------------------------------------------------------------------ writing


def write_export(model: RootModel, out: Path, fmt: str) -> dict[str, str]:
    """Write ``model`` to ``out`` as ``fmt`` (one of ``FORMATS``); the metadata written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; name the file to write")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: no such directory {out.parent}")
    meta = model.metadata()
    arrays = {k: np.ascontiguousarray(v) for k, v in model.weights.items()}
    tmp = out.with_name(out.name + ".tmp")
    try:
        if fmt == "safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, str(tmp), metadata=meta)
        else:
            torch = _torch()
            tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
            torch.save({"state_dict": tensors, "metadata": meta}, str(tmp))
        tmp.replace(out)  # a reader never sees half a file
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def _torch() -> Any:
    try:
        import torch
    except ModuleNotFoundError:
        raise ConfigError(
            "--format torch needs torch, which the 'torch' extra installs: "
            "pip install 'fedloom[torch]' (or write --format safetensors)"
        ) from None
    return torch


def read_export(path: Path) -> tuple[Weights, dict[str, str]]:
    """The tensors (in the order the digest covers) and metadata of an exported file;
    never unpickles arbitrary objects (torch files load with ``weights_only``)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):  # torch.save's zip container
        torch = _torch()
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(f"{path}: not a fedloom torch export ({str(exc)[:200]})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
            raise ConfigError(f"{path}: not a fedloom export (no state_dict)")
        meta = obj.get("metadata")
        tensors = {}
        for k, v in obj["state_dict"].items():
            try:  # a non-tensor or a dtype numpy lacks (bfloat16): not one of our exports
                tensors[str(k)] = v.numpy()
            except (AttributeError, TypeError) as exc:
                raise ConfigError(
                    f"{path}: tensor {str(k)!r} is not a numpy-convertible tensor "
                    f"({str(exc)[:200]}); not a fedloom export"
                ) from None
    else:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
            meta = _safetensors_metadata(path)
        except (SafetensorError, ValueError, OSError) as exc:
            raise ConfigError(f"{path}: not a safetensors file ({str(exc)[:200]})") from None
        except TypeError as exc:  # bfloat16 and others numpy has no dtype for
            raise ConfigError(
                f"{path}: a tensor of a dtype numpy cannot load ({str(exc)[:200]}); "
                "not a fedloom export"
            ) from None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise ConfigError(f"{path}: no fedloom export metadata (format {METADATA_FORMAT})")
    try:
        order = json.loads(meta["tensor_order"])
    except (KeyError, ValueError, TypeError):  # TypeError: a torch file's list, not JSON text
        raise ConfigError(f"{path}: metadata without a valid tensor_order") from None
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(tensors):
        raise ConfigError(f"{path}: tensor_order does not name the file's tensors")
    return {str(name): tensors[str(name)] for name in order}, {
        str(k): str(v) for k, v in meta.items()
    }


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    return dict(meta) if meta is not None else None


@dataclass(frozen=True, slots=True)
class Verified:
    """What ``verify_export`` found."""

    version: int
    digest_ok: bool
    signature: str  # "valid", "absent", "unchecked" (no roster given) or "INVALID: why"
    metadata: dict[str, str]

    @property
    def ok(self) -> bool:
        """The digest matches and the signature, if the file carries one, was checked
        and is valid (an unchecked signature is not ok: anyone can write one)."""
        return self.digest_ok and self.signature in ("valid", "absent")


def verify_export(path: Path, roster: Roster | None = None) -> Verified:
    """Recompute the digest of ``path``'s tensors and check the root's signature (against
    ``roster``) when the file carries one."""
    from fedloom.transport.e2e import SignatureError

    tensors, meta = read_export(path)
    digest = tensors_digest(tensors)
    try:
        version = int(meta["model_version"])
    except (KeyError, ValueError):
        raise ConfigError(f"{path}: metadata without a model_version") from None
    digest_ok = meta.get("digest") == "sha256:" + digest.hex()
    sig = _hex(meta.get("signature"))
    claimed = any(key in meta for key in ("signer", "signature", "signature_parent"))
    if not sig and not claimed:
        status = "absent"
    elif not sig:  # a claim of a signature with none readable: not "absent", which is ok
        status = "INVALID: the file names a signature but holds none readable (hex)"
    elif roster is None:
        status = "unchecked"
    else:
        try:
            parent = int(meta.get("signature_parent", ""))
            settings = _hex(meta.get("signature_settings")) or NO_SETTINGS
            verify_model(roster, meta.get("signer", ""), sig, version, parent, digest, settings)
            status = "valid"
        except (SignatureError, ValueError) as exc:
            status = f"INVALID: {str(exc)[:200]}"
    return Verified(version, digest_ok, status, meta)
