"""L-inf attacks and input-gradient regularisers, as the original code computes them.

Every function takes a model and images x in [0, 1] (eps and step sizes in the same units: pixels/255 already
divided by 255), returns a perturbation, a mask or a scalar, and never touches parameter `.grad`: input
gradients come from `torch.autograd.grad` with respect to the perturbation only.

Two details of the original matter and are kept:
- where it feeds `clamp(x + delta, 0, 1)` to the model, the gradient with respect to delta is zero where the
  clamp binds and halved where x + delta sits exactly on 0 or 1 (its clamp is torch.min/torch.max);
- random points of the eps-ball (`uniform_delta`) are never clipped to [0, 1]; only the step that follows is.

`loss_scale` is the mixed-precision loss scale (a float or a 0-d tensor; 1 without loss scaling): losses are
multiplied by it before differentiation so that fp16 gradients do not underflow, and gradients are divided by it
afterwards, so callers always see true gradients.
"""
import math

import torch
import torch.nn.functional as F

PIXEL = 1 / 255  # one intensity level of an 8-bit image, in [0, 1] units
LOSS_MARGIN = 1e-3  # nats: cross-entropy above ln(K) + this is misclassified whatever the rounding
ACTIVE_BUCKET = 64  # examples: PGD's attacked subset is padded to a multiple of this (eval mode: rows independent)


def clamp01(z):
    """z clipped to [0, 1] the way the original clips (torch.min then torch.max: a tie passes half the gradient)."""
    one = z.new_ones(())
    return torch.maximum(torch.minimum(z, one), one * 0)


def project(x, delta, eps):
    """delta clipped to the L-inf eps-ball, then x + delta to [0, 1]."""
    return clamp01(x + delta.clamp(-eps, eps)) - x


def uniform_delta(x, eps, on_grid=False):
    """A point drawn uniformly from the eps-ball, optionally rounded to the 1/255 grid; not clipped to [0, 1]."""
    delta = (torch.rand_like(x) * 2 - 1) * eps
    return torch.round(delta / PIXEL) * PIXEL if on_grid else delta


def input_grad(model, x, delta, y, clip=True, create_graph=False, loss_scale=1.0, reduction="mean"):
    """(Gradient of the cross-entropy at model(clamp01(x + delta)) with respect to delta, the logits there).

    clip=False feeds x + delta itself. With create_graph the gradient stays differentiable in the parameters
    (double backprop) and in delta when delta requires grad.
    """
    if not delta.requires_grad:
        delta = delta.detach().requires_grad_(True)
    z = x + delta
    logits = model(clamp01(z) if clip else z)
    loss = F.cross_entropy(logits, y, reduction=reduction)
    (grad,) = torch.autograd.grad(loss * loss_scale, delta, create_graph=create_graph)
    return grad / loss_scale, logits


def signed_step(x, delta, grad, eps, step):
    """delta + step * sign(grad), projected to the eps-ball and [0, 1]; `step` may be a tensor (MAST).

    NaN gradients (an fp16 overflow) give no step rather than a NaN input.
    """
    return project(x, delta + step * torch.nan_to_num(grad.detach()).sign(), eps)


def pgd_train(model, x, y, eps, step, n_iters, delta_init, loss_scale=1.0):
    """PGD for training: n_iters signed steps from delta_init, the gradient taken at clamp01(x + delta);
    returns the last iterate."""
    delta = delta_init
    for _ in range(n_iters):
        delta = signed_step(x, delta, input_grad(model, x, delta, y, loss_scale=loss_scale)[0], eps, step)
    return delta.detach()


def corner(x, delta, eps):
    """The eps-ball's corner in the direction of delta, clipped to [0, 1] (the original's pgd_corner)."""
    return clamp01(x + eps * torch.sign(delta)) - x


def grad_sum_penalty(model, x, y, eps, loss_scale=1.0):
    """GradSum: L2 norm of the whole batch's input gradient at x + eta, eta uniform in the eps-ball on the
    1/255 grid and unclipped; differentiable in the parameters (double backprop)."""
    eta = uniform_delta(x, eps, on_grid=True)
    return input_grad(model, x, eta, y, clip=False, create_graph=True, loss_scale=loss_scale)[0].norm()


def gradient_cosines(grad_a, grad_b):
    """Per-example cosine between two input gradients, and a mask of examples where both are non-zero."""
    a, b = grad_a.flatten(1), grad_b.flatten(1)
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    valid = (norm_a > 0) & (norm_b > 0)
    safe = lambda n: torch.where(valid, n, 1.0)  # noqa: E731  (no 0/0, not even in the unused branch's backward)
    return (a * b).sum(1) / (safe(norm_a) * safe(norm_b)), valid


def grad_align_penalty(model, x, y, eps, grad_first, loss_scale=1.0, empty_is_zero=False):
    """GradAlign: 1 - mean cosine between grad_first and the input gradient at x + eta (eta uniform in the
    eps-ball on the 1/255 grid, unclipped, differentiated through), over the examples whose two gradients are
    non-zero. With none, the original's mean of nothing is NaN; empty_is_zero gives 0 instead.

    grad_first is used as given: detached, it is a constant; differentiable, the double backprop goes through it.
    """
    eta = uniform_delta(x, eps, on_grid=True)
    grad_eta = input_grad(model, x, eta, y, clip=False, create_graph=True, loss_scale=loss_scale)[0]
    cos, valid = gradient_cosines(grad_first, grad_eta)
    n_valid = valid.sum()
    mean = torch.where(valid, cos, 0).sum() / (n_valid.clamp_min(1) if empty_is_zero else n_valid)
    return 1 - mean


