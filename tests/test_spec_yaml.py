"""YAML tune specs: what a file says is what gets attached, and every malformed file names its problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from spec_helpers import TWO_TUNERS_YAML, meta_vit, tuner_keys, write

import restune
from restune.spec import TuneSpec, resolve_spec
from restune.tune import get_store
from restune.tuners import ResAdapterConfig, ResPrefixConfig


def test_yaml_text_holds_single_backslashes() -> None:
    assert r"'blocks\.\d+\.attn'" in TWO_TUNERS_YAML


def test_yaml_spec_resolves(tmp_path: Path) -> None:
    spec = resolve_spec(write(tmp_path / "spec.yaml", TWO_TUNERS_YAML))
    assert spec == TuneSpec(
        [
            ResPrefixConfig(sites=r"blocks\.\d+\.attn", length=5, layers=[0, 1, 2]),
            ResAdapterConfig(sites=r"blocks\.\d+\.mlp", layers=[6, 7, 8, 9, 10, 11], dim=32, scale="scale_channel"),
        ],
        head="freeze",
    )


def test_yaml_spec_attaches_what_it_says(tmp_path: Path) -> None:
    path = write(tmp_path / "spec.yaml", TWO_TUNERS_YAML)
    model = restune.tune(meta_vit(), str(path))
    prefix = 3 * (2 * 5 * 768 + 1)
    adapter = 6 * (768 * 32 + 32 + 32 * 768 + 768 + 768)  # scale_channel: D per site
    report = restune.report(model)
    assert report.tuners == [("default", "res_prefix", 3, prefix), ("default", "res_adapter", 6, adapter)]
    assert report.head == 0
    assert report.trainable == report.trainable_without_head == prefix + adapter == 327_363
    assert tuner_keys(model) == [f"blocks.{i}.attn.res_prefix" for i in range(3)] + [
        f"blocks.{i}.mlp.res_adapter" for i in range(6, 12)
    ]
    assert [p.requires_grad for p in model.head.parameters()] == [False, False]
    backbone = [p for n, p in model.named_parameters() if not n.startswith(("restune.", "head."))]
    assert not any(p.requires_grad for p in backbone)
    store = get_store(model)
    assert store is not None
    assert all(p.requires_grad for p in store.sets["default"].tuners.parameters())


def test_yaml_path_object_and_yml_suffix(tmp_path: Path) -> None:
    path = write(tmp_path / "spec.yml", TWO_TUNERS_YAML)
    assert resolve_spec(path) == resolve_spec(str(path))


def test_yaml_preset(tmp_path: Path) -> None:
    path = write(tmp_path / "preset.yaml", "preset: res_tuning\n")
    spec = resolve_spec(path)
    assert spec == resolve_spec("res_tuning")
    report = restune.report(restune.tune(meta_vit(), str(path)))
    assert report.trainable_without_head == 378_000
    assert report.head == 76_900


def test_yaml_preset_with_frozen_head(tmp_path: Path) -> None:
    path = write(tmp_path / "preset.yaml", "preset: res_prompt\nhead: freeze\n")
    spec = resolve_spec(path)
    assert spec.preset == "res_prompt" and spec.head == "freeze"
    report = restune.report(restune.tune(meta_vit(), path))
    assert report.trainable == 92_172 and report.head == 0


def test_yaml_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset 'res_tunin'"):
        resolve_spec(write(tmp_path / "preset.yaml", "preset: res_tunin\n"))


@pytest.mark.parametrize(
    "text",
    ["tuners: [\n  - type: lora\n", "tuners:\n  - type: lora\n   sites: x\n", "head: 'train\n", "a: b: c\n"],
)
def test_invalid_yaml_raises_value_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ValueError, match="not valid YAML") as info:
        resolve_spec(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- type: lora\n", "just text\n", ""])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match="must hold a mapping"):
        resolve_spec(write(tmp_path / "list.yaml", text))


def test_yaml_unknown_keys(tmp_path: Path) -> None:
    text = "tuners:\n  - type: res_adapter\n    dimm: 4\n"
    with pytest.raises(ValueError, match="dimm"):
        resolve_spec(write(tmp_path / "spec.yaml", text))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]"):
        resolve_spec(write(tmp_path / "spec2.yaml", "tuners: []\nextra: 1\n"))


def test_yaml_unknown_tuner_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="res_adaptr"):
        resolve_spec(write(tmp_path / "spec.yaml", "tuners:\n  - type: res_adaptr\n"))


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_spec(tmp_path / "missing.yaml")


def test_yaml_bad_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'dim'"):
        resolve_spec(write(tmp_path / "spec.yaml", "tuners:\n  - type: res_adapter\n    dim: 0\n"))
