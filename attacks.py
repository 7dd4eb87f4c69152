"""L-inf attacks and input-gradient regularisers, as the original code computes them.

Every function takes a model and images x in [0, 1] (eps and step sizes in the same units: pixels/255 already
divided by 255), returns a perturbation, a mask or a scalar, and never touches parameter `.grad`: input
gradients come from `torch.autograd.grad` with respect to the perturbation only.

Details of the original that matter and are kept:
- where it feeds `clamp(x + delta, 0, 1)` to the model, the gradient with respect to delta is zero where the
  clamp binds and halved where x + delta sits exactly on 0 or 1 (its clamp is torch.min/torch.max);
- random points of the eps-ball (`uniform_delta`) are never clipped to [0, 1]; only the step that follows is;
- every formula is written with the original's operations in its order (its FGSM step clips to the ball first,
  its PGD to [0, 1] first; its grid is `mul(255).round().div(255)`), so that the rounding, and through sign steps
  and ReLU flips everything after it, matches the original on whatever device both run.

`loss_scale` is the mixed-precision loss scale (a float or a 0-d tensor; 1 without loss scaling): losses are
multiplied by it before differentiation so that fp16 gradients do not underflow, and gradients are divided by it
afterwards, so callers always see true gradients.
"""
import math

import torch
import torch.nn.functional as F

LEVELS = 255  # intensity levels of an 8-bit image above 0: one level is 1/255 in [0, 1] units
LOSS_MARGIN = 1e-3  # nats: cross-entropy above ln(K) + this is misclassified whatever the rounding
ACTIVE_BUCKET = 64  # examples: PGD's attacked subset is padded to a multiple of this (eval mode: rows independent)


def clamp01(z):
    """z clipped to [0, 1] the way the original clips (torch.min then torch.max: a tie passes half the gradient)."""
    one = z.new_ones(())
    return torch.maximum(torch.minimum(z, one), one * 0)


def clip_image(x, delta):
    """delta such that x + delta is clipped to [0, 1]: the original's clamp(x + delta, 0, 1) - x, which also rounds
    delta anew (the image stays the same)."""
    return clamp01(x + delta) - x


def project(x, delta, eps):
    """delta clipped to the L-inf eps-ball, then x + delta to [0, 1] (the original's FGSM training step)."""
    return clip_image(x, delta.clamp(-eps, eps))


def project_pgd(x, delta, eps):
    """x + delta clipped to [0, 1], then delta to the eps-ball (the original's PGD: the same set as project's,
    other roundings)."""
    return clip_image(x, delta).clamp(-eps, eps)


def to_grid(delta):
    """delta rounded to the 1/255 grid as the original rounds it (its tensor_discrete)."""
    return delta.mul(LEVELS).round().div(LEVELS)


def uniform_delta(x, eps, on_grid=False):
    """A point drawn uniformly from the eps-ball, optionally rounded to the 1/255 grid; not clipped to [0, 1]."""
    delta = torch.empty_like(x).uniform_(-eps, eps)  # the original's draw: the same values on every device
    return to_grid(delta) if on_grid else delta


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


def sign(grad):
    """sign(grad), 0 where grad is NaN (an fp16 overflow): no step rather than a NaN input."""
    return torch.nan_to_num(grad.detach()).sign()


def fgsm_step(x, delta, grad, eps, radius, alpha=1.0):
    """The original's FGSM training step: delta + alpha * (radius * sign(grad)) clipped to the eps-ball, then
    x + delta to [0, 1]; radius may be a tensor (MAST's per-pixel magnitudes)."""
    return project(x, delta + alpha * (radius * sign(grad)), eps)


def pgd_step(x, delta, grad, eps, step):
    """One step of the original's PGD: delta + step * sign(grad), x + delta clipped to [0, 1], then the ball."""
    return project_pgd(x, delta + step * sign(grad), eps)


def pgd_train(model, x, y, eps, step, n_iters, delta_init, loss_scale=1.0):
    """PGD for training: n_iters signed steps from delta_init, the gradient taken at clamp01(x + delta);
    returns the last iterate."""
    delta = delta_init
    for _ in range(n_iters):
        delta = pgd_step(x, delta, input_grad(model, x, delta, y, loss_scale=loss_scale)[0], eps, step)
    return delta.detach()


def corner(x, delta, eps):
    """The eps-ball's corner in the direction of delta, clipped to [0, 1] (the original's pgd_corner)."""
    return clip_image(x, eps * torch.sign(delta))


def image_box(x, delta):
    """delta clipped so that x + delta lies in [0, 1], as N-FGSM's code clips (torch.max(torch.min(delta, 1 - x),
    -x): the same set as clip_image's, other roundings)."""
    return torch.maximum(torch.minimum(delta, 1 - x), -x)


