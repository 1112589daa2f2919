"""Convolutional reference models: a small plain CNN and a CIFAR-style ResNet-18 (no torchvision).

Their channel-scaling gauges (docs/gauges.md, "Convolutional networks"):

* :class:`PlainCNN`: conv1's channels (through ReLU and max-pooling, into conv2's columns), the
  BatchNorm channels after conv2 (gain and bias, into conv3's columns), conv3's channels (through
  ReLU, average pooling and flatten, into fc1's blocks of columns), fc1's units (into fc2's
  columns): one isolated pair and a chain of three. conv2 feeds the BatchNorm, which divides its
  channel scales out only up to eps: left out.
* :class:`ResNet18`: per residual block the first BatchNorm's channels (into the second conv), and
  per stage one family tying the residual stream together: the stem's norm (first stage) or the
  shortcut's, and every block's last norm, whose channels every branch of the adds must scale alike;
  its consumers are the next blocks' first convs and shortcut, and finally the classifier's columns.
  Every conv feeds a BatchNorm: left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PlainCNNConfig", "PlainCNN", "ResNet18Config", "ResNet18", "BasicBlock"]


@dataclass(frozen=True)
class PlainCNNConfig:
    in_channels: int = 1
    image_size: int = 8  # square inputs, divisible by 4
    widths: tuple[int, int, int] = (16, 32, 32)
    hidden: int = 64
    num_classes: int = 10


class PlainCNN(nn.Module):
    """conv-ReLU-maxpool, conv-BatchNorm-ReLU, conv-ReLU-avgpool, flatten, Linear-ReLU, Linear."""

    def __init__(self, config: PlainCNNConfig = PlainCNNConfig()):
        super().__init__()
        if config.image_size % 4:
            raise ValueError(f"PlainCNNConfig.image_size must be divisible by 4 (two 2x pools), got {config.image_size}")
        self.config = config
        c1, c2, c3 = config.widths
        self.conv1 = nn.Conv2d(config.in_channels, c1, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.pool3 = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(c3 * (config.image_size // 4) ** 2, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool3(F.relu(self.conv3(x)))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


@dataclass(frozen=True)
class ResNet18Config:
    in_channels: int = 3
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    blocks: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_classes: int = 10


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is the identity, or a
    strided 1x1 conv with a BatchNorm where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (He et al. 2016, as in kuangliu/pytorch-cifar): a 3x3 stem without max
    pooling, four stages of two :class:`BasicBlock` (the first of stages 2-4 strided), global average
    pooling and a Linear classifier. ``widths`` can be narrowed for tests."""

    def __init__(self, config: ResNet18Config = ResNet18Config()):
        super().__init__()
        self.config = config
        w = config.widths
        self.conv1 = nn.Conv2d(config.in_channels, w[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        stages, in_planes = [], w[0]
        for i, (planes, count) in enumerate(zip(w, config.blocks)):
            blocks = []
            for j in range(count):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[-1], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
