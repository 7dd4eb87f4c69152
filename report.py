"""Gather run directories into the paper's table: one row per (dataset, model, method, eps), mean ± std over seeds.

    python report.py runs/*            # Markdown table on stdout
    python report.py runs/* --out results.md
"""
import argparse
import json
import os
import statistics
import sys
from argparse import Namespace

import utils
from train import method_name

COLUMNS = (("last", "clean_acc", "clean"), ("last", "fgsm_acc", "FGSM"), ("last", "pgd_acc", "PGD"),
           ("early_stopped", "clean_acc", "ES clean"), ("early_stopped", "pgd_acc", "ES PGD"))


def load_run(run_dir):
    """(group key, {(model, metric): value}, wall seconds or None) of a finished run, or None if unfinished."""
    with open(os.path.join(run_dir, "args.json")) as f:
        args = Namespace(**json.load(f))
    finals = [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "final"]
    if not finals:
        return None
    values = {(r["model"], k): r[k] for r in finals for k in ("clean_acc", "fgsm_acc", "pgd_acc") if k in r}
    timing_path = os.path.join(run_dir, "timing.json")
    wall_s = json.load(open(timing_path))["wall_s"] if os.path.exists(timing_path) else None
    key = (args.dataset, args.model, method_name(args), args.eps, args.attack_iters, args.n_restarts)
    return key, values, wall_s


def mean_std(values):
    """'mean ± std' in percent (sample std over seeds); just the mean for one seed; '-' for none."""
    if not values:
        return "-"
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def table(run_dirs):
    groups = {}
    for run_dir in run_dirs:
        run = load_run(run_dir)
        if run is not None:
            groups.setdefault(run[0], []).append(run[1:])
    header = ["dataset", "model", "method", "eps", "attack", "seeds"] + [c[2] for c in COLUMNS] + ["wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (dataset, model, method, eps, iters, restarts), runs in sorted(groups.items()):
        cells = [mean_std([v[(m, k)] for v, _ in runs if (m, k) in v]) for m, k, _ in COLUMNS]
        walls = [w for _, w in runs if w is not None]
        wall = f"{statistics.mean(walls):.0f}" if walls else "-"
        attack = f"PGD-{iters}-{restarts}"
        lines.append("| " + " | ".join([dataset, model, method, str(eps), attack, str(len(runs))] + cells + [wall])
                     + " |")
    note = ("Accuracies in % on the final test points, mean ± std over seeds; PGD uses the attack column "
            "(step eps/4), FGSM has step eps; ES = early-stopped model (best PGD accuracy on training points).")
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run directories written by train.py")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    missing = [d for d in args.run_dirs if not os.path.exists(os.path.join(d, "metrics.jsonl"))]
    if missing:
        print(f"report.py: error: {missing[0]} is not a run directory (no metrics.jsonl)", file=sys.stderr)
        return 2
    text = table(args.run_dirs)
    print(text, end="")
    if args.out:
        utils.atomic_write_text(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
