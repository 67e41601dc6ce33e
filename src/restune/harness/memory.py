"""What one training step keeps for backward, as autograd reports it (``saved_tensors_hooks``).

The number is the sum of the distinct tensors autograd packs during the forward, without the model's own parameters
(they live in memory anyway). It is the activation memory a tuner costs, measured the same way for every method and
independent of allocator and process noise, which is why the demo reports it beside accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["saved_for_backward"]


def saved_for_backward(model: nn.Module, forward: Callable[[], torch.Tensor], labels: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in ``forward()`` plus the cross-entropy loss."""
    parameters = {p.data_ptr() for p in model.parameters()}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.device.type != "meta" and tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key not in seen and tensor.data_ptr() not in parameters:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(forward(), labels)
    if loss.requires_grad:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return total
