"""RLRR (specs/rlrr.md): parity with the official fixtures and with an independent fp64 re-implementation of the
spec's math on other shapes, exact trainable counts, exact merge, what a training step touches, init and config."""

from __future__ import annotations

import copy
import importlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import FIXTURES, make_images, make_vit, randn_like, randomize_
from safetensors.torch import load_file, save_file
from torch import nn

import restune
from restune.presets import get_preset, presets, register_preset
from restune.sites import SiteMatchError, find_sites
from restune.tuners.base import config_from_dict
from restune.tuners.rlrr import PRESETS, RLRR_SITES, RLRRConfig, RLRRLinear, rlrr_spec
from restune.tuners.ssf import SSF, SSFConfig

pytestmark = pytest.mark.usefixtures("single_thread")

Tensor = torch.Tensor
STEMS = ("rlrr_linear", "rlrr_vit")


@pytest.fixture
def registered_preset() -> Iterator[None]:
    """Register the ``rlrr`` preset for one test and remove it again if this test added it (the lead wires it)."""
    registry = importlib.import_module("restune.presets")  # the module; ``restune.presets`` is the function
    added = "rlrr" not in presets()
    if added:
        register_preset("rlrr", PRESETS["rlrr"])
    yield
    if added:
        registry._PRESETS.pop("rlrr")


def fixture_path(stem: str) -> Path:
    """An official fixture, as copied into tests/fixtures/official/ from the shared fixture folder."""
    return FIXTURES / stem


