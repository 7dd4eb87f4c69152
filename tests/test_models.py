"""The original's networks: parameter shapes and order, initialisation statistics, shortcut and head, fp32
BatchNorm for double backprop under fp16."""
import math

import pytest
import torch
import torch.nn.functional as F

import attacks
import models


def original_resnet_shapes(blocks, n_classes, n_features):
    """Parameter shapes in registration order, written out from the original's models.py."""
    shapes, in_planes = [(64, 3, 3, 3)], 64
    for stage, n_blocks in enumerate(blocks):
        planes = 64 * 2**stage
        for j in range(n_blocks):
            block_in = in_planes if j == 0 else planes
            shapes += [(block_in,), (block_in,), (planes, block_in, 3, 3), (planes,), (planes,), (planes, planes, 3, 3)]
            if block_in != planes or (stage > 0 and j == 0):
                shapes.append((planes, block_in, 1, 1))
        in_planes = planes
    return shapes + [(n_classes, n_features), (n_classes,)]


@pytest.mark.parametrize("name, blocks, image_size, n_classes, n_features", [
    ("resnet18", (2, 2, 2, 2), 32, 10, 512), ("resnet34", (3, 4, 6, 3), 64, 200, 2048)])
def test_parameter_shapes_and_order_are_the_originals(name, blocks, image_size, n_classes, n_features):
    model = models.build_model(name, n_classes, 3, image_size)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == original_resnet_shapes(blocks, n_classes, n_features)
    if name == "resnet18":
        assert sum(p.numel() for p in model.parameters()) == 11_171_146  # the original's PreActResNet-18
    assert model(torch.rand(2, 3, image_size, image_size)).shape == (2, n_classes)


def test_initialisation_has_the_originals_statistics():
    """conv N(0, sqrt(2 / (k k C_out))), linear N(0, sqrt(2 / fan_in)), zero biases, BatchNorm 1 and 0: each
    weight's sample std within 5 standard errors (the std of a sample std is about sigma / sqrt(2 n))."""
    torch.manual_seed(0)
    model = models.build_model("resnet18", 10, 3, 32)
    cnn = models.build_model("cnn", 10, 3, 32, n_filters=6)
    checked = 0
    for module in list(model.modules()) + list(cnn.modules()):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            fan = (module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                   if isinstance(module, torch.nn.Conv2d) else module.in_features)
            sigma, w = math.sqrt(2 / fan), module.weight.detach()
            assert abs(w.std().item() - sigma) < 5 * sigma / math.sqrt(2 * w.numel())
            assert abs(w.mean().item()) < 5 * sigma / math.sqrt(w.numel())
            assert module.bias is None or module.bias.abs().max() == 0
            checked += 1
        elif isinstance(module, torch.nn.BatchNorm2d):
            assert (module.weight == 1).all() and (module.bias == 0).all()
    assert checked == 21 + 2  # 17 3x3 convolutions, 3 shortcuts, 1 linear; the cnn's convolution and linear


def test_shortcut_takes_the_raw_block_input():
    """With both 3x3 convolutions zeroed a downsampling block returns its shortcut: conv1x1 of x itself."""
    torch.manual_seed(0)
    block = models.PreActBlock(4, 8, stride=2)
    block.apply(models.init_weights)
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv2.weight.zero_()
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(block(x), F.conv2d(x, block.shortcut.weight, stride=2), atol=1e-6)


def test_head_is_average_pooling_of_the_last_stage_then_linear():
    """No BatchNorm-ReLU after stage 4: the logits are linear(avg_pool2d(stage 4 output, 4))."""
    torch.manual_seed(0)
    model = models.build_model("resnet18", 10, 3, 32).eval()
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, out: seen.update(out=out))
    x = torch.rand(3, 3, 32, 32)
    logits = model(x)
    assert (seen["out"] < 0).any()  # the last stage's output is not a ReLU output
    assert torch.allclose(logits, model.linear(F.avg_pool2d(seen["out"], 4).flatten(1)), atol=1e-5)


def test_input_normalization_is_off_by_default_and_optional():
    torch.manual_seed(0)
    plain = models.build_model("cnn", 2, 3, 8, n_filters=2)
    torch.manual_seed(0)
    normalized = models.build_model("cnn", 2, 3, 8, ([0.5] * 3, [0.25] * 3), n_filters=2)
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(normalized(x), plain((x - 0.5) / 0.25), atol=1e-6)


def regulariser_parameter_gradient(model, x, y, fp16, scale=2.0**16):
    """GradSum's parameter gradient as one training step computes it: under fp16 autocast with the loss scale
    GradScaler starts from (2^16), unscaled afterwards; or in fp32."""
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        penalty = attacks.grad_sum_penalty(model, x, y, 8 / 255, torch.tensor(scale) if fp16 else 1.0)
    grads = torch.autograd.grad(penalty * (scale if fp16 else 1.0), list(model.parameters()))
    return torch.cat([g.flatten() for g in grads]).double() / (scale if fp16 else 1.0)


def test_fp32_batchnorm_keeps_the_fp16_double_backward_finite_and_exact():
    """In fp16, BatchNorm's double backward overflows at GradScaler's scale, so the scaler halves the scale
    step after step and the input gradients underflow (on a GPU the regulariser then read 0 and PGD accuracy
    0 for 13 epochs); BatchNorm in fp32 (what the original's apex registration did) keeps it finite and equal
    to fp32 double backprop."""
    torch.manual_seed(0)
    model = models.PreActResNet((1, 1, 1, 1), 10, 3, 8)
    model.apply(models.init_weights)
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,))
    exact = regulariser_parameter_gradient(model, x, y, fp16=False)
    models.set_float32_batchnorm(model, False)
    assert not torch.isfinite(regulariser_parameter_gradient(model, x, y, fp16=True)).all()
    models.set_float32_batchnorm(model, True)
    fixed = regulariser_parameter_gradient(model, x, y, fp16=True)
    assert torch.isfinite(fixed).all()
    assert (fixed @ exact / (fixed.norm() * exact.norm())).item() >= 0.99
