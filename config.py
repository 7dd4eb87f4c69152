"""train.py's flags, their checks, the run name, and the notes on the original's quirks they reproduce.

Defaults are the original code's (github CharlesJames13586/Improving-Single-Step-Adversarial-Training-By-Local-
Smoothing at 9b877ea); the `--fix_*` flags correct what is plainly a bug there, and the other extra flags are
options that are off by default. Every pixel-valued flag is in pixels/255; images are in [0, 1].
"""
import argparse
import os
import re
import shlex
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

import data
import methods
import schedules
import utils
from models import INPUT_NORMALIZATIONS, MODELS

LR_MAX = 0.2  # --lr_max's default, the original's, meant for the ResNets' SGD
CNN_LR_MAX = 0.003  # the --lr_max of the original's CNN scripts (Adam)
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
ATTACKS = ("fgsm", "n_fgsm", "pgd", "pgd_corner", "none")
AMP_DTYPES = ("float16", "bfloat16")
BN_DOUBLE_BACKWARDS = ("closed_form", "autograd")
CONV_DOUBLE_BACKWARDS = ("explicit", "autograd")


class UsageError(Exception):
    """A bad flag or combination; the message names the flag, the value and what is allowed."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written, and every flag's default."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


class TrainParser(OneLineParser):
    """train.py's parser: `--preset NAME` stands for the preset's flags at its place, so flags after it override
    them and flags before it are overridden."""

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(expand_presets(sys.argv[1:] if args is None else list(args)), namespace)


def expand_presets(argv):
    out, tokens = [], iter(argv)
    for tok in tokens:
        if tok == "--preset" or tok.startswith("--preset="):
            name = tok.partition("=")[2] if "=" in tok else next(tokens, "")
            if name not in methods.PRESETS:
                raise UsageError(f"--preset={name!r}: choose one of {', '.join(methods.PRESETS)}")
            out += [f"--preset={name}", *shlex.split(methods.PRESETS[name].flags)]
        else:
            out.append(tok)
    return out


def build_parser(description=None):
    p = TrainParser(description=description, formatter_class=HelpFormatter,
                    allow_abbrev=False)
    g = p.add_argument_group("data").add_argument
    g("--dataset", default="cifar10", help=f"one of {', '.join(data.DATASETS)}")
    g("--data_dir", default="data", help="the dataset's folder (downloaded there when missing); cifar10 also "
      "reads an image folder train/<class>/*, test/<class>/*")
    g("--n_train", type=int, default=-1, help="train on the first this many examples; -1: all")
    g = p.add_argument_group("model").add_argument
    g("--model", default="resnet18", help=f"one of {', '.join(MODELS)}")
    g("--n_layers", type=int, default=1, help="cnn: number of 3x3 conv layers")
    g("--n_filters_cnn", type=int, default=16, help="cnn: filters per conv layer")
    g("--input_normalization", default="none", help="none (the original) or dataset (training mean/std inside "
      "the model)")
    g("--load_model", default=None, metavar="RUN_DIR", help="start from the last weights of a finished run "
      "instead of the initialisation (the schedules start afresh)")
    g = p.add_argument_group("training").add_argument
    g("--preset", default=None, metavar="NAME", help=f"a method's flags by name (one of {', '.join(methods.PRESETS)}; "
      "docs/iteration.md#presets); flags after it override them")
    g("--epochs", "--epoch", dest="epochs", type=int, default=30, help="training epochs (after the original's "
      "step-less epoch 0)")
    g("--batch_size", type=int, default=128, help="global training batch (images), split over processes")
    g("--lr_max", type=float, default=LR_MAX, help="peak learning rate")
    g("--lr_schedule", default="cyclic", help=f"one of {', '.join(schedules.LR_SCHEDULES)}; set every iteration")
    g("--weight_decay", type=float, default=5e-4, help="SGD (momentum 0.9) for ResNets, Adam for cnn")
    g("--weight_clip", action="store_true", help="the original's weight clipping after each step (weights >= 0.2 "
      "become 0.1, <= -0.2 become -0.1)")
    g("--seed", type=int, default=0, help="seed of the initialisation, data order, augmentation and attacks")
    g = p.add_argument_group("training attack").add_argument
    g("--eps", type=float, default=8.0, help="L-inf radius, pixels/255 (training and evaluation)")
    g("--eps_below_one_pixel", action="store_true", help="accept an --eps below 1 (refused by default: 0.031 is "
      "usually 8/255 written in [0, 1] units)")
    g("--attack", default="fgsm", help=f"one of {', '.join(ATTACKS)} (n_fgsm: N-FGSM, its noise then a step of "
      "--fgsm_alpha x eps)")
    g("--attack_init", default="random", help="zero, or random (uniform in the eps-ball; on the 1/255 grid "
      "under VFSAT); N-FGSM draws its own noise")
    g("--fgsm_alpha", type=float, default=1.25, help="FGSM (and N-FGSM) step as a multiple of eps")
    g("--n_fgsm_noise", type=float, default=2.0, help="N-FGSM: its noise is uniform in this multiple of eps (its "
      "--unif), clipped to [0, 1] images")
    g("--n_fgsm_clip", type=float, default=0.0, help="N-FGSM: the perturbation clipped to this multiple of eps "
      "after its step (its --clip); 0: not clipped, as its default")
    g("--mast", action="store_true", help="MAST: the FGSM step's magnitude drawn per pixel from the eps-ball grid")
    g("--pgd_train_n_iters", type=int, default=10, help="PGD training: iterations (0: train at the start, "
      "as the original)")
    g("--pgd_alpha_train", type=float, default=2.0, help="PGD training: step, pixels/255")
    g("--minibatch_replay", type=int, default=1, help="Free-AT as the original runs it: each batch is used this "
      "many consecutive iterations, the perturbation carried over (with fgsm; other attacks only replay batches)")
    g("--discrete_eps", action="store_true", help="VFSAT: the training eps cycles over a discrete ramp by epoch")
    g = p.add_argument_group("regularisers").add_argument
    for r in methods.REGULARISERS:  # each row declares its flags
        g(f"--{r.flag}", type=float, default=0.0, help=f"{r.name} coefficient (0: off){r.help}")
        for name, keywords in r.flags:
            g(f"--{name}", **keywords)
    g = p.add_argument_group("corrections of the original (each off by default)").add_argument
    g("--fix_vfsat_list", action="store_true", help="VFSAT ramps to --eps for every eps (the original's list "
      "ignores eps other than 16 and ramps to 8)")
    g("--fix_vfsat_start", action="store_true", help="VFSAT's random start drawn in the epoch's ball (the "
      "original draws it in the full --eps ball, so its sign often outweighs the step)")
    g("--vfsat_reg_eps", action="store_true", help="GradSum/GradAlign random points in the epoch's VFSAT ball "
      "(the original uses --eps)")
    g("--fix_gradsum", action="store_true", help="GradSum takes effect with a random start (the gradient at the "
      "start, differentiated) and with PGD/none (a random point), and combines with zero-init GradAlign; the "
      "original's term is a detached constant there, or crashes")
    g("--fix_gradalign_empty", action="store_true", help="GradAlign is 0, not NaN, when no example has two "
      "non-zero gradients")
    g = p.add_argument_group("evaluation").add_argument
    g("--attack_iters", type=int, default=10, help="periodic evaluation: PGD iterations (step eps/4); "
      "0: clean accuracy in its place, as in the original")
    g("--n_restarts", type=int, default=1, help="periodic evaluation: PGD random restarts (0: as 0 iterations)")
    g("--eval_iter_freq", type=int, default=200, help="evaluate every this many iterations")
    g("--n_eval_every_k_iter", type=int, default=256, help="periodic evaluation on the first this many test "
      "points and training points")
    g("--start_eval_epoch", type=int, default=0, help="periodic evaluations from the epoch after this one")
    g("--n_final_eval", type=int, default=-1, help="final evaluation on the first this many test points; -1: all")
    g("--final_attack_iters", type=int, default=50, help="final evaluation: PGD iterations (the original's 50)")
    g("--final_n_restarts", type=int, default=10, help="final evaluation: PGD restarts (the original's 10)")
    g("--eval_early_stopped_model", action="store_true", help="final evaluation of the kept models too")
    g("--stop_on_warning", action="store_true", help="end the run (exit 1) at the first health warning (a "
      "vanishing loss scale, zero regulariser or perturbation, a constant loss) instead of logging it")
    g("--batch_size_eval", type=int, default=256, help="evaluation batch per process (images)")
    g("--batched_restarts", action="store_true", help="evaluations: every PGD restart of a batch in one pass of "
      "n_restarts x batch_size_eval images (starts drawn as the restart loop draws them): the original's results "
      "without the ln K skip, faster on a GPU whose batches of later restarts would be small")
    g = p.add_argument_group("precision and speed").add_argument
    g("--half_prec", action="store_true", help="mixed precision (autocast; fp16 with dynamic loss scaling)")
    g("--amp_dtype", default="float16", help=f"with --half_prec: one of {', '.join(AMP_DTYPES)} (bfloat16 needs "
      "no loss scaling)")
    g("--periodic_eval_fp32", action="store_true", help="with --half_prec: the periodic evaluations in fp32 (the "
      "original runs them under its mixed precision, attack gradients at the training's loss scale; the final "
      "evaluation is fp32 either way)")
    g("--bn_double_backward", default="closed_form", help="BatchNorm's double backward (GradSum, GradAlign): "
      "closed_form (the same gradients in fewer passes over the activations) or autograd (PyTorch's generic one)")
    g("--bn_float32", action="store_true", help="with --half_prec and GradSum/GradAlign: BatchNorm in fp32, as the "
      "original's apex registration (the same values up to rounding: its output is rounded to the half dtype at the "
      "next convolution either way); always so with --bn_double_backward=autograd, whose fp16 form overflows")
    g("--conv_double_backward", default="explicit", help="convolutions' double backward (GradSum, GradAlign): "
      "explicit (the same gradients; the weight's term by the weight-gradient kernel, no weight gradient in the "
      "input-gradient backward) or autograd (PyTorch's generic one)")
    g("--channels_last", action="store_true", help="channels-last memory format (faster convolutions on GPUs)")
    g("--cuda_graph", action="store_true", help="on one CUDA GPU: replay each training iteration and each evaluation "
      "PGD restart from a CUDA graph (the same computation without the host's launch time; other random draws in "
      "training; not with Free-AT or --compile)")
    g("--compile", action="store_true", help="torch.compile the model (not with GradSum/GradAlign)")
    g("--sync_bn", action="store_true", help="under torchrun on GPUs: synchronise BatchNorm statistics")
    g("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    g = p.add_argument_group("runs").add_argument
    g("--out_dir", default="runs", help="parent folder of run directories")
    g("--run_name", default=None, help="run directory name (letters, digits, . _ -); default: from the flags")
    g("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint "
      f"(its flags come from RUN_DIR/args.json; only --{', --'.join(sorted(RESUME_OVERRIDES))} may be given too)")
    g("--resume_existing", action="store_true", help="with --run_name: when OUT_DIR/RUN_NAME exists, continue it "
      "instead of refusing (a finished run exits at once, one without a checkpoint starts again there); its "
      "flags must equal these (what a rerun of a table or a requeued cluster task does)")
    g("--progress_every_s", type=float, default=60.0, help="off a terminal (nohup, Slurm), where no progress bar "
      "is drawn: a progress line every this many seconds (0: at every tenth of an epoch)")
    g("--estimate", action="store_true", help="instead of running: measure this run's pieces on this machine and "
      "print its projected wall time (writes nothing)")
    return p


# Flags that cannot change what a run computes: where it runs, where it writes, how it logs, how it was started.
NOT_COMPUTATIONAL = frozenset({"device", "data_dir", "out_dir", "run_name", "resume", "resume_existing", "preset",
                               "progress_every_s", "estimate"})
# Flags that change how fast a run is computed, not its method: a run with them still matches the paper's row of
# its method (report.py names them there). What each can change in the numbers: docs/differences.md.
SPEED_FLAGS = frozenset({"half_prec", "amp_dtype", "periodic_eval_fp32", "bn_double_backward", "bn_float32",
                         "conv_double_backward", "channels_last", "cuda_graph", "compile", "batched_restarts",
                         "batch_size_eval"})
RESUME_OVERRIDES = frozenset({"device", "data_dir", "progress_every_s"})  # may be given with --resume


def computational_differences(saved, args):
    """{flag: (saved value, this value)} for the flags that change the computation and differ."""
    now = args_to_dict(args)
    return {k: (v, now.get(k)) for k, v in args_to_dict(saved).items()
            if k not in NOT_COMPUTATIONAL and now.get(k) != v}


def check_args(args, n_procs=1):
    """Reject values the code cannot run, before any work starts."""
    def need(ok, flag, allowed):
        if not ok:
            raise UsageError(f"--{flag}={getattr(args, flag)!r}: {allowed}")

    choices = (("dataset", data.DATASETS), ("model", MODELS), ("lr_schedule", schedules.LR_SCHEDULES),
               ("attack", ATTACKS), ("attack_init", ("zero", "random")), ("amp_dtype", AMP_DTYPES),
               ("bn_double_backward", BN_DOUBLE_BACKWARDS), ("conv_double_backward", CONV_DOUBLE_BACKWARDS),
               ("input_normalization", INPUT_NORMALIZATIONS))
    for flag, allowed in choices:
        need(getattr(args, flag) in allowed, flag, f"choose one of {', '.join(allowed)}")
    for flag in ("epochs", "batch_size", "batch_size_eval", "n_layers", "n_filters_cnn", "minibatch_replay",
                 "eval_iter_freq", "n_eval_every_k_iter"):
        need(getattr(args, flag) >= 1, flag, "must be a positive integer")
    for flag in ("attack_iters", "n_restarts", "final_attack_iters", "final_n_restarts"):
        need(getattr(args, flag) >= 0, flag, "must be zero (clean accuracy, as in the original) or positive")
    need(args.pgd_train_n_iters >= 0, "pgd_train_n_iters", "must be zero (training at the start: zero, or uniform "
         "noise with --attack_init=random, as in the original) or positive")
    for flag in ("lr_max", "fgsm_alpha", "pgd_alpha_train", "eps"):
        need(getattr(args, flag) > 0, flag, "must be positive")
    for flag in ("start_eval_epoch", "weight_decay", "n_fgsm_noise", "n_fgsm_clip",
                 *(r.flag for r in methods.REGULARISERS)):
        need(getattr(args, flag) >= 0, flag, "must be zero or positive")
    for r in methods.REGULARISERS:  # each row's own checks of its flags
        for flag, bad in r.refuse(args):
            need(False, flag, bad)
    need(not (args.mast and args.attack == "n_fgsm"), "mast", "is an FGSM step's magnitude; N-FGSM's step is "
         "--fgsm_alpha x eps")
    need(args.eps <= 255, "eps", "is in pixels/255: at most 255")
    need(args.eps >= 1 or args.eps_below_one_pixel, "eps", f"is in pixels/255, so this trains at {args.eps:g}/255; "
         f"{args.eps:g} in [0, 1] units is {255 * args.eps:.3g}/255, --eps={round(255 * args.eps)}; add "
         "--eps_below_one_pixel to train below one intensity level")
    need(args.n_train == -1 or args.n_train >= args.batch_size, "n_train",
         f"-1 (all) or at least --batch_size ({args.batch_size})")
    given_batch = args.n_eval_every_k_iter == build_parser().get_default("n_eval_every_k_iter")  # which to blame
    need(args.n_eval_every_k_iter >= args.batch_size, "batch_size" if given_batch else "n_eval_every_k_iter",
         f"--batch_size ({args.batch_size}) is above --n_eval_every_k_iter ({args.n_eval_every_k_iter}), and the "
         "original evaluates training points in full training batches: lower the one or raise the other")
    need(args.n_final_eval == -1 or args.n_final_eval >= 1, "n_final_eval", "-1 (all) or a positive integer")
    gradsum_flag = "grad_input_sum_coeff" if args.grad_input_sum_coeff else "print_g_i_s"  # either computes it
    need(not (getattr(args, gradsum_flag) and args.grad_align_cos_lambda and args.attack_init == "zero"
              and args.attack != "n_fgsm" and not args.fix_gradsum), gradsum_flag,
         "with --grad_align_cos_lambda and --attack_init=zero the original crashes (its GradSum term is never "
         "computed); add --fix_gradsum to compute both terms")
    need(not (args.compile and methods.uses_double_backprop(args)), "compile",
         "compiled models do not support the double backprop of GradSum and GradAlign: drop --compile")
    need(not args.cuda_graph or (n_procs == 1 and not methods.Attack.from_flags(args).carries and not args.compile),
         "cuda_graph", "one process, no Free-AT (it carries its perturbation) and no --compile")
    need(args.batch_size % n_procs == 0, "batch_size", f"the global batch must split evenly over {n_procs} processes")
    need(args.run_name is None or RUN_NAME_PATTERN.match(args.run_name), "run_name",
         "use letters, digits, '.', '_' and '-' only")
    need(os.path.isdir(args.data_dir) or not os.path.exists(args.data_dir), "data_dir", "is not a folder")
    need(args.load_model is None or os.path.isdir(args.load_model), "load_model", "is not a run directory")


def method_name(args):
    """A short filesystem-safe name of the training method, e.g. fgsm-vfsat or pgd10a1.6-gradsum1."""
    pgd = f"{args.pgd_train_n_iters}a{args.pgd_alpha_train:g}"  # iterations and step (pixels/255)
    parts = [{"fgsm": "fgsm", "n_fgsm": f"nfgsm{args.n_fgsm_noise:g}", "pgd": f"pgd{pgd}",
              "pgd_corner": f"pgdcorner{pgd}", "none": "std"}[args.attack]]
    if methods.Attack.from_flags(args).carries:
        parts[0] = f"free{args.minibatch_replay}"
    elif args.minibatch_replay > 1:
        parts.append(f"replay{args.minibatch_replay}")
    if args.attack_init == "random" and args.attack not in ("none", "n_fgsm"):
        parts.append("rs")
    flags = (("mast", "mast"), ("discrete_eps", "vfsat"),
             *(tag for r in methods.REGULARISERS for tag in ((r.flag, r.tag), *r.tags)))
    for flag, name in flags:
        value = getattr(args, flag)
        if value:
            parts.append(name if value is True else f"{name}{value:g}")
    return "-".join(parts)



def grad_sum_is_constant(args):
    """Where the original's GradSum term is a detached constant: it reuses an attack gradient that is not
    differentiable (FGSM's, or PGD/none's unless GradAlign differentiates it)."""
    return (methods.grad_sum_reuses_attack_grad(args) and not args.fix_gradsum
            and (methods.Attack.from_flags(args).single_step or not args.grad_align_cos_lambda))


class Quirk(NamedTuple):
    applies: Callable  # args -> whether these flags reproduce it
    note: Callable  # args -> its `note:` line in the log


def vfsat_list_differs(a):
    return schedules.vfsat_cycle(a.eps) != schedules.vfsat_cycle(a.eps, ramp_to_eps=True)


QUIRKS = {  # the original's behaviours that the flags reproduce although they are bugs, or traps: a note each
    "vfsat_list": Quirk(lambda a: a.discrete_eps and not a.fix_vfsat_list and vfsat_list_differs(a), lambda a:
                        f"VFSAT trains with the original's list {schedules.vfsat_cycle(a.eps)} for eps {a.eps:g}, "
                        "not a ramp to eps (--fix_vfsat_list)"),
    "vfsat_start_in_full_ball": Quirk(
        lambda a: a.discrete_eps and a.attack_init == "random" and a.attack == "fgsm" and not a.fix_vfsat_start,
        lambda a: "VFSAT's random start is drawn in the full eps-ball, as in the original (--fix_vfsat_start)"),
    "vfsat_ignored_by_pgd": Quirk(lambda a: a.discrete_eps and a.attack in ("pgd", "pgd_corner"), lambda a:
                                  "--discrete_eps has no effect on PGD training, as in the original"),
    "gradsum_constant": Quirk(lambda a: a.grad_input_sum_coeff and grad_sum_is_constant(a), lambda a:
                              "GradSum is a detached constant with this attack and start, as in the original: it "
                              "changes the logged loss only (--fix_gradsum)"),
    "free_at_zero_start": Quirk(lambda a: methods.Attack.from_flags(a).carries and a.attack_init == "random",
                                lambda a: "Free-AT starts from zero whatever --attack_init says, as in the original"),
    "replay_without_carry": Quirk(
        lambda a: a.minibatch_replay > 1 and not methods.Attack.from_flags(a).carries,
        lambda a: f"--minibatch_replay replays each batch {a.minibatch_replay} times with --attack={a.attack}, "
                  "without carrying a perturbation, as in the original (Free-AT needs --attack=fgsm)"),
    "mast_ignored": Quirk(lambda a: a.mast and a.attack != "fgsm", lambda a: f"--mast has no effect with "
                          f"--attack={a.attack}, as in the original (it is an FGSM step)"),
    "cnn_at_resnet_lr": Quirk(lambda a: a.model == "cnn" and a.lr_max == LR_MAX, lambda a:
                              f"--model=cnn with the default --lr_max={LR_MAX:g} (the original's, for the ResNets' "
                              "SGD): Adam at this rate usually ends as a constant classifier; the original's CNN "
                              f"scripts and sh/cpu_experiment.sh use --lr_max={CNN_LR_MAX:g}"),
}


class Inert(NamedTuple):
    flags: tuple  # flags that do nothing for the runs `applies` names
    applies: Callable  # (args, n_procs) -> whether they do nothing for this run
    why: str


def gradsum_reads_attack_init(a):
    return bool(a.grad_input_sum_coeff or a.print_g_i_s)  # methods.grad_sum_reuses_attack_grad reads it for none


INERT = (  # a note where such a flag is off its default; report.py leaves them out of the run's computational flags
    Inert(("n_layers", "n_filters_cnn"), lambda a, n: a.model != "cnn", "read by --model=cnn alone"),
    Inert(("fgsm_alpha",), lambda a, n: a.attack not in ("fgsm", "n_fgsm"), "the step of FGSM and N-FGSM alone"),
    Inert(("n_fgsm_noise", "n_fgsm_clip"), lambda a, n: a.attack != "n_fgsm", "read by --attack=n_fgsm alone"),
    Inert(("pgd_train_n_iters", "pgd_alpha_train"), lambda a, n: a.attack not in ("pgd", "pgd_corner"),
          "read by PGD training alone"),
    Inert(("attack_init",), lambda a, n: a.attack == "n_fgsm" or (a.attack == "none"
                                                                   and not gradsum_reads_attack_init(a)),
          "N-FGSM draws its own noise; no attack has no start"),
    Inert(("amp_dtype", "periodic_eval_fp32"), lambda a, n: not a.half_prec, "read with --half_prec alone"),
    Inert(("sync_bn",), lambda a, n: n == 1 or not str(a.device).startswith("cuda"),
          "SyncBatchNorm needs several processes on GPUs"),
)


def inert_flags(args, n_procs):
    """{flag: why} of the flags that do nothing for a run of these flags on n_procs processes."""
    return {flag: rule.why for rule in INERT if rule.applies(args, n_procs) for flag in rule.flags}


def flag_text(name, value):
    """The flag as a command line gives it: --name for True, --name=value otherwise (floats as %g)."""
    return f"--{name}" if value is True else f"--{name}={value:g}" if isinstance(value, float) else f"--{name}={value}"


def inert_notes(args, n_procs):
    """A log line for each flag that does nothing for this run and is off its default (given, or a preset's)."""
    defaults = build_parser().parse_args([])
    return [f"{flag_text(flag, getattr(args, flag))} does nothing for this run ({why}); it is left out of the run's "
            "computational flags" for flag, why in inert_flags(args, n_procs).items()
            if getattr(args, flag) != getattr(defaults, flag)]


def notes(args):
    """One log line for each of QUIRKS that these flags reproduce."""
    return [q.note(args) for q in QUIRKS.values() if q.applies(args)]


def given_flags(parser, argv):
    """Destinations of the flags that argv names explicitly."""
    names = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
    return {a.dest for a in parser._actions if names & set(a.option_strings)}


def args_to_dict(args):
    return {k: (str(v) if not isinstance(v, (int, float, str, bool, type(None))) else v)
            for k, v in vars(args).items()}


def device_from_flag(name):
    """The torch.device that --device names (auto: CUDA when available); UsageError if it cannot be used here."""
    try:
        device = utils.choose_device(name)
        torch.empty(0, device=device)
        return device
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"--device={name!r}: not available here ({str(err).splitlines()[0]})") from None
