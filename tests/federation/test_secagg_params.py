"""``[secure_aggregation]``: strict reading, the threshold/dropout and capacity checks, the
codec refusal, and the table in a daemon config and a scenario file."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.params import CodecConfig
from fedloom.federation.secagg_params import (
    SecureAggregationConfig,
    check_codec,
    check_cohort,
    read_secure_aggregation,
    threshold,
)


def read(data: dict[str, Any]) -> SecureAggregationConfig:
    return read_secure_aggregation(Table(data, "secure_aggregation"))


def test_defaults_match_the_documented_table() -> None:
    cfg = read({})
    assert cfg == SecureAggregationConfig()
    assert (cfg.enabled, cfg.min_cohort, cfg.cohort_size, cfg.clip) == (False, 5, 0, 1.0)
    assert (cfg.precision_bits, cfg.max_dropout) == (16, 0.3)
    assert (cfg.form_wait_s, cfg.upload_timeout_s, cfg.unmask_timeout_s) == (30.0, 300.0, 60.0)
    assert cfg.cohort(10) == 10 and read({"cohort_size": 7}).cohort(10) == 7


def test_unknown_field_is_named() -> None:
    with pytest.raises(ConfigError, match=r"secure_aggregation\.min_cohrt: unknown field"):
        read({"enabled": True, "min_cohrt": 3})


def test_threshold_that_dropouts_would_break_names_the_field() -> None:
    # N = 5: t = max(5, 3) = 5 > 5 * 0.7
    with pytest.raises(ConfigError, match=r"secure_aggregation\.max_dropout"):
        read({"enabled": True, "cohort_size": 5})
    with pytest.raises(ConfigError, match=r"secure_aggregation\.min_cohort"):
        read({"enabled": True, "cohort_size": 4, "min_cohort": 5, "max_dropout": 0.0})
    cfg = read({"enabled": True, "cohort_size": 10})
    assert cfg.threshold(10) == 6


def test_capacity_names_precision_and_clip() -> None:
    with pytest.raises(ConfigError, match=r"precision_bits / secure_aggregation\.clip"):
        read({"enabled": True, "cohort_size": 10, "precision_bits": 30, "clip": 4.0})


def test_codec_other_than_fp32_is_refused_with_the_reason() -> None:
    check_codec(CodecConfig("fp32", "int8", 0.01))  # down codec is unaffected
    for up in ("fp16", "int8", "topk"):
        with pytest.raises(ConfigError, match=f"codec.up = '{up}' cannot compose with masking"):
            check_codec(CodecConfig(up, "fp32", 0.01))


@given(
    st.integers(min_value=2, max_value=64),
    st.integers(min_value=1, max_value=200),
    st.floats(min_value=0.0, max_value=0.49),
    st.integers(min_value=0, max_value=8),
)
def test_check_cohort_accepts_exactly_the_workable_cohorts(
    min_cohort: int, members: int, dropout: float, colluders: int
) -> None:
    cfg = SecureAggregationConfig(
        enabled=True,
        min_cohort=min_cohort,
        max_dropout=dropout,
        clip=1.0,
        precision_bits=8,
        max_colluders=colluders,
        max_cohort=128,
    )
    t = threshold(min_cohort, members, colluders)
    workable = members <= 128 and t <= members and t <= members * (1 - dropout) + 1e-9
    if workable:
        check_cohort(cfg, members)
        # Two views signed by t members each share c + 1 signers: one is honest.
        assert 2 * t - members >= colluders + 1
    else:
        with pytest.raises(ConfigError):
            check_cohort(cfg, members)


def test_colluders_raise_the_threshold_and_name_the_fields() -> None:
    # N = 9, min_cohort 5: a bare majority (c = 0) is t = 5, so two views share 2t - N = 1
    # signer (one colluder splits them); c = 1 gives t = 6: 3 shared signers, >= c + 1.
    assert read({"enabled": True, "cohort_size": 9, "max_colluders": 0}).threshold(9) == 5
    assert read({"enabled": True, "cohort_size": 9, "max_dropout": 0.2}).threshold(9) == 6
    assert read({"enabled": True, "cohort_size": 21, "max_colluders": 3}).threshold(21) == 13
    # N = 11, max_dropout 0.45: c = 0 needs t = 6 <= 6.05 survivors, c = 1 needs t = 7.
    assert read({"enabled": True, "cohort_size": 11, "max_dropout": 0.45, "max_colluders": 0})
    with pytest.raises(ConfigError, match=r"max_dropout / .*max_colluders / .*min_cohort"):
        read({"enabled": True, "cohort_size": 11, "max_dropout": 0.45})
    with pytest.raises(ConfigError, match=r"secure_aggregation\.max_colluders"):
        read({"enabled": True, "cohort_size": 6, "max_colluders": 6, "max_dropout": 0.0})
    with pytest.raises(ConfigError, match=r"secure_aggregation\.max_cohort"):
        read({"enabled": True, "cohort_size": 65})
    assert read({"enabled": True, "cohort_size": 65, "max_cohort": 65}).max_cohort == 65


def test_disabled_is_never_checked() -> None:
    check_cohort(SecureAggregationConfig(enabled=False, min_cohort=50), 3)


# ---------------------------------------------------------------- in a daemon config


def test_daemon_config_reads_the_table_and_refuses_a_lossy_uplink() -> None:
    from tests.runtime.test_config import parse, root_raw, site_raw

    secure = {"enabled": True, "min_cohort": 3}
    site = parse({**site_raw(), "codec": {"up": "fp32"}, "secure_aggregation": secure})
    assert site.secure_aggregation.enabled and site.secure_aggregation.min_cohort == 3
    assert parse(root_raw()).secure_aggregation == SecureAggregationConfig()
    lossy = {**site_raw(), "codec": {"up": "int8"}, "secure_aggregation": {"enabled": True}}
    with pytest.raises(ConfigError, match="cannot compose with masking"):
        parse(lossy)
    typo = {**root_raw(), "secure_aggregation": {"enabeld": True}}
    with pytest.raises(ConfigError, match=r"secure_aggregation\.enabeld: unknown field"):
        parse(typo)
