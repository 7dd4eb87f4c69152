"""The original code's networks and initialisation; models take images in [0, 1].

PreActResNet as in the paper's code (and GradAlign's): the 1x1 shortcut convolution takes the raw block input,
there is no BatchNorm-ReLU after the last stage, and the head is avg_pool2d(., 4), flatten, linear, so 64-px
inputs (Tiny ImageNet) leave 2x2x512 = 2048 features. Input normalisation is off by default (the original's
Normalize has mean 0 and std 1); `input_normalization="dataset"` puts the training set's mean/std inside.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
MODELS = ("resnet18", "resnet34", "cnn")
INPUT_NORMALIZATIONS = ("none", "dataset")
HEAD_POOL = 4  # pixels: the original's avg_pool2d kernel after the last stage
STAGE_WIDTHS = (64, 128, 256, 512)


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that can run in fp32 under autocast: its double backward (GradSum, GradAlign) overflows fp16,
    which the original avoided with apex's register_float_function(torch, 'batch_norm')."""

    float32_under_autocast = False

    def forward(self, x):
        if self.float32_under_autocast and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class PreActBlock(nn.Module):
    """Pre-activation basic block; the projection shortcut (when the shape changes) sees the raw input x."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


def stage_output_size(image_size, n_downsamplings=3):
    """Spatial size after the stride-2 stages (3x3 convolutions with padding 1 halve it, rounding up)."""
    for _ in range(n_downsamplings):
        image_size = (image_size + 1) // 2
    return image_size


class PreActResNet(nn.Module):
    def __init__(self, blocks_per_stage, n_classes, in_channels, image_size, normalize=None):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, 1, 1, bias=False)
        in_planes = STAGE_WIDTHS[0]
        for i, (planes, n_blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage, strict=True)):
            strides = [1 if i == 0 else 2] + [1] * (n_blocks - 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*[PreActBlock(in_planes if j == 0 else planes, planes, s)
                                                           for j, s in enumerate(strides)]))
            in_planes = planes
        last = stage_output_size(image_size)
        self.pool = min(HEAD_POOL, last)  # below 25 px the original's kernel of 4 would not fit: pool what is left
        self.linear = nn.Linear(in_planes * (last // self.pool) ** 2, n_classes)

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, self.pool).flatten(1))


class CNN(nn.Module):
    """n_layers 3x3 convolutions (with bias, same padding) each followed by ReLU, then one linear layer."""

    def __init__(self, n_layers, n_filters, n_classes, in_channels, image_size, normalize=None):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        convs = []
        for i in range(n_layers):
            convs += [nn.Conv2d(in_channels if i == 0 else n_filters, n_filters, 3, 1, 1), nn.ReLU()]
        self.features = nn.Sequential(*convs)
        self.linear = nn.Linear(n_filters * image_size * image_size, n_classes)

    def forward(self, x):
        return self.linear(self.features(self.normalize(x)).flatten(1))


def init_weights(module):
    """The original's initialisation: conv N(0, sqrt(2 / (k*k*C_out))), linear N(0, sqrt(2 / fan_in)),
    biases 0, BatchNorm weight 1 and bias 0."""
    if isinstance(module, nn.Conv2d):
        n = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / n))
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / module.in_features))
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build_model(name, n_classes, in_channels, image_size, mean_std=None, n_layers=1, n_filters=16):
    """The named network with the original's initialisation; mean_std=(mean, std) adds input normalisation."""
    normalize = Normalize(*mean_std) if mean_std is not None else None
    if name in RESNET_BLOCKS:
        model = PreActResNet(RESNET_BLOCKS[name], n_classes, in_channels, image_size, normalize)
    elif name == "cnn":
        model = CNN(n_layers, n_filters, n_classes, in_channels, image_size, normalize)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    model.apply(init_weights)
    return model


def set_float32_batchnorm(model, enabled):
    """Run every BatchNorm of the model in fp32 under autocast (for double backprop), or not."""
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.float32_under_autocast = enabled
