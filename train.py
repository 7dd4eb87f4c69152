"""Single-step adversarial training with local smoothing (VFSAT, GradSum), GradAlign, PGD-k and Free-AT.

    python train.py --attack=fgsm --attack_init=zero --eps=8 --grad_input_sum_coeff=10 --data_dir=DIR ...

By default every flag combination computes what the paper's code computes (its network, initialisation,
evaluation protocol and schedules); every difference, and the flag that gives it: docs/differences.md.
Every pixel-valued flag (eps, step sizes) is in pixels/255; images are in [0, 1].
"""
import gc
import json
import os
import sys
import time
from typing import NamedTuple

import torch

import attacks
import config
import data
import estimate
import evaluation
import health
import methods
import models
import runs
import schedules
import utils
from config import UsageError

RUN_LOCKED_EXIT = 75  # EX_TEMPFAIL: another process holds the run directory; the scripts report "running elsewhere"


# ---------------------------------------------------------------- the loop

class Trainer:
    """The run's loop: epochs of batches, the periodic evaluations on their schedule, checkpoints and stops. What
    an iteration computes is its TrainingStep's (methods.py); what an evaluation watches, its Monitor's
    (health.py)."""

    def __init__(self, args, dataset, run_dir, log):
        self.args, self.run_dir, self.log = args, run_dir, log
        self.data = training_data(dataset, args.n_train, args.n_eval_every_k_iter, args.batch_size, args.device)
        self.model, fast, net = build_networks(args, dataset)
        self.settings = methods.StepSettings.from_flags(args)
        self.step = methods.TrainingStep(self.model, self.settings, args.device, fast, net)
        self.radii_schedule = methods.RadiiSchedule.from_flags(args, self.data.n_full)
        self.protocol = evaluation.Protocol.from_flags(args)
        self.restart = evaluation.GraphedRestarts(self.model) if args.cuda_graph else attacks.pgd_restart  # eval PGD
        # the training's precision, which the original's apex O1 leaves on for its periodic evaluations
        self.eval_autocast = self.step.autocast if args.half_prec and not args.periodic_eval_fp32 else None
        self.n_batches = data.n_train_batches(len(self.data.y), args.batch_size)
        self.total_iters = args.epochs * self.n_batches
        self.iteration, self.epoch, self.metrics = 0, 0, []
        self.batch_in_epoch = 0  # batches of epoch self.epoch + 1 already trained (a run stopped within an epoch)
        self.previous = None  # the batch that Free-AT's replay repeats
        self.stop = utils.StopSignals()  # main() activates it; a Trainer made elsewhere is never asked to stop
        self.lines = utils.ProgressLines(args.progress_every_s)  # made again where a resumed run starts
        self.monitor = health.Monitor(self.settings, cpu_copy(self.model))  # kept models start from the initial ones
        self.meters = Meters(args.device, watch_ce=self.step.scaler.is_enabled())
        self.clock = RunClock()

    def radii(self, epoch):
        """This iteration's StepRadii (self.iteration counts the optimiser steps so far, this one included)."""
        return self.radii_schedule(epoch, self.iteration)

    def batches(self, epoch, skip=0):
        a, d = self.args, self.data
        gen = data.epoch_generator(a.seed, epoch, a.device)
        for x, y in data.train_batches(d.x, d.y, a.batch_size, gen, d.padding, d.flip, utils.rank(),
                                       utils.world_size(), skip):
            yield (x.contiguous(memory_format=torch.channels_last) if a.channels_last else x), y

    def epoch_zero(self):
        """The original's epoch 0: one batch through the whole step without the optimiser step (its forward
        passes still move BatchNorm statistics, and Free-AT's perturbation is carried on)."""
        self.model.train()
        x, y = next(self.batches(0))
        self.step(x, y, self.radii(0), update=False)

    def train_epoch(self):
        """Training epoch self.epoch + 1 (1-based, as the original counts them), from its batch
        self.batch_in_epoch on; a stop signal ends it after the current iteration, with a checkpoint there."""
        a, epoch, first = self.args, self.epoch + 1, self.batch_in_epoch
        self.model.train()
        if first == 0:
            self.meters.reset()  # the original's running averages restart with each epoch
            self.previous = None
        batches = utils.progress(self.batches(epoch, skip=first), self.n_batches - first, f"epoch {epoch}/{a.epochs}")
        for i, (x, y) in enumerate(batches, first):
            if i % a.minibatch_replay:  # as the original (Free-AT): this batch is dropped, the previous replayed
                x, y = self.previous
            self.previous = x, y
            self.iteration += 1
            lr = schedules.learning_rate(a.lr_schedule, a.lr_max, epoch - 1 + (i + 1) / self.n_batches, a.epochs)
            for group in self.step.opt.param_groups:
                group["lr"] = lr
            self.meters.add(self.step(x, y, self.radii(epoch)), len(y), self.iteration)
            if self.iteration % a.eval_iter_freq == 0 and epoch > a.start_eval_epoch:
                self.evaluate(lr, self.radii_schedule.training_eps_px(epoch))
            self.batch_in_epoch = i + 1
            log_progress(self, epoch)
            if self.batch_in_epoch < self.n_batches and self.stop.requested_at(self.iteration):
                self.save_checkpoint()
                raise utils.StopRequested(self.where())
        self.check_finite()
        self.epoch, self.batch_in_epoch = epoch, 0

    def where(self):
        within = f", batch {self.batch_in_epoch}/{self.n_batches} of epoch {self.epoch + 1}" if self.batch_in_epoch \
            else f", the end of epoch {self.epoch}"
        return f"iteration {self.iteration}/{self.total_iters}{within}"

    def check_finite(self):
        check_finite(self.meters.first_nonfinite, self.epoch, self.run_dir, self.args.grad_align_cos_lambda > 0)

    def evaluate(self, lr, train_eps_px):
        self.check_finite()
        utils.broadcast_buffers(self.model)  # every process evaluates (and keeps) process 0's model, the saved one
        row = {"kind": "periodic", "iteration": self.iteration, "epoch": round(self.iteration / self.n_batches, 4),
               "lr": lr, "train_eps": train_eps_px, **self.meters.means(),
               **{flag: float(s.value) for flag, s in self.step.schedules.items()}}
        loss_scale = self.step.loss_scale()  # one host read: the evaluation changes no scale
        start = time.time()
        row.update(evaluation.periodic_eval(self.model, self.data.eval_sets, self.protocol, self.restart,
                                            self.eval_autocast, None if self.eval_autocast is None else loss_scale))
        self.clock.periodic_eval_s += time.time() - start  # its results are host floats: the GPU has finished
        if loss_scale is not None:
            row["loss_scale"] = loss_scale
        self.meters.reset()
        self.monitor.observe(row, self.metrics, lambda: cpu_copy(self.model))
        self.write_metrics()
        log_evaluation(self.log, row, self.step.schedules)
        if row["warnings"] and self.args.stop_on_warning:
            raise TrainingUnhealthy(f"stopped by --stop_on_warning at iteration {row['iteration']}: "
                                    f"{row['warnings'][0]}")

    def write_metrics(self):
        if utils.rank() == 0:
            utils.write_jsonl(self.metrics, os.path.join(self.run_dir, "metrics.jsonl"))

    def state_dict(self):
        """Everything needed to continue exactly from this iteration, at an epoch's end or within it; what differs
        between processes (random generators, Free-AT perturbation, running sums, the replayed batch) is kept for
        each of them."""
        replayed = self.previous is not None and self.args.minibatch_replay > 1
        own = {"rng": utils.rng_state(), **self.step.own_state(), **self.meters.state_dict(),
               "previous": tuple(t.detach().cpu() for t in self.previous) if replayed else None}
        return {"model": self.model.state_dict(), **self.step.state_dict(), "epoch": self.epoch,
                "iteration": self.iteration, "batch_in_epoch": self.batch_in_epoch,
                "periodic_eval_s": self.clock.periodic_eval_s, "time": self.clock.elapsed(), "kept": self.monitor.kept,
                "metrics": self.metrics, "processes": utils.all_gather(own), "args": config.args_to_dict(self.args)}

    def load_state_dict(self, state):
        dev, own = self.args.device, state["processes"][utils.rank()]
        self.model.load_state_dict(state["model"])
        self.step.load_state_dict(state, own, dev)
        self.epoch, self.iteration, self.metrics = state["epoch"], state["iteration"], state["metrics"]
        self.monitor.kept = state["kept"]
        self.batch_in_epoch = state.get("batch_in_epoch", 0)
        self.clock.load_state_dict(state)
        if "meters" in own:  # checkpoints written within an epoch; older ones were all written at its end
            self.meters.load_state_dict(own)
            self.previous = None if own["previous"] is None else tuple(t.to(dev) for t in own["previous"])
        utils.set_rng_state(own["rng"])

    def save_checkpoint(self):
        state = self.state_dict()  # a collective: every process takes part
        if utils.rank() == 0:
            utils.atomic_torch_save(state, os.path.join(self.run_dir, runs.CHECKPOINT))


