"""Warnings about a training period that cannot be learning what it should, and the detection of catastrophic
overfitting (CO) in a run's periodic evaluations. Pure functions of metrics rows."""

from methods import REGULARISERS, single_step

CO_PGD_FRACTION = 1 / 3  # CO: test PGD accuracy below this fraction of its best so far...
CO_GAP = 0.30  # ...while FGSM accuracy exceeds it by more than this (30 points)
ZERO_GRAD_FRACTION = 0.5  # single-step attacks: input gradients exactly 0 at more than this share of the pixels


def co_onset(rows):
    """The first periodic row at which catastrophic overfitting shows, or None: test PGD accuracy below 1/3 of its
    best so far and FGSM accuracy more than 30 points above PGD (the model defeats the one attack it trains on)."""
    best = 0.0
    for row in (r for r in rows if r.get("kind") == "periodic"):
        pgd, fgsm = row["test_pgd_acc"], row["test_fgsm_acc"]
        if best > 0 and pgd < CO_PGD_FRACTION * best and fgsm - pgd > CO_GAP:
            return row
        best = max(best, pgd)
    return None


def period_warnings(row, previous, args):
    """One line for each sign, over the period since the last evaluation, that training is not doing its job."""
    out = []
    if row.get("loss_scale", 1.0) < 1:
        out.append(f"the fp16 loss scale has fallen to {row['loss_scale']:g}: input gradients are underflowing")
    for r in REGULARISERS:
        if r.weight(args) > 0 and row[f"train_{r.stat}"] == 0:
            out.append(f"{r.name}'s term read exactly 0 for the whole period")
    # measured, not inferred from |delta|, which [0, 1] clipping (MNIST's black background) and VFSAT also shrink
    if single_step(args) and row.get("train_grad_zero", 0.0) > ZERO_GRAD_FRACTION:
        out.append(f"the attack's input gradient was exactly 0 (or NaN) at {100 * row['train_grad_zero']:.0f}% of "
                   "the pixels over the period: its signed step moves nothing there")
    if previous is not None and row["train_loss"] == previous["train_loss"]:
        out.append(f"the training loss has not changed since iteration {previous['iteration']}")
    return out
