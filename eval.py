"""Evaluate the saved models of a run, or any weights file of our layouts: clean accuracy, PGD-k-r, an FGSM
step-size sweep, the official AutoAttack, and the worst case over those attacks within the eps-ball.

    python eval.py runs/RUN                                  # clean and PGD-50-10 (step 1/255) of every saved model
    python eval.py runs/RUN --fgsm_sweep 1 2 3 4 5 6 7 8 9 10 11 12 --autoattack --n_points 1000
    python eval.py --weights Wong2020Fast.pt --model resnet18 --dataset cifar10 --data_dir DIR --autoattack

Defaults follow the original's eval.py and sh/eval.sh: PGD-50-10 with step 1/255, and FGSM steps larger than eps
left unprojected (the ball grows to the step). Writes eval-<date-time>.json (in RUN, or beside the weights) and
prints a table. A stop signal ends it within one forward pass; AutoAttack's finished attacks are kept, and the same
command continues after them.
"""
import glob
import json
import os
import sys
import time

import torch

import autoattack_eval
import config
import data
import evaluation
import runs
import utils
from config import UsageError

ORIGINAL_PGD_STEP = 1.0  # pixels/255: the original eval.py's PGD step


def fgsm_correct(model, x_u8, y, eps, step, batch_size, projected=False):
    """Per-example correctness under FGSM from zero with `step`; past eps the step is unprojected unless
    `projected`."""
    radius = eps if projected else max(eps, step)
    return evaluation.per_example(evaluation.fgsm_stats(model, step, radius), ("fgsm",),
                                  evaluation.batches(x_u8, y, batch_size, f"FGSM step {255 * step:g}"))["fgsm"]


def evaluate(model, x_u8, y, eps_px, opts, seed=0, autoattack=None):
    """One result dict for the eval-mode model; accuracies are fractions. autoattack: (Protocol, resume file) of
    the official AutoAttack, None to skip it. Where two or more attacks within the eps-ball ran (PGD under the strict
    rule, AutoAttack, FGSM steps up to eps or projected), 'worst_case_acc' counts the examples classified correctly
    that withstand every one of them, as AutoAttack scores its own attacks."""
    model.eval()
    eps = eps_px / 255
    run = lambda stats, keys, desc: evaluation.per_example(  # noqa: E731
        stats, keys, evaluation.batches(x_u8, y, opts.batch_size, desc))
    key = evaluation.metric_key
    masks = {key("clean"): run(evaluation.clean_stats(model), ("clean",), "clean")["clean"]}
    in_ball = []
    if opts.pgd:
        torch.manual_seed(seed)
        iters, restarts = opts.pgd
        pgd = run(evaluation.pgd_stats(model, eps, iters, restarts, opts.pgd_step / 255,
                                       batched=opts.batched_restarts), ("pgd", "pgd_any"), f"PGD-{iters}-{restarts}")
        masks[key("pgd", f"{iters}_{restarts}")] = pgd["pgd"]  # column_label names its step and points
        masks[key("pgd", f"{iters}_{restarts}", strict=True)] = pgd["pgd_any"]
        in_ball.append(pgd["pgd_any"])
    for step_px in opts.fgsm_sweep or ():
        step_key = key("fgsm_step", f"{step_px:g}")
        masks[step_key] = fgsm_correct(model, x_u8, y, eps, step_px / 255, opts.batch_size, opts.fgsm_sweep_projected)
        if opts.fgsm_sweep_projected or step_px <= eps_px:
            in_ball.append(masks[step_key])
    if autoattack:
        proto, state_path = autoattack
        x = data.to_unit(x_u8)
        masks[key("autoattack")] = autoattack_eval.robust_flags(model, x, y, proto, x.device, state_path,
                                                                progress_every_s=opts.progress_every_s)
        in_ball.append(masks[key("autoattack")])
    if len(in_ball) > 1:  # the clean point is in the ball too
        masks[key("worst_case")] = torch.stack([masks[key("clean")], *in_ball]).all(0)
    return {key: mask.sum().item() / len(mask) for key, mask in masks.items()}


