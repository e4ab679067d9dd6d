"""Daemon config files: the shipped examples parse, every mistake names its field and fix."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.config import DaemonConfig, Endpoint, load_config, parse_config
from fedloom.transport import records
from fedloom.transport.identity import Identity, key_text
from fedloom.transport.records import CIPHER_AEGIS256, CIPHER_SECRETSTREAM

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
CONSORTIUM = key_text(Identity.generate("consortium", "consortium").public_key)


def site_raw() -> dict[str, Any]:
    return {
        "role": "site",
        "node_id": "hospital-a",
        "state_dir": "state",
        "seed": 3,
        "identity": {"key": "keys/hospital-a.key"},
        "roster": {"path": "roster.toml", "consortium_key": CONSORTIUM},
        "parent": {"id": "region-eu", "url": "ws://region-eu.example.org:7443/fedloom"},
        "plan": {"dataset": "breast_cancer", "n_sites": 6, "site_index": 2, "seed": 1},
        "training": {"lr": 0.1},
        "codec": {"up": "fp16"},
        "connection": {"keepalive_s": 5.0, "down_after_s": 20.0},
    }


def root_raw() -> dict[str, Any]:
    raw = site_raw()
    del raw["parent"]
    raw.update(role="root", node_id="root", children=["region-eu", "region-us"])
    raw["listen"] = {"port": 7443}
    raw["plan"] = {"dataset": "breast_cancer", "n_sites": 6}
    raw["aggregation"] = {"algorithm": "fedasync", "alpha": 0.7, "concurrency": 4}
    return raw


def parse(raw: dict[str, Any]) -> DaemonConfig:
    return parse_config(raw, base_dir=Path("/etc/fedloom"))


@pytest.mark.parametrize("name", ["site", "region", "aggregator", "peer", "relay"])
def test_the_shipped_examples_parse(name: str) -> None:
    cfg = load_config(EXAMPLES / f"{name}.toml", check_files=False)
    assert cfg.node_id and cfg.role in ("site", "region", "root", "peer", "relay")
    assert cfg.source == EXAMPLES / f"{name}.toml"


def test_a_site_config_is_read_into_typed_fields() -> None:
    cfg = parse(site_raw())
    assert cfg.role == "site" and cfg.node_id == "hospital-a" and cfg.seed == 3
    assert cfg.state_dir == Path("/etc/fedloom/state")  # relative to the config file
    assert cfg.identity_key == Path("/etc/fedloom/keys/hospital-a.key")
    assert cfg.consortium_key is not None and len(cfg.consortium_key) == 32
    assert cfg.parent == Endpoint("region-eu", "ws://region-eu.example.org:7443/fedloom")
    assert cfg.listen is None and cfg.children == ()
    assert cfg.plan is not None and cfg.plan.site_index == 2
    assert cfg.plan.workload == {"dataset": "breast_cancer", "n_sites": 6, "seed": 1}
    assert cfg.training.lr == 0.1 and cfg.training.local_steps == 5  # defaults filled in
    assert cfg.codec.up == "fp16" and cfg.codec.down == "fp32"
    assert cfg.connection.keepalive_s == 5.0 and cfg.connection.down_after_s == 20.0
    assert cfg.connection.ciphers is None  # every cipher, the fastest here first
    assert cfg.metrics_port == 0 and cfg.executor.kind == "thread"


def test_record_ciphers_can_be_pinned() -> None:
    raw = _set(site_raw(), "connection.ciphers", ["xchacha20poly1305-secretstream"])
    assert parse(raw).connection.ciphers == ("xchacha20poly1305-secretstream",)
    assert parse(_set(raw, "connection.offload", "pool")).connection.offload == "pool"


class _WithoutAegis:
    """libsodium as a PyNaCl whose bundled libsodium predates AEGIS-256 binds it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "crypto_aead_aegis256_encrypt":
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_pinning_only_a_cipher_this_libsodium_lacks_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Such a daemon stopped at start with a ValueError traceback and exit 1 (which systemd
    # restarts for ever); a config mistake is a ConfigError: exit 2, one line.
    monkeypatch.setattr(records, "lib", _WithoutAegis(records.lib))
    records.aegis_available.cache_clear()
    try:
        assert not records.aegis_available()
        with pytest.raises(ConfigError) as info:
            parse(_set(site_raw(), "connection.ciphers", [CIPHER_AEGIS256]))
        assert str(info.value).startswith("connection.ciphers: none of them can be used here")
        assert "crypto_aead_aegis256_encrypt" in str(info.value)
        # One usable cipher in the list is enough: the handshake offers that one.
        both = [CIPHER_AEGIS256, CIPHER_SECRETSTREAM]
        assert parse(_set(site_raw(), "connection.ciphers", both)).connection.ciphers == tuple(both)
    finally:
        records.aegis_available.cache_clear()


def test_admission_before_authentication_is_configurable() -> None:
    d = parse(root_raw()).connection
    assert (d.handshake_timeout_s, d.max_pending, d.max_pending_per_address) == (5.0, 256, None)
    raw = _set(root_raw(), "connection.handshake_timeout_s", 2.5)
    raw = _set(_set(raw, "connection.max_pending", 64), "connection.max_pending_per_address", 4)
    conn = parse(raw).connection
    assert (conn.handshake_timeout_s, conn.max_pending, conn.max_pending_per_address) == (
        2.5,
        64,
        4,
    )


def test_a_root_config_reads_aggregation_parameters() -> None:
    cfg = parse(root_raw())
    assert cfg.is_aggregator and cfg.listen == ("0.0.0.0", 7443)
    assert cfg.children == ("region-eu", "region-us")
    assert cfg.algorithm == "fedasync"
    assert cfg.aggregation.alpha == 0.7 and cfg.aggregation.concurrency == 4
    assert cfg.aggregation.buffer_size == 10  # sim.scenario.AlgorithmConfig default


def test_a_gossip_peer_config() -> None:
    raw = site_raw()
    del raw["parent"]
    raw.update(role="peer", listen={"host": "127.0.0.1", "port": 0})
    raw["peers"] = [{"id": "hospital-b", "url": "ws://b:1/fedloom", "weight": 0.3}, {"id": "c"}]
    cfg = parse(raw)
    assert cfg.peers == (Endpoint("hospital-b", "ws://b:1/fedloom", 0.3), Endpoint("c"))


def test_a_factory_plan_keeps_its_arguments() -> None:
    raw = site_raw()
    raw["plan"] = {"factory": "hospital.train:make_client", "args": {"data_dir": "/srv/x"}}
    cfg = parse(raw)
    assert cfg.plan is not None
    assert cfg.plan.factory == "hospital.train:make_client"
    assert cfg.plan.args == {"data_dir": "/srv/x"}


def _set(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    *parents, key = dotted.split(".")
    table = out
    for p in parents:
        table = table.setdefault(p, {})
    if value is _DELETE:
        table.pop(key, None)
    else:
        table[key] = value
    return out


_DELETE = object()

SITE_MISTAKES: list[tuple[str, Any, str]] = [
    ("role", "hospital", "'hospital' is not one of site, region, root, peer"),
    ("role", _DELETE, "role: required field is missing"),
    ("node_id", "bad id!", "node_id: invalid node id"),
    ("seeed", 1, "seeed: unknown field (did you mean 'seed'?)"),
    ("identity", _DELETE, "fedloom keygen --id hospital-a --role site"),
    ("roster.consortium_key", "not base64!", "roster.consortium_key: not valid base64"),
    ("roster.consortium_key_file", "c.pub", "either as consortium_key"),
    ("parent", _DELETE, "parent: required for a site"),
    ("parent.url", "http://x:1/", "parent.url: expected a WebSocket URL"),
    ("parent.url", "ws://x:99999/f", "parent.url: bad port"),
    ("listen", {"port": 7443}, "sites only dial out"),
    ("children", ["a"], "only aggregators have children"),
    ("plan", _DELETE, "plan: a site needs a training plan"),
    ("plan.dataset", "mnist", "plan.dataset: 'mnist' is not one of"),
    ("plan.site_index", 6, "plan.site_index: 6 is out of range for n_sites = 6 (use 0 .. 5)"),
    ("plan.site_index", _DELETE, "plan.site_index: required for a site"),
    ("plan.dirichlet_alpha", -1.0, "plan.dirichlet_alpha: expected a number > 0.0"),
    ("plan.alpha", 1.0, "plan.alpha: only valid for dataset 'synthetic'"),
    ("plan.factory", "nocolon", 'plan.factory: expected "module:callable"'),
    ("training.lr", 0, "training.lr: expected a number > 0.0"),
    ("codec.up", "fp8", "codec.up: 'fp8' is not one of"),
    ("connection.down_after_s", 5.0, "connection.down_after_s: must exceed keepalive_s"),
    ("connection.backoff_cap_s", 0.1, "connection.backoff_cap_s: must be >= backoff_base_s"),
    ("connection.ciphers", "aegis256-stream", "connection.ciphers: expected a list"),
    ("connection.ciphers", [], "connection.ciphers: name at least one of"),
    ("connection.ciphers", ["aegis256"], "ciphers[0]: 'aegis256' is not one of"),
    ("connection.ciphers", ["aegis256"], "(did you mean 'aegis256-stream'?)"),
    ("connection.ciphers", ["aegis256-stream"] * 2, "connection.ciphers: a cipher is named twice"),
    ("connection.offload", "gpu", "connection.offload: 'gpu' is not one of auto, pool"),
    ("connection.handshake_timeout_s", 0, "connection.handshake_timeout_s: expected a number > 0"),
    ("connection.max_pending", 0, "connection.max_pending: expected a number >= 1"),
    ("connection.max_pending_per_address", 300, "must be <= max_pending (256)"),
    ("aggregation.buffer_sise", 3, "aggregation.buffer_sise: unknown field (did you mean"),
    ("aggregation.algorithm", "fedsgd", "aggregation.algorithm: 'fedsgd' is not one of"),
    ("metrics.port", 70000, "metrics.port: expected a number <= 65535"),
    ("executor.kind", "gpu", "executor.kind: 'gpu' is not one of thread, process"),
]


@pytest.mark.parametrize(("field", "value", "message"), SITE_MISTAKES)
def test_site_mistakes_name_the_field_and_the_fix(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(_set(site_raw(), field, value))
    assert message in str(info.value)


ROOT_MISTAKES: list[tuple[str, Any, str]] = [
    ("listen", _DELETE, "listen: required for a root: add [listen] with port = N"),
    ("children", _DELETE, "children: required for a root"),
    ("children", ["root"], "children: a node cannot be its own child"),
    ("children", ["a", "a"], "children: 'a' is listed twice"),
    ("parent", {"id": "x", "url": "ws://x:1/f"}, "parent: a root has no parent"),
    ("plan", _DELETE, "plan: a root needs a training plan to build the initial model"),
    ("listen.port", -1, "listen.port: expected a number >= 0"),
    ("aggregation.alpha", 2.0, "aggregation.alpha: expected a number <= 1.0"),
    # the daemon would fail to bind its second port at every restart (exit 1 each time)
    ("metrics.port", 7443, "metrics.port: 7443 is listen.port too"),
]


@pytest.mark.parametrize(("field", "value", "message"), ROOT_MISTAKES)
def test_root_mistakes_name_the_field_and_the_fix(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(_set(root_raw(), field, value))
    assert message in str(info.value)


def test_peer_mistakes() -> None:
    raw = site_raw()
    del raw["parent"]
    raw["role"] = "peer"
    with pytest.raises(ConfigError, match="at least one"):
        parse(raw)
    raw["peers"] = [{"id": "b"}]
    with pytest.raises(ConfigError, match=r"neither side can connect; add \[listen\]"):
        parse(raw)
    raw["peers"] = [{"id": "b"}, {"id": "c", "url": "ws://c:1/f"}]  # b alone is unreachable
    with pytest.raises(ConfigError, match=r"\['b'\] have no url.*\[relay\]"):
        parse(raw)
    raw["relay"] = {"id": "b", "url": "ws://r:1/f"}
    with pytest.raises(ConfigError, match=r"relay\.id: 'b' is also listed"):
        parse(raw)
    raw["relay"] = {"id": "relay-1", "url": "ws://r:1/f"}
    cfg = parse(raw)
    assert cfg.relay is not None and cfg.relay.id == "relay-1"
    raw["peers"] = [{"id": "c", "url": "ws://c:1/f"}]
    with pytest.raises(ConfigError, match="every peer is reached directly"):
        parse(raw)
    del raw["relay"]
    raw["peers"] = [{"id": "b", "url": "ws://b:1/f"}, {"id": "b"}]
    with pytest.raises(ConfigError, match="'b' is listed twice"):
        parse(raw)
    raw["peers"] = [{"id": "hospital-a", "url": "ws://b:1/f"}]
    with pytest.raises(ConfigError, match="its own peer"):
        parse(raw)


def test_relay_mistakes() -> None:
    raw = site_raw()
    for key in ("parent", "plan"):
        del raw[key]
    raw["role"] = "relay"
    with pytest.raises(ConfigError, match="listen: required for a relay"):
        parse(raw)
    raw["listen"] = {"port": 7443}
    assert parse(raw).role == "relay"
    raw["plan"] = {"dataset": "digits", "n_sites": 2, "site_index": 0}
    with pytest.raises(ConfigError, match="a relay neither trains"):
        parse(raw)
    site = site_raw()
    site["relay"] = {"id": "relay-1", "url": "ws://r:1/f"}
    with pytest.raises(ConfigError, match="only gossip peers use a relay"):
        parse(site)


def site_lines(key: str, dataset: str) -> list[str]:
    """A site config's lines, as written in a file, with its key file and data set."""
    return [
        'role = "site"',
        'node_id = "hospital-a"',
        'state_dir = "state"',
        "[identity]",
        f'key = "{key}"',
        "[roster]",
        'path = "roster.toml"',
        f'consortium_key = "{CONSORTIUM}"',
        "[parent]",
        'id = "agg"',
        'url = "ws://127.0.0.1:7443/fedloom"',
        "[plan]",
        f'dataset = "{dataset}"',
        "n_sites = 2",
        "site_index = 1",
    ]


def test_a_state_dir_at_the_file_systems_root_is_refused() -> None:
    """``state_dir = "/"`` was accepted: the daemon wrote its lock, checkpoints and audit
    log into the root directory."""
    for root in ("/", "/..", "//"):
        raw = site_raw()
        raw["state_dir"] = root
        with pytest.raises(ConfigError, match=r"state_dir: .* is the file system's root"):
            parse(raw)


def test_files_are_checked_with_a_hint(tmp_path: Path) -> None:
    raw = site_raw()
    text = "\n".join(site_lines("hospital-a.key", "breast_cancer"))
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="fedloom keygen --id hospital-a"):
        load_config(path)
    Identity.generate("hospital-a", "site").save(tmp_path)
    with pytest.raises(ConfigError, match=r"roster\.path: .* not found"):
        load_config(path)
    (tmp_path / "roster.toml").write_text("version = 1\n")
    cfg = load_config(path)
    assert cfg.identity_key == tmp_path / "hospital-a.key"
    assert cfg.consortium_key is not None
    assert raw["node_id"] == cfg.node_id


def test_a_directory_named_as_a_file_is_said_to_be_one(tmp_path: Path) -> None:
    """keygen's --out DIR given as identity.key (or a directory as roster.path) exists:
    "not found" sent the operator looking for a file that is there."""
    Identity.generate("hospital-a", "site").save(tmp_path / "keys")
    (tmp_path / "roster.toml").write_text("version = 1\n")
    lines = site_lines("keys", "synthetic")
    path = tmp_path / "site.toml"
    path.write_text("\n".join(lines))
    with pytest.raises(ConfigError, match=r"identity\.key: .*/keys is a directory") as err:
        load_config(path)
    assert "not found" not in str(err.value) and "keys/hospital-a.key" in str(err.value)
    path.write_text(
        "\n".join(lines)
        .replace('"keys"', '"keys/hospital-a.key"')
        .replace('path = "roster.toml"', 'path = "keys"')
    )
    with pytest.raises(ConfigError, match=r"roster\.path: .*/keys is a directory") as err:
        load_config(path)
    assert "not found" not in str(err.value)


def test_consortium_key_from_a_public_key_file(tmp_path: Path) -> None:
    consortium = Identity.generate("consortium", "consortium")
    _, public = consortium.save(tmp_path)
    raw = _set(site_raw(), "roster.consortium_key", _DELETE)
    raw["roster"]["consortium_key_file"] = str(public)
    cfg = parse(raw)
    assert cfg.consortium_key is None and cfg.consortium_key_file == public
    assert cfg.read_consortium_key() == consortium.public_key
    raw["roster"]["consortium_key_file"] = str(tmp_path / "missing.pub")
    with pytest.raises(ConfigError, match="cannot read"):
        parse(raw).read_consortium_key()


def test_a_roster_or_key_file_given_as_the_config_is_named_as_such(tmp_path: Path) -> None:
    """roster.toml sits next to site.toml: given to --config, "role: required field is
    missing" did not say that the wrong file was given."""
    roster = tmp_path / "roster.toml"
    roster.write_text('version = 1\n[[nodes]]\nid = "a"\nrole = "site"\npublic_key = "x"\n')
    with pytest.raises(ConfigError, match=r"roster\.toml: a roster, not a daemon config"):
        load_config(roster)
    Identity.generate("hospital-a", "site").save(tmp_path)
    with pytest.raises(ConfigError, match=r"hospital-a\.key: a node identity, not a daemon"):
        load_config(tmp_path / "hospital-a.key")


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("role = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


_KNOWN_TOP = set(site_raw()) | {
    "listen",
    "children",
    "peers",
    "aggregation",
    "executor",
    "metrics",
}


@settings(max_examples=60, deadline=None)
@given(key=st.from_regex(r"[a-z_]{1,12}", fullmatch=True), value=st.integers())
def test_any_unknown_top_level_field_is_refused_by_name(key: str, value: int) -> None:
    if key in _KNOWN_TOP:
        return
    raw = site_raw()
    raw[key] = value
    with pytest.raises(ConfigError) as info:
        parse(raw)
    assert str(info.value).startswith(f"{key}: unknown field")


@settings(max_examples=60, deadline=None)
@given(
    keepalive=st.floats(0.01, 100.0),
    factor=st.floats(1.01, 20.0),
    base=st.floats(0.01, 5.0),
    cap_factor=st.floats(1.0, 100.0),
)
def test_valid_connection_settings_round_trip(
    keepalive: float, factor: float, base: float, cap_factor: float
) -> None:
    raw = site_raw()
    raw["connection"] = {
        "keepalive_s": keepalive,
        "down_after_s": keepalive * factor,
        "backoff_base_s": base,
        "backoff_cap_s": base * cap_factor,
    }
    c = parse(raw).connection
    assert (c.keepalive_s, c.down_after_s) == (keepalive, keepalive * factor)
    assert (c.backoff_base_s, c.backoff_cap_s) == (base, base * cap_factor)


def test_examples_are_valid_toml_with_known_roles() -> None:
    roles = {tomllib.loads(p.read_text())["role"] for p in EXAMPLES.glob("*.toml")}
    assert roles <= {"site", "region", "root", "peer", "relay"}


def test_min_cohort_is_checked_against_the_round_only_for_a_root_with_rounds() -> None:
    """A FedBuff root has no rounds: min_cohort above the default round size does nothing
    there and is not refused; a FedAvg root with it could never close a round."""
    fedbuff = parse(_set(root_raw(), "aggregation", {"algorithm": "fedbuff", "min_cohort": 12}))
    assert fedbuff.algorithm == "fedbuff" and fedbuff.aggregation.min_cohort == 12
    with pytest.raises(ConfigError, match="min_cohort"):
        parse(_set(root_raw(), "aggregation", {"algorithm": "fedavg", "min_cohort": 12}))


@pytest.mark.parametrize(
    ("section", "table", "match"),
    [
        (
            "privacy",
            {"noise_multiplier": 1.1, "clip": 0.5},
            r'privacy\.noise_multiplier: .*mechanism = "central"',
        ),
        ("privacy", {"delta": 1e-6}, r'privacy\.delta: .*mechanism = "central"'),
        (
            "secure_aggregation",
            {"min_cohort": 3, "clip": 0.5},
            r"secure_aggregation\.min_cohort: .*enabled = true",
        ),
    ],
)
def test_privacy_tables_without_their_switch_are_refused(
    section: str, table: dict[str, Any], match: str
) -> None:
    # mechanism defaults to "none" and enabled to false: a table that sets a noise
    # multiplier or a cohort but forgot its switch was silently ignored, so a site its
    # operator believed private sent plain updates and accepted any seal's noise.
    with pytest.raises(ConfigError, match=match):
        parse({**site_raw(), "codec": {"up": "fp32"}, section: table})
    # Written out, the switch may turn it off.
    off = {"privacy": {"mechanism": "none"}, "secure_aggregation": {"enabled": False}}
    assert parse({**site_raw(), "codec": {"up": "fp32"}, section: {**table, **off[section]}})


@pytest.mark.parametrize("table", [{"require_approval": True}, {"statistics_min_noise": 2.0}])
def test_governance_outside_a_site_is_refused(table: dict[str, Any]) -> None:
    # A root's or region's [governance] was read and never used: an operator who put
    # require_approval or a noise floor there believed it enforced for the sites below.
    with pytest.raises(ConfigError, match=r"governance: .*root.*each site's config"):
        parse({**root_raw(), "governance": table})
    assert parse({**site_raw(), "governance": table}).governance is not None
