"""Trainable-parameter counts (restune.report) against docs/methods/README.md ("Presets") and per-method formulas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn

import restune
from restune.tuners import (
    LoraConfig,
    ResAdapterConfig,
    ResAttnConfig,
    ResLoraConfig,
    ResPrefixConfig,
    ResPromptConfig,
    TunerConfig,
)

# docs/methods/README.md, "Presets", on ViT-B/16: (trainable without head, + VTAB average head, + FGVC average head).
TABLE: dict[str, tuple[int, int, int]] = {
    "lora": (294_912, 332_957, 475_319),
    "res_adapter": (193_668, 231_713, 374_075),
    "res_prefix": (184_332, 222_377, 364_739),
    "res_prompt": (92_172, 130_217, 272_579),
    "res_lora": (294_936, 332_981, 475_343),
    "res_attn": (589_836, 627_881, 770_243),
    "res_tuning": (378_000, 416_045, 558_407),
    "ssf": (205_824, 243_869, 386_231),
    "bitfit": (102_912, 140_957, 283_319),
    "linear": (0, 38_045, 180_407),
    "full": (85_798_656, 85_836_701, 85_979_063),
    "rlrr": (288_768, 326_813, 469_175),
    "arc": (96_432, 134_477, 276_839),
    "arc_att": (48_216, 86_261, 228_623),
    "hta": (184_320, 222_365, 364_727),
    "snell_8": (1_327_872, 1_365_917, 1_508_279),
    "snell_16": (2_654_976, 2_693_021, 2_835_383),
    "snell_32": (5_309_184, 5_347_229, 5_489_591),
    "snell": (5_309_184, 5_347_229, 5_489_591),
    "vpt_shallow": (38_400, 76_445, 218_807),
    "vpt_deep": (460_800, 498_845, 641_207),
    "adapter": (156_768, 194_813, 337_175),
    "adaptformer": (156_768, 194_813, 337_175),
    "prefix": (184_320, 222_365, 364_727),
}
# Presets that train backbone tensors rather than add tuner modules.
TRAINS_BACKBONE = {"bitfit", "full"}
# SNELL also trains the class token (a backbone tensor of D values) beside its tuners.
BACKBONE_EXTRA = {"snell_8": 768, "snell_16": 768, "snell_32": 768, "snell": 768}
NUM_CLASSES = 100
VIT_B_HEAD = 769 * NUM_CLASSES  # 76,900
VIT_B_BACKBONE = 85_798_656  # docs/methods/README.md, "ViT-B/16 in timm"

# name -> (embed dim D, depth L)
OTHER_VITS: dict[str, tuple[int, int]] = {
    "vit_small_patch16_224": (384, 12),
    "vit_large_patch16_224": (1024, 24),
    "vit_huge_patch14_224": (1280, 32),
}


def meta_vit(name: str = "vit_base_patch16_224", num_classes: int = NUM_CLASSES) -> nn.Module:
    """A timm ViT built on the meta device."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)


def tuned_report(spec: object, name: str = "vit_base_patch16_224") -> restune.Report:
    """The report of a fresh meta model tuned with ``spec``."""
    return restune.report(restune.tune(meta_vit(name), spec))


def adapter_count(dim: int, depth: int) -> int:
    return depth * (2 * dim * 10 + 10 + dim + 1)


def prefix_count(dim: int, depth: int) -> int:
    return depth * (2 * 10 * dim + 1)


def _backbone_count(name: str) -> int:
    model = meta_vit(name)
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.get_classifier().parameters())


