"""The scale s of a Res-Tuner: OP'(u) = OP(u) + s * R(u) (docs/methods/res-tuning.md).

The option names follow swift's ``adapter_weight`` values so configs read the same in both code bases. A fixed scale
is written ``scalar_<v>`` in a config (YAML and JSON stay plain strings); code that already holds the number passes
it as ``Scale("fixed", channels, value=v)`` rather than formatting it into a string to be parsed back.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Scale", "check_scale", "fixed_value", "scale_count", "SCALE_KINDS"]

SCALE_KINDS = ("scale", "scale_channel", "gate", "scalar_<v>", "none")


def fixed_value(kind: str) -> float | None:
    """The number of a ``scalar_<v>`` option (None for any other option or a non-finite number)."""
    if not kind.startswith("scalar_"):
        return None
    try:
        value = float(kind[len("scalar_") :])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check_scale(owner: str, kind: str, init: float | None = None) -> None:
    """Raise a ValueError naming the allowed scale options unless ``kind`` is one of them."""
    if kind not in ("scale", "scale_channel", "gate", "none") and fixed_value(kind) is None:
        raise ValueError(f"{owner}: unknown scale {kind!r}; use one of {', '.join(SCALE_KINDS)} (e.g. 'scalar_0.1')")
    if init is not None and kind not in ("scale", "scale_channel"):
        raise ValueError(f"{owner}: scale_init only applies to the learnable 'scale' and 'scale_channel', not {kind!r}")


class Scale(nn.Module):
    """Multiplies a branch output by s.

    Options and their trainable counts: ``scale`` (one scalar, 1), ``scale_channel`` (one per output channel, C),
    ``gate`` (per sample, the token mean of sigmoid(R w_g + b_g), C + 1; w_g, b_g keep ``nn.Linear``'s default
    initialisation as in swift), ``scalar_<v>`` or ``fixed`` with ``value=v`` (a fixed constant, 0) and ``none``
    (s = 1, 0). After construction ``kind`` is one of ``scale``, ``scale_channel``, ``gate``, ``fixed``, ``none``.
    """

    def __init__(
        self,
        kind: str,
        channels: int,
        init: float | None = None,
        *,
        value: float | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kind == "fixed":
            if value is None or not math.isfinite(value):
                raise ValueError(f"Scale: a fixed scale needs a finite value, got {value!r}")
        else:
            check_scale("Scale", kind, init)
            if kind.startswith("scalar_"):
                kind, value = "fixed", fixed_value(kind)
        self.kind = kind
        self.value = value
        start = 1.0 if init is None else float(init)
        if kind == "scale":
            self.weight = nn.Parameter(torch.full((), start, device=device, dtype=dtype))
        elif kind == "scale_channel":
            self.weight = nn.Parameter(torch.full((channels,), start, device=device, dtype=dtype))
        elif kind == "gate":
            self.gate = nn.Linear(channels, 1, device=device, dtype=dtype)
        elif kind != "none":
            self.register_buffer("weight", torch.tensor(float(value), device=device, dtype=dtype))

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return branch
        if self.kind == "gate":
            gate = torch.sigmoid(self.gate(branch))
            if gate.dim() > 2:
                gate = gate.mean(dim=tuple(range(1, gate.dim() - 1)), keepdim=True)
            return branch * gate
        return branch * self.weight

    @property
    def depends_on_input(self) -> bool:
        """True for the gate, whose s is computed from the branch and averaged over tokens.

        Such a scale neither folds into a weight nor keeps tokens independent of each other.
        """
        return self.kind == "gate"

    @property
    def is_scalar(self) -> bool:
        """True when s is one number for every channel and sample, so it commutes with a linear map."""
        return self.kind not in ("scale_channel", "gate")

    def channel_factor(self) -> torch.Tensor | None:
        """The scale as a tensor broadcastable over output channels (None for s = 1); for folding into a weight."""
        if self.kind == "gate":
            raise TypeError("a 'gate' scale depends on the input and cannot be folded into a weight")
        return None if self.kind == "none" else self.weight

    def extra_repr(self) -> str:
        return f"fixed {self.value!r}" if self.kind == "fixed" else self.kind


def scale_count(kind: str, channels: int) -> int:
    """Trainable parameters of ``Scale(kind, channels)``: the count formulas of the tuners that hold one."""
    if kind == "scale":
        return 1
    if kind == "scale_channel":
        return channels
    if kind == "gate":
        return channels + 1
    return 0
