"""One training iteration of every method, as the original computes it: the training perturbation (FGSM,
FGSM-RS, VFSAT, MAST, Free-AT, PGD; and N-FGSM as its authors' code computes it), the regularisers
(REGULARISERS: GradAlign, GradSum; ELLE and ELLE-A as their code, GradSum-FD), and the optimiser step; and
PRESETS, the methods as named flag sets.

Each piece is a function of (model, batch, radii, args); attacks and regularisers come from attacks.py.
"""
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

import attacks
import utils

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
    epoch), the PGD radius and FGSM multiplier (SVHN's warm-up), and the regularisers' radius; SVHN's warm-up
    factor itself (N-FGSM ramps its noise and clip with it); and the coefficients that a schedule sets at every
    iteration ({flag: 0-d tensor}, ELLE-A's lambda), which the same radii share from one iteration to the next."""
    eps: float
    fgsm_eps: float
    pgd_eps: float
    fgsm_alpha: float
    reg_eps: float
    warmup: float = 1.0
    coefficients: dict = field(default_factory=dict, compare=False)


def single_step(args):
    """FGSM or N-FGSM: one signed step from a start whose gradient the regularisers may reuse as a constant."""
    return args.attack in ("fgsm", "n_fgsm")


def carries_perturbation(args):
    """Free-AT: FGSM on replayed batches, each step starting from the last perturbation (the original replays
    batches for any attack, but only its FGSM branch keeps a perturbation)."""
    return args.attack == "fgsm" and args.minibatch_replay > 1


def fgsm_start(x, radii, args, carried):
    """FGSM's starting point: the carried perturbation (Free-AT), zero, or uniform in the full eps-ball (on the
    grid under VFSAT; in the epoch's ball with --fix_vfsat_start)."""
    if carries_perturbation(args):
        return torch.zeros_like(x) if carried is None else carried
    if args.attack_init == "zero":
        return torch.zeros_like(x)
    return attacks.uniform_delta(x, radii.fgsm_eps if args.fix_vfsat_start else radii.eps, on_grid=args.discrete_eps)


def perturb(model, x, y, radii, args, loss_scale, carried=None):
    """The training perturbation, and the input gradient the regularisers may use: FGSM's at its start, or, for
    PGD and no attack, the original's extra gradient at x (differentiable where a regulariser's term goes through
    it)."""
    differentiable = any(r.weight(args) > 0 and r.through_attack_grad(args) for r in REGULARISERS)
    if args.attack == "n_fgsm":
        eps = radii.warmup * radii.fgsm_eps
        return attacks.n_fgsm(model, x, y, radii.fgsm_alpha * radii.fgsm_eps, args.n_fgsm_noise * eps,
                              args.n_fgsm_clip * eps, loss_scale)
    if args.attack == "fgsm":
        start = fgsm_start(x, radii, args, carried)
        grad = attacks.input_grad(model, x, start.requires_grad_(differentiable), y, create_graph=differentiable,
                                  loss_scale=loss_scale)[0]
        radius = attacks.uniform_delta(x, radii.eps, on_grid=True) if args.mast else radii.fgsm_eps
        return attacks.fgsm_step(x, start.detach(), grad, radii.fgsm_eps, radius, radii.fgsm_alpha), grad
    delta = torch.zeros_like(x)
    if args.attack in ("pgd", "pgd_corner"):
        start = attacks.uniform_delta(x, radii.pgd_eps) if args.attack_init == "random" else delta
        delta = attacks.pgd_train(model, x, y, radii.pgd_eps, args.pgd_alpha_train / 255, args.pgd_train_n_iters,
                                  start, loss_scale)
        if args.attack == "pgd_corner":
            delta = attacks.corner(x, delta, radii.eps)
    grad_x = attacks.input_grad(model, x, torch.zeros_like(x), y, clip=False, create_graph=differentiable,
                                loss_scale=loss_scale)[0]
    return delta, grad_x


# ---------------------------------------------------------------- regularisers

def grad_align(model, x, y, radii, args, grad, loss_scale):
    """GradAlign's 1 - mean cosine; its first gradient is the attack's (a constant for FGSM, differentiated
    through for PGD/none, as the original)."""
    first = grad.detach() if single_step(args) else grad
    return attacks.grad_align_penalty(model, x, y, radii.reg_eps, first, loss_scale,
                                      empty_is_zero=args.fix_gradalign_empty)


def grad_sum_reuses_attack_grad(args):
    """The original's GradSum with a random start is the norm of the attack's gradient, not of a new one at a
    random point (--fix_gradsum keeps that for FGSM only, whose start gradient it differentiates; N-FGSM, which
    the original does not have, takes a new point)."""
    return (args.attack_init == "random" and args.attack != "n_fgsm"
            and not (args.fix_gradsum and args.attack != "fgsm"))


def grad_sum_is_constant(args):
    """Where the original's GradSum term is a detached constant: it reuses an attack gradient that is not
    differentiable (FGSM's, or PGD/none's unless GradAlign differentiates it)."""
    return (grad_sum_reuses_attack_grad(args) and not args.fix_gradsum
            and (single_step(args) or not args.grad_align_cos_lambda))


def grad_sum(model, x, y, radii, args, grad, loss_scale):
    """GradSum's unscaled norm: of the attack's gradient where the original reuses it, else of the gradient at a
    random grid point of the ball (double backprop)."""
    if grad_sum_reuses_attack_grad(args):
        return attacks.l2_norm(grad)
    return attacks.grad_sum_penalty(model, x, y, radii.reg_eps, loss_scale)


def grad_sum_fd(model, x, y, radii, args, grad, loss_scale):
    """GradSum-FD: GradSum's norm at a random grid point of the ball by a finite difference (no double backprop)."""
    return attacks.grad_sum_fd_penalty(model, x, y, radii.reg_eps, args.grad_input_sum_fd_step / 255, loss_scale)


def elle(model, x, y, radii, args, grad, loss_scale):
    """ELLE's linearity error at three random points of the ball."""
    return attacks.linearity_error(lambda z: F.cross_entropy(model(z), y.repeat(3), reduction="none"), x,
                                   radii.reg_eps)


@dataclass(frozen=True)
class Regulariser:
    """A term added to the training loss as coefficient * term(model, x, y, radii, args, attack_grad, loss_scale).

    Everything else derives from this row: the coefficient flag and its check, the run name, the per-step
    statistic and its health warning, and whether the double backprop needs the models' double-backward set-up."""
    name: str  # as in the paper and the log
    flag: str  # the coefficient's flag; 0 turns the term off
    tag: str  # its part of the run name (with the coefficient)
    term: Callable
    stat: str  # the step statistic it fills (STATS): "reg" logs coefficient * term (as the original), others the term
    through_attack_grad: Callable = lambda args: False  # the term differentiates the attack's input gradient
    logged_by: str | None = None  # a flag that computes and logs the term even when its coefficient is 0
    double_backprop: bool = True
    help: str = ""  # what the flag's help adds to "NAME coefficient (0: off)"

    def weight(self, args):
        return getattr(args, self.flag)

    def computed(self, args):
        return self.weight(args) > 0 or bool(self.logged_by and getattr(args, self.logged_by))


# In the order of the original's forward passes (each moves BatchNorm statistics and draws a random point).
REGULARISERS = (
    Regulariser("GradAlign", "grad_align_cos_lambda", "gradalign", grad_align, "reg",
                through_attack_grad=lambda args: not single_step(args)),
    Regulariser("GradSum", "grad_input_sum_coeff", "gradsum", grad_sum, "gis",
                through_attack_grad=lambda args: args.fix_gradsum and args.attack == "fgsm"
                and args.attack_init == "random", logged_by="print_g_i_s"),
    Regulariser("GradSum-FD", "grad_input_sum_fd_coeff", "gradsumfd", grad_sum_fd, "gis", double_backprop=False),
    Regulariser("ELLE", "elle_lambda", "elle", elle, "elle", double_backprop=False,
                help=" (with --elle_adaptive its maximum)"),
)
STATS = ("reg", "gis", "elle")  # the regularisers' step statistics, each zero where no term fills it


class AdaptiveLambda:
    """ELLE-A's coefficient (its code's lambda_schedule onoff): 0 at first; after each iteration, lambda_max where
    that iteration's linearity error exceeds the mean + sensitivity x the (population) standard deviation of all
    earlier ones, once there are three, else lambda x decay. Device tensors updated in place (float64, as its
    numpy): no host sync, and a CUDA graph that reads `value` reads the current one."""

    def __init__(self, lambda_max, decay, sensitivity, device):
        self.lambda_max, self.decay, self.sensitivity = lambda_max, decay, sensitivity
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.value, self.count, self.mean, self.m2 = zero(), zero(), zero(), zero()  # Welford's running moments

    def update(self, error):
        error = error.detach().to(torch.float64)
        std = (self.m2 / self.count.clamp_min(1)).sqrt()
        jump = (self.count > 2) & (error > self.mean + self.sensitivity * std)
        self.value.copy_(torch.where(jump, self.lambda_max, self.value * self.decay))
        self.count += 1
        change = error - self.mean
        self.mean += change / self.count
        self.m2 += change * (error - self.mean)

    def state_dict(self):
        return {k: getattr(self, k).cpu() for k in ("value", "count", "mean", "m2")}

    def load_state_dict(self, state):
        for k, v in state.items():
            getattr(self, k).copy_(v)



def losses(model, x, y, radii, args, loss_scale, carried=None, net=None):
    """Training loss (cross-entropy, then each regulariser's weighted term, as the original sums them) and its
    parts, in the order of the original's forward passes (which all move BatchNorm statistics)."""
    delta, grad = perturb(model, x, y, radii, args, loss_scale, carried)
    delta = delta.detach()
    logits = (net or model)(x + delta)
    total = ce = F.cross_entropy(logits, y)
    stats = {"ce": ce.detach(), **{k: torch.zeros((), device=x.device) for k in STATS}}
    for r in (r for r in REGULARISERS if r.computed(args)):
        term = r.term(model, x, y, radii, args, grad, loss_scale)
        weight = radii.coefficients.get(r.flag, r.weight(args))  # ELLE-A's lambda of this iteration
        weight = weight.to(term.dtype) if torch.is_tensor(weight) else weight  # as its float lambda times a tensor
        if r.weight(args) > 0:
            total = total + weight * term
        stats[r.stat] = (weight * term if r.stat == "reg" else term).detach()
    stats.update({"loss": total.detach(), "delta_abs": delta.abs().mean(), "correct": (logits.argmax(1) == y).sum(),
                  "grad_zero": (attacks.sign(grad) == 0).float().mean()})  # where a signed step moves nothing
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
    if not update:
        return scaled_losses(model, scaler, autocast, x, y, radii, args, carried, net)[1:]
    opt.zero_grad(set_to_none=True)
    stats, delta = forward_backward(model, scaler, autocast, x, y, radii, args, carried, net)
    optimiser_step(model, opt, scaler, args)
    return stats, delta


def scaled_losses(model, scaler, autocast, x, y, radii, args, carried=None, net=None):
    """losses() under autocast, its double backprop at the scaler's loss scale: (total, statistics, perturbation)."""
    loss_scale = scaler.scale(torch.ones((), device=x.device))  # a tensor: reading it would sync
    with autocast:
        return losses(model, x, y, radii, args, loss_scale, carried, net)


def forward_backward(model, scaler, autocast, x, y, radii, args, carried=None, net=None):
    """The losses and the loss-scaled backward into the parameters' .grad: (statistics, perturbation)."""
    total, stats, delta = scaled_losses(model, scaler, autocast, x, y, radii, args, carried, net)
    scaler.scale(total).backward()
    return stats, delta


def optimiser_step(model, opt, scaler, args):
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
    scaler.step(opt)
    scaler.update()
    if args.weight_clip:
        clip_weights(model)


class GraphedSteps:
    """Training iterations (update=True, one process, no carried perturbation) replayed from a CUDA graph
    (--cuda_graph): a regularised iteration launches over a thousand kernels, and on a fast GPU the host's launch
    time then exceeds the GPU's work.

    The second iteration in a row with the same batch shape and radii captures the losses and the scaled backward
    (replacing the graph of other ones); later ones with those copy their batch into the graph's inputs and replay
    it; the unscale, clip and optimiser step run eagerly after it (GradScaler's step syncs). Other iterations (the
    first, an epoch's last partial batch, one after the radii change) run eagerly, on a side stream, as capture
    needs, and keep the graph. The graph writes its own gradient tensors, which the parameters' .grad point to
    again after each replay. Random draws come from the graph's own offsets of the generator: the same
    distributions as an eager run, other numbers. A capture that fails (say, out of memory for the graph's pool)
    is logged once, and the run goes on eagerly."""

    def __init__(self, model, opt, scaler, autocast, args):
        self.model, self.opt, self.scaler, self.autocast, self.args = model, opt, scaler, autocast, args
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.previous = self.key = self.graph = self.side = self.failure = None

    def __call__(self, x, y, radii):
        key = (tuple(x.shape), x.dtype, radii)
        previous, self.previous = self.previous, key
        if key == self.key and not self.failure:
            return self._replay(x, y)
        stats = self._eager(x, y, radii)
        if key == previous and not self.failure:
            self._capture(x, y, radii, key)
        return stats

    def _replay(self, x, y):
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        for p, grad in zip(self.params, self.grads, strict=True):
            p.grad = grad  # an eager iteration since the capture left the parameters other .grad tensors
        optimiser_step(self.model, self.opt, self.scaler, self.args)
        return self.stats

    def _eager(self, x, y, radii):
        self.side = self.side or torch.cuda.Stream()
        return utils.on_side_stream(self.side, lambda: train_step(self.model, self.opt, self.scaler, self.autocast, x,
                                                                  y, radii, self.args)[0])

    def _capture(self, x, y, radii, key):
        self.graph = self.key = self.stats = self.grads = None  # the old graph's pool is freed before the new one
        self.x, self.y, self.radii = x.clone(), y.clone(), radii
        self.opt.zero_grad(set_to_none=True)  # the graph allocates the .grad tensors it writes
        graph, out = utils.capture_graph(self.captured)
        if graph is None:  # nothing ran: the eager steps after it start from zeroed gradients
            self.failure = out
            logging.getLogger(utils.LOGGER).warning(f"warning: --cuda_graph: the capture failed ({out}); the run goes "
                                                    "on without CUDA graphs")
            return
        self.graph, self.key, self.stats, self.grads = graph, key, out, [p.grad for p in self.params]

    def captured(self):
        """What the graph holds: the losses and backward on its input tensors (run once, at capture)."""
        return forward_backward(self.model, self.scaler, self.autocast, self.x, self.y, self.radii, self.args)[0]


# ---------------------------------------------------------------- presets

class Preset(NamedTuple):
    flags: str  # what --preset NAME stands for, in its place on the command line
    what: str  # the method, for docs/iteration.md's table (markdown)


FGSM = "--attack=fgsm --attack_init=zero --fgsm_alpha=1.0"  # FGSM as the paper's scripts run it
PRESETS = {  # --preset NAME: these flags in its place (flags after it override them); eps, schedule etc. apart
    "standard": Preset("--attack=none", "no attack (the original's extra gradient at x is still taken)"),
    "fgsm": Preset(FGSM, "FGSM-AT as the paper's scripts run it"),
    "fgsm_rs": Preset("--attack=fgsm --attack_init=random --fgsm_alpha=1.25", 'FGSM-RS ("Fast is better than free")'),
    "vfsat": Preset(f"{FGSM} --discrete_eps", "the paper's VFSAT"),
    "gradsum": Preset(f"{FGSM} --grad_input_sum_coeff=10", "the paper's GradSum, its λ for CIFAR-10"),
    "gradalign": Preset(f"{FGSM} --grad_align_cos_lambda=0.2", "GradAlign, its paper's λ at eps 8 (the original's "
                        "results file used 20 and 24: `sh/cifar10_table.tsv`)"),
    "pgd": Preset("--attack=pgd --attack_init=zero --pgd_train_n_iters=10 --pgd_alpha_train=2",
                  "PGD-10 training, step 2/255"),
    "free": Preset(f"{FGSM} --minibatch_replay=8", "Free-AT (m = 8) as the original's loop runs it"),
    # peers, with their papers' defaults at eps 8 (ELLE's lambda grows with eps: sh/cifar10_table.tsv)
    "n_fgsm": Preset("--attack=n_fgsm --fgsm_alpha=1.0 --n_fgsm_noise=2 --n_fgsm_clip=0",
                     "N-FGSM: noise 2 eps, step eps, no projection ([peers.md](peers.md))"),
    "elle": Preset(f"{FGSM} --elle_lambda=1000", "ELLE, its λ up to eps 8 (5000 from 10 to 20)"),
    "elle_a": Preset(f"{FGSM} --elle_lambda=4000 --elle_adaptive", "ELLE-A: adaptive λ up to 4000"),
    "gradsum_fd": Preset(f"{FGSM} --grad_input_sum_fd_coeff=10",
                         "GradSum's λ, its norm by a finite difference (no double backprop)"),
}


def grad_scaler(args):
    """GradScaler's loss scaling, on for fp16 autocast only (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(args.device.type, enabled=args.half_prec and args.amp_dtype == "float16")


def current_loss_scale(scaler):
    """The scaler's loss scale (a host sync), None when it does not scale."""
    return scaler.get_scale() if scaler.is_enabled() else None


def autocast_context(args):
    if not args.half_prec:
        return nullcontext()
    # autocast's cache of cast weights would hold tensors of a graph's capture beyond it
    return torch.autocast(args.device.type, dtype=getattr(torch, args.amp_dtype), cache_enabled=not args.cuda_graph)
