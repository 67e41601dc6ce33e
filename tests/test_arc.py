"""ARC (restune.tuners.arc): parity with the official code, shared projections, merge by folding, training.

Parity runs on the shipped ``arc_vit`` fixture and on fixtures of other shapes written here by a float64
re-implementation of docs/methods/arc.md that shares no code with restune (plain tensor algebra, no timm, no hooks).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES, make_images, make_vit, randn_like, randomize_
from safetensors.torch import load_file, save_file
from torch import nn

import restune
from restune.checkpoint import WEIGHTS_NAME
from restune.parity_checks.arc import CHECKS
from restune.presets import get_preset
from restune.sites import SiteMatchError, find_sites
from restune.spec import TuneSpec
from restune.tuners.arc import ARC_ATT_SITES, ARCAdapter, ARCConfig
from restune.tuners.base import config_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")

Tensor = torch.Tensor


def adapters(model: nn.Module) -> dict[str, ARCAdapter]:
    """Site name -> ARC adapter of the model's default set."""
    return {k.removesuffix(".arc"): t for k, t in model.restune.sets["default"].named_tuners()}


def run_check(base: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, result) of the ARC parity check on one fixture, loaded the way ``restune.parity.check`` loads it."""
    meta = json.loads(base.with_suffix(".json").read_text())
    tensors = {k: v.to(torch.float32) for k, v in load_file(str(base.with_suffix(".safetensors"))).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return meta, CHECKS[meta["name"]](meta, tensors)


def assert_passed_within_tolerance(meta: dict[str, Any], result: dict[str, Any]) -> None:
    assert result["passed"], result["failures"]
    assert result["failures"] == []
    assert set(result["errors"]) == set(meta["outputs"]) | set(meta["grads"])
    assert 0.0 <= result["max_abs_err"] <= meta["tolerance"]["outputs"]["atol"]
    assert 0.0 <= result["max_abs_err_grads"] <= meta["tolerance"]["grads"]["atol"]


# ---------------------------------------------------------------------------------------------------------------
# An independent float64 reference of docs/methods/arc.md and a writer for fixtures of other shapes.
# ---------------------------------------------------------------------------------------------------------------


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _arc(h: Tensor, U: Tensor, c: Tensor, b: Tensor) -> Tensor:
    # A(h) = h (I + U diag(c) U^T) + b, written with an explicit D x D matrix (not the library's bottleneck order).
    M = torch.eye(U.shape[0], dtype=U.dtype) + U @ torch.diag(c) @ U.T
    return h @ M + b


def reference_logits(p: dict[str, Tensor], images: Tensor, vit: dict[str, int], mode: str) -> Tensor:
    """ViT with ARC from docs/fixtures.md §3 and §5.3; ``p`` holds fixture-named tensors (float64)."""
    f = {k[len("frozen.") :]: v for k, v in p.items() if k.startswith("frozen.")}
    D, P, H = vit["embed_dim"], vit["patch_size"], vit["num_heads"]
    B = images.shape[0]
    patches = images.unfold(2, P, P).unfold(3, P, P)  # (B, 3, h, w, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 3 * P * P)
    x = patches @ f["patch_embed.proj.weight"].reshape(D, -1).T + f["patch_embed.proj.bias"]
    x = torch.cat([f["cls_token"].expand(B, 1, D), x], dim=1) + f["pos_embed"]
    N, dh = x.shape[1], D // H
    for i in range(vit["depth"]):
        g = {k[len(f"blocks.{i}.") :]: v for k, v in f.items() if k.startswith(f"blocks.{i}.")}
        h = _layer_norm(x, g["norm1.weight"], g["norm1.bias"])
        c, b = p[f"tuner.blocks.{i}.attn_adapter.rescale"], p[f"tuner.blocks.{i}.attn_adapter.bias"]
        h = _arc(h, p["tuner.shared.attn_U"], c, b)
        W, bias = g["attn.qkv.weight"], g["attn.qkv.bias"]
        q, k, v = (h @ W[j * D : (j + 1) * D].T + bias[j * D : (j + 1) * D] for j in range(3))
        q, k, v = (t.reshape(B, N, H, dh).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        attn = (weights / weights.sum(-1, keepdim=True)) @ v
        x = x + attn.transpose(1, 2).reshape(B, N, D) @ g["attn.proj.weight"].T + g["attn.proj.bias"]
        h = _layer_norm(x, g["norm2.weight"], g["norm2.bias"])
        if mode == "ARC":
            c, b = p[f"tuner.blocks.{i}.mlp_adapter.rescale"], p[f"tuner.blocks.{i}.mlp_adapter.bias"]
            h = _arc(h, p["tuner.shared.mlp_U"], c, b)
        h = h @ g["mlp.fc1.weight"].T + g["mlp.fc1.bias"]
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = x + h @ g["mlp.fc2.weight"].T + g["mlp.fc2.bias"]
    x = _layer_norm(x, f["norm.weight"], f["norm.bias"])
    return x[:, 0] @ p["tuner.head.weight"].T + p["tuner.head.bias"]


def write_reference_fixture(directory: Path, mode: str, seed: int, r: int, batch: int, **vit_kw: int) -> Path:
    """An ``arc_vit`` fixture (same keys, names and tolerance format as the shipped one) from the reference."""
    vit = {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 3, "num_heads": 3, "mlp_ratio": 3}
    vit.update({"num_classes": 7, **vit_kw})
    source = make_vit(seed, **vit)
    D, depth = vit["embed_dim"], vit["depth"]
    tensors: dict[str, Tensor] = {}
    for name, value in source.state_dict().items():
        tensors[("tuner." if name.startswith("head.") else "frozen.") + name] = value.detach().clone()
    positions = ("attn", "mlp") if mode == "ARC" else ("attn",)
    for n, pos in enumerate(positions):
        tensors[f"tuner.shared.{pos}_U"] = randn_like(torch.empty(D, r), seed + 10 + n, std=D**-0.5)
        for i in range(depth):
            key, offset = f"tuner.blocks.{i}.{pos}_adapter", seed + 100 * n + 2 * i
            tensors[f"{key}.rescale"] = randn_like(torch.empty(r), offset)
            tensors[f"{key}.bias"] = randn_like(torch.empty(D), offset + 1, std=0.2)
    tensors["inputs.images"] = make_images(seed + 7, batch, vit["img_size"])
    tensors["inputs.cotangent"] = randn_like(torch.empty(batch, vit["num_classes"]), seed + 8)
    tensors = {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}

    leaves = {k: v.to(torch.float64).requires_grad_(k.startswith("tuner.")) for k, v in tensors.items()}
    logits = reference_logits(leaves, leaves["inputs.images"], vit, mode)
    tuner_names = sorted(k for k in leaves if k.startswith("tuner."))
    grads = torch.autograd.grad((logits * leaves["inputs.cotangent"]).sum(), [leaves[k] for k in tuner_names])
    tensors["outputs.logits"] = logits.detach().to(torch.float32)
    tensors.update({f"grads.{k}": g.to(torch.float32).contiguous() for k, g in zip(tuner_names, grads, strict=True)})

    meta = {
        "method": "ARC, float64 reference re-implementation (tests/test_arc.py)",
        "name": "arc_vit",
        "config": {"vit": vit, "batch": batch, "rank_r": r, "adapter_dropout": 0.0, "tuning_mode": mode},
        "tuner": {k: "see docs/fixtures.md 5.3" for k in tuner_names},
        "outputs": {"outputs.logits": "tuned model logits (B, num_classes)"},
        "grads": {f"grads.{k}": f"d loss / d {k}" for k in tuner_names},
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "tolerance": {"outputs": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-5, "rtol": 1e-4}},
    }
    base = directory / "arc_vit"
    base.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    save_file(tensors, str(base.with_suffix(".safetensors")))
    return base


# ---------------------------------------------------------------------------------------------------------------
# Parity.
# ---------------------------------------------------------------------------------------------------------------


def test_shipped_fixture_passes_within_its_tolerance() -> None:
    meta, result = run_check(FIXTURES / "arc_vit")
    assert_passed_within_tolerance(meta, result)
    assert "grads.tuner.shared.attn_U" in result["errors"] and "grads.tuner.shared.mlp_U" in result["errors"]


def test_reference_reproduces_the_shipped_fixture() -> None:
    """The from-scratch reference agrees with the official fixture, so the generated fixtures below are trustworthy."""
    meta = json.loads((FIXTURES / "arc_vit.json").read_text())
    t = load_file(str(FIXTURES / "arc_vit.safetensors"))
    p = {k: v.to(torch.float64) for k, v in t.items()}
    logits = reference_logits(p, p["inputs.images"], meta["config"]["vit"], meta["config"]["tuning_mode"])
    torch.testing.assert_close(logits, p["outputs.logits"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("mode", "seed", "r", "batch", "vit_kw"),
    [("ARC", 3, 5, 3, {}), ("ARC_att", 4, 6, 2, {"depth": 2, "num_heads": 2, "embed_dim": 16, "mlp_ratio": 2})],
)
def test_generated_fixture_of_other_shapes_passes(
    tmp_path: Path, mode: str, seed: int, r: int, batch: int, vit_kw: dict[str, int]
) -> None:
    meta, result = run_check(write_reference_fixture(tmp_path, mode, seed, r, batch, **vit_kw))
    assert_passed_within_tolerance(meta, result)
    expected = {"ARC": 2 * 6 + 2 + 2, "ARC_att": 2 * 2 + 1 + 2}[mode]  # (c, b) per site, the U's, head weight and bias
    assert len(meta["grads"]) == expected


def _shipped() -> tuple[dict[str, Any], dict[str, Tensor]]:
    meta = json.loads((FIXTURES / "arc_vit.json").read_text())
    return meta, {k: v.to(torch.float32) for k, v in load_file(str(FIXTURES / "arc_vit.safetensors")).items()}


@pytest.mark.parametrize("mistake", ["swap_shared", "drop_adapter_bias", "wrong_expected_grad"])
def test_a_wrong_value_fails(mistake: str) -> None:
    meta, t = _shipped()
    if mistake == "swap_shared":  # docs/fixtures.md §4: moves the outputs by far more than the tolerance
        t["tuner.shared.attn_U"], t["tuner.shared.mlp_U"] = t["tuner.shared.mlp_U"], t["tuner.shared.attn_U"]
    elif mistake == "drop_adapter_bias":
        t["tuner.blocks.1.mlp_adapter.bias"] = torch.zeros_like(t["tuner.blocks.1.mlp_adapter.bias"])
    else:
        t["grads.tuner.blocks.0.attn_adapter.rescale"] = t["grads.tuner.blocks.0.attn_adapter.rescale"] * 1.01 + 1e-3
    result = CHECKS["arc_vit"](meta, t)
    assert not result["passed"]
    if mistake == "wrong_expected_grad":
        assert [f.split(":")[0] for f in result["failures"]] == ["grads.tuner.blocks.0.attn_adapter.rescale"]
    else:
        assert result["max_abs_err"] > 1e-3


def test_an_unknown_tuning_mode_or_tensor_raises() -> None:
    meta, t = _shipped()
    with pytest.raises(ValueError, match="tuning_mode"):
        CHECKS["arc_vit"]({**meta, "config": {**meta["config"], "tuning_mode": "ARC_new"}}, t)
    with pytest.raises(ValueError, match="tuner.blocks.0.attn_adapter.scale"):
        CHECKS["arc_vit"](meta, {**t, "tuner.blocks.0.attn_adapter.scale": torch.zeros(8)})


# ---------------------------------------------------------------------------------------------------------------
# Sharing, initialisation, dropout.
# ---------------------------------------------------------------------------------------------------------------


def test_one_U_per_position_is_shared_by_every_block() -> None:
    model = restune.tune(make_vit(0, depth=3), ARCConfig(r=4))
    found = adapters(model)
    assert sorted(found) == [f"blocks.{i}.{p}" for i in range(3) for p in ("attn", "mlp")]
    attn_U, mlp_U = found["blocks.0.attn"].U, found["blocks.0.mlp"].U
    assert attn_U is not mlp_U
    assert all(a.U is (attn_U if site.endswith("attn") else mlp_U) for site, a in found.items())
    # counted (and given to an optimizer) once: 2 U's + 6 sites of (c, b)
    assert sum(p.numel() for p in model.restune.parameters()) == 2 * 32 * 4 + 6 * (4 + 32)
    sites = find_sites(model)
    assert found["blocks.2.mlp"].fold_target(sites["blocks.2.mlp"]) is model.blocks[2].mlp.fc1
    assert found["blocks.2.attn"].fold_target(sites["blocks.2.attn"]) is model.blocks[2].attn.qkv


def test_shared_U_gradient_is_the_sum_over_blocks() -> None:
    torch.manual_seed(0)
    model = restune.tune(make_vit(0), ARCConfig(r=4, dropout=0.0))
    randomize_([(n, p) for n, p in model.restune.named_parameters()], seed=5)
    images = make_images()
    model(images).square().sum().backward()
    shared = adapters(model)["blocks.0.attn"].U
    total = shared.grad.clone()
    per_block = []
    for i in range(2):  # give block i its own copy of U, the others a frozen one
        model.zero_grad()
        for site, adapter in adapters(model).items():
            if site.endswith("attn"):
                adapter.U = nn.Parameter(shared.detach().clone(), requires_grad=site == f"blocks.{i}.attn")
        model(images).square().sum().backward()
        per_block.append(adapters(model)[f"blocks.{i}.attn"].U.grad)
    torch.testing.assert_close(total, per_block[0] + per_block[1], atol=1e-5, rtol=1e-5)


def test_defaults_follow_the_official_initialisation() -> None:
    torch.manual_seed(0)
    vit = make_vit(0)
    model = restune.tune(copy.deepcopy(vit), get_preset("arc")).eval()
    D, r = 32, 50
    for site, adapter in adapters(model).items():
        assert adapter.dropout.p == 0.1
        assert torch.count_nonzero(adapter.bias) == 0
        assert adapter.U.abs().max() <= math.sqrt(6 / (D + r)) and adapter.U.std() > 0.3 * math.sqrt(2 / (D + r))
        if site.endswith("attn"):
            assert torch.count_nonzero(adapter.rescale) == 0
        else:  # Xavier-uniform on the official (1, r) shape: not the identity at init
            assert adapter.rescale.abs().max() <= math.sqrt(6 / (1 + r)) and adapter.rescale.abs().min() > 0
    images = make_images()
    # The attention-position adapters start as the identity, the MLP-position ones do not.
    att_only = restune.tune(copy.deepcopy(vit), get_preset("arc_att")).eval()
    with torch.no_grad():
        torch.testing.assert_close(att_only(images), vit(images), atol=0.0, rtol=0.0)
        assert (model(images) - vit(images)).abs().max() > 1e-3
        zero = restune.tune(copy.deepcopy(vit), ARCConfig(mlp_rescale_init="zero")).eval()
        torch.testing.assert_close(zero(images), vit(images), atol=0.0, rtol=0.0)


def test_dropout_acts_on_the_bottleneck_only_and_only_in_training() -> None:
    torch.manual_seed(0)
    model = restune.tune(make_vit(0), ARCConfig(r=4, dropout=0.5, attn_rescale_init="xavier"))
    adapter = adapters(model)["blocks.0.attn"]
    with torch.no_grad():
        adapter.bias.normal_()
    x = torch.randn(2, 17, 32)
    adapter.train()
    out = adapter(x)
    change = out - x - adapter.bias  # = Dropout(x U diag(c)) U^T: inside span(U) whatever was dropped
    residual = change - change @ torch.linalg.pinv(adapter.U.detach()).T @ adapter.U.detach().T
    assert residual.abs().max() < 1e-5
    adapter.eval()
    M, b = adapter.affine()
    assert (out - adapter(x)).abs().max() > 1e-3
    torch.testing.assert_close(adapter(x), x @ M + b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Merge, training, validation, presets, checkpoints.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [ARCConfig(r=6), ARCConfig(r=3, sites=ARC_ATT_SITES, layers=[1])])
def test_folding_into_the_next_linear_reproduces_the_tuned_model(spec: ARCConfig) -> None:
    tuned = restune.tune(make_vit(0), spec).eval()  # eval: dropout off (the merge is exact in eval mode)
    randomize_([(n, p) for n, p in tuned.restune.named_parameters()], seed=11)
    plain, sites = make_vit(0), find_sites(tuned)
    for site, adapter in adapters(tuned).items():
        target = adapter.fold_target(sites[site])
        linear = plain.get_submodule(next(n for n, m in tuned.named_modules() if m is target))
        weight, bias = adapter.fold_into(target.weight, target.bias)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
    images = make_images()
    with torch.no_grad():
        expected, merged = tuned(images), plain(images)
        assert (merged - make_vit(0)(images)).abs().max() > 1e-2  # the fold changed something
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0.0)


def test_fold_into_a_linear_without_bias() -> None:
    torch.manual_seed(0)
    adapter = adapters(restune.tune(make_vit(0), ARCConfig(r=3, attn_rescale_init="xavier")))["blocks.0.attn"]
    with torch.no_grad():
        adapter.bias.normal_()
    linear = nn.Linear(32, 10, bias=False)
    weight, bias = adapter.fold_into(linear.weight, None)
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(x @ weight.T + bias, linear(adapter.eval()(x)), atol=1e-5, rtol=1e-5)


def test_U_att_waits_for_its_rescale_and_each_shared_U_is_stepped_once() -> None:
    """What one AdamW step may touch is checked for every preset in test_contract.py; this is ARC's own part."""
    torch.manual_seed(0)
    model = restune.tune(make_vit(0), get_preset("arc")).train()
    attn_U = adapters(model)["blocks.0.attn"].U
    before = attn_U.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    images = make_images()
    for step in range(2):
        optimizer.zero_grad()
        model(images).logsumexp(-1).sum().backward()
        if step == 0:  # c_att = 0 at init, so U_att gets no gradient until c_att moves (as in the official code)
            assert torch.count_nonzero(attn_U.grad) == 0
        optimizer.step()
    assert not torch.equal(attn_U, before)  # it moves once c_att has
    trained = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".U")]
    assert len(trained) == 2  # the two shared U's, each listed (and stepped) once