def run_check(base: Path) -> dict[str, Any]:
    """Run restune's RLRR parity check on a fixture pair, the way ``restune.parity.check`` does."""
    from restune.parity_checks.rlrr import CHECKS

    meta = json.loads(base.with_suffix(".json").read_text())
    tensors = {k: v.float() for k, v in load_file(str(base.with_suffix(".safetensors"))).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CHECKS[meta["name"]](meta, tensors)


# ---------------------------------------------------------------------------------------------------------------
# An independent fp64 re-implementation of specs/rlrr.md §1-2 (dense W ⊙ (1 + s_out s_inᵀ), explicit attention).
# ---------------------------------------------------------------------------------------------------------------


def ref_linear(x: Tensor, w: Tensor, b: Tensor | None, s_in: Tensor, s_out: Tensor, f: Tensor, residual: bool = True):
    scale = torch.outer(s_out, s_in)
    merged = w * (1 + scale) if residual else w * scale  # residual=False: the "missing 1 +" mistake
    return x @ merged.t() + (f if b is None else b + f)


def layer_norm(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * w + b


def ref_vit_logits(fz: dict[str, Tensor], tn: dict[str, Tensor], images: Tensor, vit: dict[str, Any]) -> Tensor:
    """Logits of the tiny ViT with RLRR + SSF, written from the spec only."""
    d, heads = vit["embed_dim"], vit["num_heads"]

    def ssf(z: Tensor, site: str) -> Tensor:
        return z * tn[f"{site}.ssf_scale"] + tn[f"{site}.ssf_shift"]

    def lin(z: Tensor, site: str, w: Tensor, b: Tensor) -> Tensor:
        return ref_linear(z, w, b, tn[f"{site}.scale_col"], tn[f"{site}.scale_line"], tn[f"{site}.shift_bias"])

    patches = F.conv2d(images, fz["patch_embed.proj.weight"], fz["patch_embed.proj.bias"], stride=vit["patch_size"])
    tokens = ssf(patches.flatten(2).transpose(1, 2), "patch_embed")
    x = torch.cat([fz["cls_token"].expand(len(images), -1, -1), tokens], 1) + fz["pos_embed"]
    for i in range(vit["depth"]):
        p = f"blocks.{i}"
        u = ssf(layer_norm(x, fz[f"{p}.norm1.weight"], fz[f"{p}.norm1.bias"]), f"{p}.norm1")
        w, b = fz[f"{p}.attn.qkv.weight"], fz[f"{p}.attn.qkv.bias"]
        q, k, v = (lin(u, f"{p}.attn.{n}", w[j * d : (j + 1) * d], b[j * d : (j + 1) * d]) for j, n in enumerate("qkv"))
        q, k, v = (t.unflatten(-1, (heads, d // heads)).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)
        a = (attn @ v).transpose(1, 2).flatten(2)
        x = x + lin(a, f"{p}.attn.proj", fz[f"{p}.attn.proj.weight"], fz[f"{p}.attn.proj.bias"])
        u = ssf(layer_norm(x, fz[f"{p}.norm2.weight"], fz[f"{p}.norm2.bias"]), f"{p}.norm2")
        h = F.gelu(lin(u, f"{p}.mlp.fc1", fz[f"{p}.mlp.fc1.weight"], fz[f"{p}.mlp.fc1.bias"]))
        x = x + lin(h, f"{p}.mlp.fc2", fz[f"{p}.mlp.fc2.weight"], fz[f"{p}.mlp.fc2.bias"])
    x = ssf(layer_norm(x, fz["norm.weight"], fz["norm.bias"]), "norm")
    return x[:, 0] @ tn["head.weight"].t() + tn["head.bias"]


def gen(shape: tuple[int, ...] | torch.Size, seed: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
    """Seeded N(mean, std²), drawn in fp64 and rounded to fp32 (the values the fixture stores)."""
    return randn_like(torch.empty(shape), seed, std, mean)


def save_fixture(base: Path, meta: dict[str, Any], tensors: dict[str, Tensor], tolerance: dict[str, Any]) -> Path:
    groups = {"frozen": {}, "tuner": {}, "inputs": {}, "outputs": {}, "grads": {}}
    for name in tensors:
        groups[name.split(".")[0]][name] = "generated by tests/test_rlrr.py from specs/rlrr.md in fp64"
    meta = {**meta, **groups, "shapes": {k: list(v.shape) for k, v in tensors.items()}, "tolerance": tolerance}
    base.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(base.with_suffix(".safetensors")))
    return base


TOLERANCE = {"outputs": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 5e-5, "rtol": 1e-4}}


def make_linear_fixture(directory: Path, din: int, dout: int, bias: bool, residual: bool = True) -> Path:
    t = {"frozen.weight": gen((dout, din), 1, 1 / math.sqrt(din))}
    if bias:
        t["frozen.bias"] = gen((dout,), 2, 0.1)
    t |= {"tuner.scale_col": gen((din,), 3, 0.5), "tuner.scale_line": gen((dout,), 4, 0.5)}
    t |= {"tuner.shift_bias": gen((dout,), 5, 0.2), "inputs.x": gen((3, 4, din), 6)}
    t["inputs.cotangent"] = gen((3, 4, dout), 7)
    x64 = {k: v.double().requires_grad_(k != "frozen.weight" and k != "frozen.bias") for k, v in t.items()}
    w, b = x64["frozen.weight"], x64.get("frozen.bias")
    s_in, s_out, f = x64["tuner.scale_col"], x64["tuner.scale_line"], x64["tuner.shift_bias"]
    y = ref_linear(x64["inputs.x"], w, b, s_in, s_out, f, residual)
    (y * x64["inputs.cotangent"]).sum().backward()
    merged = w * (1 + torch.outer(s_out, s_in)) if residual else w * torch.outer(s_out, s_in)
    t |= {"outputs.y": y, "outputs.merged_weight": merged, "outputs.merged_bias": f if b is None else b + f}
    for name in ("tuner.scale_col", "tuner.scale_line", "tuner.shift_bias", "inputs.x"):
        t[f"grads.{name}"] = x64[name].grad
    config = {"in_features": din, "out_features": dout, "bias": bias, "batch": 3, "tokens": 4}
    meta = {"name": "rlrr_linear", "method": "RLRR on one nn.Linear (test-generated)", "config": config}
    return save_fixture(directory / "rlrr_linear", meta, {k: v.detach() for k, v in t.items()}, TOLERANCE)


VIT_OTHER = {
    "img_size": 16,
    "patch_size": 4,
    "embed_dim": 24,
    "depth": 3,
    "num_heads": 3,
    "mlp_ratio": 3,
    "num_classes": 7,
}


def make_vit_fixture(directory: Path, vit: dict[str, Any], seed: int = 3) -> Path:
    model = make_vit(seed, **vit)
    state = model.state_dict()
    t = {f"frozen.{k}": v for k, v in state.items() if not k.startswith("head.")}
    t |= {"tuner.head.weight": state["head.weight"], "tuner.head.bias": state["head.bias"]}
    d, hidden = vit["embed_dim"], vit["embed_dim"] * vit["mlp_ratio"]
    shapes = {"attn.q": (d, d), "attn.k": (d, d), "attn.v": (d, d), "attn.proj": (d, d)}
    shapes |= {"mlp.fc1": (d, hidden), "mlp.fc2": (hidden, d)}
    counter = 100
    for i in range(vit["depth"]):
        for site, (din, dout) in shapes.items():
            for name, size, std in (("scale_col", din, 0.5), ("scale_line", dout, 0.5), ("shift_bias", dout, 0.2)):
                t[f"tuner.blocks.{i}.{site}.{name}"] = gen((size,), counter, std)
                counter += 1
    for site in [f"blocks.{i}.norm{j}" for i in range(vit["depth"]) for j in (1, 2)] + ["norm", "patch_embed"]:
        t[f"tuner.{site}.ssf_scale"] = gen((d,), counter, 0.2, 1.0)
        t[f"tuner.{site}.ssf_shift"] = gen((d,), counter + 1, 0.2)
        counter += 2
    t["inputs.images"] = gen((2, 3, vit["img_size"], vit["img_size"]), 7)
    t["inputs.cotangent"] = gen((2, vit["num_classes"]), 8)
    fz = {k[len("frozen.") :]: v.double() for k, v in t.items() if k.startswith("frozen.")}
    tn = {k[len("tuner.") :]: v.double().requires_grad_(True) for k, v in t.items() if k.startswith("tuner.")}
    logits = ref_vit_logits(fz, tn, t["inputs.images"].double(), vit)
    (logits * t["inputs.cotangent"].double()).sum().backward()
    t["outputs.logits"] = logits.detach()
    t |= {f"grads.tuner.{k}": v.grad for k, v in tn.items()}
    config = {"vit": vit, "batch": 2, "rlrr_targets": ["q", "k", "v", "attn.proj", "mlp.fc1", "mlp.fc2"]}
    config["ssf_sites"] = ["patch tokens", "norm1 output", "norm2 output", "final norm output"]
    meta = {"name": "rlrr_vit", "method": "RLRR + SSF, tiny ViT (test-generated)", "config": config}
    return save_fixture(directory / "rlrr_vit", meta, t, TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------
# Parity.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", STEMS)
def test_official_fixture_passes_within_its_tolerance(stem: str) -> None:
    base = fixture_path(stem)
    meta = json.loads(base.with_suffix(".json").read_text())
    result = run_check(base)
    assert result["passed"], result["failures"]
    assert 0.0 <= result["max_abs_err"] <= meta["tolerance"]["outputs"]["atol"]
    assert 0.0 <= result["max_abs_err_grads"] <= meta["tolerance"]["grads"]["atol"]
    compared = {name.split(":")[-1] for name in result["errors"]}
    assert compared == set(meta["outputs"]) | set(meta["grads"])  # every output and every gradient was compared


def test_the_reference_reproduces_the_official_fixture() -> None:
    """The test's own re-implementation agrees with the official code, so the fixtures it generates mean the same."""
    base = fixture_path("rlrr_vit")
    meta = json.loads(base.with_suffix(".json").read_text())
    t = load_file(str(base.with_suffix(".safetensors")))
    fz = {k[len("frozen.") :]: v.double() for k, v in t.items() if k.startswith("frozen.")}
    tn = {k[len("tuner.") :]: v.double() for k, v in t.items() if k.startswith("tuner.")}
    logits = ref_vit_logits(fz, tn, t["inputs.images"].double(), meta["config"]["vit"])
    torch.testing.assert_close(logits, t["outputs.logits"].double(), atol=1e-5, rtol=0.0)


@pytest.mark.parametrize(("din", "dout", "bias"), [(7, 13, True), (16, 5, False)])
def test_generated_linear_fixture_of_other_shapes_passes(tmp_path: Path, din: int, dout: int, bias: bool) -> None:
    result = run_check(make_linear_fixture(tmp_path, din, dout, bias))
    assert result["passed"], result["failures"]
    assert result["max_abs_err"] < 1e-5 and result["max_abs_err_grads"] < 5e-5


def test_generated_vit_fixture_of_other_shapes_passes(tmp_path: Path) -> None:
    result = run_check(make_vit_fixture(tmp_path, VIT_OTHER))
    assert result["passed"], result["failures"]
    assert len(result["errors"]) == 1 + 3 * (6 * 3 + 2 * 2) + 2 * 2 + 2  # logits + every tuner and head grad
    assert result["max_abs_err"] < 1e-5


def test_a_missing_residual_term_fails_the_linear_check(tmp_path: Path) -> None:
    result = run_check(make_linear_fixture(tmp_path, 24, 40, True, residual=False))
    assert not result["passed"]
    failed = {line.split(":")[0] for line in result["failures"]}
    assert {"outputs.y", "outputs.merged_weight", "grads.inputs.x"} <= failed


def test_a_wrong_tuner_value_fails_the_vit_check(tmp_path: Path) -> None:
    base = fixture_path("rlrr_vit")
    shutil.copy(base.with_suffix(".json"), tmp_path / "rlrr_vit.json")
    t = load_file(str(base.with_suffix(".safetensors")))
    t["tuner.blocks.1.attn.v.scale_line"] = t["tuner.blocks.1.attn.v.scale_line"] + 0.05
    save_file(t, str(tmp_path / "rlrr_vit.safetensors"))
    result = run_check(tmp_path / "rlrr_vit")
    assert not result["passed"]
    assert any(line.startswith("outputs.logits") for line in result["failures"])
    assert result["max_abs_err"] > 1e-3


def test_a_fixture_tensor_without_a_home_fails(tmp_path: Path) -> None:
    base = fixture_path("rlrr_vit")
    shutil.copy(base.with_suffix(".json"), tmp_path / "rlrr_vit.json")
    t = load_file(str(base.with_suffix(".safetensors")))
    t["tuner.blocks.0.attn.qkv.scale_col"] = torch.zeros(32)  # a fused-qkv tensor the split default has no place for
    save_file(t, str(tmp_path / "rlrr_vit.safetensors"))
    result = run_check(tmp_path / "rlrr_vit")
    assert not result["passed"]
    assert any("without a restune parameter" in line for line in result["failures"])


# ---------------------------------------------------------------------------------------------------------------
# Counts (specs/rlrr.md §4).
# ---------------------------------------------------------------------------------------------------------------


def meta_count(spec: Any, name: str = "vit_base_patch16_224") -> int:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=100)
    return restune.report(restune.tune(model, spec)).trainable_without_head


def rlrr_formula(d: int, depth: int, rank: int = 1, fused: bool = False, ssf: bool = True) -> int:
    """L·[Σ_linears (r·D_in + r·D_out + D_out) + 4D] + 4D, with the MLP hidden 4D."""
    linears = [(d, 3 * d)] if fused else [(d, d)] * 3
    linears += [(d, d), (d, 4 * d), (4 * d, d)]
    per_block = sum(rank * din + rank * dout + dout for din, dout in linears)
    return depth * (per_block + 4 * d * ssf) + 4 * d * ssf


@pytest.mark.usefixtures("registered_preset")
def test_vit_b_preset_count_is_exactly_the_spec() -> None:
    spec = get_preset("rlrr")
    assert spec.head == "train" and spec.train is None and spec.preset == "rlrr"
    assert [type(c) for c in spec.tuners] == [RLRRConfig, SSFConfig] and spec.tuners[0] == RLRRConfig()
    assert meta_count("rlrr") == 288_768
    assert rlrr_formula(768, 12) == 288_768


@pytest.mark.parametrize(
    ("name", "d", "depth"), [("vit_small_patch16_224", 384, 12), ("vit_large_patch16_224", 1024, 24)]
)
def test_other_vit_counts_follow_the_formula(name: str, d: int, depth: int) -> None:
    assert meta_count(rlrr_spec(), name) == rlrr_formula(d, depth)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"fused_qkv": True}, 270_336),
        ({"ssf": False}, 248_832),
        ({"init": "zero"}, 288_768),
        ({"rank": 2}, rlrr_formula(768, 12, rank=2)),
    ],
)
def test_vit_b_option_counts(options: dict[str, Any], expected: int) -> None:
    assert meta_count(rlrr_spec(**options)) == expected