def cosines_or_one(a, b):
    """Per-example cosine between a and b, 1 where either is zero (the original's nan -> 1 rule)."""
    cos, valid = gradient_cosines(a, b)
    return torch.where(valid, cos, 1.0)


def grad_cosines(model, x, y, eps, loss_scale=1.0):
    """Per-example cosine between the input gradients at x and at x + eta (eta uniform on the grid), both through
    the [0, 1] clamp, as the original's periodic log computes it."""
    grad_x = input_grad(model, x, torch.zeros_like(x), y, loss_scale=loss_scale)[0]
    grad_eta = input_grad(model, x, uniform_delta(x, eps, on_grid=True), y, loss_scale=loss_scale)[0]
    return cosines_or_one(grad_x, grad_eta)


@torch.no_grad()
def _final_point(model, x, delta, y):
    logits = model(x + delta)
    return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) == y


def padded(rows, n_max):
    """rows, then repeats of its first, up to a multiple of ACTIVE_BUCKET (at most n_max): the attacked subset
    takes a few batch sizes, so cuDNN's benchmark mode tunes a few shapes, not new ones at every restart."""
    n = min(-(-len(rows) // ACTIVE_BUCKET) * ACTIVE_BUCKET, n_max)
    return torch.cat([rows, rows[:1].expand(n - len(rows))])


def pgd_restart(model, x, y, delta, eps, step, n_iters, loss_scale=1.0):
    """One restart of the evaluation PGD from delta: n_iters signed steps on the unclipped x + delta, each projected
    to [0, 1] and the ball. Returns (final iterate, its per-example loss, correct there, misclassified at any
    iterate after a step). A fixed-shape computation with no host syncs: evaluation.GraphedRestarts replays it."""
    hit = torch.zeros_like(y, dtype=torch.bool)
    for i in range(n_iters):
        grad, logits = input_grad(model, x, delta, y, clip=False, loss_scale=loss_scale, reduction="sum")
        if i > 0:  # the start may lie outside [0, 1]; every later iterate is an image
            hit |= logits.detach().argmax(1) != y
        delta = signed_step(x, delta, grad, eps, step)
    loss, correct = _final_point(model, x, delta, y)
    return delta, loss, correct, hit | ~correct


def pgd_eval(model, x, y, eps, step, n_iters, n_restarts, skip_lost=True, restart=pgd_restart, loss_scale=1.0):
    """The original's PGD-n_iters-n_restarts evaluation of the model as it is (eval mode expected).

    Each restart starts uniformly in the eps-ball (unclipped), takes n_iters signed steps, each projected to
    [0, 1] and the ball, on every example; per example the final iterate of the restart with the highest loss
    is kept (ties go to the later restart). Returns (correct at the kept point, robust under the strict rule,
    kept perturbation). The strict rule also counts an example as broken when it is misclassified clean or at
    any iterate after a step of any restart; it is never above the original accuracy.

    skip_lost: an example whose kept loss exceeds ln(K) (K classes) is misclassified and can only be replaced
    by a point of even higher loss, so later restarts skip it. The random starts are drawn for the whole batch
    either way, and in eval mode every example's trajectory is its own, so the results are the same.
    restart: pgd_restart or a function that computes the same (a GraphedRestarts).
    With no iteration or no restart the kept perturbation is zero (the clean point), as in the original.
    """
    kept_delta = torch.zeros_like(x)
    with torch.no_grad():
        logits = model(x)
    broken = logits.argmax(1) != y
    if n_iters == 0 or n_restarts == 0:
        return ~broken, ~broken, kept_delta
    lost_above = math.log(logits.shape[1]) + LOSS_MARGIN
    max_loss = torch.zeros(len(y), device=x.device, dtype=x.dtype)
    kept_correct = torch.zeros_like(broken)
    for _ in range(n_restarts):
        start = uniform_delta(x, eps)
        active = (max_loss <= lost_above).nonzero().squeeze(1) if skip_lost else torch.arange(len(y), device=x.device)
        if not len(active):
            continue
        n, rows = len(active), padded(active, len(y))
        delta, loss, correct, hit = (t[:n] for t in restart(model, x[rows], y[rows], start[rows], eps, step, n_iters,
                                                              loss_scale))  # the padding's rows dropped
        broken[active] |= hit
        better = loss >= max_loss[active]
        kept_delta[active[better]] = delta[better]
        kept_correct[active[better]] = correct[better]
        max_loss[active] = torch.maximum(max_loss[active], loss)
    return kept_correct, ~broken, kept_delta


def fgsm_eval(model, x, y, step, radius, loss_scale=1.0):
    """(correct, perturbation) under FGSM from a zero start with the given step, projected to the radius-ball
    (radius >= step leaves the step unprojected, as the original's FGSM step-size sweep does past eps)."""
    grad = input_grad(model, x, torch.zeros_like(x), y, clip=False, loss_scale=loss_scale, reduction="sum")[0]
    delta = signed_step(x, torch.zeros_like(x), grad, radius, step)
    return _final_point(model, x, delta, y)[1], delta