def test_config_validation_names_the_field() -> None:
    for field, value in [("r", 0), ("r", True), ("dropout", 1.0), ("dropout", -0.1)]:
        with pytest.raises(ValueError, match=f"'{field}'"):
            ARCConfig(**{field: value})
    for field in ("attn_rescale_init", "mlp_rescale_init"):
        with pytest.raises(ValueError, match=f"'{field}'"):
            ARCConfig(**{field: "ones"})
    with pytest.raises(SiteMatchError, match="binds to attn, mlp"):
        restune.tune(make_vit(0), ARCConfig(sites=["attn.qkv"]))
    config = ARCConfig(r=7, dropout=0.0, mlp_rescale_init="zero", layers=[0])
    assert config_from_dict(config.to_dict()) == config


def test_presets_resolve_by_name() -> None:
    arc, att = get_preset("arc"), get_preset("arc_att")
    assert isinstance(arc, TuneSpec) and arc.head == "train" and arc.train is None
    assert [type(c) for c in arc.tuners] == [ARCConfig] and arc.tuners[0] == ARCConfig()
    assert att.tuners[0].sites == ARC_ATT_SITES and att.tuners[0].r == 50
    assert get_preset("arc").tuners[0] is not arc.tuners[0]  # fresh every time
    model = restune.tune(make_vit(0), "arc_att")
    assert sorted(adapters(model)) == ["blocks.0.attn", "blocks.1.attn"]


def test_save_and_load_keep_one_shared_U(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = restune.tune(make_vit(0), ARCConfig(r=4)).eval()
    randomize_([(n, p) for n, p in model.restune.named_parameters()], seed=21)
    restune.save(model, tmp_path / "arc")
    saved = load_file(str(tmp_path / "arc" / WEIGHTS_NAME))
    assert len([k for k in saved if k.endswith(".U")]) == 2  # each shared U is saved once
    loaded = restune.load(make_vit(0), tmp_path / "arc").eval()
    found = adapters(loaded)
    assert found["blocks.0.attn"].U is found["blocks.1.attn"].U
    images = make_images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=0.0, rtol=0.0)
