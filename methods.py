"""One training iteration of every method, as the original computes it: the training perturbation (FGSM,
FGSM-RS, VFSAT, MAST, Free-AT, PGD; and N-FGSM as its authors' code computes it), the regularisers
(REGULARISERS: GradAlign, GradSum; ELLE and ELLE-A as their code, GradSum-FD), the optimiser step, and
TrainingStep, which owns them for a run; and PRESETS, the methods as named flag sets.

The flags are read once, into StepSettings (the Attack and each regulariser's Term); below it every function
takes those records, and attacks and regularisers come from attacks.py.
"""
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

import attacks
import schedules
import utils

GRAD_CLIP_NORM = 20.0  # max L2 norm of the parameter gradient
SGD_MOMENTUM = 0.9
WEIGHT_CLIP_AT, WEIGHT_CLIP_TO = 0.2, 0.1  # --weight_clip: |w| >= 0.2 becomes 0.1 with w's sign (the original's)


@dataclass
class StepRadii:
    """What one iteration's attack uses, in [0, 1] units: the evaluation eps, the FGSM radius (VFSAT's eps of the
    epoch), the PGD radius and FGSM multiplier (SVHN's warm-up), and the regularisers' radius; and SVHN's warm-up
    factor itself (N-FGSM ramps its noise and clip with it)."""
    eps: float
    fgsm_eps: float
    pgd_eps: float
    fgsm_alpha: float
    reg_eps: float
    warmup: float = 1.0


SVHN_WARMUP_EPOCHS = 5  # SVHN: eps (PGD) and fgsm_alpha ramp from 0 over this many epochs of iterations


@dataclass(frozen=True)
class RadiiSchedule:
    """The radii of every iteration, read from the flags once: VFSAT's eps of the epoch, SVHN's warm-up."""
    eps_px: float
    fgsm_alpha: float
    discrete_eps: bool
    fix_vfsat_list: bool
    vfsat_reg_eps: bool
    warmup_iters: int | None  # SVHN's warm-up (the original's count: epochs of the full training set), else None

    @classmethod
    def from_flags(cls, args, n_train_full):
        warmup = SVHN_WARMUP_EPOCHS * n_train_full // args.batch_size if args.dataset == "svhn" else None
        return cls(args.eps, args.fgsm_alpha, args.discrete_eps, args.fix_vfsat_list, args.vfsat_reg_eps, warmup)

    def training_eps_px(self, epoch):
        return schedules.training_eps(self.eps_px, epoch, self.discrete_eps, self.fix_vfsat_list)

    def __call__(self, epoch, iteration):
        """The StepRadii of this iteration (optimiser steps so far, this one included) in this epoch."""
        warmup = 1.0 if self.warmup_iters is None else min(iteration / self.warmup_iters, 1.0)
        vfsat_eps = self.training_eps_px(epoch) / 255
        eps = self.eps_px / 255
        return StepRadii(eps=eps, fgsm_eps=vfsat_eps, pgd_eps=warmup * self.eps_px / 255,
                         fgsm_alpha=warmup * self.fgsm_alpha, warmup=warmup,
                         reg_eps=vfsat_eps if self.vfsat_reg_eps else eps)


@dataclass(frozen=True)
class Attack:
    """The training attack, read from its flags once; radii come with each iteration (StepRadii)."""
    kind: str  # fgsm, n_fgsm, pgd, pgd_corner or none
    random_start: bool  # --attack_init=random
    start_in_epoch_ball: bool  # --fix_vfsat_start: FGSM's random start in VFSAT's ball of the epoch
    on_grid: bool  # --discrete_eps: random starts on the 1/255 grid
    mast: bool
    n_fgsm_noise: float  # N-FGSM: multiples of eps
    n_fgsm_clip: float
    pgd_iters: int
    pgd_step: float  # [0, 1] units
    replay: int  # --minibatch_replay: iterations per batch

    @classmethod
    def from_flags(cls, args):
        return cls(args.attack, args.attack_init == "random", args.fix_vfsat_start, args.discrete_eps, args.mast,
                   args.n_fgsm_noise, args.n_fgsm_clip, args.pgd_train_n_iters, args.pgd_alpha_train / 255,
                   args.minibatch_replay)

    @property
    def single_step(self):
        """FGSM or N-FGSM: one signed step from a start whose gradient the regularisers may reuse as a constant."""
        return self.kind in ("fgsm", "n_fgsm")

    @property
    def carries(self):
        """Free-AT: FGSM on replayed batches, each step starting from the last perturbation (the original replays
        batches for any attack, but only its FGSM branch keeps a perturbation)."""
        return self.kind == "fgsm" and self.replay > 1


