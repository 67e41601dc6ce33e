"""Site discovery and site matching (restune.sites) on timm vision transformers."""

from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import restune
from restune.sites import Site, SiteMatchError, find_sites, match_sites
from restune.tuners import LoraConfig, ResAdapterConfig

# (kind, in_features, out_features) of every site inside one ViT block, as a function of D and the MLP width F.
BLOCK_SITES: dict[str, tuple[str, str, str]] = {
    "": ("block", "D", "D"),
    ".norm1": ("norm", "D", "D"),
    ".attn": ("attn", "D", "D"),
    ".attn.qkv": ("linear", "D", "3D"),
    ".attn.q": ("linear", "D", "D"),
    ".attn.k": ("linear", "D", "D"),
    ".attn.v": ("linear", "D", "D"),
    ".attn.proj": ("linear", "D", "D"),
    ".norm2": ("norm", "D", "D"),
    ".mlp": ("mlp", "D", "D"),
    ".mlp.fc1": ("linear", "D", "F"),
    ".mlp.fc2": ("linear", "F", "D"),
}
SITES_PER_BLOCK = len(BLOCK_SITES)  # 12: block, norm1, attn, qkv, q, k, v, proj, norm2, mlp, fc1, fc2

# name -> (embed dim D, depth L, MLP hidden F)
VITS: dict[str, tuple[int, int, int]] = {
    "vit_small_patch16_224": (384, 12, 1536),
    "vit_base_patch16_224": (768, 12, 3072),
    "vit_large_patch16_224": (1024, 24, 4096),
    "vit_huge_patch14_224": (1280, 32, 5120),
}

# Identity placeholders (and the head dropout, a Dropout(p=0)) that hold no frozen operation.
PLACEHOLDERS = ("blocks.0.attn.norm", "blocks.0.mlp.norm", "blocks.0.attn.q_norm", "fc_norm", "head_drop")


