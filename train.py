"""Single-step adversarial training with local smoothing (VFSAT, GradSum), GradAlign, PGD-k and Free-AT.

    python train.py --attack=fgsm --eps=8 --grad_input_sum_coeff=10 --data_dir=DIR ...

Every pixel-valued flag (eps, step sizes) is in pixels/255; images are in [0, 1].
"""
import argparse
import gc
import json
import os
import re
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import attacks
import data
import utils
from models import MODELS, build_model

GRAD_CLIP_NORM = 20.0  # max L2 norm of the parameter gradient
SGD_MOMENTUM = 0.9
RESNET_WEIGHT_DECAY = 5e-4
PGD_EVAL_STEP_FRACTION = 1 / 4  # evaluation PGD step, as a fraction of eps
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
CHECKPOINT = "checkpoint.pt"


class UsageError(Exception):
    """A bad flag or combination; the message names the flag, the value and what is allowed."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--dataset", default="cifar10", help=f"one of {', '.join(data.DATASETS)}")
    a("--data_dir", default="data", help="the dataset's folder (downloaded there when missing); cifar10 also reads "
      "an image folder train/<class>/*, test/<class>/*")
    a("--n_train", type=int, default=-1, help="train on this many examples (a fixed subset); -1: all")
    a("--model", default="resnet18", help=f"one of {', '.join(MODELS)}")
    a("--n_layers", type=int, default=1, help="cnn: number of 3x3 conv layers")
    a("--n_filters_cnn", type=int, default=16, help="cnn: filters per conv layer")
    a("--epochs", "--epoch", dest="epochs", type=int, default=30, help="training epochs")
    a("--batch_size", type=int, default=128, help="global training batch (images), split over processes")
    a("--batch_size_eval", type=int, default=1024, help="evaluation batch per process (images)")
    a("--lr_max", type=float, default=0.2, help="peak learning rate")
    a("--lr_schedule", default="cyclic", help=f"one of {', '.join(utils.LR_SCHEDULES)}; updated every iteration")
    a("--weight_decay", type=float, default=None, help=f"default {RESNET_WEIGHT_DECAY} for ResNets (SGD), 0 for cnn (Adam)")
    a("--eps", type=int, default=8, help="L-inf radius, pixels/255 (training and evaluation)")
    a("--attack", default="fgsm", help="training attack: fgsm, pgd or none")
    a("--attack_init", default="zero", help="training attack start: zero or random (uniform in the eps-ball)")
    a("--fgsm_alpha", type=float, default=1.25, help="FGSM step as a multiple of eps")
    a("--pgd_train_n_iters", type=int, default=10, help="PGD training: iterations")
    a("--pgd_alpha_train", type=float, default=2.0, help="PGD training: step, pixels/255")
    a("--minibatch_replay", type=int, default=1, help="Free-AT: replay each batch this many times (fgsm only)")
    a("--discrete_eps", action="store_true", help="VFSAT: cycle the training eps over 2, 4, ..., eps, eps x4 by epoch")
    a("--grad_input_sum_coeff", type=float, default=0.0, help="GradSum coefficient (0: off)")
    a("--grad_align_cos_lambda", type=float, default=0.0, help="GradAlign coefficient (0: off)")
    a("--attack_iters", type=int, default=50, help="evaluation PGD iterations (step eps/4)")
    a("--n_restarts", type=int, default=10, help="evaluation PGD random restarts")
    a("--eval_iter_freq", type=int, default=200, help="evaluate every this many iterations")
    a("--n_eval_every_k_iter", type=int, default=256, help="test (and train) points per periodic evaluation")
    a("--start_eval_epoch", type=int, default=0, help="first epoch (0-based) with periodic evaluations")
    a("--n_final_eval", type=int, default=-1, help="test points of the final evaluation; -1: all")
    a("--eval_early_stopped_model", action="store_true", help="final evaluation of the kept models too")
    a("--half_prec", action="store_true", help="mixed precision: fp16 autocast with dynamic loss scaling")
    a("--channels_last", action="store_true", help="channels-last memory format (faster convolutions on recent GPUs)")
    a("--compile", action="store_true", help="torch.compile the model (not with GradSum/GradAlign: no double "
      "backprop through compiled graphs)")
    a("--sync_bn", action="store_true", help="under torchrun on GPUs: synchronise BatchNorm statistics over processes")
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    a("--out_dir", default="runs", help="parent folder of run directories")
    a("--run_name", default=None, help="run directory name (letters, digits, . _ -); default: from the flags")
    a("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint "
      "(its flags come from RUN_DIR/args.json; only --device may be given too)")
    return p


def check_args(args):
    """Reject values the code cannot run, before any work starts."""
    def need(ok, flag, allowed):
        if not ok:
            raise UsageError(f"--{flag}={getattr(args, flag)!r}: {allowed}")

    need(args.dataset in data.DATASETS, "dataset", f"choose one of {', '.join(data.DATASETS)}")
    need(args.model in MODELS, "model", f"choose one of {', '.join(MODELS)}")
    need(args.lr_schedule in utils.LR_SCHEDULES, "lr_schedule", f"choose one of {', '.join(utils.LR_SCHEDULES)}")
    need(args.attack in ("fgsm", "pgd", "none"), "attack", "choose fgsm, pgd or none")
    need(args.attack_init in ("zero", "random"), "attack_init", "choose zero or random")
    for flag in ("epochs", "batch_size", "batch_size_eval", "eps", "n_layers", "n_filters_cnn",
                 "pgd_train_n_iters", "minibatch_replay", "attack_iters", "n_restarts", "eval_iter_freq",
                 "n_eval_every_k_iter"):
        need(getattr(args, flag) >= 1, flag, "must be a positive integer")
    for flag in ("lr_max", "fgsm_alpha", "pgd_alpha_train"):
        need(args.__dict__[flag] > 0, flag, "must be positive")
    for flag in ("grad_input_sum_coeff", "grad_align_cos_lambda", "start_eval_epoch"):
        need(args.__dict__[flag] >= 0, flag, "must be zero or positive")
    need(args.weight_decay is None or args.weight_decay >= 0, "weight_decay", "must be zero or positive")
    need(args.eps <= 255, "eps", "is in pixels/255: at most 255")
    need(args.n_train == -1 or args.n_train >= args.batch_size, "n_train",
         f"-1 (all) or at least --batch_size ({args.batch_size})")
    need(args.n_final_eval == -1 or args.n_final_eval >= 1, "n_final_eval", "-1 (all) or a positive integer")
    need(args.minibatch_replay == 1 or args.attack == "fgsm", "minibatch_replay", "Free-AT needs --attack=fgsm")
    need(not (args.compile and (args.grad_input_sum_coeff or args.grad_align_cos_lambda)), "compile",
         "compiled models do not support the double backprop of GradSum and GradAlign: drop --compile")
    n_procs = utils.dist_env()[1]
    need(args.batch_size % n_procs == 0, "batch_size", f"the global batch must split evenly over {n_procs} processes")
    need(args.run_name is None or RUN_NAME_PATTERN.match(args.run_name), "run_name",
         "use letters, digits, '.', '_' and '-' only")
    need(os.path.isdir(args.data_dir) or not os.path.exists(args.data_dir), "data_dir", "is not a folder")
    try:
        args.device = utils.choose_device(args.device)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"--device={args.device!r}: not available here ({str(err).splitlines()[0]})") from None


def method_name(args):
    """A short filesystem-safe name of the training method, e.g. fgsm-vfsat or pgd10-gradsum10."""
    parts = [{"fgsm": "fgsm", "pgd": f"pgd{args.pgd_train_n_iters}", "none": "std"}[args.attack]]
    if args.minibatch_replay > 1:
        parts[0] = f"free{args.minibatch_replay}"
    if args.attack_init == "random" and args.attack != "none":
        parts.append("rs")
    if args.discrete_eps:
        parts.append("vfsat")
    if args.grad_input_sum_coeff:
        parts.append(f"gradsum{args.grad_input_sum_coeff:g}")
    if args.grad_align_cos_lambda:
        parts.append(f"gradalign{args.grad_align_cos_lambda:g}")
    return "-".join(parts)


def make_run_dir(args):
    name = args.run_name or (f"{time.strftime('%Y%m%d-%H%M%S')}-{args.dataset}-{args.model}-{method_name(args)}"
                             f"-eps{args.eps}-seed{args.seed}")
    run_dir = os.path.join(args.out_dir, name)
    if os.path.exists(run_dir):
        raise UsageError(f"--run_name={name!r}: {run_dir} already exists; choose another name or --out_dir")
    os.makedirs(run_dir)
    return run_dir


def build_optimizer(model, args):
    if args.model == "cnn":
        return torch.optim.Adam(model.parameters(), lr=args.lr_max, weight_decay=args.weight_decay or 0.0)
    wd = RESNET_WEIGHT_DECAY if args.weight_decay is None else args.weight_decay
    return torch.optim.SGD(model.parameters(), lr=args.lr_max, momentum=SGD_MOMENTUM, weight_decay=wd)


# ---------------------------------------------------------------- training step

def start_delta(x, eps, args):
    """The attack's starting point; random starts lie on the 1/255 grid for VFSAT and GradSum."""
    if args.attack_init == "zero":
        return torch.zeros_like(x)
    return attacks.uniform_delta(x, eps, on_grid=args.discrete_eps or args.grad_input_sum_coeff > 0)


