"""MethodConfig: presets, validation, plain-dict round trip."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from incseg.learner import METHODS, MethodConfig


@pytest.mark.parametrize(
    ("name", "ce", "kd", "ad", "caf", "init"),
    [
        ("ft", "plain", None, None, False, "random"),
        ("joint", "plain", None, None, False, "random"),
        ("lwf", "plain", "plain", None, False, "random"),
        ("mib", "unbiased", "unbiased", None, False, "mib"),
        ("caf", "unbiased", "unbiased", "both", True, "mib"),  # MiB's KD since 2026-12-03 (docs/protocol.md)
        ("caf-paper", "unbiased", "balanced", "both", True, "mib"),
    ],
)
def test_presets(name: str, ce: str, kd: str | None, ad: str | None, caf: bool, init: str) -> None:
    cfg = MethodConfig.preset(name)
    assert (cfg.name, cfg.ce, cfg.kd, cfg.ad, cfg.caf, cfg.init) == (name, ce, kd, ad, caf, init)
    assert (cfg.lambda_d, cfg.lambda_ad, cfg.class_reduction, cfg.test_strategy) == (10.0, 1000.0, "mean", "skip")
    assert not cfg.void_as_background


def test_joint_equals_ft_but_name() -> None:
    assert METHODS["joint"].replace(name="ft") == METHODS["ft"]


def test_every_preset_is_named_by_its_key() -> None:
    assert all(cfg.name == key for key, cfg in METHODS.items())
    assert MethodConfig() == METHODS["caf"].replace(name="custom")


def test_uses_teacher() -> None:
    assert not METHODS["ft"].uses_teacher
    assert METHODS["lwf"].uses_teacher and METHODS["baseline+caf"].uses_teacher


def test_preset_overrides() -> None:
    cfg = MethodConfig.preset("caf", lambda_ad=100, test_strategy="zero_pad")
    assert cfg.lambda_ad == 100.0 and isinstance(cfg.lambda_ad, float)
    assert cfg.test_strategy == "zero_pad" and cfg.kd == "unbiased"
    assert METHODS["caf"].lambda_ad == 1000.0  # the registry is untouched


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'icarl'.*ft.*lwf.*mib.*caf"):
        MethodConfig.preset("icarl")


def test_unknown_field_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method configuration fields \['lambda'\].*lambda_d"):
        MethodConfig.preset("caf", **{"lambda": 1.0})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("ce", "focal", r"ce must be one of \['plain', 'unbiased'\]"),
        ("kd", "balance", r"kd must be one of \[None, 'plain', 'unbiased', 'balanced'\]"),
        ("ad", "spatial+channel", r"ad must be one of"),
        ("init", "zeros", r"init must be one of \['mib', 'random', 'aux', 'prior'\]"),
        ("class_reduction", "max", r"class_reduction must be one of"),
        ("test_strategy", "pad", r"test_strategy must be one of \['skip', 'zero_pad', 'concat'\]"),
        ("lambda_d", -1.0, r"lambda_d must be a finite number >= 0"),
        ("lambda_ad", float("nan"), r"lambda_ad must be a finite number >= 0"),
        ("ad_maps", (), r"ad_maps must name some of \['z', 'h'\]"),
        ("ad_maps", "z+y", r"ad_maps must name each of"),
    ],
)
def test_invalid_values(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MethodConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"), [("caf", 1), ("void_as_background", "yes"), ("lambda_d", True), ("name", "")]
)
def test_invalid_types(field: str, value: object) -> None:
    with pytest.raises(TypeError, match=field):
        MethodConfig(**{field: value})  # type: ignore[arg-type]


def test_frozen_and_registry_read_only() -> None:
    cfg = METHODS["caf"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.caf = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        METHODS["mine"] = cfg  # type: ignore[index]


def test_from_dict_rejects_unknown_and_missing() -> None:
    data = METHODS["mib"].to_dict()
    with pytest.raises(ValueError, match="unknown method configuration fields"):
        MethodConfig.from_dict({**data, "extra": 1})
    del data["kd"]
    with pytest.raises(ValueError, match=r"missing fields \['kd'\]"):
        MethodConfig.from_dict(data)
    with pytest.raises(TypeError, match="mapping"):
        MethodConfig.from_dict([("ce", "plain")])  # type: ignore[arg-type]


configs = st.builds(
    MethodConfig,
    name=st.sampled_from(["a", "caf-variant"]),
    ce=st.sampled_from(["plain", "unbiased"]),
    kd=st.sampled_from([None, "plain", "unbiased", "balanced"]),
    ad=st.sampled_from([None, "plain", "spatial", "channel", "both"]),
    caf=st.booleans(),
    init=st.sampled_from(["mib", "random"]),
    lambda_d=st.floats(0, 1e4),
    lambda_ad=st.floats(0, 1e4),
    class_reduction=st.sampled_from(["mean", "sum"]),
    test_strategy=st.sampled_from(["skip", "zero_pad", "concat"]),
    void_as_background=st.booleans(),
    ad_maps=st.sampled_from(["z", "h", "z+h", ("h", "z"), ["z"]]),
)


@given(configs)
def test_dict_round_trip_is_plain(cfg: MethodConfig) -> None:
    data = cfg.to_dict()
    assert data.pop("components") == list(cfg.components)
    assert all(isinstance(v, (str, bool, int, float, type(None))) for v in data.values())
    data["components"] = list(cfg.components)
    assert MethodConfig.from_dict(data) == cfg


def test_ad_maps_is_a_tuple_and_a_string_in_to_dict() -> None:
    cfg = MethodConfig.preset("caf", ad_maps="h+z")
    assert cfg.ad_maps == ("z", "h") and cfg.to_dict()["ad_maps"] == "z+h"
    assert MethodConfig.preset("caf", ad_maps=["z"]).ad_maps == ("z",)
    legacy = METHODS["caf"].to_dict()
    del legacy["ad_maps"]  # a configuration saved before the field existed distils both maps
    assert MethodConfig.from_dict(legacy).ad_maps == ("z", "h")
    assert METHODS["caf-paper"].ad_maps == ("z", "h")
    with pytest.raises(ValueError, match="ad_maps"):  # PLOP alone has no attentive distillation
        MethodConfig.preset("plop", ad_maps="z")
    assert MethodConfig.preset("plop+caf", ad_maps="z").ad_maps == ("z",)
