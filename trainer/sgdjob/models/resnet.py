"""The built-in ResNet-style CNN with BatchNorm, sized for 28x28 images on a CPU.

A 3x3 stride-2 stem halves the resolution, then stages of basic residual blocks
(conv-BN-ReLU-conv-BN plus the shortcut; a 1x1 conv-BN shortcut where the shape changes),
each stage after the first halving the resolution again, then global average pooling and a
linear classifier. For Fashion-MNIST with the default channels (16, 32, 64) it has 75k
parameters and 700 non-trainable BatchNorm buffer elements.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: list[int], blocks: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        cin = channels[0]
        for s, cout in enumerate(channels):
            for b in range(blocks):
                layers.append(Block(cin, cout, 2 if s > 0 and b == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def resnet(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: list[int],
    blocks: int,
    **_: Any,
) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(
            f"model.builtin `resnet` needs image inputs (C, H, W); the data gives {input_shape}"
        )
    return ResNet(input_shape[0], num_classes, list(channels), blocks)
