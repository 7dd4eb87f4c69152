"""Gather run directories into the paper's table: one row per group of runs that differ in their seed alone (the
same flags and data), mean ± std over seeds, one table per final PGD protocol, the paper's numbers beside ours on
request; and plot training curves: clean, FGSM and PGD accuracy against iterations, learning rate and VFSAT eps beneath;
the FGSM step-size sweeps that eval.py measured; the first layer's filters.

    python report.py runs                                    # every run below runs/: Markdown table on stdout
    python report.py runs/* --out results.md --plots plots/  # and RUN/curves.png, plots/<group>.png, the sweeps
    python report.py runs/X runs/Y --plots plots/ --filters  # and RUN/filters.png
    python report.py runs/cifar10_eps8 --compare paper       # and the original's results beside each row
"""
import argparse
import functools
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import textwrap
from typing import NamedTuple

import config
import data
import evaluation
import health
import methods
import runs as saved_runs  # 'runs' names run directories here
import utils

KEY = {stem: evaluation.metric_key(stem) for stem in evaluation.FINAL_ATTACKS}  # a final row's keys
HEADING = {stem: "{pgd}" if stem == "pgd" else evaluation.EVAL_ATTACKS[stem].name for stem in KEY}  # {pgd}: protocol
COLUMNS = (*(("last", KEY[stem], HEADING[stem]) for stem in KEY),
           *(("early_stopped", KEY[stem], f"ES {HEADING[stem]}") for stem in ("clean", "pgd")))
# flags that the method column names already; the flags cell lists the other ones that tell groups apart
METHOD_FLAGS = frozenset({"attack", "attack_init", "minibatch_replay", "mast", "discrete_eps", "pgd_train_n_iters",
                          "pgd_alpha_train", *(r.flag for r in methods.REGULARISERS)})
SHOWN_FLAGS = frozenset({"dataset", "model", "eps"}) | METHOD_FLAGS
PAPER_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper", "cifar10_results.tsv")
TABLE_ROWS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sh", "cifar10_table.tsv")


class Run(NamedTuple):
    dir: str
    flags: dict  # the saved flags that can change what it computes (config.NOT_COMPUTATIONAL and seed left out)
    fingerprint: str | None  # of its data (None: saved before fingerprints)
    source: str | None  # where its data came from (data.source; None: saved before sources)
    autoattack: str | None  # the protocol label of its AutoAttack values (None: none run)
    seed: int
    protocol: str  # the final PGD's label
    values: dict  # {(model, metric): value}, and ("co", "epoch")
    wall_s: float | None


NOT_GROUPED = config.NOT_COMPUTATIONAL | {"seed"}  # flags a group's runs may differ in


def computational_flags(args, n_procs=1):
    """The flags that can change what a run of these flags on n_procs processes computes: not config's
    NOT_COMPUTATIONAL, not the seed (a group's runs differ in it), not its config.inert_flags."""
    unused = NOT_GROUPED | set(config.inert_flags(args, n_procs))
    return {k: v for k, v in config.args_to_dict(args).items() if k not in unused}


def load_run(run_dir):
    """The Run of a finished run directory, or None if unfinished."""
    args = saved_runs.load_args(run_dir)
    finals = [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "final"]
    if not finals:
        return None
    values = {(r["model"], k): r[k] for r in finals for k in KEY.values() if k in r}
    onset = health.co_onset(periodic_rows(run_dir))
    values[("co", "epoch")] = None if onset is None else onset["epoch"]
    timing_path = os.path.join(run_dir, "timing.json")
    wall_s = json.load(open(timing_path))["wall_s"] if os.path.exists(timing_path) else None
    protocol = finals[0].get("protocol", {}).get("label") or evaluation.pgd_protocol(
        args.final_attack_iters, args.final_n_restarts, args.eps * evaluation.PGD_STEP_FRACTION,
        finals[0].get("n_points", 0), None)["label"]  # runs saved before rows named their protocol
    autoattack, label = autoattack_results(run_dir)
    values.update({(model, AUTOATTACK_KEY): acc for model, acc in autoattack.items()})
    extras = saved_runs.saved_extras(run_dir)
    saved_data, n_procs = extras.get("_data", {}), extras.get("_provenance", {}).get("processes", 1)
    return Run(run_dir, computational_flags(args, n_procs), saved_data.get("fingerprint"), saved_data.get("source"),
               label, args.seed, protocol, values, wall_s)