def fgsm_start(x, radii, attack, carried):
    """FGSM's starting point: the carried perturbation (Free-AT), zero, or uniform in the full eps-ball (on the
    grid under VFSAT; in the epoch's ball with --fix_vfsat_start)."""
    if attack.carries:
        return torch.zeros_like(x) if carried is None else carried
    if not attack.random_start:
        return torch.zeros_like(x)
    return attacks.uniform_delta(x, radii.fgsm_eps if attack.start_in_epoch_ball else radii.eps, on_grid=attack.on_grid)


def perturb(model, x, y, radii, attack, differentiable, loss_scale, carried=None):
    """The training perturbation, and the input gradient the regularisers may use: FGSM's at its start, or, for
    PGD and no attack, the original's extra gradient at x (differentiable where a regulariser's term goes through
    it)."""
    if attack.kind == "n_fgsm":
        eps = radii.warmup * radii.fgsm_eps
        return attacks.n_fgsm(model, x, y, radii.fgsm_alpha * radii.fgsm_eps, attack.n_fgsm_noise * eps,
                              attack.n_fgsm_clip * eps, loss_scale)
    if attack.kind == "fgsm":
        start = fgsm_start(x, radii, attack, carried)
        grad = attacks.input_grad(model, x, start.requires_grad_(differentiable), y, create_graph=differentiable,
                                  loss_scale=loss_scale)[0]
        radius = attacks.uniform_delta(x, radii.eps, on_grid=True) if attack.mast else radii.fgsm_eps
        return attacks.fgsm_step(x, start.detach(), grad, radii.fgsm_eps, radius, radii.fgsm_alpha), grad
    delta = torch.zeros_like(x)
    if attack.kind in ("pgd", "pgd_corner"):
        start = attacks.uniform_delta(x, radii.pgd_eps) if attack.random_start else delta
        delta = attacks.pgd_train(model, x, y, radii.pgd_eps, attack.pgd_step, attack.pgd_iters, start, loss_scale)
        if attack.kind == "pgd_corner":
            delta = attacks.corner(x, delta, radii.eps)
    grad_x = attacks.input_grad(model, x, torch.zeros_like(x), y, clip=False, create_graph=differentiable,
                                loss_scale=loss_scale)[0]
    return delta, grad_x


# ---------------------------------------------------------------- regularisers
# Each is term(model, x, y, radii, attack_grad, loss_scale, options) -> a scalar, options its row's own record.

class GradAlignOptions(NamedTuple):
    first_is_constant: bool  # the attack's gradient is a constant (FGSM, N-FGSM), else differentiated (PGD, none)
    empty_is_zero: bool  # --fix_gradalign_empty


def grad_align(model, x, y, radii, grad, loss_scale, options):
    """GradAlign's 1 - mean cosine; its first gradient is the attack's (a constant for FGSM, differentiated
    through for PGD/none, as the original)."""
    first = grad.detach() if options.first_is_constant else grad
    return attacks.grad_align_penalty(model, x, y, radii.reg_eps, first, loss_scale,
                                      empty_is_zero=options.empty_is_zero)


def grad_sum_reuses_attack_grad(args):
    """The original's GradSum with a random start is the norm of the attack's gradient, not of a new one at a
    random point (--fix_gradsum keeps that for FGSM only, whose start gradient it differentiates; N-FGSM, which
    the original does not have, takes a new point)."""
    return (args.attack_init == "random" and args.attack != "n_fgsm"
            and not (args.fix_gradsum and args.attack != "fgsm"))


def grad_sum(model, x, y, radii, grad, loss_scale, reuses_attack_grad):
    """GradSum's unscaled norm: of the attack's gradient where the original reuses it, else of the gradient at a
    random grid point of the ball (double backprop)."""
    if reuses_attack_grad:
        return attacks.l2_norm(grad)
    return attacks.grad_sum_penalty(model, x, y, radii.reg_eps, loss_scale)


def grad_sum_fd(model, x, y, radii, grad, loss_scale, step):
    """GradSum-FD: GradSum's norm at a random grid point of the ball by a finite difference (no double backprop);
    step in [0, 1] units."""
    return attacks.grad_sum_fd_penalty(model, x, y, radii.reg_eps, step, loss_scale)


def elle(model, x, y, radii, grad, loss_scale, options):
    """ELLE's linearity error at three random points of the ball."""
    return attacks.linearity_error(lambda z: F.cross_entropy(model(z), y.repeat(3), reduction="none"), x,
                                   radii.reg_eps)


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


class ElleOptions(NamedTuple):
    adaptive: bool  # ELLE-A
    decay: float
    sensitivity: float