# ---------------------------------------------------------------- its pieces

def cpu_copy(model):
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def process_share(indices):
    """This process's share of the points: every world_size-th one, from its rank."""
    return indices[utils.rank()::utils.world_size()]


class TrainingUnhealthy(Exception):
    """--stop_on_warning: a health warning ends the run."""


class TrainingData(NamedTuple):
    x: torch.Tensor  # the training images (uint8) on the device
    y: torch.Tensor
    eval_sets: dict  # the periodic evaluation's fixed points: {"test": (x, y), "train": (x, y)}, this process's
    n_full: int  # images in the whole training set (SVHN's warm-up counts its batches)
    padding: int  # the augmentation's crop padding, pixels
    flip: bool


def training_data(dataset, n_train, n_eval, batch_size, device):
    """The first n_train training images (all for -1), and the first n_eval test and training points."""
    train_idx = evaluation.first_points(len(dataset.train_y), n_train)
    x, y = dataset.train_x[train_idx].to(device), dataset.train_y[train_idx].to(device)
    test_idx = process_share(evaluation.first_points(len(dataset.test_y), n_eval))
    # the original draws its training points in full training batches (drop_last)
    train_eval_idx = process_share(evaluation.first_points(len(y), n_eval - n_eval % batch_size)).to(device)
    eval_sets = {"test": (dataset.test_x[test_idx].to(device), dataset.test_y[test_idx].to(device)),
                 "train": (x[train_eval_idx], y[train_eval_idx])}
    return TrainingData(x, y, eval_sets, len(dataset.train_y), dataset.crop_padding, dataset.flip)