def perturb(model, x, y, eps, args, loss_scale):
    """The training perturbation, and the input gradients the regularisers may reuse: the FGSM gradient at x
    (zero start, for GradAlign) or at the random start, kept differentiable (for GradSum)."""
    if args.attack == "none":
        return torch.zeros_like(x), {}
    delta = start_delta(x, eps, args)
    if args.attack == "pgd":
        step = args.pgd_alpha_train / 255
        return attacks.pgd(model, x, y, eps, step, args.pgd_train_n_iters, delta, loss_scale), {}
    random_gradsum = args.attack_init == "random" and args.grad_input_sum_coeff > 0
    grad = attacks.input_grad(model, x + delta, y, create_graph=random_gradsum, loss_scale=loss_scale)
    reuse = {"grad_at_start": grad} if random_gradsum else {"grad_at_x": grad} if args.attack_init == "zero" else {}
    return attacks.sign_step(x, delta, grad, eps, args.fgsm_alpha * eps), reuse


def regulariser(model, x, y, eps, args, reuse, loss_scale):
    """GradSum and GradAlign terms (a 0-d tensor, zero when both are off)."""
    reg = torch.zeros((), device=x.device)
    if args.grad_input_sum_coeff > 0:
        if "grad_at_start" in reuse:
            reg = reg + args.grad_input_sum_coeff * reuse["grad_at_start"].norm()
        else:
            reg = reg + args.grad_input_sum_coeff * attacks.grad_sum_penalty(model, x, y, eps, loss_scale)
    if args.grad_align_cos_lambda > 0:
        reg = reg + args.grad_align_cos_lambda * attacks.grad_align_penalty(
            model, x, y, eps, reuse.get("grad_at_x"), loss_scale)
    return reg