# Trainable parameters without head of each preset, from D and L (docs/methods: res-tuning, res-attn, baselines).
FORMULAS: dict[str, Callable[[int, int], int]] = {
    "lora": lambda d, n: n * 2 * 8 * (2 * d),
    "res_adapter": adapter_count,
    "res_prefix": prefix_count,
    "res_prompt": lambda d, n: n * (10 * d + 1),
    "res_lora": lambda d, n: n * 2 * (8 * 2 * d + 1),
    "res_attn": lambda d, n: n * (4 * d * 16 + 1),
    "res_tuning": lambda d, n: prefix_count(d, n) + adapter_count(d, n),
    # SSF after qkv (3D), proj (D), fc1 (4D), fc2 (D), norm1, norm2 (D each) per block, plus patch_embed and norm.
    "ssf": lambda d, n: n * 2 * 11 * d + 2 * 2 * d,
    # BitFit: the same channels' biases, plus the patch embedding's and the final norm's.
    "bitfit": lambda d, n: n * 11 * d + 2 * d,
    "linear": lambda d, n: 0,
    # RLRR: s_in + s_out + f on q, k, v, proj (3D each), fc1 (9D), fc2 (6D); SSF on norm1, norm2; + norm, patch_embed.
    "rlrr": lambda d, n: n * 31 * d + 4 * d,
    # ARC r = 50: one shared D x r projection per position, per block a rescale (r) and a bias (D) per position.
    "arc": lambda d, n: 2 * (d * 50 + n * (50 + d)),
    "arc_att": lambda d, n: d * 50 + n * (50 + d),
    "hta": lambda d, n: n * 4 * 5 * d,
    # SNELL rank r on six linears: factors of (D_in + D_out) x r each (18 D r per block), plus the class token.
    "snell_8": lambda d, n: n * 18 * d * 8 + d,
    "snell_16": lambda d, n: n * 18 * d * 16 + d,
    "snell_32": lambda d, n: n * 18 * d * 32 + d,
    "snell": lambda d, n: n * 18 * d * 32 + d,
    # docs/methods/baselines.md: 50 prompt tokens (shallow: once, deep: per block); r = 8 bottlenecks; l = 10 prefixes.
    "vpt_shallow": lambda d, n: 50 * d,
    "vpt_deep": lambda d, n: n * 50 * d,
    "adapter": lambda d, n: n * (2 * d * 8 + 8 + d),
    "adaptformer": lambda d, n: n * (2 * d * 8 + 8 + d),
    "prefix": lambda d, n: n * 2 * 10 * d,
}


# --------------------------------------------------------------------------------------------------------------------
# Presets on ViT-B/16: the spec table
# --------------------------------------------------------------------------------------------------------------------


def test_every_table_row_is_a_preset() -> None:
    # The published counts stay pinned; a new preset needs no row here (tests/test_contract.py checks its formula).
    assert set(TABLE) <= set(restune.presets())


def test_table_formulas_agree_on_vit_b() -> None:
    formulas = {name: formula(768, 12) for name, formula in FORMULAS.items()}
    assert formulas == {k: v[0] for k, v in TABLE.items() if k != "full"}


@pytest.mark.parametrize("preset", list(TABLE))
def test_preset_counts_vit_b(preset: str) -> None:
    without_head, with_vtab, with_fgvc = TABLE[preset]
    report = tuned_report(preset)
    assert report.trainable_without_head == without_head
    assert report.head == VIT_B_HEAD
    assert report.trainable == without_head + VIT_B_HEAD
    assert report.with_vtab_head == with_vtab
    assert report.with_fgvc_head == with_fgvc
    tuner_params = 0 if preset in TRAINS_BACKBONE else without_head - BACKBONE_EXTRA.get(preset, 0)
    assert report.total == VIT_B_BACKBONE + VIT_B_HEAD + tuner_params
    assert report.sets == {"default": tuner_params}
    assert sum(row[3] for row in report.tuners) == without_head
    assert report.active == "default"
    assert report.num_classes == NUM_CLASSES and report.head_inputs == 768


def test_average_heads_on_vit_b() -> None:
    report = tuned_report("lora")
    assert report.vtab_average_head == 38_045  # 769 * 940 / 19 = 38,045.26
    assert report.fgvc_average_head == 180_407  # 769 * 1173 / 5 = 180,407.4


@pytest.mark.parametrize("preset", list(TABLE))
@pytest.mark.parametrize("model_name", list(OTHER_VITS))
def test_preset_counts_other_widths(model_name: str, preset: str) -> None:
    dim, depth = OTHER_VITS[model_name]
    head = (dim + 1) * NUM_CLASSES
    report = tuned_report(preset, model_name)
    expected = FORMULAS[preset](dim, depth) if preset != "full" else _backbone_count(model_name)
    assert report.trainable_without_head == expected
    assert report.head == head
    assert report.trainable == expected + head
    assert report.with_vtab_head == expected + round((dim + 1) * 940 / 19)
    assert report.with_fgvc_head == expected + round((dim + 1) * 1173 / 5)


def test_per_tuner_rows_of_res_tuning() -> None:
    report = tuned_report("res_tuning")
    assert report.tuners == [("default", "res_prefix", 12, 184_332), ("default", "res_adapter", 12, 193_668)]


# --------------------------------------------------------------------------------------------------------------------
# Scale options (docs/methods/res-tuning.md §2): counts relative to the default learnable scalar
# --------------------------------------------------------------------------------------------------------------------

SCALED: dict[str, tuple[type[TunerConfig], int]] = {  # config class, sites per ViT-B
    "res_adapter": (ResAdapterConfig, 12),
    "res_prefix": (ResPrefixConfig, 12),
    "res_prompt": (ResPromptConfig, 12),
    "res_attn": (ResAttnConfig, 12),
    "res_lora": (ResLoraConfig, 24),
}
SCALE_DELTA: dict[str, Callable[[int], int]] = {  # change per site from 'scale', for D
    "scale": lambda d: 0,
    "scale_channel": lambda d: d - 1,
    "gate": lambda d: d,
    "none": lambda d: -1,
    "scalar_0.5": lambda d: -1,
}