def build_networks(args, dataset):
    """The model (initialised, or --load_model's weights; SyncBatchNorm, memory format), what the training step
    runs (compiled with --compile) and the DDP wrapper under torchrun that the training loss goes through."""
    dev = args.device
    model = models.model_from_args(args, dataset, methods.uses_double_backprop(args))
    if args.load_model:
        model.load_state_dict(runs.load_checkpoint(args.load_model, "--load_model")["model"])
    model = model.to(dev)
    if utils.is_distributed() and args.sync_bn and dev.type == "cuda":  # SyncBatchNorm needs NCCL
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fast = torch.compile(model) if args.compile else model
    net = None
    if utils.is_distributed():
        net = torch.nn.parallel.DistributedDataParallel(fast, device_ids=[dev] if dev.type == "cuda" else None)
    return model, fast, net


class Meters:
    """A period's sums of the step statistics (batch means weighted by the batch size; the correct count) and the
    iteration of the first non-finite training loss, as device tensors: no host sync per iteration."""

    def __init__(self, device, watch_ce):
        self.keys = ("loss", *methods.stat_keys(), "delta_abs", "grad_zero", "correct")
        self.device = device
        self.watch_ce = watch_ce  # under fp16 loss scaling an overflowing regulariser only skips the step
        self.first_nonfinite = torch.full((), -1, device=device)
        self.reset()

    def reset(self):
        self.sums = {k: torch.zeros((), device=self.device) for k in self.keys}
        self.sums["count"] = 0

    def add(self, stats, n, iteration):
        s = self.sums
        for key in self.keys[:-1]:
            s[key] += stats[key] * n
        s["correct"] += stats["correct"]
        s["count"] += n
        watched = stats["ce"] if self.watch_ce else stats["loss"]
        first_bad = (self.first_nonfinite < 0) & ~torch.isfinite(watched)
        self.first_nonfinite = torch.where(first_bad, iteration, self.first_nonfinite)

    def means(self):
        """{train_<key>: the period's mean over all processes} (train_acc for the correct count)."""
        *sums, count = utils.global_sum(*(self.sums[k] for k in (*self.keys, "count")))
        return {f"train_{'acc' if k == 'correct' else k}": v / count for k, v in zip(self.keys, sums, strict=True)}

    def state_dict(self):
        cpu = lambda t: t.detach().cpu() if torch.is_tensor(t) else t  # noqa: E731
        return {"meters": {k: cpu(v) for k, v in self.sums.items()}, "first_nonfinite": cpu(self.first_nonfinite)}

    def load_state_dict(self, own):
        self.sums.update({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in own["meters"].items()})
        self.first_nonfinite = own["first_nonfinite"].to(self.device)


