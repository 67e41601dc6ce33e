"""HTA (docs/methods/hta.md) against its definition.

HTA has no public code and no parity fixture, so the reference is a from-scratch float64 reimplementation of the
spec's formulas with explicit matrices (H(v) = I − v vᵀ or I − 2 v vᵀ/‖v‖², ΔW = W_down W_up + H(v_l) diag(d) H(v_r),
adapter style o' = o (I + ΔW_A)). The tests check the factorised forward, ``delta_weight``/``delta_bias`` and whole
tuned models against it, a float64 gradcheck, the initialisation (ΔW = 0, which tensors get gradients at step 0), the
exact counts of the options, merge exactness in fp32, dropout, and config validation (one training step, save/load
and the preset's counts on ViT-S/B/L: test_contract.py and test_counts.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_images, make_vit, randomize_
from torch import nn

import restune
from restune.contract import get_preset
from restune.sites import LINEAR, Site, find_sites
from restune.tune import get_store
from restune.tuners.base import config_from_dict
from restune.tuners.hta import HTA, HTAConfig, hta_count

pytestmark = pytest.mark.usefixtures("single_thread")

Tensor = torch.Tensor
F64 = torch.float64
TOL64 = 1e-10  # float64 agreement between the factorised forward and the explicit-matrix reference


# ---------------------------------------------------------------------------------------------------------------
# From-scratch reference of docs/methods/hta.md (Math, Merge), float64, explicit matrices.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RefHTA:
    """The learnable tensors of one HTA in the paper's layout (row vectors, W ∈ R^{D_in x D_out})."""

    v_l: Tensor
    v_r: Tensor
    d: Tensor
    w_down: Tensor | None  # (D_in, D')
    w_up: Tensor | None  # (D', D_out)
    normalized: bool
    style: str

    @classmethod
    def of(cls, tuner: HTA) -> RefHTA:
        """Read a tuner's tensors; ``w_down``/``w_up`` are stored (D', D_in)/(D_out, D'), i.e. transposed."""
        get = lambda t: None if t is None else t.detach().to(F64).clone()  # noqa: E731
        down, up = get(tuner.w_down), get(tuner.w_up)
        return cls(
            get(tuner.v_l),
            get(tuner.v_r),
            get(tuner.d),
            None if down is None else down.t(),
            None if up is None else up.t(),
            tuner.normalized,
            tuner.style,
        )


def ref_householder(v: Tensor, normalized: bool) -> Tensor:
    """H(v) = I − v vᵀ (paper) or I − 2 v vᵀ / ‖v‖² (true reflector), as a full matrix."""
    scale = 2.0 / float(v @ v) if normalized else 1.0
    return torch.eye(v.numel(), dtype=F64) - scale * torch.outer(v, v)


def ref_delta(p: RefHTA) -> Tensor:
    """ΔW = W_down W_up + H(v_l) Σ H(v_r), Σ the D_in x D_out rectangular diagonal of d (paper layout)."""
    d_in, d_out = p.v_l.numel(), p.v_r.numel()
    sigma = torch.zeros(d_in, d_out, dtype=F64)
    for i, value in enumerate(p.d.tolist()):
        sigma[i, i] = value
    delta = ref_householder(p.v_l, p.normalized) @ sigma @ ref_householder(p.v_r, p.normalized)
    if p.w_down is not None:
        delta = delta + p.w_down @ p.w_up
    return delta


