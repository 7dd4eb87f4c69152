"""Saved runs: a run directory's args.json (its flags, provenance and data fingerprint), its checkpoint and the
weights in it, and opening a finished run (or a weights file) for eval.py, surface.py, report.py and bench.py."""
import argparse
import json
import os
from typing import NamedTuple

import torch

import config
import data
import methods
import models
import utils
from config import UsageError
from models import INPUT_NORMALIZATIONS, MODELS, Normalize

CHECKPOINT = "checkpoint.pt"
SAVED_MODELS = ("last", "early_stopped", "best_test")  # the weights a finished run's checkpoint holds


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
    args = config.build_parser().parse_args([])
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
    p = config.OneLineParser(description=description, formatter_class=config.HelpFormatter,
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
    device = config.device_from_flag(opts.device)
    data_dir = opts.data_dir or run.data_dir
    dataset = data.load_data(run.dataset, data_dir, download=False)
    check_fingerprint(opts.run, data.fingerprint(dataset), data_dir)
    model = models.model_from_args(run, dataset, methods.uses_double_backprop(run))
    return SavedRun(run, dataset, model.to(device).eval(), states, iterations, device)


WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # where common checkpoints keep the weights
PREFIXES = ("module.", "model.")  # DataParallel's and wrapper modules' prefixes, as RobustBench's loader strips them
SHORTCUT = (".shortcut.0.weight", ".shortcut.weight")  # RobustBench's projection shortcut, ours


def open_weights(opts):
    """A SavedRun for a weights file (--weights) with the layout its flags name: one model, named by the file."""
    args = config.build_parser().parse_args([])
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
    device = config.device_from_flag(opts.device)
    dataset = data.load_data(args.dataset, opts.data_dir, download=False)
    model = models.model_from_args(args, dataset)
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


def run_name(run_dir):
    """A run directory's name (its last path component)."""
    return os.path.basename(os.path.normpath(run_dir))


def saved_models(ckpt):
    """{name: state dict} of the models a checkpoint holds: the last weights, the early-stopped and best-test ones."""
    return {"last": ckpt["model"], **{name: kept["state"] for name, kept in ckpt["kept"].items()}}