class RunClock:
    """Seconds of training over every process that trained the run (a resumed run adds the earlier ones), how many
    there were, and the wall time of this process's periodic evaluations (timing.json)."""

    def __init__(self):
        self.before = {"train_s": 0.0, "segments": 0}  # a resumed run's earlier processes
        self.start, self.end, self.periodic_eval_s = time.time(), None, 0.0

    def elapsed(self):
        seconds = (self.end or time.time()) - self.start
        return {"train_s": self.before["train_s"] + seconds, "segments": self.before["segments"] + 1}

    def load_state_dict(self, state):
        self.periodic_eval_s = state.get("periodic_eval_s", 0.0)
        self.before = state.get("time", self.before)  # checkpoints before it counted one segment


def check_finite(first_nonfinite, epoch, run_dir, gradalign):
    """FloatingPointError if a process saw a non-finite training loss (every process stops together)."""
    bad = int(max(utils.all_gather(int(first_nonfinite))))
    if bad >= 0:
        kept = (f"{run_dir}/{runs.CHECKPOINT} holds the state at the end of epoch {epoch}" if epoch
                else "no epoch had finished, so there is no checkpoint")
        hint = (" (GradAlign with no example of two non-zero gradients is NaN in the original: "
                "--fix_gradalign_empty makes it 0)" if gradalign else "")
        raise FloatingPointError(f"non-finite training loss at iteration {bad}{hint}; stopped: {kept}, and "
                                 "metrics.jsonl the evaluations before it")


def log_progress(trainer, epoch):
    """Off a terminal: iteration, epoch, pace, the training loss and accuracy so far, and the run's ETA."""
    t = trainer
    if not t.lines.due(t.batch_in_epoch, t.n_batches):
        return
    m = t.meters.sums
    n = m["count"]  # 0 right after a periodic evaluation, which starts the running sums again
    so_far = f" | loss {float(m['loss']) / n:.4f} acc {100 * float(m['correct']) / n:.1f}" if n else ""
    t.log.info(f"progress: iter {t.iteration}/{t.total_iters} epoch {epoch}/{t.args.epochs} (batch "
               f"{t.batch_in_epoch}/{t.n_batches}) | {t.lines.rate(t.iteration):.2f} it/s{so_far} | "
               f"ETA {t.lines.eta(t.iteration, t.total_iters)} (training)")


def format_row(row, schedules=()):
    """A periodic evaluation's log line; the regularisers' statistics where non-zero, the scheduled
    coefficients (flags) where given."""
    pct = lambda key: f"{100 * row[key]:5.1f}"  # noqa: E731
    terms = "".join(f" {k} {row[f'train_{k}']:.4g}" for k in methods.stat_keys() if row.get(f"train_{k}"))
    return (f"iter {row['iteration']:6d} epoch {row['epoch']:7.2f} lr {row['lr']:.4f} eps {row['train_eps']:4g} | "
            f"loss {row['train_loss']:.4f}{terms} acc {pct('train_acc')} | test clean {pct('test_clean_acc')} fgsm "
            f"{pct('test_fgsm_acc')} pgd {pct('test_pgd_acc')} | train pgd {pct('train_pgd_acc')} | cos_x_eta "
            f"{row['grad_cosine']:.3f} cos_fgsm_pgd {row['cos_fgsm_pgd']:.3f}"
            + "".join(f" | {flag} {row[flag]:.4g}" for flag in schedules)
            + (f" | scale {row['loss_scale']:g}" if "loss_scale" in row else ""))


