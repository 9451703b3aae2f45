"""A PyTorch peer of torchvision's ImageNet ResNets (torchvision itself is not installed here: its wheel pulls a CUDA
torch), written from pytorch/vision @ f50e776 `torchvision/models/resnet.py`: the same modules, attribute names,
shapes, initialisation and forward, with the factory functions RobustBench's model_zoo/imagenet.py calls
(`resnet18`, `resnet50`, `wide_resnet50_2`; `pretrained` is accepted and must be False: no weights download here).
Dilation, groups and the norm_layer argument are left out (no RobustBench entry sets them)."""

import torch
from torch import nn


def conv3x3(in_planes, out_planes, stride=1):
    """3x3 convolution, padding 1, no bias (resnet.py:24-27)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    """1x1 convolution, no bias (resnet.py:30-32)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """resnet.py:35-72: conv3x3(stride)-BN-ReLU, conv3x3-BN, plus x or downsample(x), ReLU."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64):
        super().__init__()
        if base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """resnet.py:75-115: conv1x1-BN-ReLU to `width`, conv3x3(stride)-BN-ReLU, conv1x1-BN to 4 * planes, plus x or
    downsample(x), ReLU."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """resnet.py:118-210: 7x7 stride-2 stem, BN, ReLU, 3x3 stride-2 max-pool, four stages, adaptive mean pool, fc."""

    def __init__(self, block, layers, num_classes=1000, zero_init_residual=False, width_per_group=64):
        super().__init__()
        self.inplanes = 64
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last_bn is not None:
                    nn.init.constant_(last_bn.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        """resnet.py:171-193: the first block takes the stride and a conv1x1+BN `downsample` if the shape changes."""
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, base_width=self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, base_width=self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(block, layers, pretrained, **kwargs):
    """resnet.py:213-219, without the download."""
    if pretrained:
        raise ValueError("pretrained weights are not available here (nothing downloads in the tests)")
    return ResNet(block, layers, **kwargs)


def resnet18(pretrained=False, progress=True, **kwargs):
    """resnet.py:222-231."""
    return _resnet(BasicBlock, [2, 2, 2, 2], pretrained, **kwargs)


def resnet50(pretrained=False, progress=True, **kwargs):
    """resnet.py:246-255."""
    return _resnet(Bottleneck, [3, 4, 6, 3], pretrained, **kwargs)


def wide_resnet50_2(pretrained=False, progress=True, **kwargs):
    """resnet.py:310-325: ResNet-50 with twice the bottleneck width."""
    kwargs["width_per_group"] = 64 * 2
    return _resnet(Bottleneck, [3, 4, 6, 3], pretrained, **kwargs)