def flag(kind=float, default=0.0, help=""):  # noqa: A002 (argparse's own keyword)
    """A flag of a registry row: argparse's add_argument keywords (a bool is a switch)."""
    if kind is bool:
        return {"action": "store_true", "help": help}
    return {"type": kind, "default": default, "help": help}


def no_options(args):
    return None


@dataclass(frozen=True)
class Regulariser:
    """A term added to the training loss as coefficient * term(model, x, y, radii, attack_grad, loss_scale,
    options), options being what options(args) reads of its flags once.

    Everything else derives from this row: its flags (the coefficient's and `flags`) and their checks, the run
    name, the per-step statistic `stat` (`train_<stat>` in metrics.jsonl) and its health warning, whether the
    double backprop needs the models' double-backward set-up, and the coefficient's schedule, if any."""
    name: str  # as in the paper and the log
    flag: str  # the coefficient's flag; 0 turns the term off
    tag: str  # its part of the run name (with the coefficient)
    term: Callable
    stat: str  # the step statistic it fills: the term (weighted with stat_weighted, as the original's GradAlign)
    options: Callable = no_options  # args -> the term's own settings
    through_attack_grad: Callable = lambda args: False  # the term differentiates the attack's input gradient
    logged_by: str | None = None  # a flag that computes and logs the term even when its coefficient is 0
    double_backprop: bool = True
    help: str = ""  # what the flag's help adds to "NAME coefficient (0: off)"
    flags: tuple = ()  # its other flags: (name, flag(...)), declared in train.py's regulariser group after it
    tags: tuple = ()  # (switch flag, run-name part) of its other switches
    schedule: Callable | None = None  # (Term, device) -> None or a schedule: value (0-d tensor), update(stat), state
    stat_weighted: bool = False
    refuse: Callable = lambda args: ()  # args -> (flag, what is wrong) for each refused value of its flags

    def weight(self, args):
        return getattr(args, self.flag)

    def computed(self, args):
        return self.weight(args) > 0 or bool(self.logged_by and getattr(args, self.logged_by))


def refuse_grad_sum_fd(args):
    if args.grad_input_sum_fd_step <= 0:
        yield "grad_input_sum_fd_step", "must be positive"
    if args.grad_input_sum_coeff and args.grad_input_sum_fd_coeff:
        yield "grad_input_sum_fd_coeff", ("GradSum-FD estimates the GradSum term: use it or --grad_input_sum_coeff, "
                                          "not both")


def refuse_elle(args):
    if args.elle_decay <= 0:
        yield "elle_decay", "must be positive"
    if args.elle_sensitivity < 0:
        yield "elle_sensitivity", "must be zero or positive"
    if args.elle_adaptive and args.elle_lambda <= 0:
        yield "elle_adaptive", "needs --elle_lambda, its maximum lambda"


def adaptive_lambda(term, device):
    o = term.options
    return AdaptiveLambda(term.coefficient, o.decay, o.sensitivity, device) if o.adaptive else None


# In the order of the original's forward passes (each moves BatchNorm statistics and draws a random point).
REGULARISERS = (
    Regulariser("GradAlign", "grad_align_cos_lambda", "gradalign", grad_align, "reg", stat_weighted=True,
                options=lambda a: GradAlignOptions(Attack.from_flags(a).single_step, a.fix_gradalign_empty),
                through_attack_grad=lambda args: not Attack.from_flags(args).single_step),
    Regulariser("GradSum", "grad_input_sum_coeff", "gradsum", grad_sum, "gis", options=grad_sum_reuses_attack_grad,
                through_attack_grad=lambda args: args.fix_gradsum and args.attack == "fgsm"
                and args.attack_init == "random", logged_by="print_g_i_s",
                flags=(("print_g_i_s", flag(bool, help="compute and log the GradSum norm even when its coefficient "
                                                       "is 0")),)),
    Regulariser("GradSum-FD", "grad_input_sum_fd_coeff", "gradsumfd", grad_sum_fd, "gis", double_backprop=False,
                options=lambda a: a.grad_input_sum_fd_step / 255,
                refuse=refuse_grad_sum_fd,
                flags=(("grad_input_sum_fd_step", flag(default=0.5, help="GradSum-FD: the finite difference's move, "
                        "pixels/255 per pixel in RMS (its error against GradSum: docs/peers.md)")),)),
    Regulariser("ELLE", "elle_lambda", "elle", elle, "elle", double_backprop=False,
                help=" (with --elle_adaptive its maximum)", schedule=adaptive_lambda,
                options=lambda a: ElleOptions(a.elle_adaptive, a.elle_decay, a.elle_sensitivity),
                flags=(("elle_adaptive", flag(bool, help="ELLE-A: ELLE's lambda starts at 0, jumps to --elle_lambda "
                        "when the linearity error exceeds its running mean + --elle_sensitivity std, else decays")),
                       ("elle_decay", flag(default=0.99, help="ELLE-A: lambda's factor at each iteration without a "
                                                              "jump")),
                       ("elle_sensitivity", flag(default=2.0, help="ELLE-A: standard deviations above the mean "
                                                                   "that make lambda jump"))),
                tags=(("elle_adaptive", "adaptive"),), refuse=refuse_elle),
)