# ---------------------------------------------------------------------------------------------------------------
# The tuner itself: forward = dense delta, frozen views, init, merge, training step.
# ---------------------------------------------------------------------------------------------------------------


def tuned_vit(spec: Any = None, seed: int = 0) -> nn.Module:
    model = make_vit(seed)
    return restune.tune(model, rlrr_spec() if spec is None else spec)


def tuners(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.restune.sets["default"].named_tuners())


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("site", ["blocks.0.attn.k", "blocks.1.mlp.fc2"])
def test_forward_is_the_dense_weight_delta_on_a_frozen_view(site: str, rank: int) -> None:
    model = make_vit(0)
    restune.tune(model, RLRRConfig(sites=[site], rank=rank))
    tuner = tuners(model)[f"{site}.rlrr"]
    randomize_(list(tuner.named_parameters()), seed=5, std=0.4)
    frozen = find_sites(model)[site]
    assert set(tuner.state_dict()) == {"scale_col", "scale_line", "shift_bias"}  # nothing of the frozen linear
    assert tuner.frozen_weight.data_ptr() == frozen.weight.data_ptr()
    assert tuner.scale_col.shape == (rank, frozen.in_features) and tuner.scale_line.shape == (frozen.out_features, rank)
    x = randn_like(torch.empty(2, 5, frozen.in_features), 9)
    dense = x @ (frozen.weight * (tuner.scale_line @ tuner.scale_col)).t() + tuner.shift_bias
    torch.testing.assert_close(tuner(x), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tuner.delta_weight(), frozen.weight * (tuner.scale_line @ tuner.scale_col))
    assert tuner.delta_bias() is tuner.shift_bias


