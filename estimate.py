"""train.py --estimate: the projected wall time of exactly this run on this machine, from measurements of its
pieces — training iterations after a warm-up (batch, step and bookkeeping), one periodic evaluation, a slice of the
final evaluation, one checkpoint — each multiplied by how often the run does it. Nothing is written; a projection,
never a measured run.

PGD's ln K skip leaves the examples already lost (a loss above ln K) out of the later restarts, which saves most of
the work on a weak or collapsed model and little on a robust one, so the cost of the pieces it runs in depends on
weights the run has not trained yet. The final evaluation and the periodic one's training points (the test points
run every restart on every example: their perturbation feeds the logged cosine) are each bounded: at least one
restart on every example (every example lost at its first restart), at most every restart on every example (none
skipped). Each is projected at the middle of its range, and the range is printed, with the run's. With
--eval_early_stopped_model the final evaluation is counted for three models (models kept at the same iteration are
evaluated once, so two is common). What is being timed is said on stderr.
"""
import contextlib
import dataclasses
import io
import itertools
import statistics
import time

import torch

import evaluation
import utils

WARMUP_ITERS = 5  # the first creates the optimiser's state, cuDNN tunes new shapes; the next few run slower on a CPU
TIMED_ITERS = 15  # training iterations timed after the warm-up (the median is used: a CPU's iterations vary 2x)


