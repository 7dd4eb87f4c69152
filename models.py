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
from torch.autograd.function import once_differentiable

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


def _per_channel(t, like):
    """A (C,) tensor shaped to broadcast over `like` (N, C, ...)."""
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _engine_needs(ctx, i):
    """Whether the running backward wants the gradient of the Function's i-th input (a plain .backward() wants
    them all; autograd.grad(loss, x) only those on a path to x). Inputs that are tensors come first
    (next_functions lists tensor inputs only)."""
    if not ctx.needs_input_grad[i]:
        return False
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)  # what register_multi_grad_hook asks
    try:
        return will_execute is None or will_execute(ctx.next_functions[i][0])
    except RuntimeError:  # raised for a leaf that autograd.grad was asked for: wanted
        return True


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm (running statistics updated in place) whose backward is _BatchNormBackward, so a
    double backprop goes through that function's closed form instead of autograd's generic one."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                          momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = _BatchNormBackward.apply(grad_y, x, weight, mean, invstd, ctx.eps)
        return grad_x, grad_w, grad_b, None, None, None, None


class _BatchNormBackward(torch.autograd.Function):
    """(grad_x, grad_weight, grad_bias) of training-mode batch norm; its own backward is the closed form below."""

    @staticmethod
    def forward(ctx, grad_y, x, weight, mean, invstd, eps):
        grads = torch.ops.aten.native_batch_norm_backward(grad_y, x, weight, None, None, mean, invstd, True, eps,
                                                          [True, True, True])
        ctx.save_for_backward(grad_y, x, weight, mean, invstd, grads[1], grads[2])
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return grads

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x, gg_w, gg_b):
        grad_y, x, weight, mean, invstd, grad_w, grad_b = ctx.saved_tensors
        if gg_x is None:
            gg_x = torch.zeros_like(x)
        return (*batchnorm_double_backward(gg_x, gg_w, gg_b, grad_y, x, weight, mean, invstd, grad_w, grad_b,
                                           ctx.eps), None, None, None)