def test_default_init_is_the_official_kaiming_init() -> None:
    torch.manual_seed(0)
    spec = rlrr_spec()
    assert spec.tuners[1].init_std == 0.02  # SSF γ ~ N(1, 0.02²), β ~ N(0, 0.02²)
    linear = nn.Linear(768, 3072)
    site = find_sites(nn.ModuleDict({"fc1": linear}))["fc1"]
    tuner = RLRRLinear(spec.tuners[0], site)
    bound_in, bound_out = math.sqrt(6 / 768), math.sqrt(6)
    assert tuner.scale_col.abs().max() <= bound_in and tuner.scale_col.abs().max() > 0.95 * bound_in
    assert tuner.scale_line.abs().max() <= bound_out and tuner.scale_line.abs().max() > 0.95 * bound_out
    assert not tuner.shift_bias.any()
    assert abs(float(tuner.scale_line.detach().mean())) < 0.2  # centred: U(-√6, √6) over 3072 draws


def test_zero_init_starts_at_the_pretrained_model_and_still_learns() -> None:
    model = tuned_vit(rlrr_spec(init="zero"))
    images = make_images()
    with restune.disabled(model), torch.no_grad():
        pretrained = model(images)
    logits = model(images)
    torch.testing.assert_close(logits, pretrained, atol=1e-6, rtol=0.0)
    (logits * randn_like(logits, 3)).sum().backward()
    for key, tuner in tuners(model).items():
        if isinstance(tuner, RLRRLinear):
            assert not tuner.scale_line.detach().any() and tuner.scale_col.detach().any()
            assert tuner.scale_line.grad.abs().max() > 0, key


