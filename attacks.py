"""L-inf attacks and input-gradient regularisers.

Every function takes a model and images x in [0, 1] (eps and step sizes in the same units, i.e. pixels/255
already divided by 255), returns a perturbation, a mask or a scalar, and never touches parameter `.grad`:
input gradients are taken with `torch.autograd.grad` with respect to the input only.

`loss_scale` is the mixed-precision loss scale (a float or a 0-d tensor, 1 without loss scaling): losses are
multiplied by it before differentiation so that fp16 gradients do not underflow, and gradients are divided
by it afterwards, so callers always see true gradients.
"""
import torch
import torch.nn.functional as F

PIXEL = 1 / 255  # one intensity level of an 8-bit image, in [0, 1] units


def clip_delta(x, delta, eps):
    """Project delta onto the L-inf eps-ball and keep x + delta inside [0, 1]."""
    return torch.minimum(torch.maximum(delta.clamp(-eps, eps), -x), 1 - x)


def uniform_delta(x, eps, on_grid=False):
    """A point drawn uniformly from the eps-ball around x, optionally rounded to the 1/255 grid."""
    delta = (torch.rand_like(x) * 2 - 1) * eps
    if on_grid:
        delta = torch.round(delta / PIXEL) * PIXEL
    return clip_delta(x, delta, eps)


def _loss_grad(model, x_adv, y, create_graph=False, loss_scale=1.0, reduction="mean"):
    """Gradient of the cross-entropy with respect to the input x_adv, and the logits at x_adv."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y, reduction=reduction)
    (grad,) = torch.autograd.grad(loss * loss_scale, x_adv, create_graph=create_graph)
    return grad / loss_scale, logits.detach()


def input_grad(model, x_adv, y, create_graph=False, loss_scale=1.0):
    """Gradient of the batch-mean cross-entropy with respect to the input, at x_adv.

    With create_graph the result stays differentiable in the parameters (for double backprop).
    """
    return _loss_grad(model, x_adv, y, create_graph, loss_scale)[0]


def sign_step(x, delta, grad, eps, step):
    """One signed-gradient ascent step of size `step`, projected back to the ball and [0, 1].

    NaN gradients (an fp16 overflow) give no step rather than a NaN input.
    """
    return clip_delta(x, delta + step * torch.nan_to_num(grad.detach()).sign(), eps)


def fgsm(model, x, y, eps, step, delta_init=None, loss_scale=1.0):
    """FGSM: one signed step of size `step` from delta_init (zero if None), projected to the eps-ball."""
    delta = torch.zeros_like(x) if delta_init is None else delta_init
    return sign_step(x, delta, input_grad(model, x + delta, y, loss_scale=loss_scale), eps, step)


def pgd(model, x, y, eps, step, n_iters, delta_init=None, loss_scale=1.0):
    """PGD: n_iters signed steps of size `step` from delta_init (zero if None); returns the last iterate."""
    delta = torch.zeros_like(x) if delta_init is None else delta_init
    for _ in range(n_iters):
        delta = sign_step(x, delta, input_grad(model, x + delta, y, loss_scale=loss_scale), eps, step)
    return delta


def _pgd_survivors(model, x, y, eps, step, n_iters, delta_init):
    """Robust mask of one PGD restart, where an example counts as broken at the first iterate that
    misclassifies it, and broken examples leave the batch (so later iterations cost less)."""
    robust = torch.ones_like(y, dtype=torch.bool)
    active = torch.arange(len(y), device=y.device)
    delta = delta_init
    for _ in range(n_iters):
        # the gradient's forward pass also classifies the current iterate, so checking costs nothing extra
        grad, logits = _loss_grad(model, x[active] + delta, y[active], reduction="sum")
        still = logits.argmax(1) == y[active]
        robust[active[~still]] = False
        active, delta, grad = active[still], delta[still], grad[still]
        if not len(active):
            return robust
        delta = sign_step(x[active], delta, grad, eps, step)
    with torch.no_grad():
        robust[active] = model(x[active] + delta).argmax(1) == y[active]
    return robust


def pgd_robust(model, x, y, eps, step, n_iters, n_restarts, skip_broken=True):
    """Boolean mask of the examples that PGD-n_iters with n_restarts random starts does not misclassify.

    An example is robust only if no restart misclassifies it. With skip_broken, each restart attacks only the
    examples still robust and an example is broken at any misclassified iterate; without, every restart
    attacks every example and only its last iterate is checked. Both draw the same random starts, and in
    eval mode each example's trajectory does not depend on the others, so skip_broken never reports a
    higher robust accuracy than the plain evaluation.
    """
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    for _ in range(n_restarts):
        delta_init = uniform_delta(x, eps)  # drawn for the whole batch in both modes: same starts
        if skip_broken:
            idx = robust.nonzero().squeeze(1)
            if len(idx):
                robust[idx] = _pgd_survivors(model, x[idx], y[idx], eps, step, n_iters, delta_init[idx])
        else:
            delta = delta_init
            for _ in range(n_iters):
                grad, _ = _loss_grad(model, x + delta, y, reduction="sum")
                delta = sign_step(x, delta, grad, eps, step)
            with torch.no_grad():
                robust &= model(x + delta).argmax(1) == y
    return robust


def grad_sum_penalty(model, x, y, eps, loss_scale=1.0):
    """GradSum: L2 norm of the whole batch's input gradient at x + eta, with eta uniform in the eps-ball
    on the 1/255 grid; differentiable in the parameters (double backprop)."""
    delta = uniform_delta(x, eps, on_grid=True)
    return input_grad(model, x + delta, y, create_graph=True, loss_scale=loss_scale).norm()


def gradient_cosines(grad_a, grad_b):
    """Per-example cosine between two input gradients, and a mask of examples where both are non-zero."""
    a, b = grad_a.flatten(1), grad_b.flatten(1)
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    valid = (norm_a > 0) & (norm_b > 0)
    cos = (a * b).sum(1) / (norm_a * norm_b).clamp_min(torch.finfo(a.dtype).tiny)
    return cos, valid


def grad_align_penalty(model, x, y, eps, grad_clean=None, loss_scale=1.0):
    """GradAlign: 1 - mean cosine between the input gradients at x and at x + eta (eta uniform in the
    eps-ball), over examples whose two gradients are non-zero; 0 if there are none.

    The gradient at x is a constant (pass it in to reuse the zero-init FGSM gradient); the one at x + eta
    is differentiated through.
    """
    if grad_clean is None:
        grad_clean = input_grad(model, x, y, loss_scale=loss_scale)
    grad_noisy = input_grad(model, x + uniform_delta(x, eps), y, create_graph=True, loss_scale=loss_scale)
    cos, valid = gradient_cosines(grad_clean.detach(), grad_noisy)
    return torch.where(valid, 1 - cos, 0).sum() / valid.sum().clamp_min(1)