def log_evaluation(log, row, schedules=()):
    log.info(format_row(row, schedules))
    if row["catastrophic_overfitting"]:
        log.info(f"catastrophic overfitting at iteration {row['iteration']} (epoch {row['epoch']:g}): test "
                 f"PGD {100 * row['test_pgd_acc']:.1f}%, FGSM {100 * row['test_fgsm_acc']:.1f}%")
    for line in row["warnings"]:
        log.warning(f"warning: {line}")


def check_replicas(model):
    """Raise unless every process holds the same weights (what data-parallel training guarantees) and the same
    buffers (BatchNorm statistics, broadcast from process 0 before it); the number of processes."""
    sums = [torch.cat([t.detach().double().flatten() for t in ts]).sum().item()
            for ts in (list(model.parameters()), list(model.buffers()) or [torch.zeros(1)])]
    everyone = utils.all_gather(sums)
    if any(s != everyone[0] for s in everyone):
        raise RuntimeError(f"processes hold different weights or buffers ((parameter, buffer) sums {everyone})")
    return len(everyone)


def run_final_eval(trainer, dataset, seed, n_points, with_kept, log):
    """The final evaluation of the last model and, with_kept, the kept ones on the first n_points test points:
    weights kept at the same iteration are the same weights, evaluated once, their random starts seeded by (seed,
    iteration)."""
    kept = {"last": {"state": cpu_copy(trainer.model), "iteration": trainer.iteration}}
    if with_kept:
        kept.update(trainer.monitor.kept)
    first_at = {}  # iteration -> the first model kept there
    for name, k in kept.items():
        first_at.setdefault(k["iteration"], name)
    distinct = {name: kept[name]["state"] for name in first_at.values()}
    seeds = {name: evaluation.final_eval_seed(seed, it) for it, name in first_at.items()}
    idx = process_share(evaluation.first_points(len(dataset.test_y), n_points))
    device, p = trainer.data.x.device, trainer.protocol
    rows = evaluation.final_eval(trainer.model, distinct, dataset.test_x[idx].to(device),
                                 dataset.test_y[idx].to(device), p, trainer.restart,
                                 watch=lambda batches, n, desc: final_eval_watch(trainer, batches, n, desc),
                                 seeds=seeds)
    trainer.model.load_state_dict(kept["last"]["state"])
    by_model = {row["model"]: row for row in rows}
    out = []
    for name, k in kept.items():
        first = first_at[k["iteration"]]
        protocol = evaluation.pgd_protocol(p.final_iters, p.final_restarts, p.eps_px * evaluation.PGD_STEP_FRACTION,
                                           by_model[first]["n_points"], len(dataset.test_y), seeds[first],
                                           p.batch_size)
        row = {**by_model[first], "model": name, "iteration": k["iteration"], "protocol": protocol}
        same = f" (the same weights as {first}: evaluated once)" if first != name else ""
        log.info(f"final {name:>13} (iter {row['iteration']}): clean {100 * row['clean_acc']:.2f}% "
                 f"FGSM {100 * row['fgsm_acc']:.2f}% {protocol['label']} {100 * row['pgd_acc']:.2f}% (strict: "
                 f"{100 * row['pgd_any_acc']:.2f}%){same}")
        out.append(row)
    return out


def final_eval_watch(trainer, batches, n_batches, desc):
    """The final evaluation's batches, with progress lines off a terminal and, in one process, a stop between
    batches (the training's checkpoint is complete: a resumed run evaluates again)."""
    for batch in utils.logged_progress(batches, n_batches, desc, trainer.lines.every_s, trainer.log):
        if not utils.is_distributed() and trainer.stop.requested():
            raise utils.StopRequested(f"the final evaluation, after {trainer.where()}")
        yield batch


