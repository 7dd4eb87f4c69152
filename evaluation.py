"""Accuracies under the original's evaluation protocol: periodic evaluations during training, the final one,
and the pieces eval.py combines. Models are evaluated in eval mode, in fp32 unless a periodic evaluation is given
the training's autocast; points are split over processes and every count is global."""
import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

import attacks
import data
import utils

PGD_STEP_FRACTION = 1 / 4  # the original's evaluation PGD step, as a fraction of eps
GRAPH_MAX_ROWS = 256  # examples: a larger attacked subset keeps a GPU busy without a graph (each holds its memory)


@dataclass(frozen=True)
class Protocol:
    """A run's evaluations, read from train.py's flags once."""
    eps_px: float  # pixels/255
    attack_iters: int  # periodic PGD
    n_restarts: int
    final_iters: int  # final PGD
    final_restarts: int
    batch_size: int  # per process
    batched: bool  # --batched_restarts

    @classmethod
    def from_flags(cls, args):
        return cls(args.eps, args.attack_iters, args.n_restarts, args.final_attack_iters, args.final_n_restarts,
                   args.batch_size_eval, args.batched_restarts)

    @property
    def eps(self):
        return self.eps_px / 255


class GraphedRestarts:
    """attacks.pgd_restart replayed from CUDA graphs (--cuda_graph): a restart of PGD-50 launches about 10,000
    kernels, and on the small attacked subsets of the later restarts a fast GPU waits for the host.

    One graph per subset shape (a few: attacks.padded) of at most GRAPH_MAX_ROWS examples, captured at the shape's
    second restart (its first runs eagerly, on a side stream, and lets cuDNN tune the shape); later restarts of that
    shape copy their inputs into the graph's and replay it. The graph reads the model's weights where they are, so
    it follows training and load_state_dict. The start is drawn outside it: the results are the eager ones. A
    capture that fails is logged once, and the evaluations go on eagerly. Under autocast a shape has one graph per
    dtype, captured without autocast's weight cache (its cast copies would outlive the capture), and the loss scale
    is one of the graph's inputs."""

    def __init__(self, model):
        self.model, self.graphs, self.seen, self.side, self.failure = model, {}, set(), None, None

    def __call__(self, model, x, y, delta, eps, step, n_iters, loss_scale=1.0):
        if model is not self.model:
            return attacks.pgd_restart(model, x, y, delta, eps, step, n_iters, loss_scale)
        device = x.device.type
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        key = (tuple(x.shape), x.stride(), x.dtype, eps, step, n_iters, model.training, autocast)
        scale = torch.full((), loss_scale, device=x.device)  # copied into the graph's input: it changes in training
        if key in self.graphs:
            return self._replay(key, x, y, delta, scale)
        self.side = self.side or torch.cuda.Stream()
        out = utils.on_side_stream(self.side, attacks.pgd_restart, model, x, y, delta, eps, step, n_iters, scale)
        if key in self.seen and len(y) <= GRAPH_MAX_ROWS and not self.failure:
            self._capture(key, (x, y, delta, scale), eps, step, n_iters, autocast)
        self.seen.add(key)
        return out

    def _replay(self, key, *values):
        graph, inputs, outputs = self.graphs[key]
        for static, value in zip(inputs, values, strict=True):
            static.copy_(value)
        graph.replay()
        return outputs

    def _capture(self, key, values, eps, step, n_iters, autocast):
        x, y, delta, scale = inputs = tuple(v.clone() for v in values)
        with torch.autocast(x.device.type, dtype=autocast or None, enabled=bool(autocast), cache_enabled=False):
            graph, outputs = utils.capture_graph(attacks.pgd_restart, self.model, x, y, delta, eps, step, n_iters,
                                                 scale)
        if graph is None:
            self.failure = outputs
            logging.getLogger(utils.LOGGER).warning(f"warning: --cuda_graph: capturing a PGD restart failed "
                                                    f"({outputs}); evaluations go on without CUDA graphs")
        else:
            self.graphs[key] = graph, inputs, outputs


