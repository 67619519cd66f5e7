"""Models: the built-in MLP, user entry points, and the flat-buffer view of parameters.

``FlatModel`` rebinds every parameter and its gradient as views into two contiguous float32
vectors, so backward() writes gradients straight into the buffer that goes on the wire and
received parameters are copied once into place: no per-tensor messages, no flatten copies.
"""

from __future__ import annotations

import torch
from torch import nn

from sgdjob.api.types import ModelSpec
from sgdjob.entrypoints import load_entry_point


def mlp(*, input_dim: int, num_classes: int, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_model(spec: ModelSpec, *, input_dim: int, num_classes: int, seed: int) -> nn.Module:
    """The job's model with deterministic initial weights (same on every process)."""
    torch.manual_seed(seed)
    if spec.builtin == "mlp":
        return mlp(input_dim=input_dim, num_classes=num_classes, hidden=list(spec.hidden))
    assert spec.entry_point is not None
    fn = load_entry_point(spec.entry_point, field="spec.model.entryPoint")
    model = fn(input_dim=input_dim, num_classes=num_classes, **spec.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"spec.model.entryPoint must return torch.nn.Module, not {type(model)}")
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class FlatModel:
    """A model whose parameters and gradients live in two flat float32 buffers on ``device``."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model.to(device=device, dtype=torch.float32)
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = sum(p.numel() for p in params)
        self.params = torch.empty(total, dtype=torch.float32, device=device)
        self.grads = torch.zeros(total, dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            n = p.numel()
            self.params[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.params[offset : offset + n].view_as(p)
            p.grad = self.grads[offset : offset + n].view_as(p)
            offset += n
        self.size = total

    def zero_grad(self) -> None:
        self.grads.zero_()
