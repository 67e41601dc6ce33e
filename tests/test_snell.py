"""SNELL (docs/methods/snell.md): parity with the official code, the quantile threshold at any size, counts, merging,
activation checkpointing, branch dropout / drop-path, training, and config validation."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FIXTURES, make_images, make_vit, randn_like, randomize_
from safetensors.torch import load_file, save_file
from torch import nn

import restune
import restune.tuners.snell  # noqa: F401  (registers the tuner)
from restune.contract import get_preset
from restune.parity_checks.snell import CHECKS
from restune.sites import find_sites
from restune.tuners.snell import Snell, SnellConfig, kernel_delta, linear_quantile, sparsify

pytestmark = pytest.mark.usefixtures("single_thread")

Tensor = torch.Tensor
STEMS = ["snell_linear_sparse", "snell_linear_klora"]


def run_fixture(base: Path) -> dict[str, Any]:
    """Load a fixture pair and run the matching check, as ``restune.parity.check`` does."""
    meta = json.loads(base.with_suffix(".json").read_text())
    tensors = {k: v.to(torch.float32) for k, v in load_file(str(base.with_suffix(".safetensors"))).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CHECKS[meta["name"]](meta, tensors)


def copy_fixture(stem: str, directory: Path) -> Path:
    base = directory / stem
    shutil.copy(FIXTURES / f"{stem}.json", base.with_suffix(".json"))
    shutil.copy(FIXTURES / f"{stem}.safetensors", base.with_suffix(".safetensors"))
    return base


def assert_passes(base: Path) -> dict[str, Any]:
    meta = json.loads(base.with_suffix(".json").read_text())
    result = run_fixture(base)
    assert result["passed"], result["failures"]
    assert result["max_abs_err"] <= meta["tolerance"]["outputs"]["atol"]
    assert result["max_abs_err_grads"] <= meta["tolerance"]["grads"]["atol"]
    assert set(result["errors"]) == set(meta["outputs"]) | set(meta["grads"])
    return result


# ---------------------------------------------------------------------------------------------------------------
# Parity: the shipped fixtures and fixtures of other shapes from an independent float64 implementation.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", STEMS)
def test_shipped_fixture_passes(stem: str) -> None:
    result = assert_passes(FIXTURES / stem)
    if stem == "snell_linear_sparse":
        assert result["errors"]["outputs.sparse_mask"] == 0.0
        assert {"outputs.threshold", "outputs.delta_weight_dense", "grads.inputs.x"} <= set(result["errors"])


def reference_fixture(
    directory: Path,
    stem: str,
    *,
    seed: int,
    in_features: int,
    out_features: int,
    rank: int,
    chunks: int,
    sparsity: float,
    coeff: list[float],
    trainable: bool = False,
    batch: int = 3,
    tokens: int = 4,
) -> Path:
    """A fixture written from scratch in float64: direct distances, numpy's quantile, autograd for gradients."""
    for attempt in range(50):
        gen = torch.Generator().manual_seed(seed + attempt)

        def draw(*shape: int, std: float = 1.0, gen: torch.Generator = gen) -> Tensor:
            return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

        weight, bias = draw(out_features, in_features, std=in_features**-0.5), draw(out_features, std=0.1)
        a = draw(chunks, in_features, rank // chunks).requires_grad_(True)
        b = draw(chunks, out_features, rank // chunks).requires_grad_(True)
        c = torch.tensor(coeff, dtype=torch.float64, requires_grad=trainable)
        x = draw(batch, tokens, in_features).requires_grad_(True)
        cot = draw(batch, tokens, out_features)
        dense = torch.zeros(in_features, out_features, dtype=torch.float64)
        for h in range(chunks):
            diff = a[h][:, None, :] - b[h][None, :, :]
            dense = dense + c[h] * diff.pow(2).sum(-1).sqrt()
        magnitude = dense.detach().abs().numpy()
        if sparsity > 0:
            threshold = float(np.quantile(magnitude, sparsity, method="linear"))
            if np.abs(magnitude - threshold).min() < 1e-4:
                continue  # keep the mask unambiguous in fp32
            keep = torch.from_numpy(magnitude * (magnitude > threshold))
            delta = dense * keep
        else:
            delta = dense
        y = x @ weight.t() + bias + x @ delta
        (y * cot).sum().backward()
        break
    tensors = {
        "frozen.weight": weight,
        "frozen.bias": bias,
        "tuner.in_factors": a.detach(),
        "tuner.out_factors": b.detach(),
        "inputs.x": x.detach(),
        "inputs.cotangent": cot,
        "outputs.y": y.detach(),
        "outputs.delta_weight": delta.detach().t(),
        "outputs.delta_weight_dense": dense.detach().t(),
        "grads.tuner.in_factors": a.grad,
        "grads.tuner.out_factors": b.grad,
        "grads.inputs.x": x.grad,
    }
    if sparsity > 0:
        tensors["outputs.threshold"] = torch.tensor(threshold, dtype=torch.float64)
        tensors["outputs.sparse_mask"] = torch.from_numpy((magnitude > threshold).astype(np.float64)).t()
    if trainable:
        tensors["tuner.kernel_coeff"] = c.detach()
        tensors["grads.tuner.kernel_coeff"] = c.grad
    tensors = {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}
    group = {k: "" for k in tensors}
    meta = {
        "method": "SNELL reference (independent float64 re-implementation)",
        "name": stem,
        "config": {
            "in_features": in_features,
            "out_features": out_features,
            "bias": True,
            "rank_r": rank,
            "num_Hs": chunks,
            "factor_dim": rank // chunks,
            "norm_p": 2,
            "kernel_coeff": coeff,
            "kernel_coeff_trainable": trainable,
            "init_thres": sparsity,
            "batch": batch,
            "tokens": tokens,
            "tuner_bias": False,
        },
        "semantics": ["see docs/fixtures.md §5.4"],
        **{part: {k: v for k, v in group.items() if k.startswith(part + ".")} for part in ("frozen", "tuner")},
        **{part: {k: v for k, v in group.items() if k.startswith(part + ".")} for part in ("inputs", "outputs")},
        "grads": {k: v for k, v in group.items() if k.startswith("grads.")},
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "tolerance": {"outputs": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-4, "rtol": 1e-4}},
    }
    base = directory / stem
    base.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    save_file(tensors, str(base.with_suffix(".safetensors")))
    return base


def test_reference_fixtures_of_other_shapes_pass(tmp_path: Path) -> None:
    sparse = reference_fixture(
        tmp_path,
        "snell_linear_sparse",
        seed=11,
        in_features=30,
        out_features=19,
        rank=6,
        chunks=3,
        sparsity=0.37,
        coeff=[0.1, -0.1, 0.1],
    )
    result = assert_passes(sparse)
    assert result["errors"]["outputs.sparse_mask"] == 0.0
    klora = reference_fixture(
        tmp_path,
        "snell_linear_klora",
        seed=5,
        in_features=17,
        out_features=33,
        rank=4,
        chunks=2,
        sparsity=0.0,
        coeff=[0.25, -0.05],
        trainable=True,
        batch=2,
        tokens=3,
    )
    result = assert_passes(klora)
    assert "grads.tuner.kernel_coeff" in result["errors"]


def _edited(tmp_path: Path, stem: str, key: str, change) -> Path:
    base = copy_fixture(stem, tmp_path)
    tensors = load_file(str(base.with_suffix(".safetensors")))
    tensors[key] = change(tensors[key].clone())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(base.with_suffix(".safetensors")))
    return base