SCALE_CASES = [
    (tuner, scale) for tuner in SCALED for scale in SCALE_DELTA if (tuner, scale) != ("res_lora", "gate")
]  # Res-LoRA refuses a gate: test_res_lora_refuses_gate


@pytest.mark.parametrize(("tuner", "scale"), SCALE_CASES)
def test_scale_option_counts(tuner: str, scale: str) -> None:
    config_cls, sites = SCALED[tuner]
    report = tuned_report(config_cls(scale=scale))
    assert report.trainable_without_head == TABLE[tuner][0] + sites * SCALE_DELTA[scale](768)


def test_res_lora_refuses_gate() -> None:
    with pytest.raises(ValueError, match="gate"):
        ResLoraConfig(scale="gate")


def test_fixed_scalar_scale_is_a_buffer_not_a_parameter() -> None:
    model = restune.tune(meta_vit(), ResAdapterConfig(scale="scalar_0.5"))
    buffers = [name for name, _ in model.named_buffers() if name.startswith("restune.")]
    assert len(buffers) == 12
    report = restune.report(model)
    assert report.trainable_without_head == 12 * (2 * 768 * 10 + 10 + 768)


def test_res_attn_heads_do_not_change_the_count() -> None:
    assert tuned_report(ResAttnConfig(r=16, heads=8)).trainable_without_head == TABLE["res_attn"][0]
    assert tuned_report(ResAttnConfig(r=8, heads=4)).trainable_without_head == 294_924  # docs/methods/res-attn.md


# --------------------------------------------------------------------------------------------------------------------
# Other placements
# --------------------------------------------------------------------------------------------------------------------


def test_lora_fused_on_qkv_vit_b() -> None:
    report = tuned_report(LoraConfig(sites=["attn.qkv"]))
    assert report.trainable_without_head == 294_912  # 12 * 8 * (768 + 2304)
    assert report.tuners == [("default", "lora", 12, 294_912)]


def test_res_adapter_on_a_linear_site() -> None:
    report = tuned_report(ResAdapterConfig(sites=["blocks.0.mlp.fc1"]))
    assert report.trainable_without_head == 768 * 10 + 10 + 10 * 3072 + 3072 + 1
    assert report.tuners == [("default", "res_adapter", 1, 41_483)]


def test_layers_restrict_the_count() -> None:
    report = tuned_report(ResPrefixConfig(layers=[0, 1, 2]))
    assert report.trainable_without_head == 3 * (2 * 10 * 768 + 1)


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


def test_report_of_an_untuned_model() -> None:
    model = meta_vit()
    report = restune.report(model)
    assert report.total == VIT_B_BACKBONE + VIT_B_HEAD
    assert report.trainable == report.total
    assert report.head == VIT_B_HEAD
    assert report.trainable_without_head == VIT_B_BACKBONE
    assert report.sets == {} and report.tuners == [] and report.active is None
    text = str(report)
    assert "85,875,556" in text  # total and trainable
    assert "85,798,656" in text  # without head
    assert "76,900" in text
    assert "769 x 100 classes" in text


def test_report_text_of_a_tuned_model() -> None:
    text = str(tuned_report("res_tuning"))
    for number in ("184,332", "193,668", "378,000", "76,900", "454,900", "416,045", "558,407", "86,253,556"):
        assert number in text, number
    assert "res_prefix" in text and "res_adapter" in text
    assert "VTAB-1k" in text and "FGVC" in text


def test_report_with_frozen_head() -> None:
    report = tuned_report(restune.TuneSpec([ResPrefixConfig()], head="freeze"))
    assert report.head == 0
    assert report.trainable == report.trainable_without_head == 184_332
    assert report.with_vtab_head == 222_377 and report.with_fgvc_head == 364_739


def test_report_counts_only_the_active_set() -> None:
    """A second tuner set: only the active set's tuners and head are trainable (tune.set_active's contract)."""
    model = restune.tune(meta_vit(), "lora")
    restune.tune(model, "res_adapter", name="second")
    report = restune.report(model)
    assert report.sets == {"default": 294_912, "second": 193_668}
    assert report.head == VIT_B_HEAD
    assert report.trainable_without_head == 193_668
    trainable_outside = [n for n, p in model.named_parameters() if p.requires_grad and "blocks" not in n]
    assert trainable_outside == ["head.weight", "head.bias"]
    restune.set_active(model, "default")
    report = restune.report(model)
    assert report.trainable_without_head == 294_912
    assert report.trainable == 294_912 + VIT_B_HEAD