def ref_added(p: RefHTA, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """What HTA adds to the output of y = x W_ptᵀ + b: x ΔW (Eq. 6) or o ΔW_A with o = y (Eq. 7)."""
    x = x.to(F64)
    if p.style == "adapter":
        x = x @ weight.to(F64).t() + (0.0 if bias is None else bias.to(F64))
    return x @ ref_delta(p)


def ref_merged(p: RefHTA, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The merged PyTorch-layout weight and bias: W_pt + ΔWᵀ, or W ← W (I + ΔW_A), b ← b (I + ΔW_A)."""
    weight, bias = weight.to(F64), None if bias is None else bias.to(F64)
    delta = ref_delta(p)
    if p.style == "adapter":
        mix = torch.eye(delta.shape[0], dtype=F64) + delta
        return (weight.t() @ mix).t(), None if bias is None else bias @ mix
    return weight + delta.t(), bias


def tuners_of(model: nn.Module) -> list[HTA]:
    store = get_store(model)
    return [t for _, t in store.sets[store.active].named_tuners() if isinstance(t, HTA)]


def tuner_params(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for t in tuners_of(model) for n, p in t.named_parameters()]


def reference_model(plain: nn.Module, tuners: list[HTA]) -> nn.Module:
    """``plain`` with every tuner folded in by the reference formulas (never by the library's code)."""
    sites = find_sites(plain)
    with torch.no_grad():
        for tuner in tuners:
            site = sites[tuner.site_name]
            weight, bias = ref_merged(RefHTA.of(tuner), site.weight, site.bias)
            site.weight.copy_(weight)
            if bias is not None:
                site.bias.copy_(bias)
    return plain


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.to(F64) - b.to(F64)).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Forward, delta_weight and whole models against the reference.
# ---------------------------------------------------------------------------------------------------------------

# (sites, options): square split q/k/v and W_o, rectangular fc1 (32 -> 64) / fc2 (64 -> 32), fused qkv (32 -> 96),
# ranks 0/1/2/4, both reflectors, adapter style on the MHA and FFN outputs.
CASES: dict[str, tuple[list[str], dict]] = {
    "default": (["attn.q", "attn.k", "attn.v", "attn.proj"], {}),
    "fc1_fc2_rank2": (["mlp.fc1", "mlp.fc2"], {"rank": 2}),
    "normalized_rank4": (["attn.q", "attn.v", "mlp.fc1"], {"rank": 4, "normalized": True}),
    "fused_qkv_rank0": (["attn.qkv"], {"rank": 0}),
    "adapter_ffn": (["mlp.fc2"], {"style": "adapter"}),
    "adapter_mha_normalized": (["attn.proj", "mlp.fc1"], {"style": "adapter", "normalized": True, "rank": 0}),
}


def tuned_f64(case: str, seed: int = 7) -> nn.Module:
    sites, options = CASES[case]
    model = restune.tune(make_vit(0, dtype=F64), HTAConfig(sites=sites, **options))
    randomize_(tuner_params(model), seed=seed, std=0.3)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_delta_match_reference(case: str) -> None:
    model = tuned_f64(case)
    plain = make_vit(0, dtype=F64)
    sites = find_sites(plain)
    tuners = tuners_of(model)
    assert tuners
    gen = torch.Generator().manual_seed(3)
    for tuner in tuners:
        site = sites[tuner.site_name]
        ref = RefHTA.of(tuner)
        x = torch.randn(2, 5, site.in_features, generator=gen, dtype=F64)
        assert max_err(tuner(x), ref_added(ref, x, site.weight, site.bias)) < TOL64
        weight, bias = ref_merged(ref, site.weight, site.bias)
        assert max_err(tuner.delta_weight(), weight - site.weight) < TOL64
        if tuner.style == "adapter":
            assert max_err(tuner.delta_bias(), bias - site.bias) < TOL64
        else:
            assert tuner.delta_bias() is None
    images = make_images(dtype=F64)
    expected = reference_model(plain, tuners)(images)
    assert max_err(model(images), expected) < TOL64


def test_wrong_values_are_detected() -> None:
    """The comparisons above are sharp: small or structural mistakes exceed the tolerance by far."""
    model = tuned_f64("fc1_fc2_rank2")
    tuner = next(t for t in tuners_of(model) if t.site_name.endswith("fc1"))  # 32 -> 64, rectangular
    ref = RefHTA.of(tuner)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = tuner(x)
    wrong_d = copy.deepcopy(ref)
    wrong_d.d[0] += 1e-6
    wrong_reflector = copy.deepcopy(ref)
    wrong_reflector.normalized = True
    wrong_rank_term = copy.deepcopy(ref)
    wrong_rank_term.w_down = None
    for wrong in (wrong_d, wrong_reflector, wrong_rank_term):
        assert max_err(got, x @ ref_delta(wrong)) > 100 * TOL64
    # The layout: delta_weight is (out, in) = ΔWᵀ; ΔW itself has the wrong shape, and on a square site the wrong values.
    assert tuner.delta_weight().shape == (64, 32)
    square = next(t for t in tuners_of(tuned_f64("default")) if t.site_name.endswith("attn.proj"))
    assert max_err(square.delta_weight(), ref_delta(RefHTA.of(square))) > 1e-3
    # A whole model with one perturbed tensor no longer matches the reference model.
    images = make_images(dtype=F64)
    expected = reference_model(make_vit(0, dtype=F64), tuners_of(model))(images)
    with torch.no_grad():
        tuner.v_r[5] += 1e-4
    assert max_err(model(images), expected) > 100 * TOL64


def _standalone(d_in: int, d_out: int, seed: int, **options: object) -> tuple[HTA, nn.Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out, dtype=F64).requires_grad_(False)
    site = Site("blocks.0.mlp.fc1", LINEAR, linear, d_in, d_out, 0)
    tuner = HTA(HTAConfig(**options), site)
    randomize_(list(tuner.named_parameters()), seed=seed + 1, std=0.5)
    return tuner, linear


@pytest.mark.parametrize(
    "shape,options",
    [
        ((6, 6), {}),
        ((5, 8), {"rank": 2, "normalized": True}),
        ((8, 5), {"rank": 0}),
        ((6, 4), {"style": "adapter", "rank": 2}),
    ],
)
def test_gradcheck_float64(shape: tuple[int, int], options: dict) -> None:
    tuner, _ = _standalone(*shape, seed=11, **options)
    names = [n for n, _ in tuner.named_parameters()]
    x = torch.randn(3, shape[0], dtype=F64, requires_grad=True)

    def fn(x: Tensor, *values: Tensor) -> Tensor:
        return torch.func.functional_call(tuner, dict(zip(names, values, strict=True)), (x,))

    params = tuple(p.detach().clone().requires_grad_(True) for p in tuner.parameters())
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-8)


def test_frozen_weight_is_read_not_copied() -> None:
    """Adapter style reads the frozen linear through the site's view; no tuner holds a copy of it."""
    model = tuned_f64("adapter_mha_normalized")
    for tuner in tuners_of(model):
        expected = {"v_l", "v_r", "d"}
        assert set(tuner.state_dict()) == expected
    tuner = tuners_of(model)[0]
    proj = model.get_submodule(tuner.site_name)
    x = torch.randn(4, proj.in_features, dtype=F64)
    before = tuner(x)
    snapshot = proj.weight.detach().clone()
    with torch.no_grad():
        proj.weight.mul_(2.0)
    assert max_err(tuner(x), before) > 1e-3  # sees the (modified) frozen weight itself
    with torch.no_grad():
        proj.weight.copy_(snapshot)
    model(make_images(dtype=F64)).sum().backward()
    assert torch.equal(proj.weight, snapshot) and proj.weight.grad is None


# ---------------------------------------------------------------------------------------------------------------
# Initialisation (docs/methods/hta.md) and training.
# ---------------------------------------------------------------------------------------------------------------


def test_identity_at_init_and_init_distributions() -> None:
    images = make_images()
    plain = make_vit(0)
    model = restune.tune(make_vit(0), "hta")
    assert torch.equal(model(images), plain(images))
    for tuner in tuners_of(model):
        assert not tuner.delta_weight().any()
        assert not tuner.d.any() and not tuner.w_up.any()
    # Statistics on a ViT-B-sized 768 x 768 site: v ~ N(0, 1/D), W_down uniform with bound 1/sqrt(D).
    site = Site("blocks.0.attn.proj", LINEAR, nn.Linear(768, 768), 768, 768, 0)
    torch.manual_seed(0)
    big = HTA(HTAConfig(), site)
    for v in (big.v_l, big.v_r):
        assert abs(v.std().item() * math.sqrt(768) - 1.0) < 0.1 and abs(v.mean().item()) < 0.01
    bound = 1.0 / math.sqrt(768)
    assert big.w_down.shape == (1, 768) and big.w_down.abs().max().item() <= bound
    assert big.w_down.abs().max().item() > 0.9 * bound
    assert big.w_up.shape == (768, 1) and big.d.shape == (768,)


def test_step0_gradients() -> None:
    """d and W_up get gradients at step 0; v_l, v_r and W_down get exactly zero (d = 0, W_up = 0)."""
    model = restune.tune(make_vit(0), "hta")
    model(make_images()).square().sum().backward()
    for tuner in tuners_of(model):
        assert tuner.d.grad.abs().sum() > 0 and tuner.w_up.grad.abs().sum() > 0
        for param in (tuner.v_l, tuner.v_r, tuner.w_down):
            assert param.grad is not None and not param.grad.any()


def test_dropout_acts_on_branch_input() -> None:
    for style in ("lora", "adapter"):
        tuner, linear = _standalone(6, 5, seed=21, dropout=0.5, style=style)
        ref = RefHTA.of(tuner)
        x = torch.randn(4, 6, dtype=F64)
        tuner.train()
        torch.manual_seed(5)
        got = tuner(x)
        torch.manual_seed(5)
        branch_in = linear(x) if style == "adapter" else x
        dropped = F.dropout(branch_in, 0.5, training=True)
        assert max_err(got, dropped @ ref_delta(ref)) < TOL64
        assert max_err(got, branch_in @ ref_delta(ref)) > 1e-3
        tuner.eval()
        assert max_err(tuner(x), ref_added(ref, x, linear.weight, linear.bias)) < TOL64


# ---------------------------------------------------------------------------------------------------------------
# Merge exactness (fp32) and counts.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default", "fc1_fc2_rank2", "fused_qkv_rank0", "adapter_ffn"])
def test_merge_fp32(case: str) -> None:
    sites, options = CASES[case]
    model = restune.tune(make_vit(0), HTAConfig(sites=sites, **options))
    randomize_(tuner_params(model), seed=13, std=0.2)
    merged = make_vit(0)
    merged_sites = find_sites(merged)
    with torch.no_grad():
        for tuner in tuners_of(model):
            site = merged_sites[tuner.site_name]
            delta_w, delta_b = tuner.delta_weight(), tuner.delta_bias()
            site.weight.copy_(site.weight + delta_w)
            if delta_b is not None:
                site.bias.copy_(site.bias + delta_b)
    images = make_images()
    tuned_logits = model(images)
    assert max_err(merged(images), tuned_logits) < 1e-5
    assert max_err(tuned_logits, make_vit(0)(images)) > 1e-2  # the tuners really changed the model


def meta_vit(name: str = "vit_base_patch16_224") -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=100)