def run(args, dataset, log, run_dir, checkpoint=None, stop=None):
    torch.manual_seed(args.seed)
    trainer = Trainer(args, dataset, run_dir, log)
    trainer.stop = stop or trainer.stop
    if utils.world_size() > 1:
        torch.manual_seed(args.seed + utils.rank())  # processes draw different attack starts
    if checkpoint is not None:
        if utils.rank() == 0:
            for name in os.listdir(run_dir):  # temporary files of writes that a kill interrupted
                if ".tmp" in name:
                    os.remove(os.path.join(run_dir, name))
        trainer.load_state_dict(checkpoint)
        log.info(f"resumed at {trainer.where()}")
    trainer.write_metrics()  # drops the rows written after the checkpoint (run_locked returns for finished runs)
    log.info(f"{args.model} on {args.dataset}: {len(trainer.data.y)} training images, {trainer.n_batches} "
             f"batches/epoch, {trainer.total_iters} iterations, method {config.method_name(args)}, device "
             f"{args.device}" + (f", {utils.world_size()} processes" if utils.world_size() > 1 else ""))
    for line in config.notes(args) + config.inert_notes(args, utils.world_size()):
        log.info(f"note: {line}")
    trainer.clock.start = time.time()
    trainer.lines = utils.ProgressLines(args.progress_every_s, trainer.iteration)  # the pace of this process's steps
    if trainer.iteration == 0:
        trainer.epoch_zero()
    while trainer.epoch < args.epochs:
        trainer.train_epoch()
        trainer.save_checkpoint()
        if trainer.stop.requested(collective=True):  # once an epoch: the processes agree on it
            raise utils.StopRequested(trainer.where())
    trainer.clock.end = time.time()
    utils.broadcast_buffers(trainer.model)  # the saved model is process 0's: its BatchNorm statistics everywhere
    n_procs = check_replicas(trainer.model)
    replicas = f"; {n_procs} processes hold identical weights and buffers" if n_procs > 1 else ""
    spent, periodic_eval_s = trainer.clock.elapsed(), trainer.clock.periodic_eval_s
    segments = f" over {spent['segments']} processes one after another" if spent["segments"] > 1 else ""
    log.info(f"training done in {spent['train_s']:.1f} s{segments} (periodic evaluations "
             f"{periodic_eval_s:.1f} s){replicas}")
    trainer.metrics += run_final_eval(trainer, dataset, args.seed, args.n_final_eval, args.eval_early_stopped_model,
                                      log)
    trainer.save_checkpoint()
    trainer.write_metrics()
    wall_s = spent["train_s"] + time.time() - trainer.clock.end
    if utils.rank() == 0:
        utils.atomic_write_text(json.dumps({"wall_s": round(wall_s, 1), "train_s": round(spent["train_s"], 1),
                                            "periodic_eval_s": round(periodic_eval_s, 1),
                                            "segments": spent["segments"]}) + "\n",
                                os.path.join(run_dir, "timing.json"))
    log.info(f"done in {wall_s:.1f} s")


def resume_args(parser, argv, args):
    """The resumed run's own arguments (from its args.json), with config.RESUME_OVERRIDES taken from argv."""
    given = config.given_flags(parser, argv)
    extra = given - {"resume"} - config.RESUME_OVERRIDES
    if extra:
        raise UsageError(f"--resume={args.resume!r}: takes no training flags (got --{', --'.join(sorted(extra))}); "
                         "the run's flags are read from its args.json")
    try:
        resumed = runs.load_args(args.resume)
    except UsageError as err:
        raise UsageError(f"--resume={args.resume!r}: {err}") from None
    for flag in given & config.RESUME_OVERRIDES:
        setattr(resumed, flag, getattr(args, flag))
    resumed.resume = args.resume
    return resumed


def existing_run_args(args):
    """--resume_existing: the existing run's arguments if OUT_DIR/RUN_NAME holds a checkpoint whose flags equal
    these (a run that never reached one starts again); args otherwise."""
    if not args.run_name or args.resume:
        raise UsageError("--resume_existing: needs --run_name, the run to continue, and no --resume")
    run_dir = os.path.join(args.out_dir, args.run_name)
    if not os.path.exists(os.path.join(run_dir, runs.CHECKPOINT)):
        return args
    saved = runs.load_args(run_dir)
    differ = config.computational_differences(saved, args)
    if differ:
        listed = "; ".join(f"--{k} {v[0]!r} there, {v[1]!r} here" for k, v in sorted(differ.items()))
        raise UsageError(f"--resume_existing: {run_dir} is a run with other flags ({listed}); give another "
                         "--run_name or --out_dir")
    for flag in config.RESUME_OVERRIDES:
        setattr(saved, flag, getattr(args, flag))
    saved.resume, saved.resume_existing = run_dir, True
    return saved


