"""PyTorch peers of the 64x64 (and SVHN) architectures of the 2024-2026 ARD repositories, transcribed from their
published files (module names and forward passes as published, so state_dict keys are theirs):

  DM-Improves-AT (wzekai99/DM-Improves-AT @ b390f25) core/models/ti_wideresnetwithswish.py (`TinyWideResNet`:
      adaptive pooling, Tiny-ImageNet statistics) and core/models/wideresnetwithswish.py (`CifarWideResNet`:
      `avg_pool2d(out, 8)`, the SVHN teacher with SVHN statistics); blocks identical in both files (lines 25-96).
  SAAD (HongsinLee/saad @ 295121c) cifar100_models/preresnet.py `pResNet18`.
  DGAD (kunsaram01/DGAD @ a0329c8) networks/preresnet.py `PreActResNet18`.
  PeerAiD (jaewonalive/PeerAiD @ cd12e92) models/resnet.py `ResNet18` and models/wide_resnet.py `WideResNet`,
      whose pooling depends on the data set's name.

`published_checkpoint` writes a model the way DM-Improves-AT's trainer saves it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# ti_wideresnetwithswish.py:12-19.
TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2302, 0.2265, 0.2262)
SVHN_MEAN = (0.5, 0.5, 0.5)
SVHN_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- DM-Improves-AT


class _DMBlock(nn.Module):
    """`_Block` (lines 27-71): pre-activation, hand padding before a padding-0 first conv, 1x1 shortcut of
    act(bn(x))."""

    def __init__(self, cin, cout, stride, act):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(cin, momentum=0.01)
        self.relu_0 = act(inplace=True)
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout, momentum=0.01)
        self.relu_1 = act(inplace=True)
        self.conv_1 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False) if self.has_shortcut else None
        self._stride = stride

    def forward(self, x):
        if self.has_shortcut:
            x = self.relu_0(self.batchnorm_0(x))
            v = x
        else:
            v = self.relu_0(self.batchnorm_0(x))
        v = F.pad(v, (1, 1, 1, 1) if self._stride == 1 else (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
        return (self.shortcut(x) if self.has_shortcut else x) + out


class _DMBlockGroup(nn.Module):
    """`_BlockGroup` (lines 74-96): `block` Sequential, the first block changing width and stride."""

    def __init__(self, num_blocks, cin, cout, stride, act):
        super().__init__()
        self.block = nn.Sequential(*[_DMBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, act)
                                     for i in range(num_blocks)])

    def forward(self, x):
        return self.block(x)


class _DMWideResNet(nn.Module):
    """`WideResNet` (lines 99-171): in-model (x - mean) / std (plain tensors, not state), init_conv, three groups,
    BN-act, pool, `logits`; subclasses pool as their file does."""

    def __init__(self, num_classes=10, depth=28, width=10, activation_fn=nn.SiLU, mean=TINY_MEAN, std=TINY_STD,
                 padding=0):
        super().__init__()
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.padding = padding
        channels = [16, 16 * width, 32 * width, 64 * width]
        assert (depth - 4) % 6 == 0
        n = (depth - 4) // 6
        self.init_conv = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(*[_DMBlockGroup(n, channels[i], channels[i + 1], 1 if i == 0 else 2, activation_fn)
                                     for i in range(3)])
        self.batchnorm = nn.BatchNorm2d(channels[3], momentum=0.01)
        self.relu = activation_fn(inplace=True)
        self.logits = nn.Linear(channels[3], num_classes)
        self.num_channels = channels[3]
        for m in self.modules():  # lines 145-153
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def pool(self, out):
        raise NotImplementedError

    def forward(self, x):
        if self.padding > 0:
            x = F.pad(x, (self.padding,) * 4)
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        out = self.pool(self.relu(self.batchnorm(out)))
        return self.logits(out.view(-1, self.num_channels))


class TinyWideResNet(_DMWideResNet):
    """ti_wideresnetwithswish.py: `AdaptiveAvgPool2d((1, 1))` (lines 143, 169), Tiny-ImageNet statistics (117-118)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def pool(self, out):
        return self.avgpool(out)


class CifarWideResNet(_DMWideResNet):
    """wideresnetwithswish.py: `F.avg_pool2d(out, 8)` (line 166); the SVHN teacher passes SVHN statistics (194-196)."""

    def pool(self, out):
        return F.avg_pool2d(out, 8)


