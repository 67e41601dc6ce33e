"""The ``restune_vit_tiny`` timm model: a small 32x32 ViT with weights shipped inside the package.

Importing this module registers the model with timm, so ``timm.create_model("restune_vit_tiny", pretrained=True)``
reads ``restune/weights/restune_vit_tiny.safetensors`` (a local ``file=`` source: timm never goes to the network for
it) and ``pretrained=False`` gives a random initialisation of the same architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = [
    "ARCH",
    "MODEL_NAME",
    "FRACTAL_CLASSES",
    "TEXTURE_CLASSES",
    "PRETRAIN_CLASSES",
    "WEIGHTS",
    "build",
    "restune_vit_tiny",
]

MODEL_NAME = "restune_vit_tiny"
WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / f"{MODEL_NAME}.safetensors"
FRACTAL_CLASSES = 64
TEXTURE_CLASSES = 64
PRETRAIN_CLASSES = FRACTAL_CLASSES + TEXTURE_CLASSES  # one head: the fractal logits, then the texture logits
ARCH: dict[str, Any] = dict(
    img_size=32,
    patch_size=4,
    embed_dim=128,
    depth=5,
    num_heads=4,
    mlp_ratio=4.0,
    class_token=True,
    global_pool="token",
)

default_cfgs = generate_default_cfgs(
    {
        f"{MODEL_NAME}.fractal_texture": dict(
            file=str(WEIGHTS),
            num_classes=PRETRAIN_CLASSES,
            input_size=(3, 32, 32),
            pool_size=None,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
            crop_pct=1.0,
            crop_mode="center",
            first_conv="patch_embed.proj",
            classifier="head",
            license="apache-2.0",
        )
    }
)


def build(**kwargs: Any) -> VisionTransformer:
    """A randomly initialised ``VisionTransformer`` with ``ARCH``, any entry overridable (tests use smaller ones)."""
    args = {**ARCH, "num_classes": PRETRAIN_CLASSES, **kwargs}
    return VisionTransformer(**args)


@register_model
def restune_vit_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT, 32x32 input, 4x4 patches, pretrained on procedural fractals over textures (``restune_vit_tiny.md``)."""
    args = {**ARCH, **kwargs}
    return build_model_with_cfg(
        VisionTransformer,
        MODEL_NAME,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **args,
    )
