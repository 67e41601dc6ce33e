"""The main job until the shipped pretrained backbone arrives: a few tuning steps on synthetic images.

This is a placeholder: the backbone is a small *randomly initialised* timm ViT, so it shows the mechanics (which
tensors train, how many there are, that the loss falls) but not transfer from pretraining.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

import restune

__all__ = ["DemoResult", "run_demo", "format_results", "DEFAULT_PRESETS"]

DEFAULT_PRESETS = ("res_tuning", "res_adapter", "res_prefix", "res_prompt", "res_lora", "res_attn", "lora")


@dataclass
class DemoResult:
    """One preset's outcome."""

    preset: str
    trainable: int
    trainable_without_head: int
    share: float
    first_loss: float
    last_loss: float
    seconds: float


def _tiny_vit(num_classes: int) -> VisionTransformer:
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2, num_classes=num_classes
    )


def _synthetic_batches(
    steps: int, batch: int, num_classes: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    prototypes = torch.randn(num_classes, 3, 32, 32, generator=generator)
    batches = []
    for _ in range(steps):
        labels = torch.randint(num_classes, (batch,), generator=generator)
        images = prototypes[labels] + 0.5 * torch.randn(batch, 3, 32, 32, generator=generator)
        batches.append((images, labels))
    return batches


def run_demo(
    presets: tuple[str, ...] = DEFAULT_PRESETS, steps: int = 30, batch: int = 32, lr: float = 3e-3, seed: int = 0
) -> list[DemoResult]:
    """Tune each preset for ``steps`` AdamW steps from the same random backbone on the same synthetic batches."""
    num_classes = 10
    generator = torch.Generator().manual_seed(seed)
    batches = _synthetic_batches(steps, batch, num_classes, generator)
    torch.manual_seed(seed)
    backbone_state = _tiny_vit(num_classes).state_dict()
    results = []
    for preset in tqdm(presets, desc="presets", unit="preset"):
        torch.manual_seed(seed)
        model = _tiny_vit(num_classes)
        model.load_state_dict(backbone_state)
        restune.tune(model, preset)
        counts = restune.report(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
        losses = []
        start = time.perf_counter()
        model.train()
        for images, labels in tqdm(batches, desc=preset, unit="step", leave=False):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        results.append(
            DemoResult(
                preset=preset,
                trainable=counts.trainable,
                trainable_without_head=counts.trainable_without_head,
                share=100.0 * counts.trainable / counts.total,
                first_loss=losses[0],
                last_loss=sum(losses[-5:]) / len(losses[-5:]),
                seconds=time.perf_counter() - start,
            )
        )
    return results


def format_results(results: list[DemoResult]) -> str:
    """A Markdown table users can paste."""
    lines = [
        "| preset | trainable | without head | % of model | first loss | last loss (mean of 5) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.preset} | {r.trainable:,} | {r.trainable_without_head:,} | {r.share:.2f}% | "
            f"{r.first_loss:.3f} | {r.last_loss:.3f} |"
        )
    return "\n".join(lines)
