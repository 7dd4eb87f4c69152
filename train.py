"""Single-step adversarial training with local smoothing (VFSAT, GradSum), GradAlign, PGD-k and Free-AT.

    python train.py --attack=fgsm --eps=8 --grad_input_sum_coeff=10 --data_dir=DIR ...

Every pixel-valued flag (eps, step sizes) is in pixels/255; images are in [0, 1].
"""
import argparse
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


class UsageError(Exception):
    """A bad flag or combination; the message names the flag, the value and what is allowed."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="cifar10", help="dataset name (cifar10)")
    a("--data_dir", default="data", help="CIFAR-10 folder: image-folder layout train/<class>/*, test/<class>/*, "
      "or torchvision's python version (downloaded here when missing)")
    a("--n_train", type=int, default=-1, help="train on this many examples (a fixed subset); -1: all")
    a("--model", default="resnet18", help=f"one of {', '.join(MODELS)}")
    a("--n_layers", type=int, default=1, help="cnn: number of 3x3 conv layers")
    a("--n_filters_cnn", type=int, default=16, help="cnn: filters per conv layer")
    a("--epochs", "--epoch", dest="epochs", type=int, default=30, help="training epochs")
    a("--batch_size", type=int, default=128, help="training batch size (images)")
    a("--batch_size_eval", type=int, default=1024, help="evaluation batch size (images)")
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
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    a("--out_dir", default="runs", help="parent folder of run directories")
    a("--run_name", default=None, help="run directory name (letters, digits, . _ -); default: from the flags")
    return p


def check_args(args):
    """Reject values the code cannot run, before any work starts."""
    def need(ok, flag, allowed):
        if not ok:
            raise UsageError(f"--{flag}={getattr(args, flag)!r}: {allowed}")

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


def train_step(model, opt, scaler, autocast, x, y, eps, args, carried_delta=None):
    """One optimiser step on the batch; returns loss, regulariser, number correct (device tensors, no sync)
    and, for Free-AT, the perturbation carried to the next replay."""
    loss_scale = scaler.scale(torch.ones((), device=x.device))  # a tensor: reading it would sync
    free = args.minibatch_replay > 1
    with autocast:
        if free:  # Free-AT: the perturbation's gradient comes from the same backward pass as the weights'
            start = start_delta(x, eps, args) if carried_delta is None else carried_delta
            delta, reuse = attacks.clip_delta(x, start, eps).requires_grad_(True), {}
        else:
            delta, reuse = perturb(model, x, y, eps, args, loss_scale)
        logits = model(x + delta)
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

def robust_fn(model, eps, args, skip_broken=True):
    """(x, y) -> mask of examples robust to PGD-attack_iters-n_restarts with step eps/4."""
    return lambda x, y: attacks.pgd_robust(model, x, y, eps, eps * PGD_EVAL_STEP_FRACTION, args.attack_iters,
                                           args.n_restarts, skip_broken)


def fgsm_correct_fn(model, eps):
    return lambda x, y: utils.clean_correct(model, x + attacks.fgsm(model, x, y, eps, eps), y)


def grad_cosine_fn(model, eps):
    def cosines(x, y):
        grad_x = attacks.input_grad(model, x, y)
        grad_noisy = attacks.input_grad(model, x + attacks.uniform_delta(x, eps), y)
        cos, valid = attacks.gradient_cosines(grad_x, grad_noisy)
        return cos[valid]
    return cosines


def periodic_eval(model, eval_sets, eps, args):
    """Clean, FGSM and PGD accuracy on the test points, PGD accuracy on the training points, gradient cosine."""
    (test_x, test_y), (train_x, train_y) = eval_sets["test"], eval_sets["train"]
    test = lambda: data.eval_batches(test_x, test_y, args.batch_size_eval)  # noqa: E731
    model.eval()
    row = {
        "test_clean_acc": utils.fraction_true(lambda x, y: utils.clean_correct(model, x, y), test()),
        "test_fgsm_acc": utils.fraction_true(fgsm_correct_fn(model, eps), test()),
        "test_pgd_acc": utils.fraction_true(robust_fn(model, eps, args), test()),
        "train_pgd_acc": utils.fraction_true(robust_fn(model, eps, args),
                                             data.eval_batches(train_x, train_y, args.batch_size_eval)),
        "grad_cosine": utils.mean_over_batches(grad_cosine_fn(model, eps), test()),
    }
    model.train()
    return row


def final_eval(model, states, test_x, test_y, eps, args):
    """Clean and PGD accuracy of each named state dict on the final test points, in fp32."""
    rows = []
    for name, state in states.items():
        model.load_state_dict(state)
        model.eval()
        batches = lambda: data.eval_batches(test_x, test_y, args.batch_size_eval)  # noqa: E731
        rows.append({"kind": "final", "model": name, "n_points": len(test_y),
                     "clean_acc": utils.fraction_true(lambda x, y: utils.clean_correct(model, x, y), batches()),
                     "pgd_acc": utils.fraction_true(robust_fn(model, eps, args), batches())})
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
        test_idx = data.fixed_subset(len(dataset.test_y), n_eval)
        train_eval_idx = data.fixed_subset(len(self.train_y), n_eval).to(dev)
        self.eval_sets = {"test": (dataset.test_x[test_idx].to(dev), dataset.test_y[test_idx].to(dev)),
                          "train": (self.train_x[train_eval_idx], self.train_y[train_eval_idx])}
        mean, std = dataset.mean_std()
        self.model = build_model(args.model, dataset.n_classes, dataset.in_channels, dataset.image_size, mean, std,
                                 args.n_layers, args.n_filters_cnn).to(dev)
        self.opt = build_optimizer(self.model, args)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=args.half_prec)
        self.autocast = torch.autocast(dev.type, dtype=torch.float16) if args.half_prec else nullcontext()
        self.n_batches = data.n_train_batches(len(self.train_y), args.batch_size)
        self.total_iters = args.epochs * self.n_batches * args.minibatch_replay
        self.iteration, self.epoch, self.metrics, self.kept = 0, 0, [], {}
        self.carried_delta = None
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
        for x, y in data.train_batches(self.train_x, self.train_y, a.batch_size, gen, self.padding, self.flip):
            for _ in range(a.minibatch_replay):
                self.iteration += 1
                lr = self.lr_at(self.iteration)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                loss, reg, correct, self.carried_delta = train_step(
                    self.model, self.opt, self.scaler, self.autocast, x, y, eps_px / 255, a, self.carried_delta)
                m = self.meters
                m["loss"] += loss * len(y)
                m["reg"] += reg * len(y)
                m["correct"] += correct
                m["count"] += len(y)
                if self.eval_due():
                    self.evaluate(lr, eps_px)
        self.epoch += 1

    def evaluate(self, lr, train_eps_px):
        m = self.meters
        loss = float(m["loss"]) / m["count"]
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"non-finite training loss by iteration {self.iteration}")
        row = {"kind": "periodic", "iteration": self.iteration, "epoch": round(self.iteration / self.n_batches
                                                                                / self.args.minibatch_replay, 4),
               "lr": lr, "train_eps": train_eps_px, "train_loss": loss, "train_reg": float(m["reg"]) / m["count"],
               "train_acc": float(m["correct"]) / m["count"]}
        row.update(periodic_eval(self.model, self.eval_sets, self.args.eps / 255, self.args))
        self.reset_meters()
        self.metrics.append(row)
        for name, key in (("early_stopped", "train_pgd_acc"), ("best_test", "test_pgd_acc")):
            if name not in self.kept or row[key] > self.kept[name]["acc"]:
                self.kept[name] = {"state": cpu_copy(self.model), "iteration": self.iteration, "acc": row[key]}
        utils.write_jsonl(self.metrics, os.path.join(self.run_dir, "metrics.jsonl"))
        self.log.info(format_row(row))

    def checkpoint(self):
        """Everything needed to continue from the end of the current epoch."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "iteration": self.iteration,
                "kept": self.kept, "metrics": self.metrics, "rng": utils.rng_state(),
                "carried_delta": self.carried_delta, "args": args_to_dict(self.args)}