def train_step(model, opt, scaler, autocast, x, y, eps, args, carried_delta=None, net=None):
    """One optimiser step on the batch; returns loss, regulariser, number correct (device tensors, no sync)
    and, for Free-AT, the perturbation carried to the next replay.

    net is the model wrapped for data-parallel training (DDP): the training loss goes through it, so its
    backward averages the gradients (the regulariser's included) over processes; attacks use the bare model.
    """
    loss_scale = scaler.scale(torch.ones((), device=x.device))  # a tensor: reading it would sync
    free = args.minibatch_replay > 1
    with autocast:
        if free:  # Free-AT: the perturbation's gradient comes from the same backward pass as the weights'
            start = start_delta(x, eps, args) if carried_delta is None else carried_delta
            delta, reuse = attacks.clip_delta(x, start, eps).requires_grad_(True), {}
        else:
            delta, reuse = perturb(model, x, y, eps, args, loss_scale)
        logits = (net if net is not None else model)(x + delta)
        loss = F.cross_entropy(logits, y)
        reg = regulariser(model, x, y, eps, args, reuse, loss_scale)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss + reg).backward()
    if free:
        carried_delta = attacks.sign_step(x, delta.detach(), delta.grad, eps, args.fgsm_alpha * eps)
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
    scaler.step(opt)
    scaler.update()
    return loss.detach(), reg.detach(), (logits.argmax(1) == y).sum(), carried_delta


# ---------------------------------------------------------------- evaluation

def robust_fn(model, eps, n_iters, n_restarts, skip_broken=True):
    """(x, y) -> mask of examples robust to PGD-n_iters-n_restarts with step eps/4."""
    return lambda x, y: attacks.pgd_robust(model, x, y, eps, eps * PGD_EVAL_STEP_FRACTION, n_iters, n_restarts,
                                           skip_broken)