def per_example(stats_fn, keys, batches):
    """{key: stats_fn(x, y)[key] (per-example tensors) over all batches, one tensor on the CPU}."""
    parts = {key: [] for key in keys}
    for x, y in batches:
        values = stats_fn(x, y)
        for key in keys:
            parts[key].append(values[key].cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def fractions(stats_fn, keys, batches):
    """{key: mean over all points and processes of stats_fn(x, y)[key]} (per-example tensors), and the number
    of points."""
    values = per_example(stats_fn, keys, batches)
    *sums, n = utils.global_sum(*(values[k].double().sum().item() for k in keys), len(values[keys[0]]))
    return {k: s / max(n, 1) for k, s in zip(keys, sums, strict=True)}, int(n)


def batches(x_u8, y, batch_size, desc=None):
    n_batches = -(-len(y) // batch_size)
    return utils.progress(data.eval_batches(x_u8, y, batch_size), n_batches, desc)


def example_scale(loss_scale, n):
    """The scale of a loss summed over n examples that equals loss_scale on their mean (the original scales the
    batch-mean loss; the evaluation attacks sum it, so that an example's gradient does not depend on the others);
    1 without loss scaling (None)."""
    return 1.0 if loss_scale is None else loss_scale / n


def pgd_stats(model, eps, n_iters, n_restarts, step=None, skip_lost=True, restart=attacks.pgd_restart,
              loss_scale=None, batched=False):
    """(x, y) -> per-example 'pgd' (correct under the original protocol) and 'pgd_any' (the strict rule)."""
    def stats(x, y):
        correct, robust, _ = attacks.pgd_eval(model, x, y, eps, step or eps * PGD_STEP_FRACTION, n_iters,
                                              n_restarts, skip_lost, restart, example_scale(loss_scale, len(y)),
                                              batched)
        return {"pgd": correct, "pgd_any": robust}
    return stats


class EvalAttack(NamedTuple):
    """An evaluation attack: the stem of its metric keys, and its name in tables and plots."""
    stem: str
    name: str


EVAL_ATTACKS = {a.stem: a for a in (  # what the periodic, final and eval.py's evaluations choose from
    EvalAttack("clean", "clean"),
    EvalAttack("fgsm", "FGSM"),  # one step of eps from zero
    EvalAttack("pgd", "PGD"),  # tag: eval.py's ITERS_RESTARTS; strict: any iterate (pgd_any_acc)
    EvalAttack("fgsm_step", "FGSM step"),  # eval.py's sweep; tag: the step, pixels/255
    EvalAttack("autoattack", "AutoAttack"),
    EvalAttack("worst_case", "worst case"),  # eval.py: every attack within the ball at once
)}
FINAL_ATTACKS = ("clean", "fgsm", "pgd")  # the final evaluation's, PGD under both rules


def metric_key(stem, tag="", strict=False, points=None):
    """The metrics key of an accuracy, [points_]stem[tag][_any]_acc: test_pgd_acc, pgd_any_acc (a final row's),
    pgd50_10_acc (eval.py's), fgsm_step4_acc."""
    if stem not in EVAL_ATTACKS:
        raise KeyError(f"{stem!r} is not in evaluation.EVAL_ATTACKS")
    return f"{points + '_' if points else ''}{stem}{tag}{'_any' if strict else ''}_acc"


KEY_PATTERN = re.compile(r"^(?:(test|train)_)?(" + "|".join(sorted(EVAL_ATTACKS, key=len, reverse=True))
                         + r")(.*?)(_any)?_acc$")


def parse_metric_key(key):
    """(points, stem, tag, strict) of a metric key (metric_key's arguments), None for any other key."""
    match = KEY_PATTERN.match(key)
    if not match:
        return None
    points, stem, tag, strict = match.groups()
    return points, stem, tag, bool(strict)


def fgsm_sweep_step(key):
    """The step (pixels/255) of an FGSM sweep's metric key, None for any other key."""
    parsed = parse_metric_key(key)
    return float(parsed[2]) if parsed and parsed[1] == "fgsm_step" else None


def clean_stats(model):
    return lambda x, y: {"clean": utils.clean_correct(model, x, y)}


def fgsm_stats(model, step, radius):
    return lambda x, y: {"fgsm": attacks.fgsm_eval(model, x, y, step, radius)[0]}


def periodic_test_stats(model, eps, attack_iters, n_restarts, restart=attacks.pgd_restart, loss_scale=None,
                        batched=False):
    """Everything the original logs about the test points: clean, FGSM (step eps), PGD accuracy, the cosine
    between the FGSM and PGD perturbations, and the cosine between input gradients at x and at x + eta. PGD runs
    every restart on every example, without the ln K skip: the original's attack_pgd replaces a lost example's
    perturbation whenever a later restart finds a higher loss, and the cosine reads that perturbation."""
    def stats(x, y):
        scale = example_scale(loss_scale, len(y))
        fgsm_correct, fgsm_delta = attacks.fgsm_eval(model, x, y, eps, eps, scale)
        pgd_correct, pgd_robust, pgd_delta = attacks.pgd_eval(model, x, y, eps, eps * PGD_STEP_FRACTION,
                                                              attack_iters, n_restarts, False, restart, scale,
                                                              batched)
        cosines = attacks.grad_cosines(model, x, y, eps, loss_scale or 1.0)  # a batch-mean loss, as the original's
        return {metric_key("clean"): utils.clean_correct(model, x, y), metric_key("fgsm"): fgsm_correct,
                metric_key("pgd"): pgd_correct, metric_key("pgd", strict=True): pgd_robust,
                "cos_fgsm_pgd": attacks.cosines_or_one(fgsm_delta, pgd_delta), "grad_cosine": cosines.detach()}
    return stats


PERIODIC_TEST_KEYS = (*(metric_key(a) for a in ("clean", "fgsm", "pgd")), metric_key("pgd", strict=True),
                      "cos_fgsm_pgd", "grad_cosine")


def periodic_eval(model, eval_sets, protocol, restart=attacks.pgd_restart, autocast=None, loss_scale=None,
                  skip_lost=True):
    """The original's periodic evaluation on its fixed test and training points (eval mode, no augmentation);
    restart: attacks.pgd_restart or a GraphedRestarts; autocast (a context) and loss_scale (None: neither), the
    mixed precision that the original's apex O1 leaves on for it. skip_lost: the ln K skip on the training points,
    whose PGD gives an accuracy alone (the same either way; --estimate times both)."""
    (test_x, test_y), (train_x, train_y) = eval_sets["test"], eval_sets["train"]
    was_training = model.training
    model.eval()
    with autocast or contextlib.nullcontext():
        p = protocol
        test, n_points = fractions(periodic_test_stats(model, p.eps, p.attack_iters, p.n_restarts, restart,
                                                       loss_scale, p.batched),
                                   PERIODIC_TEST_KEYS, batches(test_x, test_y, p.batch_size, "test points"))
        train, _ = fractions(pgd_stats(model, p.eps, p.attack_iters, p.n_restarts, skip_lost=skip_lost,
                                       restart=restart, loss_scale=loss_scale, batched=p.batched),
                             ("pgd",), batches(train_x, train_y, p.batch_size, "training points"))
    row = {("test_" + k if parse_metric_key(k) else k): v for k, v in test.items()}
    row[metric_key("pgd", points="train")] = train["pgd"]
    row["n_eval_points"] = n_points
    model.train(was_training)
    return row


def final_eval_seed(seed, iteration):
    """The seed of the final evaluation's random starts for the run's weights at this iteration: the same weights
    get the same starts wherever they are evaluated (train.py, eval.py), whatever ran before."""
    return int.from_bytes(hashlib.sha256(f"{seed}/final/{iteration}".encode()).digest()[:7], "big")


def pgd_protocol(iters, restarts, step_px, n_points, n_total, seed=None, batch_size=None):
    """What a PGD accuracy means, in full (stored beside it), and its label (what a column is headed with)."""
    points = (f"all {n_total:,}" if n_points == n_total else f"the first {n_points:,}"
              + (f" of {n_total:,}" if n_total else ""))
    return {"attack": f"PGD-{iters}-{restarts}", "iterations": iters, "restarts": restarts, "step_px": step_px,
            "rule": "the last iterate of the highest-loss restart (the original's); strict: any iterate",
            "points": f"{points} test points", "n_points": n_points, "seed": seed, "batch_size": batch_size,
            "label": f"PGD-{iters}-{restarts} (step {step_px:g}/255, {n_points:,} pts)"}


def final_eval(model, states, x_u8, y, protocol, restart=attacks.pgd_restart, watch=None, seeds=None):
    """One row per saved model: clean, FGSM (step eps) and PGD accuracy under the final attack, the original
    protocol ('pgd_acc') and the strict rule ('pgd_any_acc'). watch(batches, n_batches, desc), when given, wraps
    each model's batches (progress lines, stops); seeds ({name: seed}), when given, seed each model's random
    starts (each process's own stream: seed + rank)."""
    rows = []
    model.eval()
    keys = (*FINAL_ATTACKS, "pgd_any")  # final_stats' per-example keys
    n_batches = -(-len(y) // protocol.batch_size)
    for name, state in states.items():
        model.load_state_dict(state)
        if seeds:
            torch.manual_seed(seeds[name] + utils.rank())
        desc = f"final evaluation: {name}"
        model_batches = batches(x_u8, y, protocol.batch_size, desc)
        accs, n = fractions(final_stats(model, protocol, restart), keys,
                            watch(model_batches, n_batches, desc) if watch else model_batches)
        accs = {metric_key(k.removesuffix("_any"), strict=k.endswith("_any")): v for k, v in accs.items()}
        rows.append({"kind": "final", "model": name, **accs, "n_points": n})
    model.train()
    return rows


def final_stats(model, protocol, restart=attacks.pgd_restart, skip_lost=True):
    eps = protocol.eps
    pgd = pgd_stats(model, eps, protocol.final_iters, protocol.final_restarts, skip_lost=skip_lost, restart=restart,
                    batched=protocol.batched)
    return lambda x, y: {"clean": utils.clean_correct(model, x, y), "fgsm": attacks.fgsm_eval(model, x, y, eps, eps)[0],
                         **pgd(x, y)}


def first_points(n_total, n):
    """Indices of the first n points (all for n < 0), the original's choice of evaluation points."""
    return torch.arange(n_total if n < 0 else min(n, n_total))