def build_parser():
    p = runs.saved_run_parser(__doc__, seed_help="seed of PGD's random starts (default: each model's "
                                "final-evaluation seed, from the run's seed and the model's iteration: train.py's "
                                "final evaluation draws the same starts) and of AutoAttack (default 0)",
                                default_seed=None, run_optional=True)
    p.add_argument("--pgd", nargs=2, type=int, default=[50, 10], metavar=("ITERS", "RESTARTS"),
                   help="PGD iterations and restarts; 0 0 to skip")
    p.add_argument("--pgd_step", type=float, default=ORIGINAL_PGD_STEP, help="PGD step, pixels/255 (the original "
                   "eval.py's 1; train.py's evaluations use eps/4)")
    p.add_argument("--fgsm_sweep", nargs="+", type=float, metavar="STEP",
                   help="FGSM step sizes to try, pixels/255 (the paper: 1 2 ... 12)")
    p.add_argument("--fgsm_sweep_projected", action="store_true", help="project steps larger than eps onto the "
                   "eps-ball (the original leaves them unprojected)")
    p.add_argument("--batched_restarts", action="store_true", help="every PGD restart of a batch in one pass (the "
                   "same results; faster on a GPU)")
    p.add_argument("--export", metavar="DIR", help="also write each model as RobustBench's PreActResNet loads it "
                   "(DIR/<run>-<model>.pt, a plain state_dict) and its DIR/<run>-<model>.json in RobustBench's "
                   "model_info fields; runs AutoAttack (standard), as RobustBench scores models")
    p.add_argument("--n_points", type=int, default=-1, help="the first this many test points; -1: all")
    p.add_argument("--batch_size", type=int, default=1024, help="evaluation batch (images); the random starts "
                   "depend on it: the run's --batch_size_eval reproduces its final evaluation")
    p.add_argument("--progress_every_s", type=float, default=60.0, help="off a terminal, a progress line of "
                   "AutoAttack at most this often (seconds)")
    g = p.add_argument_group("AutoAttack (the official code, pyautoattack)").add_argument
    g("--autoattack", action="store_true", help="AutoAttack as RobustBench runs it (standard: APGD-CE, APGD-T, "
      "FAB-T, Square; resumable)")
    g("--autoattack_version", default="standard", help=f"one of {', '.join(autoattack_eval.VERSIONS)}")
    g("--autoattack_attacks", type=lambda s: tuple(a.strip() for a in s.split(",") if a.strip()), default=None,
      metavar="A,B,...", help=f"the custom version's attacks, in order, from {','.join(autoattack_eval.ATTACKS)}")
    g("--autoattack_batch_size", type=int, default=250, help="AutoAttack's batch (images; its default): each "
      "batch's random draws are seeded afresh, so the number depends on it")
    g = p.add_argument_group("a weights file instead of a run (any model of our layouts)").add_argument
    g("--weights", metavar="FILE", help="a state dict: plain, train.py's checkpoint, or RobustBench's "
      "PreActResNet layout (module./model. prefixes, shortcut.0.weight); needs --data_dir")
    g("--model", default="resnet18", help="with --weights: its layout, as train.py's --model")
    g("--dataset", default="cifar10", help="with --weights: as train.py's --dataset")
    g("--input_normalization", default="none", help="with --weights: as train.py's flag (none: the model takes "
      "[0, 1] images)")
    g("--n_layers", type=int, default=1, help="with --weights and --model=cnn: as train.py's flag")
    g("--n_filters_cnn", type=int, default=16, help="with --weights and --model=cnn: as train.py's flag")
    return p


def prepare(argv):
    opts = build_parser().parse_args(argv)
    if opts.n_points == 0 or opts.n_points < -1:
        raise UsageError(f"--n_points={opts.n_points}: give a positive number of test points, or -1 for all")
    if opts.pgd == [0, 0]:
        opts.pgd = None
    elif min(opts.pgd) < 1:
        raise UsageError(f"--pgd={opts.pgd}: iterations and restarts must be positive (0 0 skips PGD)")
    if opts.export or opts.autoattack_attacks or opts.autoattack_version != "standard":
        opts.autoattack = True  # RobustBench's robust accuracy is AutoAttack's
    if opts.autoattack_batch_size < 1:
        raise UsageError(f"--autoattack_batch_size={opts.autoattack_batch_size}: give a positive batch size")
    if opts.autoattack:
        try:
            import pyautoattack  # noqa: F401
        except ImportError:
            raise UsageError("--autoattack: needs pyautoattack; pip install -r requirements.txt") from None
    if (opts.run is None) == (opts.weights is None):
        raise UsageError("give a run directory or --weights FILE (one of them)")
    if opts.weights:
        if not opts.data_dir:
            raise UsageError("--weights: add --data_dir, the dataset's folder")
        saved = runs.open_weights(opts)
        opts.models = list(saved.states)
        opts.seed = opts.seed or 0  # no run seed to derive one from
    else:
        saved = runs.open_saved_run(opts)
    if opts.export and not (saved.args.model in ROBUSTBENCH_DEPTHS and saved.args.input_normalization == "none"):
        raise UsageError(f"--export: RobustBench's PreActResNet layout is that of resnet18 and resnet34 without input "
                         f"normalisation; this run has --model={saved.args.model} --input_normalization="
                         f"{saved.args.input_normalization}")
    return opts, saved


def autoattack_protocol(opts, n_points, n_classes):
    try:
        return autoattack_eval.protocol(opts.autoattack_version, opts.autoattack_attacks, opts.eps,
                                        0 if opts.seed is None else opts.seed, n_points, opts.autoattack_batch_size,
                                        n_classes)
    except ValueError as err:
        raise UsageError(str(err)) from None


ROBUSTBENCH_DEPTHS = {"resnet18": "PreActResNet-18", "resnet34": "PreActResNet-34"}


def robustbench_state(state):
    """A state dict of models.PreActResNet as RobustBench's PreActResNet names it: the projection shortcut is the
    first module of a Sequential there, and nothing else differs."""
    return {k.replace(".shortcut.weight", ".shortcut.0.weight"): v for k, v in state.items()}