def stat_keys():
    """The regularisers' step statistics, each zero where no term fills it (train_<key> in metrics.jsonl)."""
    return tuple(dict.fromkeys(r.stat for r in REGULARISERS))


@dataclass(frozen=True)
class Term:
    """A regulariser of this run, read from its flags once."""
    row: Regulariser
    coefficient: float  # 0: computed and logged only (logged_by)
    through_attack_grad: bool
    options: Any  # the row's own record

    def __call__(self, model, x, y, radii, grad, loss_scale):
        return self.row.term(model, x, y, radii, grad, loss_scale, self.options)


@dataclass(frozen=True)
class StepSettings:
    """Everything a training iteration reads of the flags: the attack, the computed regularisers' terms (in
    REGULARISERS' order), the optimiser and the precision."""
    attack: Attack
    terms: tuple  # of Term
    adam: bool  # Adam (the original's CNN) or SGD with momentum (its ResNets)
    lr: float
    weight_decay: float
    weight_clip: bool
    half_dtype: torch.dtype | None  # autocast's, None: fp32
    cuda_graph: bool

    @classmethod
    def from_flags(cls, args):
        terms = tuple(Term(r, r.weight(args), r.through_attack_grad(args), r.options(args))
                      for r in REGULARISERS if r.computed(args))
        return cls(Attack.from_flags(args), terms, args.model == "cnn", args.lr_max, args.weight_decay,
                   args.weight_clip, getattr(torch, args.amp_dtype) if args.half_prec else None, args.cuda_graph)

    @property
    def differentiable(self):
        """The attack's input gradient is differentiated (a regulariser in effect goes through it)."""
        return any(t.coefficient > 0 and t.through_attack_grad for t in self.terms)

    @property
    def loss_scaling(self):
        """GradScaler's loss scaling: fp16 autocast only (bf16 has fp32's exponent range)."""
        return self.half_dtype == torch.float16


def uses_double_backprop(args):
    return any(r.double_backprop and r.computed(args) for r in REGULARISERS)


def build_optimizer(model, settings):
    if settings.adam:
        return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=SGD_MOMENTUM,
                           weight_decay=settings.weight_decay)


def autocast_context(settings, device):
    if settings.half_dtype is None:
        return nullcontext()
    # autocast's cache of cast weights would hold tensors of a graph's capture beyond it
    return torch.autocast(device.type, dtype=settings.half_dtype, cache_enabled=not settings.cuda_graph)


def losses(model, x, y, radii, settings, loss_scale, carried=None, net=None, coefficients=None):
    """Training loss (cross-entropy, then each regulariser's weighted term, as the original sums them) and its
    parts, in the order of the original's forward passes (which all move BatchNorm statistics); coefficients
    ({flag: 0-d tensor}) are the schedules' of this iteration."""
    delta, grad = perturb(model, x, y, radii, settings.attack, settings.differentiable, loss_scale, carried)
    delta = delta.detach()
    logits = (net or model)(x + delta)
    total = ce = F.cross_entropy(logits, y)
    stats = {"ce": ce.detach(), **{k: torch.zeros((), device=x.device) for k in stat_keys()}}
    for t in settings.terms:
        term = t(model, x, y, radii, grad, loss_scale)
        weight = (coefficients or {}).get(t.row.flag, t.coefficient)  # ELLE-A's lambda of this iteration
        weight = weight.to(term.dtype) if torch.is_tensor(weight) else weight  # as its float lambda times a tensor
        if t.coefficient > 0:
            total = total + weight * term
        stats[t.row.stat] = (weight * term if t.row.stat_weighted else term).detach()
    stats.update({"loss": total.detach(), "delta_abs": delta.abs().mean(), "correct": (logits.argmax(1) == y).sum(),
                  "grad_zero": (attacks.sign(grad) == 0).float().mean()})  # where a signed step moves nothing
    return total, stats, delta


def clip_weights(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.where(p < WEIGHT_CLIP_AT, p, WEIGHT_CLIP_TO))
            p.copy_(torch.where(p > -WEIGHT_CLIP_AT, p, -WEIGHT_CLIP_TO))