def n_fgsm(model, x, y, step, noise, clip=0.0, loss_scale=1.0):
    """N-FGSM (de Jorge et al. 2022; pdejorge/N-FGSM at 0a9e4f0): eta uniform in the noise-ball, clipped so that
    x + eta is an image, then one signed step of the gradient at x + eta, clipped to the image again and, only
    where clip > 0, to the clip-ball (its --clip; none by default, so |delta| reaches noise + step). Returns
    (delta, the gradient at x + eta)."""
    eta = image_box(x, torch.empty_like(x).uniform_(-noise, noise))
    grad = input_grad(model, x, eta, y, clip=False, loss_scale=loss_scale)[0]
    delta = image_box(x, eta + step * sign(grad))
    return (delta.clamp(-clip, clip) if clip > 0 else delta), grad


def linearity_error(losses, x, eps):
    """ELLE's local linearity error (Rocamora et al. 2024; LIONS-EPFL/ELLE at 0f16c0e): at two points a, b drawn
    uniformly in the eps-ball (not clipped to [0, 1]) and c = (1 - t) a + t b, t uniform in [0, 1] per example,
    the mean over the batch of (loss(c) - (1 - t) loss(a) - t loss(b))^2; zero for a loss linear in the input.
    losses maps a batch of 3 len(x) points to their per-example losses: one call, as its code's one forward
    pass (BatchNorm in training mode sees all three)."""
    n = len(x)
    ab = x.repeat(2, *(1,) * (x.dim() - 1))
    ab = ab + eps * (2 * torch.rand(ab.shape, device=x.device) - 1)
    t = torch.rand(n, *(1,) * (x.dim() - 1), device=x.device)
    c = (1 - t) * ab[:n] + t * ab[n:]
    t = t.flatten()
    loss = losses(torch.cat((ab, c)))
    return F.mse_loss(loss[2 * n:], (1 - t) * loss[:n] + t * loss[n:2 * n])


def grad_sum_fd_penalty(model, x, y, eps, step, loss_scale=1.0):
    """GradSum's norm ||g|| at x + eta (eta as grad_sum_penalty's) without double backprop (Finlay and Oberman
    2019's finite-difference gradient regularisation): g's direction d = g / ||g|| is a constant, and the term is
    |L(eta + h d) - L(eta)| / h with h = step * sqrt(g.numel()), a move of `step` per pixel in RMS. Its value and
    parameter gradient tend to GradSum's as step -> 0; it is differentiable by ordinary backprop. The absolute
    value keeps it a norm: the signed difference turns negative where the loss bends down along d within h, and
    training then drives it below zero without bound (docs/peers.md)."""
    eta = uniform_delta(x, eps, on_grid=True).requires_grad_(True)
    loss = F.cross_entropy(model(x + eta), y)
    (grad,) = torch.autograd.grad(loss * loss_scale, eta, retain_graph=True)
    grad = grad.detach() / loss_scale
    h = step * math.sqrt(grad.numel())
    direction = grad / l2_norm(grad).clamp_min(torch.finfo(grad.dtype).tiny)  # a zero gradient: no move, term 0
    return (F.cross_entropy(model(x + eta.detach() + h * direction), y) - loss).abs() / h


def grad_sum_penalty(model, x, y, eps, loss_scale=1.0):
    """GradSum: L2 norm of the whole batch's input gradient at x + eta, eta uniform in the eps-ball on the
    1/255 grid and unclipped; differentiable in the parameters (double backprop)."""
    eta = uniform_delta(x, eps, on_grid=True)
    return l2_norm(input_grad(model, x, eta, y, clip=False, create_graph=True, loss_scale=loss_scale)[0])


def l2_norm(v):
    """The L2 norm of the whole tensor as the original writes it: (v * v).sum() ** 0.5."""
    return (v * v).sum() ** 0.5


