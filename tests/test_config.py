"""LoraConfig: validation messages, normalisation, serialisation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

import nnx_peft
from nnx_peft import ConfigError, LoraConfig


def test_defaults_and_normalisation() -> None:
    config = LoraConfig(rank=8, alpha=16, target=".*q_proj")
    assert config.target == (".*q_proj",)
    assert config.exclude == ()
    assert config.alpha == 16.0 and isinstance(config.alpha, float)
    assert config.dropout == 0.0
    assert config.weight_qtype is None and config.tile_size is None
    assert config.scale == 2.0
    assert hash(config) == hash(LoraConfig(rank=8, alpha=16.0, target=[".*q_proj"]))


def test_frozen_and_keyword_only() -> None:
    config = LoraConfig(rank=4, alpha=4.0, target="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        LoraConfig(4, 4.0, "x")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"rank": 0}, ["LoraConfig.rank", "0", "positive int"]),
        ({"rank": 2.0}, ["LoraConfig.rank", "2.0"]),
        ({"rank": True}, ["LoraConfig.rank", "True"]),
        ({"alpha": -1.0}, ["LoraConfig.alpha", "-1.0", "positive finite"]),
        ({"alpha": float("nan")}, ["LoraConfig.alpha", "nan"]),
        ({"alpha": "16"}, ["LoraConfig.alpha", "'16'"]),
        ({"dropout": 1.0}, ["LoraConfig.dropout", "1.0", "[0, 1)"]),
        ({"dropout": -0.1}, ["LoraConfig.dropout", "-0.1"]),
        ({"target": []}, ["LoraConfig.target is empty", "q_proj"]),
        ({"target": 3}, ["LoraConfig.target", "int 3", "regex"]),
        ({"target": ["ok", ""]}, ["LoraConfig.target entries", "''"]),
        ({"target": "(unclosed"}, ["invalid regex", "'(unclosed'", "re.fullmatch"]),
        ({"exclude": "[z-a]"}, ["LoraConfig.exclude", "invalid regex"]),
        ({"weight_qtype": "int3"}, ["LoraConfig.weight_qtype", "'int3'", "nf4"]),
        ({"weight_qtype": "nf4", "tile_size": 0}, ["LoraConfig.tile_size", "0", "divide"]),
        ({"tile_size": 64}, ["tile_size=64 needs weight_qtype", "weight_qtype='nf4'"]),
    ],
)
def test_invalid_values_name_field_value_and_fix(kwargs: dict, fragments: list[str]) -> None:
    fields = {"rank": 4, "alpha": 8.0, "target": ".*"} | kwargs
    with pytest.raises(ConfigError) as info:
        LoraConfig(**fields)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value)


@given(
    rank=st.integers(1, 512),
    alpha=st.floats(1e-3, 1e3),
    dropout=st.floats(0.0, 0.99),
    target=st.lists(st.sampled_from([".*q_proj", ".*v_proj", "lm_head", ".*mlp/.*"]), min_size=1),
    qtype=st.sampled_from([None, *nnx_peft.WEIGHT_QTYPES]),
)
def test_dict_round_trip(
    rank: int, alpha: float, dropout: float, target: list[str], qtype: str | None
) -> None:
    config = LoraConfig(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target=target,
        weight_qtype=qtype,
        tile_size=32 if qtype else None,
    )
    assert LoraConfig.from_dict(config.to_dict()) == config
    assert config.scale == pytest.approx(alpha / rank)


def test_from_dict_rejects_unknown_fields() -> None:
    data = LoraConfig(rank=4, alpha=4.0, target="x").to_dict() | {"use_magic": True}
    with pytest.raises(ConfigError, match=r"Unknown LoraConfig fields \['use_magic'\]"):
        LoraConfig.from_dict(data)