def fgsm_correct_fn(model, eps, step=None):
    """(x, y) -> mask of examples still correct after FGSM from zero with `step` (default eps)."""
    return lambda x, y: utils.clean_correct(model, x + attacks.fgsm(model, x, y, eps, step or eps), y)


def grad_cosine_fn(model, eps):
    def cosines(x, y):
        grad_x = attacks.input_grad(model, x, y)
        grad_noisy = attacks.input_grad(model, x + attacks.uniform_delta(x, eps), y)
        cos, valid = attacks.gradient_cosines(grad_x, grad_noisy)
        return cos[valid]
    return cosines


def accuracies(model, x_u8, y, eps, args, kinds=("clean", "fgsm", "pgd")):
    """Accuracies of the eval-mode model on this process's share of the points, each a fraction of all points
    over all processes, and the number of points they cover."""
    fns = {"clean": lambda xb, yb: utils.clean_correct(model, xb, yb), "fgsm": fgsm_correct_fn(model, eps),
           "pgd": robust_fn(model, eps, args.attack_iters, args.n_restarts)}
    model.eval()
    row, n_points = {}, 0
    n_batches = -(-len(y) // args.batch_size_eval)
    for kind in kinds:
        batches = utils.progress(data.eval_batches(x_u8, y, args.batch_size_eval), n_batches, f"{kind} accuracy")
        row[f"{kind}_acc"], n_points = utils.fraction_true(fns[kind], batches)
    model.train()
    return row, n_points


def periodic_eval(model, eval_sets, eps, args):
    """Clean, FGSM and PGD accuracy on the test points, PGD accuracy on the training points, gradient cosine."""
    (test_x, test_y), (train_x, train_y) = eval_sets["test"], eval_sets["train"]
    test, n_points = accuracies(model, test_x, test_y, eps, args)
    row = {f"test_{k}": v for k, v in test.items()}
    row["train_pgd_acc"] = accuracies(model, train_x, train_y, eps, args, kinds=("pgd",))[0]["pgd_acc"]
    model.eval()
    row["grad_cosine"] = utils.mean_over_batches(grad_cosine_fn(model, eps),
                                                 data.eval_batches(test_x, test_y, args.batch_size_eval))
    model.train()
    row["n_eval_points"] = n_points
    return row


def final_eval(model, states, test_x, test_y, eps, args):
    """Clean, FGSM (step eps) and PGD accuracy of each named state dict on the final test points, in fp32."""
    rows = []
    for name, state in states.items():
        model.load_state_dict(state)
        row, n_points = accuracies(model, test_x, test_y, eps, args)
        rows.append({"kind": "final", "model": name, "n_points": n_points, **row})
    return rows


# ---------------------------------------------------------------- loop

def cpu_copy(model):
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Trainer:
    """Holds the run's state; train_epoch runs one epoch with its periodic evaluations."""

    def __init__(self, args, dataset, run_dir, log):
        self.args, self.run_dir, self.log = args, run_dir, log
        dev = args.device
        train_idx = data.fixed_subset(len(dataset.train_y), args.n_train)
        self.train_x, self.train_y = dataset.train_x[train_idx].to(dev), dataset.train_y[train_idx].to(dev)
        self.padding, self.flip = dataset.crop_padding, dataset.flip
        n_eval = args.n_eval_every_k_iter
        test_idx = process_share(data.fixed_subset(len(dataset.test_y), n_eval))
        train_eval_idx = process_share(data.fixed_subset(len(self.train_y), n_eval)).to(dev)
        self.eval_sets = {"test": (dataset.test_x[test_idx].to(dev), dataset.test_y[test_idx].to(dev)),
                          "train": (self.train_x[train_eval_idx], self.train_y[train_eval_idx])}
        mean, std = dataset.mean_std()
        self.model = build_model(args.model, dataset.n_classes, dataset.in_channels, dataset.image_size, mean, std,
                                 args.n_layers, args.n_filters_cnn).to(dev)
        if utils.is_distributed() and args.sync_bn and dev.type == "cuda":  # SyncBatchNorm needs NCCL
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.fast = torch.compile(self.model) if args.compile else self.model  # what the training step runs
        self.net = None  # the DDP wrapper under torchrun: the training loss goes through it
        if utils.is_distributed():
            self.net = torch.nn.parallel.DistributedDataParallel(self.fast,
                                                                 device_ids=[dev] if dev.type == "cuda" else None)
        self.opt = build_optimizer(self.model, args)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=args.half_prec)
        self.autocast = torch.autocast(dev.type, dtype=torch.float16) if args.half_prec else nullcontext()
        self.n_batches = data.n_train_batches(len(self.train_y), args.batch_size)
        self.total_iters = args.epochs * self.n_batches * args.minibatch_replay
        self.iteration, self.epoch, self.metrics, self.kept = 0, 0, [], {}
        self.carried_delta = None
        self.first_nonfinite = torch.full((), -1, device=dev)  # iteration of the first non-finite loss, on device
        self.reset_meters()

    def reset_meters(self):
        zero = lambda: torch.zeros((), device=self.args.device)  # noqa: E731
        self.meters = {"loss": zero(), "reg": zero(), "correct": zero(), "count": 0}

    def lr_at(self, iteration):
        epochs_done = iteration / (self.n_batches * self.args.minibatch_replay)
        return utils.learning_rate(self.args.lr_schedule, self.args.lr_max, epochs_done, self.args.epochs)

    def eval_due(self):
        a = self.args
        return self.epoch >= a.start_eval_epoch and (self.iteration % a.eval_iter_freq == 0
                                                     or self.iteration == self.total_iters)

    def train_epoch(self):
        a = self.args
        eps_px = utils.training_eps(a.eps, self.epoch, a.discrete_eps)
        gen = data.epoch_generator(a.seed, self.epoch, a.device)
        self.model.train()
        batches = data.train_batches(self.train_x, self.train_y, a.batch_size, gen, self.padding, self.flip,
                                     utils.rank(), utils.world_size())
        for x, y in utils.progress(batches, self.n_batches, f"epoch {self.epoch + 1}/{a.epochs}"):
            if a.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(a.minibatch_replay):
                self.iteration += 1
                lr = self.lr_at(self.iteration)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                loss, reg, correct, self.carried_delta = train_step(
                    self.fast, self.opt, self.scaler, self.autocast, x, y, eps_px / 255, a, self.carried_delta,
                    self.net)
                self.record_step(loss, reg, correct, len(y))
                if self.eval_due():
                    self.evaluate(lr, eps_px)
        self.check_finite()
        self.epoch += 1

    def record_step(self, loss, reg, correct, n):
        m = self.meters
        m["loss"] += loss * n
        m["reg"] += reg * n
        m["correct"] += correct
        m["count"] += n
        first_bad = (self.first_nonfinite < 0) & ~torch.isfinite(loss)
        self.first_nonfinite = torch.where(first_bad, self.iteration, self.first_nonfinite)

    def check_finite(self):
        bad = int(max(utils.all_gather(int(self.first_nonfinite))))  # every process stops together
        if bad >= 0:
            kept = (f"{self.run_dir}/{CHECKPOINT} holds the state at the end of epoch {self.epoch}" if self.epoch
                    else "no epoch had finished, so there is no checkpoint")
            raise FloatingPointError(f"non-finite training loss at iteration {bad}; stopped: {kept}, and "
                                     "metrics.jsonl the evaluations before it")

    def evaluate(self, lr, train_eps_px):
        self.check_finite()
        loss, reg, correct, count = utils.global_sum(*(self.meters[k] for k in ("loss", "reg", "correct", "count")))
        row = {"kind": "periodic", "iteration": self.iteration, "epoch": round(self.iteration / self.n_batches
                                                                                / self.args.minibatch_replay, 4),
               "lr": lr, "train_eps": train_eps_px, "train_loss": loss / count, "train_reg": reg / count,
               "train_acc": correct / count}
        row.update(periodic_eval(self.model, self.eval_sets, self.args.eps / 255, self.args))
        self.reset_meters()
        self.metrics.append(row)
        for name, key in (("early_stopped", "train_pgd_acc"), ("best_test", "test_pgd_acc")):
            if name not in self.kept or row[key] > self.kept[name]["acc"]:
                self.kept[name] = {"state": cpu_copy(self.model), "iteration": self.iteration, "acc": row[key]}
        self.write_metrics()
        self.log.info(format_row(row))

    def write_metrics(self):
        if utils.rank() == 0:
            utils.write_jsonl(self.metrics, os.path.join(self.run_dir, "metrics.jsonl"))

    def state_dict(self):
        """Everything needed to continue exactly from the end of the current epoch; what differs between
        processes (random generators, Free-AT perturbation, running sums) is kept for each of them."""
        own = {"rng": utils.rng_state(), "meters": {k: v.cpu() if torch.is_tensor(v) else v
                                                    for k, v in self.meters.items()},
               "carried_delta": None if self.carried_delta is None else self.carried_delta.cpu()}
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "iteration": self.iteration,
                "kept": self.kept, "metrics": self.metrics, "processes": utils.all_gather(own),
                "args": args_to_dict(self.args)}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration, self.kept, self.metrics = (state[k] for k in ("epoch", "iteration", "kept",
                                                                                  "metrics"))
        own, dev = state["processes"][utils.rank()], self.args.device
        self.meters = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in own["meters"].items()}
        self.carried_delta = None if own["carried_delta"] is None else own["carried_delta"].to(dev)
        utils.set_rng_state(own["rng"])

    def save_checkpoint(self):
        state = self.state_dict()  # a collective: every process takes part
        if utils.rank() == 0:
            utils.atomic_torch_save(state, os.path.join(self.run_dir, CHECKPOINT))

    def check_replicas(self):
        """Raise unless every process holds the same weights (what data-parallel training guarantees)."""
        sums = [torch.cat([p.detach().double().flatten() for p in self.model.parameters()]).sum().item()]
        everyone = utils.all_gather(sums)
        if any(s != everyone[0] for s in everyone):
            raise RuntimeError(f"processes hold different weights (parameter sums {everyone})")
        return len(everyone)


