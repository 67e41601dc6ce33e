"""Tuner config validation, serialisation, presets and YAML specs (restune.tuners, restune.spec)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from spec_helpers import TWO_TUNERS_YAML, meta_vit, tuner_keys, write
from torch import nn

import restune
from restune.spec import SPEC_FORMAT_VERSION, TuneSpec, resolve_spec
from restune.tune import get_store
from restune.tuners import (
    LoraConfig,
    ResAdapterConfig,
    ResAttnConfig,
    ResLoraConfig,
    ResPrefixConfig,
    ResPromptConfig,
    TunerConfig,
    config_from_dict,
    tuner_names,
)

CONFIG_CLASSES: list[type[TunerConfig]] = [
    LoraConfig,
    ResLoraConfig,
    ResAdapterConfig,
    ResPrefixConfig,
    ResPromptConfig,
    ResAttnConfig,
]
SCALED_CLASSES: list[type[TunerConfig]] = [
    ResLoraConfig,
    ResAdapterConfig,
    ResPrefixConfig,
    ResPromptConfig,
    ResAttnConfig,
]
SIZE_FIELDS: dict[type[TunerConfig], str] = {
    LoraConfig: "r",
    ResLoraConfig: "r",
    ResAdapterConfig: "dim",
    ResPrefixConfig: "length",
    ResPromptConfig: "length",
    ResAttnConfig: "r",
}
SCALE_OPTIONS = ("scale", "scale_channel", "gate", "scalar_<v>", "none")


def json_round_trip(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data))


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
def test_defaults_validate(config_cls: type[TunerConfig]) -> None:
    config = config_cls()
    assert config.type in tuner_names()
    assert config.layers is None


BAD_FIELDS: list[tuple[type[TunerConfig], dict[str, Any], str]] = [
    (LoraConfig, {"r": 0}, "r"),
    (LoraConfig, {"r": -4}, "r"),
    (LoraConfig, {"r": 2.0}, "r"),
    (LoraConfig, {"r": True}, "r"),
    (LoraConfig, {"alpha": 0}, "alpha"),
    (LoraConfig, {"dropout": 1.0}, "dropout"),
    (ResLoraConfig, {"r": 0}, "r"),
    (ResLoraConfig, {"dropout": -0.1}, "dropout"),
    (ResAdapterConfig, {"dim": 0}, "dim"),
    (ResAdapterConfig, {"dim": 2.5}, "dim"),
    (ResAdapterConfig, {"dim": "10"}, "dim"),
    (ResPrefixConfig, {"length": 0}, "length"),
    (ResPrefixConfig, {"length": -1}, "length"),
    (ResPromptConfig, {"length": 0}, "length"),
    (ResPromptConfig, {"length": 1.5}, "length"),
    (ResAttnConfig, {"r": 0}, "r"),
    (ResAttnConfig, {"heads": 0}, "heads"),
    (ResAttnConfig, {"prefix_length": -1}, "prefix_length"),
    (ResAttnConfig, {"attn_dropout": 1.0}, "attn_dropout"),
    (ResAdapterConfig, {"sites": ""}, "sites"),
    (ResAdapterConfig, {"sites": []}, "sites"),
    (ResAdapterConfig, {"sites": [1]}, "sites"),
    (LoraConfig, {"layers": [-1]}, "layers"),
    (LoraConfig, {"layers": [True]}, "layers"),
]


@pytest.mark.parametrize(("config_cls", "changes", "field"), BAD_FIELDS)
def test_bad_values_raise_naming_the_field(config_cls: type[TunerConfig], changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"'{field}'"):
        config_cls(**changes)


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
def test_replace_validates(config_cls: type[TunerConfig]) -> None:
    size_field = SIZE_FIELDS[config_cls]
    with pytest.raises(ValueError, match=size_field):
        config_cls().replace(**{size_field: 0})
    assert getattr(config_cls().replace(**{size_field: 4}), size_field) == 4


@pytest.mark.parametrize("config_cls", SCALED_CLASSES)
@pytest.mark.parametrize("scale", ["scalar", "scalar_x", "channel", "Scale", ""])
def test_unknown_scale_lists_the_options(config_cls: type[TunerConfig], scale: str) -> None:
    with pytest.raises(ValueError, match="unknown scale") as info:
        config_cls(scale=scale)
    message = str(info.value)
    assert config_cls.type in message
    for option in SCALE_OPTIONS:
        assert option in message


@pytest.mark.parametrize("config_cls", SCALED_CLASSES)
@pytest.mark.parametrize("scale", ["scale", "scale_channel", "none", "scalar_0.1", "scalar_2"])
def test_known_scales_validate(config_cls: type[TunerConfig], scale: str) -> None:
    assert config_cls(scale=scale).scale == scale


@pytest.mark.parametrize("config_cls", SCALED_CLASSES)
def test_scale_init_only_with_a_learnable_scale(config_cls: type[TunerConfig]) -> None:
    assert config_cls(scale="scale_channel", scale_init=0.5).scale_init == 0.5
    with pytest.raises(ValueError, match="scale_init"):
        config_cls(scale="none", scale_init=0.5)


def test_res_lora_refuses_gate() -> None:
    with pytest.raises(ValueError, match="gate"):
        ResLoraConfig(scale="gate")


@pytest.mark.parametrize(("r", "heads"), [(10, 4), (16, 3), (6, 4)])
def test_res_attn_r_must_be_divisible_by_heads(r: int, heads: int) -> None:
    with pytest.raises(ValueError, match=rf"r \({r}\) must be divisible by heads \({heads}\)"):
        ResAttnConfig(r=r, heads=heads)


def test_res_attn_divisible_ok() -> None:
    config = ResAttnConfig(r=12, heads=3)
    assert (config.r, config.heads) == (12, 3)


def test_sites_and_layers_are_normalised_to_lists() -> None:
    config = ResPrefixConfig(sites=("blocks.0.attn", "blocks.1.attn"), layers=(0, 1))
    assert config.sites == ["blocks.0.attn", "blocks.1.attn"]
    assert config.layers == [0, 1]


def test_list_default_sites_are_not_shared() -> None:
    first, second = LoraConfig(), LoraConfig()
    assert first.sites == ["attn.q", "attn.v"]
    assert first.sites is not second.sites


# --------------------------------------------------------------------------------------------------------------------
# to_dict / config_from_dict
# --------------------------------------------------------------------------------------------------------------------

NON_DEFAULT: list[TunerConfig] = [
    LoraConfig(r=4, alpha=16.0, dropout=0.1, use_rslora=True, sites=["attn.qkv"], layers=[0, 11]),
    ResLoraConfig(r=2, scale="scale_channel", scale_init=0.5, dropout=0.2),
    ResAdapterConfig(dim=32, activation="quick_gelu", scale="gate", sites=r"blocks\.\d+\.attn", layers=[3]),
    ResPrefixConfig(length=4, scale="scalar_0.1"),
    ResPromptConfig(length=7, scale="scale", scale_init=1.0),
    ResAttnConfig(r=8, heads=2, prefix_length=5, attn_dropout=0.1, scale="none"),
]


@pytest.mark.parametrize("config", [cls() for cls in CONFIG_CLASSES] + NON_DEFAULT, ids=lambda c: c.type)
def test_to_dict_is_json_and_round_trips(config: TunerConfig) -> None:
    data = config.to_dict()
    assert data["type"] == config.type
    assert data["format_version"] == 1
    restored = config_from_dict(json_round_trip(data))
    assert type(restored) is type(config)
    assert restored == config
    assert restored.to_dict() == data


def test_config_from_dict_accepts_a_hand_written_entry() -> None:
    config = config_from_dict({"type": "res_adapter", "dim": 32, "layers": [6, 7]})
    assert config == ResAdapterConfig(dim=32, layers=[6, 7])


def test_config_from_dict_unknown_key_lists_allowed() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dimm'\]") as info:
        config_from_dict({"type": "res_adapter", "dimm": 3})
    for name in ("activation", "dim", "layers", "scale", "scale_init", "sites"):
        assert f"'{name}'" in str(info.value)


def test_config_from_dict_unknown_type_lists_known_types() -> None:
    with pytest.raises(ValueError) as info:
        config_from_dict({"type": "res_adaptr", "dim": 3})
    message = str(info.value)
    assert "res_adaptr" in message
    assert "Did you mean res_adapter" in message
    for name in tuner_names():
        assert name in message


def test_config_from_dict_needs_a_type() -> None:
    with pytest.raises(ValueError, match="needs a 'type'") as info:
        config_from_dict({"dim": 3})
    for name in tuner_names():
        assert name in str(info.value)


def test_config_from_dict_refuses_a_newer_format() -> None:
    data = ResAdapterConfig().to_dict()
    data["format_version"] = 99
    with pytest.raises(ValueError, match="newer"):
        config_from_dict(data)


def test_config_from_dict_validates_values() -> None:
    with pytest.raises(ValueError, match="'length'"):
        config_from_dict({"type": "res_prefix", "length": 0})


# --------------------------------------------------------------------------------------------------------------------
# Presets and spec forms
# --------------------------------------------------------------------------------------------------------------------


def test_presets_listed() -> None:
    # Registration order follows the tuner files (discovered, not listed), so the names are compared as sets; a new
    # tuner file may add presets without editing this list (tests/test_contract.py covers every preset).
    assert {"res_tuning_bypass", "res_tuning_bypass_attn"} <= set(restune.presets(kind="bypass"))
    assert sorted(restune.presets(None)) == sorted(restune.presets() + restune.presets(kind="bypass"))
    assert set(restune.presets()) >= set(
        [
            "lora",
            "res_adapter",
            "res_prefix",
            "res_prompt",
            "res_lora",
            "res_attn",
            "res_tuning",
            "ssf",
            "bitfit",
            "linear",
            "full",
            "rlrr",
            "arc",
            "arc_att",
            "hta",
            "snell_8",
            "snell_16",
            "snell_32",
            "snell",
            "vpt_shallow",
            "vpt_deep",
            "adapter",
            "adaptformer",
            "prefix",
        ]
    )


@pytest.mark.parametrize("preset", restune.presets())
def test_preset_resolves_to_a_fresh_spec(preset: str) -> None:
    first, second = resolve_spec(preset), resolve_spec(preset)
    assert first.preset == preset
    assert first.head == "train"
    assert (first.train is None) == (preset not in ("bitfit", "full") and not preset.startswith("snell"))
    assert first == second
    assert first is not second and first.tuners is not second.tuners
    assert all(a is not b for a, b in zip(first.tuners, second.tuners, strict=True))


@pytest.mark.parametrize("name", ["res_tunning", "nope", "LoRA"])
def test_unknown_preset_lists_presets(name: str) -> None:
    with pytest.raises(ValueError, match="unknown preset") as info:
        resolve_spec(name)
    for preset in restune.presets():
        assert preset in str(info.value)


def test_unknown_preset_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="Did you mean res_tuning"):
        restune.tune(meta_vit(), "res_tunning")


def test_spec_forms_resolve_alike() -> None:
    config = ResAdapterConfig(dim=4)
    expected = TuneSpec([config])
    assert resolve_spec(config) == expected
    assert resolve_spec([config]) == expected
    assert resolve_spec((config.to_dict(),)) == expected
    assert resolve_spec(config.to_dict()) == expected
    assert resolve_spec({"tuners": [config.to_dict()]}) == expected
    assert resolve_spec(expected) is expected


def test_tune_spec_validates_head() -> None:
    with pytest.raises(ValueError, match="'head'"):
        TuneSpec([LoraConfig()], head="frozen")
    with pytest.raises(TypeError, match="tuner config"):
        TuneSpec([{"type": "lora"}])  # type: ignore[list-item]


def test_dict_spec_unknown_keys_list_allowed() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['heads'\]; allowed: tuners, head, train, preset"):
        resolve_spec({"tuners": [], "heads": "freeze"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['tuner'\] next to 'preset'; allowed: head, train"):
        resolve_spec({"preset": "lora", "tuner": []})


def test_dict_spec_needs_a_tuners_list() -> None:
    with pytest.raises(ValueError, match="'tuners' must be a list"):
        resolve_spec({"head": "train"})


def test_unsupported_spec_type() -> None:
    with pytest.raises(TypeError, match="cannot use int"):
        resolve_spec(3)


# --------------------------------------------------------------------------------------------------------------------
# tune(): set names
# --------------------------------------------------------------------------------------------------------------------


def test_tune_with_an_existing_name_raises() -> None:
    model = restune.tune(meta_vit(), "res_adapter")
    before = restune.report(model)
    with pytest.raises(ValueError, match="already has a tuner set 'default'"):
        restune.tune(model, "lora")
    restune.tune(model, "lora", name="other")
    with pytest.raises(ValueError, match="already has a tuner set 'other'"):
        restune.tune(model, "res_prefix", name="other")
    store = get_store(model)
    assert store is not None
    assert list(store.sets) == ["default", "other"]
    assert tuner_keys(model, "default") == [f"blocks.{i}.mlp.res_adapter" for i in range(12)]
    assert before.sets == {"default": 193_668}
    assert restune.report(model).sets == {"default": 193_668, "other": 294_912}


@pytest.mark.parametrize("name", ["", "1set", "a b", "a.b", 3])
def test_tune_rejects_bad_set_names(name: Any) -> None:
    model = meta_vit()
    with pytest.raises(ValueError, match="must be an identifier"):
        restune.tune(model, "lora", name=name)
    assert not hasattr(model, "restune")


def test_tune_refuses_a_foreign_restune_attribute() -> None:
    model = meta_vit()
    model.restune = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not restune's"):
        restune.tune(model, "lora")


# --------------------------------------------------------------------------------------------------------------------
# TuneSpec.to_dict
# --------------------------------------------------------------------------------------------------------------------

CUSTOM_SPECS: list[TuneSpec] = [
    TuneSpec([ResPrefixConfig(layers=[0, 1]), ResAdapterConfig(scale="scale_channel")], head="freeze"),
    TuneSpec([LoraConfig(sites=["attn.qkv"])], train=["cls_token", "pos_embed"]),
    TuneSpec([ResAttnConfig(r=8, heads=2)], train=r"blocks\.0\.norm1\..*", preset="custom"),
    TuneSpec([], head="train"),
]


@pytest.mark.parametrize(
    "spec",
    [resolve_spec(name) for name in restune.presets()] + CUSTOM_SPECS,
    ids=[*restune.presets(), "two_tuners_frozen_head", "train_list", "train_regex", "head_only"],
)
def test_tune_spec_to_dict_round_trips(spec: TuneSpec) -> None:
    data = spec.to_dict()
    assert data["format_version"] == SPEC_FORMAT_VERSION
    assert set(data) == {"kind", "format_version", "preset", "head", "train", "tuners"}
    assert data["kind"] == "tuners"
    restored = resolve_spec(json_round_trip(data))
    assert restored == spec
    assert restored.to_dict() == data


def test_tune_spec_to_dict_content() -> None:
    data = resolve_spec("res_tuning").to_dict()
    assert data["preset"] == "res_tuning"
    assert [entry["type"] for entry in data["tuners"]] == ["res_prefix", "res_adapter"]
    assert data["head"] == "train" and data["train"] is None


def test_round_tripped_spec_tunes_alike(tmp_path: Path) -> None:
    spec = resolve_spec(write(tmp_path / "spec.yaml", TWO_TUNERS_YAML))
    direct = restune.report(restune.tune(meta_vit(), spec))
    restored = restune.report(restune.tune(meta_vit(), resolve_spec(json_round_trip(spec.to_dict()))))
    assert (restored.trainable, restored.head, restored.tuners) == (direct.trainable, direct.head, direct.tuners)


def test_a_preset_resolves_per_backbone_family() -> None:
    # The default entry is what register_preset(name, build) registers; a family's own entry wins on that family.
    from restune.contract import preset_families, register_preset, unregister_preset
    from restune.tuners import LoraConfig

    register_preset(
        "lora", lambda: TuneSpec([LoraConfig(sites=["to_q", "to_k", "to_v", "to_out.0"], r=4)]), family="unet"
    )
    try:
        assert preset_families("lora") == ["default", "unet"]
        on_unet = resolve_spec("lora", family="unet")
        assert on_unet.tuners[0].r == 4 and on_unet.tuners[0].sites == ["to_q", "to_k", "to_v", "to_out.0"]
        assert on_unet.preset == "lora"
        assert resolve_spec("lora").tuners[0] == LoraConfig()  # the default family is untouched
        assert resolve_spec("lora", family="convnext").tuners[0] == LoraConfig()  # no own entry: the default
        with pytest.raises(ValueError, match="already registered for family 'unet'"):
            register_preset("lora", lambda: TuneSpec([]), family="unet")
    finally:
        unregister_preset("lora", family="unet")
    assert preset_families("lora") == ["default"]


def test_a_spec_of_the_other_kind_is_refused_naming_the_call_that_takes_it() -> None:
    with pytest.raises(ValueError, match=r"bypass spec.*restune\.Bypass"):
        restune.tune(meta_vit(), "res_tuning_bypass")
    with pytest.raises(ValueError, match=r"tuners spec.*restune\.tune"):
        restune.Bypass(meta_vit(), "lora", num_classes=3)
    assert restune.resolve("res_tuning_bypass").kind == "bypass" and restune.resolve("lora").kind == "tuners"
    bypass = restune.resolve("res_tuning_bypass")
    assert restune.resolve(json_round_trip(bypass.to_dict())) == bypass