def _bump(value: Tensor, amount: float = 1e-3) -> Tensor:
    value.view(-1)[0] += amount
    return value


def _flip(value: Tensor) -> Tensor:
    value.view(-1)[0] = 1.0 - value.view(-1)[0]
    return value


@pytest.mark.parametrize(
    ("stem", "key", "change"),
    [
        ("snell_linear_sparse", "outputs.y", _bump),
        ("snell_linear_sparse", "outputs.threshold", _bump),
        ("snell_linear_sparse", "outputs.sparse_mask", _flip),
        ("snell_linear_sparse", "grads.tuner.in_factors", _bump),
        ("snell_linear_klora", "outputs.delta_weight_dense", _bump),
        ("snell_linear_klora", "grads.inputs.x", _bump),
    ],
)
def test_a_wrong_stored_value_fails(tmp_path: Path, stem: str, key: str, change) -> None:
    result = run_fixture(_edited(tmp_path, stem, key, change))
    assert not result["passed"]
    assert any(f.startswith(key + ":") for f in result["failures"]), result["failures"]


def test_swapped_kernel_coefficients_fail(tmp_path: Path) -> None:
    base = copy_fixture("snell_linear_sparse", tmp_path)
    meta = json.loads(base.with_suffix(".json").read_text())
    meta["config"]["kernel_coeff"] = meta["config"]["kernel_coeff"][::-1]
    base.with_suffix(".json").write_text(json.dumps(meta))
    result = run_fixture(base)
    assert not result["passed"] and result["max_abs_err"] > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The threshold: numpy's linear quantile at any size.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 960, 4099])