def process_share(indices):
    """This process's share of the points: every world_size-th one, from its rank."""
    return indices[utils.rank()::utils.world_size()]


def format_row(row):
    pct = lambda key: f"{100 * row[key]:5.1f}"  # noqa: E731
    return (f"iter {row['iteration']:6d} epoch {row['epoch']:7.2f} lr {row['lr']:.4f} eps {row['train_eps']:3d} | "
            f"loss {row['train_loss']:.4f} reg {row['train_reg']:.4f} acc {pct('train_acc')} | "
            f"test clean {pct('test_clean_acc')} fgsm {pct('test_fgsm_acc')} pgd {pct('test_pgd_acc')} | "
            f"train pgd {pct('train_pgd_acc')} | cos {row['grad_cosine']:.3f}")


def args_to_dict(args):
    return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}


def run_final_eval(trainer, dataset, args, log):
    states = {"last": cpu_copy(trainer.model)}
    if args.eval_early_stopped_model:
        states.update({name: kept["state"] for name, kept in trainer.kept.items()})
    idx = process_share(data.fixed_subset(len(dataset.test_y), args.n_final_eval))
    rows = final_eval(trainer.model, states, dataset.test_x[idx].to(args.device),
                      dataset.test_y[idx].to(args.device), args.eps / 255, args)
    trainer.model.load_state_dict(states["last"])
    for row in rows:
        kept = trainer.kept.get(row["model"])
        row["iteration"] = kept["iteration"] if kept else trainer.iteration
        log.info(f"final {row['model']:>13} (iter {row['iteration']}): clean {100 * row['clean_acc']:.2f}% "
                 f"FGSM {100 * row['fgsm_acc']:.2f}% PGD-{args.attack_iters}-{args.n_restarts} "
                 f"{100 * row['pgd_acc']:.2f}% on {row['n_points']} points")
    return rows


