"""Warnings about a training period that cannot be learning what it should, and the detection of catastrophic
overfitting (CO) in a run's periodic evaluations. Pure functions of metrics rows."""

from methods import REGULARISERS, carries_perturbation

CO_PGD_FRACTION = 1 / 3  # CO: test PGD accuracy below this fraction of its best so far...
CO_GAP = 0.30  # ...while FGSM accuracy exceeds it by more than this (30 points)
DELTA_FRACTION = 0.5  # FGSM from zero: a mean |delta| below this fraction of the step means zero input gradients


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


def expected_delta(args, train_eps_px):
    """The mean |delta| an FGSM step from zero gives when input gradients are not zero (pixels in [0, 1] units);
    None for attacks whose perturbation size this cannot predict."""
    plain_fgsm = (args.attack == "fgsm" and args.attack_init == "zero" and not args.mast
                  and not carries_perturbation(args) and args.dataset != "svhn")
    return min(args.fgsm_alpha, 1.0) * train_eps_px / 255 if plain_fgsm and train_eps_px > 0 else None


def period_warnings(row, previous, args):
    """One line for each sign, over the period since the last evaluation, that training is not doing its job."""
    out = []
    if row.get("loss_scale", 1.0) < 1:
        out.append(f"the fp16 loss scale has fallen to {row['loss_scale']:g}: input gradients are underflowing")
    for r in REGULARISERS:
        if r.weight(args) > 0 and row[f"train_{r.stat}"] == 0:
            out.append(f"{r.name}'s term read exactly 0 for the whole period")
    # a period that began in the previous epoch took some steps at that epoch's (VFSAT: smaller) eps
    period_eps = min(row["train_eps"], previous["train_eps"]) if previous is not None else row["train_eps"]
    expected = expected_delta(args, period_eps)
    if expected is not None and row["train_delta_abs"] < DELTA_FRACTION * expected:
        out.append(f"the training perturbation's mean |delta| is {255 * row['train_delta_abs']:.3g}/255, below half "
                   f"of the FGSM step ({255 * expected:.3g}/255): the step is zero at most pixels (their input "
                   "gradient is exactly 0) or clipped by the images' [0, 1] bounds")
    if previous is not None and row["train_loss"] == previous["train_loss"]:
        out.append(f"the training loss has not changed since iteration {previous['iteration']}")
    return out