AUTOATTACK_KEY = "autoattack_acc"  # eval.py --autoattack's value of a model
AUTOATTACK_MODELS = ("last", "early_stopped")


def autoattack_results(run_dir):
    """({model: AutoAttack accuracy}, its protocol label) of the newest eval.py AutoAttack result in the run
    directory (eval-<date-time>.json), models of older results of the same protocol filling in; ({}, None) if none."""
    found, label = {}, None
    for path in sorted(glob.glob(os.path.join(run_dir, "eval-*.json")), reverse=True):
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            continue
        protocol = (result.get("autoattack_protocol") or {}).get("label")
        if protocol is None or label not in (None, protocol):
            continue
        label = protocol
        for model, values in result.get("models", {}).items():
            if AUTOATTACK_KEY in values:
                found.setdefault(model, values[AUTOATTACK_KEY])
    return found, label


def autoattack_columns(groups):
    """[(model, label, heading)]: AutoAttack's columns of a table, a pair per protocol among its groups' runs (one
    pair headed 'AutoAttack' where none ran: '-' throughout)."""
    labels = sorted({run.autoattack for runs in groups for run in runs if run.autoattack}) or [None]
    return [(model, label, f"{'ES ' if model == 'early_stopped' else ''}{label or 'AutoAttack'}")
            for label in labels for model in AUTOATTACK_MODELS]


def autoattack_cell(runs, model, label):
    """mean ± std over the runs evaluated under this protocol, with how many of the group's runs they are."""
    values = [r.values[(model, AUTOATTACK_KEY)] for r in runs
              if r.autoattack == label and (model, AUTOATTACK_KEY) in r.values]
    return mean_std(values) + (f" ({len(values)} of {len(runs)})" if 0 < len(values) < len(runs) else "")


def periodic_rows(run_dir):
    return [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "periodic"]


CURVES = (("test_clean_acc", "clean (test)", "tab:blue", "-"), ("test_fgsm_acc", "FGSM (test)", "tab:orange", "-"),
          ("test_pgd_acc", "PGD (test)", "tab:red", "-"), ("train_pgd_acc", "PGD (train)", "tab:red", ":"))


TITLE_CHARS = 90  # characters per line of a plot title at its font size and the figure's width


def plot_curves(run_dirs, path, title):
    """Accuracy curves averaged over the runs (seeds), with learning rate and training eps beneath, as PNG."""
    plt = utils.pyplot()
    curves = [periodic_rows(d) for d in run_dirs]
    n = min(len(r) for r in curves)
    if n == 0:
        return False
    iters = [row["iteration"] for row in curves[0][:n]]
    mean = lambda key: [statistics.mean(r[i][key] for r in curves) for i in range(n)]  # noqa: E731
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1.3))
    for key, label, color, style in CURVES:
        top.plot(iters, [100 * v for v in mean(key)], style, color=color, label=label)
    for k, onset in enumerate(health.co_onset(r) for r in curves):
        if onset is not None:  # one dashed line per seed that overfitted catastrophically
            top.axvline(onset["iteration"], color="gray", linestyle="--", label="CO" if k == 0 else None)
    top.set_ylabel("accuracy (%)")
    top.set_ylim(0, 100)
    top.legend(loc="upper left", fontsize=8)
    title = f"{title} ({len(curves)} run{'s' * (len(curves) > 1)})"
    top.set_title("\n".join(textwrap.wrap(title, TITLE_CHARS)), fontsize=10)  # long flags would clip
    bottom.plot(iters, mean("lr"), color="black")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("iteration")
    eps_axis = bottom.twinx()
    eps_axis.step(iters, mean("train_eps"), where="pre", color="tab:green")
    eps_axis.set_ylabel("train eps (pixels/255)", color="tab:green")
    utils.save_figure(fig, path)
    return True