def run(args, dataset, log, run_dir, checkpoint=None):
    torch.manual_seed(args.seed)
    trainer = Trainer(args, dataset, run_dir, log)
    if utils.world_size() > 1:
        torch.manual_seed(args.seed + utils.rank())  # processes draw different attack starts
    if checkpoint is not None:
        if utils.rank() == 0:
            for name in os.listdir(run_dir):  # temporary files of writes that a kill interrupted
                if ".tmp" in name:
                    os.remove(os.path.join(run_dir, name))
        trainer.load_state_dict(checkpoint)
        log.info(f"resumed at the end of epoch {trainer.epoch} (iteration {trainer.iteration})")
    trainer.write_metrics()  # drops the rows written after the checkpoint
    if any(row["kind"] == "final" for row in trainer.metrics):
        log.info("this run had already finished")
        return
    log.info(f"{args.model} on {args.dataset}: {len(trainer.train_y)} training images, {trainer.n_batches} "
             f"batches/epoch, {trainer.total_iters} iterations, method {method_name(args)}, device {args.device}"
             + (f", {utils.world_size()} processes" if utils.world_size() > 1 else ""))
    if args.sync_bn and trainer.net is not None and args.device.type != "cuda":
        log.info("--sync_bn: ignored, SyncBatchNorm needs GPUs (NCCL)")
    start = time.time()
    while trainer.epoch < args.epochs:
        trainer.train_epoch()
        trainer.save_checkpoint()
    train_s = time.time() - start
    n_procs = trainer.check_replicas()
    log.info(f"training done in {train_s:.1f} s" + (f"; {n_procs} processes hold identical weights"
                                                    if n_procs > 1 else ""))
    trainer.metrics += run_final_eval(trainer, dataset, args, log)
    trainer.save_checkpoint()
    trainer.write_metrics()
    wall_s = time.time() - start
    if utils.rank() == 0:
        utils.atomic_write_text(json.dumps({"wall_s": round(wall_s, 1), "train_s": round(train_s, 1)}) + "\n",
                                os.path.join(run_dir, "timing.json"))
    log.info(f"done in {wall_s:.1f} s")


