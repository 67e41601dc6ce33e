"""Build any spec on a model: tune it (kind ``tuners``) or put a Res-Tuning-Bypass beside it (kind ``bypass``).

One table maps each spec kind to how it is built, so callers (the harness, the CLI, user code) resolve and build
without branching on which kind they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from restune.bypass import BYPASS, Bypass
from restune.spec import TUNERS, resolve
from restune.tune import tune

__all__ = ["build", "BUILDERS"]


def _build_tuned(model: nn.Module, spec: Any, num_classes: int | None, name: str) -> nn.Module:
    return tune(model, spec, name=name)


def _build_bypass(model: nn.Module, spec: Any, num_classes: int | None, name: str) -> nn.Module:
    if num_classes is None:
        raise ValueError("a bypass spec builds a new head: pass num_classes=...")
    return Bypass(model, spec, num_classes=num_classes)


BUILDERS: dict[str, Callable[[nn.Module, Any, int | None, str], nn.Module]] = {
    TUNERS: _build_tuned,
    BYPASS: _build_bypass,
}


def build(model: nn.Module, spec: Any, *, num_classes: int | None = None, name: str = "default") -> nn.Module:
    """Resolve ``spec`` (any form ``restune.spec.resolve`` takes) and build it on ``model``.

    Args:
        model: the backbone (a timm model; for a bypass, the frozen feature extractor).
        spec: a preset name of either kind, a YAML file, a dict, a config or a spec object.
        num_classes: the new head's classes (bypass specs need it; a tuned model keeps its own head).
        name: the tuner set's name for ``tuners`` specs.

    Returns:
        The tuned model itself, or the new ``Bypass`` holding it.
    """
    resolved = resolve(spec)
    return BUILDERS[resolved.kind](model, resolved, num_classes, name)
