"""train.py's flags, their checks, the run name, and the loader of a saved run's arguments.

Defaults are the original code's (github CharlesJames13586/Improving-Single-Step-Adversarial-Training-By-Local-
Smoothing at 9b877ea); the `--fix_*` flags correct what is plainly a bug there, and the other extra flags are
options that are off by default. Every pixel-valued flag is in pixels/255; images are in [0, 1].
"""
import argparse
import json
import os
import re
import shlex
import sys
from typing import NamedTuple

import torch

import data
import methods
import schedules
import utils
from models import INPUT_NORMALIZATIONS, MODELS, Normalize, build_model, configure_batchnorm, configure_conv

LR_MAX = 0.2  # --lr_max's default, the original's, meant for the ResNets' SGD
CNN_LR_MAX = 0.003  # the --lr_max of the original's CNN scripts (Adam)
CHECKPOINT = "checkpoint.pt"
SAVED_MODELS = ("last", "early_stopped", "best_test")  # the weights a finished run's checkpoint holds
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
    for r in methods.REGULARISERS:
        g(f"--{r.flag}", type=float, default=0.0, help=f"{r.name} coefficient (0: off){r.help}")
    g("--print_g_i_s", action="store_true", help="compute and log the GradSum norm even when its coefficient is 0")
    g("--grad_input_sum_fd_step", type=float, default=0.5, help="GradSum-FD: the finite difference's move, "
      "pixels/255 per pixel in RMS (its error against GradSum: docs/peers.md)")
    g("--elle_adaptive", action="store_true", help="ELLE-A: ELLE's lambda starts at 0, jumps to --elle_lambda "
      "when the linearity error exceeds its running mean + --elle_sensitivity std, else decays")
    g("--elle_decay", type=float, default=0.99, help="ELLE-A: lambda's factor at each iteration without a jump")
    g("--elle_sensitivity", type=float, default=2.0, help="ELLE-A: standard deviations above the mean that make "
      "lambda jump")
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
RESUME_OVERRIDES = frozenset({"device", "data_dir", "progress_every_s"})  # may be given with --resume


def computational_differences(saved, args):
    """{flag: (saved value, this value)} for the flags that change the computation and differ."""
    now = args_to_dict(args)
    return {k: (v, now.get(k)) for k, v in args_to_dict(saved).items()
            if k not in NOT_COMPUTATIONAL and now.get(k) != v}