@pytest.mark.parametrize("q", [0.0, 0.08, 0.37, 0.5, 0.9, 0.995])
def test_quantile_matches_numpy_and_torch_on_small_tensors(n: int, q: float) -> None:
    values = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 3
    ours = linear_quantile(values, q)
    assert ours.dtype == values.dtype and ours.dim() == 0
    assert ours.item() == np.quantile(values.numpy(), q, method="linear").item()
    torch.testing.assert_close(ours, torch.quantile(values, q), rtol=1e-6, atol=0.0)


def test_quantile_matches_numpy_beyond_the_torch_quantile_limit() -> None:
    side = 4097  # 16,785,409 entries > 2^24
    values = torch.randn(side, side, generator=torch.Generator().manual_seed(3)).abs_()
    assert values.numel() > 2**24
    flat = values.reshape(-1).numpy()
    assert linear_quantile(values, 0.37).item() == np.quantile(flat, 0.37, method="linear").item()
    part = sparsify(values, 0.9)  # the tuner's own path: threshold, then the strict mask
    expected = np.quantile(flat, 0.9, method="linear")
    assert part.threshold.item() == expected.item()
    assert torch.equal(part.mask.reshape(-1), torch.from_numpy(flat > expected))
    assert 0.09 < part.mask.float().mean().item() < 0.11


def test_sparsify_code_semantics_and_gradient() -> None:
    dense = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(True)
    part = sparsify(dense, 0.5)
    t = np.quantile(dense.detach().abs().numpy(), 0.5)
    mask = dense.detach().abs() > t
    assert int(mask.sum()) == 54 and torch.equal(part.mask, mask)
    torch.testing.assert_close(part.delta, torch.where(mask, dense.sign() * dense**2, 0.0).detach())
    part.delta.sum().backward()  # detached magnitude: d/d dW = |dW| on survivors, 0 elsewhere
    torch.testing.assert_close(dense.grad, torch.where(mask, dense.detach().abs(), 0.0))
    assert sparsify(dense, 0.0).delta is dense