def batchnorm_double_backward(a, a_w, a_b, gy, x, w, mean, invstd, gw, gb, eps=1e-5):
    """Gradients with respect to (grad_y, x, weight) of L = <a, grad_x> + <a_w, grad_w> + <a_b, grad_b>, where
    (grad_x, grad_w, grad_b) is training-mode batch norm's backward of grad_y at x, in closed form.

    With h = (x - mean) * invstd, r = invstd, and per-channel means over the M points of each channel written
    <.> (grad_b = M <gy>, grad_w = M <gy h>):
      grad_x = w r (gy - <gy> - h <gy h>).
    grad_y enters linearly, so its gradient is batch norm's own backward of a (plus the a_w, a_b terms). With
    e = <a gy> - <a><gy> - <a h><gy h>,
      dL/dweight = M r e,   dL/dx = k_0 - k_h h - k_a a - k_gy gy,
    k_h = w r^2 (e - 2 <a h><gy h>), k_0 = w r^2 (<a><gy h> + <a h><gy>), k_a = w r^2 <gy h>, k_gy = w r^2 <a h>.
    Sums and per-point arithmetic in fp32 at least, read from the half tensors directly (in fp16 the sums overflow
    at a loss scale); the passes over the activations: two of PyTorch's batch-norm backward kernels and four
    elementwise ones (the last the cast back to x's dtype). The per-channel arithmetic is stacked into few
    operators (22 operators in all, in fp32): each launch costs more host time than its arithmetic on C numbers."""
    acc = torch.promote_types(x.dtype, torch.float32)
    m = x.numel() / x.shape[1]
    ch = lambda t: _per_channel(t, x)  # noqa: E731
    bn_backward = lambda g, inp, mu, r, mask: torch.ops.aten.native_batch_norm_backward(  # noqa: E731
        g, inp, w, None, None, mu, r, True, eps, mask)
    # g_gy = w r (a - <a> - h <a h>); the same call's fp32 sums give <a h> and <a>
    g_gy, sum_ah, sum_a = bn_backward(a, x, mean, invstd, [True, True, True])
    # sum a gy: the same kernel's weight gradient with mean 0 and invstd 1
    sum_agy = bn_backward(a, gy, torch.zeros_like(mean), torch.ones_like(invstd), [False, True, False])[1]
    m_a, m_ah, m_agy, m_gy, m_gyh = torch.stack([sum_a, sum_ah, sum_agy, gb, gw]).to(acc).div_(m)
    r = invstd.to(acc)
    e = torch.addcmul(m_agy, m_a, m_gy, value=-1).addcmul_(m_ah, m_gyh, value=-1)
    g_w = e * (r * m)
    # x enters through h and through r (dr/dx = -r^2 h / M)
    k = torch.stack([torch.addcmul(e, m_ah, m_gyh, value=-2), torch.addcmul(m_a * m_gyh, m_ah, m_gy), m_gyh, m_ah])
    k = k * (w.to(acc) * r * r)
    if a_w is not None or a_b is not None:  # a loss on the parameter gradients themselves
        a_w = torch.zeros_like(r) if a_w is None else a_w.to(acc)
        a_b = torch.zeros_like(r) if a_b is None else a_b.to(acc)
        g_gy = g_gy + ((x - ch(mean)) * ch(r * a_w) + ch(a_b)).to(g_gy.dtype)
        ra_w = r * a_w
        k = k + torch.stack([ra_w * m_gyh, -ra_w * m_gy, torch.zeros_like(r), -ra_w])
    k_h, k_0, k_a, k_gy = k.unbind()
    # k_0 - k_h h = (k_0 + mean r k_h) - x (r k_h): each product read from the half tensor in fp32
    rk_h = r * k_h
    g_x = torch.addcmul(ch(torch.addcmul(k_0, mean.to(acc), rk_h)), x, ch(rk_h), value=-1)
    g_x.addcmul_(a, ch(k_a), value=-1).addcmul_(gy, ch(k_gy), value=-1)
    return g_gy, g_x.to(x.dtype), g_w.to(w.dtype)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with two switches for double backprop (GradSum, GradAlign):
    - float32_under_autocast: run in fp32 under autocast, since the double backward overflows fp16 (the original
      registered batch_norm as fp32 with apex for the same reason);
    - closed_form_double_backward: in training mode, a double backward in closed form (fewer, fused passes over
      the activations than autograd's generic one; the same gradients)."""

    float32_under_autocast = False
    closed_form_double_backward = False

    def forward(self, x):
        if self.float32_under_autocast and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x):
        if not (self.training and self.closed_form_double_backward):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return _BatchNormTrain.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum,
                                     self.eps)


