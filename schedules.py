"""VFSAT's per-epoch training eps and the per-iteration learning-rate schedules, as the original defines them."""
import numpy as np

# The original's two hard-coded VFSAT lists (pixels/255): eps 16 gets its own, every other eps the eps-8 one.
VFSAT_EPS8 = (2, 4, 6, 8, 8, 8, 8, 8)
VFSAT_EPS16 = (2, 4, 6, 8, 10, 12, 14, 16, 16, 16, 16, 16)
VFSAT_EPS16_TOLERANCE = 255 / 266  # pixels/255: the original tests |eps - 16/255| < 1/266
VFSAT_RAMP_STEP = 2  # pixels/255 between consecutive values of the corrected ramp
VFSAT_PLATEAU_EPOCHS = 4  # epochs at full eps after the ramp, in each cycle of the corrected ramp

LR_SCHEDULES = ("cyclic", "piecewise", "constant", "same")  # "same" is the original's name for constant
CYCLIC_PEAK = (2, 5)  # the cyclic schedule peaks at epochs * 2 // 5 (an integer epoch, as in the original)
PIECEWISE_DROPS = ((0.5, 0.1), (0.75, 0.01))  # (fraction of training, lr multiplier from then on)


def vfsat_cycle(eps, ramp_to_eps=False):
    """VFSAT's cycle of training eps values (pixels/255), one per epoch.

    The original's list reaches 16 for eps 16 and 8 for any other eps (so eps 4 trains at up to 8, eps 10 never
    at 10); ramp_to_eps gives 2, 4, ... below eps, then eps five times, for every eps.
    """
    if ramp_to_eps:
        ramp = list(np.arange(VFSAT_RAMP_STEP, eps, VFSAT_RAMP_STEP).tolist())
        return [float(v) for v in ramp] + [float(eps)] * (1 + VFSAT_PLATEAU_EPOCHS)
    return [float(v) for v in (VFSAT_EPS16 if abs(eps - 16) < VFSAT_EPS16_TOLERANCE else VFSAT_EPS8)]


def training_eps(eps, epoch, discrete_eps, ramp_to_eps=False):
    """Training eps (pixels/255) of training epoch `epoch` (1-based): eps, or VFSAT's value for that epoch.
    Epoch 0, the original's step-less first pass, has VFSAT eps 0."""
    if not discrete_eps:
        return float(eps)
    if epoch == 0:
        return 0.0
    cycle = vfsat_cycle(eps, ramp_to_eps)
    return cycle[(epoch - 1) % len(cycle)]


def learning_rate(schedule, lr_max, epochs_done, total_epochs):
    """Learning rate after `epochs_done` (fractional) of `total_epochs` training epochs."""
    if schedule == "cyclic":
        peak = total_epochs * CYCLIC_PEAK[0] // CYCLIC_PEAK[1]
        return float(np.interp(epochs_done, [0, peak, total_epochs], [0, lr_max, 0]))
    if schedule == "piecewise":
        factor = 1.0
        for fraction, drop in PIECEWISE_DROPS:
            if epochs_done >= fraction * total_epochs:
                factor = drop
        return lr_max * factor
    if schedule in ("constant", "same"):
        return lr_max
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