def test_sparsify_paper_option_subtracts_the_threshold() -> None:
    dense = torch.randn(10, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    part = sparsify(dense, 0.25, "paper")
    t = dense.abs().reshape(-1).sort().values[19]  # the ceil(0.25 * 80) = 20th smallest
    torch.testing.assert_close(part.delta, dense * (dense.abs() - t).clamp(min=0))
    assert int(part.mask.sum()) == 60


# ---------------------------------------------------------------------------------------------------------------
# Counts, presets, initialisation.
# ---------------------------------------------------------------------------------------------------------------

RANKS = {"snell_8": 8, "snell_16": 16, "snell_32": 32, "snell": 32}


def test_presets_train_the_class_token_and_keep_sparsity_per_task() -> None:
    assert sorted(name for name in restune.presets() if name.startswith("snell")) == sorted(RANKS)
    for name in RANKS:
        spec = get_preset(name)
        assert spec.train == ["cls_token"] and spec.head == "train"
        (config,) = spec.tuners
        assert isinstance(config, SnellConfig) and config.r == RANKS[name] and config.sparsity == 0.0


def test_defaults_and_initialisation_follow_the_official_code() -> None:
    model = restune.tune(make_vit(0), SnellConfig())
    tuners = dict(model.restune.sets["default"].named_tuners())
    assert len(tuners) == 2 * 6 and "blocks.0.attn.k.snell" in tuners
    fc1 = tuners["blocks.0.mlp.fc1.snell"]
    assert fc1.in_factors.shape == (2, 32, 16) and fc1.out_factors.shape == (2, 64, 16)
    assert fc1.in_factors.abs().max() <= (32 * 16) ** -0.5 and fc1.out_factors.abs().max() <= (64 * 16) ** -0.5
    assert fc1.in_factors.abs().max() > 0.8 * (32 * 16) ** -0.5  # Kaiming-uniform(sqrt 5) on the 3-D tensor
    assert "kernel_coeff" in dict(fc1.named_buffers()) and "kernel_coeff" not in dict(fc1.named_parameters())
    assert fc1.kernel_coeff.tolist() == pytest.approx([0.1, -0.1])
    assert fc1.delta_weight().abs().max() > 0  # not zero at init (docs/methods/snell.md)
    learn = restune.tune(make_vit(0), SnellConfig(r=4, learn_coeff=True))
    per_block = 4 * (32 + 32) + 2 * (32 + 64)  # q, k, v, proj; fc1 and fc2 of the tiny ViT (hidden 2D)
    assert restune.report(learn).trainable_without_head == 2 * 4 * per_block + 12 * 2  # + P = 2 weights per site


# ---------------------------------------------------------------------------------------------------------------
# Merge, training, checkpointing, dropout.
# ---------------------------------------------------------------------------------------------------------------


def randomized_snell_model(config: SnellConfig, seed: int = 0) -> nn.Module:
    model = restune.tune(make_vit(seed), restune.TuneSpec([config], train=["cls_token"]))
    randomize_(list(model.restune.sets["default"].tuners.named_parameters()), seed=21, std=0.3)
    with torch.no_grad():
        model.cls_token.add_(randn_like(model.cls_token, 5, 0.2))
    return model


@pytest.mark.parametrize("sparsity", [0.0, 0.6])
def test_merged_plain_copy_matches_the_tuned_model(sparsity: float) -> None:
    model = randomized_snell_model(SnellConfig(r=8, sparsity=sparsity)).eval()
    plain = make_vit(0)
    sites = find_sites(plain)
    with torch.no_grad():
        for name, tuner in model.restune.sets["default"].named_tuners():
            sites[name.rsplit(".", 1)[0]].weight.add_(tuner.delta_weight())
        plain.cls_token.copy_(model.cls_token)
    images = make_images()
    with torch.no_grad():
        tuned_logits, plain_logits = model(images), plain(images)
    assert (tuned_logits - make_vit(0)(images)).abs().max() > 1e-2  # the deltas matter
    torch.testing.assert_close(plain_logits, tuned_logits, atol=1e-5, rtol=0.0)


def test_factors_get_gradients_without_input_grad_and_dense_delta_is_not_stored() -> None:
    linear = nn.Linear(24, 40)
    holder = nn.Module()
    holder.linear = linear
    x = torch.randn(2, 5, 24)  # does not require grad
    saved: dict[bool, list[tuple[int, ...]]] = {}
    for use_checkpoint in (True, False):
        model = copy.deepcopy(holder)
        config = SnellConfig(sites=["linear"], r=8, sparsity=0.5, checkpoint=use_checkpoint, dropout=0.0)
        restune.tune(model, restune.TuneSpec([config], head="freeze"))
        tuner = model.restune.sets["default"].tuners.linear.snell
        shapes: list[tuple[int, ...]] = []

        def pack(tensor: Tensor, shapes: list = shapes) -> Tensor:
            shapes.append(tuple(tensor.shape))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            y = model.linear(x)
        y.square().sum().backward()
        assert tuner.in_factors.grad is not None and tuner.in_factors.grad.abs().sum() > 0
        assert tuner.out_factors.grad is not None and tuner.out_factors.grad.abs().sum() > 0
        saved[use_checkpoint] = shapes
    dense_shapes = {(24, 40), (2, 24, 40)}
    assert dense_shapes & set(saved[False])  # without checkpointing the dense delta is kept ...
    assert not dense_shapes & set(saved[True])  # ... with it, it is recomputed in backward


def test_qkv_branches_share_one_dropout_mask_and_proj_has_none() -> None:
    model = restune.tune(make_vit(0), SnellConfig(r=4, dropout=0.5, drop_path=0.0)).train()
    tuners = dict(model.restune.sets["default"].named_tuners())
    q, k, v = (tuners[f"blocks.0.attn.{n}.snell"] for n in "qkv")
    proj, fc1 = tuners["blocks.0.attn.proj.snell"], tuners["blocks.0.mlp.fc1.snell"]
    # The contract: one Dropout object shared by q, k and v (the host applies it once per call), none for proj.
    assert q.input_transform is k.input_transform is v.input_transform
    assert isinstance(q.input_transform, torch.nn.Dropout) and q.input_transform.p == 0.5
    assert proj.input_transform is None
    assert isinstance(fc1.input_transform, torch.nn.Dropout) and fc1.input_transform is not q.input_transform
    with torch.no_grad():
        for other in (k, v):
            other.in_factors.copy_(q.in_factors)
            other.out_factors.copy_(q.out_factors)
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        frozen = torch.nn.functional.linear(x, qkv.weight, qkv.bias)
        first = (qkv(x) - frozen).split(32, dim=-1)
        again = (qkv(x) - frozen).split(32, dim=-1)  # a new call draws a fresh mask
        # Equal up to the rounding of (frozen + delta) - frozen; another mask would differ by O(1).
        torch.testing.assert_close(first[1], first[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(first[2], first[0], rtol=0, atol=1e-6)
        assert not torch.allclose(again[0], first[0], atol=1e-3)
        assert torch.equal(q.eval()(x), x @ q.delta_weight().t())


def test_drop_path_zeroes_or_rescales_whole_samples() -> None:
    model = restune.tune(make_vit(0), SnellConfig(r=4, dropout=0.0, drop_path=0.5)).train()
    fc2 = dict(model.restune.sets["default"].named_tuners())["blocks.1.mlp.fc2.snell"]
    x = torch.randn(64, 3, 64)
    with torch.no_grad():
        out, full = fc2(x), fc2.eval()(x)
    zeroed = (out == 0).flatten(1).all(1)
    assert 0 < int(zeroed.sum()) < 64
    torch.testing.assert_close(out[~zeroed], full[~zeroed] / 0.5)


def test_kernel_delta_is_the_distance_kernel() -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 7, 2, generator=gen), torch.randn(3, 5, 2, generator=gen)
    coeff = torch.tensor([0.3, -0.2, 0.1])
    expected = sum(coeff[h] * torch.linalg.vector_norm(a[h][:, None] - b[h][None], dim=-1) for h in range(3))
    torch.testing.assert_close(kernel_delta(a, b, coeff), expected)


# ---------------------------------------------------------------------------------------------------------------
# Config validation.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"r": 0}, "'r'"),
        ({"r": 7}, "'r'"),
        ({"chunks": 0}, "'chunks'"),
        ({"sparsity": 1.0}, "'sparsity'"),
        ({"sparsity": -0.1}, "'sparsity'"),
        ({"sparsifier": "topk"}, "'sparsifier'"),
        ({"kernel_coeff": [0.1]}, "'kernel_coeff'"),
        ({"norm_p": 0.0}, "'norm_p'"),
        ({"dropout": 1.0}, "'dropout'"),
        ({"drop_path": -0.5}, "'drop_path'"),
    ],
)
def test_config_validation_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SnellConfig(**changes)


def test_snell_refuses_non_linear_sites() -> None:
    with pytest.raises(ValueError, match="snell"):
        restune.tune(make_vit(0), SnellConfig(sites=r"blocks\.\d+\.mlp"))
    assert Snell.site_kinds == frozenset({"linear"})
