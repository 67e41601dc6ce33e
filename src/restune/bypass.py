"""Res-Tuning-Bypass (arXiv 2310.19859 §3.3; docs/methods/res-tuning.md): tuners that read detached features.

A chain of Res-Tuners runs beside the frozen backbone: b_0 = sg(x_0), b_l = RA_lat,l(sg(x_l)) + RA_ver,l(b_(l-1)),
and b_L replaces the input of the backbone's frozen final norm before the Bypass's own head. The default is the
official swift code's numerics (plain sum of two swift Res-Adapters with identity shortcuts, r = 32). Because no
gradient can enter the backbone, it runs once under ``no_grad``; and because every default bypass operation is per
token while the head reads the class token, only the class token's path can reach the loss: the default computes
the chain for that token alone, which is exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from restune.backbones import block_features, feature_keys
from restune.contract import Tuner, config_from_dict, get_tuner, presets, register_preset, register_spec_kind
from restune.layers.activations import make_activation
from restune.layers.scale import check_scale
from restune.sites import BLOCK, LINEAR, Site
from restune.spec import resolve
from restune.tuners.adapter import SwiftResAdapter

__all__ = ["BypassConfig", "Bypass", "BypassStep", "MultiTask", "bypass_presets", "resolve_bypass_config", "BYPASS"]

BYPASS = "bypass"
SWIFT_ADAPTER = "res_adapter"
ZERO = "zero"
MIXING = ("sum", "fixed", "learnable")


@dataclass
class BypassConfig:
    """Res-Tuning-Bypass options (spec kind ``bypass``); the defaults are swift's (the ``res_tuning_bypass`` preset).

    Attributes:
        lateral: the tuner reading the backbone feature x_l: ``res_adapter`` (swift's Res-Adapter with identity
            shortcut), ``zero`` (contributes 0), or a dict for any registered parallel tuner, e.g.
            ``{"type": "res_attn", "r": 16}``, used as z + R(z).
        vertical: the tuner carrying the bypass state b_(l-1); same choices.
        bottleneck: swift Res-Adapter width r, one int or one per bypass step.
        activation: swift Res-Adapter nonlinearity.
        scale: scale option inside the swift Res-Adapters (multiplies the branch before the identity is added).
        zero_init_last: zero W2 and c2 of both tuners of the last step (swift's option).
        mixing: ``sum`` (swift), ``fixed`` (lambda * lateral + (1 - lambda) * vertical) or ``learnable`` (lambda_l =
            sigmoid(theta_l), theta_l = 0 at start: one parameter per step).
        lam: lambda for ``fixed`` mixing.
        blocks: which blocks feed the bypass (block indices; default all). The chain has one step per block.
        prune_tokens: compute the chain for the class token only; None decides automatically (exact whenever the
            head reads token 0 and no bypass tuner mixes tokens).
        recompute: with all tokens, keep only the features and recompute each step's internals during backward.
        chunk_size: stream the batch through the frozen backbone in chunks of this many images (None: whole batch).
            Without a graph to keep, the backbone's peak memory is one chunk's activations: at batch 32 on ViT-B,
            16 takes the step's peak from 0.20x to 0.17x of a peft LoRA step's at about the same speed.
    """

    kind: ClassVar[str] = BYPASS
    lateral: str | dict[str, Any] = SWIFT_ADAPTER
    vertical: str | dict[str, Any] = SWIFT_ADAPTER
    bottleneck: int | list[int] = 32
    activation: str = "gelu"
    scale: str = "none"
    zero_init_last: bool = False
    mixing: str = "sum"
    lam: float = 0.5
    blocks: list[int] | None = None
    prune_tokens: bool | None = None
    recompute: bool = True
    chunk_size: int | None = 16
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for side in ("lateral", "vertical"):
            value = getattr(self, side)
            if value is None:
                raise ValueError(f"bypass: '{side}' is None; use 'res_adapter', 'zero' or a tuner dict with a 'type'")
            if isinstance(value, dict):
                config_from_dict({**value, "sites": value.get("sites", "bypass")})
            elif value not in (SWIFT_ADAPTER, ZERO):
                raise ValueError(f"bypass: '{side}' must be 'res_adapter', 'zero' or a tuner dict, got {value!r}")
        if self.lateral == ZERO and self.vertical == ZERO:
            raise ValueError("bypass: lateral and vertical are both 'zero'; nothing would reach the head")
        widths = [self.bottleneck] if isinstance(self.bottleneck, int) else list(self.bottleneck)
        if not widths or not all(isinstance(r, int) and r > 0 for r in widths):
            raise ValueError(f"bypass: 'bottleneck' must be a positive int or a list of them, got {self.bottleneck!r}")
        make_activation("bypass", self.activation)
        check_scale("bypass", self.scale)
        if self.mixing not in MIXING:
            raise ValueError(f"bypass: 'mixing' must be one of {MIXING}, got {self.mixing!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"bypass: 'lam' must be in [0, 1], got {self.lam!r}")
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ValueError(f"bypass: 'chunk_size' must be positive, got {self.chunk_size!r}")

    def describe(self) -> str:
        """One line for tables: the lateral and vertical tuner types."""
        lateral, vertical = (s if isinstance(s, str) else s["type"] for s in (self.lateral, self.vertical))
        return f"bypass: lateral {lateral}, vertical {vertical}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, readable back by ``restune.spec.resolve`` (and ``from_dict``)."""
        return {"kind": self.kind, "format_version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BypassConfig:
        """A config from ``to_dict`` output or a hand-written mapping (``type: bypass`` is read as the kind)."""
        data = {k: v for k, v in data.items() if k not in ("kind", "type", "format_version")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"bypass: unknown option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


register_spec_kind(BypassConfig)


def bypass_presets() -> dict[str, BypassConfig]:
    """Named bypass configurations (the ``bypass`` kind of the one preset registry), name -> fresh config."""
    return {name: resolve(name) for name in presets(kind=BYPASS)}


def resolve_bypass_config(spec: str | dict[str, Any] | BypassConfig) -> BypassConfig:
    """A BypassConfig from a preset name, a dict (``BypassConfig.to_dict`` output included) or a config."""
    return resolve(spec, kind=BYPASS)


# ``res_tuning_bypass`` is swift's chain of per-token Res-Adapters. With a class-token head that chain only ever sees
# the class token of each block, so it can re-weigh what the backbone already gathered there but cannot look at the
# patches again. ``res_tuning_bypass_attn`` keeps the vertical Res-Adapters and makes the lateral tuner a Res-Attn
# (r = 16, 4 heads, the ``res_attn`` preset's tuner) that reads every token of the detached feature and answers for
# the class token: the paper's formulation with a token-mixing horizontal Res-Tuner, at the same budget
# (L * (4*D*16 + 1 + 2*D*32 + 32 + D) = 1,189,260 on ViT-B/16 against 1,198,848).
register_preset("res_tuning_bypass", BypassConfig)
register_preset("res_tuning_bypass_attn", lambda: BypassConfig(lateral={"type": "res_attn", "r": 16, "heads": 4}))


class _Residual(nn.Module):
    """z + R(z) for a registered parallel tuner R, so any Res-Tuner can be a bypass tuner.

    R's declared capabilities decide what runs: ``input_transform`` first (no host here to apply it), and with
    ``first_tokens`` a token-mixing R must ``answers_first_tokens`` (Res-Attn: all tokens as keys, the first as
    queries) while a per-token R simply reads the first tokens.
    """

    def __init__(self, tuner: Tuner) -> None:
        super().__init__()
        self.tuner = tuner

    @property
    def mixes_tokens(self) -> bool:
        return self.tuner.mixes_tokens

    @property
    def answers_first_tokens(self) -> bool:
        """Whether R can give its output for the first tokens only while reading all of them (Res-Attn)."""
        return self.tuner.answers_first_tokens

    def forward(self, z: torch.Tensor, first_tokens: int | None = None) -> torch.Tensor:
        transform = self.tuner.input_transform
        read = z if transform is None else transform(z)
        if first_tokens is None:
            return z + self.tuner(read)
        if self.tuner.mixes_tokens:
            return z[:, :first_tokens] + self.tuner(read, first_tokens=first_tokens)
        return z[:, :first_tokens] + self.tuner(read[:, :first_tokens])


def _make_tuner(choice: str | dict[str, Any], config: BypassConfig, width: int, last: bool, anchor: nn.Module) -> Any:
    if choice == ZERO:
        return None
    if choice == SWIFT_ADAPTER:
        param = next(anchor.parameters())
        return SwiftResAdapter(
            anchor_dim(anchor),
            width,
            activation=config.activation,
            scale=config.scale,
            zero_init_last=config.zero_init_last and last,
            device=param.device,
            dtype=param.dtype,
        )
    tuner_config = config_from_dict({**choice, "sites": choice.get("sites", "bypass")})
    module_cls = get_tuner(tuner_config.type).module_cls
    kinds = module_cls.site_kinds
    if BLOCK not in kinds and LINEAR not in kinds:
        raise ValueError(f"bypass: tuner {tuner_config.type!r} binds to {sorted(kinds)} sites, not to a token sequence")
    kind = BLOCK if BLOCK in kinds else LINEAR
    dim = anchor_dim(anchor)
    host = anchor.attn.proj if kind == LINEAR else anchor
    site = Site(name="bypass", kind=kind, module=host, in_features=dim, out_features=dim)
    return _Residual(module_cls(tuner_config, site))


def anchor_dim(block: nn.Module) -> int:
    """Token width of a timm block (the bypass state has the same width)."""
    return block.attn.qkv.in_features


def _mixes_tokens(module: SwiftResAdapter | _Residual | None) -> bool:
    return module is not None and module.mixes_tokens


def _answers_first_tokens(module: nn.Module | None) -> bool:
    if not _mixes_tokens(module):
        return True
    return isinstance(module, _Residual) and module.answers_first_tokens


class BypassStep(nn.Module):
    """One bypass step: b_l = mix(RA_lat(x_l), RA_ver(b_(l-1)))."""

    def __init__(self, lateral: nn.Module | None, vertical: nn.Module | None, mixing: str, lam: float) -> None:
        super().__init__()
        self.lateral = lateral
        self.vertical = vertical
        self.mixing = mixing
        if mixing == "learnable":
            self.theta = nn.Parameter(torch.zeros(()))
        elif mixing == "fixed":
            self.register_buffer("lam", torch.tensor(lam))

    def forward(self, feature: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        lateral = None
        if self.lateral is not None and feature.shape[1] > state.shape[1]:  # the state carries the class token only
            tokens = state.shape[1]
            if isinstance(self.lateral, _Residual):
                lateral = self.lateral(feature, first_tokens=tokens)
            else:
                lateral = self.lateral(feature[:, :tokens])
        elif self.lateral is not None:
            lateral = self.lateral(feature)
        vertical = self.vertical(state) if self.vertical is not None else None
        if self.mixing == "sum" or lateral is None or vertical is None:
            if lateral is None:
                return vertical
            return lateral if vertical is None else lateral + vertical
        lam = torch.sigmoid(self.theta) if self.mixing == "learnable" else self.lam
        return lam * lateral + (1 - lam) * vertical

    @property
    def mixes_tokens(self) -> bool:
        return _mixes_tokens(self.lateral) or _mixes_tokens(self.vertical)


def _drop_backbone_keys(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "backbone.")]:
        del state[key]


def _ignore_missing_backbone(module: nn.Module, incompatible: Any) -> None:
    kept = [k for k in incompatible.missing_keys if ".backbone." not in f".{k}" and not k.startswith("backbone.")]
    incompatible.missing_keys[:] = kept


class Bypass(nn.Module):
    """A frozen timm ViT with a Res-Tuning-Bypass and a new head; gradients never enter the backbone.

    The backbone is frozen here (final norm included), kept in eval mode whatever ``train()`` is called with, shared
    by reference (several Bypasses and a ``MultiTask`` can hold one backbone), and never saved: ``state_dict()``
    holds the bypass and the head only. Count of the default preset: 2 * L * (2*D*r + r + D) = 1,198,848 on
    ViT-B/16 (+ L with learnable lambda), plus the head.

    Args:
        backbone: a timm VisionTransformer (pretrained weights already loaded).
        spec: a bypass preset name, a dict or a ``BypassConfig``.
        num_classes: classes of the new head.
    """

    def __init__(
        self, backbone: nn.Module, spec: str | dict[str, Any] | BypassConfig = "res_tuning_bypass", *, num_classes: int
    ) -> None:
        super().__init__()
        if not hasattr(backbone, "blocks") or not hasattr(backbone, "norm"):
            raise ValueError(f"Bypass needs a timm VisionTransformer-like backbone, got {type(backbone).__name__}")
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"Bypass: num_classes must be a positive int, got {num_classes!r}")
        self.config: BypassConfig = resolve(spec, kind=BYPASS)
        self.backbone = backbone.requires_grad_(False).eval()
        self.keys = feature_keys(backbone, self.config.blocks)
        steps = len(self.keys) - 1
        widths = self.config.bottleneck
        widths = [widths] * steps if isinstance(widths, int) else list(widths)
        if len(widths) != steps:
            raise ValueError(f"bypass: {len(widths)} bottleneck widths given for {steps} bypass steps")
        self.bypass = nn.ModuleList()
        for step, width in enumerate(widths):
            anchor = backbone.blocks[self.keys[step + 1] - 1]
            last = step == steps - 1
            lateral = _make_tuner(self.config.lateral, self.config, width, last, anchor)
            vertical = _make_tuner(self.config.vertical, self.config, width, last, anchor)
            self.bypass.append(BypassStep(lateral, vertical, self.config.mixing, self.config.lam))
        dim = anchor_dim(backbone.blocks[0])
        param = next(backbone.parameters())
        self.head = nn.Linear(dim, num_classes, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.register_state_dict_post_hook(_drop_backbone_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_backbone)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def get_classifier(self) -> nn.Linear:
        """The Bypass's own head (timm's accessor), so ``restune.report`` counts it as the head."""
        return self.head

    @property
    def mixes_tokens(self) -> bool:
        return any(step.mixes_tokens for step in self.bypass)

    @property
    def token_mode(self) -> str:
        """Which tokens the chain needs, decided so that results equal the all-token computation exactly.

        ``class``: every bypass tuner is per token and the head reads the class token, so features and states are
        the class token alone. ``query``: a token-mixing tuner sits only in lateral position, where it reads backbone
        features (constants); the state path stays per token, so the states are the class token alone and the
        lateral tuner reads all tokens of its feature but answers for the class token only. ``all``: otherwise
        (a token-mixing vertical tuner, or pooling that reads other tokens).
        """
        reads_class_token = (
            getattr(self.backbone, "global_pool", None) == "token"
            and getattr(self.backbone, "cls_token", None) is not None
            and getattr(self.backbone, "attn_pool", None) is None
        )
        vertical_mixes = any(_mixes_tokens(step.vertical) for step in self.bypass)
        lateral_mixes = any(_mixes_tokens(step.lateral) for step in self.bypass)
        answers = all(_answers_first_tokens(step.lateral) for step in self.bypass)
        if self.config.prune_tokens is False or not reads_class_token or vertical_mixes or not answers:
            if self.config.prune_tokens:
                raise ValueError(
                    "bypass: prune_tokens=True is not exact here (the head or a vertical bypass tuner reads other "
                    "tokens); leave prune_tokens=None"
                )
            return "all"
        return "query" if lateral_mixes else "class"

    @property
    def prunes_tokens(self) -> bool:
        """Whether the bypass states carry the class token alone (exact: see ``token_mode``)."""
        return self.token_mode != "all"

    def train(self, mode: bool = True) -> Bypass:
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """The detached backbone features this Bypass reads (class token only when it prunes)."""
        self.backbone.eval()
        return block_features(
            self.backbone,
            images,
            self.keys,
            class_token_only=self.token_mode == "class",
            chunk_size=self.config.chunk_size,
        )

    def forward_features(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """b_L from backbone features (live or cached); any extra feature keys are ignored."""
        state = features[0][:, :1] if self.prunes_tokens else features[0]
        lean = self.config.recompute and torch.is_grad_enabled() and state.shape[1] > 1
        for key, step in zip(self.keys[1:], self.bypass, strict=True):
            feature = features[key]
            state = checkpoint(step, feature, state, use_reentrant=False) if lean else step(feature, state)
        return state

    def forward_head(self, state: torch.Tensor) -> torch.Tensor:
        """Logits from b_L: the frozen final norm, the backbone's pooling, then this Bypass's head."""
        return self.head(self.backbone.forward_head(self.backbone.norm(state), pre_logits=True))

    def logits_from_features(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """Logits from backbone features; a class-token Bypass slices all-token features to token 0."""
        if self.token_mode == "class":
            features = {k: v[:, :1] for k, v in features.items()}
        return self.forward_head(self.forward_features(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(self.features(images)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The bypass and head parameters (the backbone is never trained)."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]


class MultiTask(nn.Module):
    """One frozen backbone pass feeding the Bypasses of several tasks (docs/methods/res-tuning.md).

    ``forward(images)`` returns ``{task: logits}``, equal to running each Bypass alone; the backbone's features are
    computed once, with all tokens only if some task needs them. It runs under ``torch.inference_mode()``: train each
    task's Bypass on its own.

    Args:
        backbone: the frozen backbone every task's Bypass was built on (the same object).
        tasks: task name -> Bypass.
    """

    def __init__(self, backbone: nn.Module, tasks: dict[str, Bypass] | None = None) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.tasks = nn.ModuleDict()
        for name, task in (tasks or {}).items():
            self.add(name, task)
        self.register_state_dict_post_hook(_drop_backbone_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_backbone)

    def add(self, name: str, task: Bypass) -> None:
        """Add a task; its Bypass must hold this very backbone (so one pass serves it)."""
        if not isinstance(task, Bypass):
            raise TypeError(f"task {name!r} must be a restune.Bypass, got {type(task).__name__}")
        if task.backbone is not self.backbone:
            raise ValueError(
                f"task {name!r} was built on another backbone object; build it with Bypass(backbone, ...)"
                " on the backbone given to MultiTask"
            )
        if name in self.tasks:
            raise ValueError(f"task {name!r} exists already; remove it first")
        self.tasks[name] = task

    def remove(self, name: str) -> Bypass:
        """Remove a task and return its Bypass."""
        if name not in self.tasks:
            raise KeyError(f"no task {name!r}; tasks: {', '.join(self.tasks) or 'none'}")
        task = self.tasks[name]
        del self.tasks[name]
        return task

    def train(self, mode: bool = True) -> MultiTask:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.tasks:
            raise ValueError("MultiTask has no tasks; add one with .add(name, bypass)")
        tasks = list(self.tasks.items())
        keys = sorted({key for _, task in tasks for key in task.keys})
        class_token_only = all(task.token_mode == "class" for _, task in tasks)
        chunk = min((t.config.chunk_size for _, t in tasks if t.config.chunk_size), default=None)
        with torch.inference_mode():
            self.backbone.eval()
            features = block_features(self.backbone, images, keys, class_token_only=class_token_only, chunk_size=chunk)
            return {name: task.logits_from_features(features) for name, task in tasks}
