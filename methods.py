"""One training iteration of every method, as the original computes it: the training perturbation (FGSM,
FGSM-RS, VFSAT, MAST, Free-AT, PGD), the GradAlign and GradSum regularisers, and the optimiser step.

Each piece is a function of (model, batch, radii, args); attacks and regularisers come from attacks.py.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attacks

GRAD_CLIP_NORM = 20.0  # max L2 norm of the parameter gradient
SGD_MOMENTUM = 0.9
WEIGHT_CLIP_AT, WEIGHT_CLIP_TO = 0.2, 0.1  # --weight_clip: |w| >= 0.2 becomes 0.1 with w's sign (the original's)


def build_optimizer(model, args):
    if args.model == "cnn":
        return torch.optim.Adam(model.parameters(), lr=args.lr_max, weight_decay=args.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=args.lr_max, momentum=SGD_MOMENTUM, weight_decay=args.weight_decay)


@dataclass
class StepRadii:
    """What one iteration's attack uses, in [0, 1] units: the evaluation eps, the FGSM radius (VFSAT's eps of the
    epoch), the PGD radius and FGSM multiplier (SVHN's warm-up), and the regularisers' radius."""
    eps: float
    fgsm_eps: float
    pgd_eps: float
    fgsm_alpha: float
    reg_eps: float


def fgsm_start(x, radii, args, carried):
    """FGSM's starting point: the carried perturbation (Free-AT), zero, or uniform in the full eps-ball (on the
    grid under VFSAT; in the epoch's ball with --fix_vfsat_start)."""
    if args.minibatch_replay > 1:
        return torch.zeros_like(x) if carried is None else carried
    if args.attack_init == "zero":
        return torch.zeros_like(x)
    return attacks.uniform_delta(x, radii.fgsm_eps if args.fix_vfsat_start else radii.eps, on_grid=args.discrete_eps)


def perturb(model, x, y, radii, args, loss_scale, carried=None):
    """The training perturbation, and the input gradient the regularisers may use: FGSM's at its start, or, for
    PGD and no attack, the original's extra gradient at x (differentiable when GradAlign uses it)."""
    if args.attack == "fgsm":
        start = fgsm_start(x, radii, args, carried)
        differentiable = args.fix_gradsum and args.attack_init == "random" and args.grad_input_sum_coeff > 0
        grad = attacks.input_grad(model, x, start.requires_grad_(differentiable), y, create_graph=differentiable,
                                  loss_scale=loss_scale)[0]
        step = radii.fgsm_alpha * (attacks.uniform_delta(x, radii.eps, on_grid=True) if args.mast else radii.fgsm_eps)
        return attacks.signed_step(x, start.detach(), grad, radii.fgsm_eps, step), grad
    delta = torch.zeros_like(x)
    if args.attack in ("pgd", "pgd_corner"):
        start = attacks.uniform_delta(x, radii.pgd_eps) if args.attack_init == "random" else delta
        delta = attacks.pgd_train(model, x, y, radii.pgd_eps, args.pgd_alpha_train / 255, args.pgd_train_n_iters,
                                  start, loss_scale)
        if args.attack == "pgd_corner":
            delta = attacks.corner(x, delta, radii.eps)
    grad_x = attacks.input_grad(model, x, torch.zeros_like(x), y, clip=False,
                                create_graph=args.grad_align_cos_lambda > 0, loss_scale=loss_scale)[0]
    return delta, grad_x


def grad_sum(model, x, y, radii, args, grad, loss_scale):
    """GradSum's unscaled norm. The original reuses the attack's gradient with a random start, where it is a
    detached constant (an FGSM gradient, or a PGD/none one unless GradAlign made it differentiable);
    --fix_gradsum differentiates FGSM's start gradient and gives PGD/none a random point."""
    reuse = args.attack_init == "random" and not (args.fix_gradsum and args.attack != "fgsm")
    if reuse:
        return grad.norm()
    return attacks.grad_sum_penalty(model, x, y, radii.reg_eps, loss_scale)


def losses(model, x, y, radii, args, loss_scale, carried=None, net=None):
    """Training loss (cross-entropy + GradAlign + GradSum, as the original sums them) and its parts, in the
    order of the original's forward passes (which all move BatchNorm statistics)."""
    delta, grad = perturb(model, x, y, radii, args, loss_scale, carried)
    delta = delta.detach()
    logits = (net or model)(x + delta)
    ce = F.cross_entropy(logits, y)
    zero = torch.zeros((), device=x.device)
    reg = gis = zero
    if args.grad_align_cos_lambda > 0:
        first = grad.detach() if args.attack == "fgsm" else grad
        reg = args.grad_align_cos_lambda * attacks.grad_align_penalty(
            model, x, y, radii.reg_eps, first, loss_scale, empty_is_zero=args.fix_gradalign_empty)
    if args.grad_input_sum_coeff > 0 or args.print_g_i_s:
        gis = grad_sum(model, x, y, radii, args, grad, loss_scale)
    total = ce + reg + (args.grad_input_sum_coeff * gis if args.grad_input_sum_coeff > 0 else zero)
    stats = {"ce": ce.detach(), "loss": total.detach(), "reg": reg.detach(), "gis": gis.detach(),
             "delta_abs": delta.abs().mean(), "correct": (logits.argmax(1) == y).sum()}
    return total, stats, delta


def clip_weights(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.where(p < WEIGHT_CLIP_AT, p, WEIGHT_CLIP_TO))
            p.copy_(torch.where(p > -WEIGHT_CLIP_AT, p, -WEIGHT_CLIP_TO))


def train_step(model, opt, scaler, autocast, x, y, radii, args, carried=None, net=None, update=True):
    """One iteration: the losses, then (if update) one optimiser step. Returns per-step statistics (device
    tensors, no sync) and the perturbation (Free-AT carries it to the next iteration).

    net is the model wrapped for data-parallel training (DDP): the training loss goes through it, so its backward
    averages the gradients (the regularisers' included) over processes; attacks use the bare model.
    """
    loss_scale = scaler.scale(torch.ones((), device=x.device))  # a tensor: reading it would sync
    with autocast:
        total, stats, delta = losses(model, x, y, radii, args, loss_scale, carried, net)
    if update:
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        scaler.step(opt)
        scaler.update()
        if args.weight_clip:
            clip_weights(model)
    return stats, delta


def autocast_context(args):
    if not args.half_prec:
        return nullcontext()
    return torch.autocast(args.device.type, dtype=getattr(torch, args.amp_dtype))