def prepare(argv):
    """Parse and check everything, load the data and the checkpoint: all errors before any file is written.
    Returns (args, dataset, checkpoint, what args.json records of the data); a finished run's data is not loaded
    (dataset None): there is nothing left to do."""
    parser = config.build_parser(__doc__)
    args = parser.parse_args(argv)
    if args.resume_existing:
        args = existing_run_args(args)
    elif args.resume:
        args = resume_args(parser, argv, args)
    checkpoint = None
    if args.resume:
        checkpoint = runs.load_checkpoint(args.resume)
        n_saved, n_now = len(checkpoint.get("processes", [])), utils.dist_env()[1]
        if n_saved != n_now:
            raise UsageError(f"--resume={args.resume!r}: the run used {n_saved} process(es); resume it with as "
                             f"many (this is {n_now})")
        if any(row["kind"] == "final" for row in checkpoint["metrics"]):
            return args, None, checkpoint, None
    config.check_args(args, utils.dist_env()[1])
    args.device = config.device_from_flag(args.device)
    if args.cuda_graph and args.device.type != "cuda":
        raise UsageError(f"--cuda_graph: needs a CUDA device, and this run's is {args.device}; drop the flag")
    if args.load_model:
        runs.load_checkpoint(args.load_model, "--load_model")  # unreadable: refused now, not after the data load
    given, args.data_dir = args.data_dir, os.path.abspath(args.data_dir)  # a resume from elsewhere finds it
    dataset = data.load_data(args.dataset, args.data_dir, download=checkpoint is None)
    n_train = len(dataset.train_y) if args.n_train < 0 else min(args.n_train, len(dataset.train_y))
    if n_train < args.batch_size:
        raise UsageError(f"--batch_size={args.batch_size}: {given} holds {n_train} training images, not one batch; "
                         "lower --batch_size")
    fingerprint = data.fingerprint(dataset)
    if checkpoint is not None:
        runs.check_fingerprint(args.resume, fingerprint, given)
    return args, dataset, checkpoint, {"data_dir_given": given, "fingerprint": fingerprint,
                                       "source": data.source(args.dataset, args.data_dir)}


def make_run_dir(args):
    name = args.run_name or (f"{time.strftime('%Y%m%d-%H%M%S')}-{args.dataset}-{args.model}-"
                             f"{config.method_name(args)}-eps{args.eps:g}-seed{args.seed}")
    run_dir = os.path.join(args.out_dir, name)
    if args.resume_existing and os.path.isdir(run_dir):  # it never reached a checkpoint: it starts again there
        return run_dir
    if os.path.exists(run_dir):
        raise UsageError(f"--run_name={name!r}: {run_dir} already exists; choose another name or --out_dir")
    try:
        os.makedirs(run_dir)
    except OSError as err:
        raise UsageError(f"--out_dir={args.out_dir!r}: cannot create {run_dir} ({err.strerror}); choose a "
                         "writable folder") from None
    return run_dir


def shared_run_dir(args):
    """The run directory: made by process 0 and told to the others; (None, message) if it cannot be made."""
    run_dir, error = args.resume, None
    if run_dir is None and utils.rank() == 0:
        try:
            run_dir = make_run_dir(args)
        except UsageError as err:
            error = str(err)
    return utils.broadcast((run_dir, error))


def resume_hint(run_dir):
    path = os.path.join(run_dir, runs.CHECKPOINT)
    if not os.path.exists(path):
        return "no checkpoint had been written: start the run again"
    return (f"{path} is intact ({os.path.getsize(path) / 2**20:.1f} MiB); continue with: python train.py --resume "
            f"{run_dir}")