def test_default_init_is_not_the_identity() -> None:
    model = tuned_vit()
    images = make_images()
    with restune.disabled(model), torch.no_grad():
        pretrained = model(images)
    with torch.no_grad():
        assert (model(images) - pretrained).abs().max() > 1e-3


def test_key_shift_gradient_is_zero_by_construction() -> None:
    model = tuned_vit()
    randomize_(list(model.restune.sets["default"].tuners.named_parameters()), seed=1, std=0.3)
    logits = model(make_images())
    (logits * randn_like(logits, 4)).sum().backward()
    for key, tuner in tuners(model).items():
        if key.endswith("attn.k.rlrr"):
            assert tuner.shift_bias.grad.abs().max() < 1e-5
        if key.endswith("attn.q.rlrr"):
            assert tuner.shift_bias.grad.abs().max() > 1e-3


def fold_into(plain: nn.Module, model: nn.Module) -> None:
    """Write every tuner of ``model`` into the frozen tensors of ``plain`` (specs/rlrr.md §5)."""
    with torch.no_grad():
        for key, tuner in tuners(model).items():
            site = key.rpartition(".")[0]
            if isinstance(tuner, RLRRLinear):
                name = site[: -len(".q")] + ".qkv" if tuner.rows is not None else site
                linear = plain.get_submodule(name)
                rows = slice(*tuner.rows) if tuner.rows is not None else slice(None)
                linear.weight[rows] += tuner.delta_weight()
                linear.bias[rows] += tuner.delta_bias()
            else:
                assert isinstance(tuner, SSF)
                module = plain.get_submodule(site)
                target = module.proj if site == "patch_embed" else module
                shape = (-1,) + (1,) * (target.weight.dim() - 1)
                target.weight.mul_(tuner.scale.view(shape))
                target.bias.mul_(tuner.scale).add_(tuner.shift)


