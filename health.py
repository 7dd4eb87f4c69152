"""What the periodic evaluations watch: warnings about a training period that cannot be learning what it should,
the detection of catastrophic overfitting (CO), and the models kept at the best evaluations (Monitor). Pure
functions of metrics rows and the run's methods.StepSettings."""

CO_PGD_FRACTION = 1 / 3  # CO: test PGD accuracy below this fraction of its best so far...
CO_GAP = 0.30  # ...while FGSM accuracy exceeds it by more than this (30 points)
ZERO_GRAD_FRACTION = 0.5  # single-step attacks: input gradients exactly 0 at more than this share of the pixels
KEPT_BY = {"early_stopped": "train_pgd_acc", "best_test": "test_pgd_acc"}  # kept model: the accuracy it maximises


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


def period_warnings(row, previous, settings):
    """One line for each sign, over the period since the last evaluation, that training is not doing its job."""
    out = []
    if row.get("loss_scale", 1.0) < 1:
        out.append(f"the fp16 loss scale has fallen to {row['loss_scale']:g}: input gradients are underflowing")
    for t in settings.terms:
        if t.coefficient > 0 and row[f"train_{t.row.stat}"] == 0:
            out.append(f"{t.row.name}'s term read exactly 0 for the whole period")
    # measured, not inferred from |delta|, which [0, 1] clipping (MNIST's black background) and VFSAT also shrink
    if settings.attack.single_step and row.get("train_grad_zero", 0.0) > ZERO_GRAD_FRACTION:
        out.append(f"the attack's input gradient was exactly 0 (or NaN) at {100 * row['train_grad_zero']:.0f}% of "
                   "the pixels over the period: its signed step moves nothing there")
    if previous is not None and row["train_loss"] == previous["train_loss"]:
        out.append(f"the training loss has not changed since iteration {previous['iteration']}")
    return out


class Monitor:
    """The periodic evaluations' watch over a run: each row's warnings and CO flag, and the kept models (weights
    at the row with the highest accuracy of KEPT_BY, strictly, from 0 with the initial weights, as the original)."""

    def __init__(self, settings, initial_state):
        self.settings = settings
        self.kept = {name: {"state": initial_state, "iteration": 0, "acc": 0.0} for name in KEPT_BY}

    def observe(self, row, metrics, snapshot):
        """Add row (a periodic evaluation) to metrics with its warnings and CO flag; snapshot() copies the model's
        weights where a kept model improves."""
        previous = next((r for r in reversed(metrics) if r["kind"] == "periodic"), None)
        row["warnings"] = period_warnings(row, previous, self.settings)
        metrics.append(row)
        for name, key in KEPT_BY.items():
            if row[key] > self.kept[name]["acc"]:
                self.kept[name] = {"state": snapshot(), "iteration": row["iteration"], "acc": row[key]}
        co_seen = any(r.get("catastrophic_overfitting") for r in metrics)
        row["catastrophic_overfitting"] = not co_seen and co_onset(metrics) is row