class _ConvTrain(torch.autograd.Function):
    """conv2d whose backward is _ConvBackward: only the gradients the running backward wants (GradSum's inner
    backward wants the input's, not the weight's)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        mask = [_engine_needs(ctx, i) for i in range(3)]
        return (*_ConvBackward.apply(grad_y, x, weight, ctx.geometry, mask), None, None)


class _ConvBackward(torch.autograd.Function):
    """(grad_x, grad_weight, grad_bias) of conv2d, None where unmasked. Its backward takes the weight's term with
    the weight-gradient kernel; autograd's generic one convolves batch-transposed tensors instead, for which cuDNN
    picks FFT or slow kernels (a kernel the size of the feature map) after two transposing copies."""

    @staticmethod
    def forward(ctx, grad_y, x, weight, geometry, mask):
        ctx.save_for_backward(grad_y, x, weight)
        ctx.geometry = geometry
        ctx.set_materialize_grads(False)
        return _conv_backward(grad_y, x, weight, *geometry, mask)  # mask[2] is False without a bias

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x, gg_w, gg_b):
        grad_y, x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        # grad_x = conv_transpose(grad_y, weight), grad_w = wgrad(x, grad_y), grad_b = sum grad_y: all bilinear
        g_gy = None
        if ctx.needs_input_grad[0]:
            terms = [F.conv2d(gg_x, weight, None, stride, padding) if gg_x is not None else None,
                     F.conv2d(x, gg_w, None, stride, padding) if gg_w is not None else None,
                     _per_channel(gg_b, grad_y).expand_as(grad_y) if gg_b is not None else None]
            terms = [t for t in terms if t is not None]
            g_gy = sum(terms[1:], terms[0]) if terms else None
        g_x = (_conv_backward(grad_y, x, gg_w, stride, padding, [True, False, False])[0]
               if gg_w is not None and ctx.needs_input_grad[1] else None)
        g_w = (_conv_backward(grad_y, gg_x, weight, stride, padding, [False, True, False])[1]
               if gg_x is not None and ctx.needs_input_grad[2] else None)
        return g_gy, g_x, g_w, None, None


def _conv_backward(grad_y, x, weight, stride, padding, mask):
    bias_sizes = [weight.shape[0]] if mask[2] else None
    return torch.ops.aten.convolution_backward(grad_y, x, weight, bias_sizes, stride, padding, [1, 1], False, [0, 0],
                                               1, mask)


class Conv2d(nn.Conv2d):
    """nn.Conv2d with a switch for double backprop (GradSum, GradAlign): explicit_double_backward, in training
    mode, runs _ConvTrain (the same gradients; the weight's second-order term by the weight-gradient kernel, and
    no weight gradient in an input-gradient backward)."""

    explicit_double_backward = False

    def forward(self, x):
        if not (self.training and self.explicit_double_backward and self._plain()):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        device = x.device.type
        if torch.is_autocast_enabled(device):  # autocast's casts, once: the Function's inputs are then half already
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
        return _ConvTrain.apply(x, weight, bias, self.stride, self.padding)

    def _plain(self):
        """The geometry _ConvTrain handles (every convolution of these models)."""
        return (self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str))


class PreActBlock(nn.Module):
    """Pre-activation basic block; the projection shortcut (when the shape changes) sees the raw input x."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = BatchNorm2d(in_planes)
        self.conv1 = Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = Conv2d(in_planes, planes, 1, stride, bias=False)

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
    def __init__(self, blocks_per_stage, n_classes, in_channels, image_size, normalize=None, widths=STAGE_WIDTHS):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        self.conv1 = Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        in_planes = widths[0]
        for i, (planes, n_blocks) in enumerate(zip(widths, blocks_per_stage, strict=True)):
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
            convs += [Conv2d(in_channels if i == 0 else n_filters, n_filters, 3, 1, 1), nn.ReLU()]
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


def configure_batchnorm(model, float32_under_autocast=False, closed_form_double_backward=False):
    """Set the two double-backprop switches of every BatchNorm of the model (see BatchNorm2d)."""
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.float32_under_autocast = float32_under_autocast
            m.closed_form_double_backward = closed_form_double_backward


def configure_conv(model, explicit_double_backward=False):
    """Set the double-backprop switch of every convolution of the model (see Conv2d)."""
    for m in model.modules():
        if isinstance(m, Conv2d):
            m.explicit_double_backward = explicit_double_backward


def model_from_args(args, dataset, double_backprop=False):
    """The run's network for this dataset, freshly initialised as the original does, its BatchNorm and
    convolutions set up for the run's double backprop (methods.uses_double_backprop)."""
    mean_std = dataset.mean_std() if args.input_normalization == "dataset" else None
    model = build_model(args.model, dataset.n_classes, dataset.in_channels, dataset.image_size, mean_std,
                        args.n_layers, args.n_filters_cnn)
    configure_double_backward(model, args, double_backprop)
    return model


def configure_double_backward(model, args, double_backprop):
    """BatchNorm and convolutions for the run's regularisers. With double backprop: BatchNorm's closed-form double
    backward (its sums in fp32 at least) unless --bn_double_backward=autograd, BatchNorm in fp32 under autocast with
    --bn_float32 or with autograd's double backward (which overflows fp16 at the loss scale); the convolutions'
    explicit double backward unless --conv_double_backward=autograd."""
    double = double_backprop
    closed_form = args.bn_double_backward == "closed_form"
    float32 = double and args.half_prec and (args.bn_float32 or not closed_form)
    configure_batchnorm(model, float32_under_autocast=float32, closed_form_double_backward=double and closed_form)
    configure_conv(model, explicit_double_backward=double and args.conv_double_backward == "explicit")
