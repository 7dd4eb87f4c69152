"""Models that take images in [0, 1]: per-channel normalisation is a buffer inside each model."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016): BN-ReLU-conv twice, identity or 1x1 shortcut."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreActResNet for any input size: global average pooling before the classifier."""

    def __init__(self, blocks_per_stage, n_classes, in_channels, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        stages, in_planes = [], 64
        for i, n_blocks in enumerate(blocks_per_stage):
            planes = 64 * 2**i
            for j in range(n_blocks):
                stages.append(PreActBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, n_classes)

    def forward(self, x):
        out = self.layers(self.conv1(self.normalize(x)))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class CNN(nn.Module):
    """n_layers 3x3 convolutions (same padding) with ReLU, then one linear layer."""

    def __init__(self, n_layers, n_filters, n_classes, in_channels, image_size, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        convs = []
        for i in range(n_layers):
            convs += [nn.Conv2d(in_channels if i == 0 else n_filters, n_filters, 3, 1, 1), nn.ReLU()]
        self.features = nn.Sequential(*convs)
        self.linear = nn.Linear(n_filters * image_size * image_size, n_classes)

    def forward(self, x):
        return self.linear(self.features(self.normalize(x)).flatten(1))


RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
MODELS = ("resnet18", "resnet34", "cnn")


def build_model(name, n_classes, in_channels, image_size, mean, std, n_layers=1, n_filters=16):
    if name in RESNET_BLOCKS:
        return PreActResNet(RESNET_BLOCKS[name], n_classes, in_channels, mean, std)
    if name == "cnn":
        return CNN(n_layers, n_filters, n_classes, in_channels, image_size, mean, std)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
