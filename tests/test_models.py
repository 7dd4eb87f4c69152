"""The original's networks: parameter shapes and order, initialisation statistics, shortcut and head; BatchNorm's
closed-form and the convolutions' explicit double backward, and their precision under fp16 double backprop."""
import math
import shlex

import pytest
import torch
import torch.nn.functional as F

import attacks
import config
import methods
import models

DEVICES = ["cpu"] + ["cuda"] * torch.cuda.is_available()  # the CUDA kernels are checked where there is a GPU


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


def small_resnet(seed=0, dtype=torch.float32, device="cpu"):
    """One block per stage, an eighth of the widths: fp16 convolutions' backward is slow on a CPU."""
    torch.manual_seed(seed)
    model = models.PreActResNet((1, 1, 1, 1), 10, 3, 8, widths=(8, 16, 32, 64))
    model.apply(models.init_weights)
    return model.to(device, dtype)


def test_fp16_double_backward_is_finite_and_exact_with_fp32_or_closed_form_batchnorm():
    """In fp16, autograd's BatchNorm double backward overflows at GradScaler's scale, so the scaler halves the
    scale step after step and the input gradients underflow (on a GPU the regulariser then read 0 and PGD accuracy
    0 for 13 epochs). BatchNorm in fp32 (what the original's apex registration did) keeps it finite and equal to
    fp32 double backprop; so does the closed-form double backward, whose sums are taken in fp32, with BatchNorm in
    fp16."""
    model = small_resnet()
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,))
    exact = regulariser_parameter_gradient(model, x, y, fp16=False)
    cosine = lambda g: (g @ exact / (g.norm() * exact.norm())).item()  # noqa: E731
    models.configure_batchnorm(model)
    assert not torch.isfinite(regulariser_parameter_gradient(model, x, y, fp16=True)).all()
    for fp32, closed_form in ((True, False), (False, True), (True, True)):
        models.configure_batchnorm(model, float32_under_autocast=fp32, closed_form_double_backward=closed_form)
        fixed = regulariser_parameter_gradient(model, x, y, fp16=True)
        assert torch.isfinite(fixed).all() and cosine(fixed) >= 0.99, (fp32, closed_form)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_closed_form_batchnorm_double_backward_matches_finite_differences(device, channels_last):
    """Gradients and gradients of gradients (with respect to input, weight, bias and the incoming gradient)
    against finite differences, in float64."""
    torch.manual_seed(0)
    kw = {"dtype": torch.float64, "device": device}
    x = torch.randn(4, 3, 5, 5, **kw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(3, **kw) + 0.5, torch.randn(3, **kw)
    running = torch.zeros(3, **kw), torch.ones(3, **kw)
    bn = lambda x, w, b: models._BatchNormTrain.apply(x, w, b, *(r.clone() for r in running), 0.1, 1e-5)  # noqa: E731
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(bn, inputs)
    assert torch.autograd.gradgradcheck(bn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride,kernel,bias", [(1, 3, False), (2, 3, True), (2, 1, False)])
def test_explicit_conv_double_backward_matches_finite_differences(device, channels_last, stride, kernel, bias):
    """Gradients and gradients of gradients of _ConvTrain (input, weight, bias and the incoming gradient) against
    finite differences, in float64: 3x3 and strided 1x1 shortcut geometries, an odd input size."""
    torch.manual_seed(0)
    kw = {"dtype": torch.float64, "device": device}
    x = torch.randn(2, 3, 7, 7, **kw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = tuple(t.requires_grad_() for t in (x, torch.randn(4, 3, kernel, kernel, **kw),
                                                *([torch.randn(4, **kw)] if bias else [])))
    padding = kernel // 2
    conv = lambda x, w, b=None: models._ConvTrain.apply(x, w, b, (stride, stride), (padding, padding))  # noqa: E731
    assert torch.autograd.gradcheck(conv, inputs)
    assert torch.autograd.gradgradcheck(conv, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("penalty", ["gradsum", "gradalign"])
def test_explicit_double_backwards_give_autograds_regulariser_gradients_and_statistics(device, penalty):
    """The regulariser's parameter gradient and BatchNorm's running statistics with BatchNorm's closed form, the
    convolutions' explicit double backward, or both, are autograd's, in float64."""
    x = torch.rand(16, 3, 8, 8, dtype=torch.float64, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    results = []
    for closed_form, explicit in ((False, False), (True, False), (False, True), (True, True)):
        model = small_resnet(dtype=torch.float64, device=device)
        models.configure_batchnorm(model, closed_form_double_backward=closed_form)
        models.configure_conv(model, explicit_double_backward=explicit)
        torch.manual_seed(1)
        if penalty == "gradsum":
            loss = attacks.grad_sum_penalty(model, x, y, 8 / 255)
        else:
            first = attacks.input_grad(model, x, torch.zeros_like(x), y)[0]
            loss = attacks.grad_align_penalty(model, x, y, 8 / 255, first)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        buffers = [b.clone() for b in model.buffers()]
        results.append((torch.cat([g.flatten() for g in grads]), buffers))
    autograd, autograd_buffers = results[0]
    for closed, closed_buffers in results[1:]:
        assert ((closed - autograd).norm() / autograd.norm()).item() < 1e-10
        # running statistics: the same update (CUDA's two batch-norm kernels may round differently)
        assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(autograd_buffers, closed_buffers,
                                                                               strict=True))


@pytest.mark.parametrize("half", [False, True])
def test_explicit_conv_backward_computes_only_the_gradients_asked_for(monkeypatch, half):
    """GradSum's inner backward asks for the input gradient only: no convolution computes a weight gradient there
    (weights are leaves in fp32 and casts under autocast); the training loss's backward and an autograd.grad asking
    for the weights compute them."""
    model = small_resnet()
    models.configure_conv(model, explicit_double_backward=True)
    masks = []
    real = models._conv_backward
    monkeypatch.setattr(models, "_conv_backward", lambda *a: masks.append(a[-1]) or real(*a))
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        delta = torch.zeros_like(x, requires_grad=True)
        loss = F.cross_entropy(model(x + delta), y)
    n_convs = sum(isinstance(m, models.Conv2d) for m in model.modules())
    torch.autograd.grad(loss, delta, create_graph=True)
    assert masks == [[True, False, False]] * n_convs
    masks.clear()
    torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    assert [m[1] for m in masks] == [True] * n_convs
    masks.clear()
    loss.backward()
    assert masks == [[True, True, False]] * n_convs  # delta requires grad, so every input gradient too


@pytest.mark.parametrize("flags", ["--grad_input_sum_coeff=10", "--grad_input_sum_coeff=10 --bn_float32",
                                   "--grad_align_cos_lambda=0.2"])
def test_fp16_regularised_training_keeps_its_loss_scale_and_term(flags):
    """50 fp16 GradSum or GradAlign steps of a small PreActResNet with GradScaler, as train.py builds them
    (BatchNorm in fp32, or in fp16 with the closed-form double backward): the loss scale settles instead of
    collapsing (the bug took it to 2^-9 in 35 steps), the regulariser never reads 0, and the step's parameter
    gradient agrees with fp32's (cosine >= 0.99)."""
    args = config.build_parser().parse_args(shlex.split(f"--attack=fgsm --attack_init=zero --fgsm_alpha=1.0 "
                                                        f"--half_prec --lr_max=0.01 {flags}"))
    args.device = torch.device("cpu")
    model = small_resnet()
    models.configure_double_backward(model, args, methods.uses_double_backprop(args))
    settings = methods.StepSettings.from_flags(args)
    step = methods.TrainingStep(model, settings, args.device)
    scale = 2.0**16
    scaler = step.scaler
    assert scaler.get_scale() == scale
    radii = methods.StepRadii(*(5 * [8 / 255]))
    torch.manual_seed(2)
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,))
    for _ in range(50):
        stats = step(x, y, radii)
        assert stats["gis" if args.grad_input_sum_coeff else "reg"].item() > 0
        assert scaler.get_scale() >= scale / 2**4
    grads = []
    for half in (True, False):
        model.zero_grad()
        torch.manual_seed(3)
        with step.autocast if half else torch.autocast("cpu", enabled=False):
            total = methods.losses(model, x, y, radii, settings, torch.tensor(scale) if half else 1.0)[0]
        (total * (scale if half else 1.0)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double() / (scale if half else 1.0))
    assert (grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm())).item() >= 0.99