class TrainingStep:
    """The training iterations of one run: built once from its model and StepSettings, it owns the optimiser, the
    loss scaler, autocast, the CUDA graphs (--cuda_graph), Free-AT's carried perturbation and the regularisers'
    coefficient schedules (ELLE-A's lambda). step(x, y, radii) returns per-step statistics (device tensors, no
    sync).

    fast is what the attacks and regularisers run (the model compiled with --compile); net, the model wrapped for
    data-parallel training (DDP): the training loss goes through it, so its backward averages the gradients (the
    regularisers' included) over processes."""

    def __init__(self, model, settings, device, fast=None, net=None):
        self.model, self.fast, self.net, self.settings = model, model if fast is None else fast, net, settings
        self.opt = build_optimizer(model, settings)
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.loss_scaling)
        self.autocast = autocast_context(settings, device)
        self.schedules = {t.row.flag: s for t in settings.terms if t.row.schedule
                          for s in [t.row.schedule(t, device)] if s is not None}
        self.stat_of = {t.row.flag: t.row.stat for t in settings.terms}
        self.carried = None  # Free-AT's perturbation
        self.graphed = GraphedSteps(self) if settings.cuda_graph else None

    def __call__(self, x, y, radii, update=True):
        """One iteration: the losses, then (if update) one optimiser step and the schedules' update; without
        update (the original's epoch 0) only the forward passes, which move BatchNorm statistics."""
        if self.graphed and update:  # no Free-AT under graphs: nothing is carried
            stats = self.graphed(x, y, radii)
        else:
            if update:
                stats, delta = self.update(x, y, radii, self.carried, self.net)
            else:
                _, stats, delta = self.scaled_losses(x, y, radii, self.carried)
            if self.settings.attack.carries:
                self.carried = delta
        for flag, schedule in self.schedules.items() if update else ():
            schedule.update(utils.global_mean(stats[self.stat_of[flag]]))  # every process keeps the same value
        return stats

    def update(self, x, y, radii, carried=None, net=None):
        """The losses, backward and optimiser step: (statistics, perturbation)."""
        self.opt.zero_grad(set_to_none=True)
        stats, delta = self.forward_backward(x, y, radii, carried, net)
        self.optimiser_step()
        return stats, delta

    def scaled_losses(self, x, y, radii, carried=None, net=None):
        """losses() under autocast, its double backprop at the scaler's loss scale: (total, statistics,
        perturbation)."""
        loss_scale = self.scaler.scale(torch.ones((), device=x.device))  # a tensor: reading it would sync
        coefficients = {flag: s.value for flag, s in self.schedules.items()}
        with self.autocast:
            return losses(self.fast, x, y, radii, self.settings, loss_scale, carried, net, coefficients)

    def forward_backward(self, x, y, radii, carried=None, net=None):
        """The losses and the loss-scaled backward into the parameters' .grad: (statistics, perturbation)."""
        total, stats, delta = self.scaled_losses(x, y, radii, carried, net)
        self.scaler.scale(total).backward()
        return stats, delta

    def optimiser_step(self):
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM)
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.settings.weight_clip:
            clip_weights(self.model)

    def loss_scale(self):
        """The scaler's loss scale (a host sync), None when it does not scale."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def state_dict(self):
        """What every process shares (the optimiser and the scaler)."""
        return {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict()}

    def own_state(self):
        """What is this process's own: Free-AT's perturbation, and the schedules (kept per process, as before)."""
        return {"carried_delta": None if self.carried is None else self.carried.detach().cpu(),
                "schedules": {flag: s.state_dict() for flag, s in self.schedules.items()}}

    def load_state_dict(self, shared, own, device):
        self.opt.load_state_dict(shared["optimizer"])
        self.scaler.load_state_dict(shared["scaler"])
        self.carried = None if own["carried_delta"] is None else own["carried_delta"].to(device)
        saved = own.get("schedules", {"elle_lambda": own.get("elle_a")})  # checkpoints before schedules had names
        for flag, schedule in self.schedules.items():
            schedule.load_state_dict(saved[flag])


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

    def __init__(self, step):
        self.step, self.model, self.opt = step, step.model, step.opt
        self.params = [p for p in step.model.parameters() if p.requires_grad]
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
        self.step.optimiser_step()
        return self.stats

    def _eager(self, x, y, radii):
        self.side = self.side or torch.cuda.Stream()
        return utils.on_side_stream(self.side, lambda: self.step.update(x, y, radii)[0])

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
        return self.step.forward_backward(self.x, self.y, self.radii)[0]


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