def given_flags(parser, argv):
    """Destinations of the flags that argv names explicitly."""
    names = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
    return {a.dest for a in parser._actions if names & set(a.option_strings)}


def load_checkpoint(run_dir):
    path = os.path.join(run_dir, CHECKPOINT)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        n_saved, n_now = len(checkpoint["processes"]), utils.dist_env()[1]
    except FileNotFoundError:
        raise UsageError(f"--resume={run_dir!r}: no {CHECKPOINT} there (the run stopped before its first epoch "
                         "ended: start it again)") from None
    except Exception as err:  # truncated, corrupt, or not a checkpoint
        raise UsageError(f"--resume={run_dir!r}: {path} is unreadable ({type(err).__name__}); it was not written "
                         "by train.py or is damaged") from None
    if n_saved != n_now:
        raise UsageError(f"--resume={run_dir!r}: the run used {n_saved} process(es); resume it with as many "
                         f"(this is {n_now})")
    return checkpoint


def resume_args(parser, argv, args):
    """The resumed run's own arguments (from its args.json), with --device overridable."""
    extra = given_flags(parser, argv) - {"resume", "device"}
    if extra:
        raise UsageError(f"--resume={args.resume!r}: takes no training flags (got --{', --'.join(sorted(extra))}); "
                         "the run's flags are read from its args.json")
    try:
        with open(os.path.join(args.resume, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"--resume={args.resume!r}: cannot read args.json there ({type(err).__name__})") from None
    resumed = parser.parse_args([])
    vars(resumed).update(saved)
    if "device" in given_flags(parser, argv):
        resumed.device = args.device
    resumed.resume = args.resume
    return resumed


def prepare(argv):
    """Parse and check everything, load the data and the checkpoint: all errors before any file is written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    checkpoint = None
    if args.resume:
        args = resume_args(parser, argv, args)
        checkpoint = load_checkpoint(args.resume)
    check_args(args)
    dataset = data.load_data(args.dataset, args.data_dir)
    return args, dataset, checkpoint


def shared_run_dir(args):
    """The run directory: made by process 0 and told to the others; (None, message) if it cannot be made."""
    run_dir, error = args.resume, None
    if run_dir is None and utils.rank() == 0:
        try:
            run_dir = make_run_dir(args)
        except UsageError as err:
            error = str(err)
    return utils.broadcast((run_dir, error))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    first_process = utils.dist_env()[0] == 0
    try:
        args, dataset, checkpoint = prepare(argv)
    except (UsageError, data.DataError) as err:
        if first_process:
            print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    utils.init_distributed(args.device)
    try:
        run_dir, error = shared_run_dir(args)
        if error:
            if first_process:
                print(f"train.py: error: {error}", file=sys.stderr)
            return 2
        if checkpoint is None and first_process:
            utils.atomic_write_text(json.dumps(args_to_dict(args), indent=2) + "\n",
                                    os.path.join(run_dir, "args.json"))
        log = utils.get_logger(os.path.join(run_dir, "log.txt") if first_process else None, quiet=not first_process)
        log.info(f"run directory {run_dir}")
        run(args, dataset, log, run_dir, checkpoint)
        if utils.is_distributed():
            gc.collect()  # free DDP's pending gloo work now, not during interpreter shutdown (an abort)
            torch.distributed.barrier()  # no process tears the group down while another still uses it
    except FloatingPointError as err:
        log.error(f"error: {err}")
        return 1
    finally:
        if utils.is_distributed():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