def without_head(spec: object, name: str = "vit_base_patch16_224") -> int:
    return restune.report(restune.tune(meta_vit(name), spec)).trainable_without_head


# docs/methods/hta.md, "Count", on ViT-B/16, head excluded.
COUNT_TABLE: list[tuple[str, HTAConfig | str, int]] = [
    ("D'=0", HTAConfig(rank=0), 110_592),
    ("D'=2", HTAConfig(rank=2), 258_048),
    ("D'=4", HTAConfig(rank=4), 405_504),
    ("q, v only", HTAConfig(sites=["attn.q", "attn.v"]), 92_160),
    ("adapter style on the FFN output", HTAConfig(sites=["mlp.fc2"], style="adapter"), 46_080),
    ("q, v, fc1, fc2 (rectangular)", HTAConfig(sites=["attn.q", "attn.v", "mlp.fc1", "mlp.fc2"]), 294_912),
    ("fused qkv", HTAConfig(sites=["attn.qkv"]), 12 * (768 + 2304 + 768 + 3072)),
]


@pytest.mark.parametrize("label,spec,expected", COUNT_TABLE, ids=[row[0] for row in COUNT_TABLE])
def test_counts_vit_b(label: str, spec: HTAConfig | str, expected: int) -> None:
    assert without_head(spec) == expected


