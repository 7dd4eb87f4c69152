"""train.py --estimate: the projected wall time of exactly this run on this machine, from measurements of its
pieces — training iterations after a warm-up (batch, step and bookkeeping), one periodic evaluation, a slice of the
final evaluation, one checkpoint — each multiplied by how often the run does it. Nothing is written; a projection,
never a measured run.

The final evaluation depends on weights the run has not trained yet: PGD's ln K skip leaves the examples already
lost (a loss above ln K) out of the later restarts, which saves most of the work on a weak or collapsed model and
little on a robust one. It is timed both ways on a slice of the test points — with the skip on the initial weights
(whose near-uniform outputs lose almost every example at once: the least it can cost) and without the skip (every
restart on every example: the most) — and projected at the middle of that range, which is printed. With
--eval_early_stopped_model it is counted for three models (models kept at the same iteration are evaluated once,
so two is common). The periodic evaluation is timed as the run does it, on the initial weights."""
import io
import itertools
import statistics
import time

import torch

import evaluation
import utils

WARMUP_ITERS = 2  # the first creates the optimiser's state; cuDNN tunes new shapes
TIMED_ITERS = 5  # training iterations timed after the warm-up (the median is used)


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


def measure(trainer, dataset, n_final_eval, n_iters=TIMED_ITERS):
    """{piece: seconds of one} measured on this machine with this run's train.Trainer (fresh: its initial
    weights) and data, the final evaluation on the first n_final_eval test points."""
    device, batch_size_eval, out = trainer.data.x.device, trainer.protocol.batch_size, {}
    trainer.model.train()
    batches, times = itertools.chain.from_iterable(trainer.batches(1) for _ in itertools.count()), []

    def iteration():
        x, y = next(batches)
        trainer.meters.add(trainer.step(x, y, trainer.radii(1)), len(y), trainer.iteration)
    for _ in range(WARMUP_ITERS + n_iters):
        times.append(timed(device, iteration)[0])
    out["training iteration"] = statistics.median(times[WARMUP_ITERS:])
    loss_scale = 2.0 ** 16 if trainer.eval_autocast is not None else None  # as a mid-run scale
    periodic = [timed(device, evaluation.periodic_eval, trainer.model, trainer.data.eval_sets, trainer.protocol,
                      trainer.restart, trainer.eval_autocast, loss_scale)[0] for _ in range(2)]
    out["periodic evaluation"] = periodic[1]  # the first tunes cuDNN's algorithms for new shapes
    n_points = len(evaluation.first_points(len(dataset.test_y), n_final_eval))
    idx = evaluation.first_points(len(dataset.test_y), min(n_points, batch_size_eval))
    x_u8, y = dataset.test_x[idx].to(device), dataset.test_y[idx].to(device)
    bounds = [timed(device, final_eval_points, trainer, x_u8, y, skip)[0] / len(idx) for skip in (True, False)]
    out["final evaluation point"], out["final bounds"] = sum(bounds) / 2, bounds
    out["checkpoint"] = timed(device, lambda: torch.save(trainer.state_dict(), io.BytesIO()))[0]
    return out, trainer.n_batches, n_points


def final_eval_points(trainer, x_u8, y, skip_lost):
    """The final evaluation's attacks (clean, FGSM, PGD) on these points, with or without the ln K skip."""
    trainer.model.eval()
    evaluation.per_example(evaluation.final_stats(trainer.model, trainer.protocol, trainer.restart, skip_lost),
                           ("clean",), evaluation.batches(x_u8, y, trainer.protocol.batch_size))
    trainer.model.train()


def project(trainer, args, dataset, startup_s):
    """The projection's lines: 'projected wall time: N s', then each piece's count, seconds and share."""
    each, n_batches, n_points = measure(trainer, dataset, args.n_final_eval)
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
    low, high = (counts["final evaluation point"] * b for b in each["final bounds"])
    lines.append(f"the final evaluation: {totals['final evaluation point']:.0f} s, the middle of {low:.0f} s (the ln "
                 f"K skip on a model that loses every example) to {high:.0f} s (no example skipped); the run's "
                 f"wall time lies between {total - totals['final evaluation point'] + low:.0f} and "
                 f"{total - totals['final evaluation point'] + high:.0f} s")
    lines.append(f"measured: the median of {TIMED_ITERS} training iterations after {WARMUP_ITERS} of warm-up; the "
                 f"second of two periodic evaluations; the final evaluation's attacks on "
                 f"{min(n_points, args.batch_size_eval)} points with and without the ln K skip, counted for "
                 f"{n_models} model(s) of {n_points:,} points (kept models saved at one iteration are evaluated "
                 "once); one checkpoint, in memory")
    return lines