def uses_double_backprop(args):
    return any(r.double_backprop and r.computed(args) for r in methods.REGULARISERS)


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
    for flag in ("lr_max", "fgsm_alpha", "pgd_alpha_train", "eps", "grad_input_sum_fd_step", "elle_decay"):
        need(getattr(args, flag) > 0, flag, "must be positive")
    for flag in ("start_eval_epoch", "weight_decay", "n_fgsm_noise", "n_fgsm_clip", "elle_sensitivity",
                 *(r.flag for r in methods.REGULARISERS)):
        need(getattr(args, flag) >= 0, flag, "must be zero or positive")
    need(not (args.grad_input_sum_coeff and args.grad_input_sum_fd_coeff), "grad_input_sum_fd_coeff",
         "GradSum-FD estimates the GradSum term: use it or --grad_input_sum_coeff, not both")
    need(not args.elle_adaptive or args.elle_lambda > 0, "elle_adaptive", "needs --elle_lambda, its maximum lambda")
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
    need(not (args.compile and uses_double_backprop(args)), "compile",
         "compiled models do not support the double backprop of GradSum and GradAlign: drop --compile")
    need(not args.cuda_graph or (n_procs == 1 and not methods.carries_perturbation(args) and not args.compile),
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
    if methods.carries_perturbation(args):
        parts[0] = f"free{args.minibatch_replay}"
    elif args.minibatch_replay > 1:
        parts.append(f"replay{args.minibatch_replay}")
    if args.attack_init == "random" and args.attack not in ("none", "n_fgsm"):
        parts.append("rs")
    flags = (("mast", "mast"), ("discrete_eps", "vfsat"), *((r.flag, r.tag) for r in methods.REGULARISERS),
             ("elle_adaptive", "adaptive"))
    for flag, name in flags:
        value = getattr(args, flag)
        if value:
            parts.append(name if value is True else f"{name}{value:g}")
    return "-".join(parts)


def given_flags(parser, argv):
    """Destinations of the flags that argv names explicitly."""
    names = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
    return {a.dest for a in parser._actions if names & set(a.option_strings)}


# Flags whose default computes something other than what runs saved before the flag existed computed: such a
# run reads as if it had the flag at the value that reproduces its own computation (its evaluations were fp32).
BEFORE_THE_FLAG = {"periodic_eval_fp32": True}


def load_args(run_dir):
    """A saved run's arguments: its args.json laid over today's defaults, so runs saved before a flag existed
    read as if they had its default, or its BEFORE_THE_FLAG value where the default changed what they compute.
    (Runs saved before the faithful defaults hold every flag explicitly.)"""
    path = os.path.join(run_dir, "args.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"{run_dir}: cannot read args.json there ({type(err).__name__}); is it a run "
                         "directory written by train.py?") from None
    args = build_parser().parse_args([])
    vars(args).update(BEFORE_THE_FLAG)
    vars(args).update({k: v for k, v in saved.items() if not k.startswith("_")})  # _provenance is not a flag
    return args


def saved_extras(run_dir):
    """The entries of a run's args.json that are not flags (_provenance, _data), {} where there are none."""
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            return {k: v for k, v in json.load(f).items() if k.startswith("_")}
    except (OSError, ValueError):
        return {}


def check_fingerprint(run_dir, here, data_dir, flag="--data_dir"):
    """UsageError unless `here`, data.fingerprint of the data loaded from data_dir, is the fingerprint of the data
    the run was trained on (runs saved before fingerprints were recorded pass)."""
    saved = saved_extras(run_dir).get("_data", {}).get("fingerprint")
    if saved and saved != here:
        raise UsageError(f"{flag}={data_dir!r}: that data ({here}) is not the run's ({saved}); give the folder "
                         "the run was trained on")


def args_to_dict(args):
    return {k: (str(v) if not isinstance(v, (int, float, str, bool, type(None))) else v)
            for k, v in vars(args).items()}


def why_no_checkpoint(run_dir):
    """What a run directory without its checkpoint tells of why, and what to do."""
    try:
        rows = utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    except (OSError, ValueError):
        rows = []
    if any(r.get("kind") == "final" for r in rows):
        return (f"the run finished, so its {CHECKPOINT} was deleted or moved: put it back; weights saved elsewhere "
                "are read by eval.py --weights FILE")
    if not os.path.exists(os.path.join(run_dir, "args.json")):
        return "not a run directory written by train.py"
    return "the run stopped before its first epoch ended: start it again"


def load_checkpoint(path, flag="--resume"):
    """A checkpoint written by train.py, from its run directory (or the file itself)."""
    ckpt = os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{flag}={path!r}: no {CHECKPOINT} there ({why_no_checkpoint(os.path.dirname(ckpt))})") \
            from None
    except Exception as err:  # truncated, corrupt, or not a checkpoint
        raise UsageError(f"{flag}={path!r}: {ckpt} is unreadable ({type(err).__name__}); it was not written "
                         "by train.py or is damaged") from None


def saved_run_parser(description, default_models=SAVED_MODELS, seed_help="seed of the random draws", default_seed=0,
                     run_optional=False):
    """The arguments of the tools that read a finished run (eval.py, surface.py): RUN_DIR, the models, eps, the
    data folder, the device and the seed."""
    p = OneLineParser(description=description, formatter_class=HelpFormatter,
                      allow_abbrev=False)
    p.add_argument("run", metavar="RUN_DIR", nargs="?" if run_optional else None,
                   help="a run directory written by train.py")
    p.add_argument("--models", nargs="+", default=list(default_models), help=f"any of {', '.join(SAVED_MODELS)}")
    p.add_argument("--eps", type=float, help="pixels/255 (default: the run's)")
    p.add_argument("--data_dir", help="default: the run's")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=default_seed, help=seed_help)
    return p


class SavedRun(NamedTuple):
    args: argparse.Namespace  # the run's flags
    dataset: data.ImageData
    model: torch.nn.Module  # its network on the device, in eval mode
    states: dict  # {name: state dict} of the saved models
    iterations: dict  # {name: the iteration at which it was saved}
    device: torch.device


def open_saved_run(opts):
    """The SavedRun that a saved_run_parser's opts name; fills in opts.eps."""
    bad = [m for m in opts.models if m not in SAVED_MODELS]
    if bad:
        raise UsageError(f"--models={bad[0]!r}: choose from {', '.join(SAVED_MODELS)}")
    if not os.path.isdir(opts.run):
        raise UsageError(f"RUN_DIR={opts.run!r}: not a run directory")
    run = load_args(opts.run)
    ckpt = load_checkpoint(opts.run, "RUN_DIR")
    states = saved_models(ckpt)
    iterations = {"last": ckpt["iteration"], **{name: kept["iteration"] for name, kept in ckpt["kept"].items()}}
    opts.eps = opts.eps or run.eps
    device = device_from_flag(opts.device)
    data_dir = opts.data_dir or run.data_dir
    dataset = data.load_data(run.dataset, data_dir, download=False)
    check_fingerprint(opts.run, data.fingerprint(dataset), data_dir)
    return SavedRun(run, dataset, model_from_args(run, dataset).to(device).eval(), states, iterations, device)


WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # where common checkpoints keep the weights
PREFIXES = ("module.", "model.")  # DataParallel's and wrapper modules' prefixes, as RobustBench's loader strips them
SHORTCUT = (".shortcut.0.weight", ".shortcut.weight")  # RobustBench's projection shortcut, ours


def open_weights(opts):
    """A SavedRun for a weights file (--weights) with the layout its flags name: one model, named by the file."""
    args = build_parser().parse_args([])
    for name in ("dataset", "model", "input_normalization", "n_layers", "n_filters_cnn"):
        setattr(args, name, getattr(opts, name))
    args.eps = opts.eps = opts.eps or args.eps
    if opts.model not in MODELS:
        raise UsageError(f"--model={opts.model!r}: choose one of {', '.join(MODELS)}")
    if opts.input_normalization not in INPUT_NORMALIZATIONS:
        raise UsageError(f"--input_normalization={opts.input_normalization!r}: choose one of "
                         f"{', '.join(INPUT_NORMALIZATIONS)}")
    if not os.path.isfile(opts.weights):
        raise UsageError(f"--weights={opts.weights!r}: no such file")
    device = device_from_flag(opts.device)
    dataset = data.load_data(args.dataset, opts.data_dir, download=False)
    model = model_from_args(args, dataset)
    state = read_state_dict(opts.weights, model, opts.model)
    name = os.path.splitext(os.path.basename(opts.weights))[0]
    return SavedRun(args, dataset, model.to(device).eval(), {name: state}, {name: 0}, device)


def read_state_dict(path, model, model_flag):
    """The state dict in `path` (a plain one, train.py's checkpoint, or RobustBench's PreActResNet layout) as
    `model` names it; UsageError naming the first missing, unexpected or misshapen entry."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, pickled code, truncated
        raise UsageError(f"--weights={path!r}: not a readable state dict ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120]})") from None
    while isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in WRAPPER_KEYS):
        obj = next(obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict))
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UsageError(f"--weights={path!r}: holds no state dict (a dict of tensors, or one under "
                         f"{', '.join(WRAPPER_KEYS)})")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    obj = {k.replace(*SHORTCUT): v for k, v in obj.items()}
    expected = model.state_dict()
    own = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, Normalize) for b in ("mean", "std")}
    missing = [k for k in expected if k not in obj and k not in own and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in obj if k not in expected]
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise UsageError(f"--weights={path!r}: not the layout of --model={model_flag} ({what}; "
                         f"{len(missing)} missing, {len(unexpected)} unexpected); give the --model and "
                         "--input_normalization it was trained with")
    for k, v in obj.items():
        if v.shape != expected[k].shape:
            raise UsageError(f"--weights={path!r}: {k} has shape {tuple(v.shape)}, --model={model_flag} "
                             f"expects {tuple(expected[k].shape)}")
    return {**expected, **obj}


def device_from_flag(name):
    """The torch.device that --device names (auto: CUDA when available); UsageError if it cannot be used here."""
    try:
        device = utils.choose_device(name)
        torch.empty(0, device=device)
        return device
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"--device={name!r}: not available here ({str(err).splitlines()[0]})") from None


def run_name(run_dir):
    """A run directory's name (its last path component)."""
    return os.path.basename(os.path.normpath(run_dir))


def saved_models(ckpt):
    """{name: state dict} of the models a checkpoint holds: the last weights, the early-stopped and best-test ones."""
    return {"last": ckpt["model"], **{name: kept["state"] for name, kept in ckpt["kept"].items()}}


def model_from_args(args, dataset):
    """The run's network for this dataset, freshly initialised as the original does, its BatchNorm and
    convolutions set up for the run's double backprop."""
    mean_std = dataset.mean_std() if args.input_normalization == "dataset" else None
    model = build_model(args.model, dataset.n_classes, dataset.in_channels, dataset.image_size, mean_std,
                        args.n_layers, args.n_filters_cnn)
    configure_double_backward(model, args)
    return model


def configure_double_backward(model, args):
    """BatchNorm and convolutions for the run's regularisers. With double backprop: BatchNorm's closed-form double
    backward (its sums in fp32 at least) unless --bn_double_backward=autograd, BatchNorm in fp32 under autocast with
    --bn_float32 or with autograd's double backward (which overflows fp16 at the loss scale); the convolutions'
    explicit double backward unless --conv_double_backward=autograd."""
    double = uses_double_backprop(args)
    closed_form = args.bn_double_backward == "closed_form"
    float32 = double and args.half_prec and (args.bn_float32 or not closed_form)
    configure_batchnorm(model, float32_under_autocast=float32, closed_form_double_backward=double and closed_form)
    configure_conv(model, explicit_double_backward=double and args.conv_double_backward == "explicit")