def fgsm_sweep(run_dir):
    """({model: [(step in pixels/255, accuracy)]}, eps) from the newest eval-*.json of the run that holds an FGSM
    step-size sweep (eval.py --fgsm_sweep), or None."""
    for path in sorted(glob.glob(os.path.join(run_dir, "eval-*.json")), key=os.path.getmtime, reverse=True):
        with open(path) as f:
            result = json.load(f)
        sweeps = {model: sorted((evaluation.fgsm_sweep_step(k), v) for k, v in accs.items()
                                if evaluation.fgsm_sweep_step(k) is not None)
                  for model, accs in result["models"].items()}
        if any(sweeps.values()):
            return {m: s for m, s in sweeps.items() if s}, result["eps"]
    return None


def plot_fgsm_sweeps(lines, eps, path, title):
    """Accuracy against the FGSM step, one line per label ({label: [[(step, accuracy)] per seed]}, the mean over
    seeds with a band of ± one std); a dotted line at eps, beyond which the step is not projected."""
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, seeds in lines.items():
        steps = sorted(set.intersection(*(set(s for s, _ in sweep) for sweep in seeds)))
        accs = [[100 * dict(sweep)[s] for s in steps] for sweep in seeds]
        mean = [statistics.mean(a) for a in zip(*accs, strict=True)]
        seeds_note = f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""
        ax.plot(steps, mean, marker="o", markersize=3, label=label + seeds_note)
        if len(seeds) > 1:
            std = [statistics.stdev(a) for a in zip(*accs, strict=True)]
            ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], alpha=0.15)
    ax.axvline(eps, color="gray", linestyle=":", label=f"eps = {eps:g}")
    ax.set(xlabel="FGSM step (pixels/255)", ylabel="accuracy (%)", ylim=(0, 100), title=title)
    ax.legend(fontsize=8)
    utils.save_figure(fig, path)


def first_layer_filters(state):
    """The first convolution's weights (C_out, C_in, k, k) of a state dict."""
    return next(v for k, v in state.items() if k.endswith("weight") and v.dim() == 4)


