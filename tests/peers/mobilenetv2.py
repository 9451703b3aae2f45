"""PyTorch peer of `mmard_jax.models.MobileNetV2`: the CIFAR MobileNetV2 used by RSLAD.

Written from the definition in kuangliu/pytorch-cifar `models/mobilenetv2.py` and zibojia/RSLAD
`cifar10_models/mobilenet_v2.py` (same module names, so the same state_dict keys): stride-1 stem,
stride 1 in the second stage, a residual only at stride 1, 4x4 average pool on 32x32 inputs.
Only tests and scripts import this file (`peers.architectures` runs a global-pool copy of it).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# (expansion, out_planes, num_blocks, stride)
CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn(in_planes: int, out_planes: int) -> nn.Sequential:
    """1x1 conv + BN, the projection shortcut (keys `shortcut.0.*`, `shortcut.1.*`)."""
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))


class Block(nn.Module):
    """Inverted residual: expand 1x1, depthwise 3x3, project 1x1."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        planes = expansion * in_planes
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        needs_projection = stride == 1 and in_planes != out_planes
        self.shortcut = _conv_bn(in_planes, out_planes) if needs_projection else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 1:
            out = out + self.shortcut(x)
        return out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (kuangliu/pytorch-cifar, RSLAD)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks, in_planes = [], 32
        for expansion, out_planes, num_blocks, stride in CFG:
            for i in range(num_blocks):
                blocks.append(Block(in_planes, out_planes, expansion, stride if i == 0 else 1))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))
