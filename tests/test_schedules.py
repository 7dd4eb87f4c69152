"""VFSAT's per-epoch eps and the learning-rate schedules against the original's hand-written values."""
import pytest

import schedules


def test_vfsat_lists_are_the_originals_for_every_eps():
    eps8 = [2, 4, 6, 8, 8, 8, 8, 8]
    assert schedules.vfsat_cycle(8) == eps8
    assert schedules.vfsat_cycle(16) == [2, 4, 6, 8, 10, 12, 14, 16, 16, 16, 16, 16]
    assert schedules.vfsat_cycle(16.5) == schedules.vfsat_cycle(16)  # the original's |eps - 16/255| < 1/266
    for eps in (4, 10, 12, 17):  # the original's hard-coded list ignores eps
        assert schedules.vfsat_cycle(eps) == eps8


def test_fixed_vfsat_list_ramps_to_eps():
    assert schedules.vfsat_cycle(10, ramp_to_eps=True) == [2, 4, 6, 8, 10, 10, 10, 10, 10]
    assert schedules.vfsat_cycle(4, ramp_to_eps=True) == [2, 4, 4, 4, 4, 4]
    assert schedules.vfsat_cycle(8, ramp_to_eps=True) == schedules.vfsat_cycle(8)


def test_vfsat_training_eps_by_epoch():
    """Epoch 0 is the original's step-less pass (eps 0); training epoch e uses the list's (e-1)-th value."""
    by_epoch = [schedules.training_eps(8, epoch, discrete_eps=True) for epoch in range(19)]
    assert by_epoch == [0] + [2, 4, 6, 8, 8, 8, 8, 8] * 2 + [2, 4]
    assert schedules.training_eps(8, 5, discrete_eps=False) == 8


@pytest.mark.parametrize("epochs_done, expected", [
    (0, 0.0), (4, 0.1), (8, 0.2), (11, 0.15), (14, 0.1), (20, 0.0)])
def test_cyclic_schedule_peaks_at_two_fifths(epochs_done, expected):
    assert schedules.learning_rate("cyclic", 0.2, epochs_done, 20) == pytest.approx(expected)


def test_cyclic_peak_is_an_integer_epoch_as_in_the_original():
    """96 epochs: the original's peak is 96 * 2 // 5 = 38, not 38.4."""
    assert schedules.learning_rate("cyclic", 0.04, 38, 96) == pytest.approx(0.04)
    assert schedules.learning_rate("cyclic", 0.04, 19, 96) == pytest.approx(0.02)
    assert schedules.learning_rate("cyclic", 0.04, 67, 96) == pytest.approx(0.02)  # (96 - 67) / (96 - 38) = 1/2


def test_piecewise_and_constant_schedules():
    lr = [schedules.learning_rate("piecewise", 0.1, t, 100) for t in (0, 49.9, 50, 74.9, 75, 99)]
    assert lr == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert schedules.learning_rate("constant", 0.3, 17, 20) == schedules.learning_rate("same", 0.3, 17, 20) == 0.3