def plot_filters(ckpt, path, title, per_row=16):
    """The first layer's filters of the last and the early-stopped model, one block of rows each; every filter
    scaled to [0, 1] on its own (RGB for three input channels, grey otherwise)."""
    plt = utils.pyplot()
    states = {m: s for m, s in saved_runs.saved_models(ckpt).items() if m in ("last", "early_stopped")}
    filters = {m: first_layer_filters(s).float() for m, s in states.items()}
    n = len(next(iter(filters.values())))
    cols, rows = min(n, per_row), math.ceil(n / per_row)
    fig, axes = plt.subplots(rows * len(filters), cols, figsize=(0.8 * cols, 0.9 * rows * len(filters) + 0.4),
                             squeeze=False)
    for block, (model, w) in enumerate(filters.items()):
        low, high = w.flatten(1).min(1).values, w.flatten(1).max(1).values
        scaled = (w - low[:, None, None, None]) / (high - low).clamp_min(1e-12)[:, None, None, None]
        for k, ax in enumerate(axes[block * rows:(block + 1) * rows].flat):
            ax.axis("off")
            if k < n:
                image = scaled[k].permute(1, 2, 0) if w.shape[1] == 3 else scaled[k].mean(0)
                ax.imshow(image.numpy(), cmap=None if w.shape[1] == 3 else "gray", interpolation="nearest")
                if k == 0:
                    ax.set_title(model.replace("_", "-"), fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    utils.save_figure(fig, path)


def mean_std(values):
    """'mean ± std' in percent (sample std over seeds); just the mean for one seed; '-' for none."""
    if not values:
        return "-"
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def find_runs(path):
    """path itself if it is a run directory (it has metrics.jsonl), else the run directories below it, sorted."""
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
        return [path]
    found = [root for root, _, files in os.walk(path) if "metrics.jsonl" in files]
    return sorted(found)


def group_runs(run_dirs, allow_duplicate_seeds=False):
    """{group key: [Run]} of the finished runs: a group is the runs whose computational flags and data are the
    same, seeds apart. The same seed twice in a group is an error (config.UsageError) unless allowed."""
    groups, unfinished = {}, []
    for run_dir in run_dirs:
        run = load_run(run_dir)
        if run is None:
            unfinished.append(run_dir)
        else:
            groups.setdefault((json.dumps(run.flags, sort_keys=True), run.fingerprint), []).append(run)
    if unfinished:
        print(f"report.py: left out {len(unfinished)} unfinished run(s) (no final evaluation yet): "
              f"{', '.join(unfinished)}", file=sys.stderr)
    for runs in groups.values():
        seen = {}
        for run in runs:
            if run.seed in seen and not allow_duplicate_seeds:
                raise config.UsageError(f"{seen[run.seed]} and {run.dir} are the same run twice (seed {run.seed}, "
                                        "the same flags and data): keep one, or pass --allow_duplicate_seeds")
            seen[run.seed] = run.dir
    return groups


def telling_apart(groups):
    """{group key: 'flag=value, ...'}: the flags (and data) in which each group differs from the others, beyond
    dataset, model, eps and the method's own flags; '-' where none."""
    keys = list(groups)
    flags = {key: groups[key][0].flags for key in keys}
    varying = sorted(k for k in set().union(*flags.values()) if k not in SHOWN_FLAGS  # among the groups it applies to
                     and len({json.dumps(f.get(k)) for f in flags.values() if k in f}) > 1)
    data_varies = len({key[1] for key in keys}) > 1
    out = {}
    for key in keys:
        parts = [f"{k}={flags[key][k]}" for k in varying if k in flags[key]]
        if data_varies:
            parts.append(f"data={data_label(key[1])}")
        out[key] = ", ".join(parts) or "-"
    return out


def data_label(fingerprint):
    """'50000+10000 images, sha1 0123456789ab' from a fingerprint: the sizes too, since a smaller copy of the same
    data starts with the same images, which are what the hash covers."""
    if fingerprint is None:
        return "unrecorded"
    sizes = re.match(r"(\d+) train \+ (\d+) test images", fingerprint)
    sha = fingerprint.rsplit(" ", 1)[-1]
    return f"{sizes[1]}+{sizes[2]} images, sha1 {sha}" if sizes else sha


def group_name(run, apart):
    f = run.flags
    base = f"{f['dataset']}-{f['model']}-{method_label(f)}-eps{f['eps']:g}"
    return base if apart == "-" else f"{base}-{hashlib.sha1(apart.encode()).hexdigest()[:6]}"


def group_title(run, apart):
    """A plot's title: 'cifar10, cnn, fgsm-vfsat, eps 10/255', and what tells the group apart."""
    f = run.flags
    return f"{f['dataset']}, {f['model']}, {method_label(f)}, eps {f['eps']:g}/255" + (
        f" ({apart})" if apart != "-" else "")


def method_label(flags):
    return config.method_name(argparse.Namespace(**with_defaults(flags)))


def co_cell(epochs):
    """'11' for one seed; '11, -, 9 (2/3)' for several; '-' where no seed overfitted catastrophically."""
    text = ", ".join("-" if e is None else f"{e:g}" for e in epochs)
    n = sum(e is not None for e in epochs)
    return text if len(epochs) == 1 else f"{text} ({n}/{len(epochs)})"


def paper_rows():
    """{(eps, row name): [(clean, pgd50_10) of each listed run, in %]} of the original's results file."""
    rows = {}
    with open(PAPER_RESULTS) as f:
        for line in f:
            if line.startswith("#") or line.startswith("eps\t"):
                continue
            eps, name, _seed, clean, _fgsm, pgd, _date = line.rstrip("\n").split("\t")
            rows.setdefault((float(eps), name), []).append((float(clean), float(pgd)))
    return rows


def table_rows():
    """sh/cifar10_table.tsv's rows, [eps ('*': every eps), name, train.py flags, the paper's row name]."""
    with open(TABLE_ROWS) as f:
        return [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]


def table_commands():
    """{(eps, paper row name): the computational flags of sh/cifar10_table.tsv's run at that eps}: the mapping
    from the paper's rows to flags is the table the scripts run."""
    rows, parser = table_rows(), config.build_parser()
    common = next(r[2] for r in rows if r[1] == "common")
    out = {}
    for eps in sorted({float(r[0]) for r in rows if r[0] != "*"}):
        for where, _name, flags, paper in rows:
            if paper != "-" and where in ("*", f"{eps:g}"):
                out[(eps, paper)] = computational_flags(parser.parse_args(shlex.split(f"{common} --eps={eps:g} "
                                                                                      f"{flags}")))
    return out


def paper_summary(values):
    """'mean ± population std' (the original's file summarises its runs so), or the one value."""
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def difference(ours, theirs):
    """Our mean minus the paper's, in points ('-' without ours)."""
    return "-" if ours is None else f"{round(ours - statistics.mean(theirs), 2) + 0:+.2f}"  # + 0: no '-0.00'


@functools.cache
def default_flags():
    return config.args_to_dict(config.build_parser().parse_args([]))


def with_defaults(flags):
    """Computational flags with those left out (inert ones) read as their defaults, so that two runs compare."""
    return {k: v for k, v in {**default_flags(), **flags}.items() if k not in NOT_GROUPED}


def method_flags(flags):
    """The flags that make the method: config.SPEED_FLAGS left out."""
    return {k: v for k, v in with_defaults(flags).items() if k not in config.SPEED_FLAGS}


def paper_cells(run, commands, paper, our_clean, our_pgd):
    """The paper's row matching the run's method (its speed flags named), its clean and PGD-50-10, and ours minus
    its; on data other than official CIFAR-10, the row's name and 'other data' alone; 'no paper row' where none
    matches."""
    method = method_flags(run.flags)
    match = next((key for key, flags in commands.items() if method_flags(flags) == method), None)
    if match is None or match not in paper:
        return ["no paper row"] + ["-"] * 4
    clean, pgd = zip(*paper[match], strict=True)
    ours, theirs = with_defaults(run.flags), with_defaults(commands[match])
    speed = [config.flag_text(k, ours[k]) for k in sorted(config.SPEED_FLAGS) if ours[k] != theirs[k]]
    name = f"{match[1]} ({len(clean)} runs{'; ' + ' '.join(speed) if speed else ''})"
    if run.source != data.OFFICIAL_CIFAR10:
        return [f"{name}, other data ({run.source or 'unrecorded'})"] + ["-"] * 4
    return [name, paper_summary(clean), paper_summary(pgd), difference(our_clean, clean), difference(our_pgd, pgd)]


def paper_table():
    """The original's CIFAR-10 results, one row per table row: its runs, clean and PGD-50-10 (mean ± population
    std, as its file), and the sh/cifar10_table.tsv row that reproduces it."""
    names = {(float(r[0]) if r[0] != "*" else None, r[3]): r[1] for r in table_rows()}
    lines = ["| eps | paper row | runs | clean | PGD-50-10 | our row (`ROWS=`) |", "|---|---|---|---|---|---|"]
    for (eps, row), runs in paper_rows().items():
        clean, pgd = zip(*runs, strict=True)
        ours = names.get((eps, row)) or names.get((None, row), "-")
        lines.append(f"| {eps:g} | {row} | {len(runs)} | {paper_summary(clean)} | {paper_summary(pgd)} | {ours} |")
    return "\n".join(lines) + "\n"


def table(run_dirs, compare_paper=False, allow_duplicate_seeds=False):
    """The Markdown tables: one per final PGD protocol (results under different protocols never share a column),
    one row per group."""
    groups = group_runs(run_dirs, allow_duplicate_seeds)
    apart = telling_apart(groups)
    paper, commands = (paper_rows(), table_commands()) if compare_paper else (None, None)
    out = []
    for protocol in sorted({runs[0].protocol for runs in groups.values()}):
        chosen = [(key, runs) for key, runs in groups.items() if runs[0].protocol == protocol]
        aa_columns = autoattack_columns([runs for _, runs in chosen])
        header = (["dataset", "model", "method", "eps", "flags", "seeds"] + [c[2].format(pgd=protocol) for c in COLUMNS]
                  + [c[2] for c in aa_columns] + ["CO at epoch", "wall time (s)"])
        if compare_paper:
            header += ["paper row", "paper clean", "paper PGD-50-10", "clean − paper", "PGD − paper"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, runs in sorted(chosen, key=lambda kr: (group_name(kr[1][0], apart[kr[0]]), apart[kr[0]])):
            f = runs[0].flags
            values = {(m, k): [r.values[(m, k)] for r in runs if (m, k) in r.values] for m, k, _ in COLUMNS}
            cells = [mean_std(values[(m, k)]) for m, k, _ in COLUMNS]
            cells += [autoattack_cell(runs, model, label) for model, label, _ in aa_columns]
            walls = [r.wall_s for r in runs if r.wall_s is not None]
            row = [f["dataset"], f["model"], method_label(f), f"{f['eps']:g}", apart[key], str(len(runs))] + cells
            row += [co_cell([r.values[("co", "epoch")] for r in runs]),
                    f"{statistics.mean(walls):.0f}" if walls else "-"]
            if compare_paper:
                mean = lambda v: 100 * statistics.mean(v) if v else None  # noqa: E731
                row += paper_cells(runs[0], commands, paper, mean(values[("last", KEY["clean"])]),
                                   mean(values[("last", KEY["pgd"])]))
            lines.append("| " + " | ".join(row) + " |")
        out.append("\n".join(lines))
    note = ("Accuracies in % on the final test points, mean ± std over seeds; each table is one final PGD protocol "
            "(its column names iterations, restarts, step and points; the original's rule: the highest-loss "
            "restart's last iterate); FGSM has step eps; ES = early-stopped model (best PGD accuracy on training "
            "points); flags = what tells a row apart from the others; CO at epoch = the first periodic evaluation "
            "with test PGD accuracy below 1/3 of its best so far and FGSM accuracy more than 30 points above it, "
            "per seed, with the number of seeds that overfitted; AutoAttack: eval.py --autoattack's newest result "
            "in each run directory, its column named by its protocol (the official package, its version, the "
            "attack's version, seed, points), '-' where it has not run, '(n of m)' where some seeds only.")
    if compare_paper:
        note += (" Paper: the original's results file (paper/cifar10_results.tsv: official CIFAR-10, all 10,000 "
                 "test points, last model), mean ± population std as it reports them, matched where a row's flags "
                 "are those of its sh/cifar10_table.tsv run but for speed flags (named in the row); the differences "
                 "are ours minus the paper's means, given for runs on official CIFAR-10 only (torchvision's files, "
                 "passing its integrity check): a row on other data names its paper row and the data, and no "
                 "numbers.")
    return "\n\n".join(out) + "\n\n" + note + "\n"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=config.HelpFormatter)
    p.add_argument("paths", nargs="*", help="run directories written by train.py, or folders holding them")
    p.add_argument("--paper", action="store_true", help="print the original's CIFAR-10 results (paper/cifar10_results"
                   ".tsv) as a table, each row with the sh/cifar10_table.tsv row that reproduces it")
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.add_argument("--plots", metavar="DIR", help="write RUN/curves.png for each run and DIR/<group>.png; where "
                   "eval.py measured an FGSM sweep, RUN/fgsm_sweep.png and DIR/fgsm_sweep.png (last models)")
    p.add_argument("--filters", action="store_true", help="write RUN/filters.png (and DIR/<run>-filters.png with "
                   "--plots): the first layer's filters of the last and early-stopped models")
    p.add_argument("--compare", choices=["paper"], help="paper: add, for each row whose flags are a run of "
                   "sh/cifar10_table.tsv, the original's clean and PGD-50-10 (paper/cifar10_results.tsv) and ours "
                   "minus its")
    p.add_argument("--allow_duplicate_seeds", action="store_true", help="pool two runs of the same flags, data and "
                   "seed into one row (refused by default: usually the same run copied twice)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.paper:
        print(paper_table(), end="")
        return 0
    if not args.paths:
        print("report.py: error: give run directories (or folders holding them), or --paper", file=sys.stderr)
        return 2
    args.run_dirs = [d for path in args.paths for d in find_runs(path)]
    empty = [path for path in args.paths if not find_runs(path)]
    if empty:
        print(f"report.py: error: {empty[0]} is not a run directory and holds none (no metrics.jsonl)",
              file=sys.stderr)
        return 2
    try:
        text = table(args.run_dirs, args.compare == "paper", args.allow_duplicate_seeds)
    except config.UsageError as err:  # an args.json that is not train.py's, the same run twice
        print(f"report.py: error: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    try:
        if args.out:
            utils.atomic_write_text(text, args.out)
        if args.plots:
            write_plots(args.run_dirs, args.plots, args.allow_duplicate_seeds)
        if args.filters:
            write_filters(args.run_dirs, args.plots)
    except config.UsageError as err:  # a run without a readable checkpoint
        print(f"report.py: error: {err}", file=sys.stderr)
        return 2
    except (utils.WriteError, OSError) as err:
        print(f"report.py: error: {err}", file=sys.stderr)
        return 1
    return 0


def write_plots(run_dirs, folder, allow_duplicate_seeds=False):
    os.makedirs(folder, exist_ok=True)
    last_sweeps, eps = {}, None
    groups = group_runs(run_dirs, allow_duplicate_seeds)
    apart = telling_apart(groups)
    for key, runs in groups.items():
        dirs, name, title = [run.dir for run in runs], group_name(runs[0], apart[key]), group_title(runs[0], apart[key])
        for run in runs:
            d = run.dir
            plot_curves([d], os.path.join(d, "curves.png"), f"{title}, seed {run.seed} ({saved_runs.run_name(d)})")
            found = fgsm_sweep(d)
            if found:
                sweeps, eps = found
                plot_fgsm_sweeps({m: [s] for m, s in sweeps.items()}, eps, os.path.join(d, "fgsm_sweep.png"),
                                 f"FGSM step sweep: {saved_runs.run_name(d)}")
                if "last" in sweeps:
                    last_sweeps.setdefault(name, []).append(sweeps["last"])
        path = os.path.join(folder, name + ".png")
        if plot_curves(dirs, path, title):
            print(f"plot: {path}")
        else:
            print(f"report.py: no curves for {name}: {', '.join(dirs)} logged no periodic evaluation "
                  "(train.py --eval_iter_freq sets how often one runs)", file=sys.stderr)
    if last_sweeps:
        path = os.path.join(folder, "fgsm_sweep.png")
        plot_fgsm_sweeps(last_sweeps, eps, path, "FGSM step sweep, last models")
        print(f"plot: {path}")


def write_filters(run_dirs, folder=None):
    """RUN/filters.png for each run, and DIR/<run name>-filters.png with --plots DIR."""
    for d in run_dirs:
        ckpt, name = saved_runs.load_checkpoint(d, "--filters"), saved_runs.run_name(d)
        paths = [os.path.join(d, "filters.png")] + ([os.path.join(folder, f"{name}-filters.png")] if folder else [])
        plot_filters(ckpt, paths[0], f"first-layer filters: {name}")
        for path in paths[1:]:
            shutil.copyfile(paths[0], path)
        print("".join(f"plot: {path}\n" for path in paths), end="")


if __name__ == "__main__":
    sys.exit(main())
