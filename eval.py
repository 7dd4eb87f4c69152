"""Evaluate the saved models of a run: clean accuracy, PGD-k-r, an FGSM step-size sweep, AutoAttack.

    python eval.py runs/RUN                                  # clean and PGD-50-10 of every saved model
    python eval.py runs/RUN --pgd 50 10 --fgsm_sweep 1 2 4 8 12 --autoattack --n_points 1000

Writes RUN/eval-<date-time>.json and prints a table. AutoAttack (standard version) needs the optional extra:
pip install -r requirements-autoattack.txt
"""
import argparse
import json
import os
import sys
import time
from argparse import Namespace

import torch

import data
import train
import utils
from models import build_model

SAVED_MODELS = ("last", "early_stopped", "best_test")


def fgsm_accuracy(model, x_u8, y, eps, step, batch_size):
    """Accuracy under FGSM from a zero start with the given step, projected to the eps-ball."""
    return utils.fraction_true(train.fgsm_correct_fn(model, eps, step),
                               batches(x_u8, y, batch_size, f"FGSM step {255 * step:g}"))[0]


def batches(x_u8, y, batch_size, desc):
    return utils.progress(data.eval_batches(x_u8, y, batch_size), -(-len(y) // batch_size), desc)


def pgd_accuracy(model, x_u8, y, eps, n_iters, n_restarts, batch_size):
    """Accuracy under PGD-n_iters-n_restarts with step eps/4 (robust = no restart misclassifies)."""
    return utils.fraction_true(train.robust_fn(model, eps, n_iters, n_restarts),
                               batches(x_u8, y, batch_size, f"PGD-{n_iters}-{n_restarts}"))[0]


def autoattack_accuracy(model, x_u8, y, eps, n_classes, batch_size, seed):
    """Accuracy under AutoAttack's standard version (torchattacks), seed fixed."""
    import torchattacks

    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=n_classes,
                                     seed=seed)
    return utils.fraction_true(lambda xb, yb: utils.clean_correct(model, attack(xb, yb), yb),
                               batches(x_u8, y, batch_size, "AutoAttack"))[0]


def evaluate(model, x_u8, y, eps_px, opts, n_classes):
    """One result dict for the eval-mode model; accuracies are fractions."""
    model.eval()
    eps = eps_px / 255
    result = {"clean_acc": utils.fraction_true(lambda xb, yb: utils.clean_correct(model, xb, yb),
                                               data.eval_batches(x_u8, y, opts.batch_size))[0]}
    if opts.pgd:
        torch.manual_seed(opts.seed)
        result[f"pgd{opts.pgd[0]}_{opts.pgd[1]}_acc"] = pgd_accuracy(model, x_u8, y, eps, *opts.pgd, opts.batch_size)
    for step_px in opts.fgsm_sweep or ():
        result[f"fgsm_step{step_px:g}_acc"] = fgsm_accuracy(model, x_u8, y, eps, step_px / 255, opts.batch_size)
    if opts.autoattack:
        result["autoattack_acc"] = autoattack_accuracy(model, x_u8, y, eps, n_classes, opts.batch_size, opts.seed)
    return result


def load_run(path):
    """(checkpoint, run directory) from a run directory or a checkpoint file."""
    ckpt_path = os.path.join(path, train.CHECKPOINT) if os.path.isdir(path) else path
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True), os.path.dirname(ckpt_path)
    except Exception as err:
        raise train.UsageError(f"RUN_DIR_OR_CHECKPOINT={path!r}: cannot read {ckpt_path} ({type(err).__name__})")


def build_parser():
    p = train.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--models", nargs="+", default=list(SAVED_MODELS), help=f"any of {', '.join(SAVED_MODELS)}")
    p.add_argument("--pgd", nargs=2, type=int, default=[50, 10], metavar=("ITERS", "RESTARTS"),
                   help="PGD iterations and restarts (step eps/4); 0 0 to skip")
    p.add_argument("--fgsm_sweep", nargs="+", type=float, metavar="STEP",
                   help="FGSM step sizes to try, pixels/255 (the paper: 1 2 ... 12)")
    p.add_argument("--autoattack", action="store_true", help="AutoAttack, standard version (optional extra)")
    p.add_argument("--eps", type=int, help="pixels/255 (default: the run's)")
    p.add_argument("--n_points", type=int, default=-1, help="test points (a fixed subset; -1: all)")
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--data_dir", help="default: the run's")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the PGD restarts and AutoAttack")
    return p


def prepare(argv):
    opts = build_parser().parse_args(argv)
    if opts.pgd == [0, 0]:
        opts.pgd = None
    elif min(opts.pgd) < 1:
        raise train.UsageError(f"--pgd={opts.pgd}: iterations and restarts must be positive (0 0 skips PGD)")
    bad = [m for m in opts.models if m not in SAVED_MODELS]
    if bad:
        raise train.UsageError(f"--models={bad[0]!r}: choose from {', '.join(SAVED_MODELS)}")
    if opts.autoattack:
        try:
            import torchattacks  # noqa: F401
        except ImportError:
            raise train.UsageError("--autoattack: needs torchattacks; pip install -r requirements-autoattack.txt")
    ckpt, run_dir = load_run(opts.run)
    run = Namespace(**ckpt["args"])
    opts.eps = opts.eps or run.eps
    dataset = data.load_data(run.dataset, opts.data_dir or run.data_dir)
    return opts, ckpt, run, run_dir, dataset


def main(argv=None):
    try:
        opts, ckpt, run, run_dir, dataset = prepare(sys.argv[1:] if argv is None else argv)
    except (train.UsageError, data.DataError) as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 2
    device = utils.choose_device(opts.device)
    mean, std = dataset.mean_std()
    model = build_model(run.model, dataset.n_classes, dataset.in_channels, dataset.image_size, mean, std,
                        run.n_layers, run.n_filters_cnn).to(device)
    states = {"last": ckpt["model"], **{k: v["state"] for k, v in ckpt["kept"].items()}}
    idx = data.fixed_subset(len(dataset.test_y), opts.n_points)
    x, y = dataset.test_x[idx].to(device), dataset.test_y[idx].to(device)
    results = {"run": run_dir, "eps": opts.eps, "n_points": len(y), "seed": opts.seed, "models": {}}
    for name in opts.models:
        if name not in states:
            print(f"eval.py: {name}: not saved in this run (no periodic evaluation ran), skipped", file=sys.stderr)
            continue
        model.load_state_dict(states[name])
        results["models"][name] = evaluate(model, x, y, opts.eps, opts, dataset.n_classes)
    out = new_result_path(run_dir)
    utils.atomic_write_text(json.dumps(results, indent=2) + "\n", out)
    print(format_table(results))
    print(f"written to {out}")
    return 0


def new_result_path(run_dir):
    """RUN/eval-<date-time>.json, with a suffix when that name is taken: earlier results are never overwritten."""
    stem = os.path.join(run_dir, f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    path, k = stem + ".json", 1
    while os.path.exists(path):
        k += 1
        path = f"{stem}-{k}.json"
    return path


def format_table(results):
    """Markdown table, one row per model, accuracies in %."""
    columns = list(next(iter(results["models"].values()), {}))  # the order evaluate() measured them in
    lines = [f"eps {results['eps']}/255, {results['n_points']} test points",
             "| model | " + " | ".join(c.replace("_acc", "") for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, r in results["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