@pytest.mark.parametrize("options", [{}, {"rank": 2}, {"fused_qkv": True}])
def test_merged_plain_model_gives_the_same_logits(options: dict[str, Any]) -> None:
    model = tuned_vit(rlrr_spec(**options))
    randomize_(list(model.restune.sets["default"].tuners.named_parameters()), seed=2, std=0.3)
    plain = make_vit(0)
    fold_into(plain, model)
    images = make_images()
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model(images), atol=1e-5, rtol=0.0)


def test_adamw_step_changes_only_the_tuners_and_the_head() -> None:
    model = tuned_vit()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    tuner_names = {n for n in before if n.startswith("restune.")}
    assert trainable == tuner_names | {"head.weight", "head.bias"}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    logits = model(make_images())
    (logits * randn_like(logits, 6)).sum().backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= trainable
    # Only the key shifts may stay put: their gradient is (numerically) zero.
    assert {n for n in trainable - changed if not n.endswith("attn.k.rlrr.shift_bias")} == set()


def test_parameter_names_give_the_official_weight_decay_split() -> None:
    """The official rule (no decay where the name holds "bias" or "norm") applied to restune's names gives the
    split of specs/rlrr.md §7 item 4, so a recipe can use the same rule."""
    model = tuned_vit()
    no_decay = {n for n, p in model.named_parameters() if p.requires_grad and ("bias" in n or "norm" in n)}
    decay = {n for n, p in model.named_parameters() if p.requires_grad} - no_decay
    assert all(n.endswith(("shift_bias", ".ssf.scale", ".ssf.shift", "head.bias")) for n in no_decay)
    on_norms = {n for n in decay | no_decay if ".ssf." in n and ".patch_embed." not in n}
    assert {n for n in no_decay if ".ssf." in n} == on_norms and len(on_norms) == 2 * (2 * 2 + 1)
    assert all(n.endswith(("scale_col", "scale_line", "head.weight")) or ".patch_embed.ssf." in n for n in decay)
    assert sum(".patch_embed.ssf." in n for n in decay) == 2
    assert sum(n.endswith("shift_bias") for n in no_decay) == 2 * len(RLRR_SITES)


# ---------------------------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"rank": 0}, "rank"), ({"rank": True}, "rank"), ({"rank": 1.5}, "rank"), ({"init": "normal"}, "init")],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"'{field}'"):
        RLRRConfig(**kwargs)
    with pytest.raises(ValueError, match=f"'{field}'"):
        rlrr_spec(**kwargs)


def test_config_round_trips_and_refuses_non_linear_sites() -> None:
    config = RLRRConfig(rank=2, init="zero", layers=[1])
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.to_dict()["type"] == "rlrr"
    with pytest.raises(SiteMatchError, match="linear"):
        restune.tune(make_vit(0), RLRRConfig(sites=["norm1"]))
    model = restune.tune(make_vit(0), copy.deepcopy(config))
    assert set(tuners(model)) == {f"blocks.1.{s}.rlrr" for s in RLRR_SITES}