def test_count_per_site() -> None:
    """The preset on ViT-S/B/L: test_counts.py; this is the per-site formula the tuner declares."""
    assert hta_count(768, 768) == 3_840 and hta_count(768, 3072) == 8_448 and hta_count(3072, 768) == 8_448


# ---------------------------------------------------------------------------------------------------------------
# Config, preset and options.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("rank", -1),
        ("rank", 1.5),
        ("rank", True),
        ("normalized", "yes"),
        ("style", "eq7"),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("sites", []),
    ],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"'{field}'"):
        HTAConfig(**{field: value})


def test_preset_and_config_round_trip() -> None:
    spec = get_preset("hta")
    assert spec.head == "train" and spec.train is None and len(spec.tuners) == 1
    config = spec.tuners[0]
    assert config == HTAConfig() and config.sites == ["attn.q", "attn.k", "attn.v", "attn.proj"]
    assert (config.rank, config.normalized, config.style, config.dropout) == (1, False, "lora", 0.0)
    custom = HTAConfig(sites=["mlp.fc2"], rank=0, normalized=True, style="adapter", dropout=0.1)
    assert config_from_dict(custom.to_dict()) == custom
    model = restune.tune(make_vit(0), HTAConfig(rank=0))
    assert all(t.w_down is None and t.w_up is None for t in tuners_of(model))
    assert "rank=0" in repr(tuners_of(model)[0])