def meta_vit(name: str = "vit_base_patch16_224", num_classes: int = 100) -> nn.Module:
    """A timm ViT built on the meta device: no memory, no initialisation cost."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)


def tiny_vit(seed: int = 0) -> VisionTransformer:
    """A small real ViT (D = 32, two blocks) with deterministic weights."""
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, num_classes=5
    ).eval()


def expected_sites(dim: int, depth: int, hidden: int) -> dict[str, tuple[str, int, int]]:
    """Every site name of a timm ViT with its (kind, in_features, out_features), in module order."""
    widths = {"D": dim, "3D": 3 * dim, "F": hidden}
    sites: dict[str, tuple[str, int, int]] = {"patch_embed": ("patch_embed", 3, dim)}
    for i in range(depth):
        for suffix, (kind, width_in, width_out) in BLOCK_SITES.items():
            sites[f"blocks.{i}{suffix}"] = (kind, widths[width_in], widths[width_out])
    sites["norm"] = ("norm", dim, dim)
    return sites


def describe(sites: dict[str, Site]) -> dict[str, tuple[str, int, int]]:
    return {name: (site.kind, site.in_features, site.out_features) for name, site in sites.items()}


def names(sites: list[Site]) -> list[str]:
    return [site.name for site in sites]


@pytest.fixture(scope="module")
def vit_b_sites() -> dict[str, Site]:
    return find_sites(meta_vit())


# --------------------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------------------


def test_vit_b_site_names_kinds_and_widths_exactly(vit_b_sites: dict[str, Site]) -> None:
    expected = expected_sites(768, 12, 3072)
    assert describe(vit_b_sites) == expected
    assert list(vit_b_sites) == list(expected), "sites are listed in module order"


def test_vit_b_site_names_keyed_by_their_own_name(vit_b_sites: dict[str, Site]) -> None:
    assert all(site.name == name for name, site in vit_b_sites.items())


@pytest.mark.parametrize(
    ("name", "kind", "in_features", "out_features", "layer"),
    [
        ("patch_embed", "patch_embed", 3, 768, None),
        ("blocks.0", "block", 768, 768, 0),
        ("blocks.3.attn", "attn", 768, 768, 3),
        ("blocks.5.mlp", "mlp", 768, 768, 5),
        ("blocks.11.attn.qkv", "linear", 768, 2304, 11),
        ("blocks.11.attn.q", "linear", 768, 768, 11),
        ("blocks.11.attn.k", "linear", 768, 768, 11),
        ("blocks.11.attn.v", "linear", 768, 768, 11),
        ("blocks.7.attn.proj", "linear", 768, 768, 7),
        ("blocks.2.mlp.fc1", "linear", 768, 3072, 2),
        ("blocks.2.mlp.fc2", "linear", 3072, 768, 2),
        ("blocks.9.norm1", "norm", 768, 768, 9),
        ("blocks.9.norm2", "norm", 768, 768, 9),
        ("norm", "norm", 768, 768, None),
    ],
)
def test_vit_b_site_attributes(
    vit_b_sites: dict[str, Site], name: str, kind: str, in_features: int, out_features: int, layer: int | None
) -> None:
    site = vit_b_sites[name]
    assert (site.kind, site.in_features, site.out_features, site.layer) == (kind, in_features, out_features, layer)
    assert site.patch_size == 16


def test_site_modules_are_the_models_modules() -> None:
    model = meta_vit()
    sites = find_sites(model)
    block = model.blocks[4]
    assert sites["blocks.4"].module is block
    assert sites["blocks.4.attn"].module is block.attn
    assert sites["blocks.4.attn"].attention is block.attn
    assert sites["blocks.4.mlp"].module is block.mlp
    assert sites["blocks.4.mlp"].attention is None
    assert sites["blocks.4.attn.proj"].module is block.attn.proj
    assert sites["blocks.4.norm2"].module is block.norm2
    assert sites["norm"].module is model.norm
    assert sites["patch_embed"].module is model.patch_embed
    for split in ("q", "k", "v"):
        assert sites[f"blocks.4.attn.{split}"].module is block.attn.qkv, "a virtual site hooks the fused qkv"
    assert sites["blocks.4.attn.qkv"].rows is None


def test_virtual_split_rows(vit_b_sites: dict[str, Site]) -> None:
    assert vit_b_sites["blocks.0.attn.q"].rows == (0, 768)
    assert vit_b_sites["blocks.0.attn.k"].rows == (768, 1536)
    assert vit_b_sites["blocks.0.attn.v"].rows == (1536, 2304)


@pytest.mark.parametrize("name", PLACEHOLDERS)
def test_placeholders_are_never_sites(vit_b_sites: dict[str, Site], name: str) -> None:
    model = meta_vit()
    placeholder = model.get_submodule(name)  # raises if timm renamed it, which would make this test vacuous
    assert isinstance(placeholder, (nn.Identity, nn.Dropout))
    assert name not in vit_b_sites


def test_no_identity_or_dropout_module_is_a_site(vit_b_sites: dict[str, Site]) -> None:
    model = meta_vit()
    modules = dict(model.named_modules())
    for name in vit_b_sites:
        if name in modules:
            assert not isinstance(modules[name], (nn.Identity, nn.Dropout)), name
    assert "patch_embed.proj" not in vit_b_sites, "the patch embedding is one site, not its Conv2d"
    assert "blocks" not in vit_b_sites and "" not in vit_b_sites


def test_classifier_head_is_never_a_site() -> None:
    model = meta_vit()
    sites = find_sites(model)
    assert isinstance(model.head, nn.Linear)
    assert "head" not in sites
    assert all(site.module is not model.head for site in sites.values())


def test_head_excluded_even_when_it_is_the_only_linear_outside_blocks() -> None:
    model = tiny_vit()
    sites = find_sites(model)
    outside = [name for name, site in sites.items() if site.layer is None]
    assert outside == ["patch_embed", "norm"]


# --------------------------------------------------------------------------------------------------------------------
# Virtual q/k/v sites are views of the fused qkv weight
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "index"), [("q", 0), ("k", 1), ("v", 2)])
def test_split_weight_is_a_view_of_qkv(split: str, index: int) -> None:
    model = tiny_vit()
    qkv = model.blocks[1].attn.qkv
    site = find_sites(model)[f"blocks.1.attn.{split}"]
    weight = site.weight
    dim = qkv.in_features
    assert weight.shape == (dim, dim)
    assert torch.equal(weight, qkv.weight[index * dim : (index + 1) * dim])
    assert weight.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr()
    assert weight.data_ptr() == qkv.weight.data_ptr() + index * dim * dim * qkv.weight.element_size()
    bias = site.bias
    assert bias is not None and qkv.bias is not None
    assert torch.equal(bias, qkv.bias[index * dim : (index + 1) * dim])
    assert bias.data_ptr() == qkv.bias.data_ptr() + index * dim * qkv.bias.element_size()


def test_writing_through_the_split_view_changes_qkv() -> None:
    model = tiny_vit()
    qkv = model.blocks[0].attn.qkv
    before = qkv.weight.detach().clone()
    site = find_sites(model)["blocks.0.attn.v"]
    with torch.no_grad():
        site.weight.fill_(3.0)
    dim = qkv.in_features
    assert torch.all(qkv.weight[2 * dim :] == 3.0)
    assert torch.equal(qkv.weight[: 2 * dim], before[: 2 * dim]), "only the v rows changed"


def test_fused_qkv_site_weight_is_the_parameter_itself() -> None:
    model = tiny_vit()
    site = find_sites(model)["blocks.0.attn.qkv"]
    assert site.weight is model.blocks[0].attn.qkv.weight
    assert site.bias is model.blocks[0].attn.qkv.bias


@pytest.mark.parametrize("name", ["blocks.0", "blocks.0.attn", "blocks.0.mlp", "blocks.0.norm1", "patch_embed"])
def test_non_linear_site_has_no_weight(name: str) -> None:
    site = find_sites(tiny_vit())[name]
    with pytest.raises(TypeError, match=name):
        _ = site.weight
    with pytest.raises(TypeError, match=name):
        _ = site.bias


def test_site_device_and_dtype() -> None:
    sites = find_sites(tiny_vit().to(torch.float64))
    assert sites["blocks.0.attn.q"].dtype == torch.float64
    assert sites["blocks.0.attn.q"].device == torch.device("cpu")
    assert find_sites(meta_vit("vit_small_patch16_224"))["blocks.0.mlp"].device.type == "meta"


# --------------------------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------------------------


def test_regex_is_a_full_match(vit_b_sites: dict[str, Site]) -> None:
    chosen = match_sites(vit_b_sites, r"blocks\.\d+\.attn")
    assert names(chosen) == [f"blocks.{i}.attn" for i in range(12)]
    assert all(site.kind == "attn" for site in chosen)


def test_regex_prefix_does_not_match_children(vit_b_sites: dict[str, Site]) -> None:
    chosen = names(match_sites(vit_b_sites, r"blocks\.0\.attn"))
    assert chosen == ["blocks.0.attn"]
    assert "blocks.0.attn.qkv" not in chosen


def test_regex_suffix_alone_matches_nothing(vit_b_sites: dict[str, Site]) -> None:
    with pytest.raises(SiteMatchError):
        match_sites(vit_b_sites, r"attn\.qkv")


def test_regex_alternation_and_wildcards(vit_b_sites: dict[str, Site]) -> None:
    chosen = names(match_sites(vit_b_sites, r"blocks\.1\.mlp\.fc[12]"))
    assert chosen == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    everything_in_block = names(match_sites(vit_b_sites, r"blocks\.2(\..*)?"))
    assert everything_in_block == [f"blocks.2{suffix}" for suffix in BLOCK_SITES]


def test_list_matches_dotted_suffixes(vit_b_sites: dict[str, Site]) -> None:
    chosen = names(match_sites(vit_b_sites, ["attn.q", "v"]))
    expected = [name for i in range(12) for name in (f"blocks.{i}.attn.q", f"blocks.{i}.attn.v")]
    assert chosen == expected


def test_list_suffix_respects_dots(vit_b_sites: dict[str, Site]) -> None:
    # "q" must not match "blocks.i.attn.qkv", and "norm" only the final norm (not norm1/norm2).
    assert names(match_sites(vit_b_sites, ["q"])) == [f"blocks.{i}.attn.q" for i in range(12)]
    assert names(match_sites(vit_b_sites, ["norm"])) == ["norm"]
    assert names(match_sites(vit_b_sites, ["fc1"])) == [f"blocks.{i}.mlp.fc1" for i in range(12)]


def test_list_matches_exact_names(vit_b_sites: dict[str, Site]) -> None:
    chosen = names(match_sites(vit_b_sites, ["blocks.3.mlp.fc2", "patch_embed", "blocks.0"]))
    assert chosen == ["patch_embed", "blocks.0", "blocks.3.mlp.fc2"], "results follow module order"


def test_list_entry_is_not_a_regex(vit_b_sites: dict[str, Site]) -> None:
    with pytest.raises(SiteMatchError):
        match_sites(vit_b_sites, [r"blocks\.\d+\.mlp"])


def test_layers_filter(vit_b_sites: dict[str, Site]) -> None:
    chosen = match_sites(vit_b_sites, r"blocks\.\d+\.mlp", layers=[0, 5, 11])
    assert names(chosen) == ["blocks.0.mlp", "blocks.5.mlp", "blocks.11.mlp"]
    assert [site.layer for site in chosen] == [0, 5, 11]
    listed = match_sites(vit_b_sites, ["attn.q", "attn.v"], layers=[3])
    assert names(listed) == ["blocks.3.attn.q", "blocks.3.attn.v"]


def test_layers_filter_excludes_sites_outside_blocks(vit_b_sites: dict[str, Site]) -> None:
    with pytest.raises(SiteMatchError, match=r"inside blocks \[0\]"):
        match_sites(vit_b_sites, ["norm"], layers=[0])


def test_no_match_message_names_pattern_and_closest_sites(vit_b_sites: dict[str, Site]) -> None:
    with pytest.raises(SiteMatchError) as info:
        match_sites(vit_b_sites, "blocks.0.atn", who="res_adapter")
    message = str(info.value)
    assert "res_adapter" in message
    assert "'blocks.0.atn'" in message
    assert "Closest site names" in message
    closest = message.split("Closest site names:")[1]
    assert "blocks.0.attn" in closest


def test_no_match_message_for_a_list(vit_b_sites: dict[str, Site]) -> None:
    with pytest.raises(SiteMatchError) as info:
        match_sites(vit_b_sites, ["attn.qvk"])
    message = str(info.value)
    assert "['attn.qvk']" in message
    assert "attn.qkv" in message.split("Closest site names:")[1]


def test_site_match_error_is_a_value_error() -> None:
    assert issubclass(SiteMatchError, ValueError)


def test_invalid_regex(vit_b_sites: dict[str, Site]) -> None:
    with pytest.raises(SiteMatchError, match="not a valid regular expression") as info:
        match_sites(vit_b_sites, r"blocks\.(\d+\.attn")
    assert r"blocks\\.(\\d+\\.attn" in str(info.value)


@pytest.mark.parametrize("layers", [[12], [0, 99]])
def test_out_of_range_layers(vit_b_sites: dict[str, Site], layers: list[int]) -> None:
    with pytest.raises(SiteMatchError, match=r"do not exist; this model has blocks 0\.\.11") as info:
        match_sites(vit_b_sites, r"blocks\.\d+\.attn", layers=layers)
    assert str([layers[-1]]) in str(info.value)


def test_kinds_filter_raises_for_unbindable_sites(vit_b_sites: dict[str, Site]) -> None:
    with pytest.raises(SiteMatchError, match=r"blocks\.0\.mlp \(mlp\)") as info:
        match_sites(vit_b_sites, r"blocks\.0\.mlp(\.fc1)?", kinds=frozenset({"linear"}), who="lora")
    assert "linear" in str(info.value)
    ok = match_sites(vit_b_sites, r"blocks\.0\.mlp\.fc1", kinds=frozenset({"linear"}))
    assert names(ok) == ["blocks.0.mlp.fc1"]


def test_tune_lora_on_an_mlp_site_raises_and_leaves_the_model_alone() -> None:
    model = meta_vit()
    with pytest.raises(SiteMatchError, match=r"lora: .*blocks\.0\.mlp \(mlp\).*binds to linear"):
        restune.tune(model, LoraConfig(sites=r"blocks\.0\.mlp"))
    assert not hasattr(model, "restune")
    assert all(p.requires_grad for p in model.parameters())


def test_tune_with_unknown_site_raises_site_match_error() -> None:
    model = meta_vit()
    with pytest.raises(SiteMatchError, match="res_adapter"):
        restune.tune(model, ResAdapterConfig(sites=["blocks.0.ffn"]))


# --------------------------------------------------------------------------------------------------------------------
# Other widths and depths
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VITS))
def test_site_counts_by_kind(name: str) -> None:
    dim, depth, hidden = VITS[name]
    model = meta_vit(name)
    assert (model.embed_dim, len(model.blocks)) == (dim, depth)
    sites = find_sites(model)
    assert len(sites) == depth * SITES_PER_BLOCK + 2
    assert Counter(site.kind for site in sites.values()) == {
        "block": depth,
        "attn": depth,
        "mlp": depth,
        "linear": 7 * depth,  # qkv, q, k, v, proj, fc1, fc2
        "norm": 2 * depth + 1,
        "patch_embed": 1,
    }
    assert describe(sites) == expected_sites(dim, depth, hidden)
    assert {site.layer for site in sites.values()} == {None, *range(depth)}


# --------------------------------------------------------------------------------------------------------------------
# Tuner modules are not sites
# --------------------------------------------------------------------------------------------------------------------


def test_tuner_modules_are_not_sites_after_tune() -> None:
    model = meta_vit()
    before = describe(find_sites(model))
    restune.tune(model, "res_tuning")
    restune.tune(model, LoraConfig(sites=["attn.qkv"]), name="second")  # the second set owns a head copy
    restune.tune(model, ResAdapterConfig(sites=["fc1"]), name="third")
    tuner_linears = [n for n, m in model.named_modules() if n.startswith("restune.") and isinstance(m, nn.Linear)]
    assert tuner_linears, "the tuners do hold linear layers and head copies"
    sites = find_sites(model)
    assert describe(sites) == before
    assert not any(name.startswith("restune") for name in sites)
    assert all(site.module is not model.head for site in sites.values())