def format_row(row):
    pct = lambda key: f"{100 * row[key]:5.1f}"  # noqa: E731
    return (f"iter {row['iteration']:6d} epoch {row['epoch']:7.2f} lr {row['lr']:.4f} eps {row['train_eps']:3d} | "
            f"loss {row['train_loss']:.4f} reg {row['train_reg']:.4f} acc {pct('train_acc')} | "
            f"test clean {pct('test_clean_acc')} fgsm {pct('test_fgsm_acc')} pgd {pct('test_pgd_acc')} | "
            f"train pgd {pct('train_pgd_acc')} | cos {row['grad_cosine']:.3f}")


def args_to_dict(args):
    return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}


def run(args, dataset, log, run_dir):
    torch.manual_seed(args.seed)
    trainer = Trainer(args, dataset, run_dir, log)
    log.info(f"{args.model} on {args.dataset}: {len(trainer.train_y)} training images, {trainer.n_batches} "
             f"batches/epoch, {trainer.total_iters} iterations, device {args.device}, method {method_name(args)}")
    start = time.time()
    while trainer.epoch < args.epochs:
        trainer.train_epoch()
        utils.atomic_torch_save(trainer.checkpoint(), os.path.join(run_dir, "checkpoint.pt"))
    log.info(f"training done in {time.time() - start:.1f} s")

    states = {"last": cpu_copy(trainer.model)}
    if args.eval_early_stopped_model:
        states.update({name: kept["state"] for name, kept in trainer.kept.items()})
    idx = data.fixed_subset(len(dataset.test_y), args.n_final_eval)
    rows = final_eval(trainer.model, states, dataset.test_x[idx].to(args.device),
                      dataset.test_y[idx].to(args.device), args.eps / 255, args)
    for row in rows:
        kept = trainer.kept.get(row["model"])
        row["iteration"] = kept["iteration"] if kept else trainer.iteration
        log.info(f"final {row['model']:>13} (iter {row['iteration']}): clean {100 * row['clean_acc']:.2f}% "
                 f"PGD-{args.attack_iters}-{args.n_restarts} {100 * row['pgd_acc']:.2f}% on {row['n_points']} points")
    trainer.metrics += rows
    utils.write_jsonl(trainer.metrics, os.path.join(run_dir, "metrics.jsonl"))
    trainer.model.load_state_dict(states["last"])
    utils.atomic_torch_save(trainer.checkpoint(), os.path.join(run_dir, "checkpoint.pt"))
    return rows


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        dataset = data.load_data(args.dataset, args.data_dir)
        run_dir = make_run_dir(args)
    except (UsageError, data.DataError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    utils.atomic_write_text(json.dumps(args_to_dict(args), indent=2) + "\n", os.path.join(run_dir, "args.json"))
    log = utils.get_logger(os.path.join(run_dir, "log.txt"))
    log.info(f"run directory {run_dir}")
    try:
        run(args, dataset, log, run_dir)
    except FloatingPointError as err:
        log.error(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