def count_periodic(args, n_batches):
    """How many periodic evaluations the run makes: at every eval_iter_freq-th iteration of an epoch past
    start_eval_epoch (train.Trainer.train_epoch's rule)."""
    total = args.epochs * n_batches
    return sum(1 for it in range(args.eval_iter_freq, total + 1, args.eval_iter_freq)
               if (it - 1) // n_batches + 1 > args.start_eval_epoch)


def timed(device, fn, *a, **kw):
    """(seconds, fn's result), the device's queue drained before and after."""
    utils.sync(device)
    start = time.perf_counter()
    out = fn(*a, **kw)
    utils.sync(device)
    return time.perf_counter() - start, out


def measure(trainer, dataset, n_final_eval, n_iters=TIMED_ITERS, say=lambda line: None):
    """{piece: seconds of one} measured on this machine with this run's train.Trainer (fresh: its initial
    weights) and data, the final evaluation on the first n_final_eval test points; 'periodic bounds' and 'final
    bounds' the (skip, no skip) seconds of one. say(line) is told what is timed before each piece."""
    device, batch_size_eval, out = trainer.data.x.device, trainer.protocol.batch_size, {}
    trainer.model.train()
    batches, times = itertools.chain.from_iterable(trainer.batches(1) for _ in itertools.count()), []

    def iteration():
        x, y = next(batches)
        trainer.meters.add(trainer.step(x, y, trainer.radii(1)), len(y), trainer.iteration)
    say(f"timing {WARMUP_ITERS + n_iters} training iterations ({WARMUP_ITERS} of warm-up)")
    for _ in range(WARMUP_ITERS + n_iters):
        times.append(timed(device, iteration)[0])
    out["training iteration"] = statistics.median(times[WARMUP_ITERS:])
    loss_scale = 2.0 ** 16 if trainer.eval_autocast is not None else None  # as a mid-run scale
    n_eval = {name: len(points[1]) for name, points in trainer.data.eval_sets.items()}
    say(f"timing the periodic evaluation ({n_eval['test']} test, {n_eval['train']} training points) twice, every "
        "restart on every example, then its training points' PGD with every restart and with one")
    periodic = [timed(device, evaluation.periodic_eval, trainer.model, trainer.data.eval_sets, trainer.protocol,
                      trainer.restart, trainer.eval_autocast, loss_scale, False)[0] for _ in range(2)]
    every, one = (timed(device, training_points_pgd, trainer, restarts, loss_scale)[0]
                  for restarts in (trainer.protocol.n_restarts, min(1, trainer.protocol.n_restarts)))
    out["periodic bounds"] = [periodic[1] - every + one, periodic[1]]  # the first tunes cuDNN for new shapes
    out["periodic evaluation"] = sum(out["periodic bounds"]) / 2
    n_points = len(evaluation.first_points(len(dataset.test_y), n_final_eval))
    idx = evaluation.first_points(len(dataset.test_y), min(n_points, batch_size_eval))
    x_u8, y = dataset.test_x[idx].to(device), dataset.test_y[idx].to(device)
    say(f"timing the final evaluation on {len(idx)} test points, with one restart and with every restart")
    final = trainer.protocol
    bounds = [timed(device, final_eval_points, trainer, protocol, x_u8, y)[0] / len(idx)
              for protocol in (dataclasses.replace(final, final_restarts=min(1, final.final_restarts)), final)]
    out["final evaluation point"], out["final bounds"] = sum(bounds) / 2, bounds
    say("timing one checkpoint (in memory)")
    out["checkpoint"] = timed(device, lambda: torch.save(trainer.state_dict(), io.BytesIO()))[0]
    return out, trainer.n_batches, n_points


def training_points_pgd(trainer, n_restarts, loss_scale):
    """The periodic evaluation's PGD on its training points with n_restarts, every restart on every example."""
    p, (x, y) = trainer.protocol, trainer.data.eval_sets["train"]
    trainer.model.eval()
    with trainer.eval_autocast or contextlib.nullcontext():
        evaluation.fractions(evaluation.pgd_stats(trainer.model, p.eps, p.attack_iters, n_restarts, skip_lost=False,
                                                  restart=trainer.restart, loss_scale=loss_scale, batched=p.batched),
                             ("pgd",), evaluation.batches(x, y, p.batch_size))
    trainer.model.train()


def final_eval_points(trainer, protocol, x_u8, y):
    """The final evaluation's attacks (clean, FGSM, PGD) on these points, every restart on every example."""
    trainer.model.eval()
    evaluation.per_example(evaluation.final_stats(trainer.model, protocol, trainer.restart, skip_lost=False),
                           ("clean",), evaluation.batches(x_u8, y, protocol.batch_size))
    trainer.model.train()


def project(trainer, args, dataset, startup_s, say=lambda line: None):
    """The projection's lines: 'projected wall time: N s', then each piece's count, seconds and share, then the
    ranges of the pieces that PGD's skip makes depend on the weights, and the run's."""
    each, n_batches, n_points = measure(trainer, dataset, args.n_final_eval, say=say)
    n_models = 3 if args.eval_early_stopped_model else 1
    counts = {"training iteration": args.epochs * n_batches + 1,  # the original's step-less epoch 0 too
              "periodic evaluation": count_periodic(args, n_batches),
              "final evaluation point": n_models * n_points, "checkpoint": args.epochs + 1}
    totals = {piece: counts[piece] * each[piece] for piece in counts}
    totals["start-up (data, model)"], counts["start-up (data, model)"] = startup_s, 1
    each["start-up (data, model)"] = startup_s
    total = sum(totals.values())
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    lines = [f"projected wall time: {total:.0f} s ({utils.duration(total)}) on {name} ({args.device}), "
             f"{torch.get_num_threads()} threads: a projection from the measurements below, not a measured run",
             "| piece | count | seconds each | seconds | share |", "|---|---|---|---|---|"]
    lines += [f"| {piece} | {counts[piece]:,} | {each[piece]:.4g} | {totals[piece]:.0f} | "
              f"{100 * totals[piece] / total:.1f}% |" for piece in totals]
    low, high = total, total
    for piece, bounds, what in (("periodic evaluation", "periodic bounds", "the periodic evaluations"),
                                ("final evaluation point", "final bounds", "the final evaluation")):
        piece_low, piece_high = sorted(counts[piece] * b for b in each[bounds])  # timing noise may swap them
        low, high = low - totals[piece] + piece_low, high - totals[piece] + piece_high
        lines.append(f"{what}: {totals[piece]:.0f} s, the middle of {piece_low:.0f} s (the ln K skip where every "
                     f"example is lost at its first restart) to {piece_high:.0f} s (no example skipped)")
    lines.append(f"the run's wall time lies between {low:.0f} and {high:.0f} s ({utils.duration(low)} to "
                 f"{utils.duration(high)})")
    lines.append(f"measured: the median of {TIMED_ITERS} training iterations after {WARMUP_ITERS} of warm-up; the "
                 f"second of two periodic evaluations and its training points' PGD with one restart; the final "
                 f"evaluation's attacks on {min(n_points, args.batch_size_eval)} points with one restart and with "
                 f"every restart, counted for "
                 f"{n_models} model(s) of {n_points:,} points (kept models saved at one iteration are evaluated "
                 "once); one checkpoint, in memory; the second of two start-ups (the data read from its cache)")
    return lines