def export(opts, saved, name, result, proto):
    """DIR/<run>-<model>.pt and .json: the weights RobustBench's PreActResNet loads, and its model_info fields."""
    os.makedirs(opts.export, exist_ok=True)
    source = runs.run_name(opts.run) if opts.run else name
    stem = os.path.join(opts.export, f"{source}-{name}" if opts.run else name)
    utils.atomic_torch_save(robustbench_state(saved.states[name]), stem + ".pt")
    info = {"name": f"Improving Single-Step Adversarial Training By Local Smoothing: {config.method_name(saved.args)}"
            f" ({name} model of {source})", "dataset": saved.args.dataset, "threat_model": "Linf",
            "eps": f"{opts.eps:g}/255", "architecture": ROBUSTBENCH_DEPTHS[saved.args.model],
            "training_method": config.method_name(saved.args), "additional_data": False, "number_forward_passes": 1,
            "clean_acc": f"{100 * result['clean_acc']:.2f}", "autoattack_acc": f"{100 * result['autoattack_acc']:.2f}",
            "n_points": result["n_points"], "footnote": proto.label, "autoattack_protocol": proto.as_dict()}
    utils.atomic_write_text(json.dumps(info, indent=2) + "\n", stem + ".json")
    return stem


def evaluate_models(opts, saved, x, y, results_dir, proto, log):
    """{name: result} of each chosen model; the same weights (one iteration) are evaluated once."""
    evaluated, out = {}, {}  # iteration -> the model evaluated for it
    for name in opts.models:
        if name not in saved.states:
            print(f"eval.py: {name}: not saved in this run, skipped", file=sys.stderr)
            continue
        iteration = saved.iterations[name]
        if iteration in evaluated:
            out[name] = out[evaluated[iteration]]
        else:
            evaluated[iteration] = name
            seed = evaluation.final_eval_seed(saved.args.seed, iteration) if opts.seed is None else opts.seed
            saved.model.load_state_dict(saved.states[name])
            state = proto and autoattack_eval.resume_path(results_dir, name, proto,
                                                          autoattack_eval.weights_digest(saved.model))
            log.info(f"evaluating {name} (iteration {iteration})")
            out[name] = {**evaluate(saved.model, x, y, opts.eps, opts, seed, proto and (proto, state)),
                         "iteration": iteration, "seed": seed}
        if opts.export:
            stem = export(opts, saved, name, {**out[name], "n_points": len(y)}, proto)
            print(f"exported {stem}.pt and {stem}.json")
    return out


def main(argv=None):
    try:
        opts, saved = prepare(sys.argv[1:] if argv is None else argv)
        idx = evaluation.first_points(len(saved.dataset.test_y), opts.n_points)
        proto = autoattack_protocol(opts, len(idx), saved.dataset.n_classes) if opts.autoattack else None
    except (UsageError, data.DataError) as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 2
    log = utils.get_logger()
    x, y = saved.dataset.test_x[idx].to(saved.device), saved.dataset.test_y[idx].to(saved.device)
    results_dir = opts.run or os.path.dirname(os.path.abspath(opts.weights))
    results = {"run": opts.run, "weights": opts.weights, "eps": opts.eps, "n_points": len(y), "seed": opts.seed}
    if opts.pgd:
        results["pgd_protocol"] = evaluation.pgd_protocol(*opts.pgd, opts.pgd_step, len(y), len(saved.dataset.test_y),
                                                          batch_size=opts.batch_size)
    if proto:
        results["autoattack_protocol"] = proto.as_dict()
    with utils.StopSignals() as signals, utils.stop_on_forward(saved.model, signals.requested):
        try:
            results["models"] = evaluate_models(opts, saved, x, y, results_dir, proto, log)
        except utils.StopRequested:
            kept = " AutoAttack's finished attacks are kept in autoattack-*.json there:" if proto else ""
            print(f"eval.py: stopped by {signals.name}.{kept} the same command continues", file=sys.stderr)
            return 128 + signals.signum
    out = new_result_path(results_dir)
    try:
        utils.atomic_write_text(json.dumps(results, indent=2) + "\n", out)
    except utils.WriteError as err:
        print(f"eval.py: error: {err}; the results are printed below", file=sys.stderr)
        print(format_table(results))
        return 1
    for name in glob.glob(os.path.join(results_dir, "autoattack-*.json")) if proto else ():
        os.remove(name)  # their flags are in the result now
    print(format_table(results))
    print(f"written to {out}")
    return 0


def column_label(key, results):
    """A result key's column label; PGD's and AutoAttack's name their protocol in full, PGD's strict or not."""
    _, stem, _, strict = evaluation.parse_metric_key(key)
    if stem == "pgd" and "pgd_protocol" in results:
        return results["pgd_protocol"]["label"] + (", strict" if strict else "")
    if stem == "autoattack" and "autoattack_protocol" in results:
        return results["autoattack_protocol"]["label"]
    return key.removesuffix("_acc")


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
    columns = [c for c in next(iter(results["models"].values()), {}) if c.endswith("_acc")]  # in measured order
    lines = [f"eps {results['eps']:g}/255, {results['n_points']} test points",
             "| model | " + " | ".join(column_label(c, results) for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, r in results["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