def published_checkpoint(net, path):
    """Saves `net` as DM-Improves-AT's trainer does: `DataParallel(Sequential(net))` (core/models/__init__.py:57-62)
    under `model_state_dict`, the unaveraged model beside it (watrain.py:197-204; zeros here: never to be read)."""
    state = nn.DataParallel(nn.Sequential(net)).state_dict()
    torch.save({"model_state_dict": state,
                "unaveraged_model_state_dict": {k: torch.zeros_like(v) for k, v in state.items()}}, path)
    return path


# ---------------------------------------------------------------- SAAD and DGAD PreAct-ResNet-18


class _PreActBlock(nn.Module):
    """`PreActBlock` of both files (SAAD preresnet.py:8-30, DGAD preresnet.py:14-36): the shortcut conv reads
    relu(bn1(x)), the identity shortcut reads x."""

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class _PreActResNet18(nn.Module):
    """The shared trunk: conv1, four stages of two blocks (64-512 channels, strides 1, 2, 2, 2). `base_width` scales
    the channels (64 as published; smaller for the CPU-sized benchmark and tests, as `PreActResNet.base_width`)."""

    def __init__(self, base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 3, stride=1, padding=1, bias=False)
        cin = base_width
        for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), 1):
            planes = mult * base_width
            setattr(self, f"layer{i}", nn.Sequential(_PreActBlock(cin, planes, stride), _PreActBlock(planes, planes)))
            cin = planes

    def trunk(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))


class SaadPreActResNet18(_PreActResNet18):
    """SAAD `pResNet18`: BN `bn` + ReLU (lines 70, 88), adaptive average pooling (71, 89), Linear(512, classes) (72)."""

    def __init__(self, num_classes=10, base_width=64):
        super().__init__(base_width)
        self.bn = nn.BatchNorm2d(8 * base_width)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(8 * base_width, num_classes)

    def forward(self, x):
        out = self.avgpool(F.relu(self.bn(self.trunk(x))))
        return self.linear(out.view(out.size(0), -1))


class DgadPreActResNet18(_PreActResNet18):
    """DGAD `PreActResNet18`: no final BN, `F.avg_pool2d(out, 4)` flattened (lines 93-94) into Linear(2048, classes)
    (line 77; 200 classes by default, line 68)."""

    def __init__(self, num_classes=200):
        super().__init__()
        self.linear = nn.Linear(512 * 4, num_classes)

    def forward(self, x):
        out = F.avg_pool2d(self.trunk(x), 4)
        return self.linear(out.view(out.size(0), -1))


# ---------------------------------------------------------------- PeerAiD


class _BasicBlock(nn.Module):
    """PeerAiD models/resnet.py:5-27: post-activation block, conv1x1+BN shortcut when the shape changes."""

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class PeerAiDResNet18(nn.Module):
    """PeerAiD `ResNet18(num_classes, dataset)` (models/resnet.py:88-124, 250-251): `avg_pool2d(out, 4)` when the
    data set's name contains 'cifar', else `AdaptiveAvgPool2d((1, 1))` (lines 117-120)."""

    def __init__(self, num_classes, dataset):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            setattr(self, f"layer{i}", nn.Sequential(_BasicBlock(cin, planes, stride), _BasicBlock(planes, planes)))
            cin = planes
        self.linear = nn.Linear(512, num_classes)
        self.dataset = dataset

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4) if "cifar" in self.dataset else nn.AdaptiveAvgPool2d((1, 1))(out)
        return self.linear(out.view(out.size(0), -1))


class _WideBlock(nn.Module):
    """PeerAiD models/wide_resnet.py:7-32 (TRADES's block): without `equalInOut`, x becomes relu(bn1(x)) and a 1x1
    `convShortcut` reads it."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        if self.equal:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
            out = x
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return (x if self.equal else self.convShortcut(x)) + out


class _NetworkBlock(nn.Module):
    """PeerAiD models/wide_resnet.py:35-47: `layer` Sequential of blocks."""

    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class PeerAiDWideResNet(nn.Module):
    """PeerAiD `WideResNet(dataset, depth, num_classes, widen_factor)` (models/wide_resnet.py:50-100):
    `avg_pool2d(out, 8)` for 'cifar' data sets, else `AdaptiveAvgPool2d((1, 1))` (lines 94-97)."""

    def __init__(self, dataset, depth=28, num_classes=10, widen_factor=10):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = _NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = _NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        self.dataset = dataset

    def forward(self, x):
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        out = F.avg_pool2d(out, 8) if "cifar" in self.dataset else nn.AdaptiveAvgPool2d((1, 1))(out)
        return self.fc(out.view(-1, self.nChannels))