def say(line):
    """One line on stderr, from the first process only."""
    if utils.dist_env()[0] == 0:
        print(f"train.py: {line}", file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest algorithms
    started = time.time()
    try:
        try:
            args, dataset, checkpoint, data_info = prepare(argv)
            if args.estimate and utils.dist_env()[1] > 1:
                raise UsageError("--estimate: run it in one process (it projects the run's wall time from there)")
        except (UsageError, data.DataError) as err:
            say(f"error: {err}")
            return 2
        if dataset is None:
            say(f"{args.resume} had already finished: nothing to do")
            return 0
        if args.estimate:
            tell = lambda line: say(f"--estimate: {line}")  # noqa: E731
            tell("measuring this run's pieces on this machine; the start-up again (the first may have decoded "
                 "the images into the cache, which the run reads)")
            started = time.time()
            args, dataset = prepare(argv)[:2]
            trainer = Trainer(args, dataset, None, utils.get_logger(quiet=True))
            print("\n".join(estimate.project(trainer, args, dataset, time.time() - started, tell)))
            return 0
        utils.init_distributed(args.device)
        with utils.StopSignals() as stop:
            return train_in(args, dataset, checkpoint, data_info, argv, stop)
    except KeyboardInterrupt:  # Ctrl-C before the run directory existed (train_in answers the later ones)
        say("interrupted")
        return 130
    finally:
        if utils.is_distributed():
            torch.distributed.destroy_process_group()


def train_in(args, dataset, checkpoint, data_info, argv, stop):
    """Make (or reopen) the run directory, take its lock and run; the exit status."""
    run_dir, error = shared_run_dir(args)
    if error:
        say(f"error: {error}")
        return 2
    lock = utils.RunLock(run_dir)
    if utils.rank() == 0:
        try:
            lock.__enter__()
            check_after_lock(args, run_dir, checkpoint)
        except (utils.RunLocked, UsageError) as err:
            error = (RUN_LOCKED_EXIT if isinstance(err, utils.RunLocked) else 2, f"error: {err}")
    error = utils.broadcast(error)
    if error:
        lock.__exit__()
        say(error[1])
        return error[0]
    try:
        if checkpoint is not None:  # as it is under the lock: another writer may have moved it on
            checkpoint = runs.load_checkpoint(os.path.join(run_dir, runs.CHECKPOINT))
        return run_locked(args, dataset, checkpoint, data_info, argv, stop, run_dir)
    finally:
        lock.__exit__()


def check_after_lock(args, run_dir, checkpoint):
    """UsageError if another writer made the run's first checkpoint between prepare() and the lock."""
    if checkpoint is None and args.resume_existing and os.path.exists(os.path.join(run_dir, runs.CHECKPOINT)):
        raise UsageError(f"{run_dir} got its first checkpoint while this process started; run the same command "
                         "again to continue it")


def run_locked(args, dataset, checkpoint, data_info, argv, stop, run_dir):
    """Run in the locked run directory; the exit status."""
    first_process = utils.rank() == 0
    if checkpoint is not None and any(row["kind"] == "final" for row in checkpoint["metrics"]):
        say(f"{run_dir} had already finished: nothing to do")
        return 0
    log = utils.get_logger(os.path.join(run_dir, "log.txt") if first_process else None, quiet=not first_process)
    if checkpoint is None and first_process:
        saved = {**config.args_to_dict(args), "_provenance": utils.provenance(args.device, argv), "_data": data_info}
        utils.atomic_write_text(json.dumps(saved, indent=2) + "\n", os.path.join(run_dir, "args.json"))
    log.info(f"run directory {run_dir}")
    try:
        run(args, dataset, log, run_dir, checkpoint, stop)
        if utils.is_distributed():
            gc.collect()  # free DDP's pending gloo work now, not during interpreter shutdown (an abort)
            torch.distributed.barrier()  # no process tears the group down while another still uses it
    except utils.StopRequested as where:
        log.error(f"stopped by {stop.name} at {where}; {resume_hint(run_dir)}")
        return 128 + stop.signum
    except KeyboardInterrupt:
        log.error(f"stopped at once by a second Ctrl-C; {resume_hint(run_dir)}")
        return 130
    except (FloatingPointError, TrainingUnhealthy) as err:
        log.error(f"error: {err}")
        return 1
    except utils.WriteError as err:
        log.error(f"error: {err}; {resume_hint(run_dir)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