def gradient_cosines(grad_a, grad_b):
    """Per-example cosine between two input gradients, and a mask of examples where both are non-zero; as the
    original computes it: each gradient divided by its norm ((v**2).sum ** 0.5), then the products summed."""
    dims = tuple(range(1, grad_a.dim()))
    squares_a, squares_b = (grad_a**2).sum(dims), (grad_b**2).sum(dims)
    valid = (squares_a != 0) & (squares_b != 0)
    # the norms of rows that are left out are 1: no 0/0, not even in the unused branch's backward
    norm = lambda squares: (torch.where(valid, squares, 1.0) ** 0.5).view(-1, *(1,) * len(dims))  # noqa: E731
    return ((grad_a / norm(squares_a)) * (grad_b / norm(squares_b))).sum(dims), valid


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
    """One restart of the evaluation PGD from delta: n_iters signed steps on the unclipped x + delta, each clipped
    to [0, 1], then to the ball. Returns (final iterate, its per-example loss, correct there, misclassified at any
    iterate after a step). A fixed-shape computation with no host syncs: evaluation.GraphedRestarts replays it."""
    hit = torch.zeros_like(y, dtype=torch.bool)
    for i in range(n_iters):
        grad, logits = input_grad(model, x, delta, y, clip=False, loss_scale=loss_scale, reduction="sum")
        if i > 0:  # the start may lie outside [0, 1]; every later iterate is an image
            hit |= logits.detach().argmax(1) != y
        delta = pgd_step(x, delta, grad, eps, step)
    loss, correct = _final_point(model, x, delta, y)
    return delta, loss, correct, hit | ~correct


def pgd_eval(model, x, y, eps, step, n_iters, n_restarts, skip_lost=True, restart=pgd_restart, loss_scale=1.0,
             batched=False):
    """The original's PGD-n_iters-n_restarts evaluation of the model as it is (eval mode expected).

    Each restart starts uniformly in the eps-ball (unclipped), takes n_iters signed steps, each clipped to
    [0, 1], then to the ball, on every example; per example the final iterate of the restart with the highest loss
    is kept (ties go to the later restart). Returns (correct at the kept point, robust under the strict rule,
    kept perturbation). The strict rule also counts an example as broken when it is misclassified clean or at
    any iterate after a step of any restart; it is never above the original accuracy.

    skip_lost: an example whose kept loss exceeds ln(K) (K classes) is misclassified and can only be replaced
    by a point of even higher loss, so later restarts skip it. The random starts are drawn for the whole batch
    either way, and in eval mode every example's trajectory is its own, so the results are the same.
    restart: pgd_restart or a function that computes the same (a GraphedRestarts).
    batched: every restart in one pass (batched_restarts): the original's results without the skip.
    With no iteration or no restart the kept perturbation is zero (the clean point), as in the original.
    """
    kept_delta = torch.zeros_like(x)
    with torch.no_grad():
        logits = model(x)
    broken = logits.argmax(1) != y
    if n_iters == 0 or n_restarts == 0:
        return ~broken, ~broken, kept_delta
    if batched:
        return batched_restarts(model, x, y, broken, eps, step, n_iters, n_restarts, restart, loss_scale)
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
    return kept_correct, ~broken, clip_image(x, kept_delta)  # attack_pgd's last line: the cosines read it


def batched_restarts(model, x, y, broken, eps, step, n_iters, n_restarts, restart=pgd_restart, loss_scale=1.0):
    """pgd_eval's restarts as one batch of n_restarts * len(y) examples (eval mode: rows independent), the starts
    drawn first, in the order the restart loop draws them; per example the last restart of the highest loss is
    kept, as the loop's `>=` keeps it, none where every loss is NaN. The results of pgd_eval without the skip,
    in one pass instead of n_restarts."""
    n = len(y)
    starts = torch.cat([uniform_delta(x, eps) for _ in range(n_restarts)])
    repeat = lambda t: t.repeat(n_restarts, *(1,) * (t.dim() - 1))  # noqa: E731
    delta, loss, correct, hit = restart(model, repeat(x), repeat(y), starts, eps, step, n_iters, loss_scale)
    loss = loss.view(n_restarts, n)
    best = torch.nan_to_num(loss, nan=-1.0).max(0).values  # cross-entropy is >= 0: -1 marks no restart kept
    last_best = n_restarts - 1 - (loss == best).flip(0).int().argmax(0)  # ties go to the later restart
    pick = last_best * n + torch.arange(n, device=x.device)
    kept = best >= 0
    kept_delta = torch.where(kept.view(-1, *(1,) * (x.dim() - 1)), delta[pick], 0)
    broken = broken | hit.view(n_restarts, n).any(0)
    return correct[pick] & kept, ~broken, clip_image(x, kept_delta)  # attack_pgd's last line: the cosines read it


def fgsm_eval(model, x, y, step, radius, loss_scale=1.0):
    """(correct, perturbation) under FGSM from a zero start with the given step, projected to the radius-ball
    (radius >= step leaves the step unprojected, as the original's FGSM step-size sweep does past eps): the
    original's attack_pgd with one iteration and no random start, its PGD order and last clamp included."""
    grad = input_grad(model, x, torch.zeros_like(x), y, clip=False, loss_scale=loss_scale, reduction="sum")[0]
    delta = pgd_step(x, torch.zeros_like(x), grad, radius, step)
    return _final_point(model, x, delta, y)[1], clip_image(x, delta)
